//! Metrics: counters kept by the loop, rendered in the Prometheus text format, written as a
//! node-exporter textfile (atomically, through [`crate::fs`]) and/or served on a loopback
//! address (`GET /metrics`, hyper).
//!
//! Names are stable (`irsa_agent_<what>_total|_seconds|_timestamp_seconds`); counters count
//! since the daemon started (Prometheus handles the reset), except the last-success timestamp,
//! which carries over restarts through the state file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fs::{self, NewFile, WriteOutcome};

/// One target's health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetMetric {
    pub target: String,
    /// The last publish attempt to it succeeded.
    pub up: bool,
    pub last_success_timestamp_seconds: Option<u64>,
}

/// The numbers (also the `metrics` object of `status --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    pub start_timestamp_seconds: u64,
    pub converges_total: u64,
    pub converge_failures_total: u64,
    pub last_converge_duration_seconds: f64,
    /// Unix time of the last publish that succeeded at every target.
    pub last_publish_success_timestamp_seconds: Option<u64>,
    /// Publish attempts (all targets) that failed somewhere.
    pub publish_failures_total: u64,
    /// Objects written (created or replaced) at targets.
    pub objects_written_total: u64,
    /// Keys in the JWKS last published.
    pub keys_published: u64,
    /// Apiserver restarts the agent did (apply, pending restarts).
    pub apiserver_restarts_total: u64,
    /// Things found not as they should be without anyone announcing it: a published object
    /// deleted or changed, the apiserver configuration changed behind the agent's back.
    pub drift_found_total: u64,
    /// The last converge left everything as it should be.
    pub in_sync: bool,
    pub targets: Vec<TargetMetric>,
    /// The pod identity webhook, when it is served.
    pub webhook: Option<WebhookMetric>,
    /// The cluster as the last apiserver step read it (`None` before).
    pub cluster: Option<ClusterMetric>,
}

/// The cluster's servers, from the Leases ([`crate::cluster`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterMetric {
    /// The Leases could be read (or the apiserver has no Lease API: a single server).
    pub readable: bool,
    pub servers: u64,
    pub servers_without_agent: u64,
    /// Each server's issuer rollout phase (`before`, `accepting`, `signing`, `unknown`).
    pub phases: Vec<(String, String)>,
}

impl ClusterMetric {
    pub fn of(cluster: &crate::cluster::Cluster) -> ClusterMetric {
        use crate::cluster::Cluster;
        match cluster {
            Cluster::Servers(plan) => ClusterMetric {
                readable: true,
                servers: plan.servers.len() as u64,
                servers_without_agent: plan.without_agent.len() as u64,
                phases: plan
                    .servers
                    .iter()
                    .map(|s| (s.node.clone(), s.rollout.to_string()))
                    .collect(),
            },
            Cluster::SingleServer { .. } => ClusterMetric {
                readable: true,
                servers: 1,
                ..ClusterMetric::default()
            },
            Cluster::Unreadable { .. } => ClusterMetric::default(),
        }
    }
}

/// The pod identity webhook's counters (since it started serving) and its cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookMetric {
    /// `https://127.0.0.1:9443/mutate`.
    pub url: String,
    pub requests_total: u64,
    pub mutations_total: u64,
    pub refusals_total: u64,
    pub errors_total: u64,
    /// ServiceAccounts in the cache.
    pub service_accounts: u64,
    /// Unix time the serving certificate expires.
    pub certificate_expiry_timestamp_seconds: u64,
    /// Pods running without the identity their ServiceAccount names (`namespace/name`), from
    /// the last look; `None` before the first (the cache is loading, the API unreachable).
    pub pods_missed: Option<Vec<String>>,
    /// Why it is enabled but not served.
    pub error: Option<String>,
}

pub use crate::exposition::{Exposition, label};

