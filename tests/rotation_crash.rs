//! Crash recovery through the real binary (`--features failpoints`): `irsa-agent rotate` killed
//! at every transition and inside every install (exit 99 at a failpoint), then run again, until
//! the rotation completes. The real pieces: the binary, its publish path to a directory target,
//! the public check over HTTPS (a static server with the test CA), the apiserver client over
//! mutual TLS (a fake apiserver that loads the host's key files at each restart and signs
//! TokenRequests), systemctl and k3s as programs (fakes doing what k3s does with
//! `certificate rotate-ca` and at start). Time is simulated (`IRSA_AGENT_CLOCK`).
//!
//! Throughout: every token the apiserver may have signed and that is still valid verifies
//! (jsonwebtoken) against the apiserver's keys, the published JWKS and a relying party's copy
//! cached for the published max-age; the rotation costs exactly two restarts; nothing is left
//! behind.
#![cfg(feature = "failpoints")]

mod apply_support;
mod https_support;
mod rotation_support;

use std::path::PathBuf;

use apply_support::{Behaviour, FakeApiserver, Host};
use irsa_agent::config::Distribution;
use irsa_agent::host::HostRoot;
use irsa_agent::keys;
use irsa_agent::rotation::{self, Phase};
use rotation_support::{DAY, HOUR, K3S_TLS, StaticHttps, T0, verify};

struct Proc {
    host: Host,
    _apiserver: FakeApiserver,
    apiserver_url: String,
    _public: StaticHttps,
    systemctl: PathBuf,
    k3s: PathBuf,
    distribution: Distribution,
    now: u64,
    tokens: Vec<(String, String, u64)>,
    relying_party: Option<(u64, String)>,
    verified: std::collections::HashSet<(String, String)>,
}

