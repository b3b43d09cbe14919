//! Helpers for the doctor / verify-token tests: a small HTTPS server on 127.0.0.1 (rustls,
//! the test CA of tests/data/probe) whose answers the test controls (status, Content-Type,
//! Cache-Control, Age, Date, a delay), and a whole healthy "world": a k3s host, a fake
//! apiserver speaking mutual TLS (tests/apply_support), and the public documents.
#![allow(dead_code)]

use crate::https_support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::apply_support::{Behaviour, FakeApiserver, Host, Served, data};

/// The Date header an answer carries.
#[derive(Clone, Debug)]
pub enum Date {
    Now,
    At(i64),
    Absent,
}

/// One canned answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub age: Option<u64>,
    pub date: Date,
    /// Wait this long before answering.
    pub delay: Duration,
    pub body: Vec<u8>,
}

impl Reply {
    /// 200, application/json, `public, max-age=300`, Date now.
    pub fn json(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            content_type: Some("application/json".into()),
            cache_control: Some("public, max-age=300".into()),
            age: None,
            date: Date::Now,
            delay: Duration::ZERO,
            body: body.into(),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (httpdate, independent of the parser under test).
pub fn http_date(secs: i64) -> String {
    let secs = u64::try_from(secs).expect("a time after 1970");
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A test HTTPS server on 127.0.0.1 answering from a route table the test can change.
pub struct PublicServer {
    pub port: u16,
    pub routes: Arc<Mutex<HashMap<String, Reply>>>,
    pub requests: Arc<Mutex<Vec<String>>>,
    /// The most requests that were being answered at the same time.
    pub max_in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl PublicServer {
    pub fn start() -> PublicServer {
        let config = https_support::server_config(false);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (routes2, requests2, stop2) = (routes.clone(), requests.clone(), stop.clone());
        let max2 = max_in_flight.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let config = config.clone();
                let routes = routes2.clone();
                let requests = requests2.clone();
                let (in_flight, max) = (in_flight.clone(), max2.clone());
                // One thread per connection: a slow answer must not hold up the others.
                std::thread::spawn(move || {
                    let Some((request, mut tls)) =
                        https_support::accept(stream, &config, Duration::from_secs(10))
                    else {
                        return;
                    };
                    let path = request.path;
                    requests.lock().expect("lock").push(path.clone());
                    let now_in_flight = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now_in_flight, Ordering::SeqCst);
                    let reply = routes.lock().expect("lock").get(&path).cloned();
                    let reply = reply.unwrap_or(Reply {
                        status: 404,
                        content_type: Some("text/plain".into()),
                        cache_control: None,
                        age: None,
                        date: Date::Now,
                        delay: Duration::ZERO,
                        body: b"not found".to_vec(),
                    });
                    std::thread::sleep(reply.delay);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let mut headers = Vec::new();
                    if let Some(ct) = &reply.content_type {
                        headers.push(("content-type", ct.clone()));
                    }
                    if let Some(cc) = &reply.cache_control {
                        headers.push(("cache-control", cc.clone()));
                    }
                    if let Some(age) = reply.age {
                        headers.push(("age", age.to_string()));
                    }
                    match reply.date {
                        Date::Now => headers.push(("date", http_date(unix_now()))),
                        Date::At(t) => headers.push(("date", http_date(t))),
                        Date::Absent => {}
                    }
                    https_support::respond(&mut tls, reply.status, &headers, &reply.body);
                });
            }
        });
        PublicServer {
            port,
            routes,
            requests,
            max_in_flight,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, path: &str, reply: Reply) {
        self.routes
            .lock()
            .expect("lock")
            .insert(path.to_string(), reply);
    }

    /// Changes the answer at `path`.
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Reply)) {
        let mut routes = self.routes.lock().expect("lock");
        let reply = routes.get_mut(path).expect("route exists");
        f(reply);
    }
}

impl Drop for PublicServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Where the documents live on the public server.
pub const DISCOVERY: &str = "/cluster-a/.well-known/openid-configuration";
pub const JWKS: &str = "/cluster-a/openid/v1/jwks";

