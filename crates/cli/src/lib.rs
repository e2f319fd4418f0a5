//! The firkin command line: serve, doctor, template, sandbox, bench.
