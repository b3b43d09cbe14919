//! `irsa-agent run`: the daemon (see [`crate::daemon`]). This file wires it to the host: the
//! real apiserver step (the plan and executor of `apply`, with systemctl and the kubeconfig
//! probe) and the list of scheduled tasks.

use clap::Args as ClapArgs;

use super::apply::{self as apply_cli, RunArgs};
use super::edge_args::{ApiserverArgs, ProgramArgs};
use super::{Exit, Global};
use crate::apiserver::apply::{self as executor, ApplyError, Options, Outcome, RestartOutcome};
use crate::apiserver::plan::{self, Target};
use crate::apiserver::{self, restart};
use crate::config::{self, Settings};
use crate::daemon::{self, Applied, ApplyReport, ApplyStep, FailureKind, ScheduledTask};
use crate::host::HostRoot;
use crate::state::{self, State};

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Converges at start (publishes the discovery document and JWKS to every `publish:` target, then \
brings the apiserver's issuer flags in line exactly as `irsa-agent apply` does), then watches \
the key files, the apiserver configuration and /etc/irsa-agent, and converges again after every \
change (debounced), every run.resync-interval (10m, jittered), and after failures (capped \
exponential backoff). It never exits on a failure, and never publishes a JWKS that lacks the key \
the apiserver signs with.

Without an issuer configured it waits (STATUS=waiting for an issuer in \
/etc/irsa-agent/config.yaml) and starts when one is set. Under systemd: Type=notify, READY after \
the first converge, STATUS on every change, watchdog, SIGHUP reloads, SIGTERM stops (exit 0). \
See `irsa-agent status`, and the README for metrics and the unit's privileges.")]
pub struct Args {
    /// Write the apiserver configuration but never restart the apiserver (as `apply
    /// --no-restart`): the change takes effect at its next restart.
    #[arg(long)]
    pub no_restart: bool,

    #[command(flatten)]
    pub apiserver: ApiserverArgs,

    #[command(flatten)]
    pub programs: ProgramArgs,
}

impl Args {
    fn apply_args(&self) -> RunArgs {
        RunArgs {
            check: false,
            diff: false,
            json: false,
            no_restart: self.no_restart,
            apiserver: self.apiserver.clone(),
        }
    }
}

/// Scheduled work the daemon runs after every converge and when due (see
/// [`crate::daemon::tasks`]). Key rotation (issue 6) registers its task here.
fn tasks(global: &Global, args: &Args) -> Vec<Box<dyn ScheduledTask>> {
    let (edges, options) = super::rotate::host_edges(&args.apiserver, &args.programs);
    vec![Box::new(crate::daemon::rotation_task::RotationTask {
        root: global.root.clone(),
        edges,
        options,
    })]
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    if super::logging::to_journal_if_there() {
        log::debug!("logging to journald");
    }
    let apply = RealApply {
        root: global.root.clone(),
        run: args.apply_args(),
    };
    let options = daemon::Options {
        root: global.root.clone(),
        config: global.config.clone(),
    };
    daemon::run(options, Box::new(apply), tasks(global, &args))?;
    Ok(Exit::OK)
}

/// The apiserver step of the daemon: `apply` without the printing.
struct RealApply {
    root: HostRoot,
    run: RunArgs,
}

impl ApplyStep for RealApply {
    fn live_keys(&mut self, observed: &apiserver::Observed) -> Option<Vec<crate::keys::PublicKey>> {
        crate::apiserver::probe::served_keys(
            &self.root,
            observed,
            self.run.apiserver.apiserver_url.clone(),
            self.run.apiserver.request_timeout(),
        )
        .map_err(|e| log::debug!("not keeping the running apiserver's keys: {e}"))
        .ok()
    }

    fn apply(&mut self, settings: &Settings) -> ApplyReport {
        let root = &self.root;
        // Backups age out even when nothing changes (cheap: one folder walk).
        crate::apiserver::apply::prune_backups(root, &settings.backups, state::unix_now(), None);
        let state = match State::load(root) {
            Ok(s) => s,
            Err(e) => return ApplyReport::failed(FailureKind::Transient, e.to_string()),
        };
        let observed = match apiserver::observe(root, settings.distribution) {
            Ok(o) => o,
            Err(e) => {
                return ApplyReport::failed(
                    FailureKind::Transient,
                    format!("cannot read the apiserver configuration: {e}"),
                );
            }
        };
        if let Err(e) = apply_cli::refuse_command_line_flags(root, &observed, &self.run) {
            return ApplyReport::failed(FailureKind::Refused, super::error_chain(&e));
        }
        let lost_change = apply_cli::lost_change(&state, settings, &observed);
        let issuer_state = state.issuer.as_ref();
        let target = Target {
            issuer: settings.issuer.clone(),
            jwks_uri: settings.jwks_uri.clone(),
            remembered: issuer_state.map(|s| s.previous.clone()).unwrap_or_default(),
            retire: Vec::new(),
            retired: issuer_state.map(|s| s.retired.clone()).unwrap_or_default(),
            accept_only: false,
            drop_external_audiences: false,
        };
        let plan = match plan::plan(&observed, &target) {
            Ok(p) => p,
            Err(e) => return ApplyReport::failed(FailureKind::Refused, e.to_string()),
        };
        let mut report = ApplyReport {
            outcome: Err(daemon::ApplyFailed {
                kind: FailureKind::Transient,
                message: String::new(),
            }),
            restarts: 0,
            warnings: plan.warnings.clone(),
        };
        let issuer = plan.desired.issuers.first().cloned().unwrap_or_default();
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
                lost_change,
                restart_pending: false,
                apply_pending: !plan.in_sync(),
            });
            return report;
        }
        let opts = Options {
            no_restart: self.run.no_restart,
            timeout: self.run.apiserver.timeout,
            poll: self.run.apiserver.poll_interval,
            backups: settings.backups,
        };
        let mut seen_serving = false;
        let outcome = if plan.in_sync() {
            let mut pending = None;
            if !self.run.no_restart {
                let (mut edges, running) =
                    match apply_cli::running_check(root, &observed, &self.run, &state, &issuer) {
                        Ok(x) => x,
                        Err(e) => {
                            return ApplyReport::failed(FailureKind::Transient, format!("{e:#}"));
                        }
                    };
                match running {
                    apply_cli::Running::Settled => {}
                    apply_cli::Running::SeenServing => seen_serving = true,
                    apply_cli::Running::Pending(message) => {
                        log::warn!("{message}");
                        if let Some(probe) = edges.probe.as_mut() {
                            let in_flight = state.in_flight();
                            pending = Some(executor::resume(
                                root,
                                &edges.restart,
                                &issuer,
                                in_flight.as_ref(),
                                edges.services.as_mut(),
                                probe.as_mut(),
                                &opts,
                            ));
                        }
                    }
                }
            }
            match pending {
                None => Outcome {
                    written: Vec::new(),
                    backup_dir: None,
                    restart: RestartOutcome::NotNeeded,
                },
                Some(Ok(restart)) => {
                    if matches!(restart, RestartOutcome::Verified { .. }) {
                        report.restarts += 1;
                    }
                    Outcome {
                        written: Vec::new(),
                        backup_dir: None,
                        restart,
                    }
                }
                Some(Err(e)) => {
                    let kind = match e {
                        ApplyError::RolledBack(_) => {
                            report.restarts += 2;
                            FailureKind::RolledBack
                        }
                        _ => FailureKind::Transient,
                    };
                    report.outcome = Err(daemon::ApplyFailed {
                        kind,
                        message: e.to_string(),
                    });
                    return report;
                }
            }
        } else {
            match apply_cli::execute_plan(root, &observed, &plan, &self.run, &settings.backups) {
                Ok(outcome) => {
                    if matches!(outcome.restart, RestartOutcome::Verified { .. }) {
                        report.restarts += 1;
                    }
                    outcome
                }
                Err(e) => {
                    let kind = match e.downcast_ref::<ApplyError>() {
                        Some(ApplyError::RolledBack(_)) => {
                            report.restarts += 2;
                            FailureKind::RolledBack
                        }
                        Some(_) => FailureKind::Transient,
                        // Refused before writing (no way to verify the apiserver).
                        None => FailureKind::Refused,
                    };
                    report.outcome = Err(daemon::ApplyFailed {
                        kind,
                        message: super::error_chain(&e),
                    });
                    return report;
                }
            }
        };
        let now = state::unix_now();
        let restart_pending = match State::update(root, |s| {
            executor::record(s, &plan, &outcome, now);
            if seen_serving {
                executor::record_seen_serving(s, &issuer, now);
            }
            s.issuer
                .as_ref()
                .is_some_and(|i| i.issuer == issuer && i.pending_restart_since.is_some())
        }) {
            Ok(pending) => pending,
            Err(e) => {
                log::warn!("{e}");
                matches!(outcome.restart, RestartOutcome::Pending(_))
            }
        };
        let restart = restart::restart_for(
            root,
            observed.distribution,
            self.run.apiserver.unit.as_deref(),
        );
        let files: Vec<String> = outcome
            .written
            .iter()
            .map(|w| w.path.display().to_string())
            .collect();
        let summary = match (&outcome.restart, files.is_empty()) {
            (RestartOutcome::NotNeeded, _) if restart_pending => format!(
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
            lost_change,
            restart_pending,
            apply_pending: false,
        });
        report
    }
}
