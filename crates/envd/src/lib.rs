//! The in-sandbox agent, wire-compatible with E2B's envd (Connect RPC process and filesystem services, HTTP /files).
