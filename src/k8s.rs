//! The one Kubernetes client: kube-rs, built from the host's admin kubeconfig.
//!
//! Every request irsa-agent makes to an apiserver goes through [`Api`]: the probes of `apply`,
//! `finalize` and `doctor`, rotation's questions to the cluster, `verify-token`'s TokenReview,
//! and the typed resources (ServiceAccount watches, Leases, webhook registration) through
//! [`Api::client`].
//!
//! The kubeconfig (`/etc/rancher/k3s/k3s.yaml`, `/etc/rancher/rke2/rke2.yaml`,
//! `/etc/kubernetes/admin.conf`) is read under the host root through [`crate::fs`] (bounded, no
//! link to a file someone else owns), and so are the files it names (`certificate-authority`,
//! `client-certificate`, `client-key`, `tokenFile`, relative to the kubeconfig's folder): kube-rs
//! gets them inline and never opens a host path itself. A kubeconfig without a certificate
//! authority, with `insecure-skip-tls-verify`, or with an `exec` / `auth-provider` plugin is
//! refused: the agent runs as root and verifies whom it talks to, and runs nothing a file names.
//!
//! A kube-rs client starts a worker task on the runtime that builds it, so a [`kube::Client`] is
//! made inside the runtime that uses it: [`Api`] itself is only the configuration (cheap to
//! clone, no connection), and [`Api::client`] is called from async code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt as _;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};

use crate::host::HostRoot;

/// The most of an apiserver answer read into memory (its `/metrics` is a few MiB).
pub const ANSWER_CAP: usize = 32 << 20;

/// Why the apiserver could not be asked or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig (or a file it names) could not be read or is not usable.
    #[error("{file}: {cause}")]
    Kubeconfig { file: PathBuf, cause: String },
    /// The request did not get an answer (refused, TLS, timeout).
    #[error("{0}")]
    Unreachable(String),
    /// The answer was larger than [`ANSWER_CAP`] or broke off.
    #[error("the answer from {server} could not be read: {cause}")]
    Answer { server: String, cause: String },
}

/// How to reach an apiserver with the host's admin credentials. Holds no connection.
#[derive(Clone)]
pub struct Api {
    config: kube::Config,
    server: String,
    timeout: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("server", &self.server).finish()
    }
}

fn bad(file: &Path, cause: impl Into<String>) -> Error {
    Error::Kubeconfig {
        file: file.to_path_buf(),
        cause: cause.into(),
    }
}

/// The innermost cause says it best ("Connection refused", a TLS alert, ...).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

