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
//!
//! ## No restart while another apiserver is down
//!
//! An agent restarts its own apiserver only while every other apiserver of the cluster serves
//! ([`peers_down`], checked by the holder of the restart Lease just before it restarts, in
//! [`crate::apiserver::change`]): with k3s's embedded etcd on three servers, one apiserver down
//! plus one restarting is a lost etcd quorum, and for the clients it is two apiservers down at
//! once. Measured on three real kube-apiservers v1.36.2 (tests/real_apiserver_ha.rs):
//!
//! - a stopped apiserver (SIGTERM, as kubelet and systemd stop it) deletes its own identity
//!   Lease and leaves the `default/kubernetes` Endpoints within 0.3 s of its `/readyz` failing;
//! - a hung one (SIGSTOP) keeps its identity Lease (an hour) and leaves the Endpoints after
//!   about 19 s (its entry's 15 s TTL, then a peer's next reconcile);
//! - a restarted one is back in both in the same 0.3 s as its `/readyz`.
//!
//! So the apiservers that should be there are those that announce themselves (identity Leases,
//! [`apiservers`]) and those of every agent Lease, live or expired (an agent whose apiserver is
//! down cannot renew its Lease through it, and a server powered off renews nothing: a server
//! stays expected until its agent's Lease is deleted); the ones that serve are those with an
//! identity Lease whose address is in the Endpoints ([`endpoints`]). The identity Lease names its apiserver's
//! address (annotation `kubernetes.io/peer-advertise-address`), so the one missing is named; for
//! apiservers that do not name it (before 1.28) the Endpoints are counted. The Endpoints are kept
//! by the apiservers themselves (the default `lease` endpoint reconciler) and are what the
//! cluster's own clients are sent to; probing every peer's `/readyz` instead would need every
//! peer's serving certificate to name the address it is reached at, and would still need the
//! list of peers. An empty or missing Endpoints object means no apiserver keeps it
//! (`--endpoint-reconciler-type=none`: a serving apiserver lists itself as soon as it is ready):
//! then only the missing identity Leases are checked. A server removed from the cluster holds
//! restarts until its agent's Lease is deleted (the wait names the command).

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Endpoints;
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

/// The annotation in which kube-apiserver (1.28 and later) names its address
/// (`10.0.0.1:6443`, `[fd00::1]:6443`) on its identity Lease.
pub const PEER_ADDRESS: &str = "kubernetes.io/peer-advertise-address";

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
    /// When this server's apiserver was first seen signing with its signing issuer (the first
    /// of `issuers`), Unix seconds, as its agent recorded it: tokens with an older issuer may
    /// have been minted here until then. The cluster's old issuers are retired only the longest
    /// token lifetime after the last server switched ([`crate::rollout::retire_hold`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<u64>,
    /// The public keys the apiserver verifies with, as JWKs: the published JWKS is the union
    /// of every live server's keys ([`peer_keys`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwks: Vec<serde_json::Value>,
}

