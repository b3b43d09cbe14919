//! The pod identity webhook the daemon serves (`webhook.enabled: true`): HTTPS on a loopback
//! address, `POST /mutate` (AdmissionReview v1) and `GET /healthz`.
//!
//! * The answer is [`crate::identity::admission::review`], from the in-memory
//!   [`ServiceAccounts`] cache: a request never waits on the API.
//! * TLS 1.2 and 1.3 (rustls, ring), HTTP/1.1; the certificate comes from the webhook CA
//!   ([`certs`]: this host's copy of the CA every agent shares, see [`kube_sync`]) and is
//!   swapped in place when renewed or when the shared CA is adopted, without dropping
//!   connections.
//! * Until the ServiceAccount cache has its first complete list
//!   ([`ServiceAccounts::loading`]) reviews get 503, so the apiserver applies the failure
//!   policy; pods created while no agent answered are found afterwards ([`missed`]).
//! * Bounded like the metrics endpoint: at most [`MAX_CONNECTIONS`] at once (more are closed at
//!   once), a handshake and each request head within [`HEADER_READ_TIMEOUT`], a body of at most
//!   [`MAX_BODY`] (the apiserver's own request limit) read within [`BODY_TIMEOUT`], a connection
//!   lives at most [`CONNECTION_TIMEOUT`].
//! * It runs as tasks on the daemon's one thread; nothing in it blocks but the CA file write at
//!   a renewal (a few kilobytes, once in months).

pub mod certs;
pub mod kube_sync;
pub mod missed;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::webhook::WebhookSettings;
use crate::identity::admission::{self, Defaults};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// The TLS handshake, and each request head, must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive within this.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest life of one connection (the apiserver keeps connections alive and reconnects).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest AdmissionReview accepted: 3 MiB, the apiserver's own request body limit.
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How often the certificates are checked for renewal.
const RENEW_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// The annotation prefixes kept in the cache (everything else is dropped to save memory).
pub const PREFIXES: [&str; 3] = [
    "eks.amazonaws.com/",
    "azure.workload.identity/",
    "cloud.google.com/",
];
/// The name of the MutatingWebhookConfiguration and of its one webhook.
pub const NAME: &str = "irsa-agent";
pub const WEBHOOK_NAME: &str = "pod-identity.irsa-agent.io";

/// (namespace, name) -> the slimmed ServiceAccount.
type Map = HashMap<(String, String), Arc<Value>>;

/// ServiceAccounts by namespace and name, with only the annotations a cloud reads. Cheap to
/// clone (shared); written by the watch, read by every request.
#[derive(Debug, Clone, Default)]
pub struct ServiceAccounts {
    inner: Arc<RwLock<Map>>,
    /// Still waiting for the watch's first complete list (see [`ServiceAccounts::loading`]).
    loading: Arc<std::sync::atomic::AtomicBool>,
}

impl ServiceAccounts {
    /// An empty cache that is not ready until the watch's first complete list
    /// ([`ServiceAccounts::replace_all`]): meanwhile the webhook answers 503, so the apiserver
    /// applies the failure policy instead of admitting pods as if no ServiceAccount were
    /// annotated. (`default()` is ready at once: for caches filled by hand.)
    pub fn loading() -> ServiceAccounts {
        let cache = ServiceAccounts::default();
        cache.loading.store(true, Ordering::Relaxed);
        cache
    }

    /// Whether the first complete list has arrived (or the cache was never waiting for one).
    pub fn ready(&self) -> bool {
        !self.loading.load(Ordering::Relaxed)
    }

