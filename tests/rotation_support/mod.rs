//! A simulated cluster for rotation tests: fake k3s and kubeadm hosts in temp dirs whose
//! apiservers load the host's key files at their last restart, a fake `k3s certificate
//! rotate-ca` that checks and stores `service.key` in a fake datastore (written to disk by the
//! next restart, as k3s does), a fake systemctl, fake publish targets behind a CDN and a caching
//! relying party, all on a simulated clock. Tokens are minted at every step and checked against
//! every apiserver and every JWKS with jsonwebtoken until they expire.
#![allow(dead_code)]

use crate::https_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use irsa_agent::apiserver::restart::ServiceManager;
use irsa_agent::clock::{Clock, SimulatedClock};
use irsa_agent::config::{Distribution, Settings};
use irsa_agent::errors::ProgramError;
use irsa_agent::host::HostRoot;
use irsa_agent::keys::{self, PublicKey, SigningKey};
use irsa_agent::membership::{self, Report, Restart, View};
use irsa_agent::publish::Publication;
use irsa_agent::rotation::cluster::{Cluster, ClusterError, Health, TOKEN_AUDIENCE};
use irsa_agent::rotation::publishing::{PublicCopy, Publishing, PublishingError};
use irsa_agent::rotation::runner::CommandRunner;
use irsa_agent::rotation::{Context, Options};
use zeroize::Zeroizing;

pub const ISSUER: &str = "https://oidc.example.com/cluster-a";
pub const HOUR: u64 = 3600;
pub const DAY: u64 = 86_400;
/// 2026-11-22T00:00:00Z.
pub const T0: u64 = 1_795_305_600;

pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel)
}

