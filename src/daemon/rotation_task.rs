//! Key rotation as a scheduled task of the daemon ([`crate::rotation`] on [`ScheduledTask`]).
//!
//! The task looks at the saved rotation state after every converge and when the rotation's next
//! step is due. It steps the rotation when a step is due (rotation enabled, or a rotation already
//! in progress), and after every converge while a rotation is between `trusted` and `draining`
//! (the step then only checks that the host still has the rotation's keys, e.g. after a
//! `kubeadm upgrade` rewrote the manifests, and puts them back). Steps run on a blocking thread
//! with a runtime of their own: one may restart the apiserver (`systemctl restart k3s` waits for
//! k3s to be up) and must neither stall the daemon's loop (watchdog) nor be cut off by SIGTERM.
//! The new key is published ahead of use through [`ScheduledTask::extra_keys`], so a resync
//! never drops it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::tasks::{ScheduledTask, TaskContext, TaskReason};
use crate::host::HostRoot;
use crate::keys::PublicKey;
use crate::rotation::follow::{Look, Looked};
use crate::rotation::{self, HostEdges, Options, PhaseName};

/// The rotation task.
pub struct RotationTask {
    pub root: HostRoot,
    pub edges: HostEdges,
    pub options: Options,
    /// The other servers' keys at the last look ([`crate::membership::peer_kids`]): when they
    /// change (a peer restarted with a new key, or without a retired one) the task asks for a
    /// converge, which republishes the union, instead of leaving it to the next resync.
    pub peer_kids: Option<Vec<String>>,
}

fn system_time(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

impl RotationTask {
    /// One look of [`rotation::follow::follow`] on a blocking thread. A failure is logged and
    /// counts as a quiet cluster: this server's own schedule goes on (a start still waits for
    /// another driver), and the next look comes within the recheck interval.
    async fn follow(&mut self, ctx: &mut TaskContext<'_>) -> Look {
        // A host that cannot be read (not a server, a broken file) has nothing to follow with;
        // the converge says why, once.
        if crate::apiserver::install::observe(&self.root, ctx.settings.distribution).is_err() {
            return Look::Alone;
        }
        let root = self.root.clone();
        let settings = ctx.settings.clone();
        let edges = self.edges.clone();
        let options = self.options.clone();
        let clock = ctx.clock.clone();
        let followed = ctx
            .blocking(move || -> Result<Looked, rotation::RotationError> {
                crate::runtime::block_on(async {
                    let mut rctx =
                        rotation::Context::for_host(&root, &settings, clock, edges, options)
                            .await?;
                    rotation::follow::follow(&mut rctx).await
                })
            })
            .await;
        match followed {
            Ok(Ok(Looked { look, peer_kids })) => {
                if let Some(kids) = peer_kids {
                    if self
                        .peer_kids
                        .as_ref()
                        .is_some_and(|before| *before != kids)
                    {
                        log::debug!(
                            "rotation: the other servers' keys changed ({}): converging to republish",
                            kids.join(", ")
                        );
                        ctx.request_converge();
                    }
                    self.peer_kids = Some(kids);
                }
                look
            }
            Ok(Err(e)) => {
                log::warn!("rotation: cannot follow the cluster's rotation: {e}");
                Look::Quiet
            }
            Err(e) => {
                log::warn!("rotation: cannot follow the cluster's rotation: {e}");
                Look::Quiet
            }
        }
    }
}

#[async_trait::async_trait(?Send)]
impl ScheduledTask for RotationTask {
    fn name(&self) -> &str {
        "rotation"
    }

    fn extra_keys(&self) -> Vec<PublicKey> {
        rotation::published_ahead(&self.root)
    }

    /// `irsa_agent_rotation_*` (phase, when it began, next step, failures, last completed),
    /// from the saved state; the phase family alone when the state cannot be read.
    fn metrics(&self) -> String {
        let state = rotation::load_state(&self.root).ok().flatten();
        rotation::metrics_text(state.as_ref())
    }

    async fn run(&mut self, ctx: &mut TaskContext<'_>) -> anyhow::Result<Option<SystemTime>> {
        let now = ctx
            .now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let state = rotation::load_state(&self.root)?;
        let phase = state.as_ref().map(|s| s.phase.name());
        let in_progress = phase.is_some_and(|p| p != PhaseName::Idle);
        // Another server's agent may drive the cluster's rotation: follow it (whether or not
        // this server's rotation is enabled: the driver waits for every server). With other
        // agents in the cluster, look again within the recheck interval even when nothing of
        // this server's own is due: a driver may start any time.
        let look = if in_progress {
            Look::Alone
        } else {
            self.follow(ctx).await
        };
        let recheck = ctx.now + self.options.recheck;
        let cap = |next: Option<SystemTime>| match look {
            Look::Alone => next,
            _ => Some(next.map_or(recheck, |n| n.min(recheck))),
        };
        if let Look::Following(line) = &look {
            match rotation::postpone_while_following(&self.root, now, ctx.settings.rotation.every) {
                Ok(Some(due)) => log::info!(
                    "rotation: this server's own rotation was due; another server drives the cluster's rotation now, so the next one here is due {}",
                    crate::state::rfc3339(due)
                ),
                Ok(None) => {}
                Err(e) => log::warn!("rotation: cannot push this server's own rotation back: {e}"),
            }
            ctx.set_status(line.clone());
            return Ok(Some(recheck));
        }
        if !ctx.settings.rotation.enabled && !in_progress {
            ctx.set_status("rotation: disabled (rotation.enabled: false)");
            return Ok(cap(None));
        }
        let due = state.as_ref().and_then(|s| s.due_at());
        let guard = matches!(ctx.reason, TaskReason::AfterConverge { .. })
            && matches!(
                phase,
                Some(PhaseName::Trusted | PhaseName::Signing | PhaseName::Draining)
            );
        if state.is_some() && due.is_none_or(|d| d > now) && !guard {
            if let Some(st) = &state {
                ctx.set_status(
                    rotation::state_lines(st, ctx.settings.rotation.enabled, now).join("; "),
                );
            }
            return Ok(cap(due.map(system_time)));
        }
        let root = self.root.clone();
        let settings = ctx.settings.clone();
        let edges = self.edges.clone();
        let options = self.options.clone();
        let clock = ctx.clock.clone();
        let outcomes = ctx
            .blocking(
                move || -> Result<Vec<rotation::StepOutcome>, rotation::RotationError> {
                    crate::runtime::block_on(async {
                        let mut rctx =
                            rotation::Context::for_host(&root, &settings, clock, edges, options)
                                .await?;
                        rotation::advance(&mut rctx).await
                    })
                },
            )
            .await??;
        let last = outcomes.last();
        if let Some(o) = last {
            ctx.set_status(format!("rotation: {}", o.status_line));
        }
        // Key files changed (trusted, retired, a repair): converge (republish from them).
        if last.map(|o| o.phase) != phase || outcomes.iter().any(|o| o.progressed) {
            ctx.request_converge();
        }
        Ok(last.and_then(|o| o.next_due).map(system_time))
    }
}
