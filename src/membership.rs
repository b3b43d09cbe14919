//! Membership through the cluster's own API: the first part of several servers acting as one.
//!
//! Each agent keeps a `coordination.k8s.io/v1` Lease named `irsa-agent-<node>` in `kube-system`,
//! renewed while it runs. Its annotation `irsa-agent.io/report` is a small JSON [`Report`]:
//! what this server's apiserver accepts and signs with, the key ids it serves, the agent's phase
//! of the issuer rollout and of the rotation, and its version. Writes carry the Lease's
//! `resourceVersion`, so two writers never overwrite each other silently: a conflict is read
//! again and retried once.
//!
//! The servers that must take part are the cluster's apiservers, as they announce themselves:
//! kube-apiserver keeps an identity Lease in `kube-system`, labelled
//! `apiserver.kubernetes.io/identity=kube-apiserver` and `kubernetes.io/hostname=<host>`. An
//! apiserver with no live agent Lease is named by [`View::without_agent`]; it holds every
//! cluster-wide step, and is never a reason to reject a token.
//!
//! Liveness is decided by [`live`], a pure function of the Lease and `now`.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, PostParams};
use serde::{Deserialize, Serialize};

/// Where the Leases live.
pub const NAMESPACE: &str = "kube-system";
/// The agents' Lease names: `irsa-agent-<node>`.
pub const PREFIX: &str = "irsa-agent-";
/// The annotation holding the [`Report`].
pub const REPORT: &str = "irsa-agent.io/report";
/// The label kube-apiserver puts on its identity Leases.
pub const APISERVER_IDENTITY: &str = "apiserver.kubernetes.io/identity=kube-apiserver";
/// The label naming the apiserver's host on its identity Lease.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What one agent says about its server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// irsa-agent's version.
    pub version: String,
    /// The issuers the apiserver accepts, signing issuer first.
    pub issuers: Vec<String>,
    /// The key ids the apiserver serves (what it verifies with).
    pub kids: Vec<String>,
    /// The kid it signs with, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_kid: Option<String>,
    /// The agent's phase of the issuer rollout (`accepting`, `signing`, `finalized`, ...).
    #[serde(default)]
    pub rollout: String,
    /// The agent's phase of the key rotation (`idle`, `staged`, ...).
    #[serde(default)]
    pub rotation: String,
}

/// Why the cluster could not be asked or told.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Lease {NAMESPACE}/{name}: {cause}")]
    Lease { name: String, cause: String },
    #[error("listing the Leases in {NAMESPACE}: {0}")]
    List(String),
}

/// One agent as its Lease shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    /// The report, when the annotation is there and readable.
    pub report: Option<Report>,
    /// Renewed within its lease duration.
    pub live: bool,
}

/// The cluster as the Leases show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every agent Lease, live or not, by node name.
    pub agents: Vec<Member>,
    /// The hosts of the apiservers that announce themselves, sorted.
    pub apiservers: Vec<String>,
}

impl View {
    /// The apiservers (by host) with no live agent: each holds every cluster-wide step.
    pub fn without_agent(&self) -> Vec<String> {
        self.apiservers
            .iter()
            .filter(|host| !self.agents.iter().any(|a| a.live && &a.node == *host))
            .cloned()
            .collect()
    }
}

/// The Lease name of `node`'s agent.
pub fn lease_name(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// A Lease is live while `renewTime + leaseDurationSeconds` has not passed at `now` (Unix
/// seconds). A Lease without either is not live.
pub fn live(lease: &Lease, now: i64) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(duration)) => renewed.0.as_second() + i64::from(duration) >= now,
        _ => false,
    }
}

fn micro(now: i64) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_second(now)
        .ok()
        .map(MicroTime)
}

fn desired(node: &str, report: &Report, duration: i32, now: i64, old: Option<&Lease>) -> Lease {
    let mut annotations = old
        .and_then(|l| l.metadata.annotations.clone())
        .unwrap_or_default();
    annotations.insert(
        REPORT.to_string(),
        serde_json::to_string(report).unwrap_or_default(),
    );
    let old_spec = old.and_then(|l| l.spec.clone()).unwrap_or_default();
    let holder = Some(node.to_string());
    let (acquire_time, transitions) = if old_spec.holder_identity == holder {
        (
            old_spec.acquire_time.clone().or_else(|| micro(now)),
            old_spec.lease_transitions,
        )
    } else {
        (
            micro(now),
            Some(old_spec.lease_transitions.unwrap_or(0) + i32::from(old.is_some())),
        )
    };
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(node)),
            namespace: Some(NAMESPACE.to_string()),
            resource_version: old.and_then(|l| l.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "irsa-agent".to_string(),
            )])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder,
            lease_duration_seconds: Some(duration),
            acquire_time,
            renew_time: micro(now),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        }),
    }
}

