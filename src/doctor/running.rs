//! The running apiserver, asked through the host's admin kubeconfig: is it ready, does it
//! serve the issuer and keys its files say (it reads them only at start), and does every
//! apiserver of the cluster (the `kubernetes` endpoints) serve the same keys.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::local::Local;
use super::words::{self, list};
use super::{Check, Options};
use crate::apiserver::probe::{self, KubeconfigProbe};
use crate::apiserver::{Observed, Source};
use crate::keys::jwks::{self, DISCOVERY_PATH, JWKS_PATH};
use crate::publish::merge;

/// Where the endpoints of the `kubernetes` service (one address per apiserver) are listed.
pub const ENDPOINTS_PATH: &str = "/api/v1/namespaces/default/endpoints/kubernetes";

/// One HTTP answer: (status, body), or why there was none.
pub type Answer = Result<(u16, String), String>;

/// What the apiserver(s) answered.
#[derive(Debug, Clone)]
pub struct View {
    /// The apiserver asked.
    pub server: String,
    /// The URL came from the kubeconfig (it may be a load balancer or another node).
    pub from_kubeconfig: bool,
    pub ready: Answer,
    pub discovery: Answer,
    pub jwks: Answer,
    pub endpoints: Answer,
    /// Every apiserver listed in the endpoints, with its JWKS answer.
    pub peers: Vec<(String, Answer)>,
    /// With the webhook enabled: the pods and the ServiceAccounts, for pods it missed.
    pub webhook: Option<(Answer, Answer)>,
    /// The agents' and apiservers' Leases (`Ok(None)`: no Lease API), or why they could not be
    /// read.
    pub cluster: Result<Option<crate::cluster::Facts>, String>,
}

/// Where the pods and ServiceAccounts are listed (doctor asks once; a very large cluster's
/// answer is cut at the client's cap and the check says it could not tell).
pub const PODS_PATH: &str = "/api/v1/pods";
pub const SERVICE_ACCOUNTS_PATH: &str = "/api/v1/serviceaccounts";

/// The apiserver part of doctor: asked, or skipped with the reason.
#[derive(Debug, Clone)]
pub enum Facts {
    Skipped(String),
    Asked(Box<View>),
}

/// A running apiserver check (a thread) or the reason there is none.
pub struct Job {
    receiver: Option<mpsc::Receiver<View>>,
    skipped: Option<String>,
}

impl Job {
    /// Waits for the answers until `deadline`.
    pub fn finish(self, deadline: Instant) -> Facts {
        if let Some(reason) = self.skipped {
            return Facts::Skipped(reason);
        }
        let Some(receiver) = self.receiver else {
            return Facts::Skipped("not started".into());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(view) => Facts::Asked(Box::new(view)),
            Err(_) => {
                Facts::Skipped("the apiserver did not answer within doctor's deadline".into())
            }
        }
    }
}

/// The `https://host:port` URLs of the apiservers in an Endpoints object.
pub fn endpoint_urls(body: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for subset in doc
        .get("subsets")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        let port = subset
            .get("ports")
            .and_then(|p| p.as_array())
            .and_then(|ports| {
                ports
                    .iter()
                    .find(|p| p.get("name").and_then(|n| n.as_str()) == Some("https"))
                    .or(ports.first())
            })
            .and_then(|p| p.get("port"))
            .and_then(|p| p.as_u64())
            .unwrap_or(443);
        for address in subset
            .get("addresses")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(ip) = address.get("ip").and_then(|i| i.as_str()) {
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.to_string()
                };
                let url = format!("https://{host}:{port}");
                if !out.contains(&url) {
                    out.push(url);
                }
            }
        }
    }
    out
}