pub fn write(root: &Path, host_path: &str, bytes: impl AsRef<[u8]>) {
    let path = root.join(host_path.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

pub fn read(root: &Path, host_path: &str) -> Vec<u8> {
    std::fs::read(root.join(host_path.trim_start_matches('/'))).unwrap_or_default()
}

pub const K3S_TLS: &str = "/var/lib/rancher/k3s/server/tls";
pub const RKE2_TLS: &str = "/var/lib/rancher/rke2/server/tls";

/// The folder of service.key for k3s or RKE2.
pub fn tls_dir(distribution: Distribution) -> &'static str {
    if distribution == Distribution::Rke2 {
        RKE2_TLS
    } else {
        K3S_TLS
    }
}

/// A k3s host with the k3s test case's keys (service.key holds two keys; the first signs).
pub fn k3s_host(root: &Path) {
    rancher_host(root, Distribution::K3s);
}

/// The same keys and issuer configuration on k3s or RKE2.
pub fn rancher_host(root: &Path, distribution: Distribution) {
    let tls = tls_dir(distribution);
    let program = if distribution == Distribution::Rke2 {
        "rke2"
    } else {
        "k3s"
    };
    write(
        root,
        &format!("{tls}/service.key"),
        std::fs::read(data("data/apiserver/k3s/keys/service.key")).expect("k3s keys"),
    );
    write(
        root,
        &format!("{tls}/service.current.key"),
        std::fs::read(data("data/apiserver/k3s/keys/service.current.key")).expect("k3s keys"),
    );
    write(
        root,
        &format!("/etc/rancher/{program}/config.yaml"),
        format!(
            "kube-apiserver-arg:\n  - service-account-issuer={ISSUER}\n  - service-account-issuer=https://kubernetes.default.svc.cluster.local\n  - service-account-jwks-uri={ISSUER}/openid/v1/jwks\n"
        ),
    );
}

/// A kubeadm 1.33 host (apiserver and controller-manager manifests, sa.key / sa.pub).
pub fn kubeadm_host(root: &Path) {
    write(
        root,
        "/etc/kubernetes/manifests/kube-apiserver.yaml",
        std::fs::read(data("hosts/kubeadm/v1.33.yaml")).expect("manifest"),
    );
    write(
        root,
        "/etc/kubernetes/manifests/kube-controller-manager.yaml",
        std::fs::read(data("hosts/kubeadm/kube-controller-manager-v1.33.yaml")).expect("kcm"),
    );
    write(
        root,
        "/etc/kubernetes/pki/sa.key",
        std::fs::read(data("data/apiserver/kubeadm/keys/rsa2048.pkcs1.key")).expect("key"),
    );
    write(
        root,
        "/etc/kubernetes/pki/sa.pub",
        std::fs::read(data("data/apiserver/kubeadm/keys/rsa2048.pub")).expect("key"),
    );
}

/// Settings as the tests use them: propagation-wait 1h, cdn-ttl 10m, token-lifetime 24h,
/// drain-margin 1h, every 30d. Read through the real configuration loader (from a file under
/// `root`), so they are what a user's config.yaml gives.
pub fn settings(root: &Path, distribution: Distribution) -> Settings {
    write(
        root,
        "/etc/irsa-agent/config.yaml",
        format!(
            "issuer: {ISSUER}\ndistribution: {}\nrotation:\n  enabled: true\n  every: 30d\n  key-type: rsa-2048\n  propagation-wait: 1h\n  cdn-ttl: 10m\n  token-lifetime: 24h\n  drain-margin: 1h\n",
            distribution.name()
        ),
    );
    irsa_agent::config::load(&HostRoot::new(root), None)
        .expect("valid configuration")
        .settings
}

/// One fake apiserver: the keys it loaded at its last (re)start.
#[derive(Clone)]
pub struct FakeServer {
    pub url: String,
    pub verification: Vec<PublicKey>,
    pub signing: SigningKey,
    pub restarts: u32,
    /// What this server's own disk holds as service.key (k3s followers).
    pub disk: Vec<u8>,
}

/// A legacy token Secret.
#[derive(Clone)]
pub struct LegacySecret {
    pub name: String,
    pub token: String,
}

/// Everything the fakes share.
pub struct World {
    pub root: PathBuf,
    pub distribution: Distribution,
    pub servers: Vec<FakeServer>,
    pub datastore: Option<Vec<u8>>,
    pub clock: SimulatedClock,
    pub ready: bool,
    pub stale: Option<f64>,
    pub legacy: Vec<LegacySecret>,
    /// kubeadm: the manifest the local apiserver pod was started from.
    pub loaded_manifest: Vec<u8>,
    /// kube-controller-manager's signing key (kubeadm), loaded from its manifest.
    pub kcm_signing: Option<SigningKey>,
    pub loaded_kcm_manifest: Vec<u8>,
    /// Failure injection: the next N restarts fail / the next N rotate-ca fail / the next N
    /// publishes fail / the apiserver stays unready for the next N health checks.
    pub fail_restarts: u32,
    pub fail_rotate_ca: u32,
    pub fail_publish: u32,
    pub unready_checks: u32,
    /// The local apiserver refuses connections (stopped): every request to it fails.
    pub down: bool,
    /// Every `systemctl restart` and `rotate-ca` in order.
    pub log: Vec<String>,
    /// The agents' Leases as the apiserver shows them (`None`: no Lease API, the default).
    pub view: Option<View>,
    /// Lease operations of this agent, in order: `hold <name>`, `let go <name>`.
    pub leases: Vec<String>,
    /// What this agent announced in its Lease, in order.
    pub announced: Vec<Report>,
    /// Apiservers (URLs) the `kubernetes` Endpoints do not list now (restarting, or their
    /// endpoint lease lapsed), though they run.
    pub not_in_endpoints: Vec<String>,
    /// kubeadm on several nodes: the sealed new key the driver shared (the Secret).
    pub shared: Option<irsa_agent::rotation::seal::Sealed>,
    /// Another node holds the restart Lease (its name): this agent's turn never comes.
    pub restart_busy: Option<String>,
}

pub type Shared = Arc<Mutex<World>>;

/// What a request to a stopped apiserver fails with.
pub const REFUSED: &str = "error sending request for url (https://10.0.0.1:6443/): tcp connect error: Connection refused (os error 111)";

fn lock(world: &Shared) -> std::sync::MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the host's files make an apiserver load now.
pub fn load_local(root: &Path, distribution: Distribution) -> (Vec<PublicKey>, SigningKey) {
    let host = HostRoot::new(root);
    let observed = irsa_agent::apiserver::observe(&host, distribution).expect("observe");
    let signing_file = observed
        .flags
        .signing_key_file
        .clone()
        .expect("signing file");
    let signing = keys::load_signing_file(&host.path(&signing_file)).expect("signing key");
    assert!(
        observed.keys.errors.is_empty(),
        "the apiserver would refuse its key files: {:?}",
        observed.keys.errors
    );
    (observed.keys.verification.clone(), signing)
}

fn load_kcm(root: &Path) -> Option<SigningKey> {
    let text =
        std::fs::read_to_string(root.join("etc/kubernetes/manifests/kube-controller-manager.yaml"))
            .ok()?;
    let flag = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("- --service-account-private-key-file=")
        })?
        .to_string();
    keys::load_signing_file(&root.join(flag.trim_start_matches('/'))).ok()
}

