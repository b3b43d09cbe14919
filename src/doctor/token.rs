//! `verify-token`: decode a service-account token, verify it as a relying party does, and say
//! in words why it would be refused.
//!
//! The order is the one AWS STS, GCP and Azure follow: a well-formed JWS; an algorithm they
//! accept; the key picked by `kid` from the JWKS (an unknown kid is the classic stale JWKS);
//! the algorithm fitting that key; the signature (jsonwebtoken, or the p521 crate for ES512,
//! which jsonwebtoken lacks); then `iss`, `aud`, and the times. Every failure names the values
//! on both sides and, for near-misses (`sts.amazon.com`, a trailing slash), exactly what is off.
//! The token itself is a credential and is never printed.

use std::collections::HashSet;

use base64::Engine as _;
use serde_json::Value;

use super::words::{self, list};
use super::{Check, Status};

/// What the relying party expects.
#[derive(Debug, Clone)]
pub struct Expect {
    pub issuer: String,
    pub audience: String,
}

/// The keys the token is checked against.
#[derive(Debug, Clone)]
pub struct KeySet {
    /// "the published JWKS at https://...", "this host's key files".
    pub source: String,
    /// JWKs (JSON objects).
    pub jwks: Vec<Value>,
    /// The keys come from the public JWKS (an unknown kid then means a stale JWKS).
    pub published: bool,
}

/// A key of this host's key files, to explain an unknown kid.
#[derive(Debug, Clone)]
pub struct LocalKey {
    pub kid: String,
    pub file: String,
}

/// The result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub header: Option<Value>,
    pub claims: Option<Value>,
    pub checks: Vec<Check>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        !self.checks.iter().any(|c| c.status == Status::Fail)
    }
}

/// Algorithms AWS STS accepts for web identity tokens (GCP and Azure accept fewer).
const ACCEPTED_ALGS: [&str; 6] = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"];

fn b64url(part: &str) -> Result<Vec<u8>, String> {
    if part.contains(['+', '/']) {
        return Err("uses standard base64 ('+' or '/'), not base64url".into());
    }
    if part.contains('=') {
        return Err("has '=' padding, which JWTs do not use".into());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| format!("is not base64url ({e})"))
}

/// Cleans what people paste: surrounding whitespace and quotes, a `Bearer ` prefix.
pub fn clean(raw: &str) -> (String, Vec<String>) {
    let mut notes = Vec::new();
    let mut t = raw.trim();
    if t.len() != raw.len() {
        notes.push("surrounding whitespace removed".to_string());
    }
    if let Some(rest) = t
        .strip_prefix("Bearer ")
        .or_else(|| t.strip_prefix("bearer "))
    {
        notes.push("'Bearer ' prefix removed".to_string());
        t = rest.trim();
    }
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        notes.push("quotes removed".to_string());
        t = &t[1..t.len() - 1];
    }
    (t.to_string(), notes)
}

/// Decodes header and payload without verifying anything.
pub fn decode(token: &str) -> Result<(Value, Value), String> {
    if token.trim().is_empty() {
        return Err(
            "empty input: no token was given (was the file or standard input empty?)".into(),
        );
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => {
            return Err(
                "it has 5 parts: an encrypted JWE, not a signed JWT; relying parties need the signed service-account token".into(),
            );
        }
        n => {
            return Err(format!(
                "not a JWT: {n} part{}, expected 3 parts separated by '.'; is it the whole token (kubectl create token, or the file the projected volume mounts)?",
                if n == 1 { "" } else { "s" }
            ));
        }
    }
    let header = b64url(parts[0]).map_err(|e| format!("the header {e}"))?;
    let payload = b64url(parts[1]).map_err(|e| format!("the payload {e}"))?;
    if parts[2].is_empty() {
        return Err("the signature part is empty: an unsigned token".into());
    }
    b64url(parts[2]).map_err(|e| format!("the signature {e}"))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| format!("the header is not JSON ({e})"))?;
    let claims: Value =
        serde_json::from_slice(&payload).map_err(|e| format!("the payload is not JSON ({e})"))?;
    if !header.is_object() || !claims.is_object() {
        return Err("the header and payload must be JSON objects".into());
    }
    Ok((header, claims))
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

