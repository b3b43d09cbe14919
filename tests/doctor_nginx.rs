//! doctor against a REAL web server: `irsa-agent publish` writes the directory target, a
//! user-mode nginx (tests/support, test CA made by openssl) serves it over TLS, and doctor
//! checks the public copy the way a relying party fetches it, trusting SSL_CERT_FILE.

mod support;

use std::os::unix::fs::PermissionsExt as _;

/// The locations docs/publishing.md recommends, with the Content-Type nginx gives files
/// without an extension as a parameter.
fn locations(srv: &str, default_type: &str) -> String {
    format!(
        r#"
    location = /cluster-a/.well-known/openid-configuration {{
        alias {srv}/.well-known/openid-configuration;
        default_type {default_type};
        add_header Cache-Control "public, max-age=300" always;
    }}
    location = /cluster-a/openid/v1/jwks {{
        alias {srv}/openid/v1/jwks;
        default_type {default_type};
        add_header Cache-Control "public, max-age=300" always;
    }}
"#
    )
}

fn statuses(doc: &serde_json::Value, prefix: &str) -> Vec<(String, String)> {
    doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
        .map(|c| {
            (
                c["id"].as_str().unwrap_or("").to_string(),
                c["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn setup(
    default_type: &str,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    support::TestCa,
    support::Nginx,
    String,
) {
    let work = tempfile::tempdir().expect("tempdir");
    let ca = support::TestCa::create(work.path());
    let port = support::free_port();
    let issuer = format!("https://127.0.0.1:{port}/cluster-a");
    let config = format!(
        "issuer: {issuer}\ndistribution: k3s\npublish:\n  - type: directory\n    path: /srv/oidc\n"
    );
    let host = support::k3s_host(&config);
    // The apiserver as `irsa-agent apply` leaves it.
    std::fs::write(
        host.path().join("etc/rancher/k3s/config.yaml"),
        format!(
            "kube-apiserver-arg:\n  - service-account-issuer={issuer}\n  - service-account-issuer=https://kubernetes.default.svc.cluster.local\n  - service-account-jwks-uri={issuer}/openid/v1/jwks\n"
        ),
    )
    .expect("k3s config");
    for key in ["service.key", "service.current.key"] {
        let path = host.path().join("var/lib/rancher/k3s/server/tls").join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let srv = host.path().join("srv/oidc").display().to_string();
    let nginx = support::start_nginx(work.path(), &locations(&srv, default_type), &ca, port);
    let ca_path = ca.ca_cert.display().to_string();
    let (code, stdout, stderr) =
        support::agent(host.path(), &["publish"], &[("SSL_CERT_FILE", &ca_path)]);
    if default_type == "application/json" {
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert_eq!(
            stdout.matches("matches byte for byte").count(),
            2,
            "{stdout}"
        );
    } else {
        // publish agrees with doctor: the documents are written, but relying parties may
        // refuse them as served, so it neither says "matches" nor exits 0.
        assert_eq!(code, 3, "{stdout}{stderr}");
        assert!(!stdout.contains("matches"), "{stdout}");
        assert_eq!(
            stdout
                .matches(&format!(
                    "same bytes, but served as Content-Type {default_type}"
                ))
                .count(),
            2,
            "{stdout}"
        );
        assert!(
            stderr.contains("published, but the public copy is not what was published"),
            "{stderr}"
        );
        // --check says the public copy differs (exit 2), as for any other difference.
        let (code, stdout, stderr) = support::agent(
            host.path(),
            &["publish", "--check"],
            &[("SSL_CERT_FILE", &ca_path)],
        );
        assert_eq!(code, 2, "{stdout}{stderr}");
    }
    (work, host, ca, nginx, ca_path)
}

#[test]
fn doctor_passes_through_nginx_serving_the_published_directory() {
    let (_work, host, _ca, _nginx, ca_path) = setup("application/json");
    let (code, stdout, stderr) = support::agent(
        host.path(),
        &["doctor", "--json"],
        &[("SSL_CERT_FILE", &ca_path)],
    );
    let doc: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    assert_eq!(code, 0, "{doc:#}");
    let public = statuses(&doc, "public.");
    assert_eq!(public.len(), 10, "{public:?}");
    assert!(public.iter().all(|(_, s)| s == "pass"), "{public:?}");
    // No admin kubeconfig on this host: said, not hidden.
    assert!(statuses(&doc, "running.").iter().all(|(_, s)| s == "skip"));
    let discovery = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == "public.discovery")
        .expect("public.discovery");
    assert!(
        discovery["finding"]
            .as_str()
            .unwrap_or("")
            .contains("TLS verified"),
        "{discovery}"
    );
}

#[test]
fn nginx_default_type_octet_stream_fails_the_content_type_checks() {
    // Debian's stock nginx.conf: `default_type application/octet-stream;` for files without
    // an extension, which both documents are.
    let (_work, host, _ca, _nginx, ca_path) = setup("application/octet-stream");
    let (code, stdout, _) = support::agent(
        host.path(),
        &["doctor", "--json"],
        &[("SSL_CERT_FILE", &ca_path)],
    );
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let public = statuses(&doc, "public.");
    for id in ["public.discovery-content-type", "public.jwks-content-type"] {
        assert!(
            public.contains(&(id.to_string(), "fail".to_string())),
            "{id}: {public:?}"
        );
    }
    assert!(public.contains(&("public.kids".to_string(), "pass".to_string())));
}

/// `trust-policy --thumbprint` asks the issuer's host. Trusted through SSL_CERT_FILE (as a
/// public CA would be): no thumbprint. Not trusted (a private CA): the SHA-1 of the top
/// certificate nginx serves, the same value the printed openssl command computes.
#[test]
fn trust_policy_thumbprint_asks_the_issuers_host() {
    let (_work, host, _ca, _nginx, ca_path) = setup("application/json");
    let args = [
        "trust-policy",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--account-id",
        "123456789012",
        "--format",
        "aws",
        "--thumbprint",
    ];
    let (code, stdout, stderr) = support::agent(host.path(), &args, &[("SSL_CERT_FILE", &ca_path)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("The thumbprint: none needed"), "{stdout}");
    assert!(!stdout.contains("--thumbprint-list"), "{stdout}");

    let (code, stdout, stderr) = support::agent(host.path(), &args, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("serves a private chain"), "{stdout}");
    let found = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("--thumbprint-list "))
        .unwrap_or_else(|| panic!("no --thumbprint-list in:\n{stdout}"))
        .to_string();
    // The openssl command trust-policy prints without --thumbprint, run for real.
    let (_, rule, _) = support::agent(
        host.path(),
        &args[..args.len() - 1],
        &[("SSL_CERT_FILE", &ca_path)],
    );
    let command: String = rule
        .lines()
        .skip_while(|l| !l.starts_with("#   openssl s_client"))
        .take(3)
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .trim_end_matches('\\')
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        command.starts_with("openssl s_client -connect 127.0.0.1:"),
        "{rule}"
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .expect("sh");
    let expected = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(expected.len(), 40, "{command}: {expected:?}");
    assert_eq!(found, expected);
}
