//! Asking the local apiserver whether it is healthy and which issuer it serves.
//!
//! The real probe reads the host's admin kubeconfig (`/etc/rancher/k3s/k3s.yaml`,
//! `/etc/rancher/rke2/rke2.yaml`, `/etc/kubernetes/admin.conf`, under the host root), trusts only
//! its certificate authority, authenticates with its client certificate or token, and calls
//! `GET /readyz` and `GET /.well-known/openid-configuration` over HTTPS (reqwest + rustls with
//! ring, on a current-thread tokio runtime the probe owns). On kubeadm the kubeconfig may name a
//! load balancer, so the caller can point the probe at the local apiserver's advertise address.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_yaml::Value;

use crate::host::HostRoot;

/// The admin kubeconfig (host path) and, on kubeadm, the URL of this host's apiserver (the
/// manifest's `--advertise-address` and `--secure-port`; the kubeconfig may name a load
/// balancer).
pub fn target(observed: &super::Observed) -> (PathBuf, Option<String>) {
    match &observed.source {
        super::Source::Rancher(r) => (r.flavor.kubeconfig(), None),
        super::Source::Kubeadm(k) => {
            let arg = |name: &str| {
                k.args
                    .iter()
                    .rev()
                    .find(|a| a.name == name)
                    .map(|a| a.value.clone())
            };
            let url = arg("advertise-address").map(|addr| {
                let port = arg("secure-port").unwrap_or_else(|| "6443".to_string());
                if addr.contains(':') {
                    format!("https://[{addr}]:{port}")
                } else {
                    format!("https://{addr}:{port}")
                }
            });
            (PathBuf::from(super::kubeadm::ADMIN_KUBECONFIG), url)
        }
    }
}

/// The keys the running apiserver serves at `/openid/v1/jwks` (it verifies with them and signs
/// with one of them), asked through the admin kubeconfig. Blocking. `server` overrides the URL.
pub fn served_keys(
    root: &HostRoot,
    observed: &super::Observed,
    server: Option<String>,
    timeout: Duration,
) -> Result<Vec<crate::keys::PublicKey>, String> {
    let (kubeconfig, url) = target(observed);
    let probe = KubeconfigProbe::new(root, &kubeconfig, server.or(url), timeout)?;
    match probe.block_on(probe.get(crate::keys::jwks::JWKS_PATH))? {
        (200, body) => Ok(crate::publish::merge::keys_in(body.as_bytes())),
        (code, _) => Err(format!(
            "the apiserver at {} answered {code} for {}",
            probe.server(),
            crate::keys::jwks::JWKS_PATH
        )),
    }
}

/// What the apiserver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `/readyz` returned 200.
    pub ready: bool,
    /// The `issuer` of its discovery document, when it could be read.
    pub issuer: Option<String>,
    /// A short description for progress messages.
    pub detail: String,
}

/// The apiserver, as far as `apply` and `finalize` need it.
pub trait ApiserverProbe {
    fn check(&mut self) -> Status;
    /// The value of `serviceaccount_stale_tokens_total` (summed), if it can be read.
    fn stale_tokens(&mut self) -> Option<f64> {
        None
    }
}

/// The real probe: an [`ApiClient`] on a current-thread runtime of its own (for the
/// synchronous `apply`/`finalize`).
pub struct KubeconfigProbe {
    runtime: tokio::runtime::Runtime,
    api: ApiClient,
}

/// An HTTPS client for the apiserver, built from the admin kubeconfig: trusts only its CA,
/// authenticates with its client certificate or token. Async and runtime-free, so async code
/// (key rotation, the daemon) can use it on its own runtime.
#[derive(Clone)]
pub struct ApiClient {
    client: reqwest::Client,
    server: String,
    token: Option<String>,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn named<'a>(list: Option<&'a Value>, name: &str, inner: &str) -> Option<&'a Value> {
    list?
        .as_sequence()?
        .iter()
        .find(|e| field(e, "name") == Some(name))
        .and_then(|e| e.get(inner))
}

