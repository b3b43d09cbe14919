//! `irsa-agent rotate [--now] [--abort] [--status]`: advance the signing-key rotation as far as
//! it is due, start one now, abandon one, or show where it is.

use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;

use super::apply::load_settings;
use super::edge_args::{ApiserverArgs, ProgramArgs};
use super::{Exit, Global};
use crate::clock::{Clock, SystemClock};
use crate::config::format_duration;
use crate::rotation::{self, Context, HostEdges, Options, RotationError};
use crate::state;

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Phases: idle -> staged (new key generated, 0600) -> published (JWKS with old + new keys published, \
seen at the public URL, held for the public Cache-Control max-age + rotation.cdn-ttl + \
rotation.propagation-wait) -> trusted (the apiserver verifies with both keys) -> signing (it signs \
with the new key; a fresh token verifies against the public JWKS) -> draining (until every token \
the old key signed has expired: rotation.token-lifetime + rotation.drain-margin, and no stale-token \
use) -> retired (old key removed, JWKS republished) -> idle.

Without options, does every step that is due now and says when the next one is due (the daemon \
does the same on its own). State: /var/lib/irsa-agent/state.json (`rotation`). --status also shows \
every server's rotation phase and keys, as its agent reports them in its Lease (kube-system).

--abort is possible until the new key may have signed a token (one server: while `staged` or \
`published`; several k3s servers: also while `trusted`): the new key is removed again, no token \
is rejected. Later the way out is forward: finish the rotation.

A step waiting for something outside (a legacy token Secret signed by the old key, the \
stale-token counter, other servers) is looked at again every minute by the daemon, and at once by \
`irsa-agent rotate`. A step whose evidence cannot be read (the apiserver does not answer) is \
BLOCKED: nothing irreversible happens, `--status` says what it waits for, and it is tried again \
(1 min, doubling up to 1 h; at once by `irsa-agent rotate`).

Exit status: 0 ok (also when nothing is due, or a step waits or is blocked); 1 a step failed or was \
refused (the next run retries after a back-off).")]
pub struct Args {
    /// Start a rotation now, even if none is due (or rotation.enabled is false).
    #[arg(long, conflicts_with_all = ["abort", "status"])]
    pub now: bool,

    /// Abandon the rotation in progress, if the new key cannot have signed anything yet.
    #[arg(long, conflicts_with = "status")]
    pub abort: bool,

    /// Show the phase, when it began, what comes next and when; change nothing.
    #[arg(long)]
    pub status: bool,

    /// With --status: print JSON.
    #[arg(long, requires = "status")]
    pub json: bool,

    /// Retire the old key even though serviceaccount_stale_tokens_total still rises (see the
    /// message that says so).
    #[arg(long)]
    pub ignore_stale_tokens: bool,

    #[command(flatten)]
    pub apiserver: ApiserverArgs,

    #[command(flatten)]
    pub programs: ProgramArgs,
}

/// How rotation reaches the host (systemctl, k3s/rke2, the apiserver) and waits for restarts.
pub(super) fn host_edges(
    apiserver: &ApiserverArgs,
    programs: &ProgramArgs,
) -> (HostEdges, Options) {
    let edges = HostEdges {
        systemctl: apiserver.systemctl.clone(),
        programs: programs.programs(),
        apiserver_url: apiserver.apiserver_url.clone(),
        request_timeout: apiserver.request_timeout(),
        node: apiserver.node(),
        restart_holder: None,
    };
    let options = Options {
        restart_timeout: apiserver.timeout,
        poll: apiserver.poll_interval,
        recheck: apiserver.recheck_interval,
        unit: apiserver.unit.clone(),
        ..Options::default()
    };
    (edges, options)
}

/// The clock: the system's; with the `failpoints` feature (tests only) `IRSA_AGENT_CLOCK=<unix
/// seconds>` starts a simulated one there, so tests can run a rotation of days through the
/// real binary.
fn clock() -> Arc<dyn Clock> {
    #[cfg(feature = "failpoints")]
    if let Some(t) = std::env::var("IRSA_AGENT_CLOCK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Arc::new(crate::clock::SimulatedClock::at(t));
    }
    Arc::new(SystemClock)
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let settings = load_settings(global)?;
    let root = &global.root;
    let clock = clock();
    if args.status {
        let st = rotation::load_state(root)?;
        let now = clock.now();
        let cluster = cluster_view(root, &settings, &args.apiserver);
        if args.json {
            let mut doc = rotation::status_json(st.as_ref(), &settings, now);
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("cluster".into(), serde_json::to_value(&cluster)?);
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            for line in rotation::status_lines_on(Some(root), st.as_ref(), &settings, now) {
                println!("{line}");
            }
            for line in crate::cluster::rotation_lines(&cluster) {
                println!("{line}");
            }
        }
        return Ok(Exit::OK);
    }
    let (edges, options) = host_edges(&args.apiserver, &args.programs);
    // Run by hand: its restarts hold the restart Lease under this command's own name.
    let edges = HostEdges {
        restart_holder: Some(crate::apiserver::change::command_holder(&edges.node)),
        ..edges
    };
    let options = Options {
        start_now: args.now,
        ignore_stale_tokens: args.ignore_stale_tokens,
        // A person asked: look again now at whatever the rotation waits for.
        look_now: true,
        ..options
    };
    let mut ctx = crate::runtime::block_on(Context::for_host(
        root,
        &settings,
        clock.clone(),
        edges,
        options,
    ))?;
    let result = crate::runtime::block_on(async {
        if args.abort {
            let now = ctx.clock.now();
            rotation::abort(&mut ctx, now).await.map(|o| vec![o])
        } else {
            rotation::advance(&mut ctx).await
        }
    });
    match result {
        Ok(outcomes) => {
            for o in &outcomes {
                println!("{}", o.status_line);
            }
            let now = clock.now();
            match outcomes.last().and_then(|o| o.next_due) {
                Some(due) if due > now => println!(
                    "next step due at {} (in {})",
                    state::rfc3339(due),
                    format_duration(Duration::from_secs(due - now))
                ),
                Some(_) => println!("next step due now (run `irsa-agent rotate` again)"),
                None => {}
            }
            Ok(Exit::OK)
        }
        Err(RotationError::Refused(why)) => {
            eprintln!("error: refusing to rotate: {why}");
            Ok(Exit::FAILURE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let Ok(Some(st)) = rotation::load_state(root)
                && let Some(due) = st.due_at()
            {
                eprintln!(
                    "the step is retried at {} (`irsa-agent rotate --status` shows the state)",
                    state::rfc3339(due)
                );
            }
            Ok(Exit::FAILURE)
        }
    }
}

/// The servers' rotation phases, as their agents report them in their Leases.
fn cluster_view(
    root: &crate::host::HostRoot,
    settings: &crate::config::Settings,
    apiserver: &ApiserverArgs,
) -> crate::cluster::Cluster {
    match crate::apiserver::observe(root, settings.distribution) {
        Ok(observed) => crate::cluster::read_host(
            root,
            &observed,
            apiserver.apiserver_url.clone(),
            apiserver.request_timeout(),
            settings,
            &apiserver.node(),
        ),
        Err(e) => crate::cluster::Cluster::Unreadable {
            error: format!("the apiserver configuration cannot be read: {e}"),
        },
    }
}