/// k3s' start: the datastore's service.key is written to disk, and its first key to
/// service.current.key.
fn k3s_start(root: &Path, tls: &str, datastore: &Option<Vec<u8>>) {
    if let Some(bytes) = datastore {
        write(root, &format!("{tls}/service.key"), bytes);
        let first = keys::pem::blocks(bytes)
            .into_iter()
            .next()
            .expect("a key in the datastore");
        write(
            root,
            &format!("{tls}/service.current.key"),
            keys::pem::encode(&first.label_str(), &first.der),
        );
    }
}

fn parse_service_key(bytes: &[u8]) -> (Vec<PublicKey>, SigningKey) {
    let verification = keys::parse_verification_keys(bytes).expect("keys").keys;
    let signing = keys::parse_signing_key(bytes).expect("signing key");
    (verification, signing)
}

impl World {
    pub fn new(root: &Path, distribution: Distribution, servers: usize, now: u64) -> Shared {
        let (verification, signing) = load_local(root, distribution);
        let disk = read(root, &format!("{}/service.key", tls_dir(distribution)));
        let servers = (0..servers)
            .map(|i| FakeServer {
                url: format!("https://10.0.0.{}:6443", i + 1),
                verification: verification.clone(),
                signing: signing.clone(),
                restarts: 0,
                disk: disk.clone(),
            })
            .collect();
        let manifest = read(root, "/etc/kubernetes/manifests/kube-apiserver.yaml");
        let kcm_manifest = read(
            root,
            "/etc/kubernetes/manifests/kube-controller-manager.yaml",
        );
        Arc::new(Mutex::new(World {
            root: root.to_path_buf(),
            distribution,
            servers,
            datastore: None,
            clock: SimulatedClock::at(now),
            ready: true,
            stale: Some(0.0),
            legacy: Vec::new(),
            loaded_manifest: manifest,
            kcm_signing: load_kcm(root),
            loaded_kcm_manifest: kcm_manifest,
            fail_restarts: 0,
            fail_rotate_ca: 0,
            fail_publish: 0,
            unready_checks: 0,
            down: false,
            log: Vec::new(),
            view: None,
            leases: Vec::new(),
            announced: Vec::new(),
            not_in_endpoints: Vec::new(),
            shared: None,
            restart_busy: None,
        }))
    }

    /// kubelet: a changed static pod manifest restarts the pod.
    fn kubelet_sync(&mut self) {
        if self.distribution != Distribution::Kubeadm {
            return;
        }
        let manifest = read(&self.root, "/etc/kubernetes/manifests/kube-apiserver.yaml");
        if manifest != self.loaded_manifest {
            let (verification, signing) = load_local(&self.root, self.distribution);
            let s = &mut self.servers[0];
            s.verification = verification;
            s.signing = signing;
            s.restarts += 1;
            self.loaded_manifest = manifest;
            self.log.push("kubelet restarts kube-apiserver".into());
        }
        let kcm = read(
            &self.root,
            "/etc/kubernetes/manifests/kube-controller-manager.yaml",
        );
        if kcm != self.loaded_kcm_manifest {
            self.kcm_signing = load_kcm(&self.root);
            self.loaded_kcm_manifest = kcm;
            self.log
                .push("kubelet restarts kube-controller-manager".into());
        }
    }

    /// The local server (synced with kubelet first).
    pub fn local(&mut self) -> &FakeServer {
        self.kubelet_sync();
        &self.servers[0]
    }

    /// The operator restarts k3s on server `i` (a follower): it loads the datastore.
    pub fn restart_follower(&mut self, i: usize) {
        if let Some(bytes) = self.datastore.clone() {
            let (verification, signing) = parse_service_key(&bytes);
            let s = &mut self.servers[i];
            s.verification = verification;
            s.signing = signing;
            s.disk = bytes;
        }
        self.servers[i].restarts += 1;
        self.log
            .push(format!("restart follower {}", self.servers[i].url));
    }

