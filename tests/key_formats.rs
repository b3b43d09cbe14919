//! Keys the agent has never seen: freshly generated RSA and ECDSA keys written in every format
//! kube-apiserver reads must give one and the same JWK, and a token signed with the private key
//! by a real JWT library (jsonwebtoken) must verify against the JWK the agent publishes.

use irsa_agent::keys::{self, PublicKey, jwks};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::Jwk};
use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use rsa::pkcs1::EncodeRsaPrivateKey as _;

fn only_key(pem: &str) -> PublicKey {
    let parsed = keys::parse_verification_keys(pem.as_bytes()).unwrap_or_default();
    assert_eq!(
        parsed.keys.len(),
        1,
        "one key expected, skipped: {:?}",
        parsed.skipped
    );
    parsed.keys[0].clone()
}

fn relabel(pem: &str, label: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
    let n = lines.len();
    lines[0] = format!("-----BEGIN {label}-----");
    lines[n - 1] = format!("-----END {label}-----");
    lines.join("\n") + "\n"
}

fn crlf(pem: &str) -> String {
    pem.replace('\n', "\r\n")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
}

fn sign_and_verify(alg: Algorithm, encoding: &EncodingKey, key: &PublicKey) {
    let claims = Claims {
        iss: "https://oidc.example.test".into(),
        sub: "system:serviceaccount:default:app".into(),
        aud: "sts.amazonaws.com".into(),
        exp: 4_102_444_800,
    };
    let mut header = Header::new(alg);
    header.kid = Some(key.kid());
    let token = jsonwebtoken::encode(&header, &claims, encoding).expect("signs");

    let set: serde_json::Value =
        serde_json::from_str(&jwks::jwks_json(std::slice::from_ref(key))).expect("JSON");
    let jwk: Jwk =
        serde_json::from_value(set["keys"][0].clone()).expect("a JWK jsonwebtoken understands");
    let decoding = DecodingKey::from_jwk(&jwk).expect("usable JWK");
    let mut validation = Validation::new(alg);
    validation.set_audience(&["sts.amazonaws.com"]);
    validation.set_issuer(&["https://oidc.example.test"]);
    let data = jsonwebtoken::decode::<Claims>(&token, &decoding, &validation).expect("verifies");
    assert_eq!(data.claims.sub, "system:serviceaccount:default:app");

    // A token signed by the same algorithm but tampered with must fail.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert!(jsonwebtoken::decode::<Claims>(&parts.join("."), &decoding, &validation).is_err());
}

#[test]
fn rsa_in_every_format() {
    let mut rng = rand::thread_rng();
    for bits in [2048usize, 3072] {
        let private = rsa::RsaPrivateKey::new(&mut rng, bits).expect("keygen");
        let pkcs1 = private
            .to_pkcs1_pem(LineEnding::LF)
            .expect("pem")
            .to_string();
        let pkcs8 = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("pem")
            .to_string();
        let spki = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");

        let reference = only_key(&pkcs1);
        assert_eq!(reference.alg(), "RS256");
        for variant in [
            pkcs8.clone(),
            spki.clone(),
            crlf(&spki),
            relabel(&spki, "WHATEVER"),
            relabel(&pkcs1, "PRIVATE KEY"),
            format!("junk before\n{spki}junk after\n"),
        ] {
            assert_eq!(
                only_key(&variant),
                reference,
                "same key whatever the format"
            );
        }

        // Signing-key rules: the label matters there.
        assert_eq!(
            keys::parse_signing_key(pkcs1.as_bytes())
                .expect("pkcs1")
                .public,
            reference
        );
        assert_eq!(
            keys::parse_signing_key(pkcs8.as_bytes())
                .expect("pkcs8")
                .public,
            reference
        );
        assert!(keys::parse_signing_key(relabel(&pkcs1, "PRIVATE KEY").as_bytes()).is_err());
        assert!(keys::parse_signing_key(spki.as_bytes()).is_err());

        let encoding = EncodingKey::from_rsa_pem(pkcs1.as_bytes()).expect("jsonwebtoken reads it");
        sign_and_verify(Algorithm::RS256, &encoding, &reference);
    }
}