/// Creates or renews `node`'s Lease with `report`, valid for `duration` seconds from `now`. A
/// write that lost a race (HTTP 409) is read again and retried once.
pub async fn announce(
    client: &kube::Client,
    node: &str,
    report: &Report,
    duration: i32,
    now: i64,
) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let name = lease_name(node);
    let fail = |e: kube::Error| Error::Lease {
        name: name.clone(),
        cause: e.to_string(),
    };
    for attempt in 0..2 {
        let old = leases.get_opt(&name).await.map_err(fail)?;
        let lease = desired(node, report, duration, now, old.as_ref());
        let written = match old {
            None => leases.create(&PostParams::default(), &lease).await,
            Some(_) => leases.replace(&name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 && attempt == 0 => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Err(Error::Lease {
        name,
        cause: "conflicting writes twice in a row".to_string(),
    })
}

/// Reads every agent Lease and every apiserver identity Lease.
pub async fn view(client: &kube::Client, now: i64) -> Result<View, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let list = |e: kube::Error| Error::List(e.to_string());
    let mut agents: Vec<Member> = leases
        .list(&ListParams::default())
        .await
        .map_err(list)?
        .items
        .iter()
        .filter_map(|lease| {
            let node = lease.metadata.name.as_deref()?.strip_prefix(PREFIX)?;
            let report = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REPORT))
                .and_then(|text| serde_json::from_str(text).ok());
            Some(Member {
                node: node.to_string(),
                report,
                live: live(lease, now),
            })
        })
        .collect();
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    let mut apiservers: Vec<String> = leases
        .list(&ListParams::default().labels(APISERVER_IDENTITY))
        .await
        .map_err(list)?
        .items
        .iter()
        .filter(|lease| live(lease, now))
        .filter_map(|lease| lease.metadata.labels.as_ref()?.get(HOSTNAME_LABEL).cloned())
        .collect();
    apiservers.sort();
    apiservers.dedup();
    Ok(View { agents, apiservers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed: Option<i64>, duration: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                renew_time: renewed.and_then(micro),
                lease_duration_seconds: duration,
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_lease_is_live_until_its_duration_has_passed() {
        assert!(live(&lease(Some(1000), Some(40)), 1040));
        assert!(!live(&lease(Some(1000), Some(40)), 1041));
        assert!(!live(&lease(None, Some(40)), 1000));
        assert!(!live(&lease(Some(1000), None), 1000));
        assert!(!live(&Lease::default(), 0));
    }

    #[test]
    fn an_apiserver_without_a_live_agent_is_named() {
        let member = |node: &str, live| Member {
            node: node.into(),
            report: None,
            live,
        };
        let view = View {
            agents: vec![member("cp1", true), member("cp2", false)],
            apiservers: vec!["cp1".into(), "cp2".into(), "cp3".into()],
        };
        assert_eq!(view.without_agent(), vec!["cp2", "cp3"]);
    }

    #[test]
    fn a_renewal_keeps_the_acquire_time_and_a_takeover_counts_a_transition() {
        let report = Report::default();
        let first = desired("cp1", &report, 40, 1000, None);
        let spec = first.spec.clone().unwrap_or_default();
        assert_eq!(spec.acquire_time, micro(1000));
        assert_eq!(spec.lease_transitions, Some(0));
        let renewed = desired("cp1", &report, 40, 1030, Some(&first));
        let spec = renewed.spec.clone().unwrap_or_default();
        assert_eq!(spec.acquire_time, micro(1000));
        assert_eq!(spec.renew_time, micro(1030));
        assert_eq!(spec.lease_transitions, Some(0));
        let taken = desired("cp2", &report, 40, 1100, Some(&renewed));
        let spec = taken.spec.unwrap_or_default();
        assert_eq!(spec.acquire_time, micro(1100));
        assert_eq!(spec.lease_transitions, Some(1));
    }
}
