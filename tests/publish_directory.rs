//! The directory target behind a REAL HTTPS nginx (user-mode, own config, test CA) with an
//! independent verifier (PyJWT's PyJWKClient) fetching the published JWKS; and the proof that
//! no published byte carries private key material.

mod support;

use std::path::Path;

use base64::Engine as _;

/// The nginx locations docs/publishing.md recommends (Content-Type for files without an
/// extension, Cache-Control), used here verbatim.
const NGINX_LOCATIONS: &str = r#"
    location = /cluster-a/.well-known/openid-configuration {
        alias /SRV/.well-known/openid-configuration;
        default_type application/json;
        add_header Cache-Control "public, max-age=300" always;
    }
    location = /cluster-a/openid/v1/jwks {
        alias /SRV/openid/v1/jwks;
        default_type application/json;
        add_header Cache-Control "public, max-age=300" always;
    }
"#;

const PYJWK_SCRIPT: &str = r#"
import sys, ssl, jwt
url, ca, token, issuer = sys.argv[1:5]
client = jwt.PyJWKClient(url, ssl_context=ssl.create_default_context(cafile=ca))
key = client.get_signing_key_from_jwt(token)
claims = jwt.decode(token, key.key, algorithms=["RS256", "ES256"], audience="sts.amazonaws.com", issuer=issuer)
print(claims["sub"])
"#;

#[test]
fn directory_behind_nginx_verified_by_pyjwt() {
    let work = tempfile::tempdir().expect("tempdir");
    let ca = support::TestCa::create(work.path());
    let port = support::free_port();
    let issuer = format!("https://127.0.0.1:{port}/cluster-a");
    let config = format!(
        "issuer: {issuer}\ndistribution: k3s\npublish:\n  - type: directory\n    path: /srv/oidc\n"
    );
    let host = support::k3s_host(&config);
    let _nginx = support::start_nginx(
        work.path(),
        &NGINX_LOCATIONS.replace("/SRV", &host.path().join("srv/oidc").display().to_string()),
        &ca,
        port,
    );

    let ca_path = ca.ca_cert.display().to_string();
    let (code, stdout, stderr) =
        support::agent(host.path(), &["publish"], &[("SSL_CERT_FILE", &ca_path)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("openid/v1/jwks: created"), "{stdout}");
    assert_eq!(
        stdout.matches("matches byte for byte").count(),
        2,
        "the public copy through nginx: {stdout}"
    );
    assert!(
        stdout.contains("Cache-Control \"public, max-age=300\""),
        "{stdout}"
    );
    // Files are world-readable, directories traversable.
    use std::os::unix::fs::PermissionsExt as _;
    for rel in [
        "srv/oidc/openid/v1/jwks",
        "srv/oidc/.well-known/openid-configuration",
    ] {
        let mode = std::fs::metadata(host.path().join(rel))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{rel}");
    }
    for rel in ["srv/oidc", "srv/oidc/openid/v1", "srv/oidc/.well-known"] {
        let mode = std::fs::metadata(host.path().join(rel))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o755, 0o755, "{rel}");
    }
    // --check agrees; the public copy is checked with a configured ca-file too (no SSL_CERT_FILE).
    std::fs::copy(&ca.ca_cert, host.path().join("ca.pem")).expect("copy ca");
    support::write_config(host.path(), &format!("{config}ca-file: /ca.pem\n"));
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--check"], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // An independent verifier: PyJWT fetches the JWKS from nginx and verifies a token minted
    // with the cluster's signing key (by the agent's minting code, as the self-issued identity
    // does); a tampered token is refused.
    let signing = irsa_agent::keys::load_signing_file(&support::signing_key_file(host.path()))
        .expect("signing key");
    let now = std::time::SystemTime::now();
    let claims = irsa_agent::publish::credentials::token_claims(
        &issuer,
        "system:serviceaccount:default:app",
        "sts.amazonaws.com",
        now,
    );
    let token = irsa_agent::keys::token::mint(&signing, &claims).expect("mint");
    let jwks_url = format!("{issuer}/openid/v1/jwks");
    let (code, out, err) = support::python(PYJWK_SCRIPT, &[&jwks_url, &ca_path, &token, &issuer]);
    assert_eq!(code, 0, "PyJWT must verify: {err}");
    assert_eq!(out.trim(), "system:serviceaccount:default:app");

    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let mut forged = claims.clone();
    forged["sub"] = "system:serviceaccount:kube-system:cluster-admin".into();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
    let tampered = parts.join(".");
    let (code, _, err) = support::python(PYJWK_SCRIPT, &[&jwks_url, &ca_path, &tampered, &issuer]);
    assert_ne!(code, 0, "a tampered token must be refused");
    assert!(err.contains("Signature verification failed"), "{err}");
}

/// Every encoding of `bytes` a careless publisher could have used.
fn encodings(bytes: &[u8]) -> Vec<String> {
    let trimmed: &[u8] = {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        &bytes[start..]
    };
    let mut out = Vec::new();
    for b in [bytes, trimmed] {
        out.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b));
        out.push(base64::engine::general_purpose::STANDARD.encode(b));
        out.push(b.iter().map(|x| format!("{x:02x}")).collect());
        out.push(b.iter().map(|x| format!("{x:02X}")).collect());
    }
    // Only long enough strings are meaningful needles (a private value is >= 32 bytes).
    out.into_iter().filter(|s| s.len() >= 40).collect()
}

