//! Configuration: drop-in order, each validation rule, and the exact words users see
//! (snapshots), through the real binary against fake host roots.

use std::path::Path;

use assert_cmd::Command;

/// A fake host with the given files (host paths) and contents.
fn host(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    for (path, contents) in files {
        let full = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, contents).expect("write");
    }
    root
}

/// Runs `check-config` and returns (exit code, stdout, stderr) with the root shown as `<root>`.
fn check(root: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--root")
        .arg(root)
        .arg("check-config")
        .args(extra)
        .env_remove("IRSA_AGENT_CONFIG")
        .output()
        .expect("runs");
    let clean =
        |b: &[u8]| String::from_utf8_lossy(b).replace(&root.display().to_string(), "<root>");
    (
        out.status.code().unwrap_or(-1),
        clean(&out.stdout),
        clean(&out.stderr),
    )
}

fn issuer_error(issuer_yaml: &str) -> String {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        &format!("issuer: {issuer_yaml}\n"),
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1, "{issuer_yaml} must be refused: {stderr}");
    stderr
}

#[test]
fn a_valid_minimal_config() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/cluster-a\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    // Valid, but it publishes nothing: said, not accepted silently.
    assert!(
        stderr.contains("publish: no targets: nothing will be published from this host"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    insta::assert_snapshot!(stdout);
    // With a target: not a word on stderr.
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/cluster-a\npublish: [{type: directory, path: /srv/oidc/cluster-a}]\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stderr, "");
}

/// The packaged unit may write only its ReadWritePaths: a directory target elsewhere (the
/// Cloudflare Pages example used /srv/oidc-site) would fail at the first publish of the
/// service. check-config says so when the unit is installed, and a drop-in allowing it counts.
#[test]
fn a_directory_target_the_installed_unit_cannot_write_is_a_warning() {
    let config =
        "issuer: https://oidc.example.com\npublish: [{type: directory, path: /srv/oidc-site}]\n";
    let unit = include_str!("../systemd/irsa-agent.service");
    // Not installed (run by hand, in a container...): nothing known, nothing said.
    let root = host(&[("/etc/irsa-agent/config.yaml", config)]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    let root = host(&[
        ("/etc/irsa-agent/config.yaml", config),
        ("/lib/systemd/system/irsa-agent.service", unit),
    ]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "publish: directory /srv/oidc-site: the irsa-agent service cannot write there"
        ) && stderr.contains("ReadWritePaths=/srv/oidc-site"),
        "{stderr}"
    );
    let (_, stdout, _) = check(root.path(), &["--json"]);
    assert!(stdout.contains("cannot write there"), "{stdout}");
    // Under /srv/oidc: fine.
    let root = host(&[
        (
            "/etc/irsa-agent/config.yaml",
            "issuer: https://oidc.example.com\npublish: [{type: directory, path: /srv/oidc/site}]\n",
        ),
        ("/lib/systemd/system/irsa-agent.service", unit),
    ]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    // Allowed by a drop-in (`systemctl edit irsa-agent`): fine.
    let root = host(&[
        ("/etc/irsa-agent/config.yaml", config),
        ("/lib/systemd/system/irsa-agent.service", unit),
        (
            "/etc/systemd/system/irsa-agent.service.d/override.conf",
            "[Service]\nReadWritePaths=/srv/oidc-site\n",
        ),
    ]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));
}

#[test]
fn issuer_rules() {
    let mut transcript = String::new();
    for bad in [
        "http://oidc.example.com",
        "https://oidc.example.com/cluster-a?x=1",
        "https://oidc.example.com/cluster-a#frag",
        "https://oidc.example.com/cluster-a/",
        "https://oidc.example.com/",
        "\" https://oidc.example.com \"",
        "https://user:pw@oidc.example.com",
        "oidc.example.com",
        "\"\"",
        "https://",
    ] {
        transcript.push_str(&format!("== issuer: {bad}\n{}", issuer_error(bad)));
    }
    insta::assert_snapshot!(transcript);
}