/// `aud` as a list (a string or an array of strings).
pub fn audiences(claims: &Value) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// The key type and curve an algorithm needs.
fn needs(alg: &str) -> (&'static str, Option<&'static str>) {
    match alg {
        "ES256" => ("EC", Some("P-256")),
        "ES384" => ("EC", Some("P-384")),
        "ES512" => ("EC", Some("P-521")),
        _ => ("RSA", None),
    }
}

/// The algorithm kube-apiserver uses for a JWK.
fn natural_alg(jwk: &Value) -> &'static str {
    match (str_of(jwk, "kty"), str_of(jwk, "crv")) {
        (Some("EC"), Some("P-384")) => "ES384",
        (Some("EC"), Some("P-521")) => "ES512",
        (Some("EC"), _) => "ES256",
        _ => "RS256",
    }
}

fn verify_es512(token: &str, jwk: &Value) -> Result<(), String> {
    use p521::ecdsa::signature::Verifier as _;
    let b = |k: &str| {
        str_of(jwk, k)
            .and_then(|v| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(v)
                    .ok()
            })
            .ok_or_else(|| format!("the key's {k} is missing or not base64url"))
    };
    let (x, y) = (b("x")?, b("y")?);
    let mut point = vec![4u8];
    point.extend(std::iter::repeat_n(0, 66usize.saturating_sub(x.len())));
    point.extend(&x);
    point.extend(std::iter::repeat_n(0, 66usize.saturating_sub(y.len())));
    point.extend(&y);
    let key = p521::ecdsa::VerifyingKey::from_sec1_bytes(&point)
        .map_err(|_| "the key is not a valid P-521 point".to_string())?;
    let (signed, sig) = token
        .rsplit_once('.')
        .ok_or_else(|| "no signature".to_string())?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| "the signature is not base64url".to_string())?;
    let sig = p521::ecdsa::Signature::from_slice(&sig)
        .map_err(|_| "the signature is not 132 bytes (r||s)".to_string())?;
    key.verify(signed.as_bytes(), &sig)
        .map_err(|_| "InvalidSignature".to_string())
}

/// The signature check with a real JWT library.
fn verify_signature(token: &str, alg: &str, jwk: &Value) -> Result<(), String> {
    if alg == "ES512" {
        return verify_es512(token, jwk);
    }
    let algorithm: jsonwebtoken::Algorithm = alg
        .parse()
        .map_err(|_| format!("{alg} is not supported by the JWT library"))?;
    let parsed: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(jwk.clone()).map_err(|e| format!("the JWK cannot be used ({e})"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&parsed)
        .map_err(|e| format!("the JWK cannot be used ({e})"))?;
    let mut validation = jsonwebtoken::Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|_| ())
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "InvalidSignature".to_string(),
            _ => e.to_string(),
        })
}

