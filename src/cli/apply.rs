//! `irsa-agent apply`: set the public issuer in the apiserver configuration, safely.

use anyhow::bail;
use clap::Args as ClapArgs;
use serde_json::json;

use super::edge_args::ApiserverArgs;
use super::{Exit, Global};
use crate::apiserver::apply::{self as executor, Options, Outcome, RestartOutcome};
use crate::apiserver::plan::{self, Plan, Target};
use crate::apiserver::probe::{ApiserverProbe, KubeconfigProbe};
use crate::apiserver::restart::{self, Restart, ServiceManager, Systemctl};
use crate::apiserver::{self, Observed, Source, flags};
use crate::config::{self, Settings, format_duration};
use crate::host::HostRoot;
use crate::state::{self, State};

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

A second apply changes nothing. Exit status: 0 done or in sync; 2 changes pending (--check); 1 error.
On a cluster with several servers, run it on one server at a time (see README).")]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,

    /// Phase one on a cluster with several servers: add the configured issuer as an accepted
    /// issuer (last) without making it sign. Run it on every server, then run `apply` on each.
    #[arg(long)]
    pub accept_only: bool,
}

/// The apiserver as the CLI reaches it.
pub struct Edges {
    pub restart: Restart,
    pub services: Box<dyn ServiceManager>,
    pub probe: Option<Box<dyn ApiserverProbe>>,
    pub probe_error: Option<String>,
}

