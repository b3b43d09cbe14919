//! Issue 15 on kubeadm-shaped hosts, from an issuer rollout to a whole key rotation: three real
//! kube-apiservers (v1.36.2, `IRSA_TEST_KUBE_APISERVER`) on one etcd, each run by a kubelet
//! stand-in that restarts it when its static pod manifest changes (tests/ha_support), each host
//! with its own copy of kubeadm's `sa.key`/`sa.pub` and its own agent (`irsa-agent run`).
//! Without root, `ip`, `unshare`, etcd or the binary the test says SKIPPED.
//!
//! 1. The three daemons start together with the same configuration: a new public issuer (the
//!    servers sign with kubeadm's default) and rotation enabled but not due. They roll the issuer
//!    out by themselves (accept everywhere, then sign), one restart at a time.
//! 2. A person runs `irsa-agent rotate --now` on cp1. Its agent drives the cluster's rotation: it
//!    shares the new key sealed with the `sa.key` every node has (Secret
//!    `kube-system/irsa-agent-rotation-key`); cp2's and cp3's daemons open it and install every
//!    step on their own hosts (verify-only, sign, retire), holding the restart Lease; the driver
//!    advances only once every apiserver has the previous step. With the shortest real settings
//!    (token lifetime 10 minutes, no propagation hold) the rotation runs to its end: the old key
//!    is retired everywhere, `sa.key` holds the new key on every node, the shared key is gone.
//!
//! 3. Once the rotation is over, the agents retire kubeadm's default issuer by themselves (every
//!    node switched more than the tokens' lifetime ago): one restart per node, one at a time.
//!
//! Faults, drawn from a printed seed (`IRSA_TEST_SEED=<it>` draws the same points): a follower's
//! agent (cp2's) is killed (-9) while it installs one of the driver's steps (the nth time it
//! says "installing", then up to 2 s more) and the driver's daemon (cp1's) right after it writes
//! one of its manifests (sign or retire); each is started again a few seconds later. The cluster
//! must hold meanwhile (never two apiservers down, nothing rejected) and finish.
//!
//! Throughout, a workload mints tokens through every apiserver and re-checks every live one
//! against all three (TokenReview), and a monitor samples how many apiservers are down. Figures:
//! tokens rejected (must be 0), apiservers down at once (must be 1), restarts per server per
//! rollout and rotation phase and to retire the old issuer, wall time. About 19 minutes:
//! tests/run.sh runs it in the background beside the rest of the suite.

mod ha_site;
mod ha_support;
mod https_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ha_site::{ISSUER, Kill, PublicSite, phase, rotation_state, seed, sustained_down};
use ha_support::{Ha, unix_ms};
use rand::{Rng as _, SeedableRng as _};

const KCM_MANIFEST: &str = "/etc/kubernetes/manifests/kube-controller-manager.yaml";
/// The issuer kubeadm's apiservers sign with before the rollout.
const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The kid of the key in a host's `sa.key`.
fn sa_key_kid(root: &Path) -> String {
    let bytes = std::fs::read(root.join("etc/kubernetes/pki/sa.key")).expect("sa.key");
    irsa_agent::keys::parse_signing_key(&bytes)
        .expect("sa.key")
        .public
        .kid()
}

/// The last lines of every agent's output.
fn logs(agents: &[ha_support::Agent]) -> String {
    ha_support::log_tails(agents.iter().map(|a| &a.log), 30)
}

/// Every host as kubeadm leaves it plus the agent's configuration (the same on every server):
/// the public issuer, publishing to `/srv/oidc`, rotation with the shortest real settings.
/// Returns the kid of the `sa.key` every node shares.
fn prepare(ha: &Ha) -> String {
    ha.wait_membership(Duration::from_secs(60));
    ha.create_service_account("kube-system", "default");
    let old_kid = sa_key_kid(&ha.servers[0].root);
    let ca = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/probe/ca.crt"))
        .expect("test CA");
    let kcm = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/hosts/kubeadm/kube-controller-manager-v1.33.yaml"),
    )
    .expect("kube-controller-manager manifest");
    for (i, s) in ha.servers.iter().enumerate() {
        assert_eq!(sa_key_kid(&s.root), old_kid, "kubeadm shares sa.key");
        let ca_path = s.path("/etc/irsa-agent/test-ca.crt");
        std::fs::create_dir_all(ca_path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&ca_path, &ca).expect("CA");
        // kubeadm's controller-manager manifest (the stand-in does not run it): rotation switches
        // its signing key with the apiserver's.
        std::fs::write(s.path(KCM_MANIFEST), &kcm).expect("kcm manifest");
        ha.agent_config(
            i,
            &format!(
                "issuer: {ISSUER}\ndistribution: kubeadm\nca-file: /etc/irsa-agent/test-ca.crt\npublish:\n  - type: directory\n    path: /srv/oidc\n    cache-control: \"public, max-age=0\"\nrotation:\n  enabled: true\n  every: 30d\n  propagation-wait: 0s\n  cdn-ttl: 0s\n  token-lifetime: 10m\n  drain-margin: 0s\n"
            ),
        );
    }
    old_kid
}

