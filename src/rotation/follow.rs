//! Following the cluster's rotation on the servers that do not drive it (k3s/RKE2).
//!
//! On several servers one agent drives the rotation (it holds the rotation Lease, see
//! [`super::step`]): it installs each step's keys with `k3s certificate rotate-ca`, which puts
//! them in the datastore, and restarts its own server. Every other server loads the datastore's
//! `service.key` only when it starts, so each other agent restarts its own server, one at a time
//! (the restart Lease), when the keys its server has differ from the driver's as the driver's
//! Lease reports them (what the driver's apiserver runs with after a verified step). No person
//! restarts anything, and the driver's waits ("these servers do not verify with the new key")
//! end by themselves.
//!
//! Following the datastore is safe at every step: the driver advances only once every server
//! has what the previous step installed (it asks every apiserver), so a follower that restarts
//! early or late only ever moves one step behind it.
//!
//! A restart that does not bring the driver's keys (the datastore does not have them: the
//! driver's k3s was restored, or the follower uses another datastore) is not repeated for the
//! same keys: the follower holds and says so, instead of restarting its server every minute.

use super::{Context, RotationError, failed, lock};
use crate::apiserver::change::{self, Turned};
use crate::apiserver::install;
use crate::apiserver::ready::{self, Patience};
use crate::apiserver::restart::{self, Restart};
use crate::membership::{self, Member, View};
use crate::state::{self, State};
use std::time::Duration;

/// The key of the follower's record in the state file: the keys it last restarted for.
pub const STATE_KEY: &str = "rotation-follow";

/// A server's keys: every kid it verifies with (sorted) and the one it signs with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Keys {
    pub kids: Vec<String>,
    pub signing: Option<String>,
}

impl Keys {
    pub fn new(kids: impl IntoIterator<Item = String>, signing: Option<String>) -> Keys {
        let mut kids: Vec<String> = kids.into_iter().collect();
        kids.sort();
        kids.dedup();
        Keys { kids, signing }
    }

    fn describe(&self) -> String {
        format!(
            "verifies with {}, signs with {}",
            self.kids.join(", "),
            self.signing.as_deref().unwrap_or("(unknown)")
        )
    }
}

/// What a follower does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// No other agent drives a rotation: nothing to follow.
    Nothing,
    /// This server has the driver's keys.
    InStep { driver: String },
    /// Restart this server: it lacks what the driver advanced to.
    Restart {
        driver: String,
        target: Keys,
        why: String,
    },
    /// Do nothing, and say why (a driver that is not live; a restart that did not help).
    Hold(String),
}

/// The agent driving a rotation, other than `me`.
pub fn driver<'v>(view: &'v View, me: &str) -> Option<&'v Member> {
    view.agents
        .iter()
        .find(|a| a.node != me && a.report.as_ref().is_some_and(membership::Report::rotating))
}

/// What `me`, whose server has `mine`, does about the rotation `view` shows. `tried`: the keys
/// it last restarted its server for ([`STATE_KEY`]).
pub fn decide(me: &str, mine: &Keys, view: &View, tried: Option<&Keys>) -> Follow {
    let Some(driver) = driver(view, me) else {
        return Follow::Nothing;
    };
    let Some(report) = driver.report.as_ref() else {
        return Follow::Nothing;
    };
    if !driver.live {
        return Follow::Hold(format!(
            "{} drives the cluster's key rotation ({}) but its agent is not live: this server keeps its keys until it comes back",
            driver.node, report.rotation
        ));
    }
    let target = Keys::new(report.kids.iter().cloned(), report.signing_kid.clone());
    if target.kids.is_empty() {
        return Follow::Hold(format!(
            "{} drives the cluster's key rotation ({}) but reports no keys",
            driver.node, report.rotation
        ));
    }
    if *mine == target {
        return Follow::InStep {
            driver: driver.node.clone(),
        };
    }
    if tried == Some(&target) {
        return Follow::Hold(format!(
            "this server was restarted for {}'s rotation step ({}) and still {} instead ({}): the datastore does not hold what {}'s apiserver runs with; look at both servers' logs",
            driver.node,
            report.rotation,
            mine.describe(),
            target.describe(),
            driver.node
        ));
    }
    Follow::Restart {
        driver: driver.node.clone(),
        why: format!(
            "{} advanced the cluster's key rotation ({}): its apiserver {}; this one {}",
            driver.node,
            report.rotation,
            target.describe(),
            mine.describe()
        ),
        target,
    }
}

