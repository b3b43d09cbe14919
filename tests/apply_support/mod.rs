//! Shared helpers for the apply tests: fake hosts in temp dirs, the agent binary, a fake
//! systemctl that logs what it is asked, and a fake kube-apiserver speaking mutual TLS.
#![allow(dead_code)]

use crate::https_support;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use assert_cmd::Command;
use base64::Engine as _;

pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// A fake host under a temp dir.
pub struct Host {
    pub dir: tempfile::TempDir,
}

impl Host {
    pub fn new() -> Host {
        Host {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root().join(host_path.trim_start_matches('/'))
    }

    pub fn write(&self, host_path: &str, contents: impl AsRef<[u8]>) -> &Self {
        let path = self.path(host_path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, contents).expect("write");
        self
    }

    pub fn mkdir(&self, host_path: &str) -> &Self {
        std::fs::create_dir_all(self.path(host_path)).expect("mkdir");
        self
    }

    pub fn copy(&self, from: &Path, host_path: &str) -> &Self {
        let bytes = std::fs::read(from).expect("read test data");
        self.write(host_path, bytes)
    }

    pub fn read(&self, host_path: &str) -> String {
        std::fs::read_to_string(self.path(host_path)).expect("read")
    }

    /// The agent configuration with `issuer`.
    pub fn agent_config(&self, issuer: &str) -> &Self {
        self.write("/etc/irsa-agent/config.yaml", format!("issuer: {issuer}\n"))
    }

    /// k3s's service-account keys (service.key with the verification keys, service.current.key
    /// signing) under `data_dir`, from the apiserver test case `k3s`.
    pub fn k3s_keys(&self, data_dir: &str) -> &Self {
        self.copy(
            &data("apiserver/k3s/keys/service.key"),
            &format!("{data_dir}/server/tls/service.key"),
        )
        .copy(
            &data("apiserver/k3s/keys/service.current.key"),
            &format!("{data_dir}/server/tls/service.current.key"),
        )
    }

    /// kubeadm's sa.key / sa.pub.
    pub fn kubeadm_keys(&self) -> &Self {
        self.copy(
            &data("apiserver/kubeadm/keys/rsa2048.pub"),
            "/etc/kubernetes/pki/sa.pub",
        )
        .copy(
            &data("apiserver/kubeadm/keys/rsa2048.pkcs1.key"),
            "/etc/kubernetes/pki/sa.key",
        )
    }

    pub fn agent(&self) -> Command {
        let mut cmd = Command::cargo_bin("irsa-agent").expect("binary built");
        cmd.arg("--root").arg(self.root());
        cmd.env_remove("IRSA_AGENT_CONFIG");
        cmd.env_remove("IRSA_AGENT_SYSTEMCTL");
        cmd.env_remove("IRSA_AGENT_APISERVER_URL");
        cmd
    }

    /// Every file under the root (relative paths) with its bytes.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        walk(self.root(), self.root(), &mut out);
        out.sort();
        out
    }

    /// A fake `systemctl` that appends its arguments to `<root>/systemctl.log`.
    pub fn fake_systemctl(&self) -> PathBuf {
        let script = self.root().join("fake-systemctl");
        let log = self.root().join("systemctl.log");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" >> '{}'\n", log.display()),
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script
    }

    pub fn systemctl_log(&self) -> String {
        std::fs::read_to_string(self.root().join("systemctl.log")).unwrap_or_default()
    }

    /// An admin kubeconfig at `host_path` pointing at `server`, with the test CA and client
    /// certificate inline, as k3s and kubeadm write them.
    pub fn kubeconfig(&self, host_path: &str, server: &str) -> &Self {
        let b64 = |f: &str| {
            base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(data(&format!("probe/{f}"))).expect("probe data"))
        };
        self.write(
            host_path,
            format!(
                "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: {server}\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nkind: Config\npreferences: {{}}\nusers:\n- name: default\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
                b64("ca.crt"),
                b64("client.crt"),
                b64("client.key")
            ),
        )
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(base, &path, out);
        } else {
            let rel = path.strip_prefix(base).expect("under base").to_path_buf();
            out.push((rel, std::fs::read(&path).unwrap_or_default()));
        }
    }
}

