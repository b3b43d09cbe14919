//! Three real kube-apiservers (v1.36.2, named by `IRSA_TEST_KUBE_APISERVER`) on one etcd, on
//! three kubeadm-shaped hosts, each with a kubelet stand-in that restarts its apiserver when the
//! static pod manifest changes (tests/ha_support). Without root, `ip`, `unshare`, etcd or the
//! binary the test says SKIPPED.
//!
//! The documented two-phase issuer rollout (README, "Several servers: the rollout order"), done
//! with the agent's CLI on each host in turn: `apply --accept-only` on every server, one at a
//! time, then `apply` on every server, one at a time, each waiting for its apiserver to be back
//! before the next. Throughout, a workload mints tokens through every apiserver and re-checks every
//! live one against all three (TokenReview), and a monitor samples every 200 ms how many
//! apiservers are down. No token may be rejected, and never two apiservers down at once.
//!
//! Then issue 15's goal: the same configuration on every server, three daemons (`run`) started
//! at once, and the cluster converges by itself (accept first, sign once every apiserver
//! accepts, one apiserver restarting at a time).

mod ha_support;

use std::time::{Duration, Instant};

use ha_support::{DEFAULT_ISSUER, Ha, MonitorReport, Review, WorkloadReport};

const ISSUER: &str = "https://oidc.example.com/ha";

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
        eprintln!(
            "tokens: {} minted (per server {:?}; {} mints refused or unanswered), {} checks answered, {} rejected, {} checks unanswered, {} rounds",
            tokens.minted,
            tokens.minted_by,
            tokens.mint_failed,
            tokens.checked,
            tokens.rejected,
            tokens.unavailable,
            tokens.rounds
        );
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
        ha.agent_config(i, &format!("issuer: {ISSUER}\ndistribution: kubeadm\n"));
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
    let workload = ha.workload();
    // Tokens minted before anything changes.
    while workload.report().rounds < 3 {
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut restarts = vec![vec![0usize; n]; phases.len()];
    let mut returned_early = Vec::new();
    for (p, (phase, args)) in phases.iter().enumerate() {
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
    // Two more rounds check the newest tokens everywhere.
    let rounds = workload.report().rounds;
    while workload.report().rounds < rounds + 2 {
        std::thread::sleep(Duration::from_millis(200));
    }
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
        r.tokens.rejected,
        0,
        "tokens rejected:\n{}",
        r.tokens.rejections.join("\n")
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

/// Issue 15's goal: the same configuration given to an agent on every server, all three daemons
/// started at once (measured before: every apiserver restarted together, or, 10 s apart, 153
/// checks of valid tokens rejected), and the cluster converges by itself. Each agent accepts the
/// issuer first (one apiserver restarting at a time, through the restart Lease), announces it in
/// its Lease, and signs with it only once every apiserver accepts it.
#[test]
fn three_daemons_started_together_roll_the_issuer_out_one_apiserver_at_a_time() {
    let begin = Instant::now();
    let Some(ha) = Ha::start(3, "real_apiserver_ha_daemons") else {
        return;
    };
    let setup = begin.elapsed();
    let n = ha.servers.len();
    ha.wait_membership(Duration::from_secs(60));
    for i in 0..n {
        ha.agent_config(i, &format!("issuer: {ISSUER}\ndistribution: kubeadm\n"));
    }
    let monitor = ha.monitor();
    let workload = ha.workload();
    while workload.report().rounds < 3 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let starts_before: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
    let t = Instant::now();
    // Each agent under its server's name (the agents share this machine's host name).
    let agents: Vec<_> = (0..n)
        .map(|i| {
            let name = ha.servers[i].name.clone();
            ha.spawn_agent(i, &["run", "--node-name", &name])
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let converged = loop {
        let served = ha.served_issuers();
        if served.iter().all(|s| s.as_deref() == Some(ISSUER)) {
            break Some(t.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let logs = || {
        agents
            .iter()
            .map(|a| {
                let text = std::fs::read_to_string(&a.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                format!(
                    "--- {}\n{}",
                    a.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let Some(converged) = converged else {
        panic!(
            "the daemons did not converge in 10 minutes: served {:?}\n{}",
            ha.served_issuers(),
            logs()
        );
    };
    // Two more rounds check the newest tokens everywhere.
    let rounds = workload.report().rounds;
    while workload.report().rounds < rounds + 2 {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing more happens once every server signs with it (give a stray restart time to show).
    std::thread::sleep(Duration::from_secs(5));
    let tokens = workload.finish();
    let down = monitor.finish();
    let restarts: Vec<usize> = ha
        .servers
        .iter()
        .zip(&starts_before)
        .map(|(s, b)| s.starts() - b)
        .collect();
    eprintln!(
        "three daemons started together (3 kube-apiservers, kubeadm hosts): setup {:.1}s, converged {:.1}s after the start, wall time {:.1}s",
        setup.as_secs_f64(),
        converged.as_secs_f64(),
        begin.elapsed().as_secs_f64()
    );
    eprintln!(
        "tokens: {} minted (per server {:?}), {} checks answered, {} rejected, {} unanswered; apiservers down at once: at most {}; restarts per server {:?}",
        tokens.minted,
        tokens.minted_by,
        tokens.checked,
        tokens.rejected,
        tokens.unavailable,
        down.max_down,
        restarts
    );
    eprintln!("down timeline:\n{}", down.describe());
    assert_eq!(
        tokens.rejected,
        0,
        "tokens rejected:\n{}\n{}",
        tokens.rejections.join("\n"),
        logs()
    );
    assert!(
        down.max_down <= 1,
        "{} apiservers down at once:\n{}\n{}",
        down.max_down,
        down.describe(),
        logs()
    );
    // Accept, then sign: two restarts per server, no more.
    assert_eq!(restarts, vec![2; n], "restarts per server\n{}", logs());
    for (i, s) in ha.servers.iter().enumerate() {
        assert_eq!(
            s.manifest_issuers(),
            vec![ISSUER.to_string(), DEFAULT_ISSUER.to_string()],
            "{}: the manifest's issuers\n{}",
            ha.servers[i].name,
            logs()
        );
    }
}