#[test]
fn no_published_byte_contains_private_key_material() {
    use rsa::traits::{PrivateKeyParts as _, PublicKeyParts as _};
    // A host whose verification key file is a bundle of PRIVATE keys (as k3s' service.key is),
    // RSA and EC, so a careless publisher would have d, p, q at hand.
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa");
    let ec = p256::SecretKey::random(&mut rand::thread_rng());
    use p256::pkcs8::EncodePrivateKey as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    let rsa_pem = rsa
        .to_pkcs1_pem(Default::default())
        .expect("pem")
        .to_string();
    let ec_sec1_pem = ec.to_sec1_pem(Default::default()).expect("pem").to_string();
    let host = support::k3s_host(
        "issuer: https://oidc.example.com/cluster-a\ndistribution: k3s\npublish:\n  - type: directory\n    path: /srv/oidc\n    pages-headers: true\n",
    );
    let tls = host.path().join("var/lib/rancher/k3s/server/tls");
    let existing = std::fs::read_to_string(tls.join("service.key")).expect("service.key");
    std::fs::write(
        tls.join("service.key"),
        format!("{rsa_pem}{ec_sec1_pem}{existing}"),
    )
    .expect("write");
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("RSA d".into(), rsa.d().to_bytes_be()),
        ("RSA p".into(), rsa.primes()[0].to_bytes_be()),
        ("RSA q".into(), rsa.primes()[1].to_bytes_be()),
        ("EC d".into(), ec.to_bytes().to_vec()),
    ];
    if let Some(dp) = rsa.dp() {
        secrets.push(("RSA dp".into(), dp.to_bytes_be()));
    }
    if let Some(dq) = rsa.dq() {
        secrets.push(("RSA dq".into(), dq.to_bytes_be()));
    }
    // The private keys of the k3s fixture too (parsed from their PEM with the rsa crate).
    for block in existing.split("-----END RSA PRIVATE KEY-----") {
        use rsa::pkcs1::DecodeRsaPrivateKey as _;
        let pem = format!("{block}-----END RSA PRIVATE KEY-----");
        if let Some(start) = pem.find("-----BEGIN RSA PRIVATE KEY-----")
            && let Ok(k) = rsa::RsaPrivateKey::from_pkcs1_pem(&pem[start..])
        {
            secrets.push(("fixture RSA d".into(), k.d().to_bytes_be()));
            secrets.push(("fixture RSA p".into(), k.primes()[0].to_bytes_be()));
        }
    }
    assert!(secrets.len() >= 7, "fixture keys found");
    let pkcs8_der = ec.to_pkcs8_der().expect("der");
    // Whole private-key encodings (single PEM lines may coincide with public bytes: n is
    // inside a PKCS#1 private key, so only whole bodies are meaningful needles).
    let pem_bodies: Vec<String> = [rsa_pem.as_str(), ec_sec1_pem.as_str()]
        .iter()
        .map(|pem| {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
        })
        .chain([base64::engine::general_purpose::STANDARD.encode(pkcs8_der.as_bytes())])
        .collect();
    let mut published = Vec::new();
    for entry in walk(&host.path().join("srv/oidc")) {
        published.push((
            entry.display().to_string(),
            std::fs::read_to_string(&entry).expect("utf-8"),
        ));
    }
    assert!(published.len() >= 3, "{published:?}");
    let jwks = published
        .iter()
        .find(|(p, _)| p.ends_with("jwks"))
        .expect("jwks");
    // The public halves are there (so the test looks at the right document)...
    assert!(
        jwks.1.contains(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rsa.n().to_bytes_be())
        )
    );
    for (path, text) in &published {
        let doc: Option<serde_json::Value> = serde_json::from_str(text).ok();
        if let Some(keys) = doc
            .as_ref()
            .and_then(|d| d.get("keys"))
            .and_then(|k| k.as_array())
        {
            for key in keys {
                for private_field in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
                    assert!(
                        key.get(private_field).is_none(),
                        "{path}: JWK has {private_field:?}"
                    );
                }
            }
        }
        for (what, value) in &secrets {
            for needle in encodings(value) {
                assert!(!text.contains(&needle), "{path} contains {what}");
            }
        }
        for line in &pem_bodies {
            assert!(
                !text.contains(line.as_str()),
                "{path} contains private key PEM text"
            );
        }
        assert!(!text.contains("PRIVATE KEY"), "{path}");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Nothing serves the issuer (DNS or the web server not set up yet): `publish` writes the
/// target but says the public copy is unreachable and exits 3, not 0. `--no-verify` and
/// `public-check: false` say the check was skipped, and exit 0.
#[test]
fn an_unreachable_public_copy_is_exit_3_unless_the_check_is_turned_off() {
    // A port nothing listens on: connection refused, at once.
    let port = support::free_port();
    let issuer = format!("https://127.0.0.1:{port}/cluster-a");
    let config = format!(
        "issuer: {issuer}\ndistribution: k3s\npublish:\n  - type: directory\n    path: /srv/oidc\n"
    );
    let host = support::k3s_host(&config);
    let (code, stdout, stderr) = support::agent(host.path(), &["publish"], &[]);
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(stdout.contains("openid/v1/jwks: created"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{issuer}/.well-known/openid-configuration: UNREACHABLE"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("matches"), "{stdout}");
    assert!(
        stderr.contains("published, but the public copy is unreachable")
            && stderr.contains("exit 3"),
        "{stderr}"
    );
    assert!(
        host.path().join("srv/oidc/openid/v1/jwks").is_file(),
        "the target is written all the same"
    );

    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("not checked (--no-verify)"), "{stdout}");

    support::write_config(host.path(), &format!("{config}public-check: false\n"));
    let (code, stdout, stderr) = support::agent(host.path(), &["publish"], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("not checked: `public-check: false` in the configuration"),
        "{stdout}"
    );

    // The help says what 3 means.
    let (_, help, _) = support::agent(host.path(), &["publish", "--help"], &[]);
    assert!(
        help.contains("3 published, but the public copy is"),
        "{help}"
    );
}