#[test]
fn a_port_or_upper_case_is_a_warning_not_an_error() {
    for (issuer, needle) in [
        ("https://oidc.example.com:8443/x", "has a port (:8443)"),
        ("https://OIDC.example.com/x", "upper-case"),
    ] {
        let root = host(&[(
            "/etc/irsa-agent/config.yaml",
            &format!("issuer: {issuer}\n"),
        )]);
        let (code, _, stderr) = check(root.path(), &[]);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stderr.starts_with("warning: <root>/etc/irsa-agent/config.yaml: issuer"),
            "{stderr}"
        );
        assert!(stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn no_configuration_at_all() {
    let root = host(&[]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr);
}

#[test]
fn issuer_is_required() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "# everything commented out\n# issuer: https://x\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr);
}

#[test]
fn drop_ins_override_in_name_order() {
    let root = host(&[
        (
            "/etc/irsa-agent/config.yaml",
            "issuer: https://a.example.com\ndistribution: kubeadm\nrotation:\n  every: 30d\n  key-type: rsa-3072\n",
        ),
        (
            "/etc/irsa-agent/config.d/20-issuer.yaml",
            "issuer: https://c.example.com\n",
        ),
        (
            "/etc/irsa-agent/config.d/10-issuer.yml",
            "issuer: https://b.example.com\nrotation:\n  every: 60d\n",
        ),
        (
            "/etc/irsa-agent/config.d/.hidden.yaml",
            "issuer: https://hidden.example.com\n",
        ),
        ("/etc/irsa-agent/config.d/README", "not yaml: [\n"),
    ]);
    let (code, stdout, stderr) = check(root.path(), &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(doc["issuer"], "https://c.example.com");
    assert_eq!(doc["jwks-uri"], "https://c.example.com/openid/v1/jwks");
    assert_eq!(doc["distribution"], "kubeadm");
    // rotation merges key by key: `every` from the drop-in, `key-type` from the main file.
    assert_eq!(doc["rotation"]["every"], "60d");
    assert_eq!(doc["rotation"]["key-type"], "rsa-3072");
    let sources: Vec<&str> = doc["sources"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        sources,
        [
            "<root>/etc/irsa-agent/config.yaml",
            "<root>/etc/irsa-agent/config.d/10-issuer.yml",
            "<root>/etc/irsa-agent/config.d/20-issuer.yaml"
        ]
    );
}

#[test]
fn every_problem_of_every_file_at_once() {
    let root = host(&[
        (
            "/etc/irsa-agent/config.yaml",
            "issuer: http://oidc.example.com/\njwks_uri: https://x\ndistribution: k3z\npublish:\n  - type: s3\n    region: eu-west-1\n    buckett: oidc\n  - type: ftp\n  - /srv/oidc\n  - {type: directory, path: srv/oidc}\n",
        ),
        (
            "/etc/irsa-agent/config.d/50-rotation.yaml",
            "rotation:\n  enabled: \"yes\"\n  every: 12h\n  key-type: ed25519\n  token-lifetime: 3600\n",
        ),
        (
            "/etc/irsa-agent/config.d/60-broken.yaml",
            "issuer: [unclosed\n",
        ),
        ("/etc/irsa-agent/config.d/70-list.yaml", "- issuer\n"),
    ]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    insta::assert_snapshot!(stderr);
}

#[test]
fn rotation_every_must_outlast_token_lifetime() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com\nrotation:\n  every: 1d\n  token-lifetime: 2d\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr);
}

#[test]
fn rotation_every_must_outlast_a_whole_rotation() {
    // 2d > token-lifetime 1d, but 1h propagation + 1d + 1d drain margin does not fit in it.
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com\nrotation:\n  every: 2d\n  drain-margin: 1d\n  cdn-ttl: 5m\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr);
    // The defaults fit in a week.
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com\nrotation:\n  every: 7d\n  drain-margin: 2h\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(doc["rotation"]["drain-margin"], "2h");
    assert_eq!(doc["rotation"]["every"], "7d");
}

#[test]
fn explicit_config_file_replaces_the_host_files() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://host.example.com\n",
    )]);
    let file = root.path().join("other.yaml");
    std::fs::write(
        &file,
        "issuer: https://other.example.com\njwks-uri: https://cdn.example.com/keys.json\n",
    )
    .expect("write");
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--root")
        .arg(root.path())
        .arg("--config")
        .arg(&file)
        .args(["check-config", "--json"])
        .output()
        .expect("runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["issuer"], "https://other.example.com");
    assert_eq!(doc["jwks-uri"], "https://cdn.example.com/keys.json");

    let missing = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .args(["--config", "/nonexistent/irsa.yaml", "check-config"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/irsa.yaml"));
}

#[test]
fn discovery_takes_the_issuer_from_the_config() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.test/cluster-a\njwks-uri: https://oidc.example.test/cluster-a/openid/v1/jwks\n",
    )]);
    let case =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/kubeadm-dual-issuer");
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--root")
        .arg(root.path())
        .arg("discovery")
        .arg("--key-file")
        .arg(case.join("keys/rsa2048.pub"))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        std::fs::read(case.join("discovery.json")).expect("file")
    );
}

#[test]
fn usage_errors_exit_64_not_2() {
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--no-such-flag")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("jwks")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64), "--key-file is required");
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--help")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn publish_target_rules() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/cluster-a\nca-file: certs/ca.pem\npublish:\n  - {type: s3, bucket: a, credentials: self-issued}\n  - {type: s3, bucket: b, credentials: chain, role-arn: arn:aws:iam::1:role/x, sts-endpoint: \"https://sts.example\"}\n  - {type: s3, bucket: c, role-arn: arn:aws:iam::1:role/x, sts-endpoint: \"http://sts.example.com\"}\n  - {type: s3, bucket: d, endpoint: \"ftp://x\", cache-control: \"\", credentials: magic}\n  - {type: gcs, bucket: e, credentials-file: key.json}\n  - {type: directory, path: /srv/oidc, pages-headers: \"yes\"}\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    insta::assert_snapshot!(stderr);
}

