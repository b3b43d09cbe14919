//! The cluster view: where each server is in the issuer rollout, which step comes next and
//! what it waits for, as `status`, `rotate --status`, `apply --check`, `doctor` and the metrics
//! show it.
//!
//! It is read from the same Leases the daemons coordinate through ([`crate::membership`]: the
//! agents' reports, the apiservers' identity Leases, the restart Lease) and turned into a
//! [`Plan`] by [`plan`], a pure function that asks [`crate::rollout`] what each server does next
//! (the daemon's own decision, not a second copy of it).

use serde::Serialize;

use crate::membership::{self, RestartHolder, View};
use crate::rollout::{self, Decision};

/// What the Leases say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub view: View,
    /// The restart Lease's holder, live or not (`None`: free).
    pub restart: Option<RestartHolder>,
}

/// The cluster as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "view", rename_all = "kebab-case")]
pub enum Cluster {
    /// The Leases were read.
    Servers(Box<Plan>),
    /// The apiserver has no Lease API (it answered 404): nothing to coordinate through, so
    /// this is one server on its own.
    SingleServer { why: String },
    /// The Leases could not be read.
    Unreadable { error: String },
}

/// One server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    /// Its node name (the host its apiserver names in its identity Lease).
    pub node: String,
    /// The server this command runs on.
    pub this: bool,
    /// Its apiserver announces itself (a live identity Lease).
    pub apiserver: bool,
    /// `live`, `expired` (its Lease was not renewed in time: the agent died or cannot reach
    /// the API) or `none`.
    pub agent: &'static str,
    /// Where its apiserver is for the configured issuer, from its agent's report: `before`
    /// (does not accept it), `accepting` (accepts it, signs with another), `signing`, or
    /// `unknown` (no report).
    pub rollout: &'static str,
    /// The issuers its apiserver accepts, signing issuer first (reported).
    pub issuers: Vec<String>,
    pub signing_kid: Option<String>,
    /// The key ids its apiserver verifies with (reported).
    pub kids: Vec<String>,
    /// The agent's rotation phase, as reported (empty when it says nothing).
    pub rotation: String,
    pub version: String,
    /// What it does next, in the rollout's words.
    pub next: String,
}

/// The whole cluster: every server and the next step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The issuer the rollout is for (this server's configuration).
    pub issuer: String,
    /// This server's node name.
    pub node: String,
    /// The apiservers and the live agents, by node name.
    pub servers: Vec<Server>,
    /// Apiservers with no live agent: each holds every cluster-wide step.
    pub without_agent: Vec<String>,
    pub restart: Option<RestartLease>,
    /// Every server signs with the issuer.
    pub done: bool,
    /// Once every server signs with the issuer and some still accept an older one: when the
    /// agents may retire the older issuers (Unix seconds: the last server's switch plus the
    /// longest token lifetime, [`rollout::retire_hold`]), when only time holds them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<u64>,
    /// The next step of the cluster.
    pub next: String,
    /// The servers the signing phase waits for, each with why (empty once every one accepts
    /// the issuer).
    pub waits_for: Vec<String>,
    /// What this server's agent does next, from what its apiserver's files accept now (when
    /// they were read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub this_server_next: Option<String>,
}

/// The restart Lease: who restarts its apiserver now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestartLease {
    pub holder: String,
    /// Unix seconds.
    pub until: i64,
    /// Held past its time: the holder died or hangs mid-restart; the next agent takes it over.
    pub expired: bool,
}

/// What one server does next, given its decision: the words of [`rollout::decide`].
pub fn next_step(decision: &Decision, accepted: &[String], issuer: &str) -> String {
    match decision {
        Decision::Sign if accepted.first().map(String::as_str) == Some(issuer) => {
            "nothing: it signs with the issuer".to_string()
        }
        Decision::Sign => "sign with the issuer (one apiserver restart at a time)".to_string(),
        Decision::AcceptOnly => {
            "accept the issuer without signing with it (accept-only), one apiserver restart at a time"
                .to_string()
        }
        Decision::Wait(why) => format!("wait: {why}"),
    }
}

