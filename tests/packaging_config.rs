//! The commented example `/etc/irsa-agent/config.yaml` the package ships
//! (`packaging/config.yaml`): as shipped it configures nothing (a fresh install has no issuer),
//! and with its example lines uncommented it is a valid configuration that sets every key it
//! documents. A renamed or removed key makes this fail, so the example cannot rot.

use std::path::Path;

use assert_cmd::Command;

const EXAMPLE: &str = include_str!("../packaging/config.yaml");

/// Uncomments the example settings: lines `# key: ...` / `#   - key: ...` (a key starting
/// with a lowercase letter right after `# ` and optional indentation; `_` is accepted so that a
/// misspelt `path_style` is uncommented and refused rather than silently skipped). Prose comments start with a
/// capital letter or punctuation and stay comments.
fn uncommented(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => out.push_str(rest),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn is_setting(rest: &str) -> bool {
    let body = rest.trim_start_matches(' ');
    let body = body.strip_prefix("- ").unwrap_or(body);
    let Some((key, after)) = body.split_once(':') else {
        return false;
    };
    !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && (after.is_empty() || after.starts_with(' '))
}

fn check_config(root: &Path) -> (i32, String, String) {
    let out = Command::cargo_bin("irsa-agent")
        .expect("binary")
        .arg("--root")
        .arg(root)
        .args(["check-config", "--json"])
        .env_remove("IRSA_AGENT_CONFIG")
        .env_remove("IRSA_AGENT_ROOT")
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn host_with_config(text: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("etc/irsa-agent");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.yaml"), text).expect("write");
    root
}

#[test]
fn shipped_example_configures_nothing() {
    for line in EXAMPLE.lines() {
        assert!(
            line.is_empty() || line.starts_with('#'),
            "every line of packaging/config.yaml must be a comment, found {line:?}"
        );
    }
    let root = host_with_config(EXAMPLE);
    let (code, stdout, stderr) = check_config(root.path());
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("issuer") && stderr.contains("required"),
        "a fresh install must say the issuer is missing: {stderr}"
    );
}

#[test]
fn uncommented_example_is_valid_and_sets_what_it_documents() {
    let text = uncommented(EXAMPLE);
    let root = host_with_config(&text);
    let (code, stdout, stderr) = check_config(root.path());
    assert_eq!(code, 0, "uncommented example:\n{text}\nstderr: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(doc["issuer"], "https://oidc.example.com/cluster-a");
    assert_eq!(
        doc["jwks-uri"],
        "https://oidc.example.com/cluster-a/openid/v1/jwks"
    );
    assert_eq!(doc["distribution"], "auto");
    assert_eq!(doc["public-check"], true);
    assert_eq!(doc["run"]["apply-issuer"], true);
    assert_eq!(doc["run"]["finalize"], true);
    let types: Vec<&str> = doc["publish"]
        .as_array()
        .expect("publish list")
        .iter()
        .map(|t| t["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["directory", "s3", "gcs", "azure-blob"]);
    assert_eq!(doc["publish"][1]["target"], "s3://oidc-example/cluster-a");
    let rotation = &doc["rotation"];
    assert_eq!(rotation["enabled"], false);
    assert_eq!(rotation["every"], "90d");
    assert_eq!(rotation["key-type"], "rsa-2048");
    assert_eq!(rotation["propagation-wait"], "1h");
    assert_eq!(rotation["cdn-ttl"], "0s");
    assert_eq!(rotation["token-lifetime"], "1d");
    assert_eq!(doc["backups"]["keep"], 10);
    assert_eq!(doc["backups"]["max-age"], "30d");
    let webhook = &doc["webhook"];
    assert_eq!(webhook["enabled"], false, "uncommented, still off");
    assert_eq!(webhook["url"], "https://127.0.0.1:9443/mutate");
    assert_eq!(webhook["failure-policy"], "Ignore");
    assert_eq!(
        webhook["skip-namespaces"],
        serde_json::json!(["kube-system"])
    );
    assert_eq!(webhook["aws"]["region"], "eu-west-1");
    assert_eq!(webhook["aws"]["token-expiration"], "1d");
    assert_eq!(doc["warnings"], serde_json::json!([]));
}

#[test]
fn prose_comments_are_not_mistaken_for_settings() {
    assert!(is_setting("issuer: https://x"));
    assert!(is_setting("  - type: s3"));
    assert!(is_setting("rotation:"));
    assert!(is_setting("    path_style: false"));
    assert!(!is_setting("Required. https:// only; no trailing slash"));
    assert!(!is_setting("Manual: man irsa-agent"));
    assert!(!is_setting("  # A directory a web server serves"));
    assert!(!is_setting(
        "auto (detect; the default), k3s, rke2 or kubeadm."
    ));
}

/// `doctor`, `publish` and `check-config` point at /usr/share/doc/irsa-agent/*.md: each must be
/// a file of docs/ and the package must ship docs/ there (before, it shipped only the README).
#[test]
fn the_docs_messages_name_are_in_the_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        cargo.contains(r#"["docs/*.md", "usr/share/doc/irsa-agent/", "644"]"#),
        "[package.metadata.deb] assets must ship docs/*.md"
    );
    let mut named = std::collections::BTreeSet::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source");
                for (i, _) in text.match_indices("/usr/share/doc/irsa-agent/") {
                    let rest = &text[i + "/usr/share/doc/irsa-agent/".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
                        .collect();
                    if let Some(name) = name.strip_suffix('.').map(String::from).or(Some(name))
                        && name.ends_with(".md")
                    {
                        named.insert(name);
                    }
                }
            }
        }
    }
    assert!(named.contains("publishing.md"), "{named:?}");
    for name in &named {
        assert!(
            root.join("docs").join(name).is_file() || name == "README.md",
            "messages name /usr/share/doc/irsa-agent/{name}, but docs/{name} does not exist"
        );
    }
}
