//! The cluster as rotation sees it, behind a trait: the local apiserver's health, the JWKS every
//! apiserver serves (what it verifies with), tokens it signs now (TokenRequest), its stale-token
//! counter, and legacy token Secrets (signed by kube-controller-manager, never expiring).
//!
//! The real implementation talks HTTPS with the admin kubeconfig ([`crate::k8s::Api`]); tests use a
//! fake whose apiservers load the fake host's key files at their last restart.

use base64::Engine as _;
use zeroize::Zeroizing;

use super::seal::{self, Sealed};
use crate::apiserver::change::Attempt;
use crate::apiserver::probe::stale_tokens_in;
use crate::k8s::Api;
use crate::keys::jwks::{DISCOVERY_PATH, JWKS_PATH};
use crate::membership::{self, Report, Restart, View};

/// The local apiserver's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `/readyz` answered 200.
    pub ready: bool,
    /// The issuer of its discovery document.
    pub issuer: Option<String>,
    pub detail: String,
}

/// The namespace and service account rotation requests test tokens for (exists in every
/// cluster). The tokens get a private audience, so they are good for nothing else.
pub const TOKEN_NAMESPACE: &str = "kube-system";
pub const TOKEN_SERVICE_ACCOUNT: &str = "default";
pub const TOKEN_AUDIENCE: &str = "irsa-agent-rotation-check";

/// Why the cluster could not answer a question.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The apiserver could not be asked (kubeconfig, network, TLS, an answer cut off).
    #[error(transparent)]
    Api(#[from] crate::k8s::Error),
    /// It answered, but not with what was asked for (an HTTP error, an unreadable document,
    /// nothing listed).
    #[error("{0}")]
    Answer(String),
}

impl From<String> for ClusterError {
    fn from(message: String) -> Self {
        ClusterError::Answer(message)
    }
}

/// The cluster's apiservers.
#[async_trait::async_trait]
pub trait Cluster: Send {
    /// The local apiserver: ready, and the issuer it serves.
    async fn health(&mut self) -> Health;
    /// The kids of the JWKS an apiserver serves (`None`: the local one), in its order: the keys
    /// it verifies with (on k3s/RKE2 the first one is the one it signs with).
    async fn jwks_kids(&mut self, server: Option<&str>) -> Result<Vec<String>, ClusterError>;
    /// The URL of every apiserver of the cluster (the `kubernetes` Service's endpoints).
    async fn servers(&mut self) -> Result<Vec<String>, ClusterError>;
    /// A token freshly issued by an apiserver (`None`: the local one) through TokenRequest.
    /// A secret: never log it.
    async fn request_token(
        &mut self,
        server: Option<&str>,
    ) -> Result<Zeroizing<String>, ClusterError>;
    /// `serviceaccount_stale_tokens_total` of the local apiserver; why not when it cannot be
    /// read (the apiserver does not answer, or answers something else than the metrics).
    async fn stale_tokens(&mut self) -> Result<f64, ClusterError>;
    /// Legacy service-account token Secrets (`kubernetes.io/service-account-token`) as
    /// (`namespace/name`, kid of their token).
    async fn legacy_token_kids(&mut self) -> Result<Vec<(String, String)>, ClusterError>;

    // The other servers' agents, through the Leases of [`crate::membership`]. The defaults are
    // an apiserver without a Lease API (nothing to coordinate with: one server).

    /// This server's node name, as its agent's Lease names it.
    fn node(&self) -> &str {
        ""
    }
    /// The agents and apiservers of the cluster as their Leases show them; `None` when the
    /// apiserver has no Lease API.
    async fn members(&mut self) -> Result<Option<View>, ClusterError> {
        Ok(None)
    }
    /// Takes or renews the cluster-wide Lease `name` (the rotation Lease, the restart Lease)
    /// for this node, for `seconds`.
    async fn hold(&mut self, name: &str, seconds: u64) -> Result<Restart, membership::Error> {
        let _ = seconds;
        Err(membership::Error::Lease {
            name: name.to_string(),
            cause: "the apiserver has no Lease API".to_string(),
            code: Some(404),
        })
    }
    /// Tries to take the restart Lease for `seconds`, and checks that every other apiserver
    /// serves ([`crate::apiserver::change::try_turn`]).
    async fn try_turn(&mut self, seconds: u64) -> Result<Attempt, membership::Error> {
        self.hold(membership::RESTART, seconds)
            .await
            .map(|held| match held {
                Restart::Held { .. } => Attempt::Held,
                Restart::Busy { holder, until } => Attempt::Busy { holder, until },
            })
    }
    /// Gives the Lease `name` back, when this node holds it.
    async fn let_go(&mut self, name: &str) -> Result<(), membership::Error> {
        let _ = name;
        Ok(())
    }
    /// Says in this node's Lease what its apiserver has and where its rotation is.
    async fn announce(&mut self, report: &Report) -> Result<(), membership::Error> {
        let _ = report;
        Ok(())
    }

