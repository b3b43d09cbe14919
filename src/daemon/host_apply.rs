//! The daemon's apiserver step on the host: [`crate::apiserver::change`] (the same use case as
//! `irsa-agent apply`), summarized for the log and `status` instead of printed.

use crate::apiserver::apply::{ApplyError, RestartOutcome};
use crate::apiserver::change::{self, ChangeError, Goal, RunOptions};
use crate::apiserver::{self, restart};
use crate::config::{self, Settings};
use crate::host::HostRoot;
use crate::state;

use super::{Applied, ApplyFailed, ApplyReport, ApplyStep, FailureKind};

/// The apiserver step of the daemon: `apply` without the printing.
pub struct HostApply {
    pub root: HostRoot,
    pub run: RunOptions,
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
        ChangeError::State(_) | ChangeError::Unverified(_) | ChangeError::Apply(_) => {
            (FailureKind::Transient, e.to_string())
        }
    }
}

impl ApplyStep for HostApply {
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

    fn apply(&mut self, settings: &Settings) -> ApplyReport {
        let root = &self.root;
        // Backups age out even when nothing changes (cheap: one folder walk).
        crate::apiserver::apply::prune_backups(root, &settings.backups, state::unix_now(), None);
        let mut prepared =
            match change::prepare(root, settings, Goal::Sign { accept_only: false }, &self.run) {
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
