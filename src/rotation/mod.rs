//! Signing-key rotation (placeholder while the module is built).
pub mod keygen;
