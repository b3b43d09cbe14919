//! Three real kube-apiservers (v1.36.2, named by `IRSA_TEST_KUBE_APISERVER`) on one etcd, on
//! three kubeadm-shaped hosts, each with a kubelet stand-in that restarts its apiserver when the
//! static pod manifest changes (tests/ha_support). Without root, `ip`, `unshare`, etcd or the
//! binary the test says SKIPPED.
//!
//! The documented two-phase issuer rollout (README, "Several servers: the rollout order"), done
//! with the agent's CLI on each host in turn: `apply --accept-only` on every server, one at a
//! time, then `apply` on every server, one at a time, each waiting for its apiserver to be back
//! before the next; between the phases `publish` on every server (the README's step 2, to a
//! directory on each host). Throughout, a workload mints tokens through every apiserver and
//! re-checks every live one against all three (TokenReview) and against the JWKS each host's
//! agent published, and a monitor samples every 200 ms how many apiservers are down. No token
//! may be rejected, and never two apiservers down at once.
//!
//! Then issue 15's goal: the same configuration on every server, three daemons (`run`) started
//! at once, and the cluster converges by itself (accept first, sign once every apiserver
//! accepts, one apiserver restarting at a time).

mod ha_support;

use std::time::{Duration, Instant};

use ha_support::{
    Agent, DEFAULT_ISSUER, Ha, Monitor, MonitorReport, Review, Workload, WorkloadReport,
};
use rand::{Rng as _, SeedableRng as _};

const ISSUER: &str = "https://oidc.example.com/ha";
/// Every agent publishes to a directory on its host (`ha_support::PUBLISHED_JWKS`, which the
/// workload reads); nothing serves the issuer's URL here, so the agents do not fetch it back.
const PUBLISH: &str = "publish:\n  - type: directory\n    path: /srv/oidc\npublic-check: false\n";

/// How long a restarted apiserver may take to be back (the machine may be busy).
const RESTART: Duration = Duration::from_secs(120);

const PHASE_ONE: (&str, &[&str]) = ("accept-only", &["apply", "--accept-only"]);
const PHASE_TWO: (&str, &[&str]) = ("sign", &["apply"]);

/// What a rollout did.
struct Rollout {
    tokens: WorkloadReport,
    down: MonitorReport,
    /// restarts[phase][server]
    restarts: Vec<Vec<usize>>,
    /// Runs of apply that returned before their apiserver had been restarted.
    returned_early: Vec<String>,
    setup: Duration,
    wall: Duration,
}

impl Rollout {
    fn print(&self, what: &str, phases: &[(&str, &[&str])]) {
        let (tokens, down) = (&self.tokens, &self.down);
        eprintln!(
            "{what} (3 kube-apiservers, kubeadm hosts, agent CLI): setup {:.1}s, wall time {:.1}s",
            self.setup.as_secs_f64(),
            self.wall.as_secs_f64()
        );
        eprintln!("{}", tokens.describe());
        eprintln!(
            "apiservers down at once: at most {} ({} samples; samples down per server {:?})",
            down.max_down, down.samples, down.down_samples
        );
        for (p, (phase, _)) in phases.iter().enumerate() {
            eprintln!("restarts in phase {phase}: {:?}", self.restarts[p]);
        }
        eprintln!("down timeline:\n{}", down.describe());
        if !self.returned_early.is_empty() {
            eprintln!(
                "NOTE: apply returned before kubelet had restarted its apiserver (not verified): {}",
                self.returned_early.join("; ")
            );
        }
        for r in &tokens.rejections {
            eprintln!("rejected: {r}");
        }
    }
}