    fn server(&mut self, url: Option<&str>) -> Result<&FakeServer, String> {
        self.kubelet_sync();
        match url {
            None => Ok(&self.servers[0]),
            Some(u) => self
                .servers
                .iter()
                .find(|s| s.url == u)
                .ok_or_else(|| format!("no apiserver at {u}")),
        }
    }

    /// Fails like a stopped apiserver when the local one is down (`server` `None` or its URL).
    pub fn refuse(&self, server: Option<&str>) -> Result<(), String> {
        let local = server.is_none_or(|u| u == self.servers[0].url);
        if self.down && local {
            return Err(REFUSED.to_string());
        }
        Ok(())
    }

    pub fn restarts(&self) -> usize {
        self.log
            .iter()
            .filter(|l| {
                l.starts_with("systemctl restart")
                    || l.starts_with("kubelet restarts kube-apiserver")
            })
            .count()
    }
}

pub struct FakeCluster(pub Shared);

#[async_trait::async_trait]
impl Cluster for FakeCluster {
    async fn health(&mut self) -> Health {
        let mut w = lock(&self.0);
        if w.down {
            return Health {
                ready: false,
                issuer: None,
                detail: REFUSED.into(),
            };
        }
        if w.unready_checks > 0 {
            w.unready_checks -= 1;
            return Health {
                ready: false,
                issuer: None,
                detail: "/readyz answered 500".into(),
            };
        }
        Health {
            ready: w.ready,
            issuer: Some(ISSUER.into()),
            detail: "ready".into(),
        }
    }

    async fn jwks_kids(&mut self, server: Option<&str>) -> Result<Vec<String>, ClusterError> {
        let mut w = lock(&self.0);
        w.refuse(server)?;
        let s = w.server(server)?;
        Ok(s.verification.iter().map(PublicKey::kid).collect())
    }

    async fn servers(&mut self) -> Result<Vec<String>, ClusterError> {
        let w = lock(&self.0);
        w.refuse(None)?;
        Ok(w.servers
            .iter()
            .map(|s| s.url.clone())
            .filter(|u| !w.not_in_endpoints.contains(u))
            .collect())
    }

    async fn request_token(
        &mut self,
        server: Option<&str>,
    ) -> Result<Zeroizing<String>, ClusterError> {
        let mut w = lock(&self.0);
        w.refuse(server)?;
        let now = w.clock.now();
        let s = w.server(server)?;
        let token = keys::token::mint(
            &s.signing,
            &serde_json::json!({
                "iss": ISSUER, "sub": "system:serviceaccount:kube-system:default",
                "aud": [TOKEN_AUDIENCE], "iat": now, "exp": now + 600,
            }),
        )
        .map_err(|e| e.to_string())?;
        Ok(Zeroizing::new(token))
    }

    async fn stale_tokens(&mut self) -> Result<f64, ClusterError> {
        let w = lock(&self.0);
        w.refuse(None)?;
        w.stale.ok_or_else(|| {
            ClusterError::Answer("/metrics answered HTTP 403: forbidden".to_string())
        })
    }

    fn node(&self) -> &str {
        "cp1"
    }

    async fn members(&mut self) -> Result<Option<View>, ClusterError> {
        let w = lock(&self.0);
        w.refuse(None)?;
        Ok(w.view.clone())
    }

    async fn hold(&mut self, name: &str, seconds: u64) -> Result<Restart, membership::Error> {
        let mut w = lock(&self.0);
        if w.view.is_none() {
            return Err(membership::Error::Lease {
                name: name.into(),
                cause: "404".into(),
                code: Some(404),
            });
        }
        w.leases.push(format!("hold {name}"));
        if let Some(holder) = w
            .restart_busy
            .clone()
            .filter(|_| name == membership::RESTART)
        {
            return Ok(Restart::Busy {
                holder,
                until: i64::try_from(w.clock.now() + 120).unwrap_or(i64::MAX),
            });
        }
        Ok(Restart::Held {
            until: i64::try_from(w.clock.now() + seconds).unwrap_or(i64::MAX),
        })
    }

    async fn let_go(&mut self, name: &str) -> Result<(), membership::Error> {
        lock(&self.0).leases.push(format!("let go {name}"));
        Ok(())
    }

    async fn announce(&mut self, report: &Report) -> Result<(), membership::Error> {
        lock(&self.0).announced.push(report.clone());
        Ok(())
    }