struct EcPems {
    sec1: String,
    sec1_without_curve: String,
    pkcs8: String,
    spki: String,
    compressed_spki_der: Vec<u8>,
}

fn ec_case(pems: EcPems, alg: &str, jwt: Option<Algorithm>) {
    let reference = only_key(&pems.sec1);
    assert_eq!(reference.alg(), alg);
    let params = "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
    for variant in [
        pems.spki.clone(),
        crlf(&pems.sec1),
        format!("{params}{}", pems.sec1),
        relabel(&pems.spki, "X"),
    ] {
        assert_eq!(only_key(&variant), reference);
    }
    // A PKCS#8 EC private key is refused as a verification key, accepted as a signing key.
    let parsed = keys::parse_verification_keys(pems.pkcs8.as_bytes()).unwrap_or_default();
    assert!(parsed.keys.is_empty());
    assert_eq!(parsed.skipped[0].reason, keys::Refusal::EcPkcs8Private);
    assert_eq!(
        keys::parse_signing_key(pems.pkcs8.as_bytes())
            .expect("pkcs8")
            .public,
        reference
    );
    assert_eq!(
        keys::parse_signing_key(pems.sec1.as_bytes())
            .expect("sec1")
            .public,
        reference
    );

    // Go's ParseECPrivateKey cannot tell the curve of a SEC1 key without parameters.
    let parsed =
        keys::parse_verification_keys(pems.sec1_without_curve.as_bytes()).unwrap_or_default();
    assert!(parsed.keys.is_empty(), "SEC1 without curve must be refused");

    // Go's x509 refuses compressed points; so must we.
    let compressed = keys::pem::encode("PUBLIC KEY", &pems.compressed_spki_der);
    let parsed = keys::parse_verification_keys(compressed.as_bytes()).unwrap_or_default();
    assert!(parsed.keys.is_empty(), "compressed point must be refused");

    if let Some(alg) = jwt {
        let encoding =
            EncodingKey::from_ec_pem(pems.pkcs8.as_bytes()).expect("jsonwebtoken reads it");
        sign_and_verify(alg, &encoding, &reference);
    }
}

/// SEC1 `EC PRIVATE KEY` with the curve named, as openssl writes it.
fn sec1_with_curve(curve_oid: &str, scalar: &[u8], point: &[u8]) -> String {
    use der::Encode as _;
    let der = sec1::EcPrivateKey {
        private_key: scalar,
        parameters: Some(sec1::EcParameters::NamedCurve(
            spki::ObjectIdentifier::new_unwrap(curve_oid),
        )),
        public_key: Some(point),
    }
    .to_der()
    .expect("der");
    keys::pem::encode("EC PRIVATE KEY", &der)
}

fn compressed_spki(curve_oid: &str, point: &[u8]) -> Vec<u8> {
    use der::Encode as _;
    let curve = spki::ObjectIdentifier::new_unwrap(curve_oid);
    spki::SubjectPublicKeyInfoRef {
        algorithm: spki::AlgorithmIdentifierRef {
            oid: spki::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1"),
            parameters: Some(der::asn1::AnyRef::from(&curve)),
        },
        subject_public_key: der::asn1::BitStringRef::from_bytes(point).expect("bits"),
    }
    .to_der()
    .expect("der")
}

macro_rules! ec_pems {
    ($krate:ident, $oid:expr) => {{
        use $krate::elliptic_curve::sec1::ToEncodedPoint as _;
        let secret = $krate::SecretKey::random(&mut rand::thread_rng());
        EcPems {
            sec1: sec1_with_curve(
                $oid,
                &secret.to_bytes(),
                secret.public_key().to_encoded_point(false).as_bytes(),
            ),
            sec1_without_curve: secret.to_sec1_pem(LineEnding::LF).expect("pem").to_string(),
            pkcs8: secret
                .to_pkcs8_pem(LineEnding::LF)
                .expect("pem")
                .to_string(),
            spki: secret
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .expect("pem"),
            compressed_spki_der: compressed_spki(
                $oid,
                secret.public_key().to_encoded_point(true).as_bytes(),
            ),
        }
    }};
}

#[test]
fn ec_p256_in_every_format() {
    ec_case(
        ec_pems!(p256, "1.2.840.10045.3.1.7"),
        "ES256",
        Some(Algorithm::ES256),
    );
}

