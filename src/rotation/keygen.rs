//! Generating the next signing key, in a form kube-apiserver (and k3s) accept as both a
//! `--service-account-key-file` and a `--service-account-signing-key-file`:
//!
//! - RSA as PKCS#1 (`RSA PRIVATE KEY`, what `openssl genrsa -traditional` writes and what the
//!   k3s docs ask for in `service.key`);
//! - ECDSA P-256 as SEC1 (`EC PRIVATE KEY`) with the curve's OID in the parameters (kube-apiserver
//!   refuses PKCS#8 EC keys as verification keys).
//!
//! The PEM is re-read with [`keys::parse_signing_key`] and [`keys::parse_verification_keys`]
//! (the apiserver's own rules) before anything trusts it; the two must agree on the key.

use rsa::pkcs1::EncodeRsaPrivateKey as _;
use zeroize::Zeroizing;

use crate::config::KeyType;
use crate::keys::{self, PublicKey, SigningKey, pem};

/// A freshly generated key: its PEM (a secret) and what the apiserver will make of it.
pub struct NewKey {
    /// The private key PEM, exactly as written to disk.
    pub pem: Zeroizing<String>,
    pub signing: SigningKey,
}

impl NewKey {
    pub fn public(&self) -> &PublicKey {
        &self.signing.public
    }
    pub fn kid(&self) -> String {
        self.signing.public.kid()
    }
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NewKey({}, kid {})",
            self.public().describe(),
            self.kid()
        )
    }
}

/// Why a key could not be generated or is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyGenError {
    #[error("cannot generate a {kind} key: {why}")]
    Generate { kind: &'static str, why: String },
    #[error("the generated {kind} key does not read back as kube-apiserver reads keys: {why}")]
    Check { kind: &'static str, why: String },
}

/// Generates a key of `kind`.
pub fn generate(kind: KeyType) -> Result<NewKey, KeyGenError> {
    let fail = |why: String| KeyGenError::Generate {
        kind: kind.name(),
        why,
    };
    let (label, der): (&str, Zeroizing<Vec<u8>>) = match kind {
        KeyType::Rsa2048 | KeyType::Rsa3072 => {
            let bits = if kind == KeyType::Rsa2048 { 2048 } else { 3072 };
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| fail(e.to_string()))?;
            let der = key.to_pkcs1_der().map_err(|e| fail(e.to_string()))?;
            ("RSA PRIVATE KEY", Zeroizing::new(der.as_bytes().to_vec()))
        }
        KeyType::EcdsaP256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint as _;
            let secret = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
            let scalar = Zeroizing::new(secret.to_bytes().to_vec());
            let point = secret.public_key().to_encoded_point(false);
            let der = sec1_der(&scalar, point.as_bytes()).map_err(fail)?;
            ("EC PRIVATE KEY", der)
        }
    };
    let pem = Zeroizing::new(pem::encode(label, &der));
    check(kind, pem)
}

/// SEC1 `ECPrivateKey` (RFC 5915) for P-256 with the named-curve parameters and the public key,
/// as `openssl ecparam -genkey -noout` writes it.
fn sec1_der(scalar: &[u8], public_point: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    use der::Encode as _;
    let params = sec1::EcParameters::NamedCurve(keys::Curve::P256.oid());
    let key = sec1::EcPrivateKey {
        private_key: scalar,
        parameters: Some(params),
        public_key: Some(public_point),
    };
    key.to_der().map(Zeroizing::new).map_err(|e| e.to_string())
}

/// Re-reads a key PEM the way the apiserver will, and checks both readings agree.
pub fn check(kind: KeyType, pem: Zeroizing<String>) -> Result<NewKey, KeyGenError> {
    let bad = |why: String| KeyGenError::Check {
        kind: kind.name(),
        why,
    };
    let signing = keys::parse_signing_key(pem.as_bytes())
        .map_err(|(why, _)| bad(format!("as a signing key: {why}")))?;
    let verification = keys::parse_verification_keys(pem.as_bytes()).unwrap_or_default();
    match verification.keys.as_slice() {
        [one] if one == &signing.public => {}
        other => {
            return Err(bad(format!(
                "as a verification key file it holds {} key(s) instead of the signing key",
                other.len()
            )));
        }
    }
    let expected = match kind {
        KeyType::Rsa2048 => "RSA-2048",
        KeyType::Rsa3072 => "RSA-3072",
        KeyType::EcdsaP256 => "EC P-256",
    };
    if signing.public.describe() != expected {
        return Err(bad(format!(
            "it is {} instead of {expected}",
            signing.public.describe()
        )));
    }
    Ok(NewKey { pem, signing })
}

/// Reads back a key written earlier (a resumed rotation), with the same checks.
pub fn load(kind: KeyType, pem_bytes: &[u8]) -> Result<NewKey, KeyGenError> {
    let text = String::from_utf8(pem_bytes.to_vec()).map_err(|_| KeyGenError::Check {
        kind: kind.name(),
        why: "it is not PEM text".into(),
    })?;
    check(kind, Zeroizing::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_read_back_as_the_apiserver_reads_them() -> Result<(), KeyGenError> {
        for kind in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let key = generate(kind)?;
            let label = if kind == KeyType::EcdsaP256 {
                "-----BEGIN EC PRIVATE KEY-----"
            } else {
                "-----BEGIN RSA PRIVATE KEY-----"
            };
            assert!(key.pem.starts_with(label), "{kind:?}");
            assert_eq!(key.kid().len(), 43);
            // Minted tokens carry the kid and verify with the public half.
            let token =
                keys::token::mint(&key.signing, &serde_json::json!({"sub": "x"})).map_err(|e| {
                    KeyGenError::Check {
                        kind: "test",
                        why: e.to_string(),
                    }
                })?;
            let header = jsonwebtoken::decode_header(&token).map_err(|e| KeyGenError::Check {
                kind: "test",
                why: e.to_string(),
            })?;
            assert_eq!(header.kid, Some(key.kid()));
            let again = load(kind, key.pem.as_bytes())?;
            assert_eq!(again.kid(), key.kid());
        }
        Ok(())
    }

    #[test]
    fn a_key_of_the_wrong_kind_is_refused() -> Result<(), KeyGenError> {
        let key = generate(KeyType::EcdsaP256)?;
        assert!(load(KeyType::Rsa2048, key.pem.as_bytes()).is_err());
        assert!(load(KeyType::EcdsaP256, b"not a key").is_err());
        Ok(())
    }
}