    async fn share_key(
        &mut self,
        sealed: &irsa_agent::rotation::seal::Sealed,
    ) -> Result<(), ClusterError> {
        let mut w = lock(&self.0);
        w.refuse(None)?;
        w.shared = Some(sealed.clone());
        Ok(())
    }

    async fn shared_key(
        &mut self,
    ) -> Result<Option<irsa_agent::rotation::seal::Sealed>, ClusterError> {
        let w = lock(&self.0);
        w.refuse(None)?;
        Ok(w.shared.clone())
    }

    async fn unshare_key(&mut self) -> Result<(), ClusterError> {
        let mut w = lock(&self.0);
        w.refuse(None)?;
        w.shared = None;
        Ok(())
    }

    async fn legacy_token_kids(&mut self) -> Result<Vec<(String, String)>, ClusterError> {
        let w = lock(&self.0);
        w.refuse(None)?;
        Ok(w.legacy
            .iter()
            .filter_map(|s| {
                irsa_agent::rotation::cluster::token_kid(&s.token).map(|k| (s.name.clone(), k))
            })
            .collect())
    }
}

pub struct FakeServices(pub Shared);

impl ServiceManager for FakeServices {
    fn restart(&mut self, unit: &str) -> Result<(), ProgramError> {
        let mut w = lock(&self.0);
        if w.fail_restarts > 0 {
            w.fail_restarts -= 1;
            return Err(ProgramError::Failed {
                command: format!("systemctl restart {unit}"),
                status: "exit status: 1".into(),
                output: format!("Job for {unit}.service failed (injected)"),
            });
        }
        w.log.push(format!("systemctl restart {unit}"));
        // Starting it brings a stopped apiserver back.
        w.down = false;
        let root = w.root.clone();
        let tls = tls_dir(w.distribution);
        k3s_start(&root, tls, &w.datastore);
        let (verification, signing) = load_local(&root, w.distribution);
        let disk = read(&root, &format!("{tls}/service.key"));
        let s = &mut w.servers[0];
        s.verification = verification;
        s.signing = signing;
        s.disk = disk;
        s.restarts += 1;
        Ok(())
    }
}

/// `k3s certificate rotate-ca --path=DIR`: reads DIR/tls/service.key, refuses it unless the key
/// the cluster signs with now (the first key of the current service.key) is in it, and stores
/// it in the datastore. Nothing on disk changes until k3s restarts.
pub struct FakeK3s(pub Shared);

impl CommandRunner for FakeK3s {
    fn run(&mut self, program: &str, args: &[String]) -> Result<String, ProgramError> {
        self.rotate_ca(program, args)
            .map_err(|output| ProgramError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status: "exit status: 1".into(),
                output,
            })
    }
}

impl FakeK3s {
    fn rotate_ca(&mut self, program: &str, args: &[String]) -> Result<String, String> {
        let mut w = lock(&self.0);
        assert!(program == "k3s" || program == "rke2", "{program}");
        if w.fail_rotate_ca > 0 {
            w.fail_rotate_ca -= 1;
            return Err("rotate-ca failed (injected): see server log for details".into());
        }
        let dir = match args {
            [a, b, path, ..] if a == "certificate" && b == "rotate-ca" => path
                .strip_prefix("--path=")
                .ok_or("missing --path")?
                .to_string(),
            _ => return Err(format!("unexpected arguments {args:?}")),
        };
        let staged = read(&w.root, &format!("{dir}/tls/service.key"));
        let new_keys = keys::parse_verification_keys(&staged)
            .map_err(|e| format!("{e:?}"))?
            .keys;
        if new_keys.is_empty() {
            return Err("failed to validate new CA certificates and keys: no keys".into());
        }
        // Checked against the service.key this server loaded at its start (its disk).
        let current = read(&w.root, &format!("{}/service.key", tls_dir(w.distribution)));
        let old_first = keys::parse_verification_keys(&current)
            .expect("current")
            .keys[0]
            .kid();
        if !new_keys.iter().any(|k| k.kid() == old_first) {
            return Err(
                "ServiceKey: old ServiceAccount signing key not in new ServiceAccount key list"
                    .into(),
            );
        }
        w.log.push(format!("rotate-ca {dir}"));
        w.datastore = Some(staged);
        Ok("certificates saved to datastore\n".into())
    }
}

