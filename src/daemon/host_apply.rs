//! The daemon's apiserver step on the host: [`crate::apiserver::change`] (the same use case as
//! `irsa-agent apply`), summarized for the log and `status` instead of printed.
//!
//! On several servers the step follows the issuer rollout ([`crate::rollout`]): it reads the
//! cluster's membership (the agents' Leases), accepts the new issuer first, signs with it only
//! once every apiserver accepts it, and announces what its apiserver accepts after each change
//! is verified (never before: a peer must not sign on the word of a restart still pending).

use crate::apiserver::apply::{ApplyError, RestartOutcome};
use crate::apiserver::change::{self, ChangeError, Goal, RunOptions};
use crate::apiserver::{self, restart};
use crate::config::{self, Settings};
use crate::host::HostRoot;
use k8s_openapi::api::coordination::v1::Lease;

use crate::membership::{self, Report, View};
use crate::rollout::{self, Decision};
use crate::state;

use super::{Applied, ApplyFailed, ApplyReport, ApplyStep, FailureKind};

/// The apiserver step of the daemon: `apply` without the printing.
pub struct HostApply {
    pub root: HostRoot,
    pub run: RunOptions,
    /// What this converge read of the cluster; forgotten when the next one begins.
    seen: Seen,
}

/// One converge's reading of the cluster: one client, and the Leases listed once
/// ([`membership::list`]) for every part of the step that asks (the published union, the
/// rollout, the restart Lease left over, the announcement, the metrics). The restart turn itself
/// ([`change::carry_out`]) reads them again, fresh, while it holds the restart Lease.
#[derive(Default)]
struct Seen {
    client: Option<Result<kube::Client, String>>,
    /// `Ok(None)`: the apiserver has no Lease API (nothing to coordinate through).
    leases: Option<Result<Option<Vec<Lease>>, String>>,
}

impl HostApply {
    pub fn new(root: HostRoot, run: RunOptions) -> HostApply {
        HostApply {
            root,
            run,
            seen: Seen::default(),
        }
    }
}

/// What the daemon does after a failed change: retry soon, retry and say the host needs a
/// person, or hold until the inputs change (a rollback restarted the apiserver twice).
fn failure(e: &ChangeError) -> (FailureKind, String) {
    match e {
        ChangeError::Observe(e) => (
            FailureKind::Transient,
            format!("cannot read the apiserver configuration: {e}"),
        ),
        ChangeError::Plan(_) | ChangeError::Refused(_) => (FailureKind::Refused, e.to_string()),
        ChangeError::Apply(ApplyError::RolledBack(_)) => (FailureKind::RolledBack, e.to_string()),
        ChangeError::State(_)
        | ChangeError::Unverified(_)
        | ChangeError::NotMyTurn(_)
        | ChangeError::Apply(_) => (FailureKind::Transient, e.to_string()),
    }
}

impl ApplyStep for HostApply {
    fn begin(&mut self) {
        self.seen = Seen::default();
    }

    fn peer_keys(
        &mut self,
        observed: &apiserver::Observed,
    ) -> Vec<(String, crate::keys::PublicKey)> {
        match self.view(observed) {
            Ok(Some(view)) => membership::peer_keys(&view, &self.run.node),
            Ok(None) => Vec::new(),
            Err(e) => {
                log::debug!("not reading the other servers' keys: {e}");
                Vec::new()
            }
        }
    }

    fn live_keys(&mut self, observed: &apiserver::Observed) -> Option<Vec<crate::keys::PublicKey>> {
        crate::apiserver::probe::served_keys(
            &self.root,
            observed,
            self.run.apiserver_url.clone(),
            self.run.request_timeout,
        )
        .map_err(|e| log::debug!("not keeping the running apiserver's keys: {e}"))
        .ok()
    }

    fn cluster(&mut self, settings: &Settings) -> Option<crate::cluster::Cluster> {
        let observed = apiserver::observe(&self.root, settings.distribution).ok()?;
        let now = now_i64();
        let read = self
            .leases(&observed)
            .map(|leases| leases.map(|l| crate::cluster::Facts::of(&l, now)));
        Some(crate::cluster::from_read(
            read,
            &settings.issuer,
            &self.run.node,
            now,
            Some(&observed.flags.issuers),
        ))
    }