/// Starts asking the apiserver on a thread (or says why it cannot be asked).
pub fn start(root: &crate::host::HostRoot, local: &Local, options: &Options) -> Job {
    let skipped = |reason: String| Job {
        receiver: None,
        skipped: Some(reason),
    };
    if options.offline {
        return skipped("--offline".into());
    }
    let observed = match &local.observed {
        Ok(o) => o,
        Err(_) => {
            return skipped(
                "the apiserver configuration could not be read (see apiserver.distribution)".into(),
            );
        }
    };
    let (kubeconfig, local_url) = probe::target(observed);
    let from_kubeconfig = options.apiserver_url.is_none() && local_url.is_none();
    let url = options.apiserver_url.clone().or(local_url);
    let timeout = options.deadline.min(Duration::from_secs(5));
    let probe = match KubeconfigProbe::new(root, &kubeconfig, url, timeout) {
        Ok(p) => p,
        Err(e) => {
            return skipped(format!(
                "no admin credential to ask the apiserver with: {}",
                local.host_text(&e)
            ));
        }
    };
    let webhook_enabled = local
        .config
        .as_ref()
        .is_ok_and(|c| c.settings.webhook.enabled);
    let now = options.now.unwrap_or_else(super::unix_now);
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let probe = &probe;
        let view = crate::runtime::block_on(async move {
            let webhook = async {
                if webhook_enabled {
                    let (pods, sas) =
                        tokio::join!(probe.get(PODS_PATH), probe.get(SERVICE_ACCOUNTS_PATH));
                    Some((pods, sas))
                } else {
                    None
                }
            };
            let cluster = async {
                let client = probe.api().client().map_err(|e| e.to_string())?;
                crate::cluster::read(&client, now)
                    .await
                    .map_err(|e| e.to_string())
            };
            let (ready, discovery, jwks, endpoints, webhook, cluster) = tokio::join!(
                probe.get("/readyz"),
                probe.get(DISCOVERY_PATH),
                probe.get(JWKS_PATH),
                probe.get(ENDPOINTS_PATH),
                webhook,
                cluster,
            );
            let urls = match &endpoints {
                Ok((200, body)) => endpoint_urls(body),
                _ => Vec::new(),
            };
            let answers = futures_util::future::join_all(
                urls.iter()
                    .map(|u| async move { probe.get(&format!("{u}{JWKS_PATH}")).await }),
            )
            .await;
            View {
                server: probe.server().to_string(),
                from_kubeconfig,
                ready,
                discovery,
                jwks,
                endpoints,
                peers: urls.into_iter().zip(answers).collect(),
                webhook,
                cluster,
            }
        });
        let _ = sender.send(view);
    });
    Job {
        receiver: Some(receiver),
        skipped: None,
    }
}

const IDS: [&str; 5] = [
    "running.ready",
    "running.discovery",
    "running.jwks",
    "running.peers",
    "running.cluster",
];

fn body_line(body: &str) -> String {
    body.lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(160)
        .collect()
}