/// How the fake apiserver behaves.
#[derive(Clone)]
pub enum Behaviour {
    /// `/readyz` always answers 500.
    NeverReady,
    /// Ready; serves the first issuer the host's configuration gives it, re-read after every
    /// `systemctl restart` in the fake systemctl log (k3s), or on every request (kubeadm, where
    /// kubelet picks up manifest changes by itself). Its `serviceaccount_stale_tokens_total` is
    /// `<root>/fake-stale-tokens` when that exists, else 0.
    FollowHost {
        root: PathBuf,
        distribution: irsa_agent::config::Distribution,
    },
    /// Like `FollowHost`, and it also loads the service-account keys the host's files name at
    /// each (re)start: serves them at /openid/v1/jwks, signs TokenRequests with the signing
    /// key, lists itself as the `kubernetes` endpoints, has no legacy token Secrets, and reads
    /// the time for token `exp` from `<root>/fake-clock` (unix seconds) when it exists.
    Keys {
        root: PathBuf,
        distribution: irsa_agent::config::Distribution,
    },
    /// Ready; serves these documents, the `kubernetes` endpoints and TokenRequest (doctor,
    /// verify-token).
    Serve(Served),
    /// Like `FollowHost`, but it cannot start with this signing issuer: `/readyz` answers 500
    /// while the configuration it loaded makes `broken` sign (a change that breaks the
    /// apiserver, to be rolled back).
    BreaksOn {
        root: PathBuf,
        distribution: irsa_agent::config::Distribution,
        broken: String,
    },
}

