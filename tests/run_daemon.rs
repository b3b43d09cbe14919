//! `irsa-agent run`, the real binary, against fake hosts and a directory target: it publishes
//! at start, follows key files replaced by rename, configuration edits and drift at the
//! target, retries a target that is down until it recovers (same process), refuses a JWKS
//! without the signing key, waits for an issuer on a fresh install, reloads on SIGHUP, pings
//! the watchdog, restarts k3s through (a fake) systemctl and waits for (a fake) apiserver, and
//! exits 0 on SIGTERM. What it tells systemd is read from a test-owned NOTIFY_SOCKET.
//! Every wait polls with a deadline; nothing asserts on elapsed time.

mod apply_support;
mod https_support;
mod run_support;
mod support;

use std::io::{Read as _, Write as _};
use std::path::Path;

use apply_support::{Behaviour, FakeApiserver, Host, data};
use irsa_agent::config::Distribution;
use run_support::{
    DEADLINE, Daemon, eventually, jwks_for, kids, new_ec_key, replace_by_rename, status_json,
};
use rustix::process::Signal;
use serde_json::Value;

const SERVICE_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.key";
const CURRENT_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.current.key";
const JWKS: &str = "/srv/oidc/openid/v1/jwks";
const DISCOVERY: &str = "/srv/oidc/.well-known/openid-configuration";
const K3S_CONFIG: &str = "# k3s\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"   # days\n";

/// The fake hosts' issuers are not served anywhere: `public-check: false` says so (the public
/// check itself is tested in `the_public_copy_is_checked_and_an_unreachable_one_is_not_in_sync`).
fn config(issuer: &str, run: &str) -> String {
    format!(
        "issuer: {issuer}\ndistribution: k3s\npublic-check: false\npublish:\n  - type: directory\n    path: /srv/oidc\nrun:\n  retry-max: 2s\n{run}"
    )
}

/// A k3s server host (the keys a real kube-apiserver published `jwks.json` for) with a
/// directory target.
fn k3s_host(run: &str) -> Host {
    let host = Host::new();
    host.write(
        "/etc/irsa-agent/config.yaml",
        config("https://oidc.example.com/homelab", run),
    )
    .write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
    .k3s_keys("/var/lib/rancher/k3s");
    host
}

/// Starts a fake apiserver reachable through the host's admin kubeconfig, then the daemon with
/// the fake systemctl, fast readiness polls and `timeout` for the apiserver to come back.
fn start_with_apiserver(
    host: &Host,
    behaviour: Behaviour,
    timeout: &str,
) -> (FakeApiserver, Daemon) {
    let server = FakeApiserver::start(behaviour);
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl().display().to_string();
    let args = [
        "--systemctl",
        &systemctl,
        "--poll-interval",
        "100ms",
        "--timeout",
        timeout,
    ];
    let d = Daemon::start(host.root(), &args, &[]);
    (server, d)
}

fn read(host: &Host, path: &str) -> Vec<u8> {
    std::fs::read(host.path(path)).unwrap_or_default()
}

fn wait_file(d: &mut Daemon, host: &Host, path: &str, what: &str, pred: impl Fn(&[u8]) -> bool) {
    if eventually(DEADLINE, || pred(&read(host, path)).then_some(())).is_none() {
        d.assert_running();
        panic!(
            "{path} never became {what}; it is:\n{}\nstatus: {}\nlog:\n{}",
            String::from_utf8_lossy(&read(host, path)),
            d.status(),
            d.log()
        );
    }
}

/// The JWKS the real kube-apiserver served for the k3s test keys.
fn real_apiserver_jwks() -> Vec<u8> {
    std::fs::read(data("apiserver/k3s/jwks.json")).expect("jwks.json")
}

#[test]
fn publishes_at_start_follows_a_key_file_replaced_by_rename_and_exits_0_on_sigterm() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    // READY comes after the first converge: the documents are there, byte for byte what the
    // real apiserver served for these keys.
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    let discovery: Value = serde_json::from_slice(&read(&host, DISCOVERY)).expect("discovery");
    assert_eq!(discovery["issuer"], "https://oidc.example.com/homelab");
    assert_eq!(
        discovery["jwks_uri"],
        "https://oidc.example.com/homelab/openid/v1/jwks"
    );
    let ready_status = d.notify.statuses().last().cloned().unwrap_or_default();
    assert!(
        ready_status.contains("2 key(s) published to directory /srv/oidc"),
        "{ready_status}"
    );
    // k3s got the issuer too (--no-restart: written, not restarted).
    assert!(
        host.read("/etc/rancher/k3s/config.yaml")
            .contains("service-account-issuer=https://oidc.example.com/homelab"),
    );
    let old_kids = kids(&read(&host, JWKS));

    // k3s-style rotation: a new key appended to service.key, then service.current.key
    // replaced; both files replaced by rename (which kills a watch on the file itself).
    let key = new_ec_key();
    let new_kid = key.kid.clone();
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    replace_by_rename(&host.path(CURRENT_KEY), key.private_pem.as_bytes());
    let expected = jwks_for(host.root(), &[SERVICE_KEY]);
    wait_file(&mut d, &host, JWKS, "the JWKS of the new key files", |b| {
        b == expected.as_slice()
    });
    let mut want = old_kids.clone();
    want.push(new_kid.clone());
    assert_eq!(kids(&read(&host, JWKS)), want);
    // The discovery document follows (it is written after every JWKS is in place).
    wait_file(&mut d, &host, DISCOVERY, "a discovery listing ES256", |b| {
        serde_json::from_slice::<Value>(b)
            .map(|v| {
                v["id_token_signing_alg_values_supported"] == serde_json::json!(["ES256", "RS256"])
            })
            .unwrap_or(false)
    });
    let status = d.wait_status("the new signing kid", |s| {
        s["daemon"]["signing_kid"] == new_kid.as_str()
    });
    assert_eq!(status["running"], true);
    assert_eq!(status["daemon"]["phase"], "in-sync");
    assert_eq!(status["daemon"]["metrics"]["keys_published"], 3);
    // Nothing but the documents in the served directory (no temp files left).
    let mut names: Vec<String> = walk(&host.path("/srv/oidc"));
    names.sort();
    assert_eq!(
        names,
        vec![".well-known/openid-configuration", "openid/v1/jwks"]
    );

    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
    let status = status_json(host.root());
    assert_eq!(status["daemon"]["phase"], "stopped");
    assert_eq!(status["running"], false);
}