/// Verifies `token` against `keys` for `expect` at time `now`, explaining every failure.
pub fn verify(raw: &str, keys: &KeySet, local: &[LocalKey], expect: &Expect, now: i64) -> Outcome {
    let mut checks = Vec::new();
    let (token, notes) = clean(raw);
    let (header, claims) = match decode(&token) {
        Ok(hc) => hc,
        Err(why) => {
            checks.push(
                Check::fail("token.format", format!("malformed token: {why}")).details(notes),
            );
            return Outcome {
                header: None,
                claims: None,
                checks,
            };
        }
    };
    checks.push(
        Check::pass(
            "token.format",
            format!(
                "a signed JWT (header {}, {} claims)",
                serde_json::to_string(&header).unwrap_or_default(),
                claims.as_object().map_or(0, |o| o.len())
            ),
        )
        .details(notes),
    );
    let alg = str_of(&header, "alg").unwrap_or("").to_string();
    let alg_ok = ACCEPTED_ALGS.contains(&alg.as_str());
    checks.push(match alg.as_str() {
        a if ACCEPTED_ALGS.contains(&a) => Check::pass("token.algorithm", format!("alg {a}")),
        "" | "none" => Check::fail(
            "token.algorithm",
            "wrong algorithm: the header has no alg (or \"none\"): an unsigned token, refused by every relying party",
        ),
        a if a.starts_with("HS") => Check::fail(
            "token.algorithm",
            format!("wrong algorithm: {a} is a shared-secret MAC; relying parties verify service-account tokens with the published public keys (RS256 or ES256)"),
        ),
        a => Check::fail(
            "token.algorithm",
            format!("wrong algorithm: {a} is not accepted (AWS STS: RS256, RS384, RS512, ES256, ES384, ES512; kube-apiserver signs RS256 or ES256/384/512)"),
        ),
    });

    // The key, by kid.
    let kid = str_of(&header, "kid").map(String::from);
    let candidates: Vec<&Value> = match &kid {
        Some(k) => keys
            .jwks
            .iter()
            .filter(|j| str_of(j, "kid") == Some(k))
            .collect(),
        None => keys.jwks.iter().collect(),
    };
    let key = match (&kid, candidates.as_slice()) {
        (Some(k), []) => {
            let known: Vec<String> = keys
                .jwks
                .iter()
                .filter_map(|j| str_of(j, "kid").map(String::from))
                .collect();
            let mut finding = format!(
                "unknown kid {k}: the key that signed this token is not in {} (it has {})",
                keys.source,
                list(&known)
            );
            let mut fix = None;
            if let Some(l) = local.iter().find(|l| &l.kid == k) {
                if keys.published {
                    finding.push_str(&format!(
                        "; this host's key file {} holds it, so the published JWKS is stale",
                        l.file
                    ));
                    fix = Some("`irsa-agent publish`, then wait for caches (`irsa-agent doctor` shows how long)".to_string());
                }
            } else if !local.is_empty() {
                finding.push_str(
                    "; this host's key files do not hold it either: it was signed by another cluster, or by a control-plane node with other keys (`irsa-agent doctor`, running.peers)",
                );
            }
            let mut check = Check::fail("token.kid", finding);
            if let Some(f) = fix {
                check = check.fix(f);
            }
            checks.push(check);
            None
        }
        (Some(k), [one, ..]) => {
            checks.push(Check::pass(
                "token.kid",
                format!("kid {k} is in {}", keys.source),
            ));
            Some(*one)
        }
        (None, _) => {
            checks.push(Check::warn(
                "token.kid",
                "the header has no kid: relying parties must try every key (kube-apiserver always sets one)",
            ));
            candidates
                .iter()
                .copied()
                .find(|j| alg_ok && verify_signature(&token, &alg, j).is_ok())
        }
    };

    // Algorithm against the key, then the signature.
    match key {
        Some(jwk) if alg_ok => {
            let (kty, crv) = needs(&alg);
            let has_kty = str_of(jwk, "kty").unwrap_or("");
            let has_crv = str_of(jwk, "crv");
            let jwk_alg = str_of(jwk, "alg");
            let type_ok = has_kty == kty && (crv.is_none() || has_crv == crv);
            if !type_ok {
                checks.push(Check::fail(
                    "token.key-type",
                    format!(
                        "wrong algorithm: the token says {alg}, which needs an {kty}{} key, but key {} is {has_kty}{} (its algorithm is {})",
                        crv.map(|c| format!(" {c}")).unwrap_or_default(),
                        str_of(jwk, "kid").unwrap_or("?"),
                        has_crv.map(|c| format!(" {c}")).unwrap_or_default(),
                        jwk_alg.unwrap_or(natural_alg(jwk))
                    ),
                ));
            } else if let Some(ja) = jwk_alg.filter(|ja| *ja != alg) {
                checks.push(Check::fail(
                    "token.key-type",
                    format!("wrong algorithm: the token says {alg}, the key is published for {ja}"),
                ));
            } else {
                checks.push(Check::pass(
                    "token.key-type",
                    format!("{alg} fits the {has_kty} key"),
                ));
                checks.push(match verify_signature(&token, &alg, jwk) {
                    Ok(()) => Check::pass(
                        "token.signature",
                        format!("verified with key {}", str_of(jwk, "kid").unwrap_or("?")),
                    ),
                    Err(e) if e == "InvalidSignature" => Check::fail(
                        "token.signature",
                        format!(
                            "the signature does not verify with key {}: the token was altered, or signed by another key published under the same kid",
                            str_of(jwk, "kid").unwrap_or("?")
                        ),
                    ),
                    Err(e) => Check::fail("token.signature", format!("cannot verify: {e}")),
                });
            }
        }
        Some(_) => checks.push(Check::skip(
            "token.signature",
            "the algorithm is not one relying parties accept",
        )),
        None if kid.is_none() => checks.push(Check::fail(
            "token.signature",
            format!("no key in {} verifies the signature", keys.source),
        )),
        None => checks.push(Check::skip(
            "token.signature",
            "no key to verify with (see token.kid)",
        )),
    }

    checks.push(issuer_check(&claims, &expect.issuer));
    checks.push(audience_check(&claims, &expect.audience));
    checks.extend(time_checks(&claims, now));
    checks.push(subject_check(&claims));
    Outcome {
        header: Some(header),
        claims: Some(claims),
        checks,
    }
}

