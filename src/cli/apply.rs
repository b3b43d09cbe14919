//! `irsa-agent apply`: set the public issuer in the apiserver configuration, safely.

use clap::Args as ClapArgs;
use serde_json::json;

use super::edge_args::ApiserverArgs;
use super::{Exit, Global};
use crate::apiserver::apply::{Outcome, RestartOutcome};
use crate::apiserver::change::{self, Goal, RunOptions};
use crate::apiserver::flags;
use crate::apiserver::plan::{self, Plan};
use crate::apiserver::restart::{self, Restart};
use crate::config::{self, Settings, format_duration};

/// Options shared by `apply` and `finalize`.
#[derive(Debug, Clone, ClapArgs)]
pub struct RunArgs {
    /// Only report: exit 0 when nothing would change, 2 when changes are pending, 1 on error.
    #[arg(long)]
    pub check: bool,

    /// Print a unified diff of each file that changes (or would change).
    #[arg(long)]
    pub diff: bool,

    /// Print one JSON object (see README, "apply --json") instead of text.
    #[arg(long)]
    pub json: bool,

    /// Write the files but do not restart the apiserver; the change takes effect at its next
    /// restart (say so, and do it one server at a time).
    #[arg(long)]
    pub no_restart: bool,

    #[command(flatten)]
    pub apiserver: ApiserverArgs,
}

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Sets --service-account-issuer to the configured issuer FIRST (it signs) followed by every issuer \
accepted before (so existing tokens stay valid), pins --api-audiences to the audiences in force \
before, and sets --service-account-jwks-uri. Nothing else changes. k3s/RKE2: config.yaml and \
config.yaml.d/ (kube-apiserver-arg); kubeadm: /etc/kubernetes/manifests/kube-apiserver.yaml. \
Backups go to /var/lib/irsa-agent/backups/. After a restart it waits until the apiserver is ready \
and serves the new issuer, and restores the backup if it does not.