/// The daemon learns which files to watch by reading the apiserver's configuration, so it
/// watches their folders only after reading them. A key file replaced in that moment (forced
/// here: a failpoint pauses the first converge between the read and the watch) must still be
/// published without waiting for the resync (10 minutes): the read is done again once the
/// watch is in place.
#[test]
fn a_key_file_changed_between_the_first_read_and_its_watch_is_still_published() {
    // apply-issuer: false: the daemon writes nothing the watch would see (k3s's config.yaml),
    // so no later event hides a missed one.
    let host = k3s_host("  apply-issuer: false\n");
    let pauses = tempfile::tempdir().expect("tempdir");
    let pause_dir = pauses.path().display().to_string();
    let mut d = Daemon::start(
        host.root(),
        &["--no-restart"],
        &[
            ("IRSA_AGENT_FAILPOINTS", "daemon:after-observe:pause"),
            ("IRSA_AGENT_FAILPOINT_DIR", &pause_dir),
        ],
    );
    let flag = pauses.path().join("daemon_after-observe.paused");
    if eventually(DEADLINE, || flag.exists().then_some(())).is_none() {
        d.assert_running();
        panic!(
            "the daemon never paused after reading the apiserver:\n{}",
            d.log()
        );
    }
    // Read, not watched yet: the k3s rotation's new key arrives now.
    let key = new_ec_key();
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    std::fs::remove_file(&flag).expect("resume the daemon");
    let expected = jwks_for(host.root(), &[SERVICE_KEY]);
    wait_file(
        &mut d,
        &host,
        JWKS,
        "the JWKS with the key added while unwatched",
        |b| b == expected.as_slice(),
    );
    assert!(kids(&read(&host, JWKS)).contains(&key.kid));
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out
}

#[test]
fn sigterm_sends_stopping_and_exits_0() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    d.signal(Signal::TERM);
    let stopping = d.notify.wait_line("STOPPING=1", |l| l == "STOPPING=1");
    assert_eq!(stopping, "STOPPING=1");
    let exit = eventually(DEADLINE, || d.child.try_wait().ok().flatten()).expect("exits");
    assert_eq!(exit.code(), Some(0), "{}", d.log());
}

#[test]
fn an_edited_configuration_is_reloaded_and_republished() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    // Edited in place (truncate + write), as some editors and `echo >` do.
    std::fs::write(
        host.path("/etc/irsa-agent/config.yaml"),
        config("https://oidc.example.com/lab", ""),
    )
    .expect("edit");
    wait_file(&mut d, &host, DISCOVERY, "the new issuer", |b| {
        serde_json::from_slice::<Value>(b)
            .map(|v| v["issuer"] == "https://oidc.example.com/lab")
            .unwrap_or(false)
    });
    // And the apiserver follows: the new issuer signs, the old ones stay accepted.
    let k3s = eventually(DEADLINE, || {
        let text = host.read("/etc/rancher/k3s/config.yaml");
        text.contains("service-account-issuer=https://oidc.example.com/lab")
            .then_some(text)
    })
    .unwrap_or_else(|| panic!("k3s config not updated:\n{}", d.log()));
    let issuers: Vec<&str> = k3s
        .lines()
        .filter_map(|l| l.split("service-account-issuer=").nth(1))
        .map(|v| v.trim_end_matches('"'))
        .collect();
    assert_eq!(
        issuers,
        vec![
            "https://oidc.example.com/lab",
            "https://oidc.example.com/homelab",
            "https://kubernetes.default.svc.cluster.local"
        ]
    );
    // The JWKS did not change (same keys).
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    d.assert_running();
}

#[test]
fn a_broken_configuration_keeps_the_previous_one_until_fixed() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    replace_by_rename(
        &host.path("/etc/irsa-agent/config.yaml"),
        b"issuer: https://oidc.example.com/homelab\npublish: [{type: directory\n",
    );
    d.notify
        .wait_line("a STATUS about the invalid configuration", |l| {
            l.starts_with("STATUS=configuration invalid, still using the previous one")
        });
    let status = d.status();
    assert!(
        status["daemon"]["config_error"]
            .as_str()
            .is_some_and(|e| e.contains("config.yaml")),
        "{status}"
    );
    // Still working with the previous settings: a key change is still published.
    let key = new_ec_key();
    let new_kid = key.kid.clone();
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    wait_file(&mut d, &host, JWKS, "a JWKS with the new key", |b| {
        kids(b).contains(&new_kid)
    });
    // Fixed: the error goes away.
    replace_by_rename(
        &host.path("/etc/irsa-agent/config.yaml"),
        config("https://oidc.example.com/homelab", "").as_bytes(),
    );
    d.wait_status("no configuration error", |s| {
        s["daemon"]["config_error"].is_null() && s["daemon"]["phase"] == "in-sync"
    });
}

