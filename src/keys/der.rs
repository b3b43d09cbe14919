//! DER parsers mirroring Go's `crypto/x509` functions that client-go's keyutil calls:
//! `ParsePKCS1PrivateKey`, `ParsePKCS8PrivateKey`, `ParsePKIXPublicKey`, `ParseCertificate`
//! and `ParseECPrivateKey`, with Go's acceptance rules (NULL parameters on RSA SPKI, named
//! curves only, uncompressed EC points, CRT consistency of RSA private keys, ...).
//!
//! Each parser returns a [`Parsed`] on success; on failure it returns a [`Refusal`] that says
//! what the bytes were, so the caller can explain a skipped block in words.

use der::{Decode, Encode, asn1::AnyRef, asn1::BitStringRef, asn1::UintRef};
use rsa::BigUint;
use spki::{AlgorithmIdentifierRef, ObjectIdentifier, SubjectPublicKeyInfoRef};
use zeroize::Zeroizing;

use super::{Curve, PublicKey};

pub const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
pub const OID_RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
pub const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
pub const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
pub const OID_ED448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.113");
pub const OID_X25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");
pub const OID_X448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.111");
pub const OID_DSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10040.4.1");
pub const OID_P224: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.33");
pub const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
pub const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
pub const OID_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
pub const OID_SECP256K1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.10");

/// Why some bytes are not a key the apiserver can use. Used for explanations only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A PKCS#1 `RSAPublicKey` (`RSA PUBLIC KEY`): Go's keyutil never tries this format.
    RsaPublicPkcs1,
    /// A PKCS#8 EC private key: keyutil only reads SEC1 EC private keys as verification keys.
    EcPkcs8Private,
    /// Ed25519 / Ed448 / X25519 / X448 keys.
    EdwardsOrMontgomery(&'static str),
    /// A DSA key.
    Dsa,
    /// RSASSA-PSS keys (Go's x509 does not parse them).
    RsaPss,
    /// A NIST or other curve the apiserver does not sign or publish with.
    UnsupportedCurve(String),
    /// `ENCRYPTED PRIVATE KEY` or a legacy `Proc-Type: 4,ENCRYPTED` PEM.
    Encrypted,
    /// A certificate whose public key is not usable.
    Certificate(Box<Refusal>),
    /// Well-formed structure, but the key is invalid (bad RSA math, point off the curve, ...).
    Invalid(String),
    /// Not a key at all (EC PARAMETERS, garbage, an unknown structure).
    NotAKey,
}

/// A private key with the material needed to sign tokens later.
#[derive(Clone)]
pub enum PrivateKey {
    /// The PKCS#1 `RSAPrivateKey` DER (validated).
    Rsa(Zeroizing<Vec<u8>>),
    /// A scalar of exactly the curve's size (validated: non-zero and below the group order).
    Ec(Curve, Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivateKey::Rsa(_) => f.write_str("PrivateKey::Rsa(<redacted>)"),
            PrivateKey::Ec(c, _) => write!(f, "PrivateKey::Ec({c:?}, <redacted>)"),
        }
    }
}

fn curve_from_oid(oid: &ObjectIdentifier) -> Result<Curve, Refusal> {
    match *oid {
        OID_P256 => Ok(Curve::P256),
        OID_P384 => Ok(Curve::P384),
        OID_P521 => Ok(Curve::P521),
        OID_P224 => Err(Refusal::UnsupportedCurve("P-224".into())),
        OID_SECP256K1 => Err(Refusal::UnsupportedCurve("secp256k1".into())),
        other => Err(Refusal::UnsupportedCurve(other.to_string())),
    }
}

/// Refusal for an algorithm OID that is not RSA or EC.
fn refusal_for_algorithm(oid: &ObjectIdentifier) -> Refusal {
    match *oid {
        OID_ED25519 => Refusal::EdwardsOrMontgomery("Ed25519"),
        OID_ED448 => Refusal::EdwardsOrMontgomery("Ed448"),
        OID_X25519 => Refusal::EdwardsOrMontgomery("X25519"),
        OID_X448 => Refusal::EdwardsOrMontgomery("X448"),
        OID_DSA => Refusal::Dsa,
        OID_RSA_PSS => Refusal::RsaPss,
        _ => Refusal::NotAKey,
    }
}

fn big(u: UintRef<'_>) -> BigUint {
    BigUint::from_bytes_be(u.as_bytes())
}

