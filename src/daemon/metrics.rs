//! Metrics: counters kept by the loop, rendered in the Prometheus text format, written as a
//! node-exporter textfile (atomically, through [`crate::fs`]) and/or served on a loopback
//! address (`GET /metrics`, hyper).
//!
//! Names are stable (`irsa_agent_<what>_total|_seconds|_timestamp_seconds`); counters count
//! since the daemon started (Prometheus handles the reset), except the last-success timestamp,
//! which carries over restarts through the state file.

use std::net::SocketAddr;
use std::path::Path;

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
}

/// Escapes a label value.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A Prometheus text exposition (format 0.0.4) being written: one family after another, each
/// with its HELP and TYPE lines, every name under the `irsa_agent_` prefix. The daemon's own
/// metrics and the rotation task's are written through it.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// One metric family: `kind` is `gauge` or `counter`; each sample is (`{labels}` or empty,
    /// value).
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (String, String)>,
    ) {
        self.text
            .push_str(&format!("# HELP irsa_agent_{name} {help}\n"));
        self.text
            .push_str(&format!("# TYPE irsa_agent_{name} {kind}\n"));
        for (labels, value) in samples {
            self.text
                .push_str(&format!("irsa_agent_{name}{labels} {value}\n"));
        }
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help, [(String::new(), value.to_string())]);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

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

/// Serves the latest rendering on `addr` (loopback only, checked by the configuration):
/// `GET /metrics` answers 200, anything else 404. Runs until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    latest: tokio::sync::watch::Receiver<String>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                log::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
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
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                log::debug!("metrics endpoint: {e}");
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
}