fn setup(distribution: Distribution) -> Proc {
    let host = Host::new();
    let root = host.root().to_path_buf();
    match distribution {
        Distribution::Kubeadm => rotation_support::kubeadm_host(&root),
        _ => rotation_support::k3s_host(&root),
    }
    let public = StaticHttps::start(root.join("srv/oidc"), "cluster-a");
    let apiserver = FakeApiserver::start(Behaviour::Keys {
        root: root.clone(),
        distribution,
    });
    let kubeconfig = match distribution {
        Distribution::Kubeadm => "/etc/kubernetes/admin.conf",
        _ => "/etc/rancher/k3s/k3s.yaml",
    };
    host.kubeconfig(kubeconfig, &apiserver.url());
    host.copy(
        &apply_support::data("probe/ca.crt"),
        "/etc/irsa-agent/test-ca.crt",
    );
    host.write(
        "/etc/irsa-agent/config.yaml",
        format!(
            "issuer: https://127.0.0.1:{}/cluster-a\ndistribution: {}\nca-file: /etc/irsa-agent/test-ca.crt\npublish:\n  - type: directory\n    path: /srv/oidc\nrotation:\n  enabled: true\n  every: 30d\n  propagation-wait: 1h\n  cdn-ttl: 10m\n",
            public.port,
            distribution.name()
        ),
    );
    let systemctl = rotation_support::fake_k3s_systemctl(&root);
    let k3s = rotation_support::fake_k3s_binary(&root);
    let apiserver_url = apiserver.url();
    let p = Proc {
        host,
        _apiserver: apiserver,
        apiserver_url,
        _public: public,
        systemctl,
        k3s,
        distribution,
        now: T0,
        tokens: Vec::new(),
        relying_party: None,
        verified: std::collections::HashSet::new(),
    };
    // The documents are published before the rotation (irsa-agent publish).
    let out = p.agent(&["publish"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

impl Proc {
    fn root(&self) -> HostRoot {
        HostRoot::new(self.host.root())
    }

    fn agent(&self, args: &[&str], failpoint: Option<&str>) -> std::process::Output {
        std::fs::write(self.host.root().join("fake-clock"), self.now.to_string()).expect("clock");
        let mut cmd = self.host.agent();
        cmd.args(args)
            .env("IRSA_AGENT_CLOCK", self.now.to_string())
            .env_remove("IRSA_AGENT_FAILPOINTS");
        if args.first() == Some(&"rotate") {
            cmd.arg("--systemctl")
                .arg(&self.systemctl)
                .arg("--k3s")
                .arg(&self.k3s)
                .args(["--poll-interval", "1s"]);
            if self.distribution == Distribution::Kubeadm {
                cmd.args(["--apiserver-url", &self.apiserver_url]);
            }
        }
        if let Some(f) = failpoint {
            cmd.env("IRSA_AGENT_FAILPOINTS", f);
        }
        cmd.output().expect("run")
    }

    fn state(&self) -> Option<rotation::RotationState> {
        rotation::load_state(&self.root()).expect("state")
    }

    /// What the apiserver verifies and signs with: k3s writes its key files only at start, and
    /// kubelet restarts the kubeadm pod whenever the manifest changes, so it is what the
    /// host's files say now.
    fn apiserver_keys(&self) -> (Vec<keys::PublicKey>, keys::SigningKey) {
        rotation_support::load_local(self.host.root(), self.distribution)
    }

    fn published(&self) -> String {
        std::fs::read_to_string(self.host.root().join("srv/oidc/openid/v1/jwks"))
            .unwrap_or_default()
    }

    fn mint(&mut self, label: &str) {
        let (_, signing) = self.apiserver_keys();
        let token = keys::token::mint(
            &signing,
            &serde_json::json!({"iss": rotation_support::ISSUER, "aud": "sts.amazonaws.com",
                "sub": "system:serviceaccount:default:app", "iat": self.now, "exp": self.now + DAY}),
        )
        .expect("mint");
        self.tokens.push((label.to_string(), token, self.now + DAY));
    }

    fn check(&mut self, when: &str) {
        let (verification, _) = self.apiserver_keys();
        let apiserver = keys::jwks::jwks_json(&keys::dedup(&verification));
        let published = self.published();
        let expired = self
            .relying_party
            .as_ref()
            .is_none_or(|(at, _)| self.now >= at + 300);
        if expired {
            self.relying_party = Some((self.now, published.clone()));
        }
        let cached = self
            .relying_party
            .clone()
            .map(|(_, b)| b)
            .unwrap_or_default();
        let mut newly = Vec::new();
        for (label, token, exp) in &self.tokens {
            if *exp <= self.now {
                continue;
            }
            for (name, jwks) in [
                ("the apiserver", &apiserver),
                ("the published JWKS", &published),
                ("the relying party's cached JWKS", &cached),
            ] {
                let key = (token.clone(), jwks.clone());
                if self.verified.contains(&key) {
                    continue;
                }
                if let Err(e) = verify(token, jwks) {
                    panic!(
                        "{when} (t0+{}s): token {label} rejected by {name}: {e}",
                        self.now - T0
                    );
                }
                newly.push(key);
            }
        }
        self.verified.extend(newly);
    }

    /// Walks the simulated time to `until`, an hour at a time, minting and checking.
    fn walk_to(&mut self, until: u64) {
        while self.now + HOUR < until {
            self.now += HOUR;
            self.check("between runs");
            self.mint("hourly");
        }
        self.now = self.now.max(until);
    }

    fn restarts(&self) -> usize {
        match self.distribution {
            Distribution::Kubeadm => 0,
            _ => self.host.systemctl_log().lines().count(),
        }
    }
}

/// Runs a rotation to the end through the binary; `failpoint` is armed until it fires once.
/// Returns how many runs crashed.
fn rotate_to_the_end(p: &mut Proc, failpoint: Option<&str>) -> usize {
    let mut armed = failpoint;
    let mut crashes = 0;
    p.mint("before the rotation");
    p.check("before the rotation");
    let mut first = true;
    for _ in 0..40 {
        let args: &[&str] = if first {
            &["rotate", "--now"]
        } else {
            &["rotate"]
        };
        let out = p.agent(args, armed);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        p.check(&format!(
            "after a run ({})",
            stderr.lines().last().unwrap_or("")
        ));
        if out.status.code() == Some(99) {
            assert!(stderr.contains("failpoint"), "{stderr}");
            crashes += 1;
            armed = None;
            // Restarted by systemd (or the operator) a little later.
            p.walk_to(p.now + 60);
            continue;
        }
        assert!(
            out.status.success(),
            "rotate failed: {stderr}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        first = first
            && p.state()
                .is_none_or(|s| matches!(s.phase, Phase::Idle { .. }));
        p.mint("after a run");
        let st = p.state().expect("state");
        if matches!(st.phase, Phase::Idle { .. }) && !st.history.is_empty() {
            break;
        }
        let due = st.due_at().expect("due");
        p.walk_to(due);
    }
    let st = p.state().expect("state");
    assert!(
        matches!(st.phase, Phase::Idle { .. })
            && st
                .history
                .last()
                .is_some_and(|h| h.outcome == irsa_agent::rotation::machine::Ending::Completed),
        "not finished: {:?}",
        st.last_step
    );
    // The old tokens expire; the new ones keep verifying.
    let end = p.now + DAY + HOUR;
    p.walk_to(end);
    p.check("a day after the rotation");
    crashes
}

fn assert_clean(p: &Proc) {
    let leftovers: Vec<String> = p
        .host
        .snapshot()
        .into_iter()
        .map(|(path, _)| path.display().to_string())
        .filter(|path| {
            path.contains("irsa-agent-tmp")
                || path.starts_with("var/lib/irsa-agent/rotation/2")
                || path.contains("/sa-2")
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

fn k3s_crash_at(failpoint: &str) {
    let mut p = setup(Distribution::K3s);
    let crashes = rotate_to_the_end(&mut p, Some(failpoint));
    assert_eq!(crashes, 1, "the failpoint {failpoint} never fired");
    assert_eq!(p.restarts(), 2, "{}", p.host.systemctl_log());
    let st = p.state().expect("state");
    let done = st.history.last().expect("done");
    let service_key = std::fs::read(p.host.path(&format!("{K3S_TLS}/service.key"))).expect("key");
    let kids: Vec<String> = keys::parse_verification_keys(&service_key)
        .expect("keys")
        .keys
        .iter()
        .map(|k| k.kid())
        .collect();
    assert_eq!(kids, std::slice::from_ref(&done.new_kid));
    assert_eq!(
        irsa_agent::publish::merge::kids_in(p.published().as_bytes()),
        std::slice::from_ref(&done.new_kid)
    );
    assert_clean(&p);
}

macro_rules! k3s_crash_tests {
    ($($name:ident: $failpoint:expr,)*) => {$(
        #[test]
        fn $name() {
            k3s_crash_at($failpoint);
        }
    )*};
}

k3s_crash_tests! {
    k3s_crash_after_writing_the_new_key: "rotation:after-stage-files",
    k3s_crash_before_saving_staged: "rotation:idle->staged",
    k3s_crash_before_saving_published: "rotation:staged->published",
    k3s_crash_after_rotate_ca_of_trust: "rotation:trust:after-rotate-ca",
    k3s_crash_after_the_restart_of_trust: "rotation:trust:after-restart",
    k3s_crash_before_saving_trusted: "rotation:published->trusted",
    k3s_crash_before_saving_signing: "rotation:trusted->signing",
    k3s_crash_before_saving_draining: "rotation:signing->draining",
    k3s_crash_after_rotate_ca_of_retire: "rotation:retire:after-rotate-ca",
    k3s_crash_after_the_restart_of_retire: "rotation:retire:after-restart",
    k3s_crash_before_saving_retired: "rotation:draining->retired",
    k3s_crash_before_saving_idle: "rotation:retired->idle",
    k3s_crash_before_renaming_the_first_write: "fs:before-rename@1",
    k3s_crash_before_renaming_the_third_write: "fs:before-rename@3",
}

#[test]
fn k3s_rotation_without_a_crash_prints_each_step_and_the_next_due_time() {
    let mut p = setup(Distribution::K3s);
    let out = p.agent(&["rotate", "--now"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("staged: rotation 20261122T000000Z: new rsa-2048 key "),
        "{stdout}"
    );
    assert!(lines[1].starts_with("published: JWKS with the new key published (1 target(s) in sync, 1 written) and seen at https://127.0.0.1:"), "{stdout}");
    assert!(
        lines[1].contains("held 1h15m (max-age 5m + cdn-ttl 10m + propagation-wait 1h)"),
        "{stdout}"
    );
    assert_eq!(lines[2], "next step due at 2026-11-22T01:15:00Z (in 1h15m)");
    // `irsa-agent publish` (or the daemon's resync) keeps the key published ahead of use.
    let new_kid = p
        .state()
        .and_then(|s| s.phase.rotation().map(|r| r.new_kid.clone()))
        .expect("kid");
    let published = p.published();
    assert!(published.contains(&new_kid));
    let out = p.agent(&["publish"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.published(), published);
    // Nothing is due now: a second run changes nothing.
    let before = std::fs::read(p.host.path("/var/lib/irsa-agent/state.json")).expect("state");
    let out = p.agent(&["rotate"], None);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "published: next step (make the apiserver verify with the new key (after the propagation hold)) due at 2026-11-22T01:15:00Z (in 1h15m)\nnext step due at 2026-11-22T01:15:00Z (in 1h15m)\n"
    );
    assert_eq!(
        std::fs::read(p.host.path("/var/lib/irsa-agent/state.json")).expect("state"),
        before
    );
    let status = p.agent(&["rotate", "--status"], None);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.starts_with("rotation: published since 2026-11-22T00:00:00Z\n"),
        "{text}"
    );
    assert!(text.contains("next: make the apiserver verify with the new key (after the propagation hold) at 2026-11-22T01:15:00Z (in 1h15m)"), "{text}");
    let json = p.agent(&["rotate", "--status", "--json"], None);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(doc["phase"], "published");
    assert_eq!(doc["next_due"], "2026-11-22T01:15:00Z");
    assert_eq!(doc["rotation"]["restarts"], 0);
    // Then to the end.
    p.now = T0 + 4500;
    let out = p.agent(&["rotate"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with(
            "trusted: the apiserver verifies with the old and the new key (restarted)"
        ),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("signing: every apiserver signs with the new key"),
        "{stdout}"
    );
    assert!(lines[2].starts_with("draining: draining the old key until 2026-11-23T02:15:00Z (token lifetime 1d + margin 1h)"), "{stdout}");
    assert_eq!(lines[3], "next step due at 2026-11-23T02:15:00Z (in 1d1h)");
    p.now = T0 + 4500 + 25 * HOUR;
    let out = p.agent(&["rotate"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("retired: the apiserver verifies and signs with the new key only"),
        "{stdout}"
    );
    assert!(stdout.contains("idle: rotation 20261122T000000Z complete (1 target(s) in sync, 1 written); 2 apiserver restart(s); next rotation due 2026-12-22T00:00:00Z"), "{stdout}");
    assert_eq!(p.host.systemctl_log(), "restart k3s\nrestart k3s\n");
    let log = std::fs::read_to_string(p.host.path("/rotate-ca.log")).expect("log");
    assert_eq!(
        log,
        "/var/lib/irsa-agent/rotation/20261122T000000Z/trust\n/var/lib/irsa-agent/rotation/20261122T000000Z/retire\n"
    );
}

#[test]
fn abort_through_the_binary_before_and_after_the_new_key_signs() {
    let mut p = setup(Distribution::K3s);
    let before = p.published();
    let out = p.agent(&["rotate", "--now"], None);
    assert!(out.status.success());
    assert_ne!(p.published(), before);
    let out = p.agent(&["rotate", "--abort"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("aborted rotation 20261122T000000Z"));
    assert_eq!(p.published(), before, "republished without the new key");
    assert_eq!(p.host.systemctl_log(), "");
    assert_clean(&p);
    // Again, up to trusted: then abort refuses (exit 1) and explains.
    p.now += 60;
    let out = p.agent(&["rotate", "--now"], None);
    assert!(out.status.success());
    p.now += 4500;
    let out = p.agent(&["rotate"], None);
    assert!(out.status.success());
    let out = p.agent(&["rotate", "--abort"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("may have signed tokens already"),
        "{stderr}"
    );
    assert!(stderr.contains("the way out is forward"), "{stderr}");
}

fn kubeadm_crash_at(failpoint: &str) {
    let mut p = setup(Distribution::Kubeadm);
    let crashes = rotate_to_the_end(&mut p, Some(failpoint));
    assert_eq!(crashes, 1, "the failpoint {failpoint} never fired");
    let st = p.state().expect("state");
    let done = st.history.last().expect("done");
    assert_eq!(done.restarts, 2);
    let manifest =
        std::fs::read_to_string(p.host.path("/etc/kubernetes/manifests/kube-apiserver.yaml"))
            .expect("manifest");
    assert_eq!(
        manifest,
        std::fs::read_to_string(rotation_support::data("hosts/kubeadm/v1.33.yaml"))
            .expect("fixture")
    );
    assert_clean(&p);
}

macro_rules! kubeadm_crash_tests {
    ($($name:ident: $failpoint:expr,)*) => {$(
        #[test]
        fn $name() {
            kubeadm_crash_at($failpoint);
        }
    )*};
}

kubeadm_crash_tests! {
    kubeadm_crash_after_writing_the_new_key_files: "rotation:after-stage-files",
    kubeadm_crash_after_the_backup_of_trust: "apply:after-backup@1",
    kubeadm_crash_after_writing_the_manifest_of_trust: "rotation:trust:after-write",
    kubeadm_crash_before_saving_trusted: "rotation:published->trusted",
    kubeadm_crash_after_switching_the_controller_manager: "rotation:sign:after-write",
    kubeadm_crash_after_writing_sa_key_and_the_manifests: "rotation:retire:after-write",
    kubeadm_crash_before_saving_retired: "rotation:draining->retired",
    kubeadm_crash_before_saving_idle: "rotation:retired->idle",
}