/// A healthy cluster: a k3s host whose apiserver signs with the public issuer (the default
/// issuer still accepted, audiences pinned by k3s, jwks-uri set, keys 0600), a fake apiserver
/// serving exactly its files, and the public documents as `irsa-agent publish` renders them.
pub struct World {
    pub host: Host,
    pub public: PublicServer,
    pub apiserver: FakeApiserver,
    pub issuer: String,
    pub distribution: irsa_agent::config::Distribution,
}

pub const K3S_DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl World {
    pub fn healthy() -> World {
        let public = PublicServer::start();
        let issuer = format!("{}/cluster-a", public.url());
        let host = Host::new();
        host.write(
            "/etc/irsa-agent/config.yaml",
            format!("issuer: {issuer}\ndistribution: k3s\nca-file: /etc/irsa-agent/test-ca.pem\n"),
        )
        .copy(&data("probe/ca.crt"), "/etc/irsa-agent/test-ca.pem")
        .write(
            "/etc/rancher/k3s/config.yaml",
            format!(
                "kube-apiserver-arg:\n  - service-account-issuer={issuer}\n  - service-account-issuer={K3S_DEFAULT_ISSUER}\n  - service-account-jwks-uri={issuer}/openid/v1/jwks\n"
            ),
        )
        .k3s_keys("/var/lib/rancher/k3s");
        for key in ["service.key", "service.current.key"] {
            chmod(
                &host.path(&format!("/var/lib/rancher/k3s/server/tls/{key}")),
                0o600,
            );
        }
        let apiserver = World::start_apiserver(&host, irsa_agent::config::Distribution::K3s, &[]);
        let world = World {
            host,
            public,
            apiserver,
            issuer,
            distribution: irsa_agent::config::Distribution::K3s,
        };
        world.publish_current_keys();
        world
    }

    /// A kubeadm host (the v1.31 manifest, edited by `edit` given the public issuer), its
    /// keys (sa.key 0600), the fake apiserver and the public documents.
    pub fn kubeadm(edit: impl Fn(&str, String) -> String) -> World {
        let public = PublicServer::start();
        let issuer = format!("{}/cluster-a", public.url());
        let host = Host::new();
        let manifest = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hosts/kubeadm/v1.31.yaml"),
        )
        .expect("manifest");
        host.write(
            "/etc/irsa-agent/config.yaml",
            format!(
                "issuer: {issuer}\ndistribution: kubeadm\nca-file: /etc/irsa-agent/test-ca.pem\n"
            ),
        )
        .copy(&data("probe/ca.crt"), "/etc/irsa-agent/test-ca.pem")
        .write(
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
            edit(&issuer, manifest),
        )
        .kubeadm_keys();
        chmod(&host.path("/etc/kubernetes/pki/sa.key"), 0o600);
        let apiserver =
            World::start_apiserver(&host, irsa_agent::config::Distribution::Kubeadm, &[]);
        let world = World {
            host,
            public,
            apiserver,
            issuer,
            distribution: irsa_agent::config::Distribution::Kubeadm,
        };
        world.publish_current_keys();
        world
    }

    /// Restarts the fake apiserver: it then serves the host's files as they are now.
    pub fn restart_apiserver(&mut self, others: &[u16]) {
        self.apiserver = World::start_apiserver(&self.host, self.distribution, others);
    }

    /// A fake apiserver serving the host's current flags and keys (plus `endpoints`), and the
    /// admin kubeconfig pointing at it.
    pub fn start_apiserver(
        host: &Host,
        distribution: irsa_agent::config::Distribution,
        others: &[u16],
    ) -> FakeApiserver {
        let mut served = Served::from_host(host.root(), distribution);
        // The endpoints name the server itself (port 0) and the other apiservers given.
        served.endpoints = Some(std::iter::once(0).chain(others.iter().copied()).collect());
        let server = FakeApiserver::start(Behaviour::Serve(served));
        let kubeconfig = match distribution {
            irsa_agent::config::Distribution::Kubeadm => "/etc/kubernetes/admin.conf",
            _ => "/etc/rancher/k3s/k3s.yaml",
        };
        host.kubeconfig(kubeconfig, &server.url());
        server
    }

    /// Publishes the documents `irsa-agent publish` would render for the host's keys now.
    pub fn publish_current_keys(&self) {
        let root = irsa_agent::host::HostRoot::new(self.host.root());
        let settings = irsa_agent::config::load(&root, None)
            .expect("config")
            .settings;
        let publication = irsa_agent::publish::Publication::from_host(
            &root,
            &settings,
            irsa_agent::rotation::published_ahead(&root),
        )
        .expect("publication");
        self.public.set(
            DISCOVERY,
            Reply::json(publication.documents.discovery.clone()),
        );
        self.public
            .set(JWKS, Reply::json(publication.documents.jwks.clone()));
    }

    /// Runs the agent against this host (no SSL_CERT_FILE: the config's ca-file is the trust).
    pub fn agent(&self, args: &[&str]) -> (i32, String, String) {
        self.agent_with_stdin(args, "")
    }

    /// The same, with `stdin` as standard input.
    pub fn agent_with_stdin(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        let out = self
            .host
            .agent()
            .write_stdin(stdin.to_string())
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env("NO_PROXY", "127.0.0.1,localhost")
            // kubeadm: the manifest's advertise address is not this machine.
            .env("IRSA_AGENT_APISERVER_URL", self.apiserver.url())
            .args(args)
            .output()
            .expect("runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Text with this world's ports replaced by names (snapshots).
    pub fn normalize(&self, text: &str) -> String {
        let mut t = text.replace(&self.public.port.to_string(), "PUBLIC_PORT");
        t = t.replace(&self.apiserver.port.to_string(), "APISERVER_PORT");
        mask_millis(&t)
    }
}

/// `in 12 ms` -> `in N ms`, `answered in 1.5 s` -> `answered in N s` (timings vary).
pub fn mask_millis(text: &str) -> String {
    let text = mask_after(
        text,
        "answered in ",
        |c| c.is_ascii_digit() || c == '.',
        "N",
    );
    mask_ms(&text)
}

/// Replaces the run of `keep` characters after each `marker` with `with`.
pub fn mask_after(text: &str, marker: &str, keep: impl Fn(char) -> bool, with: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        out.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        let n = rest.len() - rest.trim_start_matches(|c: char| keep(c)).len();
        if n > 0 {
            out.push_str(with);
            rest = &rest[n..];
        }
    }
    out.push_str(rest);
    out
}