/// The cluster plan for `issuer` seen from `node` at `now` (Unix seconds). `lifetime`: the
/// longest token lifetime ([`crate::apiserver::apply::longest_token_lifetime`]), when known:
/// once every server signs with the issuer, the plan says when the older issuers go.
pub fn plan(
    facts: &Facts,
    issuer: &str,
    node: &str,
    now: i64,
    lifetime: Option<std::time::Duration>,
) -> Plan {
    let view = &facts.view;
    let mut names: Vec<String> = rollout::servers(view)
        .into_iter()
        .map(str::to_string)
        .collect();
    // Also this server, when its agent has not announced itself (apply by hand).
    if !node.is_empty() && !names.iter().any(|n| n == node) && view.apiservers.is_empty() {
        names.push(node.to_string());
        names.sort();
    }
    let servers: Vec<Server> = names
        .iter()
        .map(|name| {
            let member = view.agents.iter().find(|a| &a.node == name);
            let live = member.filter(|m| m.live);
            let report = live.and_then(|m| m.report.clone()).unwrap_or_default();
            let reported = live.is_some_and(|m| m.report.is_some());
            let next = match live {
                None => "nothing: no live irsa-agent (it holds the signing phase)".to_string(),
                Some(_) if !reported => {
                    "unknown: its agent reports nothing (it holds the signing phase)".to_string()
                }
                Some(_) => next_step(
                    &rollout::decide(&report.issuers, issuer, Some(view), name),
                    &report.issuers,
                    issuer,
                ),
            };
            Server {
                node: name.clone(),
                this: name == node,
                apiserver: view.apiservers.contains(name),
                agent: match member {
                    Some(m) if m.live => "live",
                    Some(_) => "expired",
                    None => "none",
                },
                rollout: if reported {
                    rollout::phase(&report.issuers, issuer)
                } else {
                    "unknown"
                },
                issuers: report.issuers,
                signing_kid: report.signing_kid,
                kids: report.kids,
                rotation: report.rotation,
                version: report.version,
                next,
            }
        })
        .collect();
    let restart = facts.restart.as_ref().map(|r| RestartLease {
        holder: r.holder.clone(),
        until: r.until,
        expired: r.until < now,
    });
    let done = !servers.is_empty() && servers.iter().all(|s| s.rollout == "signing");
    let waits_for = if done {
        Vec::new()
    } else {
        rollout::holding(view, issuer, "")
    };
    let acting = |what: &str| -> Vec<&str> {
        servers
            .iter()
            .filter(|s| s.next.starts_with(what))
            .map(|s| s.node.as_str())
            .collect()
    };
    let (accepting, signing) = (acting("accept "), acting("sign "));
    let mut retire_at = None;
    let mut next = if servers.is_empty() {
        "no apiserver and no irsa-agent announce themselves yet".to_string()
    } else if done {
        let (text, at) = retirement(view, issuer, &servers, now, lifetime);
        retire_at = at;
        text
    } else if !accepting.is_empty() {
        format!(
            "{} accept{} {issuer} (accept-only), one apiserver restart at a time",
            accepting.join(", "),
            if accepting.len() == 1 { "s" } else { "" }
        )
    } else if !signing.is_empty() {
        format!(
            "{} sign{} with {issuer}, one apiserver restart at a time",
            signing.join(", "),
            if signing.len() == 1 { "s" } else { "" }
        )
    } else {
        format!(
            "nothing can move: signing with {issuer} waits for {}",
            waits_for.join(", ")
        )
    };
    if let Some(r) = restart.as_ref().filter(|r| !r.expired) {
        next = format!(
            "{} restarts its apiserver now (it holds the restart Lease until {}); then: {next}",
            r.holder,
            crate::state::rfc3339(u64::try_from(r.until).unwrap_or(0))
        );
    }
    Plan {
        issuer: issuer.to_string(),
        node: node.to_string(),
        without_agent: view.without_agent(),
        servers,
        restart,
        done,
        retire_at,
        next,
        waits_for,
        this_server_next: None,
    }
}

