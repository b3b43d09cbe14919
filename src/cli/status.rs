//! `irsa-agent status [--json]`: what the daemon last did and what it waits for, read from the
//! state file (`/var/lib/irsa-agent/state.json`), with every other feature's section.

use clap::Args as ClapArgs;

use super::{Exit, Global};
use crate::daemon::status::{self, DaemonStatus, Phase};
use crate::state::State;

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Reads /var/lib/irsa-agent/state.json (written by `irsa-agent run` on every change, and by apply, \
finalize and rotation) and says whether the daemon runs, whether everything is in sync, what \
failed and when it retries.

--json prints the state file's object plus \"running\" (see README, \"status --json\").
Exit status: 0 the daemon runs and everything is in sync; 2 it does not run, or is not in sync \
(waiting for an issuer, retrying, a held apiserver change); 1 the state cannot be read.")]
pub struct Args {
    /// Print one JSON object (the state file's sections plus `running`) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let state = State::load(&global.root)?;
    let daemon = DaemonStatus::from_state(&state);
    let running = daemon.as_ref().is_some_and(status::running);
    if args.json {
        let mut doc = serde_json::to_value(&state)?;
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("running".into(), serde_json::Value::Bool(running));
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        // The configuration only says whether rotation is enabled; status works without it
        // (and does not repeat the configuration's warnings).
        let rotation_enabled = crate::config::load(&global.root, global.config.as_deref())
            .ok()
            .map(|l| l.settings.rotation.enabled);
        print!("{}", status::render_human(&state, rotation_enabled));
    }
    let in_sync = daemon.is_some_and(|d| d.phase == Phase::InSync);
    Ok(if running && in_sync {
        Exit::OK
    } else {
        Exit::PENDING
    })
}
