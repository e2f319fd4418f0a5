//! Validated value types shared by every firkin crate: sizes, ids, the sandbox host grammar.
