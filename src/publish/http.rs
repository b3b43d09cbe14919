//! HTTPS for the agent's own requests (the public copy, STS, storage endpoints).
//!
//! rustls with the ring provider (no C toolchain beyond ring's, no OpenSSL). Trust: the system
//! store as the platform verifier loads it, which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! exactly as OpenSSL-based tools do (the file then replaces the system bundle), plus the
//! certificates of the configured `ca-file:` on top.

use std::path::Path;
use std::time::Duration;

/// Installs ring as rustls' process-wide provider (idempotent; a provider someone else
/// installed first is kept).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The User-Agent of every request the agent makes.
pub fn user_agent() -> String {
    format!("irsa-agent/{}", env!("CARGO_PKG_VERSION"))
}

/// Reads a PEM bundle of CA certificates (`ca-file:`).
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem = crate::fs::read(path)
        .map_err(|e| format!("cannot read ca-file {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "ca-file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(pem)
}

/// An HTTP client trusting the system store (or `SSL_CERT_FILE`) plus `ca_file`.
pub fn client(ca_file: Option<&Path>, timeout: Duration) -> Result<reqwest::Client, String> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent())
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .redirect(reqwest::redirect::Policy::limited(5));
    if let Some(path) = ca_file {
        let pem = read_ca_file(path)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ca-file {}: {e}", path.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up HTTPS: {}", super::store::error_chain(&e)))
}

/// `object_store` client options with the same trust (and the agent's User-Agent).
pub fn store_options(ca_file: Option<&Path>) -> Result<object_store::ClientOptions, String> {
    install_crypto_provider();
    let mut options = object_store::ClientOptions::new()
        .with_user_agent(
            user_agent()
                .parse()
                .map_err(|_| "invalid user agent".to_string())?,
        )
        .with_timeout(Duration::from_secs(30))
        .with_connect_timeout(Duration::from_secs(5));
    if let Some(path) = ca_file {
        let pem = read_ca_file(path)?;
        for cert in object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ca-file {}: {e}", path.display()))?
        {
            options = options.with_root_certificate(cert);
        }
    }
    Ok(options)
}