    // kubeadm on several nodes: the driver shares the rotation's new key, sealed
    // ([`super::seal`]), through the Secret [`super::seal::SECRET`].

    /// Stores the sealed new key for the other nodes' agents (replacing an older one).
    async fn share_key(&mut self, sealed: &Sealed) -> Result<(), ClusterError> {
        let _ = sealed;
        Err(ClusterError::Answer(
            "this cluster cannot share a key between its servers".into(),
        ))
    }
    /// The sealed new key the driver shared, if any.
    async fn shared_key(&mut self) -> Result<Option<Sealed>, ClusterError> {
        Ok(None)
    }
    /// Removes the shared key (the rotation ended, or was aborted).
    async fn unshare_key(&mut self) -> Result<(), ClusterError> {
        Ok(())
    }
}

/// The kid in a JWT's header (no verification).
pub fn token_kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

/// The real cluster, through the admin kubeconfig.
pub struct ApiCluster {
    pub api: Api,
    /// This server's node name (its agent's Lease is `irsa-agent-<node>`).
    pub node: String,
    /// Who holds the restart Lease for this process ([`super::HostEdges::restart_holder`]).
    pub restart_holder: String,
    /// How long this agent's Lease lives after a renewal ([`membership::lease_seconds`]).
    pub lease_seconds: u64,
}

fn unix_now() -> i64 {
    i64::try_from(crate::state::unix_now()).unwrap_or(i64::MAX)
}

fn lease_client(api: &Api, name: &str) -> Result<kube::Client, membership::Error> {
    api.client().map_err(|e| membership::Error::Lease {
        name: name.to_string(),
        cause: e.to_string(),
        code: None,
    })
}

impl ApiCluster {
    fn client(&self, server: Option<&str>) -> Result<Api, ClusterError> {
        match server {
            Some(s) if s.trim_end_matches('/') != self.api.server() => Ok(self.api.at(s)?),
            _ => Ok(self.api.clone()),
        }
    }

    async fn get(api: &Api, path: &str) -> Result<(u16, String), ClusterError> {
        Ok(api.get(path).await?)
    }
}