/// The kids of a JWKS answer (or why there are none).
fn kids_of(answer: &Answer) -> Result<Vec<String>, String> {
    match answer {
        Ok((200, body)) => {
            let kids = merge::kids_in(body.as_bytes());
            if kids.is_empty() && serde_json::from_str::<serde_json::Value>(body).is_err() {
                Err("answered something that is not a JWKS".into())
            } else {
                Ok(kids)
            }
        }
        Ok((code, body)) => Err(format!("answered HTTP {code}: {}", body_line(body))),
        Err(e) => Err(e.clone()),
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Every check of the running apiserver.
pub fn evaluate(local: &Local, facts: &Facts, now: i64) -> Vec<Check> {
    let view = match facts {
        Facts::Skipped(reason) => {
            return IDS
                .iter()
                .map(|id| Check::skip(id, reason.clone()))
                .collect();
        }
        Facts::Asked(view) => view,
    };
    let restart = local.restart_hint();
    let mut out = Vec::new();
    match &view.ready {
        Ok((200, _)) => out.push(Check::pass(
            "running.ready",
            format!("ready at {}", view.server),
        )),
        Ok((code, body)) => {
            out.push(
                Check::fail(
                    "running.ready",
                    format!(
                        "{}/readyz answered HTTP {code}: {}",
                        view.server,
                        body_line(body)
                    ),
                )
                .fix(log_hint(local)),
            );
        }
        Err(e) => {
            out.push(
                Check::fail(
                    "running.ready",
                    format!("not reachable at {}: {e}", view.server),
                )
                .fix(log_hint(local)),
            );
            let reason = "the apiserver is not reachable (see running.ready)";
            out.extend(IDS[1..].iter().map(|id| Check::skip(id, reason)));
            return out;
        }
    }
    let Ok(observed) = &local.observed else {
        return out;
    };
    out.push(discovery_check(local, observed, view, &restart));
    out.push(jwks_check(local, view, &restart));
    out.push(peers_check(local, observed, view));
    out.push(cluster_check(local, &view.cluster, now));
    if let Some(check) = missed_pods_check(local, view) {
        out.push(check);
    }
    out
}

/// With the webhook enabled: pods running without the identity their ServiceAccount names
/// (created while no agent answered, `failurePolicy: Ignore`), named with the fix.
fn missed_pods_check(local: &Local, view: &View) -> Option<Check> {
    let id = "running.webhook-pods";
    let (pods, sas) = view.webhook.as_ref()?;
    let defaults = &local.config.as_ref().ok()?.settings.webhook.defaults;
    let items = |answer: &Answer, what: &str| -> Result<Vec<serde_json::Value>, String> {
        match answer {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["items"].as_array().cloned())
                .ok_or_else(|| format!("the list of {what} is not JSON")),
            Ok((code, body)) => Err(format!("listing {what}: HTTP {code}: {}", body_line(body))),
            Err(e) => Err(format!("listing {what}: {e}")),
        }
    };
    let lists = items(pods, "pods").and_then(|p| Ok((p, items(sas, "ServiceAccounts")?)));
    let (pods, sas) = match lists {
        Ok(l) => l,
        Err(e) => return Some(Check::skip(id, e)),
    };
    let cache = crate::webhook::ServiceAccounts::default();
    cache.replace_all(sas.iter());
    let missed = crate::webhook::missed::find(pods.iter(), defaults, |ns, name| {
        cache.get(ns, name).map(|sa| (*sa).clone())
    });
    if missed.is_empty() {
        return Some(Check::pass(
            id,
            format!(
                "every pod of an annotated ServiceAccount has its identity ({} pods looked at)",
                pods.len()
            ),
        ));
    }
    let keys: Vec<String> = missed
        .iter()
        .map(crate::webhook::missed::Missed::key)
        .collect();
    Some(
        Check::fail(
            id,
            format!(
                "{} run without the identity their ServiceAccount names: {} (created while no agent answered the webhook, failure-policy Ignore, or before the annotation)",
                words::plural(missed.len(), "pod"),
                crate::webhook::missed::summary(&keys)
            ),
        )
        .fix("delete them so their controllers recreate them through the webhook".to_string())
        .details(missed.iter().map(crate::webhook::missed::Missed::fix).collect()),
    )
}

fn log_hint(local: &Local) -> String {
    match &local.restart {
        Some(crate::apiserver::restart::Restart::Unit(unit)) => {
            format!("look at its log: journalctl -u {unit} -n 100")
        }
        _ => "look at its log: crictl logs $(crictl ps -q --name kube-apiserver)".to_string(),
    }
}

fn discovery_check(local: &Local, observed: &Observed, view: &View, restart: &str) -> Check {
    let id = "running.discovery";
    let body = match &view.discovery {
        Ok((200, body)) => body,
        Ok((404, _)) => {
            return Check::fail(
                id,
                "the apiserver does not serve /.well-known/openid-configuration (404): kube-apiserver serves it only when its first issuer is an https URL without query or fragment",
            )
            .fix("`irsa-agent apply` sets an https issuer");
        }
        Ok((code, body)) => {
            return Check::fail(id, format!("answered HTTP {code}: {}", body_line(body)));
        }
        Err(e) => return Check::fail(id, format!("not answered: {e}")),
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(body) else {
        return Check::fail(id, "the apiserver's discovery document is not JSON");
    };
    let served_issuer = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
    let flags = &observed.flags;
    let want_issuer = flags.issuers.first().map(String::as_str).unwrap_or("");
    let mut problems = Vec::new();
    if served_issuer != want_issuer {
        problems.push(format!(
            "it serves issuer {served_issuer:?}, but its configuration now says {want_issuer:?}"
        ));
    }
    if let Some(want) = flags.jwks_uri() {
        let served = doc.get("jwks_uri").and_then(|v| v.as_str()).unwrap_or("");
        if served != want {
            problems.push(format!(
                "it serves jwks_uri {served:?}, but its configuration now says {want:?}"
            ));
        }
    }
    if let Some(keys) = local.keys() {
        let want: Vec<&str> = jwks::algorithms(&keys);
        let served: Vec<&str> = doc
            .get("id_token_signing_alg_values_supported")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if served != want {
            problems.push(format!(
                "it advertises algorithms [{}], its key files give [{}]",
                served.join(", "),
                want.join(", ")
            ));
        }
    }
    if problems.is_empty() {
        return Check::pass(
            id,
            format!("serves issuer {served_issuer} as its configuration says"),
        );
    }
    Check::fail(
        id,
        format!(
            "{}: it has not been restarted since its configuration changed (flags are read only at start)",
            problems.join("; ")
        ),
    )
    .fix(restart.to_string())
    .details(if matches!(observed.source, Source::Kubeadm(_)) {
        vec!["kubelet restarts the static pod when the manifest changes; if it did not, look at `journalctl -u kubelet`".to_string()]
    } else {
        Vec::new()
    })
}

fn jwks_check(local: &Local, view: &View, restart: &str) -> Check {
    let id = "running.jwks";
    let served = match kids_of(&view.jwks) {
        Ok(k) => sorted(k),
        Err(e) => return Check::fail(id, format!("{JWKS_PATH}: {e}")),
    };
    let Some(files) = local.kids() else {
        return Check::skip(id, local.keys_unknown());
    };
    let files = sorted(files);
    if served == files {
        return Check::pass(
            id,
            format!(
                "serves the {} of its key files",
                words::plural(files.len(), "key")
            ),
        );
    }
    let missing: Vec<String> = files
        .iter()
        .filter(|k| !served.contains(k))
        .cloned()
        .collect();
    let extra: Vec<String> = served
        .iter()
        .filter(|k| !files.contains(k))
        .cloned()
        .collect();
    let mut finding = format!(
        "the running apiserver serves kids {} but its key files hold {}",
        list(&served),
        list(&files)
    );
    if !missing.is_empty() {
        finding.push_str(&format!("; not loaded: {}", list(&missing)));
    }
    if !extra.is_empty() {
        finding.push_str(&format!("; no longer in the files: {}", list(&extra)));
    }
    finding.push_str(
        ": it has not been restarted since the key files changed (they are read only at start)",
    );
    if view.from_kubeconfig && !is_loopback(&view.server) {
        finding.push_str(&format!(
            ", or {} is another control-plane node with other keys (see running.peers)",
            view.server
        ));
    }
    Check::fail(id, finding).fix(restart.to_string())
}

fn is_loopback(url: &str) -> bool {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.host().map(|h| match h {
                url::Host::Domain(d) => d == "localhost",
                url::Host::Ipv4(ip) => ip.is_loopback(),
                url::Host::Ipv6(ip) => ip.is_loopback(),
            })
        })
        .unwrap_or(false)
}

