//! The daemon's apiserver step on the host: [`crate::apiserver::change`] (the same use case as
//! `irsa-agent apply`), summarized for the log and `status` instead of printed.
//!
//! On several servers the step follows the issuer rollout ([`crate::rollout`]): it reads the
//! cluster's membership (the agents' Leases), accepts the new issuer first, signs with it only
//! once every apiserver accepts it, and announces what its apiserver accepts after each change
//! is verified (never before: a peer must not sign on the word of a restart still pending).
//! Then it retires the old issuers (`finalize`, unless `run.finalize: false`) once no token
//! minted with them can be valid on any server ([`rollout::retire_hold`]), no rotation runs, and
//! this apiserver's stale-token counter has stayed still for [`STALE_WINDOW`]; until then the
//! step says why in its summary and asks to look again when it comes due.

use std::time::Duration;

use crate::apiserver::apply::{self as executor, ApplyError, FinalizeDecision, RestartOutcome};
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
    /// How long this apiserver's `serviceaccount_stale_tokens_total` must stay still before the
    /// daemon retires the old issuers ([`STALE_WINDOW`] unless a test shortens it).
    pub stale_window: Duration,
    /// What this converge read of the cluster; forgotten when the next one begins.
    seen: Seen,
    /// Why the old issuers are not retired yet, as last logged, and when to look again.
    retire_wait: Option<(String, Option<Duration>)>,
}