pub fn edges(root: &HostRoot, observed: &Observed, run: &RunArgs) -> Edges {
    let restart = restart::restart_for(root, observed.distribution, run.apiserver.unit.as_deref());
    let services: Box<dyn ServiceManager> = Box::new(Systemctl {
        program: run.apiserver.systemctl.clone(),
    });
    let (kubeconfig, url) = crate::apiserver::probe::target(observed);
    let url = run.apiserver.apiserver_url.clone().or(url);
    let request_timeout = run.apiserver.request_timeout();
    match KubeconfigProbe::new(root, &kubeconfig, url, request_timeout) {
        Ok(probe) => Edges {
            restart,
            services,
            probe: Some(Box::new(probe)),
            probe_error: None,
        },
        Err(e) => Edges {
            restart,
            services,
            probe: None,
            probe_error: Some(e),
        },
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

/// Why the host's issuer no longer is the one irsa-agent set, if that is the case.
pub fn lost_change(state: &State, settings: &Settings, observed: &Observed) -> Option<String> {
    let st = state.issuer.as_ref()?;
    let at = st.switched_at?;
    if st.issuer != settings.issuer || observed.flags.issuers.first() == Some(&st.issuer) {
        return None;
    }
    let cause = match observed.distribution {
        crate::config::Distribution::Kubeadm => {
            "kube-apiserver.yaml was regenerated, probably by `kubeadm upgrade`"
        }
        _ => "the configuration was changed since",
    };
    Some(format!(
        "the apiserver no longer signs with {} (irsa-agent set it on {}): {cause}; re-applying",
        st.issuer,
        state::rfc3339(at)
    ))
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let run = args.run;
    let result = apply(global, &run, args.accept_only);
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

fn apply(global: &Global, run: &RunArgs, accept_only: bool) -> anyhow::Result<Exit> {
    let root = &global.root;
    let settings = load_settings(global)?;
    let state = State::load(root)?;
    let observed = apiserver::observe(root, settings.distribution)?;
    refuse_command_line_flags(root, &observed, run)?;
    let lost = if accept_only {
        None
    } else {
        lost_change(&state, &settings, &observed)
    };
    if let Some(message) = &lost {
        log::warn!("{message}");
    }
    let remembered = state
        .issuer
        .as_ref()
        .map(|s| s.previous.clone())
        .unwrap_or_default();
    let retired = state
        .issuer
        .as_ref()
        .map(|s| s.retired.clone())
        .unwrap_or_default();
    let target = Target {
        issuer: settings.issuer.clone(),
        jwks_uri: settings.jwks_uri.clone(),
        remembered,
        retire: Vec::new(),
        retired,
        accept_only,
        drop_external_audiences: false,
    };
    let plan = plan::plan(&observed, &target)?;
    for warning in &plan.warnings {
        log::warn!("{warning}");
    }
    let restart = restart::restart_for(root, observed.distribution, run.apiserver.unit.as_deref());
    // In sync on disk, but is the running apiserver? (After `--no-restart`, or a run killed
    // between writing and restarting, or right after writing while the apiserver restarts.)
    // A change irsa-agent wrote is called applied only once the apiserver was seen serving it.
    let mut edges_for_pending = None;
    let mut pending_restart: Option<String> = None;
    let mut seen_serving = false;
    if plan.in_sync() && !run.no_restart {
        let want = plan.desired.issuers.first().cloned().unwrap_or_default();
        let (e, running) = running_check(root, &observed, run, &state, &want)?;
        match running {
            Running::Settled => {}
            Running::SeenServing => seen_serving = true,
            Running::Pending(message) => pending_restart = Some(message),
        }
        edges_for_pending = Some(e);
    }
    if let Some(message) = &pending_restart {
        log::warn!("{message}");
    }
    let extra = json!({"lost_change": lost, "pending_restart": pending_restart});
    if run.check {
        if run.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&result_json(&plan, None, &restart, true, extra))?
            );
        } else {
            print_plan(&plan, run.diff);
            if let Some(message) = &pending_restart {
                println!("{message}");
            } else if plan.in_sync() {
                println!("in sync: nothing to change");
            } else {
                println!("changes pending: run `irsa-agent apply` to make them");
            }
        }
        return Ok(if plan.in_sync() && pending_restart.is_none() {
            Exit::OK
        } else {
            Exit::PENDING
        });
    }
    let outcome = match (plan.in_sync(), pending_restart.is_some(), edges_for_pending) {
        (true, true, Some(mut e)) => {
            let issuer = plan.desired.issuers.first().cloned().unwrap_or_default();
            let opts = Options {
                no_restart: false,
                timeout: run.apiserver.timeout,
                poll: run.apiserver.poll_interval,
                backups: settings.backups,
            };
            let mut probe = e
                .probe
                .take()
                .ok_or_else(|| anyhow::anyhow!("internal error: the probe went away"))?;
            let in_flight = State::load(root)?.in_flight();
            let restarted = executor::resume(
                root,
                &e.restart,
                &issuer,
                in_flight.as_ref(),
                e.services.as_mut(),
                probe.as_mut(),
                &opts,
            )?;
            Outcome {
                written: Vec::new(),
                backup_dir: None,
                restart: restarted,
            }
        }
        (true, _, _) => Outcome {
            written: Vec::new(),
            backup_dir: None,
            restart: RestartOutcome::NotNeeded,
        },
        (false, _, _) => execute_plan(root, &observed, &plan, run, &settings.backups)?,
    };
    // Phase one of a rollout does not switch the signing issuer: nothing to remember yet.
    if plan.desired.issuers.first() == Some(&settings.issuer) {
        let now = state::unix_now();
        State::update(root, |s| {
            executor::record(s, &plan, &outcome, now);
            if seen_serving {
                executor::record_seen_serving(s, &settings.issuer, now);
            }
        })?;
    }
    if run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result_json(
                &plan,
                Some(&outcome),
                &restart,
                false,
                extra
            ))?
        );
    } else {
        print_plan(&plan, run.diff);
        print_outcome(&plan, &outcome);
        if accept_only && plan.desired.issuers.first() != Some(&settings.issuer) {
            println!(
                "{} is accepted but does not sign yet: once every server accepts it, run `irsa-agent apply` on each server, one at a time",
                settings.issuer
            );
        }
    }
    Ok(Exit::OK)
}

/// What the running apiserver says about a configuration that is in sync on disk.
pub enum Running {
    /// Nothing to do: it serves the issuer (seen before), or the change is not irsa-agent's
    /// and it cannot be asked now.
    Settled,
    /// It serves the issuer, seen now for the first time since irsa-agent wrote the change.
    SeenServing,
    /// It must be waited for and verified (restarted when it serves another issuer, the
    /// change rolled back when it does not come): why.
    Pending(String),
}