    /// Stores (or replaces) one ServiceAccount from its full object.
    pub fn upsert(&self, sa: &Value) {
        let meta = &sa["metadata"];
        let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
            return;
        };
        let annotations: serde_json::Map<String, Value> = meta["annotations"]
            .as_object()
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let slim = Arc::new(json!({"metadata": {
            "namespace": ns, "name": name, "annotations": annotations,
        }}));
        if let Ok(mut map) = self.inner.write() {
            map.insert((ns.to_string(), name.to_string()), slim);
        }
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.inner.write() {
            map.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Replaces everything (a watch's re-list).
    pub fn replace_all<'a>(&self, sas: impl IntoIterator<Item = &'a Value>) {
        if let Ok(mut map) = self.inner.write() {
            map.clear();
        }
        for sa in sas {
            self.upsert(sa);
        }
        self.loading.store(false, Ordering::Relaxed);
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.inner
            .read()
            .ok()?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the webhook counted since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// AdmissionReviews answered.
    pub requests: AtomicU64,
    /// Answers with a patch.
    pub mutations: AtomicU64,
    /// Pods refused (`allowed: false`: a bad annotation, a request that is not a pod review).
    pub refusals: AtomicU64,
    /// Requests not answered with a review: bad body, too large, wrong method or path, TLS
    /// handshakes that failed.
    pub errors: AtomicU64,
    /// Unix time the serving certificate in use expires.
    pub certificate_expiry: AtomicU64,
    /// Pods found running without the identity their ServiceAccount names (`namespace/name`),
    /// from the last look ([`missed`]); `None` before the first.
    pub missed: std::sync::Mutex<Option<Vec<String>>>,
}

impl Counters {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.requests.load(Ordering::Relaxed),
            self.mutations.load(Ordering::Relaxed),
            self.refusals.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

/// The serving certificate, swapped in place on renewal.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

fn certified(serving: &certs::Serving) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        serving.key_pkcs8_der.clone(),
    ));
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key).map_err(|e| e.to_string())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![rustls::pki_types::CertificateDer::from(
            serving.cert_der.clone(),
        )],
        signer,
    )))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The CAs and the serving certificate, renewed by [`Tls::renew`].
pub struct Tls {
    root: crate::host::HostRoot,
    ips: Vec<IpAddr>,
    cas: certs::Authorities,
    serving: certs::Serving,
    resolver: Arc<Resolver>,
    config: Arc<rustls::ServerConfig>,
    /// The CAs come from the cluster's shared Secret ([`kube_sync`]): only the sync adds or
    /// drops a CA; [`Tls::renew`] then renews just the serving certificate.
    shared: bool,
}

impl Tls {
    /// Reads (or makes) the CA under `root` and issues a serving certificate for `ips`.
    pub fn new(root: &crate::host::HostRoot, ips: Vec<IpAddr>, now: u64) -> anyhow::Result<Tls> {
        let (cas, _) = certs::load_and_maintain(root, now)?;
        let serving = cas.issue(now, &ips)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(certified(&serving).map_err(anyhow::Error::msg)?),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            root: root.clone(),
            ips,
            cas,
            serving,
            resolver,
            config: Arc::new(config),
            shared: false,
        })
    }

    /// Takes the CAs shared through the cluster (`pem`: certificates and keys, the Secret's
    /// text), keeps a copy in the local file and serves from them from now on. Returns true
    /// when the bundle changed.
    pub fn adopt(&mut self, pem: &str, now: u64) -> anyhow::Result<bool> {
        let cas = certs::Authorities::from_pem(pem.as_bytes()).map_err(anyhow::Error::msg)?;
        if cas.cas.is_empty() {
            anyhow::bail!("the shared CA holds no CA");
        }
        self.shared = true;
        if cas.to_pem()? == self.cas.to_pem()? {
            return self.renew(now).map(|_| false);
        }
        let changed = cas.bundle_pem() != self.cas.bundle_pem();
        self.cas = cas;
        self.write_file()?;
        self.renew(now)?;
        Ok(changed)
    }

    fn write_file(&self) -> anyhow::Result<()> {
        let path = self.root.path(certs::CA_FILE);
        if let Some(dir) = path.parent() {
            crate::fs::create_dir_all(dir, 0o700)
                .map_err(|e| anyhow::anyhow!("{}: {e}", certs::ca_file(&self.root).display()))?;
        }
        crate::fs::write_atomic(
            &path,
            self.cas.to_pem()?.as_bytes(),
            crate::fs::NewFile::PRIVATE,
        )
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{}: {e}", certs::ca_file(&self.root).display()))
    }

    /// The `caBundle` (PEM): every CA in use.
    pub fn bundle_pem(&self) -> String {
        self.cas.bundle_pem()
    }

    /// The serving certificate in use.
    pub fn serving(&self) -> &certs::Serving {
        &self.serving
    }

    /// Brings the CAs and the serving certificate up to date at `now`. Returns true when the
    /// bundle changed (the registration must follow).
    pub fn renew(&mut self, now: u64) -> anyhow::Result<bool> {
        let changed = !self.shared && self.cas.maintain(now)?;
        if changed {
            self.write_file()?;
            log::info!(
                "webhook: CA bundle now holds {} CA(s) ({})",
                self.cas.cas.len(),
                certs::ca_file(&self.root).display()
            );
        }
        if self.cas.needs_new_serving(&self.serving, now) {
            let serving = self.cas.issue(now, &self.ips)?;
            let key = certified(&serving).map_err(anyhow::Error::msg)?;
            if let Ok(mut current) = self.resolver.current.write() {
                *current = key;
            }
            self.serving = serving;
            log::info!("webhook: new serving certificate");
        }
        Ok(changed)
    }
}