/// Publish targets behind a CDN, and a relying party (an STS) that caches what it fetched for
/// the answer's max-age.
pub struct Cdn {
    pub origin: Option<String>,
    pub edge: Option<(u64, String)>,
    pub cdn_ttl: u64,
    pub max_age: u64,
    pub relying_party: Option<(u64, String)>,
    pub publishes: usize,
}

impl Cdn {
    pub fn new(cdn_ttl: u64, max_age: u64) -> Arc<Mutex<Cdn>> {
        Arc::new(Mutex::new(Cdn {
            origin: None,
            edge: None,
            cdn_ttl,
            max_age,
            relying_party: None,
            publishes: 0,
        }))
    }

    /// What the public URL answers at `now`.
    pub fn public(&mut self, now: u64) -> Option<String> {
        let stale = self
            .edge
            .as_ref()
            .is_none_or(|(at, _)| now >= at + self.cdn_ttl);
        if stale {
            self.edge = self.origin.clone().map(|o| (now, o));
        }
        self.edge.as_ref().map(|(_, b)| b.clone())
    }

    /// What the relying party verifies with at `now` (refetching when its copy expired).
    pub fn relying_party(&mut self, now: u64) -> Option<String> {
        let expired = self
            .relying_party
            .as_ref()
            .is_none_or(|(at, _)| now >= at + self.max_age);
        if expired {
            self.relying_party = self.public(now).map(|b| (now, b));
        }
        self.relying_party.as_ref().map(|(_, b)| b.clone())
    }
}

pub struct FakePublishing {
    pub cdn: Arc<Mutex<Cdn>>,
    pub world: Shared,
}

#[async_trait::async_trait]
impl Publishing for FakePublishing {
    async fn publish(&mut self, publication: &Publication) -> Result<String, PublishingError> {
        {
            let mut w = lock(&self.world);
            if w.fail_publish > 0 {
                w.fail_publish -= 1;
                return Err(PublishingError::Targets(vec![
                    "s3://oidc: cannot write openid/v1/jwks: 503 (injected)".into(),
                ]));
            }
        }
        let mut cdn = self.cdn.lock().unwrap_or_else(|e| e.into_inner());
        cdn.origin = Some(publication.documents.jwks.clone());
        cdn.publishes += 1;
        Ok("1 target(s) in sync".into())
    }

    async fn public(&mut self, _publication: &Publication) -> Result<PublicCopy, PublishingError> {
        let now = lock(&self.world).clock.now();
        let mut cdn = self.cdn.lock().unwrap_or_else(|e| e.into_inner());
        let body = cdn
            .public(now)
            .ok_or_else(|| PublishingError::Public("404".into()))?;
        Ok(PublicCopy {
            kids: irsa_agent::publish::merge::kids_in(body.as_bytes()),
            jwks: Some(body),
            max_age: Some(Duration::from_secs(cdn.max_age)),
        })
    }

    fn configured_max_age(&self) -> Option<Duration> {
        None
    }
}