#[test]
fn publish_layout_warnings_name_the_prefix_to_set() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc-bucket.s3.eu-west-1.amazonaws.com/cluster-a\npublish:\n  - {type: s3, bucket: oidc-bucket, region: eu-west-1, role-arn: \"arn:aws:iam::123456789012:role/publisher\"}\n  - {type: directory, path: /srv/oidc, prefix: other}\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("publish:       s3://oidc-bucket"),
        "{stdout}"
    );
    insta::assert_snapshot!(stderr);
}

#[test]
fn run_section_rules() {
    let root = host(&[
        (
            "/etc/irsa-agent/config.yaml",
            "issuer: https://oidc.example.com/cluster-a\nrun:\n  resync-interval: 0s\n  debounce: 2\n  retry-max: 2y\n  publish-timeout: 5h\n  metrics-textfile: irsa.prom\n  metrics-listen: 0.0.0.0:9464\n  metrics-port: 9464\n",
        ),
        (
            "/etc/irsa-agent/config.d/50-run.yaml",
            "run:\n  metrics-textfile: /var/lib/node-exporter/irsa.txt\n  metrics-listen: localhost\n",
        ),
        (
            "/etc/irsa-agent/config.d/60-run.yaml",
            "run:\n  resync-interval: 30s\n  debounce: 1m\n",
        ),
    ]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    insta::assert_snapshot!(stderr);
}

#[test]
fn run_section_values_in_effect() {
    let root = host(&[
        (
            "/etc/irsa-agent/config.yaml",
            "issuer: https://oidc.example.com/cluster-a\nrun:\n  resync-interval: 5m\n  metrics-listen: 127.0.0.1:9464\n",
        ),
        (
            "/etc/irsa-agent/config.d/50-run.yaml",
            "run:\n  debounce: 250ms\n  metrics-textfile: /var/lib/prometheus/node-exporter/irsa_agent.prom\n  finalize: false\n",
        ),
    ]);
    let (code, stdout, stderr) = check(root.path(), &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        doc["run"],
        serde_json::json!({
            "resync-interval": "5m",
            "debounce": "250ms",
            "retry-max": "5m",
            "publish-timeout": "2m",
            "metrics-textfile": "/var/lib/prometheus/node-exporter/irsa_agent.prom",
            "metrics-listen": "127.0.0.1:9464",
            "finalize": false,
            "apply-issuer": true,
        })
    );
}

/// One YAML syntax error is one problem: before, a phantom "issuer: required" came with it.
#[test]
fn a_yaml_syntax_error_is_the_only_problem_reported() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/cluster-a\npublish: [{type: directory\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("invalid configuration (1 problem):"),
        "{stderr}"
    );
    assert!(stderr.contains("not valid YAML"), "{stderr}");
    assert!(!stderr.contains("required"), "{stderr}");
}

#[test]
fn backups_retention_is_configurable_and_checked() {
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/x\nbackups:\n  keep: 3\n  max-age: 7d\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        doc["backups"],
        serde_json::json!({"keep": 3, "max-age": "7d"})
    );
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/x\nbackups:\n  keep: 0\n  max-age: 10m\n  maxage: 1d\n",
    )]);
    let (code, _, stderr) = check(root.path(), &[]);
    assert_eq!(code, 1);
    for needle in [
        "config.yaml: backups.keep = 0: expected a whole number from 1 to 1000",
        "config.yaml: backups.max-age = \"10m\": must be at least 1h",
        "backups.maxage",
    ] {
        assert!(stderr.contains(needle), "{needle} not in {stderr}");
    }
}

#[test]
fn ignore_stale_tokens_takes_a_reason_and_is_warned_about() {
    // `true` says nothing about why: refused, with what to write instead.
    for bad in ["true", "\"\"", "[a]"] {
        let root = host(&[(
            "/etc/irsa-agent/config.yaml",
            &format!(
                "issuer: https://oidc.example.com/cluster-a\nrotation:\n  ignore-stale-tokens: {bad}\n"
            ),
        )]);
        let (code, _, stderr) = check(root.path(), &[]);
        assert_eq!(code, 1, "{bad}: {stderr}");
        assert!(
            stderr.contains("rotation.ignore-stale-tokens")
                && stderr.contains("the reason as text"),
            "{bad}: {stderr}"
        );
    }
    let root = host(&[(
        "/etc/irsa-agent/config.yaml",
        "issuer: https://oidc.example.com/cluster-a\nrotation:\n  ignore-stale-tokens: \"audit log checked: no client keeps tokens\"\n",
    )]);
    let (code, stdout, stderr) = check(root.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(
        all.contains("rotation.ignore-stale-tokens") && all.contains("without waiting"),
        "{all}"
    );
}
