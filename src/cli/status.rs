//! `irsa-agent status [--json]`: what the daemon last did and what it waits for, read from the
//! state file (`/var/lib/irsa-agent/state.json`), with every other feature's section.

use clap::Args as ClapArgs;

use super::{Exit, Global};
use crate::cluster::{self, Cluster};
use crate::daemon::status::{self, DaemonStatus, Phase};
use crate::state::State;

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Reads /var/lib/irsa-agent/state.json (written by `irsa-agent run` on every change, and by apply, \
finalize and rotation) and says whether the daemon runs, whether everything is in sync, what \
failed and when it retries.

The cluster: read from the Leases in kube-system through the host's admin kubeconfig (as the \
daemon reads them): every server, where it is in the issuer rollout, which step comes next and \
what it waits for; \"single server\" when the apiserver has no Lease API, and why when it \
cannot be read.

--json prints the state file's object plus \"running\" and \"cluster\" (see README, \"status \
--json\").
Exit status: 0 the daemon runs and everything is in sync; 2 it does not run, or is not in sync \
(waiting for an issuer, retrying, a held apiserver change); 1 the state cannot be read.")]
pub struct Args {
    /// Print one JSON object (the state file's sections plus `running`) instead of text.
    #[arg(long)]
    pub json: bool,

    /// This server's node name in the cluster view [default: the one the daemon runs with
    /// (its `--node-name`, recorded in the state file), else the host name].
    #[arg(long, value_name = "NAME", env = "IRSA_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let state = State::load(&global.root)?;
    let daemon = DaemonStatus::from_state(&state);
    let running = daemon.as_ref().is_some_and(status::running);
    let node = status::node_name(args.node_name.as_deref(), Some(&state));
    if args.json {
        let mut doc = serde_json::to_value(&state)?;
        let cluster = cluster_json(&state, &cluster_view(global, &node));
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("running".into(), serde_json::Value::Bool(running));
            obj.insert("cluster".into(), cluster);
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        // The configuration only says whether rotation is enabled; status works without it
        // (and does not repeat the configuration's warnings).
        let rotation_enabled = crate::config::load(&global.root, global.config.as_deref())
            .ok()
            .map(|l| l.settings.rotation.enabled);
        print!("{}", status::render_human(&state, rotation_enabled));
        for line in cluster::lines(&cluster_view(global, &node)) {
            println!("{line}");
        }
        if let Some(seen) = last_seen(&state) {
            println!("  {seen}");
        }
    }
    let in_sync = daemon.is_some_and(|d| d.phase == Phase::InSync);
    Ok(if running && in_sync {
        Exit::OK
    } else {
        Exit::PENDING
    })
}

/// How long `status` waits for each answer about the cluster.
const CLUSTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The cluster as the Leases show it now, for the configured issuer, seen from `node` (this
/// server, [`status::node_name`]).
pub fn cluster_view(global: &Global, node: &str) -> Cluster {
    let unreadable = |error: String| Cluster::Unreadable { error };
    let settings = match crate::config::load(&global.root, global.config.as_deref()) {
        Ok(l) => l.settings,
        Err(e) => return unreadable(format!("the configuration cannot be used: {e}")),
    };
    let observed = match crate::apiserver::observe(&global.root, settings.distribution) {
        Ok(o) => o,
        Err(e) => return unreadable(format!("the apiserver configuration cannot be read: {e}")),
    };
    cluster::read_host(
        &global.root,
        &observed,
        None,
        CLUSTER_TIMEOUT,
        &settings,
        node,
    )
}

/// The `cluster` object of `status --json`: the view, plus the servers the daemon last saw
/// (the state file's `cluster` record) as `last_seen`.
fn cluster_json(state: &State, view: &Cluster) -> serde_json::Value {
    let mut doc = serde_json::to_value(view).unwrap_or_default();
    if let (Some(obj), Some(seen)) = (doc.as_object_mut(), state.other.get(status::CLUSTER_KEY)) {
        obj.insert("last_seen".into(), seen.clone());
    }
    doc
}

/// The daemon's last record of the servers, in words.
fn last_seen(state: &State) -> Option<String> {
    let seen = state.other.get(status::CLUSTER_KEY)?;
    let servers: Vec<String> = seen
        .get("servers")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let at = seen.get("seen_at").and_then(serde_json::Value::as_u64);
    Some(format!(
        "last seen by the daemon: {} at {}",
        if servers.is_empty() {
            "(none)".to_string()
        } else {
            servers.join(", ")
        },
        at.map(crate::state::rfc3339)
            .unwrap_or_else(|| "-".to_string())
    ))
}