#[test]
fn ec_p384_in_every_format() {
    ec_case(
        ec_pems!(p384, "1.3.132.0.34"),
        "ES384",
        Some(Algorithm::ES384),
    );
}

#[test]
fn ec_p521_in_every_format() {
    // jsonwebtoken cannot sign ES512; the apiserver's own P-521 JWKS is matched byte for byte
    // in apiserver_cases.rs.
    ec_case(ec_pems!(p521, "1.3.132.0.35"), "ES512", None);
}

#[test]
fn kids_are_distinct_and_43_chars() {
    let a = only_key(&ec_pems!(p256, "1.2.840.10045.3.1.7").spki);
    let b = only_key(&ec_pems!(p256, "1.2.840.10045.3.1.7").spki);
    assert_ne!(a.kid(), b.kid());
    assert_eq!(a.kid().len(), 43);
    assert!(
        a.kid()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    );
}

#[test]
fn minted_tokens_verify_against_the_published_jwks() {
    use irsa_agent::keys::token;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver");
    for (case, signing, alg) in [
        ("k3s", "service.current.key", Algorithm::RS256),
        (
            "ec-pkcs8-signing-sec1-verify",
            "ec256b.pkcs8.key",
            Algorithm::ES256,
        ),
        ("ec-p384-sec1", "ec384.sec1.key", Algorithm::ES384),
    ] {
        let key = keys::load_signing_file(&dir.join(case).join("keys").join(signing))
            .expect("signing key");
        let claims = serde_json::json!({"iss": "https://oidc.example.test", "sub": "system:serviceaccount:default:app", "aud": "sts.amazonaws.com", "exp": 4_102_444_800u64});
        let token = token::mint(&key, &claims).expect("mints");
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(key.public.kid().as_str()));
        // Verify against the apiserver's own JWKS for that case, picked by kid.
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&std::fs::read(dir.join(case).join("jwks.json")).expect("jwks"))
                .expect("set");
        let jwk = set
            .find(&key.public.kid())
            .expect("kid published by the apiserver");
        let mut validation = Validation::new(alg);
        validation.set_audience(&["sts.amazonaws.com"]);
        jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_jwk(jwk).expect("jwk"),
            &validation,
        )
        .expect("verifies");
    }
    let p521 = keys::load_signing_file(&dir.join("ec-p521-sec1/keys/ec521.sec1.key")).expect("key");
    assert!(token::mint(&p521, &serde_json::json!({})).is_err());
}

/// ssh-keygen's files: before, "the file holds no PEM block at all" (public) or "not a key"
/// (private). Now each names the `ssh-keygen` command that converts it, and the files those
/// commands wrote (kept beside them) load, with the same kid.
#[test]
fn openssh_keys_get_the_ssh_keygen_command_that_converts_them() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openssh");
    let public = dir.join("id_rsa.pub");
    let e = keys::load_verification_file(&public)
        .expect_err("an OpenSSH public key is refused")
        .to_string();
    assert!(
        e.contains(&format!("ssh-keygen -e -m PKCS8 -f {}", public.display())),
        "{e}"
    );
    assert!(!e.contains("no PEM block"), "{e}");
    let private = dir.join("id_rsa");
    for e in [
        keys::load_verification_file(&private)
            .expect_err("refused")
            .to_string(),
        keys::load_signing_file(&private)
            .expect_err("refused")
            .to_string(),
    ] {
        assert!(
            e.contains(&format!(
                "ssh-keygen -p -m PEM -N '' -f {}",
                private.display()
            )),
            "{e}"
        );
    }
    let e = keys::load_signing_file(&public)
        .expect_err("a public key cannot sign")
        .to_string();
    assert!(
        e.contains("OpenSSH public key") && e.contains("ssh-keygen -p -m PEM"),
        "{e}"
    );
    // The converted files are what the hints promise.
    let converted = only_key(&std::fs::read_to_string(dir.join("id_rsa.pub.pem")).expect("pem"));
    let signing = keys::load_signing_file(&dir.join("id_rsa.pem")).expect("PEM private key");
    assert_eq!(converted.kid(), signing.public.kid());
}