    fn apply(&mut self, settings: &Settings) -> ApplyReport {
        let root = &self.root.clone();
        // Backups age out even when nothing changes (cheap: one folder walk).
        crate::apiserver::apply::prune_backups(root, &settings.backups, state::unix_now(), None);
        let goal = if settings.run.apply_issuer {
            match self.rollout(settings) {
                Ok(goal) => goal,
                Err(wait) => return ApplyReport::failed(FailureKind::Transient, wait),
            }
        } else {
            Goal::Sign { accept_only: false }
        };
        let mut prepared = match change::prepare(root, settings, goal, &self.run) {
            Ok(p) => p,
            Err(e) => {
                let (kind, message) = failure(&e);
                return ApplyReport::failed(kind, message);
            }
        };
        let plan = &prepared.plan;
        let issuer = prepared.signing();
        let mut report = ApplyReport {
            outcome: Err(ApplyFailed {
                kind: FailureKind::Transient,
                message: String::new(),
            }),
            restarts: 0,
            warnings: plan.warnings.clone(),
        };
        if !settings.run.apply_issuer {
            // Publish and rotate, but leave the apiserver to a person: report what `apply`
            // would do, write nothing, restart nothing.
            report.outcome = Ok(Applied {
                changed: false,
                summary: if plan.in_sync() {
                    format!(
                        "in sync ({}: signing issuer {issuer}); apiserver changes are left to `irsa-agent apply` (run.apply-issuer: false)",
                        plan.distribution.name()
                    )
                } else {
                    let files: Vec<String> = plan
                        .changes
                        .iter()
                        .map(|c| c.path.display().to_string())
                        .collect();
                    format!(
                        "change pending: the configuration says issuer {issuer}, the apiserver has {}; run `irsa-agent apply --check --diff`, then `irsa-agent apply` (it edits {}; run.apply-issuer: false leaves that to you)",
                        plan.before.issuers.join(", "),
                        files.join(", ")
                    )
                },
                lost_change: prepared.lost_change.clone(),
                restart_pending: false,
                apply_pending: !plan.in_sync(),
            });
            // The other servers still need to see this one (its keys for the published
            // union, and that it is live).
            self.announce(settings);
            return report;
        }
        let done = match change::carry_out(root, settings, &mut prepared, &self.run) {
            Ok(done) => done,
            Err(e) => {
                let (kind, message) = failure(&e);
                if kind == FailureKind::RolledBack {
                    // The restart with the change and the one with the files restored.
                    report.restarts += 2;
                }
                report.outcome = Err(ApplyFailed { kind, message });
                return report;
            }
        };
        let plan = &prepared.plan;
        let outcome = done.outcome;
        if matches!(outcome.restart, RestartOutcome::Verified { .. }) {
            report.restarts += 1;
        }
        if !outcome.written.is_empty() || report.restarts > 0 {
            // A change took its time (a restart waits minutes): the others moved meanwhile.
            self.seen.leases = None;
        }
        let restart = restart::restart_for(root, plan.distribution, self.run.unit.as_deref());
        let files: Vec<String> = outcome
            .written
            .iter()
            .map(|w| w.path.display().to_string())
            .collect();
        let summary = match (&outcome.restart, files.is_empty()) {
            (RestartOutcome::NotNeeded, _) if done.restart_pending => format!(
                "the files are in sync, but the apiserver keeps the old flags until `{}` (--no-restart)",
                restart.describe()
            ),
            (RestartOutcome::NotNeeded, _) => format!(
                "in sync ({}: signing issuer {issuer})",
                plan.distribution.name()
            ),
            (RestartOutcome::Pending(r), false) => format!(
                "wrote {}; restart pending: the apiserver still signs with the old issuer until `{}`",
                files.join(", "),
                r.describe()
            ),
            (RestartOutcome::Pending(_), true) => format!("in sync; restart pending ({issuer})"),
            (RestartOutcome::Verified { waited, .. }, false) => format!(
                "wrote {}; {}; the apiserver serves issuer {issuer} after {}",
                files.join(", "),
                restart.describe(),
                config::format_duration(*waited)
            ),
            (RestartOutcome::Verified { waited, .. }, true) => format!(
                "restarted the apiserver ({}), which had not picked up the configuration; it serves issuer {issuer} after {}",
                restart.describe(),
                config::format_duration(*waited)
            ),
        };
        if !done.restart_pending {
            self.announce(settings);
        }
        report.outcome = Ok(Applied {
            changed: !plan.in_sync() || matches!(outcome.restart, RestartOutcome::Verified { .. }),
            summary,
            lost_change: prepared.lost_change.clone(),
            restart_pending: done.restart_pending,
            apply_pending: false,
        });
        report
    }
}

