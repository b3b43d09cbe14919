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

/// The cluster-wide restart Lease: an agent restarts its own apiserver only while it holds it.
pub const RESTART: &str = "irsa-agent-restart";

/// The rotation Lease: its holder drives the cluster's one key rotation ([`crate::rotation`]);
/// the other agents follow it.
pub const ROTATION: &str = "irsa-agent-rotation";

/// The answer to [`acquire`] (the restart Lease, the rotation Lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// This node holds the Lease until `until` (Unix seconds).
    Held { until: i64 },
    /// Another node holds it until `until`: wait (a holder that died frees it then).
    Busy { holder: String, until: i64 },
}

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
    /// The public keys the apiserver verifies with, as JWKs: the published JWKS is the union
    /// of every live server's keys ([`peer_keys`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwks: Vec<serde_json::Value>,
}

impl Report {
    /// What this server's apiserver accepts, verifies and signs with, by its files (what it
    /// runs with once a change is verified), with the agent's phases: of the rollout of
    /// `issuer`, and of the rotation (`rotation`: its phase name, empty when none ever ran).
    pub fn of(observed: &crate::apiserver::Observed, issuer: &str, rotation: &str) -> Report {
        let issuers = observed.flags.issuers.clone();
        Report {
            version: env!("CARGO_PKG_VERSION").to_string(),
            rollout: crate::rollout::phase(&issuers, issuer).to_string(),
            issuers,
            kids: observed
                .keys
                .verification
                .iter()
                .map(crate::keys::PublicKey::kid)
                .collect(),
            signing_kid: observed
                .keys
                .signing
                .as_ref()
                .map(crate::keys::PublicKey::kid),
            rotation: rotation.to_string(),
            jwks: observed
                .keys
                .verification
                .iter()
                .filter_map(|k| serde_json::from_str(&crate::keys::jwks::jwk_json(k)).ok())
                .collect(),
        }
    }

    /// The agent reports a key rotation in progress (it drives it).
    pub fn rotating(&self) -> bool {
        !matches!(self.rotation.as_str(), "" | "idle")
    }
}

/// The keys the other live agents' apiservers verify with, by node (from their reports'
/// JWKs; a JWK that is not a usable public key is skipped). The published JWKS is the union of
/// every live server's keys: a server that lacks a key another one signs or verifies with (it
/// was not restarted yet, or was restored from an old backup) must not drop it from the
/// documents relying parties fetch.
pub fn peer_keys(view: &View, me: &str) -> Vec<(String, crate::keys::PublicKey)> {
    let mut out = Vec::new();
    for agent in view.agents.iter().filter(|a| a.live && a.node != me) {
        let Some(report) = &agent.report else {
            continue;
        };
        for jwk in &report.jwks {
            if let Some(key) = crate::keys::jwk::key_from_jwk(jwk) {
                out.push((agent.node.clone(), key));
            }
        }
    }
    out
}

/// How long an agent's Lease lives after a renewal: three resyncs, so that one missed renewal
/// is not taken for a dead agent.
pub fn lease_seconds(settings: &crate::config::Settings) -> u64 {
    settings.run.resync_interval.as_secs().saturating_mul(3)
}

/// Why the cluster could not be asked or told.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Lease {NAMESPACE}/{name}: {cause}")]
    Lease {
        name: String,
        cause: String,
        /// The HTTP status the apiserver answered, when it answered.
        code: Option<u16>,
    },
    #[error("listing the Leases in {NAMESPACE}: {cause}")]
    List {
        cause: String,
        /// The HTTP status the apiserver answered, when it answered.
        code: Option<u16>,
    },
}

fn lease_error(name: &str, e: kube::Error) -> Error {
    let code = match &e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    };
    Error::Lease {
        name: name.to_string(),
        cause: e.to_string(),
        code,
    }
}

impl Error {
    /// The apiserver serves requests: it answered, with something else than a 5xx. `false`
    /// when it could not be reached or failed on its side.
    pub fn served(&self) -> bool {
        match self {
            Error::Lease { code, .. } | Error::List { code, .. } => {
                code.is_some_and(|c| !(500..600).contains(&c))
            }
        }
    }

    /// The apiserver has no Lease API to coordinate through (it answered 404 for a Lease in
    /// kube-system, which every real apiserver since 1.14 serves): a stand-in, or not a
    /// Kubernetes apiserver at all.
    pub fn no_lease_api(&self) -> bool {
        matches!(
            self,
            Error::Lease {
                code: Some(404),
                ..
            } | Error::List {
                code: Some(404),
                ..
            }
        )
    }
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
    let fail = |e: kube::Error| lease_error(&name, e);
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
        code: Some(409),
    })
}

/// Takes (or renews) the cluster-wide restart Lease for `node`: [`acquire`] of [`RESTART`].
pub async fn acquire_restart(
    client: &kube::Client,
    node: &str,
    duration: i32,
    now: i64,
) -> Result<Restart, Error> {
    acquire(client, RESTART, node, duration, now).await
}

/// Gives the restart Lease back: [`release`] of [`RESTART`].
pub async fn release_restart(client: &kube::Client, node: &str) -> Result<(), Error> {
    release(client, RESTART, node).await
}