fn issuer_check(claims: &Value, expected: &str) -> Check {
    let id = "token.issuer";
    let Some(iss) = str_of(claims, "iss") else {
        return Check::fail(id, "no iss claim");
    };
    if iss == "kubernetes/serviceaccount" {
        return Check::fail(
            id,
            "a legacy Secret-based token (iss \"kubernetes/serviceaccount\", never expires): relying parties need a projected or TokenRequest token",
        )
        .fix("mount a projected serviceAccountToken volume with the audience the relying party expects, or use `kubectl create token`");
    }
    match words::difference(iss, expected) {
        None => Check::pass(id, format!("iss {iss:?} is the expected issuer")),
        Some(why) => {
            let mut check = Check::fail(
                id,
                format!(
                    "issuer mismatch: the token's iss {iss:?} is not the expected {expected:?}: it {why}"
                ),
            );
            if iss.starts_with("https://kubernetes.default.svc") {
                check = check.fix(
                    "the apiserver still signs with its default issuer: `irsa-agent apply` makes the public issuer sign; tokens already minted keep the old iss until the kubelet refreshes them",
                );
            } else {
                check = check.fix(format!(
                    "the first --service-account-issuer, the published discovery document and the relying party's provider URL must all be exactly {expected:?} (`irsa-agent doctor`)"
                ));
            }
            check
        }
    }
}

fn audience_check(claims: &Value, expected: &str) -> Check {
    let id = "token.audience";
    let auds = audiences(claims);
    if auds.is_empty() {
        return Check::fail(id, "no aud claim");
    }
    if auds.iter().any(|a| a == expected) {
        return Check::pass(id, format!("aud {} includes {expected}", list(&auds)));
    }
    let near: Vec<String> = auds
        .iter()
        .filter_map(|a| {
            words::near_miss(a, expected)
                .map(|why| format!("{a:?} looks like a typo of {expected:?}: it {why}"))
        })
        .collect();
    let mut finding = format!(
        "audience mismatch: the token is for {}, the relying party expects {expected:?}",
        list(&auds)
    );
    if !near.is_empty() {
        finding.push_str(&format!("; {}", near.join("; ")));
    } else if auds
        .iter()
        .any(|a| a.starts_with("https://kubernetes.default.svc") || a == "k3s" || a == "rke2")
    {
        finding.push_str("; this is a token for the Kubernetes API (like the default kube-api-access token), not one requested for this relying party");
    }
    Check::fail(id, finding).fix(format!(
        "request the token with audience {expected:?}: the projected serviceAccountToken volume's `audience:`, the pod identity webhook's token audience (eks.amazonaws.com/audience), or `kubectl create token SA --audience {expected}`"
    ))
}

fn time_checks(claims: &Value, now: i64) -> Vec<Check> {
    let id = "token.lifetime";
    let num = |k: &str| claims.get(k).and_then(|v| v.as_i64());
    let (exp, nbf, iat) = (num("exp"), num("nbf"), num("iat"));
    let skew_note = |delta: i64| {
        if delta.abs() <= 300 {
            " (that close, a clock difference between the minting host and the relying party explains it)"
        } else {
            ""
        }
    };
    let Some(exp) = exp else {
        return vec![Check::fail(
            id,
            "no exp claim: relying parties refuse tokens that never expire",
        )];
    };
    let at = |t: i64| format!("{} ({})", words::time(t), words::relative(t - now));
    let now_text = format!("now is {} here", words::time(now));
    if exp <= now {
        return vec![
            Check::fail(
                id,
                format!("expired at {}; {now_text}{}", at(exp), skew_note(now - exp)),
            )
            .fix("use a fresh token: the kubelet refreshes projected tokens at 80% of their lifetime; a process that read the file once must re-read it"),
        ];
    }
    if let Some(nbf) = nbf.filter(|n| *n > now) {
        return vec![
            Check::fail(
                id,
                format!(
                    "not valid yet: nbf is {}; {now_text}: the clock where it was minted is at least {} ahead of this host's{}",
                    at(nbf),
                    words::duration(std::time::Duration::from_secs((nbf - now).unsigned_abs())),
                    skew_note(nbf - now)
                ),
            )
            .fix("sync the clocks: timedatectl set-ntp true (on the control-plane nodes and here)"),
        ];
    }
    if let Some(iat) = iat.filter(|i| *i > now + 60) {
        return vec![
            Check::warn(
                id,
                format!(
                    "issued in the future: iat is {}; {now_text}: the clocks disagree",
                    at(iat)
                ),
            )
            .fix("sync the clocks: timedatectl set-ntp true"),
        ];
    }
    let lifetime = iat
        .map(|i| {
            format!(
                ", lifetime {}",
                words::duration(std::time::Duration::from_secs((exp - i).unsigned_abs()))
            )
        })
        .unwrap_or_default();
    vec![Check::pass(
        id,
        format!(
            "valid{} until {}{lifetime}",
            nbf.or(iat)
                .map(|t| format!(" from {}", words::time(t)))
                .unwrap_or_default(),
            at(exp)
        ),
    )]
}