/// The Prometheus text exposition of the daemon's own metrics.
pub fn render(m: &Metrics, issuer: Option<&str>) -> String {
    let mut exposition = Exposition::default();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        exposition.family(name, kind, help, lines);
    };
    let one = |v: String| vec![(String::new(), v)];
    metric(
        "info",
        "gauge",
        "Version and issuer of the running agent.",
        one_labelled(
            format!(
                "{{version=\"{}\",issuer=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                label(issuer.unwrap_or(""))
            ),
            "1".into(),
        ),
    );
    metric(
        "start_timestamp_seconds",
        "gauge",
        "Unix time the daemon started.",
        one(m.start_timestamp_seconds.to_string()),
    );
    metric(
        "in_sync",
        "gauge",
        "1 when the last converge left the apiserver configuration and every target as they should be.",
        one(u8::from(m.in_sync).to_string()),
    );
    metric(
        "converges_total",
        "counter",
        "Converge passes (start, file changes, resyncs, retries, reloads).",
        one(m.converges_total.to_string()),
    );
    metric(
        "converge_failures_total",
        "counter",
        "Converge passes that failed somewhere and were retried.",
        one(m.converge_failures_total.to_string()),
    );
    metric(
        "last_converge_duration_seconds",
        "gauge",
        "How long the last converge pass took.",
        one(format!("{:.6}", m.last_converge_duration_seconds)),
    );
    if let Some(t) = m.last_publish_success_timestamp_seconds {
        metric(
            "last_publish_success_timestamp_seconds",
            "gauge",
            "Unix time of the last publish that succeeded at every target.",
            one(t.to_string()),
        );
    }
    metric(
        "publish_failures_total",
        "counter",
        "Publish attempts that failed at some target.",
        one(m.publish_failures_total.to_string()),
    );
    metric(
        "objects_written_total",
        "counter",
        "Objects (JWKS, discovery document) created or replaced at targets.",
        one(m.objects_written_total.to_string()),
    );
    metric(
        "keys_published",
        "gauge",
        "Keys in the JWKS last published.",
        one(m.keys_published.to_string()),
    );
    metric(
        "apiserver_restarts_total",
        "counter",
        "kube-apiserver restarts done by the agent.",
        one(m.apiserver_restarts_total.to_string()),
    );
    metric(
        "drift_found_total",
        "counter",
        "Published objects or apiserver settings found changed behind the agent's back and restored.",
        one(m.drift_found_total.to_string()),
    );
    let targets = |f: &dyn Fn(&TargetMetric) -> Option<String>| {
        m.targets
            .iter()
            .filter_map(|t| f(t).map(|v| (format!("{{target=\"{}\"}}", label(&t.target)), v)))
            .collect::<Vec<_>>()
    };
    if !m.targets.is_empty() {
        metric(
            "target_up",
            "gauge",
            "1 when the last publish to this target succeeded.",
            targets(&|t| Some(u8::from(t.up).to_string())),
        );
        let last = targets(&|t| t.last_success_timestamp_seconds.map(|s| s.to_string()));
        if !last.is_empty() {
            metric(
                "target_last_success_timestamp_seconds",
                "gauge",
                "Unix time of the last successful publish to this target.",
                last,
            );
        }
    }
    if let Some(w) = &m.webhook {
        metric(
            "webhook_up",
            "gauge",
            "1 when the enabled pod identity webhook is served.",
            one(u8::from(w.error.is_none()).to_string()),
        );
        for (name, help, value) in [
            (
                "webhook_requests_total",
                "AdmissionReviews the pod identity webhook answered.",
                w.requests_total,
            ),
            (
                "webhook_mutations_total",
                "Pods the webhook gave a cloud identity (answers with a patch).",
                w.mutations_total,
            ),
            (
                "webhook_refusals_total",
                "Pods the webhook refused (a bad annotation, not a pod review).",
                w.refusals_total,
            ),
            (
                "webhook_errors_total",
                "Webhook requests not answered with a review: bad body, too large, wrong path, failed TLS handshakes, connections over the limit.",
                w.errors_total,
            ),
        ] {
            metric(name, "counter", help, one(value.to_string()));
        }
        metric(
            "webhook_service_accounts",
            "gauge",
            "ServiceAccounts in the webhook's cache.",
            one(w.service_accounts.to_string()),
        );
        if let Some(missed) = &w.pods_missed {
            metric(
                "webhook_pods_missed",
                "gauge",
                "Pods running without the identity their ServiceAccount names: created while no agent answered the webhook (failurePolicy Ignore) or before the annotation. Delete them so their controllers recreate them.",
                one(missed.len().to_string()),
            );
        }
        metric(
            "webhook_certificate_expiry_timestamp_seconds",
            "gauge",
            "Unix time the webhook's serving certificate expires (renewed 10 days before).",
            one(w.certificate_expiry_timestamp_seconds.to_string()),
        );
    }
    if let Some(c) = &m.cluster {
        metric(
            "cluster_readable",
            "gauge",
            "1 when the last apiserver step could read the cluster's Leases (or the apiserver has no Lease API: one server).",
            one(u8::from(c.readable).to_string()),
        );
        if c.readable {
            metric(
                "cluster_servers",
                "gauge",
                "The cluster's servers: apiservers that announce themselves and live irsa-agents.",
                one(c.servers.to_string()),
            );
            metric(
                "cluster_servers_without_agent",
                "gauge",
                "Apiservers with no live irsa-agent: each holds every cluster-wide step.",
                one(c.servers_without_agent.to_string()),
            );
        }
        if !c.phases.is_empty() {
            metric(
                "cluster_server_rollout_phase",
                "gauge",
                "1 for each server's phase of the issuer rollout (before, accepting, signing, unknown); one sample per server.",
                c.phases
                    .iter()
                    .map(|(node, phase)| {
                        (
                            format!("{{node=\"{}\",phase=\"{}\"}}", label(node), label(phase)),
                            "1".to_string(),
                        )
                    })
                    .collect(),
            );
        }
    }
    exposition.finish()
}