/// Takes (or renews) the cluster-wide Lease `name` for `node`, for `duration` seconds from
/// `now`, unless another node holds a live one. The write carries the resourceVersion read, so
/// of two agents racing for a free Lease exactly one wins; the other reads it again and is told
/// who holds it.
pub async fn acquire(
    client: &kube::Client,
    name: &str,
    node: &str,
    duration: i32,
    now: i64,
) -> Result<Restart, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let fail = |e: kube::Error| lease_error(name, e);
    for _ in 0..2 {
        let old = leases.get_opt(name).await.map_err(fail)?;
        if let Some(busy) = old.as_ref().and_then(|l| held_by_other(l, node, now)) {
            return Ok(busy);
        }
        let lease = holder_lease(name, node, duration, now, old.as_ref());
        let written = match old {
            None => leases.create(&PostParams::default(), &lease).await,
            Some(_) => leases.replace(name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(_) => {
                return Ok(Restart::Held {
                    until: now + i64::from(duration),
                });
            }
            // Someone else wrote first (created it, or took it): look again.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Err(Error::Lease {
        name: name.to_string(),
        cause: "conflicting writes twice in a row".to_string(),
        code: Some(409),
    })
}

/// Gives the Lease `name` back, when `node` holds it (a Lease another node took after this
/// one's expired is left alone).
pub async fn release(client: &kube::Client, name: &str, node: &str) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let fail = |e: kube::Error| lease_error(name, e);
    let Some(mut lease) = leases.get_opt(name).await.map_err(fail)? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(node) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match leases.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        // Taken over meanwhile (it had expired): not ours to release any more.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

/// Who holds the restart Lease, as written (live or not: a holder past `until` died or
/// hangs mid-restart, and the next agent takes the Lease over).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestartHolder {
    pub holder: String,
    /// `renewTime + leaseDurationSeconds` (Unix seconds).
    pub until: i64,
}

/// Reads the restart Lease: `None` when there is none or nobody holds it (released).
pub async fn restart_holder(client: &kube::Client) -> Result<Option<RestartHolder>, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let lease = leases
        .get_opt(RESTART)
        .await
        .map_err(|e| lease_error(RESTART, e))?;
    Ok(lease.as_ref().and_then(holder_of))
}

/// The holder of a restart Lease and until when it holds it (`None` when released).
pub fn holder_of(lease: &Lease) -> Option<RestartHolder> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let until = spec.renew_time.as_ref().map_or(0, |t| t.0.as_second())
        + i64::from(spec.lease_duration_seconds.unwrap_or(0));
    Some(RestartHolder {
        holder: holder.to_string(),
        until,
    })
}

/// `Busy` when a node other than `node` holds `lease` and it is live at `now`.
pub fn held_by_other(lease: &Lease, node: &str, now: i64) -> Option<Restart> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    if holder == node || !live(lease, now) {
        return None;
    }
    let until = spec.renew_time.as_ref()?.0.as_second()
        + i64::from(spec.lease_duration_seconds.unwrap_or(0));
    Some(Restart::Busy {
        holder: holder.to_string(),
        until,
    })
}

fn holder_lease(name: &str, node: &str, duration: i32, now: i64, old: Option<&Lease>) -> Lease {
    let mut lease = desired(node, &Report::default(), duration, now, old);
    lease.metadata.name = Some(name.to_string());
    if let Some(a) = lease.metadata.annotations.as_mut() {
        a.remove(REPORT);
    }
    lease
}

/// Reads every agent Lease and every apiserver identity Lease.
pub async fn view(client: &kube::Client, now: i64) -> Result<View, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let list = |e: kube::Error| Error::List {
        code: match &e {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        cause: e.to_string(),
    };
    let mut agents: Vec<Member> = leases
        .list(&ListParams::default())
        .await
        .map_err(list)?
        .items
        .iter()
        .filter_map(|lease| {
            let name = lease.metadata.name.as_deref()?;
            if name == RESTART || name == ROTATION {
                return None;
            }
            let node = name.strip_prefix(PREFIX)?;
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
    fn the_union_takes_the_keys_of_live_peers_only() {
        use crate::rotation::keygen::generate;
        let kind = crate::config::KeyType::EcdsaP256;
        let (a, b, mine) = match (generate(kind), generate(kind), generate(kind)) {
            (Ok(a), Ok(b), Ok(m)) => (a, b, m),
            _ => panic!("cannot generate test keys"),
        };
        let jwk = |k: &crate::rotation::keygen::NewKey| {
            serde_json::from_str::<serde_json::Value>(&crate::keys::jwks::jwk_json(k.public()))
                .unwrap_or_default()
        };
        let member = |node: &str, live, jwks: Vec<serde_json::Value>| Member {
            node: node.into(),
            live,
            report: Some(Report {
                jwks,
                ..Report::default()
            }),
        };
        let view = View {
            agents: vec![
                member(
                    "cp1",
                    true,
                    vec![jwk(&a), serde_json::json!({"kty": "RSA"})],
                ),
                member("cp2", true, vec![jwk(&mine)]),
                member("cp3", false, vec![jwk(&b)]),
            ],
            apiservers: vec![],
        };
        let peers: Vec<(String, String)> = peer_keys(&view, "cp2")
            .into_iter()
            .map(|(node, key)| (node, key.kid()))
            .collect();
        // cp1's key (its unusable JWK skipped); not this node's own, not a dead agent's.
        assert_eq!(peers, vec![("cp1".to_string(), a.kid())]);
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
    fn the_restart_lease_is_busy_only_while_another_node_holds_it_live() {
        let mut lease = holder_lease(RESTART, "cp1", 60, 1000, None);
        assert_eq!(
            held_by_other(&lease, "cp2", 1030),
            Some(Restart::Busy {
                holder: "cp1".into(),
                until: 1060
            })
        );
        assert_eq!(held_by_other(&lease, "cp1", 1030), None, "its own");
        assert_eq!(
            held_by_other(&lease, "cp2", 1061),
            None,
            "a dead holder frees it"
        );
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        assert_eq!(held_by_other(&lease, "cp2", 1030), None, "released");
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