fn tried(root: &crate::host::HostRoot) -> Option<Keys> {
    State::load(root)
        .ok()?
        .other
        .get(STATE_KEY)
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// One look of a follower: when another agent drives a rotation and this server lacks what it
/// advanced to, restarts this server (holding the restart Lease) and waits until its apiserver
/// serves the driver's keys. Returns a status line, or `None` when there is nothing to follow
/// (no Lease API, keys not shared by the servers, this agent drives, no rotation anywhere).
pub async fn follow(ctx: &mut Context) -> Result<Option<String>, RotationError> {
    let observed = install::observe(&ctx.root, ctx.settings.distribution)?;
    if !observed.source.keys_shared_by_servers() {
        return Ok(None);
    }
    let _lock = lock(&ctx.root)?;
    if super::load_state(&ctx.root)?.is_some_and(|st| st.phase.name() != super::PhaseName::Idle) {
        return Ok(None);
    }
    let Some(view) = ctx
        .cluster
        .members()
        .await
        .map_err(|e| failed(format!("cannot read the other servers' agent Leases: {e}")))?
    else {
        return Ok(None);
    };
    let host = install::host_keys(&observed)?;
    let mine = Keys::new(host.verification.iter().cloned(), Some(host.signing.kid()));
    let me = ctx.cluster.node().to_string();
    match decide(&me, &mine, &view, tried(&ctx.root).as_ref()) {
        Follow::Nothing => Ok(None),
        Follow::InStep { driver } => Ok(Some(format!(
            "rotation: following {driver}'s rotation; this server has its keys"
        ))),
        Follow::Hold(why) => {
            log::warn!("rotation: {why}");
            Ok(Some(format!("rotation: holding: {why}")))
        }
        Follow::Restart {
            driver,
            target,
            why,
        } => {
            let Restart::Unit(unit) = restart::restart_for(
                &ctx.root,
                observed.distribution,
                ctx.options.unit.as_deref(),
            ) else {
                return Err(failed("no unit to restart"));
            };
            let timeout = ctx.options.restart_timeout;
            let patience = Patience {
                timeout,
                poll: ctx.options.poll,
            };
            let seconds = timeout.as_secs() + 60;
            let cluster = &mut ctx.cluster;
            let turned = change::wait_for_turn(
                ctx.clock.as_ref(),
                Patience {
                    timeout: timeout * 2,
                    poll: ctx.options.poll.max(Duration::from_secs(1)),
                },
                async |_| cluster.try_turn(seconds).await,
            )
            .await
            .map_err(failed)?;
            log::info!("rotation: {why}: systemctl restart {unit}");
            // Recorded before the restart: a restart that does not bring the keys is not
            // repeated for the same keys.
            let recorded = serde_json::to_value(&target).unwrap_or_default();
            State::update(&ctx.root, |s| {
                s.other.insert(STATE_KEY.to_string(), recorded);
            })?;
            let restarted = ctx
                .services
                .restart(&unit)
                .map_err(|e| failed(format!("following {driver}'s rotation: {e}")));
            let served = match restarted {
                Ok(()) => {
                    let cluster = &mut ctx.cluster;
                    let what = format!(
                        "waiting for this server's apiserver to serve {driver}'s keys {}",
                        target.kids.join(", ")
                    );
                    ready::wait_until(&what, ctx.clock.as_ref(), patience, async || {
                        let kids = cluster.jwks_kids(None).await.map_err(|e| e.to_string())?;
                        let served = Keys::new(kids, None);
                        if served.kids == target.kids {
                            Ok(())
                        } else {
                            Err(format!("serves kids {}", served.kids.join(", ")))
                        }
                    })
                    .await
                    .map(|_| ())
                    .map_err(|last| {
                        failed(format!(
                            "restarted {unit} to follow {driver}'s rotation, but its apiserver does not serve {} (last: {last})",
                            target.kids.join(", ")
                        ))
                    })
                }
                Err(e) => Err(e),
            };
            if turned == Turned::Held
                && let Err(e) = ctx.cluster.let_go(membership::RESTART).await
            {
                log::warn!(
                    "rotation: cannot give the restart Lease back (it expires by itself): {e}"
                );
            }
            served?;
            if let Ok(observed) = install::observe(&ctx.root, ctx.settings.distribution) {
                let report = membership::Report::of(&observed, &ctx.settings.issuer, "");
                if let Err(e) = ctx.cluster.announce(&report).await {
                    log::debug!("rotation: cannot announce this server's keys: {e}");
                }
            }
            let line = format!(
                "rotation: followed {driver}'s rotation: restarted {unit}; this server's apiserver serves {} at {}",
                target.kids.join(", "),
                state::rfc3339(ctx.clock.now())
            );
            log::info!("{line}");
            Ok(Some(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Report;

    fn keys(kids: &[&str], signing: &str) -> Keys {
        Keys::new(kids.iter().map(|k| k.to_string()), Some(signing.into()))
    }

    fn view(driver_live: bool, phase: &str, kids: &[&str], signing: &str) -> View {
        View {
            agents: vec![
                Member {
                    node: "cp1".into(),
                    live: driver_live,
                    report: Some(Report {
                        rotation: phase.into(),
                        kids: kids.iter().map(|k| k.to_string()).collect(),
                        signing_kid: Some(signing.into()),
                        ..Report::default()
                    }),
                },
                Member {
                    node: "cp2".into(),
                    live: true,
                    report: Some(Report::default()),
                },
            ],
            apiservers: vec!["cp1".into(), "cp2".into()],
        }
    }

    #[test]
    fn a_follower_restarts_when_it_lacks_what_the_driver_advanced_to() {
        let v = view(true, "published", &["new", "old"], "old");
        let mine = keys(&["old"], "old");
        match decide("cp2", &mine, &v, None) {
            Follow::Restart { driver, target, .. } => {
                assert_eq!(driver, "cp1");
                assert_eq!(target, keys(&["old", "new"], "old"));
            }
            other => panic!("{other:?}"),
        }
        // The signing key counts too (the sign step), and so does a retired key.
        let v = view(true, "signing", &["new", "old"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "old"), &v, None),
            Follow::Restart { .. }
        ));
        let v = view(true, "retired", &["new"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "new"), &v, None),
            Follow::Restart { .. }
        ));
    }

    #[test]
    fn in_step_or_no_rotation_means_no_restart() {
        let v = view(true, "trusted", &["new", "old"], "old");
        assert_eq!(
            decide("cp2", &keys(&["old", "new"], "old"), &v, None),
            Follow::InStep {
                driver: "cp1".into()
            }
        );
        let v = view(true, "idle", &["new"], "new");
        assert_eq!(
            decide("cp2", &keys(&["old"], "old"), &v, None),
            Follow::Nothing
        );
        // The driver does not follow itself.
        let v = view(true, "published", &["new", "old"], "old");
        assert_eq!(
            decide("cp1", &keys(&["old"], "old"), &v, None),
            Follow::Nothing
        );
    }

    #[test]
    fn a_dead_driver_or_a_restart_that_did_not_help_holds() {
        let v = view(false, "published", &["new", "old"], "old");
        assert!(matches!(
            decide("cp2", &keys(&["old"], "old"), &v, None),
            Follow::Hold(why) if why.contains("not live")
        ));
        let v = view(true, "published", &["new", "old"], "old");
        let target = keys(&["new", "old"], "old");
        assert!(matches!(
            decide("cp2", &keys(&["old"], "old"), &v, Some(&target)),
            Follow::Hold(why) if why.contains("datastore")
        ));
        // A later step is new keys: restarted for again.
        let v = view(true, "signing", &["new", "old"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "old"), &v, Some(&target)),
            Follow::Restart { .. }
        ));
    }
}