/// Asks the running apiserver whether it serves `want`; see [`Running`]. Fails (nothing is
/// declared applied) when irsa-agent's change is unverified and there is no way to ask.
pub fn running_check(
    root: &HostRoot,
    observed: &Observed,
    run: &RunArgs,
    state: &State,
    want: &str,
) -> anyhow::Result<(Edges, Running)> {
    let unverified = executor::unverified_change(state, want);
    let mut e = edges(root, observed, run);
    let running = match e.probe.as_mut() {
        Some(probe) => {
            let status = probe.check();
            match (status.ready, status.issuer) {
                (true, Some(serving)) if serving != want => Running::Pending(format!(
                    "the configuration already says {want}, but the running apiserver still signs with {serving}: a restart is pending"
                )),
                (true, Some(_)) if unverified.is_some() => Running::SeenServing,
                (true, Some(_)) => Running::Settled,
                (_, _) => match &unverified {
                    Some(why) => Running::Pending(format!(
                        "{why}, and it does not answer now ({}): waiting for it, to verify the change (and roll it back if it does not come)",
                        status.detail
                    )),
                    None => {
                        log::info!(
                            "the running apiserver does not answer ({}); the configuration is in sync and irsa-agent has no change of its own to verify",
                            status.detail
                        );
                        Running::Settled
                    }
                },
            }
        }
        // After `--no-restart` the restart is the operator's: with no way to ask, the files
        // are reported in sync and the switch stays unverified (finalize keeps waiting for it).
        None if state
            .in_flight()
            .filter(|c| c.issuer == want)
            .is_none_or(|c| c.no_restart) =>
        {
            if let Some(why) = &unverified {
                log::warn!(
                    "{why}; it cannot be asked ({}), so the change stays unverified",
                    e.probe_error.clone().unwrap_or_default()
                );
            }
            Running::Settled
        }
        None => match unverified {
            Some(why) => bail!(
                "{why}, and it cannot be asked ({}): nothing is declared applied; fix that and run apply again",
                e.probe_error.clone().unwrap_or_default()
            ),
            None => Running::Settled,
        },
    };
    Ok((e, running))
}

/// k3s/RKE2 settings on the unit's command line would override or bypass what apply edits.
pub fn refuse_command_line_flags(
    root: &HostRoot,
    observed: &Observed,
    run: &RunArgs,
) -> anyhow::Result<()> {
    let Source::Rancher(r) = &observed.source else {
        return Ok(());
    };
    let Restart::Unit(unit) =
        restart::restart_for(root, observed.distribution, run.apiserver.unit.as_deref())
    else {
        return Ok(());
    };
    let problems = restart::command_line_problems(root, &unit, r.flavor.program());
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// Carries out a plan with the real service manager and probe (or the injected fakes).
pub fn execute_plan(
    root: &HostRoot,
    observed: &Observed,
    plan: &Plan,
    run: &RunArgs,
    backups: &crate::config::Backups,
) -> anyhow::Result<Outcome> {
    let kept = plan.kept_external_audiences();
    if run.no_restart && !kept.is_empty() {
        bail!(
            "refusing --no-restart: this change puts the in-cluster audiences {} back into --api-audiences, and `irsa-agent finalize` may remove {} only the longest token lifetime after the apiserver restarted with them; on a cluster that already signs with the issuer, that restart cannot be seen from outside, so irsa-agent must do it: run `irsa-agent apply` without --no-restart (on several servers, one server at a time)",
            plan.restored_audiences.join(", "),
            kept.join(", ")
        );
    }
    let mut edges = edges(root, observed, run);
    let opts = Options {
        no_restart: run.no_restart,
        timeout: run.apiserver.timeout,
        poll: run.apiserver.poll_interval,
        backups: *backups,
    };
    let mut probe: Box<dyn ApiserverProbe> = match edges.probe.take() {
        Some(p) => p,
        None if run.no_restart => Box::new(NoProbe),
        None => bail!(
            "cannot verify the apiserver after a restart, so nothing was changed: {}; fix that, or use --no-restart to only write the files",
            edges.probe_error.unwrap_or_default()
        ),
    };
    let outcome = executor::execute(
        root,
        plan,
        &edges.restart,
        edges.services.as_mut(),
        probe.as_mut(),
        &opts,
        state::unix_now(),
    )?;
    Ok(outcome)
}

/// A probe for `--no-restart`, which never asks.
struct NoProbe;

impl ApiserverProbe for NoProbe {
    fn check(&mut self) -> crate::apiserver::probe::Status {
        crate::apiserver::probe::Status {
            ready: false,
            issuer: None,
            detail: "not probed".into(),
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