fn mask_ms(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(" ms") {
        let (before, after) = rest.split_at(i);
        let digits = before.len() - before.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push_str(&before[..before.len() - digits]);
            out.push('N');
        } else {
            out.push_str(before);
        }
        out.push_str(" ms");
        rest = &after[3..];
    }
    out.push_str(rest);
    out
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The lines of the text report that are not `pass`: each WARN/FAIL/skip check with its
/// details and fix, and the summary (what a snapshot of "doctor's words" should hold). The
/// configuration's warning about the test issuer's port is left out.
pub fn problems(report: &str) -> String {
    let mut out = Vec::new();
    let mut keep = false;
    for line in report.lines() {
        if line.starts_with("  ") && !line.starts_with("        ") {
            // The issuer of these tests has a port (config.valid warns): not the story.
            keep = !line.starts_with("  pass  ") && !line.starts_with("  WARN  config.valid:");
        } else if !line.starts_with("        ") {
            // a group title or the summary
            keep = line.starts_with("ok") || line.starts_with("NOT OK");
        }
        if keep {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}

/// The status of one check (by id, and subject when given) in `doctor --json` output.
pub fn status_of(json: &serde_json::Value, id: &str) -> Vec<String> {
    json["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["id"] == id)
        .map(|c| c["status"].as_str().unwrap_or("").to_string())
        .collect()
}
