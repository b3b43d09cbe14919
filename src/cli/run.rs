//! `irsa-agent run`: the daemon (see [`crate::daemon`]). This file wires it to the host: the
//! real apiserver step ([`crate::daemon::host_apply`], the use case `apply` runs) and the list
//! of scheduled tasks.

use clap::Args as ClapArgs;

use super::apply::RunArgs;
use super::edge_args::{ApiserverArgs, ProgramArgs};
use super::{Exit, Global};
use crate::daemon::{self, ScheduledTask, host_apply::HostApply};

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
        peer_kids: None,
    })]
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    if super::logging::to_journal_if_there() {
        log::debug!("logging to journald");
    }
    let mut run = args.apply_args().options();
    // The daemon holds the restart Lease as its node: a turn held so is its own, left by a
    // daemon that was killed, and given back at the start of a step.
    run.holder = run.node.clone();
    let node = run.node.clone();
    let mut apply = HostApply::new(global.root.clone(), run);
    // Tests that look again every few seconds (--recheck-interval) need not wait the full
    // stale-token window either; by default it stays 5 minutes.
    apply.stale_window = crate::daemon::host_apply::STALE_WINDOW
        .min(args.apiserver.recheck_interval.saturating_mul(5));
    let options = daemon::Options {
        root: global.root.clone(),
        config: global.config.clone(),
        node,
    };
    daemon::run(options, Box::new(apply), tasks(global, &args))?;
    Ok(Exit::OK)
}
