//! The issuer rollout on several servers, decided from the cluster's membership.
//!
//! A new issuer must be accepted by every apiserver before any of them signs with it:
//! otherwise a token minted by a server that already signs with it is rejected by a server that
//! does not accept it yet (measured: 153 rejected checks with three agents started 10 s apart).
//! So every agent, each on its own server, goes through two phases:
//!
//! 1. **accept**: its apiserver accepts the new issuer (last), still signing with the old one
//!    (`apply --accept-only`). Always safe: accepting one more issuer rejects nothing.
//! 2. **sign**: once every apiserver of the cluster accepts it (each agent says so in its Lease,
//!    [`crate::membership`]), its apiserver signs with it, keeping the old one accepted.
//!
//! 3. **retire** (`finalize`): once every apiserver signs with it and the longest token
//!    lifetime has passed since the *last* one switched (each agent reports when its apiserver
//!    was first seen signing with it), no token minted with an old issuer can be valid on any
//!    server: each agent retires the old issuers on its own server ([`retire_hold`]). It also
//!    waits while a key rotation is in progress anywhere (both restart apiservers; one change at
//!    a time keeps each one's phases whole) and, on its own apiserver, while clients present
//!    stale tokens (the daemon's evidence check, [`crate::daemon`]'s apiserver step).
//!
//! An apiserver with no live agent holds phases 2 and 3 (nobody can say what it accepts or since
//! when it signs). One server is the same procedure with N = 1: it accepts and signs in one step,
//! and retires the old issuers the longest token lifetime later. Restarts are one at a time
//! across the cluster (the restart Lease, in [`crate::apiserver::change`]).
//!
//! [`decide`] and [`retire_hold`] are pure: they see only what this apiserver accepts, the
//! configured issuer, the membership view and the time.

use std::time::Duration;

use crate::config::format_duration;
use crate::membership::View;

/// What this agent does next for the configured issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make the issuer sign (first), keeping every issuer accepted before. Also when it already
    /// signs: the change is then a no-op (or a repair).
    Sign,
    /// Phase 1: accept the issuer without signing with it.
    AcceptOnly,
    /// Accepted here; phase 2 waits for the servers named.
    Wait(String),
}

/// The rollout phase this server is in, as its agent reports it in its Lease.
pub fn phase(accepted: &[String], target: &str) -> &'static str {
    match accepted.iter().position(|i| i == target) {
        Some(0) => "signing",
        Some(_) => "accepting",
        None => "before",
    }
}

/// The servers that take part in the rollout: every apiserver that announces itself, and every
/// live agent (an apiserver's identity Lease may lag its start), sorted.
pub fn servers(view: &View) -> Vec<&str> {
    let mut servers: Vec<&str> = view.apiservers.iter().map(String::as_str).collect();
    for agent in view.agents.iter().filter(|a| a.live) {
        if !servers.contains(&agent.node.as_str()) {
            servers.push(&agent.node);
        }
    }
    servers.sort();
    servers
}

/// The servers other than `node` that hold phase 2 (signing with `target`), each with why:
/// its apiserver does not accept it yet, its agent reports nothing, or it has no live agent.
pub fn holding(view: &View, target: &str, node: &str) -> Vec<String> {
    let mut waiting: Vec<String> = Vec::new();
    for server in servers(view).into_iter().filter(|s| *s != node) {
        let agent = view.agents.iter().find(|a| a.node == server && a.live);
        match agent.and_then(|a| a.report.as_ref()) {
            Some(report) if report.issuers.iter().any(|i| i == target) => {}
            Some(_) => waiting.push(format!("{server} (does not accept it yet)")),
            None if agent.is_some() => {
                waiting.push(format!("{server} (its agent reports nothing)"))
            }
            None => waiting.push(format!("{server} (no live irsa-agent)")),
        }
    }
    waiting
}

/// What to do next. `accepted`: the issuers this apiserver accepts now, signing issuer first;
/// `view`: the cluster's membership (`None` when the cluster has no Lease API to coordinate
/// through: a single server); `node`: this agent's node name.
pub fn decide(accepted: &[String], target: &str, view: Option<&View>, node: &str) -> Decision {
    if accepted.first().map(String::as_str) == Some(target) {
        return Decision::Sign;
    }
    let Some(view) = view else {
        return Decision::Sign;
    };
    let mut servers = servers(view);
    servers.retain(|s| *s != node);
    if servers.is_empty() {
        // One server: accepting and signing switch in one restart.
        return Decision::Sign;
    }
    if !accepted.iter().any(|i| i == target) {
        return Decision::AcceptOnly;
    }
    let waiting = holding(view, target, node);
    if waiting.is_empty() {
        Decision::Sign
    } else {
        Decision::Wait(format!(
            "every apiserver must accept issuer {target} before this one signs with it; waiting for {}",
            waiting.join(", ")
        ))
    }
}