fn peers_check(local: &Local, observed: &Observed, view: &View) -> Check {
    let id = "running.peers";
    match &view.endpoints {
        Ok((200, _)) => {}
        Ok((code, body)) => {
            return Check::skip(
                id,
                format!(
                    "cannot list the apiservers ({ENDPOINTS_PATH} answered HTTP {code}: {})",
                    body_line(body)
                ),
            );
        }
        Err(e) => return Check::skip(id, format!("cannot list the apiservers: {e}")),
    }
    if view.peers.is_empty() {
        return Check::skip(id, "the kubernetes endpoints list no apiserver address");
    }
    let files = local.kids().map(sorted);
    let mut sets: Vec<Vec<String>> = Vec::new();
    let mut details = Vec::new();
    let mut unreachable = 0;
    for (url, answer) in &view.peers {
        let address = url.trim_start_matches("https://");
        match kids_of(answer) {
            Ok(kids) => {
                let kids = sorted(kids);
                let whose = match &files {
                    Some(f) if *f == kids => " (= this host's key files)",
                    Some(_) => " (NOT this host's key files)",
                    None => "",
                };
                details.push(format!("{address} serves kids {}{whose}", list(&kids)));
                if !sets.contains(&kids) {
                    sets.push(kids);
                }
            }
            Err(e) => {
                unreachable += 1;
                details.push(format!("{address}: could not ask: {e}"));
            }
        }
    }
    let n = view.peers.len();
    if sets.len() > 1 {
        let fix = match &observed.source {
            Source::Kubeadm(_) => format!(
                "give every control-plane node the same key files: copy /etc/kubernetes/pki/sa.key and sa.pub from one control-plane node to the others (keep any key that signed still-valid tokens in sa.pub), then restart each kube-apiserver ({})",
                local.restart_hint()
            ),
            Source::Rancher(r) => format!(
                "{p} servers share service.key through the datastore: on the node whose keys differ, restart {p} so it reloads them; if its server/tls files were replaced by hand, restore them (rotate with `{p} certificate rotate-ca`, never by editing server/tls)",
                p = r.flavor.program()
            ),
        };
        return Check::fail(
            id,
            format!(
                "the {n} apiservers of this cluster serve different keys: a token signed on one control-plane node is rejected by the others, and by relying parties unless every key is published"
            ),
        )
        .details(details)
        .fix(fix);
    }
    if unreachable > 0 {
        return Check::warn(
            id,
            format!(
                "{} of {n} apiservers could not be asked; the others serve the same keys",
                unreachable
            ),
        )
        .details(details);
    }
    Check::pass(
        id,
        if n == 1 {
            "one apiserver in the cluster".to_string()
        } else {
            format!("all {n} apiservers serve the same keys")
        },
    )
    .details(if n > 1 { details } else { Vec::new() })
}