/// Once every server signs with `issuer`: what happens to the older issuers and when (the
/// daemons' own rule, [`rollout::retire_hold`], for the whole cluster), and the time they may
/// go when only time holds them.
fn retirement(
    view: &View,
    issuer: &str,
    servers: &[Server],
    now: i64,
    lifetime: Option<std::time::Duration>,
) -> (String, Option<u64>) {
    let older: Vec<&str> = servers
        .iter()
        .filter(|s| s.issuers.len() > 1)
        .map(|s| s.node.as_str())
        .collect();
    if older.is_empty() {
        return (
            format!(
                "nothing to roll out: every server signs with {issuer} and accepts no other issuer"
            ),
            None,
        );
    }
    let how = "each agent retires them on its own server, one restart at a time, once its apiserver's stale-token counter stays still (with run.finalize: false, `irsa-agent finalize` does)";
    let Some(lifetime) = lifetime else {
        return (
            format!(
                "nothing to roll out: every server signs with {issuer}; {} still accept{} older issuers: {how}, the longest token lifetime after the last server switched, while no key rotation runs",
                older.join(", "),
                if older.len() == 1 { "s" } else { "" }
            ),
            None,
        );
    };
    let now = u64::try_from(now).unwrap_or(0);
    // Seen from no server in particular: every server's report counts.
    match rollout::retire_hold(Some(view), issuer, "", 0, lifetime, now) {
        Ok(()) => (
            format!(
                "every server signs with {issuer}; the older issuers that {} still accept{} may go now: {how}",
                older.join(", "),
                if older.len() == 1 { "s" } else { "" }
            ),
            Some(now),
        ),
        Err(hold) => (
            format!("every server signs with {issuer}; {}", hold.why),
            hold.due,
        ),
    }
}

/// Reads the Leases (one list); `Ok(None)` when the apiserver has no Lease API.
pub async fn read(client: &kube::Client, now: i64) -> Result<Option<Facts>, membership::Error> {
    match membership::list(client).await {
        Ok(leases) => Ok(Some(Facts::of(&leases, now))),
        Err(e) if e.no_lease_api() => Ok(None),
        Err(e) => Err(e),
    }
}

impl Facts {
    /// What the Leases listed at `now` say ([`membership::list`]).
    pub fn of(leases: &[k8s_openapi::api::coordination::v1::Lease], now: i64) -> Facts {
        Facts {
            view: membership::view_of(leases, now),
            restart: membership::restart_of(leases),
        }
    }
}

/// Turns what [`read`] returned into the view for `issuer` seen from `node`; `accepted`: the
/// issuers this server's apiserver files accept now, when read (what it does next).
pub fn from_read(
    read: Result<Option<Facts>, String>,
    issuer: &str,
    node: &str,
    now: i64,
    accepted: Option<&[String]>,
    lifetime: Option<std::time::Duration>,
) -> Cluster {
    match read {
        Ok(Some(facts)) => {
            let mut plan = plan(&facts, issuer, node, now, lifetime);
            plan.this_server_next = accepted.map(|a| {
                next_step(
                    &rollout::decide(a, issuer, Some(&facts.view), node),
                    a,
                    issuer,
                )
            });
            Cluster::Servers(Box::new(plan))
        }
        Ok(None) => Cluster::SingleServer {
            why: "the apiserver has no Lease API to coordinate through".to_string(),
        },
        Err(error) => Cluster::Unreadable { error },
    }
}