/// Data inline (`*-data`, base64) or from a file (relative to the kubeconfig's folder).
fn material(
    root: &HostRoot,
    dir: &Path,
    section: &Value,
    key: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(data) = field(section, &format!("{key}-data")) {
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map(Some)
            .map_err(|e| format!("{key}-data is not base64: {e}"));
    }
    if let Some(file) = field(section, key) {
        let host = if Path::new(file).is_absolute() {
            PathBuf::from(file)
        } else {
            dir.join(file)
        };
        return crate::fs::read(root.path(&host))
            .map(Some)
            .map_err(|e| format!("cannot read {}: {e}", host.display()));
    }
    Ok(None)
}

impl KubeconfigProbe {
    /// Builds the probe from the admin kubeconfig at `kubeconfig` (a host path). `server`
    /// overrides the kubeconfig's server URL.
    pub fn new(
        root: &HostRoot,
        kubeconfig: &Path,
        server: Option<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let api = ApiClient::new(root, kubeconfig, server, timeout)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        Ok(KubeconfigProbe { runtime, api })
    }

    /// The apiserver URL the probe talks to (no trailing slash).
    pub fn server(&self) -> &str {
        self.api.server()
    }

    /// The async client underneath (for callers with a runtime of their own).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Runs `future` on the probe's own runtime (doctor and verify-token compose several
    /// requests and run them concurrently).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// See [`ApiClient::get`].
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.api.get(path).await
    }

    /// See [`ApiClient::post_json`].
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), String> {
        self.api.post_json(path, body).await
    }

    /// Asks the apiserver's TokenRequest API for a token of `namespace/service_account` with
    /// these audiences and lifetime. The token is a credential: callers must not log it.
    pub fn token_request(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[String],
        expiration_seconds: u64,
    ) -> Result<zeroize::Zeroizing<String>, String> {
        let path =
            format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token");
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": audiences, "expirationSeconds": expiration_seconds},
        });
        let (code, text) = self
            .block_on(self.post_json(&path, &body))
            .map_err(|e| format!("cannot reach the apiserver at {}: {e}", self.server()))?;
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let message = answer
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or_else(|| text.lines().next().unwrap_or(""))
            .to_string();
        match code {
            200 | 201 => answer
                .pointer("/status/token")
                .and_then(|t| t.as_str())
                .map(|t| zeroize::Zeroizing::new(t.to_string()))
                .ok_or_else(|| "the TokenRequest answer holds no status.token".to_string()),
            404 => Err(format!(
                "service account {namespace}/{service_account} not found ({message}); list them with: kubectl get serviceaccounts -n {namespace}"
            )),
            _ => Err(format!("TokenRequest answered HTTP {code}: {message}")),
        }
    }
}