fn one_labelled(labels: String, value: String) -> Vec<(String, String)> {
    vec![(labels, value)]
}

/// Writes the textfile (atomically; nothing when the bytes are equal). The directory must
/// exist: it belongs to node-exporter.
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<WriteOutcome> {
    fs::write_atomic(path, text.as_bytes(), NewFile::PUBLIC)
}

/// Connections served at once; any more are closed as soon as they are accepted, so a flood
/// of idle connections from a local user holds at most this many file descriptors (1,100 of
/// them once exhausted the daemon's, and a key change made meanwhile was not published).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers, the first or the next one on a
/// kept-alive connection (an idle connection is closed after this).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest life of one connection, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's read buffer cap per connection (its minimum); a scrape request is a few hundred bytes.
const MAX_BUF_SIZE: usize = 8192;
/// How often a refused connection is logged at most.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves the latest rendering on `addr` (loopback only, checked by the configuration):
/// `GET /metrics` answers 200, anything else 404. Runs until the task is aborted.
///
/// Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once), each
/// given [`HEADER_READ_TIMEOUT`] per request head and [`CONNECTION_TIMEOUT`] in all. It runs on
/// the daemon's one thread but only ever waits; accepting yields to the main loop after every
/// refused connection, so a flood never starves the daemon's own work.
pub async fn serve(
    listener: tokio::net::TcpListener,
    latest: tokio::sync::watch::Receiver<String>,
) {
    serve_with(listener, latest, Limits::default()).await;
}

/// The bounds of the endpoint (the constants above; smaller in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub header_read_timeout: Duration,
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            connection_timeout: CONNECTION_TIMEOUT,
        }
    }
}