impl HostApply {
    /// The goal of this step in the issuer rollout, or why it waits ([`rollout::decide`]).
    fn rollout(&mut self, settings: &Settings) -> Result<Goal, String> {
        let observed = match apiserver::observe(&self.root, settings.distribution) {
            Ok(o) => o,
            // `prepare` reports it.
            Err(_) => return Ok(Goal::Sign { accept_only: false }),
        };
        // This process holds the restart Lease only within a step: one this node holds now was
        // left by a run that was killed.
        self.release_left_turn(&observed);
        let accepted = &observed.flags.issuers;
        let decision = match self.view(&observed) {
            Ok(view) => {
                if let Some(v) = &view {
                    remember_servers(&self.root, v, &self.run.node);
                }
                rollout::decide(accepted, &settings.issuer, view.as_ref(), &self.run.node)
            }
            // Never seen with other servers (a single server whose apiserver is down now):
            // plan as one.
            Err(e) if remembered_servers(&self.root).len() <= 1 => {
                log::debug!(
                    "cannot read the cluster's membership ({e}); planning as a single server, as last seen"
                );
                rollout::decide(accepted, &settings.issuer, None, &self.run.node)
            }
            // Without the cluster's view, only what is safe on any number of servers:
            // accepting one more issuer.
            Err(e) if accepted.first() == Some(&settings.issuer) => {
                log::debug!("cannot read the cluster's membership: {e}");
                Decision::Sign
            }
            Err(_) if !accepted.contains(&settings.issuer) => Decision::AcceptOnly,
            Err(e) => Decision::Wait(format!(
                "cannot read the cluster's membership, so this apiserver does not sign with {} yet: {e}",
                settings.issuer
            )),
        };
        match decision {
            Decision::Sign => Ok(Goal::Sign { accept_only: false }),
            Decision::AcceptOnly => {
                log::info!(
                    "issuer rollout: this apiserver accepts {} first; it signs with it once every apiserver accepts it",
                    settings.issuer
                );
                Ok(Goal::Sign { accept_only: true })
            }
            Decision::Wait(why) => {
                // Keep the Lease live while waiting, so peers see this agent.
                self.announce(settings);
                Err(format!("issuer rollout: {why}"))
            }
        }
    }

    /// The cluster's membership, from this converge's Leases ([`Self::leases`]); `None` when
    /// the apiserver has no Lease API (nothing to coordinate through).
    fn view(&mut self, observed: &apiserver::Observed) -> Result<Option<View>, String> {
        let now = now_i64();
        Ok(self
            .leases(observed)?
            .map(|leases| membership::view_of(&leases, now)))
    }