#[test]
fn drift_at_the_target_is_healed_by_the_resync_and_counted_in_the_metrics() {
    let port = support::free_port();
    let host = k3s_host(&format!(
        "  resync-interval: 1s\n  metrics-textfile: /var/lib/node-exporter/irsa_agent.prom\n  metrics-listen: 127.0.0.1:{port}\n"
    ));
    host.mkdir("/var/lib/node-exporter");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    // Deleted at the target (nobody announces it: the directory is not watched).
    std::fs::remove_file(host.path(JWKS)).expect("delete");
    wait_file(&mut d, &host, JWKS, "restored", |b| {
        b == real_apiserver_jwks()
    });
    // (Once that converge has finished: a change during it would be restored by it, one drift.)
    d.wait_status("one drift", |s| {
        s["daemon"]["metrics"]["drift_found_total"] == 1
    });
    // Changed at the target (atomically, so no converge sees it half-written).
    replace_by_rename(
        &host.path(DISCOVERY),
        b"{\"issuer\":\"https://evil.example\"}",
    );
    wait_file(&mut d, &host, DISCOVERY, "restored", |b| {
        serde_json::from_slice::<Value>(b)
            .map(|v| v["issuer"] == "https://oidc.example.com/homelab")
            .unwrap_or(false)
    });
    let status = d.wait_status("two drifts", |s| {
        s["daemon"]["metrics"]["drift_found_total"] == 2
    });
    assert_eq!(status["daemon"]["metrics"]["publish_failures_total"], 0);
    // The node-exporter textfile says the same.
    let textfile = host.path("/var/lib/node-exporter/irsa_agent.prom");
    let text = eventually(DEADLINE, || {
        let t = std::fs::read_to_string(&textfile).ok()?;
        t.contains("irsa_agent_drift_found_total 2").then_some(t)
    })
    .unwrap_or_else(|| panic!("textfile: {:?}", std::fs::read_to_string(&textfile)));
    for line in [
        "irsa_agent_keys_published 2",
        "irsa_agent_publish_failures_total 0",
        "irsa_agent_apiserver_restarts_total 0",
        "irsa_agent_target_up{target=\"directory /srv/oidc\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    assert!(text.contains("\nirsa_agent_last_publish_success_timestamp_seconds "));
    // And the loopback endpoint.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("irsa_agent_drift_found_total 2"),
        "{response}"
    );
}

#[test]
fn a_target_that_is_down_is_retried_until_it_recovers_without_a_restart() {
    let host = k3s_host("");
    // The target directory cannot be created: a file is in the way.
    host.write("/srv/oidc", "not a directory");
    let k3s_before = host.read("/etc/rancher/k3s/config.yaml");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    // READY after the first converge attempt, failed or not.
    d.wait_ready();
    d.notify
        .wait_line("a STATUS saying it fails and retries", |l| {
            l.starts_with("STATUS=failing, retry") && l.contains("/srv/oidc")
        });
    let status = d.wait_status("several attempts", |s| {
        s["daemon"]["metrics"]["publish_failures_total"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    });
    assert_eq!(status["daemon"]["phase"], "retrying");
    assert!(status["daemon"]["next_retry_at"].as_u64().is_some());
    // The apiserver is not switched to an issuer whose documents are not published.
    assert_eq!(status["daemon"]["apiserver"]["result"], "skipped");
    assert_eq!(host.read("/etc/rancher/k3s/config.yaml"), k3s_before);
    // The target comes back.
    std::fs::remove_file(host.path("/srv/oidc")).expect("rm");
    wait_file(&mut d, &host, JWKS, "published", |b| {
        b == real_apiserver_jwks()
    });
    let status = d.wait_status("in sync", |s| s["daemon"]["phase"] == "in-sync");
    assert_eq!(status["daemon"]["pid"], d.pid());
    assert_eq!(d.notify.count("READY=1"), 1, "one start only");
    assert!(
        host.read("/etc/rancher/k3s/config.yaml")
            .contains("service-account-issuer=https://oidc.example.com/homelab")
    );
    d.assert_running();
}

#[test]
fn never_publishes_a_jwks_without_the_signing_key() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    // The signing key is replaced by one that is not among the verification keys.
    let key = new_ec_key();
    let new_kid = key.kid.clone();
    replace_by_rename(&host.path(CURRENT_KEY), key.private_pem.as_bytes());
    let status = d.wait_status("the refusal", |s| {
        s["daemon"]["errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|m| m.as_str().unwrap_or("").contains("refusing to publish"))
        })
    });
    assert!(
        status["daemon"]["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains(&new_kid)),
        "{status}"
    );
    assert_eq!(read(&host, JWKS), real_apiserver_jwks(), "unchanged");
    // Once the key is among the verification keys, it is published.
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    wait_file(&mut d, &host, JWKS, "a JWKS with the signing key", |b| {
        kids(b).contains(&new_kid)
    });
    d.wait_status("in sync", |s| s["daemon"]["phase"] == "in-sync");
}

