//! The IAM OIDC provider's thumbprint, found out by asking the issuer's host (only when asked:
//! `trust-policy --thumbprint`).
//!
//! AWS needs no thumbprint when the certificate the issuer's host serves chains to a public CA
//! it trusts; for a private CA it needs the SHA-1 fingerprint of the top certificate of the
//! chain the host serves. So: the chain is fetched in a TLS handshake that accepts any
//! certificate (it only reads the certificates; nothing is sent but the handshake), and the
//! host is asked again with the normal verification against this machine's CA store
//! (`SSL_CERT_FILE` honoured, the configured `ca-file:` NOT added: it is the private CA in
//! question). Verified: a public CA, no thumbprint. Not verified: the SHA-1 of the top
//! certificate served.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// What AWS needs for the issuer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Thumbprint {
    /// The chain verifies against the public CAs this machine trusts.
    NotNeeded { host: String },
    /// A private chain: the SHA-1 (lower-case hex) of its top certificate, and its subject.
    Private {
        host: String,
        sha1: String,
        subject: String,
        why: String,
    },
}

/// Accepts any certificate: used only to read the chain the host serves.
#[derive(Debug)]
struct ReadOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificates `host:port` serves (leaf first), read in a TLS handshake.
pub fn served_chain(host: &str, port: u16, timeout: Duration) -> Result<Vec<Vec<u8>>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadOnly(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a host name: {e}"))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to no address"))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
    }
    let chain: Vec<Vec<u8>> = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    // Close politely; errors here do not matter.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    let _ = sock.flush();
    let _ = sock.read(&mut [0u8; 0]);
    if chain.is_empty() {
        return Err(format!("{host}:{port} sent no certificate"));
    }
    Ok(chain)
}

/// SHA-1 of `der`, lower-case hex (what `aws iam create-open-id-connect-provider
/// --thumbprint-list` takes).
pub fn sha1_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn subject_of(der: &[u8]) -> String {
    use der::Decode as _;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate.subject.to_string())
        .unwrap_or_else(|_| "(a certificate that does not parse)".to_string())
}

/// Asks the issuer's host what AWS needs (see the module docs). Blocking.
pub fn probe(issuer: &str, timeout: Duration) -> Result<Thumbprint, String> {
    let url = url::Url::parse(issuer).map_err(|e| format!("{issuer}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("{issuer} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let chain = served_chain(&host, port, timeout)?;
    // The same request a relying party makes, trusting only public CAs (this machine's store).
    let client = crate::publish::http::client(None, timeout)?;
    let discovery = super::super::publish::verify::discovery_url(issuer);
    let verified = crate::runtime::block_on(async { client.get(&discovery).send().await });
    match verified {
        Ok(_) => Ok(Thumbprint::NotNeeded { host }),
        Err(e) => {
            let top = chain.last().map(Vec::as_slice).unwrap_or_default();
            Ok(Thumbprint::Private {
                host,
                sha1: sha1_hex(top),
                subject: subject_of(top),
                why: crate::publish::store::error_chain(&e.without_url()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_of_known_vectors() {
        assert_eq!(sha1_hex(b"abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    }
}