/// Reads the cluster through the host's admin kubeconfig (the one client, [`crate::k8s`]), as
/// the daemon does. Blocking; not from inside a runtime.
pub fn read_host(
    root: &crate::host::HostRoot,
    observed: &crate::apiserver::Observed,
    server: Option<String>,
    timeout: std::time::Duration,
    settings: &crate::config::Settings,
    node: &str,
) -> Cluster {
    let now = i64::try_from(crate::state::unix_now()).unwrap_or(i64::MAX);
    let read = with_host_client(root, observed, server, timeout, async |client| {
        read(client, now).await.map_err(|e| e.to_string())
    });
    let lifetime =
        crate::apiserver::apply::longest_token_lifetime(settings.rotation.token_lifetime, observed);
    from_read(
        read,
        &settings.issuer,
        node,
        now,
        Some(&observed.flags.issuers),
        Some(lifetime),
    )
}

/// Runs `f` with a client of this host's apiserver (the admin kubeconfig), on the process
/// runtime.
fn with_host_client<T>(
    root: &crate::host::HostRoot,
    observed: &crate::apiserver::Observed,
    server: Option<String>,
    timeout: std::time::Duration,
    f: impl AsyncFnOnce(&kube::Client) -> Result<T, String>,
) -> Result<T, String> {
    let (kubeconfig, url) = crate::apiserver::probe::target(observed);
    let probe =
        crate::apiserver::probe::KubeconfigProbe::new(root, &kubeconfig, server.or(url), timeout)
            .map_err(|e| format!("no admin credential to ask the apiserver with: {e}"))?;
    // The client starts its worker on the runtime that builds it: build it inside.
    crate::runtime::block_on(async {
        let client = probe.api().client().map_err(|e| e.to_string())?;
        f(&client).await
    })
}