/// `system:serviceaccount:<namespace>:<name>` split.
pub fn service_account(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

fn subject_check(claims: &Value) -> Check {
    let id = "token.subject";
    let Some(sub) = str_of(claims, "sub") else {
        return Check::fail(id, "no sub claim");
    };
    match service_account(sub) {
        Some((ns, name)) => {
            let pod = claims
                .pointer("/kubernetes.io/pod/name")
                .and_then(|p| p.as_str())
                .map(|p| format!(", pod {p}"))
                .unwrap_or_default();
            Check::pass(id, format!("service account {ns}/{name}{pod} ({sub})"))
        }
        None => Check::warn(
            id,
            format!(
                "sub {sub:?} is not a service account (system:serviceaccount:<namespace>:<name>)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_tokens_are_named() {
        assert!(decode("abc").unwrap_err().contains("3 parts"));
        assert!(decode("a.b.c.d.e").unwrap_err().contains("JWE"));
        assert!(decode("e30.e30.").unwrap_err().contains("unsigned"));
        assert!(decode("e30=.e30.c2ln").unwrap_err().contains("padding"));
        assert!(
            decode("bm90IGpzb24.e30.c2ln")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(decode("e30.e30.c2ln").is_ok());
        let (t, notes) = clean("  Bearer e30.e30.c2ln\n");
        assert_eq!(t, "e30.e30.c2ln");
        assert_eq!(notes.len(), 2);
    }

    /// jsonwebtoken has no ES512: P-521 keys (which kube-apiserver supports) go through p521.
    #[test]
    fn es512_tokens_verify_and_tampering_is_caught() {
        use p521::ecdsa::signature::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = p521::ecdsa::SigningKey::from_slice(&[1u8; 66]).expect("scalar");
        let point = p521::ecdsa::VerifyingKey::from(&key).to_encoded_point(false);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-521", "kid": "k", "alg": "ES512",
            "x": b64.encode(point.x().expect("x")), "y": b64.encode(point.y().expect("y"))});
        let header = b64.encode(r#"{"alg":"ES512","kid":"k"}"#);
        let now = 1_795_000_000i64;
        let claims = serde_json::json!({"iss": "https://x.example", "aud": "sts.amazonaws.com",
            "sub": "system:serviceaccount:a:b", "exp": now + 60});
        let payload = b64.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let sig: p521::ecdsa::Signature = key.sign(signed.as_bytes());
        let token = format!("{signed}.{}", b64.encode(sig.to_bytes()));
        let keys = KeySet {
            source: "test".into(),
            jwks: vec![jwk],
            published: true,
        };
        let expect = Expect {
            issuer: "https://x.example".into(),
            audience: "sts.amazonaws.com".into(),
        };
        let outcome = verify(&token, &keys, &[], &expect, now);
        assert!(outcome.ok(), "{:#?}", outcome.checks);
        let forged = format!(
            "{header}.{}.{}",
            b64.encode(claims.to_string().replace("a:b", "a:c")),
            b64.encode(sig.to_bytes())
        );
        let outcome = verify(&forged, &keys, &[], &expect, now);
        assert!(
            outcome
                .checks
                .iter()
                .any(|c| c.id == "token.signature" && c.status == Status::Fail)
        );
    }

    #[test]
    fn service_accounts() {
        assert_eq!(
            service_account("system:serviceaccount:default:app"),
            Some(("default", "app"))
        );
        assert_eq!(service_account("system:serviceaccount:default"), None);
        assert_eq!(service_account("user"), None);
    }
}