/// How long the stale-token counter must not rise before the daemon retires old issuers.
pub const STALE_WINDOW: Duration = Duration::from_secs(300);

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
            stale_window: STALE_WINDOW,
            seen: Seen::default(),
            retire_wait: None,
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
            Some(executor::longest_token_lifetime(
                settings.rotation.token_lifetime,
                &observed,
            )),
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
                look_again: None,
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
                "in sync ({}: signing issuer {issuer}){}",
                plan.distribution.name(),
                self.retire_wait
                    .as_ref()
                    .map(|(why, _)| format!("; {why}"))
                    .unwrap_or_default()
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
        if let Goal::Retire(retired) = &prepared.goal {
            log::info!(
                "issuer rollout: retired {} on this server ({})",
                if retired.is_empty() {
                    "the external audiences".to_string()
                } else {
                    retired.join(", ")
                },
                summary
            );
            forget_stale_reading(root);
        }
        if !done.restart_pending {
            self.announce(settings);
        }
        let look_again = self.retire_wait.as_ref().and_then(|(_, after)| *after);
        report.outcome = Ok(Applied {
            changed: !plan.in_sync() || matches!(outcome.restart, RestartOutcome::Verified { .. }),
            summary,
            lost_change: prepared.lost_change.clone(),
            restart_pending: done.restart_pending,
            apply_pending: false,
            look_again,
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
        // The view the retire step may go by: `None` when the membership cannot be read on a
        // cluster of several servers (then nothing is retired).
        let mut retire_view: Option<Option<View>> = None;
        let decision = match self.view(&observed) {
            Ok(view) => {
                if let Some(v) = &view {
                    remember_servers(&self.root, v, &self.run.node);
                }
                let decision =
                    rollout::decide(accepted, &settings.issuer, view.as_ref(), &self.run.node);
                retire_view = Some(view);
                decision
            }
            // Never seen with other servers (a single server whose apiserver is down now):
            // plan as one.
            Err(e) if remembered_servers(&self.root).len() <= 1 => {
                log::debug!(
                    "cannot read the cluster's membership ({e}); planning as a single server, as last seen"
                );
                retire_view = Some(None);
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
        let before = self.retire_wait.take().map(|(why, _)| why);
        let goal = match decision {
            Decision::Sign
                if accepted.first() == Some(&settings.issuer) && settings.run.finalize =>
            {
                let retire = match &retire_view {
                    Some(view) => self.retire(settings, &observed, view.as_ref()),
                    None => Err((
                        "the old issuers are retired once the cluster's membership can be read again"
                            .to_string(),
                        None,
                    )),
                };
                match retire {
                    Ok(Some(retire)) => Ok(Goal::Retire(retire)),
                    Ok(None) => Ok(Goal::Sign { accept_only: false }),
                    Err((why, after)) => {
                        // Held by the others (a rotation, a server behind): look again within
                        // the stale-token window rather than at the next resync.
                        self.retire_wait = Some((why, after.or(Some(self.stale_window))));
                        Ok(Goal::Sign { accept_only: false })
                    }
                }
            }
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
        };
        if let Some((why, _)) = &self.retire_wait
            && before.as_ref() != Some(why)
        {
            if why.contains(" rose from ") {
                log::warn!("issuer rollout: {why}");
            } else {
                log::info!("issuer rollout: {why}");
            }
        }
        goal
    }

    /// The third step of the issuer rollout ([`rollout`]): the old issuers this server retires
    /// now (`Ok(Some)`), nothing to retire (`Ok(None)`), or why not yet and when to look again
    /// (`Err`). The same rule as `irsa-agent finalize` ([`executor::finalize_decision`], the
    /// longest token lifetime, the audiences), taken from the last server's switch
    /// ([`rollout::retire_hold`]), after no key rotation, and only while this apiserver's
    /// `serviceaccount_stale_tokens_total` stays still ([`Self::stale_tokens_still`]).
    fn retire(
        &mut self,
        settings: &Settings,
        observed: &apiserver::Observed,
        view: Option<&View>,
    ) -> Result<Option<Vec<String>>, (String, Option<Duration>)> {
        let st = state::State::load(&self.root).map_err(|e| {
            (
                format!("the old issuers stay: the state file cannot be read ({e})"),
                None,
            )
        })?;
        let previous = st
            .issuer
            .as_ref()
            .map(|i| i.previous.clone())
            .unwrap_or_default();
        let audiences = executor::FinalizeAudiences::of(observed, &previous);
        if audiences.blocked() {
            // The apiserver step puts the in-cluster audiences back first.
            return Ok(None);
        }
        let lifetime = executor::longest_token_lifetime(settings.rotation.token_lifetime, observed);
        let now = state::unix_now();
        let (retire, switched_at) = match executor::finalize_decision(
            st.issuer.as_ref(),
            &settings.issuer,
            &observed.flags.issuers,
            &audiences.external,
            now,
            lifetime,
        ) {
            FinalizeDecision::Ready { retire } => {
                let at = st.issuer.as_ref().and_then(|i| i.switched_at).unwrap_or(0);
                (retire, at)
            }
            FinalizeDecision::TooEarly {
                retire,
                switched_at,
                ..
            } => (retire, switched_at),
            // Nothing to retire, or no switch irsa-agent saw in effect here (the apiserver
            // step verifies it first).
            _ => return Ok(None),
        };
        let rotating = crate::rotation::load_state(&self.root)
            .ok()
            .flatten()
            .is_some_and(|r| r.phase.name() != crate::rotation::machine::PhaseName::Idle);
        if rotating {
            return Err((
                "the old issuers are retired after the key rotation in progress".to_string(),
                None,
            ));
        }
        if let Err(hold) = rollout::retire_hold(
            view,
            &settings.issuer,
            &self.run.node,
            switched_at,
            lifetime,
            now,
        ) {
            // Due at a known time: look again then (a resync may be far).
            let after = hold
                .due
                .map(|due| Duration::from_secs(due.saturating_sub(now).max(1)));
            return Err((hold.why, after));
        }
        self.stale_tokens_still(observed, &settings.issuer, now)
            .map_err(|(why, after)| (why, Some(after)))?;
        log::info!(
            "issuer rollout: every apiserver signs with {} and no token minted with {} can be valid any more: retiring it on this server",
            settings.issuer,
            if retire.is_empty() {
                "an external audience alone".to_string()
            } else {
                retire.join(", ")
            }
        );
        Ok(Some(retire))
    }

    /// The evidence `finalize` asks of this apiserver before retiring anything: it answers
    /// ready, serving `issuer`, with a readable `serviceaccount_stale_tokens_total` that has not
    /// risen for [`Self::stale_window`] (readings kept in the state file). A rising counter means
    /// a client presents tokens past their original expiry (a client that read its token once):
    /// it may hold one minted with an old issuer, which retiring would reject, so the daemon
    /// holds and says so; `irsa-agent finalize` by hand retires anyway (with a warning).
    fn stale_tokens_still(
        &mut self,
        observed: &apiserver::Observed,
        issuer: &str,
        now: u64,
    ) -> Result<(), (String, Duration)> {
        let window = self.stale_window;
        let mut edges = change::edges(&self.root, observed, &self.run);
        let Some(probe) = edges.probe.as_mut() else {
            return Err((
                format!(
                    "the old issuers stay until this apiserver can be asked about stale tokens ({})",
                    edges.probe_error.unwrap_or_default()
                ),
                window,
            ));
        };
        let (status, stale) = crate::runtime::block_on(async {
            let status = probe.check().await;
            let stale = probe.stale_tokens().await;
            (status, stale)
        });
        if !status.ready || status.issuer.as_deref() != Some(issuer) {
            return Err((
                format!(
                    "the old issuers stay until this apiserver answers ready, serving {issuer} ({})",
                    status.detail
                ),
                window,
            ));
        }
        let Some(stale) = stale else {
            return Err((
                "the old issuers stay until this apiserver's /metrics (serviceaccount_stale_tokens_total) can be read"
                    .to_string(),
                window,
            ));
        };
        let verdict = stale_verdict(stale_reading(&self.root), stale, now, window);
        match verdict {
            Stale::Still => return Ok(()),
            Stale::Quiet { .. } => {}
            Stale::Rose { .. } | Stale::First => record_stale_reading(&self.root, stale, now),
        }
        let why = match verdict {
            Stale::Rose { from } => {
                let why = format!(
                    "the old issuers stay: serviceaccount_stale_tokens_total rose from {from} to {stale} on this apiserver, so a client presents tokens past their original expiry and may hold one minted with an old issuer; find it in the audit log (authentication.k8s.io/stale-token); retired once the counter stays still for {}, or now by `irsa-agent finalize`",
                    config::format_duration(window)
                );
                return Err((why, window));
            }
            Stale::Quiet { so_far } => format!(
                "the old issuers are retired once serviceaccount_stale_tokens_total ({stale}) has stayed still for {} on this apiserver ({} so far)",
                config::format_duration(window),
                config::format_duration(so_far)
            ),
            _ => format!(
                "the old issuers are retired once serviceaccount_stale_tokens_total ({stale}) has stayed still for {} on this apiserver",
                config::format_duration(window)
            ),
        };
        let after = match verdict {
            Stale::Quiet { so_far } => window.saturating_sub(so_far),
            _ => window,
        };
        Err((why, after.max(Duration::from_secs(1))))
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
        let report = Report::of(&self.root, &observed, &settings.issuer, &rotation);
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

/// Where the daemon keeps its last reading of `serviceaccount_stale_tokens_total` (a top-level
/// key of the state file): the value and when it was first seen.
const STALE_KEY: &str = "stale-tokens";

/// What two readings of `serviceaccount_stale_tokens_total` say.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stale {
    /// The same value for the whole window: the old issuers may go.
    Still,
    /// The same value, for `so_far` (less than the window).
    Quiet { so_far: Duration },
    /// It rose: a client presents stale tokens now.
    Rose { from: f64 },
    /// No reading before, or the counter went down (the apiserver restarted): a new start.
    First,
}

/// `before`: the last reading (value, since when); `value` now, at `now`.
fn stale_verdict(before: Option<(f64, u64)>, value: f64, now: u64, window: Duration) -> Stale {
    match before {
        Some((v, since)) if v == value => {
            let so_far = Duration::from_secs(now.saturating_sub(since));
            if so_far >= window {
                Stale::Still
            } else {
                Stale::Quiet { so_far }
            }
        }
        Some((v, _)) if v < value => Stale::Rose { from: v },
        _ => Stale::First,
    }
}

fn stale_reading(root: &HostRoot) -> Option<(f64, u64)> {
    let st = state::State::load(root).ok()?;
    let v = st.other.get(STALE_KEY)?;
    Some((v.get("value")?.as_f64()?, v.get("since")?.as_u64()?))
}

fn record_stale_reading(root: &HostRoot, value: f64, now: u64) {
    let record = serde_json::json!({"value": value, "since": now});
    if let Err(e) = state::State::update(root, |s| {
        s.other.insert(STALE_KEY.to_string(), record);
    }) {
        log::warn!("cannot record the stale-token reading in the state file: {e}");
    }
}

fn forget_stale_reading(root: &HostRoot) {
    if let Err(e) = state::State::update(root, |s| {
        s.other.remove(STALE_KEY);
    }) {
        log::debug!("cannot remove the stale-token reading from the state file: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stale_token_counter_must_stay_still_for_the_whole_window() {
        let w = Duration::from_secs(300);
        assert_eq!(stale_verdict(None, 0.0, 1000, w), Stale::First);
        assert_eq!(
            stale_verdict(Some((0.0, 1000)), 0.0, 1100, w),
            Stale::Quiet {
                so_far: Duration::from_secs(100)
            }
        );
        assert_eq!(stale_verdict(Some((0.0, 1000)), 0.0, 1300, w), Stale::Still);
        // A client presented a stale token meanwhile: it starts again, and says so.
        assert_eq!(
            stale_verdict(Some((2.0, 1000)), 3.0, 5000, w),
            Stale::Rose { from: 2.0 }
        );
        // The apiserver restarted (the counter starts from 0 again): a new first reading.
        assert_eq!(stale_verdict(Some((7.0, 1000)), 0.0, 5000, w), Stale::First);
    }
}