fn json(code: u16, body: &str, what: &str) -> Result<serde_json::Value, String> {
    if code != 200 && code != 201 {
        let first = body.lines().next().unwrap_or("").trim();
        return Err(format!("{what} answered HTTP {code}: {first}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{what} is not JSON: {e}"))
}

/// The apiserver URLs in an Endpoints object (`https://ip:port`, IPv6 in brackets).
pub fn endpoint_urls(endpoints: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let empty = Vec::new();
    for subset in endpoints
        .get("subsets")
        .and_then(|s| s.as_array())
        .unwrap_or(&empty)
    {
        let ports = subset
            .get("ports")
            .and_then(|p| p.as_array())
            .unwrap_or(&empty);
        let port = ports
            .iter()
            .find(|p| p.get("name").and_then(|n| n.as_str()) == Some("https"))
            .or_else(|| ports.first())
            .and_then(|p| p.get("port"))
            .and_then(|p| p.as_u64())
            .unwrap_or(6443);
        for address in subset
            .get("addresses")
            .and_then(|a| a.as_array())
            .unwrap_or(&empty)
        {
            if let Some(ip) = address.get("ip").and_then(|i| i.as_str()) {
                let url = if ip.contains(':') {
                    format!("https://[{ip}]:{port}")
                } else {
                    format!("https://{ip}:{port}")
                };
                if !out.contains(&url) {
                    out.push(url);
                }
            }
        }
    }
    out.sort();
    out
}

#[async_trait::async_trait]
impl Cluster for ApiCluster {
    async fn health(&mut self) -> Health {
        match self.api.get("/readyz").await {
            Ok((200, _)) => {}
            Ok((code, body)) => {
                return Health {
                    ready: false,
                    issuer: None,
                    detail: format!(
                        "/readyz answered {code}: {}",
                        body.lines().next().unwrap_or("").trim()
                    ),
                };
            }
            Err(e) => {
                return Health {
                    ready: false,
                    issuer: None,
                    detail: format!("not reachable at {}: {e}", self.api.server()),
                };
            }
        }
        let issuer = match self.api.get(DISCOVERY_PATH).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("issuer")?.as_str().map(str::to_string)),
            _ => None,
        };
        Health {
            ready: true,
            detail: format!(
                "ready, serving issuer {}",
                issuer.as_deref().unwrap_or("(unreadable)")
            ),
            issuer,
        }
    }

    async fn jwks_kids(&mut self, server: Option<&str>) -> Result<Vec<String>, ClusterError> {
        let api = self.client(server)?;
        let (code, body) = Self::get(&api, JWKS_PATH).await?;
        let doc = json(code, &body, &format!("{}{JWKS_PATH}", api.server()))?;
        Ok(crate::keys::jwk::kids_in(doc.to_string().as_bytes()))
    }

    async fn servers(&mut self) -> Result<Vec<String>, ClusterError> {
        let path = "/api/v1/namespaces/default/endpoints/kubernetes";
        let (code, body) = Self::get(&self.api, path).await?;
        let doc = json(code, &body, path)?;
        let urls = endpoint_urls(&doc);
        if urls.is_empty() {
            return Err(ClusterError::Answer(format!(
                "{path} lists no apiserver address"
            )));
        }
        Ok(urls)
    }

    async fn request_token(
        &mut self,
        server: Option<&str>,
    ) -> Result<Zeroizing<String>, ClusterError> {
        let api = self.client(server)?;
        let path = format!(
            "/api/v1/namespaces/{TOKEN_NAMESPACE}/serviceaccounts/{TOKEN_SERVICE_ACCOUNT}/token"
        );
        let request = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [TOKEN_AUDIENCE], "expirationSeconds": 600},
        });
        let (code, body) = api.post_json(&path, &request).await?;
        let body = Zeroizing::new(body);
        // The parsed document holds the token too; it is dropped right after.
        let doc = json(code, &body, &format!("TokenRequest at {}", api.server()))?;
        doc.get("status")
            .and_then(|s| s.get("token"))
            .and_then(|t| t.as_str())
            .map(|t| Zeroizing::new(t.to_string()))
            .ok_or_else(|| {
                ClusterError::Answer(format!(
                    "TokenRequest at {} returned no token",
                    api.server()
                ))
            })
    }

    async fn stale_tokens(&mut self) -> Result<f64, ClusterError> {
        let (code, body) = Self::get(&self.api, "/metrics").await?;
        if code != 200 {
            return Err(ClusterError::Answer(format!(
                "{}/metrics answered HTTP {code}: {}",
                self.api.server(),
                body.lines().next().unwrap_or("").trim()
            )));
        }
        stale_tokens_in(&body).ok_or_else(|| {
            ClusterError::Answer(format!(
                "{}/metrics has an unreadable serviceaccount_stale_tokens_total sample",
                self.api.server()
            ))
        })
    }

    async fn legacy_token_kids(&mut self) -> Result<Vec<(String, String)>, ClusterError> {
        let path = "/api/v1/secrets?fieldSelector=type%3Dkubernetes.io%2Fservice-account-token";
        let (code, body) = Self::get(&self.api, path).await?;
        let body = Zeroizing::new(body);
        let doc = json(code, &body, "listing service-account token Secrets")?;
        Ok(legacy_kids(&doc))
    }

    fn node(&self) -> &str {
        &self.node
    }

    async fn members(&mut self) -> Result<Option<View>, ClusterError> {
        let client = self.api.client()?;
        match membership::view(&client, unix_now()).await {
            Ok(view) => Ok(Some(view)),
            Err(e) if e.no_lease_api() => Ok(None),
            Err(e) => Err(ClusterError::Answer(e.to_string())),
        }
    }

    async fn hold(&mut self, name: &str, seconds: u64) -> Result<Restart, membership::Error> {
        let client = lease_client(&self.api, name)?;
        let seconds = i32::try_from(seconds).unwrap_or(i32::MAX);
        membership::acquire(&client, name, &self.node, seconds, unix_now()).await
    }

    async fn try_turn(&mut self, seconds: u64) -> Result<Attempt, membership::Error> {
        let client = lease_client(&self.api, membership::RESTART)?;
        let seconds = i32::try_from(seconds).unwrap_or(i32::MAX);
        crate::apiserver::change::try_turn_as(
            &client,
            &self.node,
            &self.restart_holder,
            seconds,
            unix_now(),
        )
        .await
    }

    async fn let_go(&mut self, name: &str) -> Result<(), membership::Error> {
        let client = lease_client(&self.api, name)?;
        let holder = if name == membership::RESTART {
            &self.restart_holder
        } else {
            &self.node
        };
        membership::release(&client, name, holder).await
    }

    async fn announce(&mut self, report: &Report) -> Result<(), membership::Error> {
        let name = membership::lease_name(&self.node);
        let client = lease_client(&self.api, &name)?;
        let seconds = i32::try_from(self.lease_seconds).unwrap_or(i32::MAX);
        membership::announce(&client, &self.node, report, seconds, unix_now()).await
    }

    async fn share_key(&mut self, sealed: &Sealed) -> Result<(), ClusterError> {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;
        use kube::api::{Patch, PatchParams};
        let secrets = secret_api(&self.api)?;
        let doc = serde_json::to_vec(sealed).map_err(|e| ClusterError::Answer(e.to_string()))?;
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(seal::SECRET.to_string()),
                namespace: Some(membership::NAMESPACE.to_string()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "irsa-agent".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".to_string()),
            data: Some([(seal::SECRET_KEY.to_string(), ByteString(doc))].into()),
            ..Default::default()
        };
        let params = PatchParams::apply("irsa-agent").force();
        secrets
            .patch(seal::SECRET, &params, &Patch::Apply(&secret))
            .await
            .map_err(|e| secret_error("store", e))?;
        Ok(())
    }

    async fn shared_key(&mut self) -> Result<Option<Sealed>, ClusterError> {
        let secrets = secret_api(&self.api)?;
        let Some(secret) = secrets
            .get_opt(seal::SECRET)
            .await
            .map_err(|e| secret_error("read", e))?
        else {
            return Ok(None);
        };
        let doc = secret
            .data
            .as_ref()
            .and_then(|d| d.get(seal::SECRET_KEY))
            .ok_or_else(|| {
                ClusterError::Answer(format!(
                    "the Secret {}/{} has no {}",
                    membership::NAMESPACE,
                    seal::SECRET,
                    seal::SECRET_KEY
                ))
            })?;
        serde_json::from_slice(&doc.0).map(Some).map_err(|e| {
            ClusterError::Answer(format!(
                "the Secret {}/{} is unreadable: {e}",
                membership::NAMESPACE,
                seal::SECRET
            ))
        })
    }

    async fn unshare_key(&mut self) -> Result<(), ClusterError> {
        let secrets = secret_api(&self.api)?;
        match secrets
            .delete(seal::SECRET, &kube::api::DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(secret_error("delete", e)),
        }
    }
}

