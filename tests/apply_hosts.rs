//! `irsa-agent apply` on fixture hosts: k3s without config.yaml, with comments and block/flow
//! lists, with drop-ins, with an issuer the user set, older k3s signing with service.key, a
//! custom data-dir, RKE2, and kubeadm manifests as 1.28-1.33 write them (one edited by hand).
//!
//! For each: the effective flags after apply (re-read with the agent's reader) equal
//! expectations written here by hand (and, where a real kube-apiserver ran with the same
//! flags, the flags of tests/data/apiserver); the diff is a snapshot and touches only the
//! managed flags; a second apply is a no-op; backups hold the original bytes.

mod apply_support;
mod https_support;

use std::os::unix::fs::PermissionsExt as _;

use apply_support::{Host, data};
use irsa_agent::apiserver;
use irsa_agent::config::Distribution;
use irsa_agent::host::HostRoot;
use serde_json::Value;

const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";

struct Expect<'a> {
    issuers: &'a [&'a str],
    audiences: &'a [&'a str],
    jwks_uri: &'a str,
    key_files: &'a [&'a str],
    signing: &'a str,
}

fn json_of(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The flags a real kube-apiserver ran with in a tests/data/apiserver case.
fn real_flags(case: &str) -> (Vec<String>, Vec<String>, String) {
    let text = std::fs::read_to_string(data(&format!("apiserver/{case}/flags"))).expect("flags");
    let mut issuers = Vec::new();
    let mut audiences = Vec::new();
    let mut jwks = String::new();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("--service-account-issuer", v)) => issuers.push(v.to_string()),
            Some(("--api-audiences", v)) => audiences.extend(v.split(',').map(str::to_string)),
            Some(("--service-account-jwks-uri", v)) => jwks = v.to_string(),
            _ => {}
        }
    }
    (issuers, audiences, jwks)
}

