//! A JWKS read back into keys.
//!
//! Keys read back are re-parsed into [`PublicKey`]s (their SubjectPublicKeyInfo rebuilt from
//! `n`/`e` or `x`/`y` and checked as Go would), so a merged JWKS is rendered exactly like one of
//! our own, and a JWK whose `kid` does not match its key is ignored rather than republished.

use base64::Engine as _;
use der::Encode as _;
use der::asn1::{AnyRef, BitStringRef, UintRef};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

use super::{Curve, PublicKey, der as keyder};

fn b64(value: Option<&serde_json::Value>) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value?.as_str()?)
        .ok()
}

/// The `kid`s of a JWKS document, in order (empty when it is not a JWKS).
pub fn kids_in(bytes: &[u8]) -> Vec<String> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    doc.get("keys")
        .and_then(|k| k.as_array())
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.get("kid").and_then(|v| v.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn rsa_spki(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    let inner = pkcs1::RsaPublicKey {
        modulus: UintRef::new(n).ok()?,
        public_exponent: UintRef::new(e).ok()?,
    }
    .to_der()
    .ok()?;
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: keyder::OID_RSA,
            parameters: Some(AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&inner).ok()?,
    }
    .to_der()
    .ok()
}

fn ec_spki(curve: Curve, x: &[u8], y: &[u8]) -> Option<Vec<u8>> {
    let size = curve.field_size();
    if x.len() != size || y.len() != size {
        return None;
    }
    let mut point = vec![0x04];
    point.extend_from_slice(x);
    point.extend_from_slice(y);
    let curve_oid = curve.oid();
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: keyder::OID_EC,
            parameters: Some(AnyRef::from(&curve_oid)),
        },
        subject_public_key: BitStringRef::from_bytes(&point).ok()?,
    }
    .to_der()
    .ok()
}

/// One JWK back into a key; `None` for anything the apiserver would not have published.
pub fn key_from_jwk(jwk: &serde_json::Value) -> Option<PublicKey> {
    let spki = match jwk.get("kty")?.as_str()? {
        "RSA" => rsa_spki(&b64(jwk.get("n"))?, &b64(jwk.get("e"))?)?,
        "EC" => {
            let curve = match jwk.get("crv")?.as_str()? {
                "P-256" => Curve::P256,
                "P-384" => Curve::P384,
                "P-521" => Curve::P521,
                _ => return None,
            };
            ec_spki(curve, &b64(jwk.get("x"))?, &b64(jwk.get("y"))?)?
        }
        _ => return None,
    };
    let key = keyder::parse_spki(&spki).ok()?;
    // A JWK whose kid is not its key's kid did not come from an apiserver: do not keep it.
    (jwk.get("kid").and_then(|k| k.as_str()) == Some(key.kid().as_str())).then_some(key)
}

/// The keys of a JWKS document that can be re-published faithfully, in order.
pub fn keys_in(bytes: &[u8]) -> Vec<PublicKey> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    doc.get("keys")
        .and_then(|k| k.as_array())
        .map(|keys| keys.iter().filter_map(key_from_jwk).collect())
        .unwrap_or_default()
}