/// [`serve`] with other limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    latest: tokio::sync::watch::Receiver<String>,
    limits: Limits,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut refused: u64 = 0;
    let mut refused_logged: Option<Instant> = None;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                log::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refused += 1;
            if refused_logged.is_none_or(|at| at.elapsed() >= REFUSED_LOG_EVERY) {
                log::warn!(
                    "metrics endpoint: {refused} connection(s) closed at once: {} are open already (idle ones are closed after {}s)",
                    limits.connections,
                    limits.header_read_timeout.as_secs()
                );
                refused = 0;
                refused_logged = Some(Instant::now());
            }
            tokio::task::yield_now().await;
            continue;
        };
        let latest = latest.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let body = latest.borrow().clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                };
                response.map_err(std::io::Error::other)
            }
        });
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_BUF_SIZE)
                .max_headers(32)
                .serve_connection(io, service);
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics endpoint: {e}"),
                Err(_) => log::debug!(
                    "metrics endpoint: connection closed after {:?}",
                    limits.connection_timeout
                ),
            }
        });
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections over the limit are closed at once; an idle connection is closed after the
    /// header timeout, a slow one after the connection timeout; a freed slot serves again.
    #[test]
    fn connections_are_limited_and_timed_out() {
        use std::io::{Read as _, Write as _};
        use std::net::TcpStream;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(bind("127.0.0.1:0".parse().expect("addr")))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_tx, rx) = tokio::sync::watch::channel("irsa_agent_up 1\n".to_string());
        let limits = Limits {
            connections: 2,
            header_read_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(2),
        };
        std::thread::spawn(move || runtime.block_on(serve_with(listener, rx, limits)));

        let closed_within = |stream: &mut TcpStream, limit: Duration| {
            stream.set_read_timeout(Some(limit)).expect("timeout");
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                    Err(_) => return false,
                }
            }
        };
        let started = Instant::now();
        let mut idle1 = TcpStream::connect(addr).expect("connect");
        let mut idle2 = TcpStream::connect(addr).expect("connect");
        std::thread::sleep(Duration::from_millis(50));
        // The third is over the limit: closed at once (long before the header timeout).
        let mut third = TcpStream::connect(addr).expect("connect");
        assert!(closed_within(&mut third, Duration::from_millis(200)));
        // The idle ones are closed after the header timeout.
        assert!(closed_within(&mut idle1, Duration::from_secs(2)));
        assert!(closed_within(&mut idle2, Duration::from_secs(2)));
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A slot is free again: a scrape is served.
        let mut scrape = TcpStream::connect(addr).expect("connect");
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut response = String::new();
        scrape.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("irsa_agent_up 1\n"), "{response}");
        // A client sending its request head slowly is cut off: the whole head must arrive
        // within the header timeout.
        let mut slow = TcpStream::connect(addr).expect("connect");
        let slow_started = Instant::now();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").expect("write");
        let mut cut = false;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(100));
            if slow.write_all(b"X-A: b\r\n").is_err() {
                cut = true;
                break;
            }
        }
        assert!(cut || closed_within(&mut slow, Duration::from_secs(1)));
        assert!(slow_started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn renders_stable_names_and_escaped_labels() {
        let m = Metrics {
            start_timestamp_seconds: 100,
            converges_total: 3,
            last_publish_success_timestamp_seconds: Some(200),
            publish_failures_total: 1,
            keys_published: 2,
            apiserver_restarts_total: 1,
            drift_found_total: 1,
            in_sync: true,
            targets: vec![TargetMetric {
                target: "directory /srv/\"oidc\"".into(),
                up: true,
                last_success_timestamp_seconds: Some(200),
            }],
            ..Default::default()
        };
        let text = render(&m, Some("https://oidc.example.com"));
        for line in [
            "irsa_agent_last_publish_success_timestamp_seconds 200",
            "irsa_agent_publish_failures_total 1",
            "irsa_agent_keys_published 2",
            "irsa_agent_apiserver_restarts_total 1",
            "irsa_agent_drift_found_total 1",
            "irsa_agent_in_sync 1",
            "# TYPE irsa_agent_publish_failures_total counter",
            "irsa_agent_target_up{target=\"directory /srv/\\\"oidc\\\"\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Every sample line is `name{labels} value` with a number.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "{l}");
            assert!(l.starts_with("irsa_agent_"), "{l}");
        }
    }

    #[test]
    fn the_cluster_is_one_sample_per_server() {
        use crate::cluster::{Facts, plan};
        use crate::membership::{Member, Report, View};
        let member = |node: &str, issuers: &[&str]| Member {
            node: node.into(),
            live: true,
            report: Some(Report {
                issuers: issuers.iter().map(|s| s.to_string()).collect(),
                ..Report::default()
            }),
        };
        let facts = Facts {
            view: View {
                agents: vec![member("a", &["new", "old"]), member("b", &["old", "new"])],
                apiservers: vec!["a".into(), "b".into(), "c".into()],
            },
            restart: None,
        };
        let cluster = crate::cluster::Cluster::Servers(Box::new(plan(&facts, "new", "a", 0, None)));
        let m = Metrics {
            cluster: Some(ClusterMetric::of(&cluster)),
            ..Default::default()
        };
        let text = render(&m, None);
        for line in [
            "irsa_agent_cluster_readable 1",
            "irsa_agent_cluster_servers 3",
            "irsa_agent_cluster_servers_without_agent 1",
            "irsa_agent_cluster_server_rollout_phase{node=\"a\",phase=\"signing\"} 1",
            "irsa_agent_cluster_server_rollout_phase{node=\"b\",phase=\"accepting\"} 1",
            "irsa_agent_cluster_server_rollout_phase{node=\"c\",phase=\"unknown\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(text.matches("cluster_server_rollout_phase{").count(), 3);
        let unreadable = crate::cluster::Cluster::Unreadable {
            error: "refused".into(),
        };
        let text = render(
            &Metrics {
                cluster: Some(ClusterMetric::of(&unreadable)),
                ..Default::default()
            },
            None,
        );
        assert!(text.lines().any(|l| l == "irsa_agent_cluster_readable 0"));
        assert!(!text.contains("cluster_servers"), "no false 0: {text}");
    }

    #[test]
    fn missed_pods_are_a_gauge_once_looked_for() {
        let webhook = |missed: Option<Vec<String>>| Metrics {
            webhook: Some(WebhookMetric {
                url: "https://127.0.0.1:9443/mutate".into(),
                pods_missed: missed,
                ..Default::default()
            }),
            ..Default::default()
        };
        // Not looked yet (cache loading, API unreachable): no sample rather than a false 0.
        let text = render(&webhook(None), None);
        assert!(!text.contains("webhook_pods_missed"), "{text}");
        let text = render(&webhook(Some(vec!["prod/a".into(), "prod/b".into()])), None);
        assert!(
            text.lines()
                .any(|l| l == "irsa_agent_webhook_pods_missed 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE irsa_agent_webhook_pods_missed gauge"));
    }
}