/// Why this server must not retire the old issuers yet, or `Ok(())` once it may, as far as the
/// cluster goes (this server's own wait, `finalize`'s, is [`crate::apiserver::apply::finalize_decision`]).
/// `switched_at`: when this server's apiserver was first seen signing with `target`; `lifetime`:
/// the longest token lifetime; `now`: Unix seconds. Every other server must have a live agent
/// reporting that its apiserver signs with `target` since a known time, and no key rotation in
/// progress; the old issuers go the longest token lifetime after the last server switched (a
/// server that signed with an old issuer until then minted tokens that live that long).
pub fn retire_hold(
    view: Option<&View>,
    target: &str,
    node: &str,
    switched_at: u64,
    lifetime: Duration,
    now: u64,
) -> Result<(), RetireHold> {
    let mut last = (switched_at, node.to_string());
    let mut waiting: Vec<String> = Vec::new();
    let mut rotating: Vec<String> = Vec::new();
    let servers = view.map(servers).unwrap_or_default();
    for server in servers.into_iter().filter(|s| *s != node) {
        let agent = view.and_then(|v| v.agents.iter().find(|a| a.node == server && a.live));
        let Some(report) = agent.and_then(|a| a.report.as_ref()) else {
            waiting.push(if agent.is_some() {
                format!("{server} (its agent reports nothing)")
            } else {
                format!("{server} (no live irsa-agent)")
            });
            continue;
        };
        if report.issuers.first().map(String::as_str) != Some(target) {
            waiting.push(format!("{server} (does not sign with it yet)"));
        } else if let Some(at) = report.switched_at {
            if at > last.0 {
                last = (at, server.to_string());
            }
        } else {
            waiting.push(format!("{server} (its agent reports no switch time)"));
        }
        if report.rotating() {
            rotating.push(server.to_string());
        }
    }
    if !waiting.is_empty() {
        return Err(RetireHold::until_told(format!(
            "the old issuers are retired once every apiserver signs with {target}; waiting for {}",
            waiting.join(", ")
        )));
    }
    if !rotating.is_empty() {
        return Err(RetireHold::until_told(format!(
            "the old issuers are retired after the key rotation {} drive{}",
            rotating.join(", "),
            if rotating.len() == 1 { "s" } else { "" }
        )));
    }
    let due = last.0.saturating_add(lifetime.as_secs());
    if now <= due {
        return Err(RetireHold {
            due: Some(due + 1),
            why: format!(
                "the old issuers are retired after {}: the longest token lifetime ({}) after the last apiserver switched to {target} ({} at {}); tokens it minted before then may be valid until then",
                crate::state::rfc3339(due),
                format_duration(lifetime),
                last.1,
                crate::state::rfc3339(last.0)
            ),
        });
    }
    Ok(())
}

/// Why the old issuers stay for now ([`retire_hold`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireHold {
    pub why: String,
    /// When they come due (Unix seconds), if only time holds them.
    pub due: Option<u64>,
}