On a cluster switched by hand (default issuer removed, api-audiences=sts.amazonaws.com) it keeps \
the issuer and sts.amazonaws.com (the tokens pods hold carry it alone), accepts the default issuer \
again and puts the in-cluster audiences back in front; `irsa-agent finalize` removes \
sts.amazonaws.com after the longest token lifetime (README: \"A cluster you already switched by \
hand\").

--check also prints the cluster (\"cluster:\", the Leases in kube-system): where each server is in \
the issuer rollout, what the cluster does next, what signing waits for, and what this server's \
daemon would do next (accept-only, sign, or wait for named servers).

A second apply changes nothing. Exit status: 0 done or in sync; 2 changes pending (--check); 1 error.
On a cluster with several servers, run it on one server at a time (see README).")]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,

    /// Phase one on a cluster with several servers: add the configured issuer as an accepted
    /// issuer (last) without making it sign. Run it on every server, then run `apply` on each.
    #[arg(long)]
    pub accept_only: bool,

    /// Sign with the issuer although other apiservers of the cluster do not accept it yet (by
    /// their agents' Leases): they reject this server's tokens until they do. Without it,
    /// `apply` refuses then and says which servers must run `apply --accept-only` first.
    #[arg(long, conflicts_with = "accept_only")]
    pub ignore_cluster: bool,
}

impl RunArgs {
    /// How the apiserver is restarted and asked, as the use case takes it; the restart Lease
    /// is held as this command ([`change::command_holder`]; the daemon holds it as its node).
    pub fn options(&self) -> RunOptions {
        let node = self.apiserver.node();
        RunOptions {
            no_restart: self.no_restart,
            timeout: self.apiserver.timeout,
            poll: self.apiserver.poll_interval,
            request_timeout: self.apiserver.request_timeout(),
            unit: self.apiserver.unit.clone(),
            systemctl: self.apiserver.systemctl.clone(),
            apiserver_url: self.apiserver.apiserver_url.clone(),
            clock: std::sync::Arc::new(crate::clock::SystemClock),
            holder: change::command_holder(&node),
            node,
        }
    }
}

pub fn load_settings(global: &Global) -> anyhow::Result<Settings> {
    let loaded = config::load(&global.root, global.config.as_deref())?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    Ok(loaded.settings)
}

fn flags_json(f: &flags::ServiceAccountFlags) -> serde_json::Value {
    json!({
        "issuers": f.issuers,
        "api_audiences": f.api_audiences,
        "jwks_uri": f.jwks_uri(),
    })
}

/// The JSON result (documented in the README).
pub fn result_json(
    plan: &Plan,
    outcome: Option<&Outcome>,
    restart: &Restart,
    check: bool,
    extra: serde_json::Value,
) -> serde_json::Value {
    let files: Vec<_> = plan
        .changes
        .iter()
        .map(|c| {
            let written = outcome.and_then(|o| o.written.iter().find(|w| w.path == c.path));
            json!({
                "path": c.path,
                "action": if c.old.is_some() { "modify" } else { "create" },
                "backup": written.and_then(|w| w.backup.clone()),
                "diff": plan::unified_diff(c),
            })
        })
        .collect();
    let restarted = matches!(
        outcome.map(|o| &o.restart),
        Some(RestartOutcome::Verified { .. })
    );
    let restart_json = match outcome.map(|o| &o.restart) {
        _ if plan.in_sync() && !restarted => {
            json!({"status": "not-needed", "how": restart.describe()})
        }
        None => json!({"status": "pending", "how": restart.describe()}),
        Some(RestartOutcome::NotNeeded) => {
            json!({"status": "not-needed", "how": restart.describe()})
        }
        Some(RestartOutcome::Pending(r)) => json!({"status": "pending", "how": r.describe()}),
        Some(RestartOutcome::Verified {
            restart, waited, ..
        }) => json!({
            "status": "done",
            "how": restart.describe(),
            "waited_seconds": waited.as_secs(),
        }),
    };
    let mut out = json!({
        "changed": !plan.in_sync() || restarted,
        "in_sync": plan.in_sync(),
        "check": check,
        "distribution": plan.distribution.name(),
        "before": flags_json(&plan.before),
        "after": flags_json(&plan.after),
        "files": files,
        "backup_dir": outcome.and_then(|o| o.backup_dir.clone()),
        "restart": restart_json,
        "warnings": plan.warnings,
        "kubeadm_persistence": if plan.in_sync() { None } else { plan.kubeadm_note.clone() },
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (out.as_object_mut(), extra) {
        obj.extend(more);
    }
    out
}

fn list(values: &[String]) -> String {
    if values.is_empty() {
        "(none)".to_string()
    } else {
        values.join(", ")
    }
}

/// The human summary of a plan.
pub fn print_plan(plan: &Plan, diff: bool) {
    let b = &plan.before;
    let d = &plan.desired;
    let changed = |x: bool| if x { "" } else { " (unchanged)" };
    println!("distribution:  {}", plan.distribution);
    println!(
        "issuers:       {}{}",
        list(&d.issuers),
        changed(b.issuers != d.issuers)
    );
    if b.issuers != d.issuers {
        println!("  was:         {}", list(&b.issuers));
    }
    println!(
        "api-audiences: {}{}",
        d.api_audiences.join(","),
        changed(b.api_audiences.as_ref() != Some(&d.api_audiences))
    );
    if b.api_audiences.as_ref() != Some(&d.api_audiences) {
        println!(
            "  was:         {}",
            b.api_audiences
                .as_ref()
                .map(|a| a.join(","))
                .unwrap_or_else(|| format!("(unset: all issuers, {})", list(&b.issuers)))
        );
    }
    println!(
        "jwks-uri:      {}{}",
        d.jwks_uri,
        changed(b.jwks_uri() != Some(d.jwks_uri.as_str()))
    );
    for change in &plan.changes {
        println!(
            "{} {}",
            if change.old.is_some() {
                "edit:  "
            } else {
                "create:"
            },
            change.path.display()
        );
    }
    if diff {
        for change in &plan.changes {
            print!("{}", plan::unified_diff(change));
        }
    }
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let run = args.run;
    let result = apply(global, &run, args.accept_only, args.ignore_cluster);
    match result {
        Ok(code) => Ok(code),
        Err(err) if run.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "changed": false,
                    "error": super::error_chain(&err),
                }))?
            );
            log::error!("{}", super::error_chain(&err));
            Ok(Exit::FAILURE)
        }
        Err(err) => Err(err),
    }
}

