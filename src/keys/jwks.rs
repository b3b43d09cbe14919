//! The JWKS and OIDC discovery document, byte for byte as kube-apiserver serves them.
//!
//! kube-apiserver marshals go-jose `JSONWebKey`s with Go's `encoding/json`: compact, fields in
//! the order `use, kty, kid, crv, alg, x, y, n, e` (empty ones omitted), unpadded base64url
//! values, `e` without leading zero bytes, EC coordinates padded to the curve size. The discovery
//! document is `issuer, jwks_uri, response_types_supported, subject_types_supported,
//! id_token_signing_alg_values_supported` with the algorithms sorted and de-duplicated. No
//! trailing newline. Strings are escaped as Go does (`<`, `>`, `&`, U+2028/9 as `\uXXXX`).

use base64::Engine as _;

use super::PublicKey;

/// Where the apiserver serves its JWKS, relative to the issuer.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Where the discovery document lives, relative to the issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The apiserver's `Content-Type` for the JWKS.
pub const JWKS_CONTENT_TYPE: &str = "application/jwk-set+json";
/// The apiserver's `Content-Type` for the discovery document.
pub const DISCOVERY_CONTENT_TYPE: &str = "application/json";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Appends `s` as a JSON string literal exactly as Go's `encoding/json` (HTML-safe) writes it.
pub fn push_go_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_field(out: &mut String, name: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    push_go_json_string(out, name);
    out.push(':');
    push_go_json_string(out, value);
}

/// One JWK as go-jose serializes it.
pub fn jwk_json(key: &PublicKey) -> String {
    let mut out = String::from("{");
    push_field(&mut out, "use", "sig");
    match key {
        PublicKey::Rsa { n, e, .. } => {
            push_field(&mut out, "kty", "RSA");
            push_field(&mut out, "kid", &key.kid());
            push_field(&mut out, "alg", key.alg());
            push_field(&mut out, "n", &b64url(n));
            push_field(&mut out, "e", &b64url(e));
        }
        PublicKey::Ec { curve, x, y, .. } => {
            push_field(&mut out, "kty", "EC");
            push_field(&mut out, "kid", &key.kid());
            push_field(&mut out, "crv", curve.name());
            push_field(&mut out, "alg", key.alg());
            push_field(&mut out, "x", &b64url(x));
            push_field(&mut out, "y", &b64url(y));
        }
    }
    out.push('}');
    out
}

/// `{"keys":[...]}` with the keys in the given order (no de-duplication here).
pub fn jwks_json(keys: &[PublicKey]) -> String {
    let mut out = String::from("{\"keys\":[");
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&jwk_json(key));
    }
    out.push_str("]}");
    out
}

/// The sorted, de-duplicated signing algorithms of `keys`.
pub fn algorithms(keys: &[PublicKey]) -> Vec<&'static str> {
    let mut algs: Vec<&'static str> = keys.iter().map(PublicKey::alg).collect();
    algs.sort_unstable();
    algs.dedup();
    algs
}

/// The default jwks-uri for an issuer: `<issuer>/openid/v1/jwks`.
pub fn default_jwks_uri(issuer: &str) -> String {
    format!("{issuer}{JWKS_PATH}")
}

/// The discovery document as kube-apiserver renders it.
pub fn discovery_json(issuer: &str, jwks_uri: &str, keys: &[PublicKey]) -> String {
    let mut out = String::from("{");
    push_field(&mut out, "issuer", issuer);
    push_field(&mut out, "jwks_uri", jwks_uri);
    out.push_str(
        ",\"response_types_supported\":[\"id_token\"],\"subject_types_supported\":[\"public\"],\"id_token_signing_alg_values_supported\":[",
    );
    for (i, alg) in algorithms(keys).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_go_json_string(&mut out, alg);
    }
    out.push_str("]}");
    out
}

/// The two documents the agent publishes for one issuer, already rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    /// The JWKS (each key once, in apiserver order).
    pub jwks: String,
    /// The discovery document.
    pub discovery: String,
    /// The kids in the JWKS, in order.
    pub kids: Vec<String>,
}

impl Documents {
    /// Renders both documents for `issuer`/`jwks_uri` from the apiserver's verification keys
    /// (in flag order); repeated keys are published once.
    pub fn build(issuer: &str, jwks_uri: &str, verification_keys: &[PublicKey]) -> Self {
        let keys = super::dedup(verification_keys);
        Documents {
            jwks: jwks_json(&keys),
            discovery: discovery_json(issuer, jwks_uri, &keys),
            kids: keys.iter().map(PublicKey::kid).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_string_escaping() {
        let mut s = String::new();
        push_go_json_string(&mut s, "a<b>&\"\\\n\u{1}\u{2028}é");
        assert_eq!(s, r#""a\u003cb\u003e\u0026\"\\\n\u0001\u2028é""#);
    }

    #[test]
    fn empty_set() {
        assert_eq!(jwks_json(&[]), r#"{"keys":[]}"#);
        assert_eq!(
            discovery_json("https://x", "https://x/j", &[]),
            r#"{"issuer":"https://x","jwks_uri":"https://x/j","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":[]}"#
        );
    }
}