/// Runs the whole apply cycle on `host` and checks it. Returns the diff text.
fn apply_cycle(host: &Host, distribution: Distribution, expect: &Expect<'_>) -> String {
    let before = host.snapshot();
    // --check reports pending changes and writes nothing.
    let out = host
        .agent()
        .args(["apply", "--check", "--diff"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.snapshot(), before, "--check wrote something");

    let out = host
        .agent()
        .args(["apply", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(result["changed"], true);
    assert_eq!(result["restart"]["status"], "pending");
    assert_eq!(result["distribution"], distribution.name());

    // Effective flags, re-read the way the distribution computes them.
    let root = HostRoot::new(host.root());
    let observed = apiserver::observe(&root, Distribution::Auto).expect("observe");
    assert_eq!(observed.distribution, distribution);
    assert_eq!(observed.flags.issuers, expect.issuers);
    assert_eq!(
        observed.flags.api_audiences.as_deref(),
        Some(
            &expect
                .audiences
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()[..]
        )
    );
    assert_eq!(observed.flags.jwks_uri(), Some(expect.jwks_uri));
    let files = apiserver::key_files(&root, Distribution::Auto).expect("key files");
    let verification: Vec<String> = files
        .verification
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(verification, expect.key_files);
    assert_eq!(files.signing.display().to_string(), expect.signing);
    assert_eq!(
        result["after"]["issuers"],
        serde_json::json!(expect.issuers)
    );

    // Only the managed flags changed; backups hold the original bytes, modes are kept.
    let mut diffs = String::new();
    for file in result["files"].as_array().expect("files") {
        let diff = file["diff"].as_str().expect("diff");
        for line in diff.lines() {
            let changed = (line.starts_with('+') && !line.starts_with("+++"))
                || (line.starts_with('-') && !line.starts_with("---"));
            if changed {
                let body = &line[1..];
                assert!(
                    body.contains("service-account-issuer")
                        || body.contains("api-audiences")
                        || body.contains("service-account-jwks-uri")
                        || body.starts_with("kube-apiserver-arg:")
                        || body.starts_with("kube-apiserver-arg+:")
                        || body.starts_with("# irsa-agent"),
                    "unexpected change: {line}"
                );
            }
        }
        diffs.push_str(diff);
        let path = file["path"].as_str().expect("path");
        let original = before
            .iter()
            .find(|(p, _)| std::path::Path::new("/").join(p).display().to_string() == path);
        match (file["action"].as_str(), original) {
            (Some("modify"), Some((_, bytes))) => {
                let backup = file["backup"].as_str().expect("backup path");
                assert!(
                    backup.starts_with("/var/lib/irsa-agent/backups/"),
                    "{backup}"
                );
                assert_eq!(&std::fs::read(host.path(backup)).expect("backup"), bytes);
            }
            (Some("create"), None) => assert!(file["backup"].is_null()),
            other => panic!("unexpected file action {other:?} for {path}"),
        }
    }
    // No temp or backup file next to the edited files; nothing new among the static pods.
    let manifests = |snap: &[(std::path::PathBuf, Vec<u8>)]| -> Vec<std::path::PathBuf> {
        snap.iter()
            .filter(|(p, _)| p.starts_with("etc/kubernetes/manifests"))
            .map(|(p, _)| p.clone())
            .collect()
    };
    let now = host.snapshot();
    assert_eq!(
        manifests(&now),
        manifests(&before),
        "a file appeared in the manifests dir"
    );
    for (path, _) in &now {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        assert!(
            !name.contains("irsa-agent-tmp"),
            "temp file left: {}",
            path.display()
        );
    }

    // A second apply is a no-op: nothing written, no restart, no new backup.
    let after_first = host.snapshot();
    let out = host
        .agent()
        .args(["apply", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = json_of(&out);
    assert_eq!(second["changed"], false);
    assert_eq!(second["in_sync"], true);
    assert_eq!(second["restart"]["status"], "not-needed");
    assert_eq!(
        host.snapshot(),
        after_first,
        "the second apply changed files"
    );
    let out = host
        .agent()
        .args(["apply", "--check"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    diffs
}

fn k3s_default_expect<'a>(issuer_list: &'a [&'a str], jwks: &'a str) -> Expect<'a> {
    Expect {
        issuers: issuer_list,
        audiences: &[DEFAULT, "k3s"],
        jwks_uri: jwks,
        key_files: &["/var/lib/rancher/k3s/server/tls/service.key"],
        signing: "/var/lib/rancher/k3s/server/tls/service.current.key",
    }
}

#[test]
fn k3s_without_config_yaml_matches_what_a_real_apiserver_ran_with() {
    let host = Host::new();
    host.agent_config("https://oidc.example.test")
        .mkdir("/etc/rancher/k3s")
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &["https://oidc.example.test", DEFAULT],
            "https://oidc.example.test/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!(diff);
    // The same flags as tests/data/apiserver/k3s-dual-issuer, which a real kube-apiserver ran with.
    let root = HostRoot::new(host.root());
    let observed = apiserver::observe(&root, Distribution::Auto).expect("observe");
    let (issuers, audiences, jwks) = real_flags("k3s-dual-issuer");
    assert_eq!(observed.flags.issuers, issuers);
    assert_eq!(observed.flags.effective_audiences(), audiences);
    assert_eq!(observed.flags.jwks_uri(), Some(jwks.as_str()));
    // k3s keeps its config private.
    let mode = std::fs::metadata(host.path("/etc/rancher/k3s/config.yaml"))
        .expect("created")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

const COMMENTED_BLOCK: &str = "\
# /etc/rancher/k3s/config.yaml: managed by hand
write-kubeconfig-mode: \"0644\"
tls-san:
  - k3s.example.com   # the VIP
  - 192.168.1.50

# apiserver extras
kube-apiserver-arg:
  # audit logging
  - 'audit-log-path=/var/log/k3s/audit.log'
  - \"audit-log-maxage=30\"
  - audit-log-maxbackup=10     # keep ten
  - --enable-admission-plugins=NodeRestriction,PodSecurity

disable:
  - traefik
node-label: [\"role=server\"]
";

#[test]
fn k3s_commented_block_list_keeps_every_other_byte_and_mode() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write("/etc/rancher/k3s/config.yaml", COMMENTED_BLOCK)
        .k3s_keys("/var/lib/rancher/k3s");
    let path = host.path("/etc/rancher/k3s/config.yaml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &["https://oidc.example.com/homelab", DEFAULT],
            "https://oidc.example.com/homelab/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!(diff);
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    // Every original line is still there, in order.
    let new = host.read("/etc/rancher/k3s/config.yaml");
    let mut lines = new.lines();
    for old in COMMENTED_BLOCK.lines() {
        assert!(lines.any(|l| l == old), "line lost: {old:?}");
    }
}

#[test]
fn k3s_flow_list_with_crlf_line_endings() {
    let host = Host::new();
    let text = "# written on Windows\r\nkube-apiserver-arg: [\"audit-log-maxage=30\", 'profiling=false']\r\ncluster-init: true\r\n";
    host.agent_config("https://oidc.example.com/homelab")
        .write("/etc/rancher/k3s/config.yaml", text)
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &["https://oidc.example.com/homelab", DEFAULT],
            "https://oidc.example.com/homelab/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!(diff);
    let new = host.read("/etc/rancher/k3s/config.yaml");
    assert!(new.starts_with("# written on Windows\r\n"));
    assert!(new.ends_with("\r\ncluster-init: true\r\n"));
    assert_eq!(
        new.matches('\n').count(),
        new.matches("\r\n").count(),
        "a bare LF crept in"
    );
}

#[test]
fn k3s_drop_ins_holding_kube_apiserver_arg() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "token-file: /etc/rancher/k3s/token\nkube-apiserver-arg:\n- audit-log-maxage=30\n",
        )
        // Appends to config.yaml's list.
        .write(
            "/etc/rancher/k3s/config.yaml.d/10-oidc.yaml",
            "# OIDC login for people\nkube-apiserver-arg+:\n  - oidc-issuer-url=https://dex.example.com\n  - oidc-client-id=kubernetes\n",
        )
        // Other keys only; and a file k3s ignores.
        .write("/etc/rancher/k3s/config.yaml.d/20-node.YML", "node-label:\n  - zone=a\n")
        .write(
            "/etc/rancher/k3s/config.yaml.d/30-notes.txt",
            "kube-apiserver-arg: [ignored]\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &["https://oidc.example.com/homelab", DEFAULT],
            "https://oidc.example.com/homelab/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!(diff);
    // New entries went to the last file that contributes to the list, with `+` kept.
    assert!(
        host.read("/etc/rancher/k3s/config.yaml.d/10-oidc.yaml")
            .contains("kube-apiserver-arg+:\n")
    );
    assert_eq!(
        host.read("/etc/rancher/k3s/config.yaml"),
        "token-file: /etc/rancher/k3s/token\nkube-apiserver-arg:\n- audit-log-maxage=30\n"
    );
    // The OIDC flags are still passed.
    let root = HostRoot::new(host.root());
    let observed = apiserver::observe(&root, Distribution::Auto).expect("observe");
    assert!(
        observed
            .args()
            .iter()
            .any(|a| a.name == "oidc-client-id" && a.value == "kubernetes")
    );
    assert!(
        observed
            .args()
            .iter()
            .any(|a| a.name == "audit-log-maxage" && a.value == "30")
    );
}

#[test]
fn k3s_drop_in_replacing_the_list_and_an_issuer_the_user_already_set() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        // config.yaml's list is replaced by the drop-in's (no `+`): its entries do not count.
        .write(
            "/etc/rancher/k3s/config.yaml",
            "kube-apiserver-arg:\n  - service-account-issuer=https://ignored.example\n",
        )
        .write(
            "/etc/rancher/k3s/config.yaml.d/50-irsa.yaml",
            "# set by hand last year\nkube-apiserver-arg:\n  - \"service-account-issuer=https://s3.eu-west-1.amazonaws.com/old-bucket\"\n  - \"service-account-jwks-uri=https://s3.eu-west-1.amazonaws.com/old-bucket/openid/v1/jwks\"\n  - \"audit-log-maxage=7\"\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &Expect {
            // The user's issuer replaced k3s's default: both were accepted at some time, and
            // both are again (the default last).
            issuers: &[
                "https://oidc.example.com/homelab",
                "https://s3.eu-west-1.amazonaws.com/old-bucket",
                DEFAULT,
            ],
            audiences: &[DEFAULT, "k3s"],
            jwks_uri: "https://oidc.example.com/homelab/openid/v1/jwks",
            key_files: &["/var/lib/rancher/k3s/server/tls/service.key"],
            signing: "/var/lib/rancher/k3s/server/tls/service.current.key",
        },
    );
    insta::assert_snapshot!(diff);
    assert_eq!(
        host.read("/etc/rancher/k3s/config.yaml"),
        "kube-apiserver-arg:\n  - service-account-issuer=https://ignored.example\n"
    );
    // The user's own prepend/append syntax is understood too.
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "kube-apiserver-arg:\n  - service-account-issuer+=https://extra.example\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &[
                "https://oidc.example.com/homelab",
                DEFAULT,
                "https://extra.example",
            ],
            "https://oidc.example.com/homelab/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!("k3s_append_syntax", diff);
}

#[test]
fn older_k3s_signing_with_service_key_and_custom_data_dir_and_domain() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "data-dir: /srv/k3s\ncluster-domain: homelab.internal\n",
        )
        .copy(
            &data("apiserver/k3s/keys/service.key"),
            "/srv/k3s/server/tls/service.key",
        );
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &Expect {
            issuers: &[
                "https://oidc.example.com/homelab",
                "https://kubernetes.default.svc.homelab.internal",
            ],
            audiences: &["https://kubernetes.default.svc.homelab.internal", "k3s"],
            jwks_uri: "https://oidc.example.com/homelab/openid/v1/jwks",
            key_files: &["/srv/k3s/server/tls/service.key"],
            signing: "/srv/k3s/server/tls/service.key",
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn rke2_server() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/rke2")
        .write(
            "/etc/rancher/rke2/config.yaml",
            "# RKE2 server\ncni: canal\nprofile: cis\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"\n",
        )
        .k3s_keys("/var/lib/rancher/rke2");
    let diff = apply_cycle(
        &host,
        Distribution::Rke2,
        &Expect {
            issuers: &["https://oidc.example.com/rke2", DEFAULT],
            audiences: &[DEFAULT, "rke2"],
            jwks_uri: "https://oidc.example.com/rke2/openid/v1/jwks",
            key_files: &["/var/lib/rancher/rke2/server/tls/service.key"],
            signing: "/var/lib/rancher/rke2/server/tls/service.current.key",
        },
    );
    insta::assert_snapshot!(diff);
}

fn kubeadm_host(manifest: &str, issuer: &str) -> Host {
    let host = Host::new();
    host.agent_config(issuer)
        .copy(
            &data(&format!("../hosts/kubeadm/{manifest}")),
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
        )
        // The other static pods kubelet runs from the same folder.
        .write(
            "/etc/kubernetes/manifests/etcd.yaml",
            "apiVersion: v1\nkind: Pod\n",
        )
        .kubeadm_keys();
    host
}

#[test]
fn kubeadm_manifests_1_28_to_1_33() {
    for version in ["v1.28", "v1.29", "v1.30", "v1.31", "v1.32", "v1.33"] {
        let host = kubeadm_host(
            &format!("{version}.yaml"),
            "https://oidc.example.test/cluster-a",
        );
        let original = host.read("/etc/kubernetes/manifests/kube-apiserver.yaml");
        let diff = apply_cycle(
            &host,
            Distribution::Kubeadm,
            &Expect {
                issuers: &["https://oidc.example.test/cluster-a", DEFAULT],
                audiences: &[DEFAULT],
                jwks_uri: "https://oidc.example.test/cluster-a/openid/v1/jwks",
                key_files: &["/etc/kubernetes/pki/sa.pub"],
                signing: "/etc/kubernetes/pki/sa.key",
            },
        );
        insta::assert_snapshot!(format!("kubeadm_{version}"), diff);
        // The flags a real kube-apiserver ran with in tests/data/apiserver/kubeadm-dual-issuer.
        let root = HostRoot::new(host.root());
        let observed = apiserver::observe(&root, Distribution::Auto).expect("observe");
        let (issuers, audiences, jwks) = real_flags("kubeadm-dual-issuer");
        assert_eq!(observed.flags.issuers, issuers, "{version}");
        assert_eq!(observed.flags.effective_audiences(), audiences, "{version}");
        assert_eq!(observed.flags.jwks_uri(), Some(jwks.as_str()), "{version}");
        // Everything but the three flags is byte-identical, and the list stays sorted.
        let new = host.read("/etc/kubernetes/manifests/kube-apiserver.yaml");
        let strip = |t: &str| {
            t.lines()
                .filter(|l| {
                    !l.contains("--service-account-issuer=")
                        && !l.contains("--api-audiences=")
                        && !l.contains("--service-account-jwks-uri=")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&new), strip(&original), "{version}");
        let flags: Vec<&str> = new
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --"))
            .map(|l| l.split('=').next().unwrap_or(""))
            .collect();
        let mut sorted = flags.clone();
        sorted.sort();
        assert_eq!(flags, sorted, "{version}: flags no longer sorted");
    }
}

#[test]
fn kubeadm_manifest_whose_issuer_was_changed_by_hand() {
    let host = kubeadm_host(
        "hand-edited-v1.31.yaml",
        "https://oidc.example.com/cluster-b",
    );
    let out = host
        .agent()
        .args(["apply", "--check"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "accepts https://kubernetes.default.svc.cluster.local again (it was removed by hand"
        ),
        "{stderr}"
    );
    let diff = apply_cycle(
        &host,
        Distribution::Kubeadm,
        &Expect {
            // The hand-set issuer was the one accepted (and the audience tokens carry since the
            // hand edit); the default, which tokens carried before it, comes back last.
            issuers: &[
                "https://oidc.example.com/cluster-b",
                "https://oidc.example.com/cluster-a",
                DEFAULT,
            ],
            audiences: &[DEFAULT, "https://oidc.example.com/cluster-a"],
            jwks_uri: "https://oidc.example.com/cluster-b/openid/v1/jwks",
            key_files: &["/etc/kubernetes/pki/sa.pub"],
            signing: "/etc/kubernetes/pki/sa.key",
        },
    );
    insta::assert_snapshot!(diff);
    assert!(
        host.read("/etc/kubernetes/manifests/kube-apiserver.yaml")
            .contains("    # changed by hand for IRSA (see wiki)\n")
    );
}

#[test]
fn kubeadm_persistence_advice_and_sorting_warning() {
    let host = kubeadm_host("v1.31.yaml", "https://oidc.example.test/cluster-a");
    let out = host
        .agent()
        .args(["apply", "--no-restart"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    insta::assert_snapshot!(
        stdout
            .split("kubeadm upgrade regenerates")
            .nth(1)
            .unwrap_or("")
    );
    // kubeadm upgrade regenerates the manifest: the next apply notices and re-applies.
    host.copy(
        &data("../hosts/kubeadm/v1.31.yaml"),
        "/etc/kubernetes/manifests/kube-apiserver.yaml",
    );
    // (The state says the switch was verified earlier.)
    let state_path = host.path("/var/lib/irsa-agent/state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
    state["issuer"]["switched_at"] = serde_json::json!(1_700_000_000u64);
    std::fs::write(&state_path, state.to_string()).expect("write state");
    let out = host
        .agent()
        .args(["apply", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let result = json_of(&out);
    assert_eq!(result["changed"], true);
    assert!(
        result["lost_change"]
            .as_str()
            .is_some_and(|m| m.contains("kubeadm upgrade")),
        "{result}"
    );
    assert!(
        result["kubeadm_persistence"]
            .as_str()
            .is_some_and(|m| m.contains("v1beta4"))
    );
}

#[test]
fn refuses_keys_the_apiserver_would_refuse_and_touches_nothing() {
    // The signing key's public half is not among the verification keys.
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .mkdir("/etc/rancher/k3s")
        .copy(
            &data("apiserver/kubeadm/keys/rsa2048.pub"),
            "/var/lib/rancher/k3s/server/tls/service.key",
        )
        .copy(
            &data("apiserver/rsa-pkcs8/keys/rsa2048b.pkcs8.key"),
            "/var/lib/rancher/k3s/server/tls/service.current.key",
        );
    let before = host.snapshot();
    let out = host
        .agent()
        .args(["apply", "--no-restart"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not among the verification keys"),
        "{stderr}"
    );
    assert!(
        stderr.contains("/var/lib/rancher/k3s/server/tls/service.current.key"),
        "{stderr}"
    );
    assert_eq!(host.snapshot(), before);
    // A verification key file the apiserver refuses (PKCS#8 EC).
    let host = kubeadm_host("v1.28.yaml", "https://oidc.example.com/homelab");
    host.copy(
        &data("apiserver/reject-ec-pkcs8-as-key-file/keys/ec256b.pkcs8.key"),
        "/etc/kubernetes/pki/sa.pub",
    );
    let before = host.snapshot();
    let out = host
        .agent()
        .args(["apply", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let result = json_of(&out);
    assert_eq!(result["changed"], false);
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("/etc/kubernetes/pki/sa.pub")),
        "{result}"
    );
    assert_eq!(host.snapshot(), before);
}

#[test]
fn warns_about_external_audiences_without_adding_any() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "kube-apiserver-arg:\n  - api-audiences=https://kubernetes.default.svc.cluster.local,k3s,sts.amazonaws.com\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let out = host
        .agent()
        .args(["apply", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let result = json_of(&out);
    assert!(result["warnings"].to_string().contains("sts.amazonaws.com"));
    assert_eq!(
        result["after"]["api_audiences"],
        serde_json::json!([DEFAULT, "k3s", "sts.amazonaws.com"])
    );
    // Never added where it was not.
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .mkdir("/etc/rancher/k3s")
        .k3s_keys("/var/lib/rancher/k3s");
    let out = host
        .agent()
        .args(["apply", "--no-restart"])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(
        !host
            .read("/etc/rancher/k3s/config.yaml")
            .contains("sts.amazonaws.com")
    );
}

#[test]
fn demo_runs_the_real_apply_and_verifies_a_token_against_the_published_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = assert_cmd::Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("+  - \"service-account-issuer=https://oidc.example.com/homelab\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("in sync: no file written, no restart"),
        "{stdout}"
    );
    assert!(stdout.contains("verified: kid "), "{stdout}");
    // The example host now has the dual issuer; the published JWKS is on disk.
    let root = HostRoot::new(dir.path().join("host"));
    let observed = apiserver::observe(&root, Distribution::Auto).expect("observe");
    assert_eq!(
        observed.flags.issuers,
        ["https://oidc.example.com/homelab", DEFAULT]
    );
    let jwks = std::fs::read_to_string(root.path("/srv/oidc/openid/v1/jwks")).expect("published");
    assert!(jwks.starts_with("{\"keys\":[{\"use\":\"sig\",\"kty\":\"RSA\""));
    // Kept, and said so; the next steps point at the quickstart.
    assert!(
        stdout.contains(&format!("stay in {}", dir.path().join("host").display())),
        "{stdout}"
    );
    assert!(stdout.contains("docs/quickstart.md"), "{stdout}");
}

#[test]
fn demo_says_which_folder_it_writes_and_removes_and_what_comes_next() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = assert_cmd::Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    // Before: "wrote /etc/rancher/k3s/config.yaml" right after "nothing on this machine changes".
    let copy = stdout
        .lines()
        .find(|l| l.contains("/etc/rancher/k3s/config.yaml is the demo's copy: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        copy.trim_end()
            .ends_with("/host/etc/rancher/k3s/config.yaml")
            && copy.contains("irsa-agent-demo-"),
        "{copy}"
    );
    assert!(
        stdout.contains("Removed the demo's folder")
            && stdout.contains("`irsa-agent demo --dir DIR` keeps"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).expect("tmp").count(),
        0,
        "the demo's folder is removed"
    );
    for step in [
        "irsa-agent check-config",
        "irsa-agent apply --check --diff",
        "irsa-agent doctor",
        "irsa-agent trust-policy --namespace NS --service-account SA --account-id ID",
        "irsa-agent verify-token -",
        "/usr/share/doc/irsa-agent/quickstart.md",
    ] {
        assert!(stdout.contains(step), "missing {step:?}:\n{stdout}");
    }
}

#[test]
fn two_phase_rollout_for_several_servers() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .mkdir("/etc/rancher/k3s")
        .k3s_keys("/var/lib/rancher/k3s");
    // Phase one: accepted, not signing.
    let out = host
        .agent()
        .args(["apply", "--accept-only", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(
        result["after"]["issuers"],
        serde_json::json!([DEFAULT, "https://oidc.example.com/homelab"])
    );
    assert!(!host.path("/var/lib/irsa-agent/state.json").exists());
    let out = host
        .agent()
        .args(["apply", "--accept-only", "--check"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    // Phase two: it signs; the old default stays accepted.
    let out = host
        .agent()
        .args(["apply", "--no-restart", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let result = json_of(&out);
    assert_eq!(
        result["after"]["issuers"],
        serde_json::json!(["https://oidc.example.com/homelab", DEFAULT])
    );
    let out = host
        .agent()
        .args(["apply", "--accept-only", "--check"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "accept-only must not demote the signing issuer"
    );
}

#[test]
fn k3s_issuer_entries_split_over_config_and_an_appending_drop_in() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "kube-apiserver-arg:\n  - service-account-issuer=https://a.example\n  - audit-log-maxage=30\n  - service-account-jwks-uri=https://a.example/openid/v1/jwks\n",
        )
        .write(
            "/etc/rancher/k3s/config.yaml.d/90-b.yaml",
            "kube-apiserver-arg+:\n  - service-account-issuer=https://b.example\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let diff = apply_cycle(
        &host,
        Distribution::K3s,
        &k3s_default_expect(
            &[
                "https://oidc.example.com/homelab",
                "https://a.example",
                "https://b.example",
                DEFAULT,
            ],
            "https://oidc.example.com/homelab/openid/v1/jwks",
        ),
    );
    insta::assert_snapshot!(diff);
    // The drop-in's list is now empty, written as `[]` (a bare `key:` would read as null).
    assert_eq!(
        host.read("/etc/rancher/k3s/config.yaml.d/90-b.yaml"),
        "kube-apiserver-arg+: []\n"
    );
}

/// On a host that is no control plane at all the message had a hole where the (stripped) root
/// was: "found under : none of".
#[test]
fn no_control_plane_is_said_without_a_hole_in_the_sentence() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab");
    for args in [&["apply", "--check"][..], &["doctor", "--offline"][..]] {
        let out = host.agent().args(args).output().expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("no Kubernetes control plane found: none of /etc/rancher/k3s"),
            "{args:?}: {text}"
        );
        assert!(!text.contains("under :"), "{text}");
    }
}

/// Every copy of `host_path` under the backup folder, as (folder name, bytes), oldest first.
fn backup_copies(host: &Host, host_path: &str) -> Vec<(String, String)> {
    let base = host.path("/var/lib/irsa-agent/backups");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&base)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let copy = e.path().join(host_path.trim_start_matches('/'));
                    std::fs::read_to_string(copy).ok().map(|text| (name, text))
                })
                .collect()
        })
        .unwrap_or_default();
    // Stamps sort by time; `-n` by their number within one second.
    out.sort_by_key(|(name, _)| {
        let (stamp, n) = name.split_once('-').unwrap_or((name, "0"));
        (stamp.to_string(), n.parse::<u32>().unwrap_or(0))
    });
    out
}

/// 300 applies once left 161 backup folders, each a copy of config.yaml with the cluster's
/// `token:`, kept forever. Now `backups: keep` bounds the copies per file, the newest are
/// kept, and the one a pending `--no-restart` change would go back to is never removed.
#[test]
fn backups_are_pruned_to_the_configured_number_per_file() {
    let host = Host::new();
    host.write(
        "/etc/rancher/k3s/config.yaml",
        "token: secret-cluster-token\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"\n",
    )
    .k3s_keys("/var/lib/rancher/k3s");
    let config_yaml = "/etc/rancher/k3s/config.yaml";
    let mut written = Vec::new();
    for i in 0..12 {
        host.write(
            "/etc/irsa-agent/config.yaml",
            format!(
                "issuer: https://oidc.example.com/c{i}\ndistribution: k3s\nbackups:\n  keep: 3\n  max-age: 30d\n"
            ),
        );
        written.push(host.read(config_yaml));
        let out = host
            .agent()
            .args(["apply", "--no-restart"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "apply {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let copies = backup_copies(&host, config_yaml);
    // The newest three copies: the file as it was before each of the last three applies.
    let texts: Vec<&str> = copies.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        written[9..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // The change awaiting its restart goes back to the newest (it switched the issuer).
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    let pending = state["issuer"]["pending_backup"]
        .as_str()
        .expect("pending backup")
        .to_string();
    assert!(pending.ends_with(&copies[2].0), "{pending} vs {copies:?}");

    // A pending change is kept even when newer backups would push it out: the jwks-uri flag
    // removed by hand and put back by apply four times, the issuer unchanged, so the change
    // still awaits the same restart.
    let backups_before = backup_copies(&host, config_yaml).len();
    for _ in 0..4 {
        let text: String = host
            .read(config_yaml)
            .lines()
            .filter(|l| !l.contains("service-account-jwks-uri="))
            .map(|l| format!("{l}\n"))
            .collect();
        host.write(config_yaml, &text);
        let out = host
            .agent()
            .args(["apply", "--no-restart", "--json"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json_of(&out)["changed"], true);
    }
    assert_eq!(backups_before, 3);
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    let still = state["issuer"]["pending_backup"]
        .as_str()
        .expect("pending backup");
    let names: Vec<String> = backup_copies(&host, config_yaml)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        still, pending,
        "the change awaiting its restart is the same"
    );
    assert_eq!(
        names.len(),
        4,
        "the newest three and the pending one: {names:?}"
    );
    assert!(
        names.iter().any(|n| still.ends_with(n.as_str())),
        "the pending change's backup {still} was removed: {names:?}"
    );
}