/// Everything a request needs.
struct Shared {
    defaults: Defaults,
    cache: ServiceAccounts,
    counters: Arc<Counters>,
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: hyper::StatusCode, content_type: &str, body: Vec<u8>) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(http_body_util::Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

fn text(status: hyper::StatusCode, message: &str) -> hyper::Response<Body> {
    reply(
        status,
        "text/plain; charset=utf-8",
        format!("{message}\n").into_bytes(),
    )
}

async fn handle(
    shared: Arc<Shared>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    use http_body_util::BodyExt as _;
    use hyper::{Method, StatusCode};

    let counters = &shared.counters;
    let error = |status, message: &str| {
        counters.errors.fetch_add(1, Ordering::Relaxed);
        Ok(text(status, message))
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok")),
        (&Method::POST, "/mutate") => {}
        (_, "/mutate") => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST an AdmissionReview (v1) to /mutate",
            );
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not found: POST /mutate or GET /healthz",
            );
        }
    }
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("an AdmissionReview is at most {MAX_BODY} bytes"),
        );
    }
    let limited = http_body_util::Limited::new(request.into_body(), MAX_BODY);
    let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("an AdmissionReview is at most {MAX_BODY} bytes"),
            );
        }
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time",
            );
        }
    };
    if !shared.cache.ready() {
        // Answering "allowed, nothing to change" would admit pods of annotated
        // ServiceAccounts bare, as if the webhook had looked. An error lets the apiserver
        // apply the failure policy (and count it).
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the ServiceAccount cache is still loading",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        // Not JSON: the same refusal a review would give, as a 400.
        let answer = admission::review(&body, &shared.defaults, |_, _| None);
        counters.errors.fetch_add(1, Ordering::Relaxed);
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "application/json",
            serde_json::to_vec(&answer).unwrap_or_default(),
        ));
    };
    let answer = admission::review_parsed(&request, &shared.defaults, |ns, name| {
        shared.cache.get(ns, name).map(|sa| (*sa).clone())
    });
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let response = &answer["response"];
    if response["allowed"] == false {
        counters.refusals.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "webhook: refused a pod in {}: {}",
            request["request"]["namespace"].as_str().unwrap_or("?"),
            response["status"]["message"].as_str().unwrap_or_default()
        );
    } else if response.get("patch").is_some() {
        counters.mutations.fetch_add(1, Ordering::Relaxed);
    }
    Ok(reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&answer).unwrap_or_default(),
    ))
}

/// A running webhook: its counters, its TLS state (for the registration's caBundle), and the
/// task serving it.
pub struct Running {
    pub counters: Arc<Counters>,
    pub bundle: tokio::sync::watch::Receiver<String>,
    pub local_addr: std::net::SocketAddr,
    control: Control,
    task: tokio::task::JoinHandle<()>,
    /// Tasks that live as long as the server (the ServiceAccount watch, the registration).
    attached: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn stop(self) {
        self.task.abort();
        for t in &self.attached {
            t.abort();
        }
    }

    /// Ties `task` to the server's life.
    pub fn attach(&mut self, task: tokio::task::JoinHandle<()>) {
        self.attached.push(task);
    }

    /// Asks the server to bring its certificates up to date as if the time were `now` (the
    /// hourly check uses the real clock; tests use this).
    pub fn renew_at(&self, now: u64) {
        self.control.renew_at(now);
    }

    /// A handle to steer the server's certificates from other tasks.
    pub fn control(&self) -> Control {
        self.control.clone()
    }
}