impl ApiClient {
    /// Builds the client from the admin kubeconfig at `kubeconfig` (a host path). `server`
    /// overrides the kubeconfig's server URL.
    pub fn new(
        root: &HostRoot,
        kubeconfig: &Path,
        server: Option<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let text = crate::fs::read_to_string(root.path(kubeconfig)).map_err(|e| {
            format!(
                "cannot read the admin kubeconfig {}: {e}",
                kubeconfig.display()
            )
        })?;
        let config: Value =
            crate::yaml::from_str(&text).map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
        let bad = |what: &str| format!("{}: {what}", kubeconfig.display());
        let context_name = field(&config, "current-context")
            .map(str::to_string)
            .or_else(|| {
                config
                    .get("contexts")
                    .and_then(Value::as_sequence)
                    .and_then(|s| s.first())
                    .and_then(|c| field(c, "name"))
                    .map(str::to_string)
            })
            .ok_or_else(|| bad("no context"))?;
        let context = named(config.get("contexts"), &context_name, "context")
            .ok_or_else(|| bad(&format!("context {context_name:?} not found")))?;
        let cluster_name =
            field(context, "cluster").ok_or_else(|| bad("context has no cluster"))?;
        let cluster = named(config.get("clusters"), cluster_name, "cluster")
            .ok_or_else(|| bad(&format!("cluster {cluster_name:?} not found")))?;
        let user = field(context, "user")
            .and_then(|u| named(config.get("users"), u, "user"))
            .cloned()
            .unwrap_or(Value::Null);
        let dir = kubeconfig.parent().unwrap_or(Path::new("/"));
        let server = match server {
            Some(s) => s,
            None => field(cluster, "server")
                .ok_or_else(|| bad("cluster has no server"))?
                .to_string(),
        };
        let ca = material(root, dir, cluster, "certificate-authority")
            .map_err(|e| bad(&e))?
            .ok_or_else(|| bad("cluster has no certificate-authority(-data): refusing to talk to the apiserver without verifying it"))?;
        let cert = material(root, dir, &user, "client-certificate").map_err(|e| bad(&e))?;
        let key = material(root, dir, &user, "client-key").map_err(|e| bad(&e))?;
        let token = field(&user, "token").map(str::to_string);

        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| bad(&format!("bad CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(&format!("bad CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(&format!("bad client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| bad(&format!("bad client key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(&format!("bad client certificate: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the HTTPS client: {e}"))?;
        Ok(ApiClient {
            client,
            server: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The apiserver URL requests go to (`https://127.0.0.1:6443`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The same credentials aimed at another apiserver of the cluster (`https://10.0.0.2:6443`).
    pub fn at(&self, server: &str) -> ApiClient {
        ApiClient {
            client: self.client.clone(),
            server: server.trim_end_matches('/').to_string(),
            token: self.token.clone(),
        }
    }

    /// `GET` with the admin credential: `path` on this apiserver, or an absolute `https://` URL
    /// (another apiserver of the same cluster, trusted through the same CA).
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// `POST` of a JSON body with the admin credential (TokenRequest).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), String> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), String> {
        let url = if path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.server)
        };
        let mut request = self.client.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            // The innermost cause says it best ("Connection refused", a TLS alert, ...).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = s.to_string();
                source = s.source();
            }
            if e.is_timeout() {
                message = format!("timed out ({message})");
            }
            message
        })?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|e| e.to_string())?;
        Ok((status, body))
    }
}

impl ApiserverProbe for KubeconfigProbe {
    fn check(&mut self) -> Status {
        let ready = self.runtime.block_on(self.get("/readyz"));
        let (ready, mut detail) = match ready {
            Ok((200, _)) => (true, "ready".to_string()),
            Ok((code, body)) => (
                false,
                format!(
                    "/readyz answered {code}: {}",
                    body.lines().next().unwrap_or("").trim()
                ),
            ),
            Err(e) => (false, format!("not reachable at {}: {e}", self.api.server)),
        };
        let mut issuer = None;
        if ready {
            match self
                .runtime
                .block_on(self.get(crate::keys::jwks::DISCOVERY_PATH))
            {
                Ok((200, body)) => {
                    issuer = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("issuer").and_then(|i| i.as_str()).map(str::to_string));
                    detail = format!(
                        "ready, serving issuer {}",
                        issuer.as_deref().unwrap_or("(unreadable)")
                    );
                }
                Ok((code, _)) => detail = format!("ready, but discovery answered {code}"),
                Err(e) => detail = format!("ready, but discovery failed: {e}"),
            }
        }
        Status {
            ready,
            issuer,
            detail,
        }
    }

    fn stale_tokens(&mut self) -> Option<f64> {
        let (code, body) = self.runtime.block_on(self.get("/metrics")).ok()?;
        if code != 200 {
            return None;
        }
        stale_tokens_in(&body)
    }
}

/// The sum of every `serviceaccount_stale_tokens_total` series in a Prometheus text exposition
/// (0 when the metric has no series yet); `None` when a sample cannot be read.
pub fn stale_tokens_in(metrics: &str) -> Option<f64> {
    let mut total = 0.0;
    for line in metrics.lines() {
        if line.starts_with("serviceaccount_stale_tokens_total") {
            let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
            total += value;
        }
    }
    Some(total)
}