/// What the issuer rollout lets this server's apiserver do with `issuer` now
/// ([`rollout::decide`] on the cluster's Leases), for `irsa-agent apply`. Only a cluster whose
/// other servers run live agents can say what they accept: with none (one server, no Lease API,
/// or a cluster rolled out by hand, README "Several servers") this is `Sign`, as `apply` always
/// did. `Err` when the Leases cannot be read.
pub fn decide_host(
    root: &crate::host::HostRoot,
    observed: &crate::apiserver::Observed,
    server: Option<String>,
    timeout: std::time::Duration,
    issuer: &str,
    node: &str,
) -> Result<rollout::Decision, String> {
    let now = i64::try_from(crate::state::unix_now()).unwrap_or(i64::MAX);
    let accepted = &observed.flags.issuers;
    with_host_client(
        root,
        observed,
        server,
        timeout,
        async |client| match membership::view(client, now).await {
            Ok(view) if view.agents.iter().any(|a| a.live && a.node != node) => {
                Ok(rollout::decide(accepted, issuer, Some(&view), node))
            }
            Ok(_) => Ok(Decision::Sign),
            Err(e) if e.no_lease_api() => Ok(Decision::Sign),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// The servers' rotation phases and keys, one line each (for `rotate --status`).
pub fn rotation_lines(cluster: &Cluster) -> Vec<String> {
    let plan = match cluster {
        Cluster::Servers(plan) => plan,
        other => return lines(other),
    };
    let mut out = vec![format!(
        "cluster:       {}",
        crate::doctor::words::plural(plan.servers.len(), "server")
    )];
    for s in &plan.servers {
        let phase = match (s.agent, s.rotation.as_str()) {
            ("live", "") => "rotation not reported".to_string(),
            ("live", phase) => format!("rotation {phase}"),
            ("expired", _) => "AGENT LEASE EXPIRED".to_string(),
            _ => "NO AGENT".to_string(),
        };
        let keys = if s.kids.is_empty() {
            String::new()
        } else {
            format!(
                "; verifies with {}{}",
                s.kids.join(", "),
                s.signing_kid
                    .as_ref()
                    .map(|k| format!(", signs with {k}"))
                    .unwrap_or_default()
            )
        };
        out.push(format!(
            "  {}{}: {phase}{keys}",
            s.node,
            if s.this { " (this server)" } else { "" }
        ));
    }
    out
}

/// The person's lines (no trailing newlines), the first one starting with `cluster:`.
pub fn lines(cluster: &Cluster) -> Vec<String> {
    let plan = match cluster {
        Cluster::Servers(plan) => plan,
        Cluster::SingleServer { why } => {
            return vec![format!("cluster:       single server ({why})")];
        }
        Cluster::Unreadable { error } => {
            return vec![format!("cluster:       cannot be read: {error}")];
        }
    };
    let names: Vec<&str> = plan.servers.iter().map(|s| s.node.as_str()).collect();
    let mut out = vec![format!(
        "cluster:       {} ({}); issuer {}",
        crate::doctor::words::plural(plan.servers.len(), "server"),
        names.join(", "),
        plan.issuer
    )];
    for s in &plan.servers {
        let mut parts = vec![match s.agent {
            "live" => format!(
                "agent {}",
                if s.version.is_empty() {
                    "live"
                } else {
                    &s.version
                }
            ),
            "expired" => "AGENT LEASE EXPIRED".to_string(),
            _ => "NO AGENT".to_string(),
        }];
        if !s.apiserver {
            parts.push("no apiserver identity Lease".to_string());
        }
        if s.rollout != "unknown" {
            parts.push(format!(
                "{} (signs with {})",
                s.rollout,
                s.issuers.first().map(String::as_str).unwrap_or("-")
            ));
        }
        if let Some(kid) = &s.signing_kid {
            parts.push(format!("signing kid {kid}"));
        }
        if !s.rotation.is_empty() {
            parts.push(format!("rotation {}", s.rotation));
        }
        out.push(format!(
            "  {}{}: {}; next: {}",
            s.node,
            if s.this { " (this server)" } else { "" },
            parts.join(", "),
            s.next
        ));
    }
    if let Some(r) = &plan.restart {
        let until = crate::state::rfc3339(u64::try_from(r.until).unwrap_or(0));
        out.push(if r.expired {
            format!(
                "  restart Lease: held by {} PAST ITS TIME (until {until}): it died or hangs mid-restart; the next agent takes it over",
                r.holder
            )
        } else {
            format!("  restart Lease: held by {} until {until}", r.holder)
        });
    }
    out.push(format!("  next: {}", plan.next));
    if let Some(here) = &plan.this_server_next {
        out.push(format!("  this server ({}) next: {here}", plan.node));
    }
    if !plan.waits_for.is_empty() {
        out.push(format!(
            "  signing waits for: {}",
            plan.waits_for.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Member, Report};

    const OLD: &str = "https://kubernetes.default.svc.cluster.local";
    const NEW: &str = "https://oidc.example.com/c1";

    fn member(node: &str, live: bool, issuers: &[&str]) -> Member {
        Member {
            node: node.into(),
            live,
            report: Some(Report {
                issuers: issuers.iter().map(|s| s.to_string()).collect(),
                signing_kid: Some(format!("kid-{node}")),
                rotation: "idle".into(),
                version: "0.1.0".into(),
                ..Report::default()
            }),
        }
    }

    fn facts(apiservers: &[&str], agents: Vec<Member>) -> Facts {
        Facts {
            view: View {
                agents,
                apiservers: apiservers.iter().map(|s| s.to_string()).collect(),
            },
            restart: None,
        }
    }

    #[test]
    fn once_every_server_signs_the_plan_says_when_the_older_issuers_go() {
        let hour = std::time::Duration::from_secs(3600);
        let switched = |node: &str, issuers: &[&str], at: Option<u64>| {
            let mut m = member(node, true, issuers);
            if let Some(r) = m.report.as_mut() {
                r.switched_at = at;
            }
            m
        };
        // b switched last, at 5000: the older issuer goes an hour later.
        let f = facts(
            &["a", "b"],
            vec![
                switched("a", &[NEW, OLD], Some(1000)),
                switched("b", &[NEW, OLD], Some(5000)),
            ],
        );
        let p = plan(&f, NEW, "a", 6000, Some(hour));
        assert!(p.done);
        assert_eq!(p.retire_at, Some(5000 + 3600 + 1));
        assert!(p.next.contains("b at "), "{}", p.next);
        assert!(p.next.contains(&crate::state::rfc3339(8600)), "{}", p.next);
        // Past it: they may go now.
        let p = plan(&f, NEW, "a", 9000, Some(hour));
        assert_eq!(p.retire_at, Some(9000));
        assert!(p.next.contains("may go now"), "{}", p.next);
        assert!(p.next.contains("a, b still accept"), "{}", p.next);
        // A server whose agent reports no switch time holds it, with no time.
        let f = facts(
            &["a", "b"],
            vec![
                switched("a", &[NEW, OLD], Some(1000)),
                switched("b", &[NEW, OLD], None),
            ],
        );
        let p = plan(&f, NEW, "a", 9000, Some(hour));
        assert_eq!(p.retire_at, None);
        assert!(
            p.next.contains("b (its agent reports no switch time)"),
            "{}",
            p.next
        );
        // Nothing older anywhere: nothing to say about retirement.
        let f = facts(
            &["a", "b"],
            vec![
                switched("a", &[NEW], Some(1000)),
                switched("b", &[NEW], Some(5000)),
            ],
        );
        let p = plan(&f, NEW, "a", 9000, Some(hour));
        assert_eq!(p.retire_at, None);
        assert!(p.next.contains("accepts no other issuer"), "{}", p.next);
        // Without the lifetime (not read): the rule, no time.
        let f = facts(&["a"], vec![switched("a", &[NEW, OLD], Some(1000))]);
        let p = plan(&f, NEW, "a", 9000, None);
        assert_eq!(p.retire_at, None);
        assert!(
            p.next.contains("the longest token lifetime after"),
            "{}",
            p.next
        );
    }

    #[test]
    fn servers_accept_first_then_sign_and_the_plan_says_who_is_next() {
        // Nobody accepts the new issuer: every live server accepts next.
        let f = facts(
            &["a", "b", "c"],
            vec![member("a", true, &[OLD]), member("b", true, &[OLD])],
        );
        let p = plan(&f, NEW, "a", 1000, None);
        let nodes: Vec<&str> = p.servers.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(nodes, ["a", "b", "c"]);
        assert!(p.servers[0].this && !p.servers[1].this);
        assert_eq!(p.servers[0].rollout, "before");
        assert_eq!(p.servers[2].agent, "none");
        assert_eq!(p.servers[2].rollout, "unknown");
        assert_eq!(p.without_agent, ["c"]);
        assert!(p.next.starts_with("a, b accept "), "{}", p.next);
        assert!(
            p.waits_for.iter().any(|w| w == "c (no live irsa-agent)"),
            "{:?}",
            p.waits_for
        );
        assert!(!p.done);

        // a and b accept it, c has no agent: nothing moves, and the plan names c.
        let f = facts(
            &["a", "b", "c"],
            vec![
                member("a", true, &[OLD, NEW]),
                member("b", true, &[OLD, NEW]),
            ],
        );
        let p = plan(&f, NEW, "a", 1000, None);
        assert_eq!(p.servers[0].rollout, "accepting");
        assert!(
            p.servers[0].next.starts_with("wait: "),
            "{}",
            p.servers[0].next
        );
        assert!(p.servers[0].next.contains("c (no live irsa-agent)"));
        assert_eq!(p.waits_for, ["c (no live irsa-agent)"]);
        assert!(p.next.starts_with("nothing can move"), "{}", p.next);

        // c's agent comes and accepts it: every server can sign.
        let f = facts(
            &["a", "b", "c"],
            vec![
                member("a", true, &[OLD, NEW]),
                member("b", true, &[NEW, OLD]),
                member("c", true, &[OLD, NEW]),
            ],
        );
        let p = plan(&f, NEW, "c", 1000, None);
        assert!(p.waits_for.is_empty(), "{:?}", p.waits_for);
        assert_eq!(p.servers[1].rollout, "signing");
        assert!(p.servers[1].next.starts_with("nothing"));
        assert!(p.next.starts_with("a, c sign with "), "{}", p.next);

        // Every server signs: done.
        let f = facts(
            &["a", "b"],
            vec![member("a", true, &[NEW, OLD]), member("b", true, &[NEW])],
        );
        let p = plan(&f, NEW, "a", 1000, None);
        assert!(p.done, "{p:?}");
        assert!(p.next.contains("finalize"), "{}", p.next);
    }

    #[test]
    fn an_expired_agent_and_the_restart_holder_are_named() {
        let mut f = facts(
            &["a", "b"],
            vec![member("a", true, &[OLD]), member("b", false, &[OLD, NEW])],
        );
        f.restart = Some(RestartHolder {
            holder: "a".into(),
            until: 2000,
        });
        let p = plan(&f, NEW, "a", 1000, None);
        assert_eq!(p.servers[1].agent, "expired");
        // A dead agent's report is not taken at its word.
        assert_eq!(p.servers[1].rollout, "unknown");
        assert!(
            p.next.starts_with("a restarts its apiserver now"),
            "{}",
            p.next
        );
        assert_eq!(p.restart.as_ref().map(|r| r.expired), Some(false));
        let p = plan(&f, NEW, "a", 2001, None);
        assert_eq!(p.restart.as_ref().map(|r| r.expired), Some(true));
        assert!(p.next.starts_with("a accepts "), "{}", p.next);
        let text = lines(&Cluster::Servers(Box::new(p))).join("\n");
        assert!(text.contains("PAST ITS TIME"), "{text}");
        assert!(text.contains("b: AGENT LEASE EXPIRED"), "{text}");
    }

    #[test]
    fn this_server_is_told_what_it_does_next_from_its_own_files() {
        let f = facts(
            &["a", "b"],
            vec![member("a", true, &[OLD]), member("b", true, &[OLD, NEW])],
        );
        let next = |accepted: &[&str]| {
            let accepted: Vec<String> = accepted.iter().map(|s| s.to_string()).collect();
            match from_read(Ok(Some(f.clone())), NEW, "a", 0, Some(&accepted), None) {
                Cluster::Servers(p) => p.this_server_next.unwrap_or_default(),
                other => panic!("{other:?}"),
            }
        };
        // Its files were changed since its agent announced: the files decide.
        assert!(
            next(&[OLD]).starts_with("accept the issuer"),
            "{}",
            next(&[OLD])
        );
        assert!(
            next(&[OLD, NEW]).starts_with("sign with"),
            "{}",
            next(&[OLD, NEW])
        );
        assert!(next(&[NEW, OLD]).starts_with("nothing"));
        let c = from_read(Err("refused".into()), NEW, "a", 0, None, None);
        assert_eq!(lines(&c), ["cluster:       cannot be read: refused"]);
    }

    #[test]
    fn one_server_without_identity_leases_still_shows_itself() {
        let p = plan(&facts(&[], vec![]), NEW, "solo", 0, None);
        assert_eq!(p.servers.len(), 1);
        assert_eq!(p.servers[0].agent, "none");
        let json = serde_json::to_value(Cluster::Servers(Box::new(p))).unwrap_or_default();
        assert_eq!(json["view"], "servers");
        assert_eq!(json["servers"][0]["node"], "solo");
        let single = serde_json::to_value(from_read(Ok(None), NEW, "solo", 0, None, None))
            .unwrap_or_default();
        assert_eq!(single["view"], "single-server");
    }
}