#[test]
fn waits_for_an_issuer_on_a_fresh_install_and_starts_when_one_is_set() {
    let host = Host::new();
    host.write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
        .k3s_keys("/var/lib/rancher/k3s");
    let before = host.snapshot();
    // Not even /etc/irsa-agent exists yet.
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    let status_line = d
        .notify
        .wait_line("the waiting STATUS", |l| l.starts_with("STATUS="));
    assert_eq!(
        status_line,
        "STATUS=waiting for an issuer in /etc/irsa-agent/config.yaml"
    );
    let status = d.status();
    assert_eq!(status["daemon"]["phase"], "waiting-for-issuer");
    // The package's config: comments only.
    host.write(
        "/etc/irsa-agent/config.yaml",
        "# irsa-agent configuration\n# issuer: https://oidc.example.com/cluster\n",
    );
    // Read again (logged at start and after the change); that it converges nothing while
    // unconfigured is `decide::tests::unconfigured_only_the_configuration_is_acted_on`.
    eventually(DEADLINE, || {
        (d.log().matches("no issuer configured yet").count() >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the comments-only configuration was not read:\n{}", d.log()));
    d.assert_running();
    // Nothing on the host changed but the agent's own state.
    let after: Vec<_> = host
        .snapshot()
        .into_iter()
        .filter(|(p, _)| !p.starts_with("var/lib/irsa-agent") && !p.starts_with("etc/irsa-agent"))
        .collect();
    assert_eq!(after, before);
    // The admin sets the issuer: it starts.
    replace_by_rename(
        &host.path("/etc/irsa-agent/config.yaml"),
        config("https://oidc.example.com/homelab", "").as_bytes(),
    );
    wait_file(&mut d, &host, JWKS, "published", |b| {
        b == real_apiserver_jwks()
    });
    d.wait_status("in sync", |s| s["daemon"]["phase"] == "in-sync");
    assert_eq!(d.notify.count("READY=1"), 1);
}

#[test]
fn sighup_reloads_with_reloading_and_ready() {
    let host = k3s_host("");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    d.signal(Signal::HUP);
    d.notify.wait_line("RELOADING=1", |l| l == "RELOADING=1");
    let monotonic = d
        .notify
        .wait_line("MONOTONIC_USEC", |l| l.starts_with("MONOTONIC_USEC="));
    assert!(
        monotonic
            .trim_start_matches("MONOTONIC_USEC=")
            .parse::<u64>()
            .is_ok_and(|v| v > 0),
        "{monotonic}"
    );
    eventually(DEADLINE, || (d.notify.count("READY=1") == 2).then_some(()))
        .unwrap_or_else(|| panic!("no second READY=1: {:?}", d.notify.lines()));
    // RELOADING comes before the second READY.
    let lines = d.notify.lines();
    let reloading = lines.iter().position(|l| l == "RELOADING=1");
    let second_ready = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| *l == "READY=1")
        .nth(1)
        .map(|(i, _)| i);
    assert!(reloading < second_ready, "{lines:?}");
    let status = d.wait_status("a converge after the reload", |s| {
        s["daemon"]["last_converge"]["trigger"] == "reload"
    });
    assert_eq!(status["daemon"]["pid"], d.pid());
    assert_eq!(status["daemon"]["phase"], "in-sync");
}

#[test]
fn pings_the_watchdog_when_systemd_asks_for_it() {
    let host = k3s_host("");
    let mut d = Daemon::start(
        host.root(),
        &["--no-restart"],
        &[("WATCHDOG_USEC", "200000")],
    );
    d.wait_ready();
    eventually(DEADLINE, || {
        (d.notify.count("WATCHDOG=1") >= 5).then_some(())
    })
    .unwrap_or_else(|| panic!("watchdog pings: {:?}", d.notify.lines()));
    d.assert_running();
    // Without WATCHDOG_USEC, no pings (none before READY=1, where a watchdog's first ping
    // comes; that none ever comes is `systemd::tests::no_watchdog_without_watchdog_usec`).
    let quiet = k3s_host("");
    let mut q = Daemon::start(quiet.root(), &["--no-restart"], &[]);
    q.wait_ready();
    assert_eq!(q.notify.count("WATCHDOG=1"), 0);
}

#[test]
fn restarts_k3s_through_systemctl_and_waits_for_the_new_issuer() {
    let host = k3s_host("");
    let behaviour = Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    };
    let (_server, mut d) = start_with_apiserver(&host, behaviour, "20s");
    d.wait_ready();
    // READY came after the first converge, which restarted k3s and saw the new issuer.
    assert_eq!(host.systemctl_log(), "restart k3s\n");
    let status = d.wait_status("the restart recorded", |s| {
        s["daemon"]["metrics"]["apiserver_restarts_total"] == 1
    });
    assert_eq!(status["daemon"]["apiserver"]["result"], "changed");
    assert!(
        status["issuer"]["switched_at"].as_u64().is_some(),
        "{status}"
    );
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    // Its own write to config.yaml triggers one more converge, which changes nothing.
    d.wait_status("a quiet converge", |s| {
        s["daemon"]["metrics"]["converges_total"].as_u64() >= Some(2)
            && s["daemon"]["apiserver"]["result"] == "in-sync"
    });
    assert_eq!(host.systemctl_log(), "restart k3s\n", "no second restart");
}

#[test]
fn a_manifest_regenerated_by_kubeadm_upgrade_is_noticed_and_fixed() {
    let host = Host::new();
    // Nothing serves the issuer here (and nothing is published): no public check.
    host.write(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.test/cluster-a\npublic-check: false\n",
    )
    .copy(
        &data("../hosts/kubeadm/v1.31.yaml"),
        "/etc/kubernetes/manifests/kube-apiserver.yaml",
    )
    .write(
        "/etc/kubernetes/manifests/etcd.yaml",
        "apiVersion: v1\nkind: Pod\n",
    )
    .kubeadm_keys();
    let manifest = "/etc/kubernetes/manifests/kube-apiserver.yaml";
    let original = host.read(manifest);
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    assert!(
        host.read(manifest)
            .contains("--service-account-issuer=https://oidc.example.test/cluster-a")
    );
    // `kubeadm upgrade` writes the manifest anew (by rename), without our flags.
    replace_by_rename(&host.path(manifest), original.as_bytes());
    let fixed = eventually(DEADLINE, || {
        let text = host.read(manifest);
        text.contains("--service-account-issuer=https://oidc.example.test/cluster-a")
            .then_some(text)
    })
    .unwrap_or_else(|| panic!("manifest not fixed:\n{}", d.log()));
    assert_ne!(fixed, original);
    let status = d.wait_status("drift counted", |s| {
        s["daemon"]["metrics"]["drift_found_total"] == 1
    });
    assert_eq!(status["daemon"]["phase"], "in-sync");
    // No temp file for kubelet to run in the manifests folder.
    let names: Vec<String> = walk(&host.path("/etc/kubernetes/manifests"));
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_rolled_back_apiserver_change_is_held_not_retried_in_a_restart_loop() {
    let host = k3s_host("  resync-interval: 1s\n");
    let k3s_before = host.read("/etc/rancher/k3s/config.yaml");
    let (_server, mut d) = start_with_apiserver(&host, Behaviour::NeverReady, "1s");
    d.wait_ready();
    // Restarted, never ready, rolled back (restarted again).
    let status = d.wait_status("the held change", |s| s["daemon"]["phase"] == "held");
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
    assert_eq!(host.read("/etc/rancher/k3s/config.yaml"), k3s_before);
    assert_eq!(status["daemon"]["apiserver"]["result"], "held");
    assert_eq!(status["daemon"]["metrics"]["apiserver_restarts_total"], 2);
    // Published anyway (the documents do not depend on the apiserver's flags).
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    d.notify.wait_line("a STATUS about the held change", |l| {
        l.starts_with("STATUS=2 key(s) published to directory /srv/oidc; apiserver change rolled back and held")
    });
    // Resyncs come and go; no further restart.
    let converges = status["daemon"]["metrics"]["converges_total"]
        .as_u64()
        .unwrap_or(0);
    d.wait_status("three more resyncs", |s| {
        s["daemon"]["metrics"]["converges_total"].as_u64() >= Some(converges + 3)
    });
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
    // A reload (a person fixed something) tries again: two more restarts.
    d.signal(Signal::HUP);
    eventually(DEADLINE, || {
        (host.systemctl_log().lines().count() == 4).then_some(())
    })
    .unwrap_or_else(|| panic!("no retry after SIGHUP:\n{}", d.log()));
    d.wait_status("held again", |s| s["daemon"]["phase"] == "held");
    d.assert_running();
}

#[test]
fn a_key_the_running_apiserver_still_has_stays_published_until_it_restarts() {
    let host = k3s_host("");
    // A fake apiserver that loads the host's key files at each (re)start and serves them at
    // /openid/v1/jwks, as kube-apiserver does.
    let behaviour = Behaviour::Keys {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    };
    let (_server, mut d) = start_with_apiserver(&host, behaviour, "20s");
    d.wait_ready();
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    let old_kids = kids(&read(&host, JWKS));
    let restarts = host.systemctl_log();

    // Both key files replaced by a new key alone (a destructive change); k3s not restarted:
    // the running apiserver still signs with the old key, so the JWKS must keep it.
    let key = new_ec_key();
    replace_by_rename(&host.path(SERVICE_KEY), key.public_pem.as_bytes());
    replace_by_rename(&host.path(CURRENT_KEY), key.private_pem.as_bytes());
    let mut both = vec![key.kid.clone()];
    both.extend(old_kids.iter().cloned());
    wait_file(&mut d, &host, JWKS, "the new key plus the live ones", |b| {
        kids(b) == both
    });
    assert!(
        d.log()
            .contains("stay published: the running apiserver still verifies with them"),
        "{}",
        d.log()
    );
    assert_eq!(
        host.systemctl_log(),
        restarts,
        "the daemon restarts nothing for keys"
    );

    // k3s restarts (the fake apiserver loads the new files); the next converge drops the old
    // keys (a reload here; on its own the daemon looks again within 30 s).
    std::fs::write(
        host.path("/systemctl.log"),
        format!("{restarts}restart k3s\n"),
    )
    .expect("log a restart");
    d.signal(Signal::HUP);
    let expected = jwks_for(host.root(), &[SERVICE_KEY]);
    wait_file(&mut d, &host, JWKS, "the new key alone", |b| {
        b == expected.as_slice()
    });
    assert_eq!(kids(&read(&host, JWKS)), vec![key.kid.clone()]);
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

#[test]
fn the_public_copy_is_checked_and_an_unreachable_one_is_not_in_sync() {
    // The issuer's host answers nothing (a port nobody listens on): before, the daemon said
    // "in sync" although no relying party could fetch a document.
    let port = support::free_port();
    let issuer = format!("https://127.0.0.1:{port}/homelab");
    let host = Host::new();
    let config = config(&issuer, "").replace("public-check: false\n", "");
    assert!(!config.contains("public-check"), "{config}");
    host.write("/etc/irsa-agent/config.yaml", config.clone())
        .write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
        .k3s_keys("/var/lib/rancher/k3s");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    assert_eq!(
        read(&host, JWKS),
        real_apiserver_jwks(),
        "published all the same"
    );
    let status = d.wait_status("the public check", |s| !s["daemon"]["public"].is_null());
    assert_eq!(
        status["daemon"]["public"]["result"], "unreachable",
        "{status:#}"
    );
    assert_ne!(status["daemon"]["phase"], "in-sync", "{status:#}");
    let line = status["daemon"]["status"].as_str().unwrap_or("");
    assert!(
        line.contains(&format!(
            "public copy: {issuer}/.well-known/openid-configuration: UNREACHABLE"
        )),
        "{line}"
    );
    // `status` (a person, a script) says so too, and exits 2 (not in sync).
    let out = std::process::Command::new(run_support::binary())
        .arg("--root")
        .arg(host.root())
        .arg("status")
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("public copy:   unreachable"), "{text}");
    assert!(!text.contains("state:         in sync"), "{text}");

    // The person says the URL is not served yet: in sync, and the status says it was not
    // checked.
    replace_by_rename(
        &host.path("/etc/irsa-agent/config.yaml"),
        format!("{config}public-check: false\n").as_bytes(),
    );
    let status = d.wait_status("in sync without the public check", |s| {
        s["daemon"]["phase"] == "in-sync"
    });
    assert_eq!(
        status["daemon"]["public"]["result"], "not-checked",
        "{status:#}"
    );
}

/// A k3s agent (worker): `/etc/rancher/k3s/config.yaml` joins a server, only
/// `/var/lib/rancher/k3s/agent` exists. Before, `apply` failed reading
/// `server/tls/service.key` twice, `doctor` passed the distribution, and the daemon retried
/// for ever.
fn k3s_agent_host() -> Host {
    let host = Host::new();
    host.write(
        "/etc/irsa-agent/config.yaml",
        config("https://oidc.example.com/homelab", ""),
    )
    .write(
        "/etc/rancher/k3s/config.yaml",
        "server: https://10.0.0.1:6443\ntoken: K10abc::server:xyz\n",
    )
    .mkdir("/var/lib/rancher/k3s/agent/etc");
    host
}

fn agent(root: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(run_support::binary())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_k3s_agent_node_is_named_as_such_and_the_daemon_waits_without_retrying() {
    let host = k3s_agent_host();
    let said = "this is a k3s agent (worker) node: /var/lib/rancher/k3s/agent exists";
    let (code, out) = agent(host.root(), &["apply", "--check"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(said), "{out}");
    assert!(out.contains("irsa-agent runs on server nodes"), "{out}");
    assert_eq!(out.matches("service.key").count(), 1, "said once: {out}");
    let (code, out) = agent(host.root(), &["doctor", "--offline"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(said), "doctor fails the distribution: {out}");

    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    let status = d.wait_status("not a server", |s| s["daemon"]["phase"] == "not-a-server");
    assert!(
        status["daemon"]["status"]
            .as_str()
            .is_some_and(|l| l.contains(said)),
        "{status:#}"
    );
    assert!(status["daemon"]["next_retry_at"].is_null(), "{status:#}");
    // No retry is scheduled, so none comes however long it waits:
    // `decide::tests::an_agent_node_is_not_retried`.
    d.assert_running();
    let status = d.status();
    assert_eq!(
        status["daemon"]["metrics"]["converges_total"], 1,
        "no retries: {status:#}"
    );
    assert_eq!(
        d.log().matches(said).count(),
        1,
        "one message:\n{}",
        d.log()
    );

    // It becomes a server (k3s server installed here): the daemon goes on by itself.
    host.write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
        .k3s_keys("/var/lib/rancher/k3s");
    wait_file(&mut d, &host, JWKS, "published", |b| {
        b == real_apiserver_jwks()
    });
    d.wait_status("in sync", |s| s["daemon"]["phase"] == "in-sync");
}

#[test]
fn a_relative_root_is_made_absolute_so_the_watch_sees_changes() {
    // Before, `--root ./host` published at start, but the inotify watch (on paths relative to
    // a working directory the watcher did not share) missed every later change.
    let host = k3s_host("");
    let mut d = Daemon::start_relative(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    assert_eq!(read(&host, JWKS), real_apiserver_jwks());
    let watching = d.status()["daemon"]["watching"].clone();
    assert!(
        watching
            .as_array()
            .is_some_and(|w| w.iter().any(|p| p == "/var/lib/rancher/k3s/server/tls")),
        "{watching}"
    );
    let key = new_ec_key();
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    wait_file(&mut d, &host, JWKS, "republished with the new key", |b| {
        kids(b).contains(&key.kid)
    });
}

#[test]
fn with_apply_issuer_false_the_daemon_publishes_and_reports_the_pending_apiserver_change() {
    let host = k3s_host("  apply-issuer: false\n");
    let k3s_before = host.read("/etc/rancher/k3s/config.yaml");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    assert_eq!(read(&host, JWKS), real_apiserver_jwks(), "published");
    let status = d.wait_status("the pending change", |s| {
        s["daemon"]["phase"] == "apply-pending"
    });
    assert_eq!(
        status["daemon"]["apiserver"]["result"], "apply-pending",
        "{status:#}"
    );
    let message = status["daemon"]["apiserver"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        message.contains("the configuration says issuer https://oidc.example.com/homelab")
            && message.contains("irsa-agent apply --check --diff"),
        "{message}"
    );
    assert!(
        status["daemon"]["next_retry_at"].is_null(),
        "not a failure: {status:#}"
    );
    // Nothing of the apiserver's was touched, nothing restarted.
    assert_eq!(host.read("/etc/rancher/k3s/config.yaml"), k3s_before);
    assert!(!host.path("/var/lib/irsa-agent/backups").exists());
    let out = std::process::Command::new(run_support::binary())
        .arg("--root")
        .arg(host.root())
        .arg("status")
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "not in sync: {text}");
    assert!(text.contains("apiserver change pending"), "{text}");

    // The person applies it; the daemon sees the change and is in sync.
    let out = std::process::Command::new(run_support::binary())
        .arg("--root")
        .arg(host.root())
        .args(["apply", "--no-restart"])
        .output()
        .expect("apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = d.wait_status("in sync after apply", |s| s["daemon"]["phase"] == "in-sync");
    assert_eq!(
        status["daemon"]["apiserver"]["result"], "in-sync",
        "{status:#}"
    );
}

/// `LimitNOFILE=` of the shipped unit (the daemon's file descriptor limit in production).
fn unit_limit_nofile() -> Option<u64> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/irsa-agent.service"),
    )
    .ok()?;
    unit.lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.split(':').next_back())
        .and_then(|v| v.trim().parse().ok())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// 1,000 idle connections to the metrics endpoint (any local user can open them) once
/// exhausted the daemon's file descriptors, and a key change made meanwhile was not published.
/// Now the endpoint holds at most 64 of them, a key change is published within a second, and
/// the endpoint serves again once the idle ones have timed out.
#[test]
fn a_flood_of_idle_metrics_connections_does_not_stop_publishing() {
    let port = support::free_port();
    let host = k3s_host(&format!("  metrics-listen: 127.0.0.1:{port}\n"));
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    // The daemon runs with the unit's descriptor limit (systemd's default soft limit, 1024,
    // without one); the test itself needs more than 1,000.
    let nofile = unit_limit_nofile().unwrap_or(1024);
    let pid = rustix::process::Pid::from_raw(d.pid() as i32).expect("pid");
    rustix::process::prlimit(
        Some(pid),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(nofile),
            maximum: Some(nofile),
        },
    )
    .expect("set the daemon's descriptor limit");
    let mine = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    assert!(
        mine.current.is_none_or(|n| n > 1100),
        "the test needs more than 1,100 descriptors: {mine:?}"
    );
    let rss_before = vm_rss_kib(d.pid());
    let fds_before = open_fds(d.pid());

    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fds_during = open_fds(d.pid());
    assert!(
        fds_during <= fds_before + 64 + 4,
        "the daemon holds {fds_during} descriptors (before the flood: {fds_before})"
    );

    // A key change while the connections are held.
    let key = new_ec_key();
    let mut both = host.read(SERVICE_KEY);
    both.push_str(&key.public_pem);
    let changed = std::time::Instant::now();
    replace_by_rename(&host.path(SERVICE_KEY), both.as_bytes());
    replace_by_rename(&host.path(CURRENT_KEY), key.private_pem.as_bytes());
    let expected = jwks_for(host.root(), &[SERVICE_KEY]);
    wait_file(&mut d, &host, JWKS, "the JWKS of the new key", |b| {
        b == expected.as_slice()
    });
    let took = changed.elapsed();
    assert!(
        took < std::time::Duration::from_secs(1),
        "published {took:?} after the key change, during the flood\nlog:\n{}",
        d.log()
    );

    // Still holding all 1,000: the idle ones the endpoint took are closed after its header
    // timeout, and a scrape is served again.
    let scrape = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        response.starts_with("HTTP/1.1 200").then_some(response)
    };
    // (The metrics are the last finished converge's: the JWKS file of the new key can appear
    // a moment before the converge that wrote it records its figures. Seen in CI under load.)
    let response = eventually(DEADLINE, || {
        scrape().filter(|r| r.contains("irsa_agent_keys_published 3"))
    })
    .unwrap_or_else(|| {
        panic!(
            "no scrape served with the 3 keys published; the last one: {:?}",
            scrape()
        )
    });
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let rss_during = vm_rss_kib(d.pid());
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(300));
    eprintln!(
        "metrics flood: published {took:?} after the key change; descriptors {fds_before} -> {fds_during}; VmRSS {rss_before} kB before, {rss_during} kB during, {} kB after (debug build)",
        vm_rss_kib(d.pid())
    );
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// Temp files a crash left (a `.state.json` write, a half-written backup copy) were never
/// removed; the daemon sweeps them at start. Other files stay.
#[test]
fn temp_files_left_by_a_crash_are_swept_at_start() {
    let host = k3s_host("");
    let leftovers = [
        "/var/lib/irsa-agent/..state.json.irsa-agent-tmp.4242.0",
        "/var/lib/irsa-agent/.state.json.irsa-agent-tmp.4242.1",
        "/var/lib/irsa-agent/backups/20260101T000000Z/etc/rancher/k3s/.config.yaml.irsa-agent-tmp.4242.2",
        "/etc/irsa-agent/config.d/.50-x.yaml.irsa-agent-tmp.4242.3",
    ];
    for path in leftovers {
        host.write(path, "token: half-written\n");
    }
    let kept = [
        "/var/lib/irsa-agent/backups/20260101T000000Z/etc/rancher/k3s/config.yaml.d/10.yaml",
        "/var/lib/irsa-agent/.notes",
    ];
    for path in kept {
        host.write(path, "token: x\n");
    }
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    for path in leftovers {
        assert!(
            !host.path(path).exists(),
            "{path} is still there\n{}",
            d.log()
        );
    }
    for path in kept {
        assert!(host.path(path).exists(), "{path} was removed");
    }
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// `webhook.enabled: true`: the daemon serves the pod identity webhook over TLS with a CA it
/// made and keeps (0600), `status` counts its reviews, and turning it off closes it.
#[test]
fn the_daemon_serves_the_webhook_when_enabled_and_stops_when_disabled() {
    let port = support::free_port();
    let webhook = format!("webhook:\n  enabled: true\n  listen: 127.0.0.1:{port}\n");
    let host = k3s_host(&format!("  resync-interval: 1s\n{webhook}"));
    // The port is taken at first: said in status, and tried again.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let mut d = Daemon::start(host.root(), &["--no-restart"], &[]);
    d.wait_ready();
    let status = d.wait_status("the webhook's error", |s| {
        s["daemon"]["metrics"]["webhook"]["error"].is_string()
    });
    assert!(
        status["daemon"]["metrics"]["webhook"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("cannot listen on 127.0.0.1:{port}"))),
        "{status}"
    );
    drop(squatter);
    d.wait_status("the webhook served", |s| {
        s["daemon"]["metrics"]["webhook"]["error"].is_null()
            && s["daemon"]["metrics"]["webhook"]["url"].is_string()
    });
    let ca = host.path("/var/lib/irsa-agent/webhook-ca.pem");
    let pem = eventually(DEADLINE, || std::fs::read(&ca).ok()).expect("the CA file");
    let mode = std::fs::metadata(&ca).expect("ca").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Trust only the CA's certificate (the file holds its key too).
    let certs: String = irsa_agent::keys::pem::blocks(&pem)
        .iter()
        .filter(|b| b.label == b"CERTIFICATE")
        .map(|b| irsa_agent::keys::pem::encode("CERTIFICATE", &b.der))
        .collect();
    irsa_agent::publish::http::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(certs.as_bytes()).expect("pem"))
        .build()
        .expect("client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "prod", "operation": "CREATE",
            "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}}
    });
    // This host has no apiserver, so the ServiceAccount cache never loads: the webhook says
    // so (503) and the apiserver would apply the failure policy, rather than admitting the
    // pod as if its ServiceAccount had no annotation.
    let (code, answer) = runtime.block_on(async {
        let response = client
            .post(format!("https://127.0.0.1:{port}/mutate"))
            .body(serde_json::to_vec(&review).expect("json"))
            .send()
            .await
            .expect("post");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    });
    assert_eq!(code, 503, "{answer}");
    assert!(answer.contains("still loading"), "{answer}");
    // Counted in status (refreshed at the next save: the 1 s resync).
    let status = d.wait_status("the review counted", |s| {
        s["daemon"]["metrics"]["webhook"]["errors_total"] == 1
    });
    assert_eq!(
        status["daemon"]["metrics"]["webhook"]["url"],
        format!("https://127.0.0.1:{port}/mutate")
    );
    // Off again: the port is closed.
    host.write(
        "/etc/irsa-agent/config.yaml",
        config(
            "https://oidc.example.com/homelab",
            "  resync-interval: 1s\n",
        ),
    );
    d.wait_status("webhook gone", |s| {
        s["daemon"]["metrics"]["webhook"].is_null()
    });
    assert!(
        eventually(DEADLINE, || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()
        .then_some(()))
        .is_some(),
        "the webhook port is still open"
    );
}