/// Each phase's command on every server: one server at a time, each waiting for its apiserver to
/// be back before the next (README), or (`together`) on all servers at once.
fn rollout(test: &str, phases: &[(&str, &[&str])], together: bool) -> Option<Rollout> {
    let begin = Instant::now();
    let ha = Ha::start(3, test)?;
    let setup = begin.elapsed();
    let n = ha.servers.len();
    for i in 0..n {
        ha.agent_config(
            i,
            &format!("issuer: {ISSUER}\ndistribution: kubeadm\n{PUBLISH}"),
        );
    }
    assert_eq!(ha.served_issuers(), vec![Some(DEFAULT_ISSUER.into()); n]);
    // The workload can tell a rejected token from an accepted one.
    assert!(
        matches!(
            ha.review(0, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl"),
            Review::Rejected(_)
        ),
        "a forged token was not rejected"
    );

    let monitor = ha.monitor();
    let workload = ha.workload(ISSUER);
    // Tokens minted before anything changes.
    workload.wait_rounds(3);

    let mut restarts = vec![vec![0usize; n]; phases.len()];
    let mut returned_early = Vec::new();
    for (p, (phase, args)) in phases.iter().enumerate() {
        if !args.contains(&"--accept-only") {
            // The README's step 2: the documents published before any server signs.
            for i in 0..n {
                let out = ha.agent(i).arg("publish").output().expect("irsa-agent");
                assert!(
                    out.status.success(),
                    "{}: irsa-agent publish: {}\n{}{}",
                    ha.servers[i].name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let steps: Vec<Vec<usize>> = if together {
            vec![(0..n).collect()]
        } else {
            (0..n).map(|i| vec![i]).collect()
        };
        for step in steps {
            let before: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
            let t = Instant::now();
            let agents: Vec<_> = step
                .iter()
                .map(|&i| {
                    let mut cmd = ha.agent(i);
                    cmd.args(*args);
                    (
                        i,
                        std::thread::spawn(move || cmd.output().expect("irsa-agent")),
                    )
                })
                .collect();
            for (i, agent) in agents {
                let out = agent.join().expect("agent thread");
                let took = t.elapsed();
                let name = &ha.servers[i].name;
                assert!(
                    out.status.success(),
                    "{name}: irsa-agent {}: {}\n{}{}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if ha.servers[i].starts() == before[i] {
                    returned_early.push(format!("{phase} on {name} (after {took:.1?})"));
                }
                eprintln!("{phase} on {name}: apply took {took:.1?}");
            }
            for &i in &step {
                // As the README asks: its apiserver back before the next server.
                let waited = ha.wait_restarted(i, before[i], RESTART);
                eprintln!(
                    "{phase} on {}: apiserver back {waited:.1?} later",
                    ha.servers[i].name
                );
            }
            // Give a second restart (there should be none) a moment to show.
            std::thread::sleep(Duration::from_secs(1));
            let after: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
            for j in 0..n {
                let expected = before[j] + usize::from(step.contains(&j));
                assert_eq!(
                    after[j],
                    expected,
                    "{phase} on {step:?}: {} started {} times (expected {}): {:?}",
                    ha.servers[j].name,
                    after[j] - before[j],
                    expected - before[j],
                    ha.servers[j].events()
                );
                restarts[p][j] += after[j] - before[j];
            }
            for &i in &step {
                let want: Vec<String> = if args.contains(&"--accept-only") {
                    vec![DEFAULT_ISSUER.into(), ISSUER.into()]
                } else {
                    vec![ISSUER.into(), DEFAULT_ISSUER.into()]
                };
                assert_eq!(
                    ha.servers[i].manifest_issuers(),
                    want,
                    "{phase} on {}: the manifest's issuers",
                    ha.servers[i].name
                );
            }
        }
    }
    let signing = if phases
        .iter()
        .any(|(_, args)| !args.contains(&"--accept-only"))
    {
        ISSUER
    } else {
        DEFAULT_ISSUER
    };
    assert_eq!(ha.served_issuers(), vec![Some(signing.into()); n]);
    if signing == ISSUER {
        // The workload's check against the published JWKS can fail: a fresh token verifies, the
        // same token with another payload does not.
        let token = ha.mint(0).expect("a token");
        let jwks = ha.servers[0].path(ha_support::PUBLISHED_JWKS);
        ha_support::verify_with_jwks_file(&token, &jwks, ISSUER).expect("a fresh token verifies");
        let parts: Vec<&str> = token.split('.').collect();
        let forged = [
            parts[0],
            "eyJpc3MiOiJodHRwczovL29pZGMuZXhhbXBsZS5jb20vaGEifQ",
            parts[2],
        ];
        assert!(
            ha_support::verify_with_jwks_file(&forged.join("."), &jwks, ISSUER).is_err(),
            "a token with another payload verified against the published JWKS"
        );
        assert!(
            ha_support::verify_with_jwks_file(&token, &jwks, DEFAULT_ISSUER).is_err(),
            "a token verified for another issuer"
        );
    }
    // Two more rounds check the newest tokens everywhere.
    workload.wait_more_rounds(2);
    let tokens = workload.finish();
    let down = monitor.finish();
    Some(Rollout {
        tokens,
        down,
        restarts,
        returned_early,
        setup,
        wall: begin.elapsed(),
    })
}

#[test]
fn the_two_phase_rollout_by_hand_rejects_no_token_and_restarts_one_apiserver_at_a_time() {
    let phases = [PHASE_ONE, PHASE_TWO];
    let Some(r) = rollout("real_apiserver_ha", &phases, false) else {
        return;
    };
    r.print("two-phase rollout by hand, one server at a time", &phases);
    let n = r.restarts[0].len() as u64;
    assert!(r.tokens.minted >= 3 * n, "{:?}", r.tokens);
    assert!(r.tokens.checked > r.tokens.minted, "{:?}", r.tokens);
    assert_eq!(
        (r.tokens.rejected, r.tokens.jwks_rejected_total()),
        (0, 0),
        "tokens rejected (TokenReview, published JWKS):\n{}",
        r.tokens.rejections.join("\n")
    );
    // The published JWKS were checked (after phase two the tokens carry the published issuer).
    assert!(
        r.tokens.jwks_checked.iter().all(|c| *c > 0),
        "{}",
        r.tokens.describe()
    );
    assert!(
        r.down.max_down <= 1,
        "{} apiservers down at once:\n{}",
        r.down.max_down,
        r.down.describe()
    );
    // The monitor saw every restart (each takes seconds).
    assert!(
        r.down.down_samples.iter().all(|d| *d > 0),
        "a restart the monitor did not see: {:?}\n{}",
        r.down.down_samples,
        r.down.describe()
    );
    for (p, (phase, _)) in phases.iter().enumerate() {
        assert_eq!(
            r.restarts[p],
            vec![1; n as usize],
            "restarts in phase {phase}"
        );
    }
    // apply waits for an apiserver process started after its change, also when the signing
    // issuer stays (phase one): it never returns before kubelet restarted the apiserver.
    assert!(
        r.returned_early.is_empty(),
        "apply returned before its apiserver restarted: {:?}",
        r.returned_early
    );
}

/// The harness sees the two failures issue 15 describes: skipping phase one rejects tokens (the
/// servers still on the old flags refuse what the switched ones mint), and applying on every
/// server at once takes the whole control plane down. About a minute each; not in the suite.
#[test]
#[ignore = "negative controls of the HA harness: cargo test --test real_apiserver_ha -- --ignored"]
fn the_harness_sees_rejected_tokens_and_a_control_plane_down() {
    let phases = [PHASE_TWO];
    let Some(r) = rollout("real_apiserver_ha", &phases, false) else {
        return;
    };
    r.print("apply without phase one, one server at a time", &phases);
    assert!(r.tokens.rejected > 0, "no token rejected: {:?}", r.tokens);
    assert!(r.down.max_down <= 1, "{}", r.down.describe());

    let phases = [PHASE_ONE];
    let Some(r) = rollout("real_apiserver_ha", &phases, true) else {
        return;
    };
    r.print("apply --accept-only on every server at once", &phases);
    assert_eq!(r.tokens.rejected, 0, "{:?}", r.tokens.rejections);
    assert!(r.down.max_down >= 2, "{}", r.down.describe());
}

/// Three daemons (`run`) with the same configuration on the three servers, and what they are
/// measured with.
struct Daemons {
    ha: Ha,
    agents: Vec<Agent>,
    monitor: Monitor,
    workload: Workload,
    starts_before: Vec<usize>,
    /// When the harness was asked for, and when the daemons were started.
    begin: Instant,
    started: Instant,
    setup: Duration,
}

/// What a daemon run measured.
struct DaemonFigures {
    tokens: WorkloadReport,
    down: MonitorReport,
    /// Apiserver starts per server since the daemons started.
    restarts: Vec<usize>,
    converged: Duration,
    wall: Duration,
    /// The last lines of every agent's output.
    logs: String,
    /// Every agent's whole output.
    outputs: Vec<String>,
    /// The servers' names, and their kubelet stand-ins' events.
    names: Vec<String>,
    events: Vec<Vec<(u64, String, String)>>,
}

impl Daemons {
    /// The harness, the issuer (and `extra`) in every host's configuration, the monitor and the
    /// workload running (three rounds done), and the three daemons started at once.
    fn start(test: &str, extra: &str) -> Option<Daemons> {
        let begin = Instant::now();
        let ha = Ha::start(3, test)?;
        let setup = begin.elapsed();
        ha.wait_membership(Duration::from_secs(60));
        for i in 0..ha.servers.len() {
            ha.agent_config(
                i,
                &format!("issuer: {ISSUER}\ndistribution: kubeadm\n{PUBLISH}{extra}"),
            );
        }
        let monitor = ha.monitor();
        let workload = ha.workload(ISSUER);
        workload.wait_rounds(3);
        let starts_before: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
        let started = Instant::now();
        let agents = (0..ha.servers.len())
            .map(|i| Daemons::spawn(&ha, i))
            .collect();
        Some(Daemons {
            ha,
            agents,
            monitor,
            workload,
            starts_before,
            begin,
            started,
            setup,
        })
    }

    /// Server `i`'s daemon, under its server's name (the agents share this machine's host name).
    fn spawn(ha: &Ha, i: usize) -> Agent {
        let name = ha.servers[i].name.clone();
        ha.spawn_agent(i, &["run", "--node-name", &name])
    }

    /// The last lines of every agent's output.
    fn logs(&self) -> String {
        ha_support::log_tails(self.agents.iter().map(|a| &a.log), 25)
    }

    /// Waits (up to 10 minutes) until every apiserver signs with the new issuer and `fault`
    /// (called every second with the time since the daemons started) says it is done; then two
    /// more workload rounds and five quiet seconds (a stray restart would show).
    fn converge(mut self, mut fault: impl FnMut(&mut Daemons, Duration) -> bool) -> DaemonFigures {
        let deadline = Instant::now() + Duration::from_secs(600);
        let converged = loop {
            let t = self.started.elapsed();
            let done = fault(&mut self, t);
            let served = self.ha.served_issuers();
            if done && served.iter().all(|s| s.as_deref() == Some(ISSUER)) {
                break self.started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the daemons did not converge in 10 minutes: served {served:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_secs(1));
        };
        self.workload.wait_more_rounds(2);
        std::thread::sleep(Duration::from_secs(5));
        let restarts = self
            .ha
            .servers
            .iter()
            .zip(&self.starts_before)
            .map(|(s, b)| s.starts() - b)
            .collect();
        for (i, s) in self.ha.servers.iter().enumerate() {
            assert_eq!(
                s.manifest_issuers(),
                vec![ISSUER.to_string(), DEFAULT_ISSUER.to_string()],
                "{}: the manifest's issuers\n{}",
                self.ha.servers[i].name,
                self.logs()
            );
        }
        let logs = self.logs();
        let outputs = self.agents.iter().map(Agent::output).collect();
        let figures = DaemonFigures {
            tokens: self.workload.finish(),
            down: self.monitor.finish(),
            restarts,
            converged,
            wall: self.begin.elapsed(),
            logs: logs.clone(),
            outputs,
            names: self.ha.servers.iter().map(|s| s.name.clone()).collect(),
            events: self.ha.servers.iter().map(|s| s.events()).collect(),
        };
        figures.print(&format!("(setup {:.1}s)", self.setup.as_secs_f64()));
        assert_eq!(
            (
                figures.tokens.rejected,
                figures.tokens.jwks_rejected_total()
            ),
            (0, 0),
            "tokens rejected (TokenReview, published JWKS):\n{}\n{logs}",
            figures.tokens.rejections.join("\n"),
        );
        // Every agent published, and its JWKS verified the tokens of the new issuer.
        assert!(
            figures.tokens.jwks_checked.iter().all(|c| *c > 0),
            "{}\n{logs}",
            figures.tokens.describe()
        );
        figures
    }
}

impl DaemonFigures {
    fn print(&self, what: &str) {
        let (tokens, down) = (&self.tokens, &self.down);
        eprintln!(
            "{what}: converged {:.1}s after the daemons started, wall time {:.1}s",
            self.converged.as_secs_f64(),
            self.wall.as_secs_f64()
        );
        eprintln!("{}", tokens.describe());
        eprintln!(
            "apiservers down at once: at most {}; restarts per server {:?}",
            down.max_down, self.restarts
        );
        eprintln!(
            "monitor: {} samples, {} with a server not answering /readyz within {:?} (busy machine; not counted as down)",
            down.samples,
            down.slow_samples,
            ha_support::MONITOR_TIMEOUT
        );
        eprintln!("down timeline:\n{}", down.describe());
    }
}

/// Issue 15's goal: the same configuration given to an agent on every server, all three daemons
/// started at once (measured before: every apiserver restarted together, or, 10 s apart, 153
/// checks of valid tokens rejected), and the cluster converges by itself. Each agent accepts the
/// issuer first (one apiserver restarting at a time, through the restart Lease), announces it in
/// its Lease, and signs with it only once every apiserver accepts it.
#[test]
fn three_daemons_started_together_roll_the_issuer_out_one_apiserver_at_a_time() {
    let Some(daemons) = Daemons::start("real_apiserver_ha_daemons", "") else {
        return;
    };
    let n = daemons.ha.servers.len();
    let r = daemons.converge(|_, _| true);
    eprintln!("three daemons started together (3 kube-apiservers, kubeadm hosts)");
    assert!(
        r.down.max_down <= 1,
        "{} apiservers down at once:\n{}\n{}",
        r.down.max_down,
        r.down.describe(),
        r.logs
    );
    // Accept, then sign: two restarts per server, no more.
    assert_eq!(r.restarts, vec![2; n], "restarts per server\n{}", r.logs);
}

/// The fault runs' daemons retry after at most 15 s (default 5 minutes): an agent that waited
/// for its peers through a fault has backed off, and would otherwise resume minutes after they
/// are ready.
const FAULT_CONFIG: &str = "run:\n  retry-max: 15s\n";

/// The seed of a randomized test: `IRSA_TEST_SEED` to replay one, else the clock's.
fn seed() -> u64 {
    std::env::var("IRSA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(ha_support::unix_ms)
}

/// The points of the rollout an agent is killed at: the `nth` line of its output containing
/// `marker` (then up to 2 s more).
const KILL_POINTS: [(&str, &str, usize); 5] = [
    (
        "waiting for its turn to restart",
        "waiting for this server's turn to restart its apiserver",
        1,
    ),
    (
        "holding the restart Lease, its apiserver restarting to accept the issuer",
        "wrote /etc/kubernetes/manifests/kube-apiserver.yaml (",
        1,
    ),
    (
        "holding the restart Lease, its apiserver restarting to sign with the issuer",
        "wrote /etc/kubernetes/manifests/kube-apiserver.yaml (",
        2,
    ),
    (
        "its apiserver just seen serving, before announcing it",
        "is ready and serves issuer",
        1,
    ),
    (
        "waiting for the other servers to accept the issuer",
        "every apiserver must accept issuer",
        1,
    ),
];

/// Issue 15's faults: an agent killed (-9) at a random point of the rollout, then started again
/// a few seconds later. The point (one of [`KILL_POINTS`], reached by whichever agent reaches it
/// first), the extra delay and how long it stays dead are drawn from a printed seed
/// (`IRSA_TEST_SEED=<it>` draws the same; the timing of the rollout itself varies). Whatever it
/// was doing, the cluster neither rejects a token nor has two apiservers down, and completes once
/// it is back; a restart Lease it held is given back when it is back (not after the Lease's 6
/// minutes).
#[test]
fn an_agent_killed_at_a_random_point_of_the_rollout_delays_it_and_breaks_nothing() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (point, marker, nth) = KILL_POINTS[rng.gen_range(0..KILL_POINTS.len())];
    let delay = Duration::from_millis(rng.gen_range(0..2_000));
    let dead_for = Duration::from_millis(rng.gen_range(2_000..12_000));
    eprintln!(
        "seed {seed} (IRSA_TEST_SEED={seed} draws it again): kill -9 the first agent {point} (its output line {nth} with \"{marker}\"), {delay:.1?} later; dead for {dead_for:.1?}"
    );
    let Some(daemons) = Daemons::start("real_apiserver_ha_kill", FAULT_CONFIG) else {
        return;
    };
    let n = daemons.ha.servers.len();
    // (victim, when its point was seen)
    let mut seen: Option<(usize, Instant)> = None;
    let mut killed: Option<Instant> = None;
    let mut back = false;
    let r = daemons.converge(|d, t| {
        if seen.is_none() {
            let reached = (0..n).find(|&i| {
                d.agents[i]
                    .output()
                    .lines()
                    .filter(|l| l.contains(marker))
                    .count()
                    >= nth
            });
            // Not reached by anyone within 90 s (the rollout went another way): now.
            let fallback = t > Duration::from_secs(90);
            if let Some(i) = reached.or(fallback.then_some(0)) {
                if reached.is_none() {
                    eprintln!("nobody reached the point in 90 s: killing cp1's agent now");
                }
                seen = Some((i, Instant::now()));
            }
        }
        if let Some((victim, at)) = seen
            && killed.is_none()
        {
            // The rest of the delay (converge calls every second or so).
            std::thread::sleep(delay.saturating_sub(at.elapsed()));
            let before = d.agents[victim].output();
            d.agents[victim].kill();
            let last: Vec<&str> = before.lines().rev().take(3).collect();
            eprintln!(
                "killed cp{}'s agent (-9) {:.1?} after the start; apiserver starts so far {:?}; its last words:\n  {}",
                victim + 1,
                d.started.elapsed(),
                d.ha.servers.iter().map(|s| s.starts()).collect::<Vec<_>>(),
                last.into_iter().rev().collect::<Vec<_>>().join("\n  ")
            );
            killed = Some(Instant::now());
        }
        if let (Some((victim, _)), Some(k)) = (seen, killed)
            && !back
            && k.elapsed() >= dead_for
        {
            d.agents[victim] = Daemons::spawn(&d.ha, victim);
            eprintln!(
                "started cp{}'s agent again {:.1?} after the start",
                victim + 1,
                d.started.elapsed()
            );
            back = true;
        }
        back
    });
    assert!(
        r.down.max_down <= 1,
        "{} apiservers down at once:\n{}\n{}",
        r.down.max_down,
        r.down.describe(),
        r.logs
    );
    // Accept, then sign: two restarts per server (a restart the killed agent had started is
    // finished by kubelet, not done again).
    assert_eq!(r.restarts, vec![2; n], "restarts per server\n{}", r.logs);
    // No agent waited for the restart Lease of the killed one until it expired (6 minutes after
    // it was taken; 115-190 s to converge measured at loads of 10-40).
    assert!(
        r.converged < Duration::from_secs(330),
        "converged only after {:.1?}\n{}",
        r.converged,
        r.logs
    );
}

/// Issue 15's faults: one apiserver kept down for 30 s in the middle of the rollout (its kubelet
/// stopped, once every agent has announced itself and before every server signs), while its
/// agent keeps running. Taken down at a quiet moment (the test holds the agents' restart Lease
/// while it stops it, so no agent's restart is in flight), it must be the only apiserver down
/// while it is down: no agent may start a restart until it is back (with
/// k3s's embedded etcd that would be a lost quorum). The agents that still have to restart say
/// whom they wait for; once it is back, the cluster completes, and nothing is rejected.
#[test]
fn one_apiserver_kept_down_holds_every_restart_until_it_is_back() {
    const KEPT_DOWN: Duration = Duration::from_secs(30);
    let Some(daemons) = Daemons::start("real_apiserver_ha_down", FAULT_CONFIG) else {
        return;
    };
    let n = daemons.ha.servers.len();
    // (server kept down, when it was stopped, when it was seen ready again: Unix ms)
    let mut down: Option<(usize, u64, Instant)> = None;
    let mut back: Option<u64> = None;
    let mut holding = false;
    let r = daemons.converge(|d, _| {
        if down.is_none() {
            let signs = |d: &Daemons, i: usize| {
                d.ha.servers[i]
                    .manifest_issuers()
                    .first()
                    .map(String::as_str)
                    == Some(ISSUER)
            };
            // Once every server accepts the issuer (its manifest says so), the test takes the
            // restart turn as soon as it is free: a quiet moment (no agent restarting), and at
            // most one server has signed meanwhile, so at least two still have to restart. (It
            // waited for the agents' announcements first, and on a loaded machine every other
            // server had signed by then: nobody was left to hold.)
            if !holding {
                if !(0..n).all(|i| {
                    d.ha.servers[i]
                        .manifest_issuers()
                        .iter()
                        .any(|s| s == ISSUER)
                }) {
                    return false;
                }
                d.ha.take_restart_lease(0, "the-test", 120, Duration::from_secs(180));
                holding = true;
            }
            // Every agent has announced itself (each after its change was verified), so that
            // every server is known to the others.
            if d.ha.live_agents(0).len() < n {
                return false;
            }
            // One that does not sign with the issuer yet: its agent and another still have to
            // restart.
            let unsigned: Vec<usize> = (0..n).filter(|&i| !signs(d, i)).collect();
            assert!(
                unsigned.len() >= 2,
                "servers not signing yet when the test took the restart turn: {unsigned:?}"
            );
            let x = unsigned[unsigned.len() - 1];
            let stopped = ha_support::unix_ms();
            d.ha.stop_apiserver(x);
            let other = (x + 1) % n;
            d.ha.release_restart_lease(other, "the-test");
            eprintln!(
                "{} kept down from {:.1?} after the daemons started",
                d.ha.servers[x].name,
                d.started.elapsed()
            );
            down = Some((x, stopped, Instant::now()));
        }
        let Some((x, _, since)) = down else {
            return false;
        };
        if back.is_none() && since.elapsed() >= KEPT_DOWN {
            let starts = d.ha.servers[x].starts();
            d.ha.start_apiserver(x);
            let waited = d.ha.wait_restarted(x, starts, RESTART);
            back = Some(ha_support::unix_ms());
            eprintln!(
                "{} started again, ready {waited:.1?} later ({:.1?} after the daemons started)",
                d.ha.servers[x].name,
                d.started.elapsed()
            );
        }
        back.is_some()
    });
    let (x, stopped, _) = down.expect("kept down");
    let back = back.expect("back");
    let name = r.names[x].clone();
    // No agent started a restart (wrote a manifest its kubelet picked up) while it was down.
    // (The servers' stand-ins log `changed` when the manifest changes.)
    let begun: Vec<String> = r
        .events
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != x)
        .flat_map(|(i, events)| {
            events
                .iter()
                .filter(|e| e.1 == "changed" && e.0 > stopped && e.0 < back)
                .map(move |e| format!("cp{} at +{} ms", i + 1, e.0 - stopped))
        })
        .collect();
    assert!(
        begun.is_empty(),
        "restarts begun while {name} was down: {begun:?}\n{}",
        r.logs
    );
    // So never two down at once, the one kept down included.
    assert!(
        r.down.max_down <= 1,
        "{} apiservers down at once:\n{}\n{}",
        r.down.max_down,
        r.down.describe(),
        r.logs
    );
    // The rule was what held them: an agent said whom it waited for.
    let waiting = format!("waiting for {name}'s apiserver to come back before restarting this one");
    assert!(
        r.outputs
            .iter()
            .enumerate()
            .any(|(i, o)| i != x && o.contains(&waiting)),
        "no agent said \"{waiting}\"\n{}",
        r.logs
    );
    // The others: accept, then sign; the one kept down: its start by the test (with what its
    // agent wrote meanwhile) and what remains.
    for i in (0..n).filter(|&i| i != x) {
        assert_eq!(r.restarts[i], 2, "restarts of cp{}\n{}", i + 1, r.logs);
    }
}