/// Server `i`'s daemon.
fn spawn(ha: &Ha, i: usize) -> ha_support::Agent {
    let name = ha.servers[i].name.clone();
    ha.spawn_agent(
        i,
        &[
            "run",
            "--node-name",
            &name,
            "--poll-interval",
            "500ms",
            "--timeout",
            "120s",
            // Followers and the driver look again every 10 s instead of every minute.
            "--recheck-interval",
            "10s",
        ],
    )
}

/// Waits until the daemons rolled the issuer out (every apiserver signs with it) and cp1 has
/// published the documents (a rotation's publish step checks the public copy).
fn roll_out(ha: &Ha, agents: &[ha_support::Agent]) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !ha
        .served_issuers()
        .iter()
        .all(|s| s.as_deref() == Some(ISSUER))
    {
        assert!(
            Instant::now() < deadline,
            "the daemons did not roll the issuer out in 10 minutes: {:?}\n{}",
            ha.served_issuers(),
            logs(agents)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The published documents are there before the rotation starts (its publish step checks
    // the public copy).
    let jwks = ha.servers[0].root.join("srv/oidc/openid/v1/jwks");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !jwks.exists() {
        assert!(
            Instant::now() < deadline,
            "cp1 published nothing\n{}",
            logs(agents)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
}

/// The tests of this file one at a time (each runs three apiservers).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn three_kubeadm_nodes_roll_an_issuer_out_then_rotate_the_key_to_the_end() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let begin = Instant::now();
    let Some(ha) = Ha::start(3, "real_apiserver_ha_kubeadm_rotation") else {
        return;
    };
    let setup = begin.elapsed();
    let n = ha.servers.len();
    let roots: Vec<PathBuf> = ha.servers.iter().map(|s| s.root.clone()).collect();
    ha.wait_membership(Duration::from_secs(60));
    ha.create_service_account("kube-system", "default");
    let old_kid = prepare(&ha);
    let site = PublicSite::start(&ha.netns, roots.clone());
    let monitor = ha.monitor();
    // A round every 5 s: live tokens pile up over the 10-minute drain (as in the k3s test).
    let workload = ha.workload_with(ha.workload_options(ISSUER, Duration::from_secs(5)));
    workload.wait_rounds(3);
    let starts_before: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
    let t = Instant::now();
    let spawn = |i: usize| spawn(&ha, i);
    let mut agents: Vec<_> = (0..n).map(spawn).collect();

    // 1. The issuer rollout, by the daemons alone.
    roll_out(&ha, &agents);
    let rolled_out = t.elapsed();
    let rollout_starts: Vec<usize> = ha
        .servers
        .iter()
        .zip(&starts_before)
        .map(|(s, b)| s.starts() - b)
        .collect();
    eprintln!(
        "{:6.1}s: issuer rolled out; apiserver restarts per server {rollout_starts:?}",
        t.elapsed().as_secs_f64()
    );

    // The faults of this run.
    let mut kills = [
        Kill {
            server: 1,
            marker: ": installing ",
            nth: rng.gen_range(1..=3),
            delay: Duration::from_millis(rng.gen_range(0..2000)),
            dead_for: Duration::from_millis(rng.gen_range(2000..10000)),
            from: agents[1].output().len(),
            killed: None,
            done: false,
        },
        Kill {
            server: 0,
            marker: "wrote /etc/kubernetes/manifests/kube-apiserver.yaml (",
            nth: rng.gen_range(1..=2),
            delay: Duration::from_millis(rng.gen_range(0..3000)),
            dead_for: Duration::from_millis(rng.gen_range(2000..10000)),
            from: agents[0].output().len(),
            killed: None,
            done: false,
        },
    ];
    for k in &kills {
        eprintln!(
            "seed {seed} (IRSA_TEST_SEED={seed} draws it again): kill -9 {}'s agent {:?} after its line {} with \"{}\", dead for {:?}",
            ha.servers[k.server].name, k.delay, k.nth, k.marker, k.dead_for
        );
    }

    // 2. A person starts a rotation on cp1.
    let rotation_begin = Instant::now();
    // The rotation is staged from here (`rotate --now` stages it, then installs the new key as a
    // verification key on cp1 before it returns).
    let mut timeline: Vec<(u64, String)> = vec![(unix_ms(), "staged".to_string())];
    let starts_at_rotation: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
    let out = ha
        .agent(0)
        .args(["rotate", "--now", "--node-name", "cp1", "--timeout", "120s"])
        .output()
        .expect("irsa-agent rotate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{:6.1}s: rotate --now on cp1:\n{said}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "rotate --now: {said}\n{}",
        logs(&agents)
    );
    let new_kid = rotation_state(&roots[0])["rotation"]["new_kid"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no rotation in cp1's state: {said}"));

    // Watch the driver's phase until it is idle again (the drain is the tokens' lifetime).
    let deadline = Instant::now() + Duration::from_secs(1500);
    let mut signing_everywhere: Option<Duration> = None;
    let mut last_kid_check = Instant::now();
    loop {
        ha_site::tend_all(&mut kills, &mut agents, spawn, &ha, t);
        let p = phase(&roots[0]);
        if timeline.last().map(|(_, q)| q) != Some(&p) {
            eprintln!("{:6.1}s: cp1 rotation phase {p}", t.elapsed().as_secs_f64());
            timeline.push((unix_ms(), p.clone()));
        }
        for (i, root) in roots.iter().enumerate().skip(1) {
            assert!(
                matches!(phase(root).as_str(), "" | "idle"),
                "{} started a rotation of its own\n{}",
                ha.servers[i].name,
                logs(&agents)
            );
        }
        if signing_everywhere.is_none()
            && matches!(p.as_str(), "signing" | "draining")
            && last_kid_check.elapsed() > Duration::from_secs(2)
        {
            last_kid_check = Instant::now();
            if ha
                .signing_kids()
                .iter()
                .all(|k| k.as_deref() == Some(new_kid.as_str()))
            {
                signing_everywhere = Some(rotation_begin.elapsed());
                eprintln!(
                    "{:6.1}s: every apiserver signs with {new_kid}",
                    t.elapsed().as_secs_f64()
                );
            }
        }
        if p == "idle" && timeline.len() > 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not end in 25 minutes: cp1 {p}, signing kids {:?}\n{}",
            ha.signing_kids(),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let rotated = rotation_begin.elapsed();
    // A follower's last install comes after the driver's retire: a kill there, or the start
    // again of an agent killed just before the driver was idle, is still due. (Before this, an
    // agent killed in the last seconds stayed dead, and its node never retired the old issuer.)
    ha_site::finish_kills(
        &mut kills,
        &mut agents,
        spawn,
        &ha,
        t,
        Duration::from_secs(180),
    );
    // The followers retire once the driver did: wait for every apiserver to serve only the new
    // key (the driver's last step waited for that already), then two more workload rounds.
    workload.wait_more_rounds(2);
    std::thread::sleep(Duration::from_secs(3));
    // Restarts per server by the driver's phase when each apiserver started (counted now: the
    // retirement of the old issuer below restarts every apiserver once more).
    let steps = ha_site::STEPS;
    let restarts = ha_site::restarts_by_phase(&ha, &timeline, &starts_at_rotation);

    // 3. The old issuer goes by itself: every node switched to the public issuer more than the
    // tokens' 10-minute lifetime ago and the rotation is over, so each agent retires kubeadm's
    // default issuer on its own node, one restart at a time, once its apiserver's stale-token
    // counter has stayed still (50 s with --recheck-interval 10s). The workload keeps minting
    // and checking; the tokens it minted with the default issuer before the rollout have expired.
    let starts_at_finalize: Vec<usize> = ha.servers.iter().map(|s| s.starts()).collect();
    let finalize_begin = Instant::now();
    let deadline = finalize_begin + Duration::from_secs(480);
    while !ha.servers.iter().all(|s| s.manifest_issuers() == [ISSUER]) {
        assert!(
            Instant::now() < deadline,
            "the agents did not retire the default issuer within 8 minutes of the rotation's end: {:?}\n{}",
            ha.servers
                .iter()
                .map(|s| s.manifest_issuers())
                .collect::<Vec<_>>(),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    for (i, before) in starts_at_finalize.iter().enumerate() {
        ha.wait_restarted(i, *before, Duration::from_secs(180));
    }
    let finalized = finalize_begin.elapsed();
    eprintln!(
        "{:6.1}s: every node retired the default issuer, {:.1}s after the rotation ended",
        t.elapsed().as_secs_f64(),
        finalized.as_secs_f64()
    );
    workload.wait_more_rounds(2);
    let tokens = workload.finish();
    let down = monitor.finish();
    drop(site);
    let finalize_restarts: Vec<usize> = ha
        .servers
        .iter()
        .zip(&starts_at_finalize)
        .map(|(s, b)| s.starts() - b)
        .collect();
    let sustained = sustained_down(&down, 1.0);
    eprintln!(
        "kubeadm issuer rollout then key rotation on 3 nodes (real kube-apiservers, kubelet stand-ins): setup {:.1}s, issuer rolled out {:.1}s after the daemons started (restarts {rollout_starts:?}), every apiserver signing with {new_kid} {:.1}s after `rotate --now`, rotation complete {:.1}s after it; wall time {:.1}s",
        setup.as_secs_f64(),
        rolled_out.as_secs_f64(),
        signing_everywhere.unwrap_or_default().as_secs_f64(),
        rotated.as_secs_f64(),
        begin.elapsed().as_secs_f64()
    );
    eprintln!(
        "tokens: {} minted (per server {:?}; {} mints unanswered), {} checks answered, {} rejected, {} unanswered; apiservers down at once: at most {} (for 1 s or more: {sustained}; samples down per server {:?})",
        tokens.minted,
        tokens.minted_by,
        tokens.mint_failed,
        tokens.checked,
        tokens.rejected,
        tokens.unavailable,
        down.max_down,
        down.down_samples
    );
    for (k, step) in steps.iter().enumerate() {
        eprintln!("rotation restarts while cp1 was {step}: {:?}", restarts[k]);
    }
    eprintln!(
        "restarts to retire the default issuer: {finalize_restarts:?}, done {:.1}s after the rotation ended",
        finalized.as_secs_f64()
    );
    for r in &tokens.rejections {
        eprintln!("rejected: {r}");
    }

    assert_eq!(
        tokens.rejected,
        0,
        "tokens rejected:\n{}\n{}",
        tokens.rejections.join("\n"),
        logs(&agents)
    );
    assert!(
        sustained <= 1,
        "{sustained} apiservers down at once for 1 s or more:\n{}\n{}",
        down.describe(),
        logs(&agents)
    );
    assert!(tokens.checked > tokens.minted, "{tokens:?}");
    assert!(signing_everywhere.is_some(), "{}", logs(&agents));
    // Both faults happened (each kill point is reached in every rotation).
    assert!(
        kills.iter().all(|k| k.done),
        "kill points not reached\n{}",
        logs(&agents)
    );
    // Three restarts per node for the rotation: verify-only (cp1 staged), sign (trusted),
    // retire (draining for cp1, retired for the followers that follow its retire); an agent
    // killed mid-install does not install again what its files already have.
    let total: Vec<usize> = (0..n)
        .map(|j| restarts.iter().map(|r| r[j]).sum())
        .collect();
    assert_eq!(
        total,
        vec![3; n],
        "restarts per phase {restarts:?}\n{}",
        logs(&agents)
    );
    let staged = steps.iter().position(|s| *s == "staged").expect("step");
    let trusted = steps.iter().position(|s| *s == "trusted").expect("step");
    assert_eq!(
        restarts[staged],
        vec![1; n],
        "verify-only\n{}",
        logs(&agents)
    );
    assert_eq!(restarts[trusted], vec![1; n], "sign\n{}", logs(&agents));
    // Every node's sa.key is the new key, its apiserver serves only it, the copies are gone.
    for (i, s) in ha.servers.iter().enumerate() {
        assert_eq!(sa_key_kid(&s.root), new_kid, "{}: sa.key", s.name);
        let pki: Vec<String> = std::fs::read_dir(s.path("/etc/kubernetes/pki"))
            .expect("pki")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("sa-"))
            .collect();
        assert!(
            pki.is_empty(),
            "{}: left {pki:?}\n{}",
            s.name,
            logs(&agents)
        );
        if i > 0 {
            let out = agents[i].output();
            assert!(
                out.contains("opened the new key") && out.contains("followed cp1's rotation"),
                "{} does not say it followed cp1:\n{}",
                s.name,
                logs(&agents)
            );
        }
    }
    assert!(
        ha.signing_kids()
            .iter()
            .all(|k| k.as_deref() == Some(new_kid.as_str())),
        "{:?}",
        ha.signing_kids()
    );
    assert_ne!(old_kid, new_kid);
    // The old issuer went once per node, each agent on its own node, by itself.
    assert_eq!(
        finalize_restarts,
        vec![1; n],
        "restarts to retire the default issuer\n{}",
        logs(&agents)
    );
    for (i, a) in agents.iter().enumerate() {
        assert!(
            a.output()
                .contains(&format!("retired {DEFAULT_ISSUER} on this server")),
            "{} does not say it retired {DEFAULT_ISSUER}\n{}",
            ha.servers[i].name,
            logs(&agents)
        );
    }
}

/// `irsa-agent rotate --abort` on the driver once every node verifies with the new key (before
/// it signed anywhere): the driver takes the new key out of its apiserver and removes the shared
/// key; each follower then sees no rotation and no shared key, and takes its copy out by itself.
/// Nothing is rejected, one apiserver restarts at a time.
#[test]
fn an_aborted_rotation_takes_the_new_key_out_of_every_kubeadm_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let begin = Instant::now();
    let Some(ha) = Ha::start(3, "real_apiserver_ha_kubeadm_abort") else {
        return;
    };
    let n = ha.servers.len();
    let old_kid = prepare(&ha);
    let site = PublicSite::start(&ha.netns, vec![ha.servers[0].root.clone()]);
    let monitor = ha.monitor();
    let workload = ha.workload(ISSUER);
    let agents: Vec<_> = (0..n).map(|i| spawn(&ha, i)).collect();
    roll_out(&ha, &agents);
    let out = ha
        .agent(0)
        .args(["rotate", "--now", "--node-name", "cp1", "--timeout", "120s"])
        .output()
        .expect("irsa-agent rotate");
    assert!(out.status.success(), "rotate --now: {out:?}");
    let new_kid = rotation_state(&ha.servers[0].root)["rotation"]["new_kid"]
        .as_str()
        .map(str::to_string)
        .expect("a rotation in cp1's state");
    let deadline = Instant::now() + Duration::from_secs(400);
    while !ha.served_kids().iter().all(|k| k.contains(&new_kid)) {
        assert!(
            Instant::now() < deadline,
            "the followers did not install the new key: {:?}\n{}",
            ha.served_kids(),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let p = phase(&ha.servers[0].root);
    assert!(
        matches!(p.as_str(), "staged" | "published" | "trusted"),
        "{p}"
    );
    let out = ha
        .agent(0)
        .args([
            "rotate",
            "--abort",
            "--node-name",
            "cp1",
            "--timeout",
            "120s",
        ])
        .output()
        .expect("irsa-agent rotate --abort");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "rotate --abort: {said}\n{}",
        logs(&agents)
    );
    let aborted = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    let pki_copies = || -> Vec<String> {
        ha.servers
            .iter()
            .flat_map(|s| {
                std::fs::read_dir(s.path("/etc/kubernetes/pki"))
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().to_string())
                            .filter(|n| n.starts_with("sa-"))
                            .map(|n| format!("{}: {n}", s.name))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect()
    };
    while !(ha.served_kids().iter().all(|k| *k == [old_kid.clone()]) && pki_copies().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "the new key is still on some node: {:?}, {:?}\n{}",
            ha.served_kids(),
            pki_copies(),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let took_out = aborted.elapsed();
    workload.wait_more_rounds(2);
    let tokens = workload.finish();
    let down = monitor.finish();
    drop(site);
    let sustained = sustained_down(&down, 1.0);
    eprintln!(
        "kubeadm rotation aborted on 3 nodes: every node without the new key {:.1}s after `rotate --abort`; tokens {} minted, {} checks, {} rejected; apiservers down at once for 1 s or more: {sustained}; wall time {:.1}s",
        took_out.as_secs_f64(),
        tokens.minted,
        tokens.checked,
        tokens.rejected,
        begin.elapsed().as_secs_f64()
    );
    assert_eq!(tokens.rejected, 0, "{}", tokens.rejections.join("\n"));
    assert!(sustained <= 1, "{}", down.describe());
    for (i, a) in agents.iter().enumerate().skip(1) {
        assert!(
            a.output().contains("(rotation ") && a.output().contains("was aborted)"),
            "{} does not say it took the aborted key out\n{}",
            ha.servers[i].name,
            logs(&agents)
        );
    }
    assert!(
        ha.signing_kids()
            .iter()
            .all(|k| k.as_deref() == Some(old_kid.as_str()))
    );
}
