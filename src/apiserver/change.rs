//! The one use case for "change the apiserver's flags": observe, plan (pure), carry out (write,
//! restart, verify, or roll back), record under the state lock.
//!
//! `irsa-agent apply`, `irsa-agent finalize` and the daemon's apiserver step all go through
//! [`prepare`] and [`carry_out`]; they differ only in their [`Goal`] and in how they report.
//!
//! - [`prepare`] reads the state, observes the host, and plans ([`super::plan::plan`] is pure: it
//!   sees only the observation and the target). Nothing is written.
//! - [`Prepared::look_at_running`] asks the running apiserver, when the files are already in
//!   sync, whether it serves what they say (a restart left pending by `--no-restart` or by a
//!   killed run, or a change irsa-agent wrote that was never seen served).
//! - [`carry_out`] writes and restarts ([`super::apply::execute`]), or resumes a pending restart
//!   ([`super::apply::resume`]), then records the result with [`State::update`] on the state
//!   file as it is then (a rotation step recorded meanwhile is kept).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::apply::{self as executor, ApplyError, Options, Outcome, RestartOutcome};
use super::plan::{self, Plan, Target};
use super::probe::{ApiserverProbe, KubeconfigProbe, Status};
use super::ready::{self, Patience};
use super::restart::{self, Restart, ServiceManager, Systemctl};
use super::{DetectError, Observed, PlanError, Source};
use crate::clock::Clock;
use crate::config::Settings;
use crate::host::HostRoot;
use crate::k8s::Api;
use crate::membership;
use crate::state::{self, State, StateError};

/// How the apiserver is restarted and asked (the command line's `ApiserverArgs` and
/// `--no-restart`).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Write the files, leave the restart to the operator.
    pub no_restart: bool,
    /// How long to wait for a restarted apiserver.
    pub timeout: Duration,
    /// How often to ask it while waiting.
    pub poll: Duration,
    /// The timeout of one request to it.
    pub request_timeout: Duration,
    /// The systemd unit to restart, when not detected.
    pub unit: Option<String>,
    /// The systemctl program.
    pub systemctl: PathBuf,
    /// The apiserver URL to ask, when not the kubeconfig's (or kubeadm's advertise address).
    pub apiserver_url: Option<String>,
    /// The clock the restart wait is measured on (the daemon's own).
    pub clock: Arc<dyn Clock>,
    /// This host's node name ([`crate::membership`]).
    pub node: String,
    /// Who holds the restart Lease while this process restarts the apiserver: the node name
    /// for the daemon, [`command_holder`] for a command run by hand. Told apart, the daemon
    /// giving back a turn left at the start of a step (by a run that was killed) cannot give
    /// back the turn of an `apply` running beside it, and neither takes the other's turn for
    /// its own.
    pub holder: String,
}

/// The restart Lease's holder for a command run by hand on `node` (`apply`, `finalize`):
/// `cp1 (irsa-agent, pid 4242)`, this process's own.
pub fn command_holder(node: &str) -> String {
    format!("{node} (irsa-agent, pid {})", std::process::id())
}

/// What the change is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// Make the configured issuer sign (first), keeping every issuer accepted before. With
    /// `accept_only`, phase one of a rollout on several servers: accept it (last) without
    /// making it sign.
    Sign { accept_only: bool },
    /// Retire these old issuers (`finalize`, once no token of theirs can be alive).
    Retire(Vec<String>),
}