/// The issuer rollout's last step on one server: two days after the daemon switched k3s to the
/// public issuer (its own record in the state file, moved back: the only thing faked here is
/// the time), the daemon retires k3s's default issuer by itself, as `irsa-agent finalize`
/// would, but only once the apiserver's `serviceaccount_stale_tokens_total` has stayed still
/// for the window (5 s with `--recheck-interval 1s`): a rise holds it, and it says so.
#[test]
fn retires_the_old_issuer_by_itself_once_no_token_of_it_can_be_valid_and_no_stale_token_is_used() {
    const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";
    let host = k3s_host("");
    let behaviour = Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    };
    let (_server, mut d) = start_with_apiserver(&host, behaviour, "20s");
    d.wait_ready();
    let status = d.wait_status("the switch recorded", |s| {
        s["issuer"]["switched_at"].as_u64().is_some()
    });
    assert_eq!(status["issuer"]["previous"], serde_json::json!([DEFAULT]));
    // Just switched: nothing retired (the tokens minted with the default issuer live a day).
    d.wait_status("a quiet converge", |s| {
        s["daemon"]["apiserver"]["result"] == "in-sync"
    });
    let status = d.status();
    let summary = status["daemon"]["apiserver"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        summary.contains("the old issuers are retired after"),
        "{summary}"
    );
    let (code, _) = d.stop();
    assert!(code.success());
    let config = String::from_utf8(read(&host, "/etc/rancher/k3s/config.yaml")).expect("utf-8");
    assert!(config.contains(DEFAULT), "{config}");

    // Two days later, with a client that used stale tokens 3 times so far.
    let state_path = host.path("/var/lib/irsa-agent/state.json");
    let mut state: Value =
        serde_json::from_slice(&std::fs::read(&state_path).expect("state")).expect("json");
    let switched = state["issuer"]["switched_at"]
        .as_u64()
        .expect("switched_at");
    state["issuer"]["switched_at"] = (switched - 2 * 86_400).into();
    std::fs::write(&state_path, serde_json::to_vec(&state).expect("json")).expect("state");
    std::fs::write(host.root().join("fake-stale-tokens"), "3").expect("counter");
    let systemctl = host.fake_systemctl().display().to_string();
    let mut d = Daemon::start(
        host.root(),
        &[
            "--systemctl",
            &systemctl,
            "--poll-interval",
            "100ms",
            "--timeout",
            "20s",
            "--recheck-interval",
            "1s",
        ],
        &[],
    );
    d.wait_ready();
    // The first reading is recorded; the client uses a stale token again before the window ends.
    let read_state = || -> Value {
        serde_json::from_slice(&std::fs::read(&state_path).unwrap_or_default()).unwrap_or_default()
    };
    if eventually(DEADLINE, || read_state()["stale-tokens"]["value"].as_f64()).is_none() {
        panic!("no stale-token reading recorded\n{}", d.log());
    }
    std::fs::write(host.root().join("fake-stale-tokens"), "4").expect("counter");
    if eventually(DEADLINE, || {
        d.log().contains("rose from 3 to 4").then_some(())
    })
    .is_none()
    {
        panic!("the rise was not reported\n{}", d.log());
    }
    assert_eq!(host.systemctl_log(), "restart k3s\n", "held while it rose");
    // Then it stays at 4 for the window: the default issuer goes, with one restart.
    let status = d.wait_status("the default issuer retired", |s| {
        s["issuer"]["retired"]
            .as_array()
            .is_some_and(|r| r.iter().any(|i| i == DEFAULT))
            && s["daemon"]["apiserver"]["result"] == "in-sync"
    });
    assert!(
        status["issuer"]["finalized_at"].as_u64().is_some(),
        "{status}"
    );
    assert_eq!(status["issuer"]["previous"], serde_json::json!([]));
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
    let config = String::from_utf8(read(&host, "/etc/rancher/k3s/config.yaml")).expect("utf-8");
    assert!(!config.contains(DEFAULT), "{config}");
    assert!(
        config.contains("service-account-issuer=https://oidc.example.com/homelab"),
        "{config}"
    );
    assert!(
        d.log()
            .contains(&format!("retired {DEFAULT} on this server")),
        "{}",
        d.log()
    );
    // The reading is forgotten once done.
    assert!(read_state().get("stale-tokens").is_none());
}
