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
//! An apiserver with no live agent holds phase 2 (nobody can say what it accepts). One server
//! is the same procedure with N = 1: it accepts and signs in one step. Restarts are one at a time
//! across the cluster (the restart Lease, in [`crate::apiserver::change`]).
//!
//! [`decide`] is pure: it sees only what this apiserver accepts, the configured issuer and the
//! membership view.

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

    #[test]
    fn phases_as_reported() {
        assert_eq!(phase(&v(&[OLD]), NEW), "before");
        assert_eq!(phase(&v(&[OLD, NEW]), NEW), "accepting");
        assert_eq!(phase(&v(&[NEW, OLD]), NEW), "signing");
    }
}