/// Why nothing (or not everything) was changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The apiserver configuration could not be read.
    #[error(transparent)]
    Observe(#[from] DetectError),
    /// The plan refuses (a file it cannot edit safely, a key file the apiserver would refuse).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The host needs a person before anything is written (settings on the unit's command
    /// line, no way to verify a restart).
    #[error("{0}")]
    Refused(String),
    /// A change irsa-agent made is unverified and the apiserver cannot be asked now.
    #[error("{0}")]
    Unverified(String),
    /// Another server's apiserver is restarting (it holds the restart Lease), or the Lease
    /// cannot be taken: nothing was changed; try again later.
    #[error("{0}")]
    NotMyTurn(String),
    /// Writing, restarting or verifying failed; [`ApplyError::RolledBack`] when the change was
    /// undone.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// The apiserver as it is reached: how to restart it, and the probe that asks it.
pub struct Edges {
    pub restart: Restart,
    pub services: Box<dyn ServiceManager>,
    pub probe: Option<Box<dyn ApiserverProbe>>,
    pub probe_error: Option<String>,
    /// The apiserver the restart Lease is taken through (the probe's).
    pub api: Option<Api>,
}

/// The real edges: systemctl (or kubelet's static pod) and the admin kubeconfig's apiserver.
pub fn edges(root: &HostRoot, observed: &Observed, run: &RunOptions) -> Edges {
    let restart = restart::restart_for(root, observed.distribution, run.unit.as_deref());
    let services: Box<dyn ServiceManager> = Box::new(Systemctl {
        program: run.systemctl.clone(),
    });
    let (kubeconfig, url) = super::probe::target(observed);
    let url = run.apiserver_url.clone().or(url);
    match KubeconfigProbe::new(root, &kubeconfig, url, run.request_timeout) {
        Ok(probe) => Edges {
            restart,
            services,
            api: Some(probe.api().clone()),
            probe: Some(Box::new(probe)),
            probe_error: None,
        },
        Err(e) => Edges {
            restart,
            services,
            probe: None,
            probe_error: Some(e),
            api: None,
        },
    }
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

/// A plan and what it was computed from.
pub struct Prepared {
    pub goal: Goal,
    /// The state file when the plan was made (for reading only: records go through
    /// [`State::update`]).
    pub state: State,
    pub observed: Observed,
    pub plan: Plan,
    /// The change irsa-agent made earlier had been undone (`kubeadm upgrade` regenerated the
    /// manifest): why (re-applied now).
    pub lost_change: Option<String>,
    /// What the running apiserver says, once asked ([`Prepared::look_at_running`]).
    pub running: Option<Running>,
    edges: Option<Edges>,
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

/// k3s/RKE2 settings on the unit's command line would override or bypass what apply edits.
pub fn refuse_command_line_flags(
    root: &HostRoot,
    observed: &Observed,
    run: &RunOptions,
) -> Result<(), ChangeError> {
    let Source::Rancher(r) = &observed.source else {
        return Ok(());
    };
    let Restart::Unit(unit) =
        restart::restart_for(root, observed.distribution, run.unit.as_deref())
    else {
        return Ok(());
    };
    let problems = restart::command_line_problems(root, &unit, r.flavor.program());
    if !problems.is_empty() {
        return Err(ChangeError::Refused(problems.join("\n")));
    }
    Ok(())
}

/// Reads the state, observes the host and plans `goal`. Writes nothing.
pub fn prepare(
    root: &HostRoot,
    settings: &Settings,
    goal: Goal,
    run: &RunOptions,
) -> Result<Prepared, ChangeError> {
    let state = State::load(root)?;
    let observed = super::observe(root, settings.distribution)?;
    refuse_command_line_flags(root, &observed, run)?;
    let accept_only = matches!(goal, Goal::Sign { accept_only: true });
    let lost_change = match goal {
        Goal::Sign { accept_only: false } => lost_change(&state, settings, &observed),
        _ => None,
    };
    let issuer_state = state.issuer.as_ref();
    let (remembered, retire) = match &goal {
        Goal::Sign { .. } => (
            issuer_state.map(|s| s.previous.clone()).unwrap_or_default(),
            Vec::new(),
        ),
        Goal::Retire(retire) => (Vec::new(), retire.clone()),
    };
    let target = Target {
        issuer: settings.issuer.clone(),
        jwks_uri: settings.jwks_uri.clone(),
        remembered,
        retire,
        retired: issuer_state.map(|s| s.retired.clone()).unwrap_or_default(),
        accept_only,
        // finalize also removes the external audiences a cluster switched by hand had
        // (sts.amazonaws.com) once the in-cluster ones are back; apply keeps them.
        drop_external_audiences: matches!(goal, Goal::Retire(_)),
    };
    let plan = plan::plan(&observed, &target)?;
    Ok(Prepared {
        goal,
        state,
        observed,
        plan,
        lost_change,
        running: None,
        edges: None,
    })
}

impl Prepared {
    /// The issuer the plan makes sign.
    pub fn signing(&self) -> String {
        self.plan
            .desired
            .issuers
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// When the files are in sync (and the restart is not left to the operator), asks the
    /// running apiserver whether it serves the signing issuer; see [`Running`]. Fails (nothing
    /// is declared applied) when irsa-agent's change is unverified and there is no way to ask.
    pub fn look_at_running(
        &mut self,
        root: &HostRoot,
        run: &RunOptions,
    ) -> Result<(), ChangeError> {
        let sign = matches!(self.goal, Goal::Sign { .. });
        if self.running.is_some() || !sign || !self.plan.in_sync() || run.no_restart {
            return Ok(());
        }
        let want = self.signing();
        let unverified = executor::unverified_change(&self.state, &want);
        let mut e = edges(root, &self.observed, run);
        let running = match e.probe.as_mut() {
            Some(probe) => {
                let status = crate::runtime::block_on(probe.check());
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
            // are reported in sync and the switch stays unverified (finalize keeps waiting).
            None if self
                .state
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
                Some(why) => {
                    return Err(ChangeError::Unverified(format!(
                        "{why}, and it cannot be asked ({}): nothing is declared applied; fix that and run apply again",
                        e.probe_error.clone().unwrap_or_default()
                    )));
                }
                None => Running::Settled,
            },
        };
        if let Running::Pending(message) = &running {
            log::warn!("{message}");
        }
        self.running = Some(running);
        self.edges = Some(e);
        Ok(())
    }

    /// Why a restart is still pending, once [`Prepared::look_at_running`] asked.
    pub fn pending_restart(&self) -> Option<&str> {
        match &self.running {
            Some(Running::Pending(message)) => Some(message),
            _ => None,
        }
    }
}

/// What [`carry_out`] did.
pub struct Done {
    pub outcome: Outcome,
    /// The signing issuer was seen served for the first time since irsa-agent wrote it.
    pub seen_serving: bool,
    /// The files are written but the running apiserver has not been restarted with them yet.
    pub restart_pending: bool,
}

/// Carries out a prepared plan: writes and restarts, or resumes a pending restart, or nothing
/// when in sync; then records the result under the state lock.
pub fn carry_out(
    root: &HostRoot,
    settings: &Settings,
    prepared: &mut Prepared,
    run: &RunOptions,
) -> Result<Done, ChangeError> {
    let opts = Options {
        no_restart: run.no_restart,
        timeout: run.timeout,
        poll: run.poll,
        backups: settings.backups,
        clock: run.clock.clone(),
    };
    let issuer = prepared.signing();
    prepared.look_at_running(root, run)?;
    let seen_serving = matches!(prepared.running, Some(Running::SeenServing));
    let outcome = if !prepared.plan.in_sync() {
        let edges = match prepared.edges.take() {
            Some(e) => e,
            None => edges(root, &prepared.observed, run),
        };
        execute_plan(root, edges, &prepared.plan, run, &opts)?
    } else {
        let restart = match (&prepared.running, prepared.edges.as_mut()) {
            (Some(Running::Pending(_)), Some(e)) => match e.probe.as_mut() {
                Some(probe) => {
                    let turn = Turn::take(e.api.as_ref(), run)?;
                    let resumed = crate::runtime::block_on(executor::resume(
                        root,
                        &e.restart,
                        &issuer,
                        prepared.state.in_flight().as_ref(),
                        e.services.as_mut(),
                        probe.as_mut(),
                        &opts,
                    ));
                    Turn::give_back(turn);
                    resumed?
                }
                None => RestartOutcome::NotNeeded,
            },
            _ => RestartOutcome::NotNeeded,
        };
        Outcome {
            written: Vec::new(),
            backup_dir: None,
            restart,
        }
    };
    let now = state::unix_now();
    let restart_pending = match &prepared.goal {
        Goal::Retire(retire) => {
            State::update(root, |s| {
                executor::record_finalize(s, retire, &outcome, now)
            })?;
            matches!(outcome.restart, RestartOutcome::Pending(_))
        }
        // Phase one of a rollout does not switch the signing issuer: nothing to remember yet.
        Goal::Sign { .. } if issuer != settings.issuer => {
            matches!(outcome.restart, RestartOutcome::Pending(_))
        }
        Goal::Sign { .. } => State::update(root, |s| {
            executor::record(s, &prepared.plan, &outcome, now);
            if seen_serving {
                executor::record_seen_serving(s, &issuer, now);
            }
            s.issuer
                .as_ref()
                .is_some_and(|i| i.issuer == issuer && i.pending_restart_since.is_some())
        })?,
    };
    Ok(Done {
        outcome,
        seen_serving,
        restart_pending,
    })
}

/// Carries out a plan with the real service manager and probe (`edges`).
fn execute_plan(
    root: &HostRoot,
    mut edges: Edges,
    plan: &Plan,
    run: &RunOptions,
    opts: &Options,
) -> Result<Outcome, ChangeError> {
    let kept = plan.kept_external_audiences();
    if run.no_restart && !kept.is_empty() {
        return Err(ChangeError::Refused(format!(
            "refusing --no-restart: this change puts the in-cluster audiences {} back into --api-audiences, and `irsa-agent finalize` may remove {} only the longest token lifetime after the apiserver restarted with them; on a cluster that already signs with the issuer, that restart cannot be seen from outside, so irsa-agent must do it: run `irsa-agent apply` without --no-restart (on several servers, one server at a time)",
            plan.restored_audiences.join(", "),
            kept.join(", ")
        )));
    }
    let mut probe: Box<dyn ApiserverProbe> = match edges.probe.take() {
        Some(p) => p,
        None if run.no_restart => Box::new(NoProbe),
        None => {
            return Err(ChangeError::Refused(format!(
                "cannot verify the apiserver after a restart, so nothing was changed: {}; fix that, or use --no-restart to only write the files",
                edges.probe_error.unwrap_or_default()
            )));
        }
    };
    // One apiserver of the cluster restarts at a time: the turn is held from before the files
    // are written until the apiserver is seen serving them (or they were rolled back).
    let turn = match run.no_restart {
        true => None,
        false => Turn::take(edges.api.as_ref(), run)?,
    };
    let executed = crate::runtime::block_on(executor::execute(
        root,
        plan,
        &edges.restart,
        edges.services.as_mut(),
        probe.as_mut(),
        opts,
        state::unix_now(),
    ));
    Turn::give_back(turn);
    Ok(executed?)
}

/// A probe for `--no-restart`, which never asks.
struct NoProbe;

#[async_trait::async_trait]
impl ApiserverProbe for NoProbe {
    async fn check(&mut self) -> Status {
        Status {
            ready: false,
            issuer: None,
            detail: "not probed".into(),
        }
    }
}

/// How long the holder of the restart Lease waits for a peer apiserver that is not in the
/// `kubernetes` Endpoints before it reports the wait as a failure (retried on the daemon's
/// back-off): long enough for a peer just restarted to be listed again (measured: within 0.3 s
/// of its `/readyz`), short enough that `status` soon names the apiserver waited for.
const PEER_GRACE: Duration = Duration::from_secs(10);

/// `Err(why)` when another apiserver of the cluster is down ([`membership::peers_down`]: an
/// agent's apiserver that does not announce itself, or one missing from the `kubernetes`
/// Endpoints): this one must not restart now. Reading the identity Leases or the Endpoints
/// failing is a reason to wait too (nothing known). The Endpoints listing nothing (no apiserver
/// keeps them) cannot tell: logged, not waited for.
async fn peers_serve(client: &kube::Client, node: &str, now: i64) -> Result<(), String> {
    let cannot = |e: membership::Error| {
        format!(
            "cannot tell whether every other apiserver serves, so this one does not restart yet: {e}"
        )
    };
    // One list: the identity Leases and the agents' Leases, read together.
    let leases = membership::list(client).await.map_err(cannot)?;
    let apiservers = membership::apiservers_of(&leases, now);
    // Every agent's Lease, live or expired: an agent whose apiserver is down cannot renew it
    // (it talks to its own apiserver), and a server powered off renews nothing, yet its
    // apiserver is missing all the same (measured: an apiserver kept down longer than its
    // agent's Lease, three resyncs, was forgotten and a peer restarted: two down).
    let agents: Vec<String> = membership::view_of(&leases, now)
        .agents
        .into_iter()
        .map(|a| a.node)
        .collect();
    let endpoints = membership::endpoints(client).await.map_err(cannot)?;
    let peers = membership::peers_down(&apiservers, &agents, &endpoints, node);
    if peers == membership::Peers::Unknown {
        log::info!(
            "the kubernetes Endpoints list no address (no apiserver keeps them: --endpoint-reconciler-type=none?): restarting without knowing whether the other apiservers ({}) serve",
            apiservers
                .iter()
                .map(|a| a.host.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match peers.waiting() {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// One try at the restart turn ([`try_turn`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This node holds the restart Lease and every other apiserver serves.
    Held,
    /// Another node holds it until `until` (Unix seconds).
    Busy { holder: String, until: i64 },
    /// This node took the Lease but another apiserver is down: the Lease was given back.
    PeerDown(String),
}

/// Takes (or renews) the restart Lease for `node` for `seconds` and checks that every other
/// apiserver of the cluster serves; when one does not, gives the Lease back. One try of
/// [`wait_for_turn`] on a real cluster: `apply`, the daemon and rotation all come here.
pub async fn try_turn(
    client: &kube::Client,
    node: &str,
    seconds: i32,
    now: i64,
) -> Result<Attempt, membership::Error> {
    try_turn_as(client, node, node, seconds, now).await
}

/// [`try_turn`] for `node`'s apiserver, holding the Lease as `holder` ([`RunOptions::holder`]).
pub async fn try_turn_as(
    client: &kube::Client,
    node: &str,
    holder: &str,
    seconds: i32,
    now: i64,
) -> Result<Attempt, membership::Error> {
    match membership::acquire_restart(client, holder, seconds, now).await? {
        membership::Restart::Busy { holder, until } => Ok(Attempt::Busy { holder, until }),
        // Holding the turn, no other agent starts a restart: is every other apiserver serving?
        membership::Restart::Held { .. } => match peers_serve(client, node, now).await {
            Ok(()) => Ok(Attempt::Held),
            Err(why) => {
                if let Err(e) = membership::release_restart(client, holder).await {
                    log::debug!("cannot give the restart Lease back: {e}");
                }
                Ok(Attempt::PeerDown(why))
            }
        },
    }
}

/// How a wait for the restart Lease ended ([`wait_for_turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    /// This node holds the restart Lease: give it back after the restart.
    Held,
    /// The apiserver has no Lease API (a stand-in apiserver on a single host): nothing to
    /// coordinate through.
    NoLeaseApi,
    /// This server's apiserver does not serve (unreachable, or answering 5xx): restarting it
    /// takes no serving apiserver away from the cluster (and a broken one can still be
    /// repaired).
    Down,
}

/// Waits for this node's turn to restart its apiserver, for `patience`: `attempt` tries to
/// take it at `now` (Unix seconds; [`try_turn`]). The one wait behind `apply`, `finalize`, the
/// daemon's apiserver step and rotation's restarts. A peer apiserver down for [`PEER_GRACE`]
/// ends the wait (nothing changed; the daemon retries on its back-off). The error says who or
/// what it waited for last.
pub async fn wait_for_turn(
    clock: &dyn Clock,
    patience: Patience,
    mut attempt: impl AsyncFnMut(i64) -> Result<Attempt, membership::Error>,
) -> Result<Turned, String> {
    let mut turned = Turned::Held;
    // A peer apiserver seen down, since when (monotonic).
    let mut peer_down_since: Option<Duration> = None;
    let mut gave_up: Option<String> = None;
    let waited = ready::wait_until(
        "waiting for this server's turn to restart its apiserver (one at a time)",
        clock,
        patience,
        async || {
            let now = i64::try_from(clock.now()).unwrap_or(i64::MAX);
            match attempt(now).await {
                Ok(Attempt::Held) => Ok(()),
                Ok(Attempt::Busy { holder, until }) => Err(format!(
                    "{holder} is restarting its apiserver (its turn ends by {})",
                    state::rfc3339(u64::try_from(until).unwrap_or(0))
                )),
                Ok(Attempt::PeerDown(why)) => {
                    let since = *peer_down_since.get_or_insert(clock.monotonic());
                    if clock.monotonic().saturating_sub(since) >= PEER_GRACE {
                        gave_up = Some(why);
                        return Ok(());
                    }
                    Err(why)
                }
                Err(e) if e.no_lease_api() => {
                    turned = Turned::NoLeaseApi;
                    Ok(())
                }
                // This apiserver does not serve (down, restarting, or failing): restarting it
                // takes no serving apiserver away from the cluster.
                Err(e) if !e.served() => {
                    turned = Turned::Down;
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    match waited {
        Ok(_) if gave_up.is_some() => Err(format!(
            "{}; nothing was changed",
            gave_up.unwrap_or_default()
        )),
        Ok(_) => {
            match turned {
                Turned::NoLeaseApi => {
                    log::debug!("the apiserver has no Lease API: restarting without a turn")
                }
                Turned::Down => log::info!(
                    "this server's apiserver does not serve now: restarting it without the restart Lease (it takes no serving apiserver away)"
                ),
                Turned::Held => {}
            }
            Ok(turned)
        }
        Err(last) => Err(format!(
            "not this server's turn to restart its apiserver after {}: {last}; nothing was changed",
            crate::config::format_duration(patience.timeout)
        )),
    }
}

/// This host's turn to restart its apiserver: the cluster-wide restart Lease
/// ([`membership::acquire_restart`]). Held from before the files are written until the
/// apiserver is seen serving them or they were rolled back, so that on several servers one
/// apiserver restarts at a time (with k3s's embedded etcd, two at once can cost quorum), and
/// none while another apiserver is down (see [`crate::membership`], "No restart while another
/// apiserver is down"). The Lease lasts the restart timeout plus a minute: a holder that dies
/// frees it by then.
struct Turn {
    client: kube::Client,
    holder: String,
}

impl Turn {
    /// Waits for the restart Lease, for up to twice the restart timeout (another server's
    /// restart and verification). Once it holds the Lease, every other apiserver of the cluster
    /// must be serving ([`peers_serve`]): when one is down, the Lease is given back, and after
    /// [`PEER_GRACE`] the wait ends as [`ChangeError::NotMyTurn`] naming it (nothing changed;
    /// the daemon retries on its back-off). `None` when there is nothing to coordinate through: the
    /// apiserver has no Lease API (a stand-in apiserver on a single host), or this server's
    /// apiserver does not serve at all (unreachable, or answering 5xx), so that restarting it
    /// cannot take a second apiserver down (and a broken one can still be repaired).
    fn take(api: Option<&Api>, run: &RunOptions) -> Result<Option<Turn>, ChangeError> {
        let Some(api) = api else {
            return Err(ChangeError::NotMyTurn(
                "cannot take the restart Lease: no way to reach the apiserver".to_string(),
            ));
        };
        let (node, holder) = (run.node.clone(), run.holder.clone());
        let lease_seconds = i32::try_from(run.timeout.as_secs() + 60).unwrap_or(i32::MAX);
        let patience = Patience {
            timeout: run.timeout * 2,
            poll: run.poll.max(Duration::from_secs(1)),
        };
        let clock = run.clock.clone();
        crate::runtime::block_on(async {
            let client = api.client().map_err(|e| {
                ChangeError::NotMyTurn(format!("cannot take the restart Lease: {e}"))
            })?;
            let turned = wait_for_turn(clock.as_ref(), patience, async |now| {
                try_turn_as(&client, &node, &holder, lease_seconds, now).await
            })
            .await
            .map_err(ChangeError::NotMyTurn)?;
            Ok(match turned {
                Turned::Held => Some(Turn { client, holder }),
                Turned::NoLeaseApi | Turned::Down => None,
            })
        })
    }

    /// Gives the restart Lease back (when it fails, the Lease expires by itself).
    fn give_back(turn: Option<Turn>) {
        let Some(turn) = turn else {
            return;
        };
        let released =
            crate::runtime::block_on(membership::release_restart(&turn.client, &turn.holder));
        if let Err(e) = released {
            log::warn!("cannot give the restart Lease back (it expires by itself): {e}");
        }
    }
}
