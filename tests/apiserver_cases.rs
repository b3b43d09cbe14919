//! Every case a real kube-apiserver (v1.36.2 and v1.28.4) published for given key files
//! (tests/data/apiserver, copied from the team's shared test data): the agent must print the
//! same bytes, or refuse the same files.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

struct Case {
    name: String,
    dir: PathBuf,
    issuers: Vec<String>,
    jwks_uri: Option<String>,
    key_files: Vec<PathBuf>,
    signing_key_file: PathBuf,
}

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).expect("tests/data/apiserver exists") {
        let dir = entry.expect("readable").path();
        if !dir.is_dir() {
            continue;
        }
        let flags = std::fs::read_to_string(dir.join("flags")).expect("every case has flags");
        let mut case = Case {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.clone(),
            issuers: Vec::new(),
            jwks_uri: None,
            key_files: Vec::new(),
            signing_key_file: PathBuf::new(),
        };
        for line in flags.lines() {
            let Some((flag, value)) = line.split_once('=') else {
                continue;
            };
            match flag {
                "--service-account-issuer" => case.issuers.push(value.to_string()),
                "--service-account-jwks-uri" => case.jwks_uri = Some(value.to_string()),
                "--service-account-key-file" => case.key_files.push(dir.join(value)),
                "--service-account-signing-key-file" => case.signing_key_file = dir.join(value),
                _ => {}
            }
        }
        out.push(case);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn agent() -> Command {
    let mut cmd = Command::cargo_bin("irsa-agent").expect("binary built");
    cmd.arg("--root").arg("/nonexistent-root");
    cmd
}

fn key_args(case: &Case) -> Vec<String> {
    case.key_files
        .iter()
        .flat_map(|f| ["--key-file".to_string(), f.display().to_string()])
        .collect()
}

/// The apiserver's JWKS with repeated keys (same kid) removed, first kept.
fn dedup_jwks(apiserver: &[u8]) -> String {
    let mut doc: serde_json::Value = serde_json::from_slice(apiserver).expect("valid JSON");
    let keys = doc["keys"].as_array_mut().expect("keys array");
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k["kid"].as_str().unwrap_or_default().to_string()));
    serde_json::to_string(&doc).expect("serializable")
}

#[test]
fn the_case_set_is_complete() {
    let cases = cases();
    let valid = cases
        .iter()
        .filter(|c| c.dir.join("jwks.json").exists())
        .count();
    let rejects = cases
        .iter()
        .filter(|c| c.dir.join("apiserver-error.txt").exists())
        .count();
    assert_eq!(
        (valid, rejects),
        (17, 3),
        "expected 17 valid and 3 reject cases"
    );
}

#[test]
fn jwks_is_byte_identical_to_the_apiserver() {
    for case in cases().iter().filter(|c| c.dir.join("jwks.json").exists()) {
        let expected = std::fs::read(case.dir.join("jwks.json")).expect("jwks.json");

        // Exactly the apiserver's bytes when duplicates are kept.
        let out = agent()
            .arg("jwks")
            .arg("--keep-duplicates")
            .args(key_args(case))
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&expected),
            "case {}",
            case.name
        );

        // The default publishes each key once; with the signing key checked as well.
        let out = agent()
            .arg("jwks")
            .args(key_args(case))
            .arg("--signing-key-file")
            .arg(&case.signing_key_file)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            dedup_jwks(&expected),
            "case {}",
            case.name
        );
    }
}

#[test]
fn duplicate_keys_are_published_once() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "duplicate-key")
        .expect("case exists");
    let out = agent()
        .arg("jwks")
        .args(key_args(&case))
        .output()
        .expect("runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["keys"].as_array().map(Vec::len), Some(1));
    let apiserver: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.dir.join("jwks.json")).expect("file"))
            .expect("JSON");
    assert_eq!(apiserver["keys"].as_array().map(Vec::len), Some(2));
}

#[test]
fn discovery_is_byte_identical_to_the_apiserver() {
    for case in cases()
        .iter()
        .filter(|c| c.dir.join("discovery.json").exists())
    {
        let expected = std::fs::read_to_string(case.dir.join("discovery.json")).expect("file");
        // Without --service-account-jwks-uri the apiserver names its own address.
        let jwks_uri = case
            .jwks_uri
            .clone()
            .unwrap_or_else(|| "https://127.0.0.1:6443/openid/v1/jwks".to_string());
        let out = agent()
            .arg("discovery")
            .arg("--issuer")
            .arg(&case.issuers[0])
            .arg("--jwks-uri")
            .arg(&jwks_uri)
            .args(key_args(case))
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            expected,
            "case {}",
            case.name
        );
    }
}

#[test]
fn default_jwks_uri_is_under_the_issuer() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "kubeadm-dual-issuer")
        .expect("case");
    // This case's jwks-uri is exactly <issuer>/openid/v1/jwks, so omitting it changes nothing.
    let out = agent()
        .arg("discovery")
        .arg("--issuer")
        .arg(&case.issuers[0])
        .args(key_args(&case))
        .output()
        .expect("runs");
    let expected = std::fs::read_to_string(case.dir.join("discovery.json")).expect("file");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn rejected_files_fail_with_the_file_and_the_reason() {
    let mut transcript = String::new();
    for case in cases()
        .iter()
        .filter(|c| c.dir.join("apiserver-error.txt").exists())
    {
        let out = agent()
            .arg("jwks")
            .args(key_args(case))
            .arg("--signing-key-file")
            .arg(&case.signing_key_file)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(1), "case {} must fail", case.name);
        assert!(
            out.stdout.is_empty(),
            "case {}: nothing may be printed on stdout",
            case.name
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for file in &case.key_files {
            assert!(
                stderr.contains(&file.display().to_string()),
                "{}: names {}",
                case.name,
                file.display()
            );
        }
        let base = case
            .dir
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        transcript.push_str(&format!(
            "== {}\n{}\n",
            case.name,
            stderr.replace(&base, "<cases>")
        ));
    }
    insta::assert_snapshot!(transcript);
}