/// The stale-token counter a `FollowHost` apiserver reports: `<root>/fake-stale-tokens`, or 0.
fn stale_tokens(root: &Path) -> u64 {
    std::fs::read_to_string(root.join("fake-stale-tokens"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The keys an apiserver started on `root` loads.
fn loaded_keys(
    root: &Path,
    d: irsa_agent::config::Distribution,
) -> Option<(
    Vec<irsa_agent::keys::PublicKey>,
    irsa_agent::keys::SigningKey,
)> {
    let host = irsa_agent::host::HostRoot::new(root);
    let observed = irsa_agent::apiserver::observe(&host, d).ok()?;
    let signing = observed.flags.signing_key_file.clone()?;
    let signing = irsa_agent::keys::load_signing_file(&host.path(signing)).ok()?;
    Some((observed.keys.verification, signing))
}

fn fake_now(root: &Path) -> u64 {
    std::fs::read_to_string(root.join("fake-clock"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(irsa_agent::state::unix_now)
}

/// What a [`Behaviour::Serve`] apiserver answers.
#[derive(Clone, Debug)]
pub struct Served {
    pub discovery: String,
    pub jwks: String,
    /// The apiserver ports `GET /api/v1/namespaces/default/endpoints/kubernetes` lists, on
    /// 127.0.0.1; port 0 stands for this server itself (404 when `None`).
    pub endpoints: Option<Vec<u16>>,
    /// TokenRequest mints tokens with this signing key file (a real path) as this issuer.
    pub signer: Option<(PathBuf, String)>,
}

impl Served {
    /// What a real kube-apiserver started with the host's current flags and key files serves:
    /// every verification key in flag order (repeats kept), the first issuer, the jwks-uri.
    pub fn from_host(root: &Path, distribution: irsa_agent::config::Distribution) -> Served {
        let host = irsa_agent::host::HostRoot::new(root);
        let observed = irsa_agent::apiserver::observe(&host, distribution).expect("observe host");
        let flags = &observed.flags;
        let mut keys = Vec::new();
        for file in &flags.key_files {
            keys.extend(
                irsa_agent::keys::load_verification_file(&host.path(file))
                    .expect("key file")
                    .keys,
            );
        }
        let issuer = flags.issuers.first().cloned().unwrap_or_default();
        let jwks_uri = flags
            .jwks_uri()
            .map(str::to_string)
            .unwrap_or_else(|| "https://127.0.0.1:6443/openid/v1/jwks".to_string());
        Served {
            discovery: irsa_agent::keys::jwks::discovery_json(&issuer, &jwks_uri, &keys),
            jwks: irsa_agent::keys::jwks::jwks_json(&keys),
            endpoints: None,
            signer: flags
                .signing_key_file
                .as_ref()
                .map(|f| (host.path(f), issuer.clone())),
        }
    }

    /// An Endpoints object listing one apiserver per port on 127.0.0.1.
    pub fn endpoints_for(ports: &[u16]) -> String {
        let subsets: Vec<serde_json::Value> = ports
            .iter()
            .map(|p| {
                serde_json::json!({"addresses": [{"ip": "127.0.0.1"}],
                    "ports": [{"name": "https", "port": p, "protocol": "TCP"}]})
            })
            .collect();
        serde_json::json!({"kind": "Endpoints", "apiVersion": "v1",
            "metadata": {"name": "kubernetes", "namespace": "default"}, "subsets": subsets})
        .to_string()
    }
}

/// The fake's TokenRequest: a token signed like kube-apiserver signs one.
fn token_request(served: &Served, path: &str, body: &str) -> (u16, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (ns, sa) = match parts.as_slice() {
        [
            "api",
            "v1",
            "namespaces",
            ns,
            "serviceaccounts",
            sa,
            "token",
        ] => (*ns, *sa),
        _ => {
            return (
                404,
                "{\"kind\":\"Status\",\"message\":\"not found\"}".to_string(),
            );
        }
    };
    if sa == "missing" {
        return (
            404,
            format!(
                "{{\"kind\":\"Status\",\"message\":\"serviceaccounts \\\"{sa}\\\" not found\"}}"
            ),
        );
    }
    let Some((key_file, issuer)) = &served.signer else {
        return (500, "{\"message\":\"no signer\"}".to_string());
    };
    let request: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let audiences = request
        .pointer("/spec/audiences")
        .cloned()
        .unwrap_or_else(|| serde_json::json!([issuer]));
    let seconds = request
        .pointer("/spec/expirationSeconds")
        .and_then(|v| v.as_u64())
        .unwrap_or(3600);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let key = irsa_agent::keys::load_signing_file(key_file).expect("signing key");
    let claims = serde_json::json!({
        "aud": audiences, "exp": now + seconds, "iat": now, "iss": issuer,
        "jti": "0b7c2f55-5a7e-4c39-9e0b-6d1f4c1f0001",
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "5d5e8f4e-1111-2222-3333-444455556666"}},
        "nbf": now, "sub": format!("system:serviceaccount:{ns}:{sa}"),
    });
    let token = irsa_agent::keys::token::mint(&key, &claims).expect("mint");
    (
        201,
        serde_json::json!({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa, "namespace": ns},
            "spec": {"audiences": audiences, "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
        .to_string(),
    )
}

/// A fake kube-apiserver on 127.0.0.1 with TLS and client-certificate authentication.
pub struct FakeApiserver {
    pub port: u16,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApiserver {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn start(behaviour: Behaviour) -> FakeApiserver {
        FakeApiserver::start_on(0, behaviour)
    }

    /// A port nothing listens on (connections to it are refused), to start a fake on later
    /// with [`FakeApiserver::start_on`]: an apiserver that is down, then comes back.
    pub fn refused_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    }

    /// Starts on `port` (0: any). Stopping (drop) and starting again on the same port is an
    /// apiserver restart: connections are refused in between, and it loads the host's
    /// configuration again.
    pub fn start_on(port: u16, behaviour: Behaviour) -> FakeApiserver {
        let config = https_support::server_config(true);
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        // The apiserver "started" now: it serves what the host's configuration says now, until
        // it is restarted (k3s: a line in the fake systemctl log; kubeadm: kubelet follows the
        // manifest by itself).
        let restarts_of = |root: &Path| {
            std::fs::read_to_string(root.join("systemctl.log"))
                .map(|l| l.lines().count())
                .unwrap_or(0)
        };
        let issuer_of = |root: &Path, d: irsa_agent::config::Distribution| {
            let host = irsa_agent::host::HostRoot::new(root);
            irsa_agent::apiserver::observe(&host, d)
                .ok()
                .and_then(|o| o.flags.issuers.first().cloned())
                .unwrap_or_default()
        };
        let (mut seen_restarts, mut issuer) = match &behaviour {
            Behaviour::FollowHost { root, distribution }
            | Behaviour::BreaksOn {
                root, distribution, ..
            }
            | Behaviour::Keys { root, distribution } => {
                (restarts_of(root), issuer_of(root, *distribution))
            }
            Behaviour::NeverReady | Behaviour::Serve(_) => (0, String::new()),
        };
        let manifest_of = |root: &Path| {
            std::fs::read(root.join("etc/kubernetes/manifests/kube-apiserver.yaml"))
                .unwrap_or_default()
        };
        let mut keys = match &behaviour {
            Behaviour::Keys { root, distribution } => loaded_keys(root, *distribution),
            _ => None,
        };
        let mut manifest = match &behaviour {
            Behaviour::Keys { root, .. } => manifest_of(root),
            _ => Vec::new(),
        };
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let Some((request, mut tls)) =
                    https_support::accept(stream, &config, std::time::Duration::from_secs(5))
                else {
                    continue;
                };
                let https_support::Request {
                    method,
                    path,
                    body: request_body,
                } = request;
                requests2.lock().expect("lock").push(path.clone());
                let (code, body) = match &behaviour {
                    Behaviour::NeverReady => (500, "[-]etcd failed: reason withheld".to_string()),
                    Behaviour::Serve(served) => match (method.as_str(), path.as_str()) {
                        ("GET", "/readyz") => (200, "ok".to_string()),
                        ("GET", "/.well-known/openid-configuration") => {
                            (200, served.discovery.clone())
                        }
                        ("GET", "/openid/v1/jwks") => (200, served.jwks.clone()),
                        ("GET", "/api/v1/namespaces/default/endpoints/kubernetes") => {
                            match &served.endpoints {
                                Some(ports) => {
                                    let ports: Vec<u16> = ports
                                        .iter()
                                        .map(|p| if *p == 0 { port } else { *p })
                                        .collect();
                                    (200, Served::endpoints_for(&ports))
                                }
                                None => (404, "{\"kind\":\"Status\",\"message\":\"endpoints \\\"kubernetes\\\" not found\"}".to_string()),
                            }
                        }
                        ("POST", p) if p.ends_with("/token") => token_request(
                            served,
                            p,
                            &String::from_utf8_lossy(&request_body),
                        ),
                        _ => (404, "not found".to_string()),
                    },
                    Behaviour::FollowHost { root, distribution }
                    | Behaviour::BreaksOn {
                        root, distribution, ..
                    } => {
                        let restarts = restarts_of(root);
                        let follow_always =
                            *distribution == irsa_agent::config::Distribution::Kubeadm;
                        if follow_always || restarts != seen_restarts {
                            seen_restarts = restarts;
                            issuer = issuer_of(root, *distribution);
                        }
                        let broken = match &behaviour {
                            Behaviour::BreaksOn { broken, .. } => *broken == issuer,
                            _ => false,
                        };
                        match path.as_str() {
                            "/readyz" if broken => {
                                (500, "[-]poststarthook/start-service-account-issuer failed".to_string())
                            }
                            _ if broken => (503, "not ready".to_string()),
                            "/readyz" => (200, "ok".to_string()),
                            "/.well-known/openid-configuration" => (
                                200,
                                format!(
                                    "{{\"issuer\":\"{issuer}\",\"jwks_uri\":\"https://127.0.0.1/openid/v1/jwks\",\"response_types_supported\":[\"id_token\"],\"subject_types_supported\":[\"public\"],\"id_token_signing_alg_values_supported\":[\"RS256\"]}}"
                                ),
                            ),
                            "/metrics" => (
                                200,
                                format!(
                                    "# TYPE serviceaccount_stale_tokens_total counter\nserviceaccount_stale_tokens_total {}\n",
                                    stale_tokens(root)
                                ),
                            ),
                            _ => (404, "not found".to_string()),
                        }
                    }
                    Behaviour::Keys { root, distribution } => {
                        let restarts = restarts_of(root);
                        let kubeadm = *distribution == irsa_agent::config::Distribution::Kubeadm;
                        let changed = if kubeadm {
                            manifest_of(root) != manifest
                        } else {
                            restarts != seen_restarts
                        };
                        if changed {
                            seen_restarts = restarts;
                            manifest = manifest_of(root);
                            issuer = issuer_of(root, *distribution);
                            keys = loaded_keys(root, *distribution);
                        }
                        let path_only = path.split('?').next().unwrap_or("");
                        match (path_only, &keys) {
                            ("/readyz", Some(_)) => (200, "ok".to_string()),
                            ("/readyz", None) => (500, "[-]service-account keys unreadable".to_string()),
                            ("/.well-known/openid-configuration", _) => (
                                200,
                                format!(
                                    "{{\"issuer\":\"{issuer}\",\"jwks_uri\":\"https://127.0.0.1/openid/v1/jwks\",\"response_types_supported\":[\"id_token\"],\"subject_types_supported\":[\"public\"],\"id_token_signing_alg_values_supported\":[\"RS256\"]}}"
                                ),
                            ),
                            ("/openid/v1/jwks", Some((verification, _))) => {
                                (200, irsa_agent::keys::jwks::jwks_json(verification))
                            }
                            ("/api/v1/namespaces/default/endpoints/kubernetes", _) => (
                                200,
                                format!(
                                    "{{\"kind\":\"Endpoints\",\"subsets\":[{{\"addresses\":[{{\"ip\":\"127.0.0.1\"}}],\"ports\":[{{\"name\":\"https\",\"port\":{port}}}]}}]}}"
                                ),
                            ),
                            ("/api/v1/secrets", _) => {
                                (200, "{\"kind\":\"SecretList\",\"items\":[]}".to_string())
                            }
                            ("/metrics", _) => (
                                200,
                                "# TYPE serviceaccount_stale_tokens_total counter\nserviceaccount_stale_tokens_total 0\n".to_string(),
                            ),
                            (p, Some((_, signing)))
                                if p.ends_with("/token") && method == "POST" =>
                            {
                                let request: serde_json::Value =
                                    serde_json::from_slice(&request_body).unwrap_or_default();
                                let aud = request["spec"]["audiences"].clone();
                                let now = fake_now(root);
                                let token = irsa_agent::keys::token::mint(
                                    signing,
                                    &serde_json::json!({"iss": issuer, "sub": "system:serviceaccount:kube-system:default", "aud": aud, "iat": now, "exp": now + 600}),
                                )
                                .unwrap_or_default();
                                (
                                    201,
                                    format!(
                                        "{{\"kind\":\"TokenRequest\",\"status\":{{\"token\":\"{token}\"}}}}"
                                    ),
                                )
                            }
                            _ => (404, "not found".to_string()),
                        }
                    }
                };
                https_support::respond(
                    &mut tls,
                    code,
                    &[("content-type", "application/json".into())],
                    body.as_bytes(),
                );
            }
        });
        FakeApiserver {
            port,
            stop,
            handle: Some(handle),
            requests,
        }
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