/// Go `x509.ParsePKCS1PrivateKey`, then the public half.
///
/// Checks what Go checks: version 0 (two primes; multi-prime keys are refused here), positive
/// values, public exponent in 2..=2^31-1, n = p*q, d*e = 1 mod p-1 and q-1, and the CRT values.
pub fn parse_pkcs1_private(der_bytes: &[u8]) -> Result<PublicKey, Refusal> {
    let key = pkcs1::RsaPrivateKey::from_der(der_bytes).map_err(|_| Refusal::NotAKey)?;
    if key.other_prime_infos.is_some() {
        return Err(Refusal::Invalid(
            "multi-prime RSA keys are not supported".into(),
        ));
    }
    let (n, e, d) = (
        big(key.modulus),
        big(key.public_exponent),
        big(key.private_exponent),
    );
    let (p, q) = (big(key.prime1), big(key.prime2));
    let zero = BigUint::from(0u8);
    let one = BigUint::from(1u8);
    if n == zero || d == zero || p == zero || q == zero {
        return Err(Refusal::Invalid(
            "RSA private key contains a zero value".into(),
        ));
    }
    if e < BigUint::from(2u8) || e > BigUint::from(0x7fff_ffffu32) {
        return Err(Refusal::Invalid("RSA public exponent out of range".into()));
    }
    if p <= one || q <= one || &p * &q != n {
        return Err(Refusal::Invalid(
            "RSA primes do not multiply to the modulus".into(),
        ));
    }
    let (pm1, qm1) = (&p - &one, &q - &one);
    let de = &d * &e;
    if &de % &pm1 != one || &de % &qm1 != one {
        return Err(Refusal::Invalid(
            "RSA private exponent does not match the public exponent".into(),
        ));
    }
    let crt_ok = big(key.exponent1) == &d % &pm1
        && big(key.exponent2) == &d % &qm1
        && (big(key.coefficient) * &q) % &p == one;
    if !crt_ok {
        return Err(Refusal::Invalid("RSA CRT values are inconsistent".into()));
    }
    rsa_public(key.modulus.as_bytes(), key.public_exponent.as_bytes())
}

/// Builds an RSA public key from minimal big-endian n and e.
fn rsa_public(n: &[u8], e: &[u8]) -> Result<PublicKey, Refusal> {
    if n.is_empty() || n.iter().all(|&b| b == 0) {
        return Err(Refusal::Invalid(
            "RSA modulus is not a positive number".into(),
        ));
    }
    // Go keeps E in an int: it must be positive and fit in 63 bits.
    if e.is_empty()
        || e.iter().all(|&b| b == 0)
        || e.len() > 8
        || (e.len() == 8 && e[0] & 0x80 != 0)
    {
        return Err(Refusal::Invalid(
            "RSA public exponent is not a positive 63-bit number".into(),
        ));
    }
    let strip = |b: &[u8]| {
        let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
        b[start..].to_vec()
    };
    let n = strip(n);
    let e = strip(e);
    let spki = encode_rsa_spki(&n, &e).map_err(|err| Refusal::Invalid(err.to_string()))?;
    Ok(PublicKey::Rsa { n, e, spki })
}

fn encode_rsa_spki(n: &[u8], e: &[u8]) -> der::Result<Vec<u8>> {
    let inner = pkcs1::RsaPublicKey {
        modulus: UintRef::new(n)?,
        public_exponent: UintRef::new(e)?,
    }
    .to_der()?;
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: OID_RSA,
            parameters: Some(AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&inner)?,
    }
    .to_der()
}

fn encode_ec_spki(curve: Curve, point: &[u8]) -> der::Result<Vec<u8>> {
    let curve_oid = curve.oid();
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: OID_EC,
            parameters: Some(AnyRef::from(&curve_oid)),
        },
        subject_public_key: BitStringRef::from_bytes(point)?,
    }
    .to_der()
}

/// Validates an uncompressed SEC1 point on `curve` (Go's `elliptic.Unmarshal` rules: only the
/// uncompressed form, on the curve, not the identity).
fn ec_public_from_point(curve: Curve, point: &[u8]) -> Result<PublicKey, Refusal> {
    let size = curve.field_size();
    if point.len() != 1 + 2 * size || point[0] != 0x04 {
        return Err(Refusal::Invalid(format!(
            "{} public key is not an uncompressed point",
            curve.name()
        )));
    }
    let on_curve = match curve {
        Curve::P256 => p256::PublicKey::from_sec1_bytes(point).is_ok(),
        Curve::P384 => p384::PublicKey::from_sec1_bytes(point).is_ok(),
        Curve::P521 => p521::PublicKey::from_sec1_bytes(point).is_ok(),
    };
    if !on_curve {
        return Err(Refusal::Invalid(format!(
            "{} public key point is not on the curve",
            curve.name()
        )));
    }
    let spki = encode_ec_spki(curve, point).map_err(|err| Refusal::Invalid(err.to_string()))?;
    Ok(PublicKey::Ec {
        curve,
        x: point[1..1 + size].to_vec(),
        y: point[1 + size..].to_vec(),
        spki,
    })
}

/// The public point for a private scalar of exactly the curve's size.
fn ec_point_from_scalar(curve: Curve, scalar: &[u8]) -> Result<Vec<u8>, Refusal> {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let bad = || Refusal::Invalid(format!("invalid {} private key value", curve.name()));
    Ok(match curve {
        Curve::P256 => p256::SecretKey::from_slice(scalar)
            .map_err(|_| bad())?
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
        Curve::P384 => p384::SecretKey::from_slice(scalar)
            .map_err(|_| bad())?
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
        Curve::P521 => p521::SecretKey::from_slice(scalar)
            .map_err(|_| bad())?
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec(),
    })
}

