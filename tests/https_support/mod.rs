//! What the tests' fake HTTPS servers share (the fake apiserver, the doctor tests' public
//! endpoint, the rotation tests' static site): the TLS configuration with the test certificate
//! for 127.0.0.1 (tests/data/probe), reading one HTTP/1.1 request, and answering it. Each
//! server answers one request per connection and closes it, as `connection: close` says.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A server-side TLS session over one accepted connection.
pub type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn probe_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/probe")
        .join(name)
}

/// The server configuration: the probe CA's certificate for 127.0.0.1. With
/// `require_client_cert`, clients must present a certificate that CA signed (as the apiserver
/// asks of the admin kubeconfig's credential).
pub fn server_config(require_client_cert: bool) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_file(probe_file("server.crt")).expect("cert")];
    let key = PrivateKeyDer::from_pem_file(probe_file("server.key")).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(probe_file("ca.crt")).expect("ca"))
            .expect("root");
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(chain, key).expect("server config"))
}

/// One request as the server read it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    pub body: Vec<u8>,
}

/// Does the TLS handshake on `stream` and reads one request: the request line, the headers and
/// a `content-length` body. `None` when the client goes away or the handshake fails.
pub fn accept(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    read_timeout: Duration,
) -> Option<(Request, Tls)> {
    let _ = stream.set_read_timeout(Some(read_timeout));
    let conn = rustls::ServerConnection::new(config.clone()).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut reader = BufReader::new(&mut tls);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    drop(reader);
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    Some((Request { method, path, body }, tls))
}

/// Answers with `status`, the `headers` given, a content-length and `connection: close`, then
/// closes the TLS session.
pub fn respond(tls: &mut Tls, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status} X\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(body);
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
