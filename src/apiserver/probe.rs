//! Asking the local apiserver whether it is healthy and which issuer it serves.
//!
//! The real probe reads the host's admin kubeconfig (`/etc/rancher/k3s/k3s.yaml`,
//! `/etc/rancher/rke2/rke2.yaml`, `/etc/kubernetes/admin.conf`, under the host root), trusts only
//! its certificate authority, authenticates with its client certificate or token, and calls
//! `GET /readyz` and `GET /.well-known/openid-configuration` over HTTPS (the one client,
//! [`crate::k8s`]). On kubeadm the kubeconfig may name a load balancer, so the caller can point the
//! probe at the local apiserver's advertise address.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::host::HostRoot;
use crate::k8s::Api;

/// The admin kubeconfig (host path) and, on kubeadm, the URL of this host's apiserver (the
/// manifest's `--advertise-address` and `--secure-port`; the kubeconfig may name a load
/// balancer).
pub fn target(observed: &super::Observed) -> (PathBuf, Option<String>) {
    observed.source.kubeconfig()
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
    match crate::runtime::block_on(probe.get(crate::keys::jwks::JWKS_PATH))? {
        (200, body) => Ok(crate::keys::jwk::keys_in(body.as_bytes())),
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
#[async_trait::async_trait]
pub trait ApiserverProbe: Send {
    async fn check(&mut self) -> Status;
    /// The value of `serviceaccount_stale_tokens_total` (summed), if it can be read.
    async fn stale_tokens(&mut self) -> Option<f64> {
        None
    }
    /// When the apiserver process started (`process_start_time_seconds`), if it can be read:
    /// what tells a restarted apiserver from the one that ran before.
    async fn started_at(&mut self) -> Option<f64> {
        None
    }
}

/// The real probe: the admin kubeconfig's [`crate::k8s::Api`].
pub struct KubeconfigProbe {
    api: Api,
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
        let api = crate::runtime::block_on(Api::from_kubeconfig(root, kubeconfig, server, timeout))
            .map_err(|e| e.to_string())?;
        Ok(KubeconfigProbe { api })
    }

    /// The apiserver URL the probe talks to (no trailing slash).
    pub fn server(&self) -> &str {
        self.api.server()
    }

    /// The client configuration underneath (for async callers).
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// See [`Api::get`].
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.api.get(path).await.map_err(|e| e.to_string())
    }

    /// See [`Api::post_json`].
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), String> {
        self.api
            .post_json(path, body)
            .await
            .map_err(|e| e.to_string())
    }

    /// Asks the apiserver's TokenRequest API for a token of `namespace/service_account` with
    /// these audiences and lifetime. The token is a credential: callers must not log it. Blocking.
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
        let (code, text) = crate::runtime::block_on(self.post_json(&path, &body))
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

#[async_trait::async_trait]
impl ApiserverProbe for KubeconfigProbe {
    async fn check(&mut self) -> Status {
        let ready = self.get("/readyz").await;
        let (ready, mut detail) = match ready {
            Ok((200, _)) => (true, "ready".to_string()),
            Ok((code, body)) => (
                false,
                format!(
                    "/readyz answered {code}: {}",
                    body.lines().next().unwrap_or("").trim()
                ),
            ),
            Err(e) => (
                false,
                format!("not reachable at {}: {e}", self.api.server()),
            ),
        };
        let mut issuer = None;
        if ready {
            match self.get(crate::keys::jwks::DISCOVERY_PATH).await {
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

    async fn stale_tokens(&mut self) -> Option<f64> {
        let (code, body) = self.get("/metrics").await.ok()?;
        if code != 200 {
            return None;
        }
        stale_tokens_in(&body)
    }

    async fn started_at(&mut self) -> Option<f64> {
        let (code, body) = self.get("/metrics").await.ok()?;
        if code != 200 {
            return None;
        }
        process_start_time_in(&body)
    }
}

/// `process_start_time_seconds` in a Prometheus text exposition.
pub fn process_start_time_in(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_start_time_seconds "))
        .and_then(|v| v.trim().parse().ok())
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_start_time_is_read_from_the_metrics() {
        // As kube-apiserver v1.36 exposes it (the real apiserver's /metrics, abridged).
        let metrics = "# HELP process_start_time_seconds [ALPHA] Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1.76508304257e+09\nprocess_virtual_memory_bytes 1.3e+09\n";
        assert_eq!(
            super::process_start_time_in(metrics),
            Some(1_765_083_042.57)
        );
        assert_eq!(super::process_start_time_in("up 1\n"), None);
    }
}