/// The servers as their agents' Leases show them: an apiserver with no live agent (it holds
/// every cluster-wide step), agents whose apiserver does not accept the configured issuer, two
/// servers whose tokens the other rejects, a restart Lease held past its time.
pub fn cluster_check(
    local: &Local,
    cluster: &Result<Option<crate::cluster::Facts>, String>,
    now: i64,
) -> Check {
    let id = "running.cluster";
    let facts = match cluster {
        Ok(Some(facts)) => facts,
        Ok(None) => {
            return Check::pass(
                id,
                "single server: the apiserver has no Lease API, so there is nothing to coordinate with",
            );
        }
        Err(e) => return Check::skip(id, format!("cannot read the Leases in kube-system: {e}")),
    };
    let Ok(config) = &local.config else {
        return Check::skip(id, "the configuration cannot be used (see config.valid)");
    };
    let issuer = &config.settings.issuer;
    let lifetime = local.observed.as_ref().ok().map(|observed| {
        crate::apiserver::apply::longest_token_lifetime(
            config.settings.rotation.token_lifetime,
            observed,
        )
    });
    let plan = crate::cluster::plan(facts, issuer, &local.node, now, lifetime);
    let details: Vec<String> =
        crate::cluster::lines(&crate::cluster::Cluster::Servers(Box::new(plan.clone())))
            .into_iter()
            .skip(1)
            .map(|l| l.trim().to_string())
            .collect();
    let n = plan.servers.len();
    // No agent Lease at all, live or not: nobody runs the daemon (apply by hand).
    if facts.view.agents.is_empty() {
        return Check::pass(
            id,
            format!(
                "{}; no irsa-agent announces itself (the daemon, `irsa-agent run`, does; `apply` by hand coordinates nothing)",
                words::plural(n, "apiserver")
            ),
        );
    }
    // Tokens one server signs that another rejects: it signs with an issuer the other does
    // not accept.
    let reported: Vec<&crate::cluster::Server> = plan
        .servers
        .iter()
        .filter(|s| s.rollout != "unknown")
        .collect();
    let mut rejected = Vec::new();
    for a in &reported {
        let Some(signs) = a.issuers.first() else {
            continue;
        };
        for b in reported.iter().filter(|b| !b.issuers.contains(signs)) {
            rejected.push(format!(
                "{} signs with {signs}, which {} does not accept",
                a.node, b.node
            ));
        }
    }
    if !rejected.is_empty() {
        return Check::fail(
            id,
            format!(
                "tokens minted on one server are rejected by another: {}",
                rejected.join("; ")
            ),
        )
        .fix("give every server the same configuration and let the daemons roll the issuer out (each accepts it before any signs with it); by hand: `irsa-agent apply --accept-only` on every server first")
        .details(details);
    }
    let mut problems = Vec::new();
    if !plan.without_agent.is_empty() {
        problems.push(format!(
            "no live irsa-agent on {}: it holds every cluster-wide step",
            list(&plan.without_agent)
        ));
    }
    let before: Vec<String> = reported
        .iter()
        .filter(|s| s.rollout == "before")
        .map(|s| s.node.clone())
        .collect();
    if !before.is_empty() && reported.iter().any(|s| s.rollout != "before") {
        problems.push(format!(
            "the apiserver of {} does not accept {issuer} yet (if its agent is configured with another issuer, the rollout never completes)",
            list(&before)
        ));
    }
    if let Some(r) = plan.restart.as_ref().filter(|r| r.expired) {
        problems.push(format!(
            "the restart Lease is held by {} past its time (until {}): that agent died or hangs mid-restart",
            r.holder,
            crate::state::rfc3339(u64::try_from(r.until).unwrap_or(0))
        ));
    }
    if problems.is_empty() {
        return Check::pass(
            id,
            format!(
                "{}, each with a live irsa-agent; next: {}",
                words::plural(n, "server"),
                plan.next
            ),
        )
        .details(details);
    }
    let mut fixes = Vec::new();
    if !plan.without_agent.is_empty() {
        fixes.push(format!(
            "on {}: install irsa-agent with this configuration and start it (`systemctl enable --now irsa-agent`), or look at why it stopped (`journalctl -u irsa-agent`)",
            list(&plan.without_agent)
        ));
    }
    if !before.is_empty() {
        fixes.push(format!(
            "compare `issuer:` in /etc/irsa-agent/config.yaml on {}",
            list(&before)
        ));
    }
    if let Some(r) = plan.restart.as_ref().filter(|r| r.expired) {
        fixes.push(format!(
            "the next agent that restarts takes the restart Lease over; on {}, `systemctl status irsa-agent` and `irsa-agent status` say whether its apiserver came back",
            r.holder
        ));
    }
    Check::warn(id, problems.join("; "))
        .fix(fixes.join("; "))
        .details(details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_give_one_url_per_apiserver() {
        let body = r#"{"kind":"Endpoints","subsets":[{"addresses":[{"ip":"10.0.0.1"},{"ip":"10.0.0.2"}],"ports":[{"name":"https","port":6443,"protocol":"TCP"}]},{"addresses":[{"ip":"fd00::3"}],"ports":[{"name":"https","port":6443}]}]}"#;
        assert_eq!(
            endpoint_urls(body),
            vec![
                "https://10.0.0.1:6443",
                "https://10.0.0.2:6443",
                "https://[fd00::3]:6443"
            ]
        );
        assert!(endpoint_urls("not json").is_empty());
    }
}
