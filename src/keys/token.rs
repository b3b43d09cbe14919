//! Minting service-account-style tokens with a cluster signing key, as kube-apiserver does:
//! the JWS header carries `alg` for the key type and `kid` = the key's kid.
//!
//! Used by `demo` (a token verified against the published JWKS), the self-issued web identity
//! (the agent proves itself to AWS STS with the cluster's own key), and the tests that check a
//! token keeps verifying through a rotation. Token bytes are secrets: never log them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey as _;

use super::{Curve, PrivateKey, SigningKey};

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "cannot mint tokens with a P-521 key here (ES512 is not supported by the JWT library); kube-apiserver itself still can"
    )]
    UnsupportedCurve,
    #[error("invalid signing key: {0}")]
    Key(String),
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

fn encoding_key(key: &SigningKey) -> Result<(Algorithm, EncodingKey), MintError> {
    match &key.private {
        PrivateKey::Rsa(pkcs1) => Ok((Algorithm::RS256, EncodingKey::from_rsa_der(pkcs1))),
        PrivateKey::Ec(curve, scalar) => {
            let der = match curve {
                Curve::P256 => p256::SecretKey::from_slice(scalar)
                    .map_err(|e| MintError::Key(e.to_string()))?
                    .to_pkcs8_der(),
                Curve::P384 => p384::SecretKey::from_slice(scalar)
                    .map_err(|e| MintError::Key(e.to_string()))?
                    .to_pkcs8_der(),
                Curve::P521 => return Err(MintError::UnsupportedCurve),
            }
            .map_err(|e| MintError::Key(e.to_string()))?;
            let alg = if *curve == Curve::P256 {
                Algorithm::ES256
            } else {
                Algorithm::ES384
            };
            Ok((alg, EncodingKey::from_ec_der(der.as_bytes())))
        }
    }
}

/// Signs `claims` (any JSON object: iss, sub, aud, exp, iat, nbf, ...) with `key`.
pub fn mint(key: &SigningKey, claims: &serde_json::Value) -> Result<String, MintError> {
    let (alg, encoding) = encoding_key(key)?;
    let mut header = Header::new(alg);
    header.kid = Some(key.public.kid());
    Ok(jsonwebtoken::encode(&header, claims, &encoding)?)
}