fn apply(
    global: &Global,
    run: &RunArgs,
    accept_only: bool,
    ignore_cluster: bool,
) -> anyhow::Result<Exit> {
    let root = &global.root;
    let settings = load_settings(global)?;
    let options = run.options();
    let mut prepared = change::prepare(root, &settings, Goal::Sign { accept_only }, &options)?;
    if let Some(message) = &prepared.lost_change {
        log::warn!("{message}");
    }
    for warning in &prepared.plan.warnings {
        log::warn!("{warning}");
    }
    let restart = restart::restart_for(
        root,
        prepared.observed.distribution,
        run.apiserver.unit.as_deref(),
    );
    // In sync on disk, but is the running apiserver? (After `--no-restart`, or a run killed
    // between writing and restarting, or right after writing while the apiserver restarts.)
    // A change irsa-agent wrote is called applied only once the apiserver was seen serving it.
    prepared.look_at_running(root, &options)?;
    let pending_restart = prepared.pending_restart().map(str::to_string);
    let mut extra =
        json!({"lost_change": prepared.lost_change, "pending_restart": pending_restart});
    if run.check {
        // Where each server is in the issuer rollout and what this one does next (the daemon's
        // decision; `apply` itself does what its options say).
        let cluster = crate::cluster::read_host(
            root,
            &prepared.observed,
            run.apiserver.apiserver_url.clone(),
            options.request_timeout,
            &settings,
            &options.node,
        );
        if let Some(obj) = extra.as_object_mut() {
            obj.insert("cluster".into(), serde_json::to_value(&cluster)?);
        }
        let plan = &prepared.plan;
        if run.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&result_json(plan, None, &restart, true, extra))?
            );
        } else {
            print_plan(plan, run.diff);
            if let Some(message) = &pending_restart {
                println!("{message}");
            } else if plan.in_sync() {
                println!("in sync: nothing to change");
            } else {
                println!("changes pending: run `irsa-agent apply` to make them");
            }
            for line in crate::cluster::lines(&cluster) {
                println!("{line}");
            }
        }
        return Ok(if plan.in_sync() && pending_restart.is_none() {
            Exit::OK
        } else {
            Exit::PENDING
        });
    }
    if !accept_only && !ignore_cluster {
        signing_is_safe(root, run, &prepared.observed, &settings, &options.node)?;
    }
    let done = change::carry_out(root, &settings, &mut prepared, &options)?;
    let (plan, outcome) = (&prepared.plan, done.outcome);
    if run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result_json(
                plan,
                Some(&outcome),
                &restart,
                false,
                extra
            ))?
        );
    } else {
        print_plan(plan, run.diff);
        print_outcome(plan, &outcome);
        if accept_only && plan.desired.issuers.first() != Some(&settings.issuer) {
            println!(
                "{} is accepted but does not sign yet: once every server accepts it, run `irsa-agent apply` on each server, one at a time",
                settings.issuer
            );
        }
    }
    Ok(Exit::OK)
}

/// On several servers whose agents run, a server signs with a new issuer only once every
/// apiserver accepts it (the daemons' own rule, [`crate::rollout::decide`]): otherwise the
/// others reject the tokens it mints. Refuses, naming the servers, when they do not; and when
/// the cluster cannot be asked although this server's daemon last saw others. One server, a
/// cluster without a Lease API and a cluster without daemons (rolled out by hand) are not held.
fn signing_is_safe(
    root: &crate::host::HostRoot,
    run: &RunArgs,
    observed: &crate::apiserver::Observed,
    settings: &crate::config::Settings,
    node: &str,
) -> anyhow::Result<()> {
    let advice = "run `irsa-agent apply --accept-only` on every server first, one at a time (or let the daemons roll the issuer out: README, \"Several servers\"); `--ignore-cluster` signs anyway";
    let decided = crate::cluster::decide_host(
        root,
        observed,
        run.apiserver.apiserver_url.clone(),
        run.apiserver.request_timeout(),
        &settings.issuer,
        node,
    );
    match decided {
        Ok(crate::rollout::Decision::Sign) => Ok(()),
        Ok(crate::rollout::Decision::AcceptOnly) => anyhow::bail!(
            "refusing to sign with {} here: the other apiservers of this cluster do not all accept it yet, and this one does not either, so they would reject the tokens it mints; {advice}",
            settings.issuer
        ),
        Ok(crate::rollout::Decision::Wait(why)) => {
            anyhow::bail!(
                "refusing to sign with {} here: {why}; {advice}",
                settings.issuer
            )
        }
        Err(e) => {
            let servers = crate::daemon::host_apply::remembered_servers(root);
            let signs_already = observed.flags.issuers.first() == Some(&settings.issuer);
            if servers.len() > 1 && !signs_already {
                anyhow::bail!(
                    "refusing to sign with {} here: the cluster's Leases cannot be read ({e}), and this server was last seen with {}; {advice}",
                    settings.issuer,
                    servers.join(", ")
                );
            }
            log::debug!("cannot read the cluster's Leases ({e}); one server as last seen");
            Ok(())
        }
    }
}

pub fn print_outcome(plan: &Plan, outcome: &Outcome) {
    if plan.in_sync() && matches!(outcome.restart, RestartOutcome::NotNeeded) {
        println!("in sync: nothing to change");
        return;
    }
    for w in &outcome.written {
        match &w.backup {
            Some(b) => println!("changed {} (backup {})", w.path.display(), b.display()),
            None => println!("created {}", w.path.display()),
        }
    }
    match &outcome.restart {
        RestartOutcome::Pending(r) => println!(
            "restart pending: the apiserver still runs with the old flags until `{}`{}",
            r.describe(),
            if matches!(r, Restart::KubeletStaticPod) {
                " (kubelet picks up the manifest within about 20 s)"
            } else {
                ""
            }
        ),
        RestartOutcome::Verified {
            restart, waited, ..
        } => println!(
            "restarted ({}); the apiserver is ready and serves issuer {} after {}",
            restart.describe(),
            plan.desired
                .issuers
                .first()
                .map(String::as_str)
                .unwrap_or(""),
            format_duration(*waited)
        ),
        RestartOutcome::NotNeeded => {}
    }
    if let Some(note) = &plan.kubeadm_note {
        println!();
        print!("{note}");
    }
}
