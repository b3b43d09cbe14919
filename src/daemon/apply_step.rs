//! The apiserver half of a converge, behind a trait: the real one (`cli/run.rs`) runs the same
//! plan and executor as `irsa-agent apply` (backups, atomic writes, restart, wait for the new
//! issuer, rollback); tests of the loop can replace it.

use std::time::Duration;

use crate::apiserver::Observed;
use crate::config::Settings;
use crate::keys::PublicKey;

/// Why the apiserver step failed, which decides what the daemon does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth retrying soon (a file changed while planning, the state file unreadable, the
    /// apiserver unreachable): retried with backoff.
    Transient,
    /// The host needs a person (a key file the apiserver would refuse, settings on the unit's
    /// command line): retried with backoff, logged each time it changes.
    Refused,
    /// A change was made, the apiserver did not come back with it, and it was rolled back.
    /// Retrying would restart the apiserver again and again: held until the inputs change
    /// (the apiserver configuration, key files or the agent configuration) or a reload.
    RolledBack,
}

/// What the apiserver step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Files were written or the apiserver restarted.
    pub changed: bool,
    /// One line for the log and `status`.
    pub summary: String,
    /// The change irsa-agent made earlier had been undone (e.g. `kubeadm upgrade` regenerated
    /// the manifest): drift, restored now.
    pub lost_change: Option<String>,
    /// The files are written but the running apiserver has not been restarted with them yet
    /// (`--no-restart`).
    pub restart_pending: bool,
    /// `run.apply-issuer: false`: the apiserver's flags differ from the configuration, and the
    /// daemon leaves the change to `irsa-agent apply` (nothing was written).
    pub apply_pending: bool,
    /// Look again this soon, though nothing changes (the old issuers come due for retirement
    /// then): the next converge comes at the latest then.
    pub look_again: Option<Duration>,
}

/// The apiserver step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyFailed {
    pub kind: FailureKind,
    pub message: String,
}

/// The result of one apiserver step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub outcome: Result<Applied, ApplyFailed>,
    /// Apiserver restarts done (including those of a rollback).
    pub restarts: u32,
    /// Plan warnings (logged when they change).
    pub warnings: Vec<String>,
}

impl ApplyReport {
    pub fn failed(kind: FailureKind, message: impl Into<String>) -> Self {
        ApplyReport {
            outcome: Err(ApplyFailed {
                kind,
                message: message.into(),
            }),
            restarts: 0,
            warnings: Vec::new(),
        }
    }
}

/// Brings the apiserver's flags in line with the configuration. Blocking (it may restart the
/// apiserver and wait minutes for it): the daemon runs it on a blocking thread.
pub trait ApplyStep: Send {
    /// A converge begins: what the step read of the cluster in the last one is stale (it reads
    /// the cluster once per converge, for all the calls below).
    fn begin(&mut self) {}

    fn apply(&mut self, settings: &Settings) -> ApplyReport;

    /// The keys the running apiserver serves at `/openid/v1/jwks` now: it verifies tokens
    /// with them and signs with one of them. `None` when it cannot be asked. After a key file
    /// was replaced and before the apiserver restarts, these are keys the files no longer
    /// have, and the published JWKS must keep them. Blocking.
    fn live_keys(&mut self, _observed: &Observed) -> Option<Vec<PublicKey>> {
        None
    }

    /// The keys the other servers' apiservers verify with, by node, as their live agents'
    /// Leases report them ([`crate::membership::peer_keys`]); empty on one server or when the
    /// cluster cannot be asked. Blocking.
    fn peer_keys(&mut self, _observed: &Observed) -> Vec<(String, PublicKey)> {
        Vec::new()
    }

    /// The cluster as the Leases show it now, for the configured issuer (metrics). `None`
    /// when this step has no cluster to ask. Blocking.
    fn cluster(&mut self, _settings: &Settings) -> Option<crate::cluster::Cluster> {
        None
    }
}