/// Go's `parseECPrivateKey(namedCurveOID, der)`: the curve comes from the PKCS#8 wrapper when
/// given, else from the SEC1 parameters; the public key is derived from the scalar (an embedded
/// public key is ignored, as Go does).
pub fn parse_sec1_private(
    der_bytes: &[u8],
    outer_curve: Option<ObjectIdentifier>,
) -> Result<(PublicKey, PrivateKey), Refusal> {
    let key = sec1::EcPrivateKey::from_der(der_bytes).map_err(|_| Refusal::NotAKey)?;
    let curve_oid = match outer_curve {
        Some(oid) => oid,
        None => key
            .parameters
            .and_then(|p| p.named_curve())
            .ok_or_else(|| {
                Refusal::Invalid(
                    "SEC1 EC private key without curve parameters (Go cannot tell its curve); rewrite it with: openssl ec -in FILE -out FILE.sec1".into(),
                )
            })?,
    };
    let curve = curve_from_oid(&curve_oid)?;
    let size = curve.field_size();
    let mut raw = key.private_key;
    while raw.len() > size {
        if raw[0] != 0 {
            return Err(Refusal::Invalid(format!(
                "{} private key is too long",
                curve.name()
            )));
        }
        raw = &raw[1..];
    }
    let mut scalar = Zeroizing::new(vec![0u8; size]);
    scalar[size - raw.len()..].copy_from_slice(raw);
    let point = ec_point_from_scalar(curve, &scalar)?;
    let public = ec_public_from_point(curve, &point)?;
    Ok((public, PrivateKey::Ec(curve, scalar)))
}

/// What a PKCS#8 `PrivateKeyInfo` holds.
pub enum Pkcs8 {
    Rsa(PublicKey, PrivateKey),
    Ec(PublicKey, PrivateKey),
}

/// Go `x509.ParsePKCS8PrivateKey`.
pub fn parse_pkcs8_private(der_bytes: &[u8]) -> Result<Pkcs8, Refusal> {
    let info = match pkcs8::PrivateKeyInfo::from_der(der_bytes) {
        Ok(info) => info,
        Err(_) => return Err(Refusal::NotAKey),
    };
    match info.algorithm.oid {
        OID_RSA => {
            // Go refuses non-NULL parameters only implicitly; accept absent or NULL.
            let public = parse_pkcs1_private(info.private_key)?;
            Ok(Pkcs8::Rsa(
                public,
                PrivateKey::Rsa(Zeroizing::new(info.private_key.to_vec())),
            ))
        }
        OID_EC => {
            let curve_oid = info
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
            let (public, private) = parse_sec1_private(info.private_key, curve_oid)?;
            Ok(Pkcs8::Ec(public, private))
        }
        other => Err(refusal_for_algorithm(&other)),
    }
}

/// Go `x509.ParsePKIXPublicKey`, restricted to what keyutil keeps (RSA and EC).
pub fn parse_spki(der_bytes: &[u8]) -> Result<PublicKey, Refusal> {
    let spki = SubjectPublicKeyInfoRef::from_der(der_bytes).map_err(|_| Refusal::NotAKey)?;
    let key_bytes = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| Refusal::Invalid("public key bit string is not byte aligned".into()))?;
    match spki.algorithm.oid {
        OID_RSA => {
            if spki.algorithm.parameters != Some(AnyRef::NULL) {
                return Err(Refusal::Invalid("RSA key missing NULL parameters".into()));
            }
            let rsa = pkcs1::RsaPublicKey::from_der(key_bytes)
                .map_err(|_| Refusal::Invalid("invalid RSA public key".into()))?;
            rsa_public(rsa.modulus.as_bytes(), rsa.public_exponent.as_bytes())
        }
        OID_EC => {
            let curve_oid = spki
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or_else(|| Refusal::Invalid("invalid ECDSA parameters".into()))?;
            let curve = curve_from_oid(&curve_oid)?;
            ec_public_from_point(curve, key_bytes)
        }
        other => Err(refusal_for_algorithm(&other)),
    }
}

/// Go `x509.ParseCertificate(...).PublicKey`, restricted to RSA and EC.
pub fn parse_certificate(der_bytes: &[u8]) -> Result<PublicKey, Refusal> {
    let cert = x509_cert::Certificate::from_der(der_bytes).map_err(|_| Refusal::NotAKey)?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|_| Refusal::NotAKey)?;
    parse_spki(&spki).map_err(|r| match r {
        Refusal::NotAKey => Refusal::NotAKey,
        other => Refusal::Certificate(Box::new(other)),
    })
}

/// Recognises a PKCS#1 `RSAPublicKey` (only to explain why it is refused).
pub fn is_pkcs1_public(der_bytes: &[u8]) -> bool {
    pkcs1::RsaPublicKey::from_der(der_bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_key() {
        for data in [
            &b""[..],
            b"\x30",
            b"\x30\x00",
            b"\xff\xff\xff",
            b"\x06\x03\x2b\x65\x70",
        ] {
            assert!(parse_spki(data).is_err());
            assert!(parse_pkcs1_private(data).is_err());
            assert!(parse_pkcs8_private(data).is_err());
            assert!(parse_sec1_private(data, None).is_err());
            assert!(parse_certificate(data).is_err());
        }
    }
}