enum Command {
    Renew(u64),
    Adopt {
        pem: String,
        now: u64,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// Steers a running server's certificates (cheap to clone).
#[derive(Clone)]
pub struct Control(tokio::sync::mpsc::UnboundedSender<Command>);

impl Control {
    /// See [`Running::renew_at`].
    pub fn renew_at(&self, now: u64) {
        let _ = self.0.send(Command::Renew(now));
    }

    /// Makes the server serve from the CAs shared through the cluster (`pem`, as in the
    /// Secret); returns once it does, with the bundle already updated.
    pub async fn adopt(&self, pem: String, now: u64) -> Result<(), String> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.0
            .send(Command::Adopt { pem, now, done })
            .map_err(|_| "the webhook server has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the webhook server has stopped".to_string())?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        for t in &self.attached {
            t.abort();
        }
    }
}

/// Binds `settings.listen`, makes or reads the CA under `root` as of `now` and serves until
/// stopped. Certificates are renewed by the task itself (checked hourly with the real clock).
///
/// Must be called within the daemon's runtime (it spawns the serving task).
pub fn start(
    root: &crate::host::HostRoot,
    settings: &WebhookSettings,
    cache: ServiceAccounts,
    now: u64,
) -> anyhow::Result<Running> {
    let tls = Tls::new(root, settings.serving_ips(), now)?;
    let listener = std::net::TcpListener::bind(settings.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
    let local_addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    counters
        .certificate_expiry
        .store(tls.serving().not_after, Ordering::Relaxed);
    let (bundle_tx, bundle) = tokio::sync::watch::channel(tls.bundle_pem());
    let shared = Arc::new(Shared {
        defaults: settings.defaults.clone(),
        cache,
        counters: counters.clone(),
    });
    let (control, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(serve(listener, tls, shared, bundle_tx, control_rx));
    Ok(Running {
        counters,
        bundle,
        local_addr,
        control: Control(control),
        task,
        attached: Vec::new(),
    })
}

async fn serve(
    listener: tokio::net::TcpListener,
    mut tls: Tls,
    shared: Arc<Shared>,
    bundle_tx: tokio::sync::watch::Sender<String>,
    mut control_rx: tokio::sync::mpsc::UnboundedReceiver<Command>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut renew = tokio::time::interval(RENEW_CHECK_EVERY);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_logged: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            command = async {
                tokio::select! {
                    _ = renew.tick() => Command::Renew(unix_now()),
                    Some(command) = control_rx.recv() => command,
                }
            } => {
                match command {
                    Command::Renew(now) => match tls.renew(now) {
                        Ok(true) => { let _ = bundle_tx.send(tls.bundle_pem()); }
                        Ok(false) => {}
                        Err(e) => log::error!("webhook: cannot renew certificates: {e:#}"),
                    },
                    Command::Adopt { pem, now, done } => {
                        let result = tls.adopt(&pem, now);
                        if let Ok(true) = result {
                            log::info!("webhook: serving with the CA shared through the cluster");
                            let _ = bundle_tx.send(tls.bundle_pem());
                        }
                        // The bundle is updated before the caller hears back.
                        let _ = done.send(result.map(|_| ()).map_err(|e| format!("{e:#}")));
                    }
                }
                shared
                    .counters
                    .certificate_expiry
                    .store(tls.serving().not_after, Ordering::Relaxed);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("webhook: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            shared.counters.errors.fetch_add(1, Ordering::Relaxed);
            if refused_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                log::warn!(
                    "webhook: connections closed at once: {MAX_CONNECTIONS} are open already"
                );
                refused_logged = Some(std::time::Instant::now());
            }
            tokio::task::yield_now().await;
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream =
                match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                        log::debug!("webhook: TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
            let service =
                hyper::service::service_fn(move |request| handle(shared.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_headers(64)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => log::debug!("webhook: {e}"),
            }
        });
    }
}

/// The MutatingWebhookConfiguration this agent registers (server-side apply, one field
/// manager: every agent applies the same object, so they never fight).
pub fn registration(settings: &WebhookSettings, bundle_pem: &str) -> Value {
    use base64::Engine as _;
    // NotIn needs at least one value: no skipped namespace, no selector.
    let namespace_selector = if settings.defaults.skip_namespaces.is_empty() {
        json!({})
    } else {
        json!({"matchExpressions": [{
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": settings.defaults.skip_namespaces,
        }]})
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": "irsa-agent"}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {
                "url": settings.url(),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(bundle_pem),
            },
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "failurePolicy": settings.failure_policy.name(),
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": settings.timeout.as_secs(),
            "namespaceSelector": namespace_selector,
            "objectSelector": {"matchExpressions": [{
                "key": "eks.amazonaws.com/skip-pod-identity-webhook",
                "operator": "DoesNotExist",
            }]},
        }],
    })
}