/// Reads a file the kubeconfig names (host path, relative to the kubeconfig's folder).
fn named_file(root: &HostRoot, kubeconfig: &Path, file: &str) -> Result<Vec<u8>, Error> {
    let host = if Path::new(file).is_absolute() {
        PathBuf::from(file)
    } else {
        kubeconfig.parent().unwrap_or(Path::new("/")).join(file)
    };
    crate::fs::read(root.path(&host))
        .map_err(|e| bad(kubeconfig, format!("cannot read {}: {e}", host.display())))
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Replaces every file the user entry names by its content, read under the host root.
fn inline_user(root: &HostRoot, kubeconfig: &Path, user: &mut AuthInfo) -> Result<(), Error> {
    if user.exec.is_some() || user.auth_provider.is_some() {
        return Err(bad(
            kubeconfig,
            "the user runs an exec or auth-provider plugin; irsa-agent runs as root and runs no \
             program a kubeconfig names: use the distribution's admin kubeconfig (client \
             certificate or token)",
        ));
    }
    if let Some(file) = user.client_certificate.take() {
        user.client_certificate_data = Some(b64(&named_file(root, kubeconfig, &file)?));
    }
    if let Some(file) = user.client_key.take() {
        let key = zeroize::Zeroizing::new(named_file(root, kubeconfig, &file)?);
        user.client_key_data = Some(b64(&key).into());
    }
    if let Some(file) = user.token_file.take() {
        let token = zeroize::Zeroizing::new(named_file(root, kubeconfig, &file)?);
        let text = String::from_utf8_lossy(&token).trim().to_string();
        user.token = Some(text.into());
    }
    Ok(())
}

impl Api {
    /// The admin kubeconfig at `kubeconfig` (a host path). `server` overrides its server URL
    /// (on kubeadm the kubeconfig may name a load balancer; the probes ask this host's
    /// apiserver). `timeout` bounds each request.
    pub async fn from_kubeconfig(
        root: &HostRoot,
        kubeconfig: &Path,
        server: Option<String>,
        timeout: Duration,
    ) -> Result<Api, Error> {
        let text = crate::fs::read_to_string(root.path(kubeconfig))
            .map_err(|e| bad(kubeconfig, format!("cannot read the admin kubeconfig: {e}")))?;
        let mut file = Kubeconfig::from_yaml(&text).map_err(|e| bad(kubeconfig, innermost(&e)))?;
        let context_name = file
            .current_context
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| file.contexts.first().map(|c| c.name.clone()))
            .ok_or_else(|| bad(kubeconfig, "no context"))?;
        let context = file
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.clone())
            .ok_or_else(|| bad(kubeconfig, format!("context {context_name:?} not found")))?;
        let cluster = file
            .clusters
            .iter_mut()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_mut())
            .ok_or_else(|| {
                bad(
                    kubeconfig,
                    format!("cluster {:?} not found", context.cluster),
                )
            })?;
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(bad(
                kubeconfig,
                "the cluster sets insecure-skip-tls-verify: refusing to talk to the apiserver \
                 without verifying it",
            ));
        }
        if let Some(ca) = cluster.certificate_authority.take() {
            cluster.certificate_authority_data = Some(b64(&named_file(root, kubeconfig, &ca)?));
        }
        if cluster
            .certificate_authority_data
            .as_deref()
            .is_none_or(str::is_empty)
        {
            return Err(bad(
                kubeconfig,
                "the cluster has no certificate-authority(-data): refusing to talk to the \
                 apiserver without verifying it",
            ));
        }
        if let Some(info) = context
            .user
            .as_ref()
            .and_then(|user| file.auth_infos.iter_mut().find(|u| &u.name == user))
            .and_then(|entry| entry.auth_info.as_mut())
        {
            inline_user(root, kubeconfig, info)?;
        }
        let options = KubeConfigOptions {
            context: Some(context_name),
            ..KubeConfigOptions::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(|e| bad(kubeconfig, innermost(&e)))?;
        if let Some(server) = server {
            config.cluster_url = server
                .trim_end_matches('/')
                .parse()
                .map_err(|e| bad(kubeconfig, format!("bad apiserver URL {server:?}: {e}")))?;
        }
        // Never through a proxy: the apiserver is on this host or a peer's.
        config.proxy_url = None;
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        // No retries inside the client: kube-rs retries 429/503/504 up to 15 times with backoff
        // up to 1000 s by default, so a Lease write to an apiserver that answers 503 (starting,
        // shutting down) took minutes. Every caller here waits and retries on its own clock
        // (`apiserver::ready`, the daemon's back-off), where it can say what it waits for.
        config.default_retry = false;
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        Ok(Api {
            config,
            server,
            timeout,
        })
    }

    /// The apiserver URL requests go to (`https://127.0.0.1:6443`, no trailing slash).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The same credentials aimed at another apiserver of the cluster (`https://10.0.0.2:6443`).
    pub fn at(&self, server: &str) -> Result<Api, Error> {
        let mut config = self.config.clone();
        config.cluster_url = server
            .trim_end_matches('/')
            .parse()
            .map_err(|e| Error::Unreachable(format!("bad apiserver URL {server:?}: {e}")))?;
        Ok(Api {
            config,
            server: server.trim_end_matches('/').to_string(),
            timeout: self.timeout,
        })
    }

    /// A typed client. Call it from the runtime that will use it (see the module docs).
    pub fn client(&self) -> Result<kube::Client, Error> {
        kube::Client::try_from(self.config.clone())
            .map_err(|e| Error::Unreachable(format!("cannot set up the client: {}", innermost(&e))))
    }

    /// `GET path` with the admin credential: status and body (at most [`ANSWER_CAP`]). `path`
    /// may be an absolute `https://` URL: another apiserver of the same cluster, trusted
    /// through the same CA.
    pub async fn get(&self, path: &str) -> Result<(u16, String), Error> {
        self.send(http::Method::GET, path, None).await
    }

    /// `POST` of a JSON body with the admin credential (TokenRequest, TokenReview).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, String), Error> {
        self.send(http::Method::POST, path, Some(body)).await
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), Error> {
        if let Some(rest) = path.strip_prefix("https://") {
            let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let tail = if tail.is_empty() { "/" } else { tail };
            let peer = self.at(&format!("https://{authority}"))?;
            return Box::pin(peer.send(method, tail, body)).await;
        }
        let client = self.client()?;
        let mut request = http::Request::builder().method(method).uri(path);
        let payload = match body {
            Some(body) => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                body.to_string().into_bytes()
            }
            None => Vec::new(),
        };
        let request = request
            .body(kube::client::Body::from(payload))
            .map_err(|e| Error::Unreachable(format!("bad request for {path}: {e}")))?;
        let exchange = async {
            let response = client
                .send(request)
                .await
                .map_err(|e| Error::Unreachable(innermost(&e)))?;
            let status = response.status().as_u16();
            let bytes = http_body_util::Limited::new(response.into_body(), ANSWER_CAP)
                .collect()
                .await
                .map_err(|e| Error::Answer {
                    server: self.server.clone(),
                    cause: e.to_string(),
                })?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
        };
        // The whole exchange, not only each read, ends in `timeout` (twice: connect and answer).
        match tokio::time::timeout(self.timeout * 2, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unreachable(format!(
                "timed out after {}s",
                (self.timeout * 2).as_secs()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/probe");

    fn host() -> Result<(tempfile::TempDir, HostRoot), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let etc = dir.path().join("etc/rancher/k3s");
        std::fs::create_dir_all(&etc)?;
        for name in ["ca.crt", "client.crt", "client.key"] {
            std::fs::copy(format!("{DATA}/{name}"), etc.join(name))?;
        }
        let root = HostRoot::new(dir.path());
        Ok((dir, root))
    }

    fn kubeconfig(user: &str, cluster_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: ca.crt\n{cluster_extra}contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n{user}"
        )
    }

    fn build(root: &HostRoot, text: &str) -> Result<Api, Error> {
        let path = root.path("/etc/rancher/k3s/k3s.yaml");
        std::fs::write(&path, text).map_err(|e| Error::Unreachable(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        runtime.block_on(Api::from_kubeconfig(
            root,
            Path::new("/etc/rancher/k3s/k3s.yaml"),
            None,
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn files_the_kubeconfig_names_are_read_under_the_host_root()
    -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, root) = host()?;
        let user =
            "    client-certificate: client.crt\n    client-key: /etc/rancher/k3s/client.key\n";
        let api = build(&root, &kubeconfig(user, ""))?;
        assert_eq!(api.server(), "https://127.0.0.1:6443");
        // A file missing under the root is named (never looked for on the real host).
        std::fs::remove_file(root.path("/etc/rancher/k3s/client.key"))?;
        let err = build(&root, &kubeconfig(user, ""))
            .err()
            .ok_or("a missing client key was accepted")?
            .to_string();
        assert!(err.contains("/etc/rancher/k3s/client.key"), "{err}");
        Ok(())
    }

    #[test]
    fn plugins_and_unverified_servers_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, root) = host()?;
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /tmp/anything\n";
        let err = build(&root, &kubeconfig(exec, ""))
            .err()
            .ok_or("an exec plugin was accepted")?
            .to_string();
        assert!(err.contains("k3s.yaml") && err.contains("exec"), "{err}");
        let user = "    token: abc\n";
        let err = build(
            &root,
            &kubeconfig(user, "    insecure-skip-tls-verify: true\n"),
        )
        .err()
        .ok_or("insecure-skip-tls-verify was accepted")?
        .to_string();
        assert!(err.contains("insecure-skip-tls-verify"), "{err}");
        Ok(())
    }
}