impl RetireHold {
    fn until_told(why: String) -> RetireHold {
        RetireHold { why, due: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Member, Report};

    const OLD: &str = "https://kubernetes.default.svc.cluster.local";
    const NEW: &str = "https://oidc.example.com/c1";

    fn member(node: &str, live: bool, issuers: Option<&[&str]>) -> Member {
        Member {
            node: node.into(),
            live,
            report: issuers.map(|i| Report {
                issuers: i.iter().map(|s| s.to_string()).collect(),
                ..Report::default()
            }),
        }
    }

    fn view(apiservers: &[&str], agents: Vec<Member>) -> View {
        View {
            agents,
            apiservers: apiservers.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn v(issuers: &[&str]) -> Vec<String> {
        issuers.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_server_accepts_and_signs_in_one_step() {
        let one = view(&["a"], vec![member("a", true, Some(&[OLD]))]);
        assert_eq!(decide(&v(&[OLD]), NEW, Some(&one), "a"), Decision::Sign);
        // No Lease API (nothing to coordinate through): as today.
        assert_eq!(decide(&v(&[OLD]), NEW, None, "a"), Decision::Sign);
        // The apiserver's identity Lease not there yet, no other agent: one server.
        assert_eq!(
            decide(&v(&[OLD]), NEW, Some(&view(&[], vec![])), "a"),
            Decision::Sign
        );
    }

    #[test]
    fn three_servers_accept_first_then_sign_once_every_one_accepts() {
        let peers = |b: &[&str], c: &[&str]| {
            view(
                &["a", "b", "c"],
                vec![
                    member("a", true, Some(&[OLD])),
                    member("b", true, Some(b)),
                    member("c", true, Some(c)),
                ],
            )
        };
        // Nobody accepts it: phase 1 here.
        assert_eq!(
            decide(&v(&[OLD]), NEW, Some(&peers(&[OLD], &[OLD])), "a"),
            Decision::AcceptOnly
        );
        // Accepted here, c not yet: wait, naming c.
        let Decision::Wait(why) =
            decide(&v(&[OLD, NEW]), NEW, Some(&peers(&[OLD, NEW], &[OLD])), "a")
        else {
            panic!("expected a wait");
        };
        assert!(
            why.contains("c (does not accept it yet)") && !why.contains("b "),
            "{why}"
        );
        // Every server accepts it: sign.
        assert_eq!(
            decide(
                &v(&[OLD, NEW]),
                NEW,
                Some(&peers(&[OLD, NEW], &[NEW, OLD])),
                "a"
            ),
            Decision::Sign
        );
        // Already signing: stays (a no-op change).
        assert_eq!(
            decide(&v(&[NEW, OLD]), NEW, Some(&peers(&[OLD], &[OLD])), "a"),
            Decision::Sign
        );
    }

    #[test]
    fn an_apiserver_without_a_live_agent_holds_the_switch_but_not_acceptance() {
        let dead = view(
            &["a", "b"],
            vec![
                member("a", true, Some(&[OLD, NEW])),
                member("b", false, Some(&[OLD, NEW])),
            ],
        );
        assert_eq!(
            decide(&v(&[OLD]), NEW, Some(&dead), "a"),
            Decision::AcceptOnly
        );
        let Decision::Wait(why) = decide(&v(&[OLD, NEW]), NEW, Some(&dead), "a") else {
            panic!("expected a wait");
        };
        assert!(why.contains("b (no live irsa-agent)"), "{why}");
        // An agent whose report cannot be read is not taken at its word.
        let silent = view(&["a", "b"], vec![member("b", true, None)]);
        assert!(matches!(
            decide(&v(&[OLD, NEW]), NEW, Some(&silent), "a"),
            Decision::Wait(w) if w.contains("b (its agent reports nothing)")
        ));
        // A live agent whose apiserver has no identity Lease yet still counts.
        let early = view(&["a"], vec![member("b", true, Some(&[OLD]))]);
        assert_eq!(
            decide(&v(&[OLD]), NEW, Some(&early), "a"),
            Decision::AcceptOnly
        );
    }

    fn signing(node: &str, at: Option<u64>, rotation: &str) -> Member {
        let mut m = member(node, true, Some(&[NEW, OLD]));
        if let Some(r) = m.report.as_mut() {
            r.switched_at = at;
            r.rotation = rotation.into();
        }
        m
    }

    #[test]
    fn the_old_issuers_go_the_longest_token_lifetime_after_the_last_server_switched() {
        let day = Duration::from_secs(86_400);
        let three =
            |b: Member, c: Member| view(&["a", "b", "c"], vec![signing("a", Some(100), ""), b, c]);
        // b switched last (at 5000): not before 5000 + a day, whatever a's own time says.
        let all = three(
            signing("b", Some(5000), "idle"),
            signing("c", Some(300), ""),
        );
        let Err(hold) = retire_hold(Some(&all), NEW, "a", 100, day, 100 + 86_401) else {
            panic!("b switched later: hold");
        };
        assert!(
            hold.why.contains("b at") && hold.why.contains("1d"),
            "{hold:?}"
        );
        assert_eq!(hold.due, Some(5000 + 86_401));
        assert_eq!(
            retire_hold(Some(&all), NEW, "a", 100, day, 5000 + 86_401),
            Ok(())
        );
        // A server still signing with the old issuer, one whose agent is gone, one with no
        // switch time: each holds, named.
        let behind = three(member("b", true, Some(&[OLD, NEW])), signing("c", None, ""));
        let Err(hold) = retire_hold(Some(&behind), NEW, "a", 100, day, u64::MAX / 2) else {
            panic!("hold");
        };
        assert!(
            hold.why.contains("b (does not sign with it yet)")
                && hold.why.contains("c (its agent reports no switch time)")
                && hold.due.is_none(),
            "{hold:?}"
        );
        let dead = view(
            &["a", "b"],
            vec![
                signing("a", Some(1), ""),
                Member {
                    live: false,
                    ..signing("b", Some(1), "")
                },
            ],
        );
        assert!(matches!(
            retire_hold(Some(&dead), NEW, "a", 1, day, u64::MAX / 2),
            Err(h) if h.why.contains("b (no live irsa-agent)")
        ));
        // A rotation in progress anywhere holds it.
        let rotating = three(
            signing("b", Some(1), "staged"),
            signing("c", Some(1), "idle"),
        );
        assert!(matches!(
            retire_hold(Some(&rotating), NEW, "a", 1, day, u64::MAX / 2),
            Err(h) if h.why.contains("key rotation b drives")
        ));
    }

    #[test]
    fn one_server_retires_on_its_own_time() {
        let day = Duration::from_secs(86_400);
        assert!(retire_hold(None, NEW, "a", 1000, day, 1000 + 86_400).is_err());
        assert_eq!(
            retire_hold(None, NEW, "a", 1000, day, 1000 + 86_401),
            Ok(())
        );
        let alone = view(&["a"], vec![signing("a", Some(1000), "")]);
        assert_eq!(
            retire_hold(Some(&alone), NEW, "a", 1000, day, 1000 + 86_401),
            Ok(())
        );
    }

    #[test]
    fn phases_as_reported() {
        assert_eq!(phase(&v(&[OLD]), NEW), "before");
        assert_eq!(phase(&v(&[OLD, NEW]), NEW), "accepting");
        assert_eq!(phase(&v(&[NEW, OLD]), NEW), "signing");
    }
}