impl Report {
    /// What this server's apiserver accepts, verifies and signs with, by its files (what it
    /// runs with once a change is verified), with the agent's phases: of the rollout of
    /// `issuer`, and of the rotation (`rotation`: its phase name, empty when none ever ran), and
    /// since when it signs with its signing issuer (`root`'s state file).
    pub fn of(
        root: &crate::host::HostRoot,
        observed: &crate::apiserver::Observed,
        issuer: &str,
        rotation: &str,
    ) -> Report {
        let issuers = observed.flags.issuers.clone();
        let switched_at = crate::state::State::load(root)
            .ok()
            .and_then(|s| s.issuer)
            .filter(|i| issuers.first() == Some(&i.issuer))
            .and_then(|i| i.switched_at);
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
            switched_at,
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

/// The kids of [`peer_keys`], sorted, each once: what a change in the other servers' keys is
/// told by (a follower republishes the union when it changes).
pub fn peer_kids(view: &View, me: &str) -> Vec<String> {
    let mut kids: Vec<String> = peer_keys(view, me).iter().map(|(_, k)| k.kid()).collect();
    kids.sort();
    kids.dedup();
    kids
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
    #[error("reading the Endpoints default/kubernetes: {cause}")]
    Endpoints {
        cause: String,
        /// The HTTP status the apiserver answered, when it answered.
        code: Option<u16>,
    },
}

fn code_of(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
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
            Error::Lease { code, .. }
            | Error::List { code, .. }
            | Error::Endpoints { code, .. } => code.is_some_and(|c| !(500..600).contains(&c)),
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
    let name = lease_name(node);
    let old = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get_opt(&name)
        .await
        .map_err(|e| lease_error(&name, e))?;
    renew(client, node, report, duration, now, old)
        .await
        .map(|_| ())
}

/// [`announce`] over `old`, `node`'s Lease as last read (by [`list`]: no read of its own); a
/// write that lost a race (HTTP 409: written since, or created meanwhile) is read again and
/// retried once. Returns the Lease as written.
pub async fn renew(
    client: &kube::Client,
    node: &str,
    report: &Report,
    duration: i32,
    now: i64,
    mut old: Option<Lease>,
) -> Result<Lease, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let name = lease_name(node);
    let fail = |e: kube::Error| lease_error(&name, e);
    for attempt in 0..2 {
        if attempt > 0 {
            old = leases.get_opt(&name).await.map_err(fail)?;
        }
        let lease = desired(node, report, duration, now, old.as_ref());
        let written = match old {
            None => leases.create(&PostParams::default(), &lease).await,
            Some(_) => leases.replace(&name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(lease) => return Ok(lease),
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

/// An apiserver as its identity Lease announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apiserver {
    /// Its host (`kubernetes.io/hostname`).
    pub host: String,
    /// The IP address it advertises ([`PEER_ADDRESS`], without the port), when named.
    pub address: Option<String>,
}

fn list_error(e: kube::Error) -> Error {
    Error::List {
        code: code_of(&e),
        cause: e.to_string(),
    }
}

/// The IP of `host:port` or `[ip6]:port` (or of a bare IP).
fn ip_of(address: &str) -> String {
    let address = address.trim();
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match address.rsplit_once(':') {
        // One colon: `ip:port`; more: a bare IPv6 address.
        Some((ip, _)) if !ip.contains(':') => ip.to_string(),
        _ => address.to_string(),
    }
}

/// The apiservers that announce themselves: a live identity Lease each, by host (sorted, one
/// per host). One list of the Leases ([`list`]); [`apiservers_of`] when they were listed.
pub async fn apiservers(client: &kube::Client, now: i64) -> Result<Vec<Apiserver>, Error> {
    Ok(apiservers_of(&list(client).await?, now))
}

/// Whether `lease` is an apiserver's identity Lease ([`APISERVER_IDENTITY`]).
fn is_identity(lease: &Lease) -> bool {
    let (key, value) = APISERVER_IDENTITY
        .split_once('=')
        .unwrap_or((APISERVER_IDENTITY, ""));
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .is_some_and(|v| v == value)
}

/// [`apiservers`] from Leases already listed. Pure.
pub fn apiservers_of(leases: &[Lease], now: i64) -> Vec<Apiserver> {
    let mut out: Vec<Apiserver> = leases
        .iter()
        .filter(|lease| is_identity(lease) && live(lease, now))
        .filter_map(|lease| {
            let host = lease.metadata.labels.as_ref()?.get(HOSTNAME_LABEL)?.clone();
            let address = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PEER_ADDRESS))
                .map(|a| ip_of(a));
            Some(Apiserver { host, address })
        })
        .collect();
    // One per host (a host announced twice: the Lease naming an address).
    out.sort_by(|a, b| a.host.cmp(&b.host).then(b.address.cmp(&a.address)));
    out.dedup_by(|a, b| a.host == b.host);
    out
}

/// Every Lease in [`NAMESPACE`], with one request: the agents' Leases, the apiservers' identity
/// Leases, the restart and rotation Leases. Whoever needs several of them reads them once
/// ([`view_of`], [`apiservers_of`], [`restart_of`]).
pub async fn list(client: &kube::Client) -> Result<Vec<Lease>, Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(leases
        .list(&ListParams::default())
        .await
        .map_err(list_error)?
        .items)
}

/// The restart Lease's holder among Leases already listed ([`restart_holder`]).
pub fn restart_of(leases: &[Lease]) -> Option<RestartHolder> {
    leases
        .iter()
        .find(|l| l.metadata.name.as_deref() == Some(RESTART))
        .and_then(holder_of)
}

/// The addresses of the `default/kubernetes` Endpoints: the apiservers serving now (empty when
/// the object does not exist).
pub async fn endpoints(client: &kube::Client) -> Result<Vec<String>, Error> {
    let api: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let found = api
        .get_opt("kubernetes")
        .await
        .map_err(|e| Error::Endpoints {
            code: code_of(&e),
            cause: e.to_string(),
        })?;
    let mut out: Vec<String> = found
        .and_then(|e| e.subsets)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .map(|a| a.ip)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether every other apiserver serves, for [`peers_down`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// No other apiserver, or every other one is in the Endpoints.
    Up,
    /// These are down (a host, or `one of a, b` when the apiservers do not name their
    /// addresses): no restart now.
    Down(Vec<String>),
    /// Every expected apiserver announces itself, but the Endpoints list no address at all: no
    /// apiserver keeps them, nothing to compare with.
    Unknown,
}

impl Peers {
    /// The transient failure to report when down.
    pub fn waiting(&self) -> Option<String> {
        let Peers::Down(down) = self else {
            return None;
        };
        let whose = match down.as_slice() {
            [one] => format!("{one}'s apiserver"),
            _ => format!("the apiservers of {}", down.join(" and ")),
        };
        let leases = down
            .iter()
            .filter(|d| !d.starts_with("one of "))
            .map(|d| lease_name(d))
            .collect::<Vec<_>>();
        let removed = if leases.is_empty() {
            String::new()
        } else {
            format!(
                "; if it was removed from the cluster for good: kubectl -n {NAMESPACE} delete lease {}",
                leases.join(" ")
            )
        };
        Some(format!(
            "waiting for {whose} to come back before restarting this one (an apiserver down plus one restarting is two down at once, and with k3s's embedded etcd on three servers a lost quorum){removed}"
        ))
    }
}

/// Which apiservers other than `node`'s are down. Pure. `apiservers`: those that announce
/// themselves ([`apiservers`]); `agents`: the nodes of every agent Lease, live or expired (each
/// stands for an apiserver that should be there, until its Lease is deleted); `endpoints`: the
/// IPs of the `kubernetes` Endpoints.
///
/// Down: an agent's node (its Lease live or expired) with no identity Lease (its apiserver
/// stopped: it deletes its Lease), and an apiserver that names its address when that address is
/// not listed. For those that do not name it (kube-apiserver before 1.28), the count decides:
/// the Endpoints must list at least as many addresses, besides the named ones, as there are such
/// apiservers.
pub fn peers_down(
    apiservers: &[Apiserver],
    agents: &[String],
    endpoints: &[String],
    node: &str,
) -> Peers {
    let mut down: Vec<String> = agents
        .iter()
        .filter(|a| *a != node && !apiservers.iter().any(|s| &s.host == *a))
        .cloned()
        .collect();
    if !apiservers.iter().any(|a| a.host != node) {
        return match down.is_empty() {
            true => Peers::Up,
            false => Peers::Down(down),
        };
    }
    if endpoints.is_empty() {
        return match down.is_empty() {
            true => Peers::Unknown,
            false => Peers::Down(down),
        };
    }
    down.extend(
        apiservers
            .iter()
            .filter(|a| a.host != node)
            .filter(|a| a.address.as_ref().is_some_and(|ip| !endpoints.contains(ip)))
            .map(|a| a.host.clone()),
    );
    let unnamed: Vec<&Apiserver> = apiservers.iter().filter(|a| a.address.is_none()).collect();
    let others_unnamed: Vec<String> = unnamed
        .iter()
        .filter(|a| a.host != node)
        .map(|a| a.host.clone())
        .collect();
    if !others_unnamed.is_empty() {
        let unclaimed = endpoints
            .iter()
            .filter(|ip| !apiservers.iter().any(|a| a.address.as_ref() == Some(*ip)))
            .count();
        if unclaimed < unnamed.len() {
            down.push(match others_unnamed.as_slice() {
                [one] => one.clone(),
                _ => format!("one of {}", others_unnamed.join(", ")),
            });
        }
    }
    down.sort();
    down.dedup();
    if down.is_empty() {
        Peers::Up
    } else {
        Peers::Down(down)
    }
}

/// Reads every agent Lease and every apiserver identity Lease (one list, [`list`]).
pub async fn view(client: &kube::Client, now: i64) -> Result<View, Error> {
    Ok(view_of(&list(client).await?, now))
}

/// [`view`] from Leases already listed. Pure.
pub fn view_of(leases: &[Lease], now: i64) -> View {
    let mut agents: Vec<Member> = leases
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
    let apiservers = apiservers_of(leases, now)
        .into_iter()
        .map(|a| a.host)
        .collect();
    View { agents, apiservers }
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
    fn one_list_gives_the_agents_the_apiservers_and_the_restart_holder() {
        let named = |name: &str, labels: &[(&str, &str)], renewed: i64| {
            let mut l = lease(Some(renewed), Some(60));
            l.metadata.name = Some(name.into());
            l.metadata.labels = Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            l
        };
        let identity = [
            ("apiserver.kubernetes.io/identity", "kube-apiserver"),
            (HOSTNAME_LABEL, "cp1"),
        ];
        let mut restart = holder_lease(RESTART, "cp2", 60, 1000, None);
        restart.metadata.labels = None;
        let leases = vec![
            named("apiserver-abc", &identity, 1000),
            // Another component's Lease with a hostname label: not an apiserver.
            named(
                "kube-controller-manager",
                &[
                    (HOSTNAME_LABEL, "cp9"),
                    ("apiserver.kubernetes.io/identity", "x"),
                ],
                1000,
            ),
            // An identity Lease not renewed: that apiserver is gone.
            named(
                "apiserver-old",
                &[identity[0], (HOSTNAME_LABEL, "cp3")],
                500,
            ),
            named("irsa-agent-cp1", &[], 1000),
            restart,
        ];
        let view = view_of(&leases, 1030);
        assert_eq!(view.apiservers, vec!["cp1"]);
        let agents: Vec<&str> = view.agents.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(agents, vec!["cp1"], "the restart Lease is no agent");
        assert_eq!(
            restart_of(&leases).map(|h| h.holder),
            Some("cp2".to_string())
        );
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

    fn apiserver(host: &str, address: Option<&str>) -> Apiserver {
        Apiserver {
            host: host.into(),
            address: address.map(str::to_string),
        }
    }

    fn ips(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_apiserver_missing_from_the_endpoints_is_down_and_named() {
        let three = [
            apiserver("cp1", Some("10.0.0.1")),
            apiserver("cp2", Some("10.0.0.2")),
            apiserver("cp3", Some("10.0.0.3")),
        ];
        let all = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(peers_down(&three, &[], &all, "cp1"), Peers::Up);
        let down = peers_down(&three, &[], &ips(&["10.0.0.1", "10.0.0.3"]), "cp1");
        assert_eq!(down, Peers::Down(vec!["cp2".into()]));
        let why = down.waiting().unwrap_or_default();
        assert!(
            why.starts_with("waiting for cp2's apiserver to come back before restarting this one"),
            "{why}"
        );
        // Its own absence is not a reason to wait (it is the one to restart or repair).
        assert_eq!(
            peers_down(&three, &[], &ips(&["10.0.0.2", "10.0.0.3"]), "cp1"),
            Peers::Up
        );
        // Two down: both named.
        let down = peers_down(&three, &[], &ips(&["10.0.0.1"]), "cp1");
        assert_eq!(down, Peers::Down(vec!["cp2".into(), "cp3".into()]));
        assert!(
            down.waiting()
                .unwrap_or_default()
                .contains("the apiservers of cp2 and cp3 to come back"),
            "{down:?}"
        );
        // One server: nobody to wait for, whatever the Endpoints say.
        assert_eq!(
            peers_down(&three[..1], &[], &ips(&["10.9.9.9"]), "cp1"),
            Peers::Up
        );
        assert_eq!(peers_down(&[], &[], &[], "cp1"), Peers::Up);
        // No address at all: no apiserver keeps the Endpoints; nothing to compare.
        assert_eq!(peers_down(&three, &[], &[], "cp1"), Peers::Unknown);
        assert_eq!(Peers::Unknown.waiting(), None);
    }

    #[test]
    fn a_stopped_apiserver_deletes_its_identity_lease_and_its_live_agent_still_counts() {
        let two = [
            apiserver("cp1", Some("10.0.0.1")),
            apiserver("cp2", Some("10.0.0.2")),
        ];
        let agents = ips(&["cp1", "cp2", "cp3"]);
        let listed = ips(&["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            peers_down(&two, &agents, &listed, "cp1"),
            Peers::Down(vec!["cp3".into()])
        );
        // Also with Endpoints nobody keeps, and with no other apiserver announced at all.
        assert_eq!(
            peers_down(&two, &agents, &[], "cp1"),
            Peers::Down(vec!["cp3".into()])
        );
        assert_eq!(
            peers_down(&two[..1], &ips(&["cp1", "cp3"]), &listed, "cp1"),
            Peers::Down(vec!["cp3".into()])
        );
        // Its own agent without an identity Lease is not a peer.
        assert_eq!(
            peers_down(&two[1..], &ips(&["cp1", "cp2"]), &listed, "cp1"),
            Peers::Up
        );
        // Agents of announced apiservers that serve: up.
        assert_eq!(
            peers_down(&two, &ips(&["cp1", "cp2"]), &listed, "cp1"),
            Peers::Up
        );
        // Stopped and hung at once: both named, once each.
        assert_eq!(
            peers_down(&two, &agents, &ips(&["10.0.0.1"]), "cp1"),
            Peers::Down(vec!["cp2".into(), "cp3".into()])
        );
    }

    #[test]
    fn apiservers_that_do_not_name_their_address_are_counted() {
        let unnamed = [
            apiserver("cp1", None),
            apiserver("cp2", None),
            apiserver("cp3", None),
        ];
        assert_eq!(
            peers_down(
                &unnamed,
                &[],
                &ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                "cp1"
            ),
            Peers::Up
        );
        assert_eq!(
            peers_down(&unnamed, &[], &ips(&["10.0.0.1", "10.0.0.3"]), "cp1"),
            Peers::Down(vec!["one of cp2, cp3".into()])
        );
        // Mixed: the named one is matched by address, the rest by count.
        let mixed = [
            apiserver("cp1", Some("10.0.0.1")),
            apiserver("cp2", None),
            apiserver("cp3", Some("10.0.0.3")),
        ];
        assert_eq!(
            peers_down(
                &mixed,
                &[],
                &ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                "cp1"
            ),
            Peers::Up
        );
        assert_eq!(
            peers_down(&mixed, &[], &ips(&["10.0.0.1", "10.0.0.3"]), "cp1"),
            Peers::Down(vec!["cp2".into()])
        );
        assert_eq!(
            peers_down(&mixed, &[], &ips(&["10.0.0.1", "10.0.0.2"]), "cp1"),
            Peers::Down(vec!["cp3".into()])
        );
    }

    #[test]
    fn the_advertised_address_loses_its_port() {
        assert_eq!(ip_of("10.250.0.3:6443"), "10.250.0.3");
        assert_eq!(ip_of("[fd00::3]:6443"), "fd00::3");
        assert_eq!(ip_of("fd00::3"), "fd00::3");
        assert_eq!(ip_of("10.250.0.3"), "10.250.0.3");
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