/// The simulated cluster and the rotation context driving it.
pub struct Sim {
    pub dir: tempfile::TempDir,
    pub world: Shared,
    pub cdn: Arc<Mutex<Cdn>>,
    pub ctx: Context,
    /// Every token minted so far: (description, token, exp).
    pub tokens: Vec<(String, String, u64)>,
    /// (token, JWKS) pairs already verified (the check runs thousands of times).
    verified: std::collections::HashSet<(u64, u64)>,
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Sim {
    pub fn new(distribution: Distribution, servers: usize) -> Sim {
        let dir = tempfile::tempdir().expect("temp dir");
        match distribution {
            Distribution::Kubeadm => kubeadm_host(dir.path()),
            other => rancher_host(dir.path(), other),
        }
        let world = World::new(dir.path(), distribution, servers, T0);
        let cdn = Cdn::new(600, 300);
        let clock = lock(&world).clock.clone();
        let ctx = Context {
            root: HostRoot::new(dir.path()),
            settings: settings(dir.path(), distribution),
            clock: Arc::new(clock),
            cluster: Box::new(FakeCluster(world.clone())),
            publishing: Box::new(FakePublishing {
                cdn: cdn.clone(),
                world: world.clone(),
            }),
            services: Box::new(FakeServices(world.clone())),
            runner: Box::new(FakeK3s(world.clone())),
            options: Options {
                poll: Duration::from_secs(2),
                recheck: Duration::from_secs(300),
                ..Options::default()
            },
        };
        // The documents are published before any rotation (what `apply` + `publish` did).
        let sim = Sim {
            dir,
            world,
            cdn,
            ctx,
            tokens: Vec::new(),
            verified: std::collections::HashSet::new(),
        };
        let jwks = keys::jwks::jwks_json(&keys::dedup(&sim.local().verification));
        lock_cdn(&sim.cdn).origin = Some(jwks);
        sim
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn now(&self) -> u64 {
        self.ctx.clock.now()
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        lock(&self.world)
    }

    pub fn local(&self) -> FakeServer {
        lock(&self.world).local().clone()
    }

    pub fn set_time(&self, t: u64) {
        lock(&self.world).clock.set(t);
    }

    /// Every apiserver issues a token now (the key it signs with), valid `lifetime`; the
    /// controller-manager signs a legacy token too (kubeadm). Recorded for the invariant.
    pub fn mint_tokens(&mut self, label: &str, lifetime: u64) {
        let now = self.now();
        let mut w = lock(&self.world);
        w.kubelet_sync();
        let mut minted = Vec::new();
        for s in &w.servers {
            let token = keys::token::mint(
                &s.signing,
                &serde_json::json!({"iss": ISSUER, "sub": "system:serviceaccount:default:app",
                    "aud": ["sts.amazonaws.com"], "iat": now, "exp": now + lifetime}),
            )
            .expect("mint");
            minted.push((
                format!("{label} by {} ({})", s.url, s.signing.public.kid()),
                token,
                now + lifetime,
            ));
        }
        drop(w);
        self.tokens.extend(minted);
    }

    /// A token signed with `key` directly (keys::token::mint).
    pub fn mint_with(&mut self, label: &str, key: &SigningKey, lifetime: u64) {
        let now = self.now();
        let token = keys::token::mint(
            key,
            &serde_json::json!({"iss": ISSUER, "sub": "system:serviceaccount:default:app",
                "aud": ["sts.amazonaws.com"], "iat": now, "exp": now + lifetime}),
        )
        .expect("mint");
        self.tokens.push((label.to_string(), token, now + lifetime));
    }

    /// THE invariant: every token still valid verifies against every apiserver's verification
    /// keys, the published JWKS (origin and public URL) and the relying party's cached copy.
    pub fn check_invariant(&mut self, when: &str) {
        let now = self.now();
        let mut w = lock(&self.world);
        w.kubelet_sync();
        let apiservers: Vec<(String, String)> = w
            .servers
            .iter()
            .map(|s| {
                (
                    s.url.clone(),
                    keys::jwks::jwks_json(&keys::dedup(&s.verification)),
                )
            })
            .collect();
        drop(w);
        let mut cdn = lock_cdn(&self.cdn);
        let origin = cdn.origin.clone().unwrap_or_default();
        let public = cdn.public(now).unwrap_or_default();
        let relying_party = cdn.relying_party(now).unwrap_or_default();
        drop(cdn);
        for (label, token, exp) in &self.tokens {
            if *exp <= now {
                continue;
            }
            let mut views: Vec<(String, &str)> = vec![
                ("the published JWKS".into(), origin.as_str()),
                ("the public URL".into(), public.as_str()),
                (
                    "the relying party's cached JWKS".into(),
                    relying_party.as_str(),
                ),
            ];
            for (url, jwks) in &apiservers {
                views.push((format!("apiserver {url}"), jwks.as_str()));
            }
            for (name, jwks) in views {
                let key = (hash(token), hash(jwks));
                if self.verified.contains(&key) {
                    continue;
                }
                match verify(token, jwks) {
                    Ok(()) => {
                        self.verified.insert(key);
                    }
                    Err(e) => {
                        panic!(
                            "{when} (t0+{}s): token \"{label}\" (valid until t0+{}s) is rejected by {name}: {e}",
                            now - T0,
                            exp - T0
                        );
                    }
                }
            }
        }
    }
}

pub fn lock_cdn(cdn: &Arc<Mutex<Cdn>>) -> std::sync::MutexGuard<'_, Cdn> {
    cdn.lock().unwrap_or_else(|e| e.into_inner())
}

/// Verifies a token against a JWKS document with jsonwebtoken, as a relying party would.
pub fn verify(token: &str, jwks: &str) -> Result<(), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.clone().ok_or("no kid")?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(jwks).map_err(|e| format!("JWKS unreadable: {e}"))?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| format!("no key {kid} in the JWKS"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["sts.amazonaws.com", TOKEN_AUDIENCE]);
    validation.set_issuer(&[ISSUER]);
    validation.leeway = 0;
    // The simulated clock is not the system clock: check exp ourselves.
    validation.validate_exp = false;
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A static HTTPS server (the test CA's 127.0.0.1 certificate) serving `dir` under `/<mount>/`
/// with `Cache-Control: public, max-age=300`: the public URL of a directory publish target.
pub struct StaticHttps {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl StaticHttps {
    pub fn start(dir: PathBuf, mount: &str) -> StaticHttps {
        StaticHttps::start_with_max_age(dir, mount, 300)
    }

    pub fn start_with_max_age(dir: PathBuf, mount: &str, max_age: u64) -> StaticHttps {
        use std::sync::atomic::{AtomicBool, Ordering};
        let config = https_support::server_config(false);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let prefix = format!("/{}/", mount.trim_matches('/'));
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let Some((request, mut tls)) =
                    https_support::accept(stream, &config, Duration::from_secs(5))
                else {
                    continue;
                };
                let path = request.path;
                let file = path
                    .strip_prefix(&prefix)
                    .filter(|rest| !rest.contains(".."))
                    .map(|rest| dir.join(rest));
                let (code, body) = match file.and_then(|f| std::fs::read(f).ok()) {
                    Some(body) => (200, body),
                    None => (404, b"not found".to_vec()),
                };
                https_support::respond(
                    &mut tls,
                    code,
                    &[
                        ("content-type", "application/json".into()),
                        ("cache-control", format!("public, max-age={max_age}")),
                    ],
                    &body,
                );
            }
        });
        StaticHttps {
            port,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for StaticHttps {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A fake `systemctl` for a k3s host under `root`: logs its arguments to `<root>/systemctl.log`
/// and, on `restart`, does what k3s does at start: writes the datastore's service.key
/// (`<root>/fake-datastore/service.key`) to disk and its first key to service.current.key.
/// The log line comes last: the fake apiserver reloads its keys when it sees it.
pub fn fake_k3s_systemctl(root: &Path) -> PathBuf {
    let script = root.join("fake-systemctl");
    let r = root.display();
    executable(
        &script,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = restart ] && [ -f '{r}/fake-datastore/service.key' ]; then\n  cp '{r}/fake-datastore/service.key' '{r}{K3S_TLS}/service.key'\n  awk '{{print}} /-----END/{{exit}}' '{r}/fake-datastore/service.key' > '{r}{K3S_TLS}/service.current.key'\nfi\necho \"$@\" >> '{r}/systemctl.log'\n"
        ),
    );
    script
}

/// A fake `k3s` binary for `certificate rotate-ca --path=DIR`: refuses DIR/tls/service.key
/// unless it holds the key this server signs with now (the first key of its service.key), as
/// k3s' validateServiceKey does, then stores it in the fake datastore. Host paths are resolved
/// under `root`.
pub fn fake_k3s_binary(root: &Path) -> PathBuf {
    let script = root.join("fake-k3s");
    let r = root.display();
    executable(
        &script,
        &format!(
            r#"#!/usr/bin/python3
import os, re, sys
ROOT = "{r}"
def blocks(text):
    return [re.sub(r"\s+", "", b) for b in re.findall(r"-----BEGIN [A-Z ]+-----(.*?)-----END [A-Z ]+-----", text, re.S)]
args = sys.argv[1:]
if args[:2] != ["certificate", "rotate-ca"]:
    sys.exit("unexpected arguments: " + " ".join(args))
path = [a for a in args if a.startswith("--path=")][0][len("--path="):]
staged = open(ROOT + path + "/tls/service.key").read()
current = open(ROOT + "{K3S_TLS}/service.key").read()
if not blocks(staged):
    sys.exit('level=fatal msg="failed to validate new CA certificates and keys: no keys"')
if blocks(current)[0] not in blocks(staged):
    sys.exit('level=fatal msg="ServiceKey: old ServiceAccount signing key not in new ServiceAccount key list"')
os.makedirs(ROOT + "/fake-datastore", exist_ok=True)
open(ROOT + "/fake-datastore/service.key", "w").write(staged)
open(ROOT + "/rotate-ca.log", "a").write(path + "\n")
print("certificates saved to datastore")
"#
        ),
    );
    script
}
