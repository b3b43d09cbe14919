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

mod ha_support;

use std::time::{Duration, Instant};

use ha_support::{DEFAULT_ISSUER, Ha, Review};

const ISSUER: &str = "https://oidc.example.com/ha";

/// How long a restarted apiserver may take to be back (the machine may be busy).
const RESTART: Duration = Duration::from_secs(120);

#[test]
fn the_two_phase_rollout_by_hand_rejects_no_token_and_restarts_one_apiserver_at_a_time() {
    let begin = Instant::now();
    let Some(ha) = Ha::start(3, "real_apiserver_ha") else {
        return;
    };
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

    let phases: [(&str, &[&str]); 2] = [
        ("accept-only", &["apply", "--accept-only"]),
        ("sign", &["apply"]),
    ];
    // restarts[phase][server]
    let mut restarts = vec![vec![0usize; n]; phases.len()];
    // Runs of apply that returned before their apiserver had been restarted.
    let mut returned_early = Vec::new();
    for (p, (phase, args)) in phases.iter().enumerate() {
        for i in 0..n {
            let name = ha.servers[i].name.clone();
            let before: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
            let t = Instant::now();
            let out = ha.agent(i).args(*args).output().expect("irsa-agent");
            let took = t.elapsed();
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
            // As the README asks: its apiserver back before the next server.
            let waited = ha.wait_restarted(i, before[i], RESTART);
            // Give a restart that was not the last one a moment to show.
            std::thread::sleep(Duration::from_secs(1));
            let after: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
            for j in 0..n {
                let expected = before[j] + usize::from(j == i);
                assert_eq!(
                    after[j],
                    expected,
                    "{phase} on {name}: {} started {} times (expected {}): {:?}",
                    ha.servers[j].name,
                    after[j] - before[j],
                    expected - before[j],
                    ha.servers[j].events()
                );
            }
            restarts[p][i] += after[i] - before[i];
            eprintln!(
                "{phase} on {name}: apply {took:.1?}, apiserver back {waited:.1?} after apply returned"
            );
            let issuers = ha.servers[i].manifest_issuers();
            let want: Vec<String> = if p == 0 {
                vec![DEFAULT_ISSUER.into(), ISSUER.into()]
            } else {
                vec![ISSUER.into(), DEFAULT_ISSUER.into()]
            };
            assert_eq!(issuers, want, "{phase} on {name}: the manifest's issuers");
        }
    }
    // Every apiserver signs with the new issuer now; a last round checks the newest tokens.
    assert_eq!(ha.served_issuers(), vec![Some(ISSUER.into()); n]);
    let rounds = workload.report().rounds;
    while workload.report().rounds < rounds + 2 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let tokens = workload.finish();
    let down = monitor.finish();
    let wall = begin.elapsed();

    eprintln!(
        "HA rollout (3 kube-apiservers, kubeadm hosts, agent CLI by hand): setup {:.1}s, wall time {:.1}s",
        setup.as_secs_f64(),
        wall.as_secs_f64()
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
        eprintln!("restarts in phase {phase}: {:?}", restarts[p]);
    }
    eprintln!("down timeline:\n{}", down.describe());
    if !returned_early.is_empty() {
        eprintln!(
            "NOTE: apply returned before kubelet had restarted its apiserver (not verified): {}",
            returned_early.join("; ")
        );
    }

    assert!(tokens.minted >= 3 * n as u64, "{tokens:?}");
    assert!(tokens.checked > tokens.minted, "{tokens:?}");
    assert_eq!(
        tokens.rejected,
        0,
        "tokens rejected:\n{}",
        tokens.rejections.join("\n")
    );
    assert!(
        down.max_down <= 1,
        "{} apiservers down at once:\n{}",
        down.max_down,
        down.describe()
    );
    // The monitor saw every restart (each takes seconds).
    assert!(
        down.down_samples.iter().all(|d| *d > 0),
        "a restart the monitor did not see: {:?}\n{}",
        down.down_samples,
        down.describe()
    );
    for (p, (phase, _)) in phases.iter().enumerate() {
        assert_eq!(restarts[p], vec![1; n], "restarts in phase {phase}");
    }
}