fn secret_api(api: &Api) -> Result<kube::Api<k8s_openapi::api::core::v1::Secret>, ClusterError> {
    Ok(kube::Api::namespaced(api.client()?, membership::NAMESPACE))
}

fn secret_error(what: &str, e: kube::Error) -> ClusterError {
    ClusterError::Answer(format!(
        "cannot {what} the Secret {}/{}: {e}",
        membership::NAMESPACE,
        seal::SECRET
    ))
}

/// (`namespace/name`, kid) of each Secret in a SecretList that holds a token.
pub fn legacy_kids(list: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for item in list
        .get("items")
        .and_then(|i| i.as_array())
        .into_iter()
        .flatten()
    {
        let meta = item.get("metadata");
        let name = format!(
            "{}/{}",
            meta.and_then(|m| m.get("namespace")?.as_str())
                .unwrap_or("?"),
            meta.and_then(|m| m.get("name")?.as_str()).unwrap_or("?")
        );
        let Some(encoded) = item
            .get("data")
            .and_then(|d| d.get("token"))
            .and_then(|t| t.as_str())
        else {
            continue;
        };
        let Ok(token) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            continue;
        };
        let token = Zeroizing::new(token);
        if let Some(kid) = std::str::from_utf8(&token).ok().and_then(token_kid) {
            out.push((name, kid));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_apiserver_urls() {
        let doc = serde_json::json!({"subsets": [
            {"addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.1"}], "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
            {"addresses": [{"ip": "fd00::3"}], "ports": [{"port": 443}]},
        ]});
        assert_eq!(
            endpoint_urls(&doc),
            vec![
                "https://10.0.0.1:6443",
                "https://10.0.0.2:6443",
                "https://[fd00::3]:443"
            ]
        );
        assert!(endpoint_urls(&serde_json::json!({})).is_empty());
    }
}