    /// The Leases in kube-system, listed once per converge (through [`Self::client`]).
    fn leases(&mut self, observed: &apiserver::Observed) -> Result<Option<Vec<Lease>>, String> {
        if let Some(read) = &self.seen.leases {
            return read.clone();
        }
        let read = self.client(observed).and_then(|client| {
            crate::runtime::block_on(async {
                match membership::list(&client).await {
                    Ok(leases) => Ok(Some(leases)),
                    Err(e) if e.no_lease_api() => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            })
        });
        self.seen.leases = Some(read.clone());
        read
    }

    /// The client of this host's apiserver (the admin kubeconfig), built once per converge.
    fn client(&mut self, observed: &apiserver::Observed) -> Result<kube::Client, String> {
        if let Some(client) = &self.seen.client {
            return client.clone();
        }
        let (kubeconfig, url) = crate::apiserver::probe::target(observed);
        let client = crate::apiserver::probe::KubeconfigProbe::new(
            &self.root,
            &kubeconfig,
            self.run.apiserver_url.clone().or(url),
            self.run.request_timeout,
        )
        .and_then(|probe| probe.api().client().map_err(|e| e.to_string()));
        self.seen.client = Some(client.clone());
        client
    }

    /// This converge's Lease named `name`: `Some(None)` when it was listed and is not there,
    /// `None` when the Leases were not listed.
    fn listed(&self, name: &str) -> Option<Option<Lease>> {
        match &self.seen.leases {
            Some(Ok(Some(leases))) => Some(
                leases
                    .iter()
                    .find(|l| l.metadata.name.as_deref() == Some(name))
                    .cloned(),
            ),
            _ => None,
        }
    }

    /// Puts `lease` (as just written) in place of its listed self.
    fn relist(&mut self, lease: Lease) {
        if let Some(Ok(Some(leases))) = &mut self.seen.leases {
            leases.retain(|l| l.metadata.name != lease.metadata.name);
            leases.push(lease);
        }
    }

    /// Gives back the restart Lease when this node holds it before a step (the daemon takes it
    /// only within a step, [`change::carry_out`]): an agent killed (-9) while holding it would
    /// otherwise hold every other server's restart until the Lease expires (the restart timeout
    /// plus a minute, 6 minutes by default; measured) whenever, back, it has nothing to restart
    /// (kubelet finished the restart it began) or waits for the others. Asked only when this
    /// converge's Leases show this node holding it.
    fn release_left_turn(&mut self, observed: &apiserver::Observed) {
        let leases = match self.leases(observed) {
            Ok(Some(leases)) => leases,
            Ok(None) => return,
            Err(e) => return log::debug!("cannot look at the restart Lease: {e}"),
        };
        // Only a turn held as this daemon holds it: an `irsa-agent apply` on this host holds
        // it under its own name ([`change::command_holder`]) while it restarts the apiserver.
        if membership::restart_of(&leases).is_none_or(|h| h.holder != self.run.holder) {
            return;
        }
        let released = self.client(observed).and_then(|client| {
            crate::runtime::block_on(membership::release_restart(&client, &self.run.holder))
                .map_err(|e| e.to_string())
        });
        match released {
            // Re-read for the metrics (who holds it now).
            Ok(()) => self.seen.leases = None,
            Err(e) => log::debug!("cannot give the restart Lease back: {e}"),
        }
    }

    /// Says in this node's Lease what its apiserver accepts and signs with now (the files,
    /// verified by the change just carried out). Failures are logged: peers then wait.
    fn announce(&mut self, settings: &Settings) {
        let observed = match apiserver::observe(&self.root, settings.distribution) {
            Ok(o) => o,
            Err(e) => return log::debug!("not announcing: {e}"),
        };
        let rotation = crate::rotation::load_state(&self.root)
            .ok()
            .flatten()
            .map(|st| st.phase.name().to_string())
            .unwrap_or_default();
        let report = Report::of(&observed, &settings.issuer, &rotation);
        let seconds = i32::try_from(membership::lease_seconds(settings)).unwrap_or(i32::MAX);
        let node = self.run.node.clone();
        let listed = self.listed(&membership::lease_name(&node));
        let announced = self.client(&observed).and_then(|client| {
            crate::runtime::block_on(async {
                match listed {
                    // Over the Lease this converge listed (a 409 reads it again).
                    Some(old) => {
                        membership::renew(&client, &node, &report, seconds, now_i64(), old)
                            .await
                            .map(Some)
                    }
                    None => membership::announce(&client, &node, &report, seconds, now_i64())
                        .await
                        .map(|()| None),
                }
            })
            .map_err(|e| e.to_string())
        });
        match announced {
            Ok(written) => {
                log::debug!("announced: {} {:?}", report.rollout, report.issuers);
                if let Some(lease) = written {
                    self.relist(lease);
                }
            }
            Err(e) => log::debug!("cannot announce this server in its Lease: {e}"),
        }
    }
}

/// Where the daemon keeps the servers it last saw in the cluster (a top-level key of the state
/// file), so that with its apiserver unreachable it does not plan as if it were alone.
const CLUSTER_KEY: &str = "cluster";

/// Records the servers of `view` (apiservers and live agents, this node included) when they
/// changed.
fn remember_servers(root: &HostRoot, view: &View, node: &str) {
    let mut servers: Vec<String> = view.apiservers.clone();
    servers.extend(
        view.agents
            .iter()
            .filter(|a| a.live)
            .map(|a| a.node.clone()),
    );
    servers.push(node.to_string());
    servers.sort();
    servers.dedup();
    if remembered_servers(root) == servers {
        return;
    }
    let record = serde_json::json!({"servers": servers, "seen_at": state::unix_now()});
    if let Err(e) = state::State::update(root, |s| {
        s.other.insert(CLUSTER_KEY.to_string(), record);
    }) {
        log::warn!("cannot record the cluster's servers in the state file: {e}");
    }
}

/// The servers last recorded by [`remember_servers`] (empty when never).
pub fn remembered_servers(root: &HostRoot) -> Vec<String> {
    state::State::load(root)
        .ok()
        .and_then(|s| s.other.get(CLUSTER_KEY).cloned())
        .and_then(|v| v.get("servers").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

fn now_i64() -> i64 {
    i64::try_from(state::unix_now()).unwrap_or(i64::MAX)
}
