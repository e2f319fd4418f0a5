//! Serde DTOs of the E2B REST control plane, spelled as the E2B SDKs spell them.
