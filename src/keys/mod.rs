//! Service-account key files, read exactly as kube-apiserver reads them.
//!
//! * [`parse_verification_keys`] is client-go's `keyutil.ParsePublicKeysPEM` (what
//!   `--service-account-key-file` does): every PEM block is tried whatever its label, as an RSA
//!   private key (PKCS#1, then PKCS#8), an RSA public key (SPKI or certificate), an EC private
//!   key (SEC1) and an EC public key (SPKI or certificate); blocks that are none of these are
//!   skipped; a file with no key at all is refused.
//! * [`parse_signing_key`] is `keyutil.ParsePrivateKeyPEM` plus the token generator's checks
//!   (what `--service-account-signing-key-file` does): here the label matters (`EC PRIVATE KEY`
//!   = SEC1, `RSA PRIVATE KEY` = PKCS#1, `PRIVATE KEY` = PKCS#8), the first private key wins,
//!   and only RSA and ECDSA P-256/P-384/P-521 can sign.
//!
//! Where the apiserver silently skips a block, we skip it too (the published JWKS must match the
//! apiserver's) but keep a [`Skipped`] note that explains it, so callers can warn or, when the
//! file is refused, say why and what to do.
//!
//! The JWKS and discovery document are rendered in [`jwks`].

pub mod der;
pub mod jwk;
pub mod jwks;
pub mod pem;
pub mod token;

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::Digest as _;

pub use self::der::{PrivateKey, Refusal};

/// The ECDSA curves kube-apiserver can sign and publish with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    /// Bytes of a field element (and of JWK `x`/`y`).
    pub fn field_size(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }
    /// The JWK `crv` value.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        }
    }
    pub fn alg(self) -> &'static str {
        match self {
            Curve::P256 => "ES256",
            Curve::P384 => "ES384",
            Curve::P521 => "ES512",
        }
    }
    pub fn oid(self) -> spki::ObjectIdentifier {
        match self {
            Curve::P256 => der::OID_P256,
            Curve::P384 => der::OID_P384,
            Curve::P521 => der::OID_P521,
        }
    }
}

/// A public key the apiserver accepts, with its canonical SubjectPublicKeyInfo DER (what Go's
/// `x509.MarshalPKIXPublicKey` produces, which is what the kid is computed over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        /// Modulus, big-endian, no leading zeros.
        n: Vec<u8>,
        /// Public exponent, big-endian, no leading zeros.
        e: Vec<u8>,
        spki: Vec<u8>,
    },
    Ec {
        curve: Curve,
        /// Coordinates, left-padded to the curve size.
        x: Vec<u8>,
        y: Vec<u8>,
        spki: Vec<u8>,
    },
}

impl PublicKey {
    /// The SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        match self {
            PublicKey::Rsa { spki, .. } | PublicKey::Ec { spki, .. } => spki,
        }
    }

    /// The key ID kube-apiserver uses: base64url, unpadded, of SHA-256 over the SPKI DER.
    pub fn kid(&self) -> String {
        let digest = sha2::Sha256::digest(self.spki_der());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    }

    /// The JWS algorithm: RSA keys always RS256, whatever their size.
    pub fn alg(&self) -> &'static str {
        match self {
            PublicKey::Rsa { .. } => "RS256",
            PublicKey::Ec { curve, .. } => curve.alg(),
        }
    }

    /// "RSA-2048", "EC P-256": for messages.
    pub fn describe(&self) -> String {
        match self {
            PublicKey::Rsa { n, .. } => {
                let bits = n.len() * 8 - n.first().map_or(0, |b| b.leading_zeros() as usize);
                format!("RSA-{bits}")
            }
            PublicKey::Ec { curve, .. } => format!("EC {}", curve.name()),
        }
    }

    /// PEM `PUBLIC KEY` (SPKI) text, the format every consumer accepts.
    pub fn to_spki_pem(&self) -> String {
        pem::encode("PUBLIC KEY", self.spki_der())
    }
}

/// A PEM block the apiserver skips, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based position of the block in the file.
    pub block: usize,
    pub label: String,
    pub reason: Refusal,
}

impl Skipped {
    /// True when the block looks like key material a user meant to be used (worth a warning).
    pub fn looks_like_a_key(&self) -> bool {
        !matches!(self.reason, Refusal::NotAKey) || self.label.contains("KEY")
    }
}

impl Skipped {
    /// The explanation with the file's path in the suggested commands.
    pub fn explain_for(&self, path: &Path) -> String {
        self.to_string()
            .replace("FILE", &path.display().to_string())
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.label == "OPENSSH PRIVATE KEY" {
            return write!(
                f,
                "block {} ({}): {OPENSSH_PRIVATE}",
                self.block, self.label
            );
        }
        write!(
            f,
            "block {} ({}): {}",
            self.block,
            self.label,
            explain(&self.reason)
        )
    }
}

/// The keys of one verification key file, in PEM-block order.
#[derive(Debug, Clone, Default)]
pub struct VerificationKeys {
    pub keys: Vec<PublicKey>,
    pub skipped: Vec<Skipped>,
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: kube-apiserver refuses this file as --service-account-key-file (\"data does not contain any valid RSA or ECDSA public keys\"){}", path.display(), if skipped.is_empty() { format!("\n  {NO_PEM_BLOCK}") } else { explain_skipped(path, skipped) })]
    NoVerificationKeys {
        path: PathBuf,
        skipped: Vec<Skipped>,
    },
    #[error("{}: kube-apiserver refuses this file: {}", path.display(), OPENSSH_PUBLIC.replace("FILE", &path.display().to_string()))]
    OpenSshPublicKey { path: PathBuf },
    #[error("{}: {}", path.display(), explain_unsupported_curve(curve))]
    UnsupportedCurve { path: PathBuf, curve: String },
    #[error("{}: kube-apiserver refuses this file as --service-account-signing-key-file: {reason}{}", path.display(), explain_skipped(path, skipped))]
    BadSigningKey {
        path: PathBuf,
        reason: String,
        skipped: Vec<Skipped>,
    },
}

/// ssh-keygen's own private key format, which kube-apiserver cannot read.
const OPENSSH_PRIVATE: &str = "an OpenSSH private key (ssh-keygen's default format); kube-apiserver reads only PEM keys; rewrite it as PEM in place with: ssh-keygen -p -m PEM -N '' -f FILE (copy it first; an RSA key becomes 'RSA PRIVATE KEY', an ECDSA key 'EC PRIVATE KEY'; Ed25519 keys cannot be used at all)";

/// An OpenSSH public key line (`ssh-rsa AAAA... comment`), as `ssh-keygen` writes `*.pub`.
pub fn is_openssh_public_key(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&data[..data.len().min(64)]);
    let text = text.trim_start();
    ["ssh-rsa ", "ecdsa-sha2-nistp", "ssh-ed25519 ", "ssh-dss "]
        .iter()
        .any(|p| text.starts_with(p))
}

const OPENSSH_PUBLIC: &str = "an OpenSSH public key (the `ssh-rsa AAAA...` line ssh-keygen writes to *.pub), not PEM; kube-apiserver reads only PEM keys; convert it with: ssh-keygen -e -m PKCS8 -f FILE > FILE.pem (a 'PUBLIC KEY' block) and use FILE.pem";

const NO_PEM_BLOCK: &str =
    "the file holds no PEM block at all (is it empty, DER, or base64 without BEGIN/END lines?)";

fn explain_skipped(path: &Path, skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(|s| format!("\n  {}", s.explain_for(path)))
        .collect()
}

fn explain_unsupported_curve(curve: &str) -> String {
    format!(
        "holds an ECDSA key on curve {curve}: kube-apiserver can sign and publish only P-256, P-384 and P-521 (ES256/ES384/ES512) and would stop serving its discovery endpoints; replace it with an RSA-2048 key (Azure accepts only RS256) or a P-256 key"
    )
}

/// Explains a refusal in words, with the fix.
pub fn explain(reason: &Refusal) -> String {
    match reason {
        Refusal::RsaPublicPkcs1 => "a PKCS#1 RSA public key; kube-apiserver reads only SubjectPublicKeyInfo ('PUBLIC KEY') public keys; convert it with: openssl rsa -RSAPublicKey_in -in FILE -pubout -out FILE.pub".into(),
        Refusal::EcPkcs8Private => "a PKCS#8 EC private key (OpenSSL 3's default); kube-apiserver reads EC private keys as verification keys only in SEC1 form ('EC PRIVATE KEY'); convert it with: openssl ec -in FILE -out FILE.sec1, or give its public half: openssl pkey -in FILE -pubout".into(),
        Refusal::EdwardsOrMontgomery(kind) => format!("an {kind} key; kube-apiserver supports only RSA and ECDSA P-256/P-384/P-521 service-account keys; generate an RSA-2048 key (openssl genrsa -traditional 2048) or a P-256 key (openssl ecparam -name prime256v1 -genkey -noout)"),
        Refusal::Dsa => "a DSA key; kube-apiserver supports only RSA and ECDSA service-account keys".into(),
        Refusal::RsaPss => "an RSASSA-PSS key; kube-apiserver reads only plain rsaEncryption RSA keys; generate one with openssl genrsa -traditional 2048".into(),
        Refusal::UnsupportedCurve(curve) => format!("an ECDSA key on curve {curve}; kube-apiserver supports only P-256, P-384 and P-521"),
        Refusal::Encrypted => "an encrypted private key; kube-apiserver cannot read encrypted keys; decrypt it with: openssl pkey -in FILE -out FILE.plain".into(),
        Refusal::Certificate(inner) => format!("a certificate whose public key is {}", explain(inner)),
        Refusal::Invalid(why) => format!("an invalid key: {why}"),
        Refusal::NotAKey => "not a key (ignored)".into(),
    }
}

/// One verification key file's keys, as `keyutil.ParsePublicKeysPEM` returns them.
///
/// Errors only when the apiserver would refuse the file (no usable key), or when it holds a
/// P-224 key, which the apiserver parses but cannot publish (its discovery endpoints go dark).
pub fn parse_verification_keys(data: &[u8]) -> Result<VerificationKeys, Refusal> {
    let mut out = VerificationKeys::default();
    for (i, block) in pem::blocks(data).into_iter().enumerate() {
        let attempt = if is_encrypted(&block) {
            Err(Refusal::Encrypted)
        } else {
            verification_key_from_block(&block.der)
        };
        match attempt {
            Ok(key) => out.keys.push(key),
            Err(reason) => out.skipped.push(Skipped {
                block: i + 1,
                label: block.label_str(),
                reason,
            }),
        }
    }
    Ok(out)
}

/// An encrypted private key (PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's legacy
/// `Proc-Type: 4,ENCRYPTED` header). The apiserver cannot read either.
fn is_encrypted(block: &pem::Block) -> bool {
    block.label == b"ENCRYPTED PRIVATE KEY"
        || block
            .headers
            .iter()
            .any(|(k, v)| k == "Proc-Type" && v.contains("ENCRYPTED"))
}

/// The four attempts of `ParsePublicKeysPEM` on one block, in its order.
fn verification_key_from_block(der_bytes: &[u8]) -> Result<PublicKey, Refusal> {
    // 1. RSA private key: PKCS#1, then PKCS#8 holding RSA.
    let pkcs1 = der::parse_pkcs1_private(der_bytes);
    if let Ok(key) = pkcs1 {
        return Ok(key);
    }
    let pkcs8 = der::parse_pkcs8_private(der_bytes);
    if let Ok(der::Pkcs8::Rsa(key, _)) = pkcs8 {
        return Ok(key);
    }
    // 2. RSA public key (SPKI or certificate) and 4. EC public key share one parse here.
    let spki = der::parse_spki(der_bytes);
    if let Ok(key @ PublicKey::Rsa { .. }) = &spki {
        return Ok(key.clone());
    }
    let cert = der::parse_certificate(der_bytes);
    if let Ok(key @ PublicKey::Rsa { .. }) = &cert {
        return Ok(key.clone());
    }
    // 3. EC private key, SEC1 only.
    let sec1 = der::parse_sec1_private(der_bytes, None);
    if let Ok((key, _)) = sec1 {
        return Ok(key);
    }
    if let Ok(key) = spki {
        return Ok(key);
    }
    if let Ok(key) = cert {
        return Ok(key);
    }
    // Not a key for the apiserver: work out the most useful explanation.
    if let Ok(der::Pkcs8::Ec(..)) = pkcs8 {
        return Err(Refusal::EcPkcs8Private);
    }
    if der::is_pkcs1_public(der_bytes) {
        return Err(Refusal::RsaPublicPkcs1);
    }
    let informative = |r: &Result<_, Refusal>| match r {
        Err(Refusal::NotAKey) | Ok(_) => None,
        Err(other) => Some(other.clone()),
    };
    informative(&pkcs1.map(|_| ()))
        .or_else(|| informative(&pkcs8.map(|_| ())))
        .or_else(|| informative(&spki.map(|_| ())))
        .or_else(|| informative(&cert.map(|_| ())))
        .or_else(|| informative(&sec1.map(|_| ())))
        .map_or(Err(Refusal::NotAKey), Err)
}

fn read(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    crate::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks a parsed verification file the way the apiserver would use it.
pub fn check_verification_file(
    path: &Path,
    parsed: VerificationKeys,
) -> Result<VerificationKeys, KeyFileError> {
    if let Some(curve) = parsed.skipped.iter().find_map(|s| match &s.reason {
        Refusal::UnsupportedCurve(c) if c == "P-224" => Some(c.clone()),
        Refusal::Certificate(inner) => match inner.as_ref() {
            Refusal::UnsupportedCurve(c) if c == "P-224" => Some(c.clone()),
            _ => None,
        },
        _ => None,
    }) {
        // Go parses P-224 and then cannot build a JWK for it.
        return Err(KeyFileError::UnsupportedCurve {
            path: path.to_path_buf(),
            curve,
        });
    }
    if parsed.keys.is_empty() {
        return Err(KeyFileError::NoVerificationKeys {
            path: path.to_path_buf(),
            skipped: parsed.skipped,
        });
    }
    Ok(parsed)
}

/// Reads one `--service-account-key-file`.
pub fn load_verification_file(path: &Path) -> Result<VerificationKeys, KeyFileError> {
    let data = read(path)?;
    let parsed = parse_verification_keys(&data).unwrap_or_default();
    if parsed.keys.is_empty() && parsed.skipped.is_empty() && is_openssh_public_key(&data) {
        return Err(KeyFileError::OpenSshPublicKey {
            path: path.to_path_buf(),
        });
    }
    check_verification_file(path, parsed)
}

/// The key the apiserver signs with.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub public: PublicKey,
    pub private: PrivateKey,
}

/// `keyutil.ParsePrivateKeyPEM` followed by the token generator's type checks.
pub fn parse_signing_key(data: &[u8]) -> Result<SigningKey, (String, Vec<Skipped>)> {
    let mut skipped = Vec::new();
    for (i, block) in pem::blocks(data).into_iter().enumerate() {
        let attempt: Result<(PublicKey, PrivateKey), Refusal> = match block.label.as_slice() {
            _ if is_encrypted(&block) => Err(Refusal::Encrypted),
            b"EC PRIVATE KEY" => der::parse_sec1_private(&block.der, None),
            b"RSA PRIVATE KEY" => der::parse_pkcs1_private(&block.der).map(|public| {
                (
                    public,
                    PrivateKey::Rsa(zeroize::Zeroizing::new(block.der.clone())),
                )
            }),
            b"PRIVATE KEY" => der::parse_pkcs8_private(&block.der).map(|k| match k {
                der::Pkcs8::Rsa(public, private) | der::Pkcs8::Ec(public, private) => {
                    (public, private)
                }
            }),
            _ => Err(Refusal::NotAKey),
        };
        match attempt {
            Ok((public, private)) => return Ok(SigningKey { public, private }),
            // Parsed by Go but then refused by the token generator: stop here, as it does.
            Err(Refusal::EdwardsOrMontgomery(kind)) if block.label == b"PRIVATE KEY" => {
                return Err((
                    format!(
                        "the first private key is {kind}; kube-apiserver signs only with RSA or ECDSA P-256/P-384/P-521 keys"
                    ),
                    Vec::new(),
                ));
            }
            Err(Refusal::UnsupportedCurve(curve)) if curve == "P-224" => {
                return Err((
                    "the first private key is on curve P-224; kube-apiserver signs only with P-256, P-384 or P-521".into(),
                    Vec::new(),
                ));
            }
            Err(reason) => {
                let reason = match (&reason, block.label.as_slice()) {
                    (Refusal::NotAKey, b"PUBLIC KEY" | b"CERTIFICATE" | b"RSA PUBLIC KEY") => {
                        Refusal::Invalid("a public key or certificate cannot sign; give the private key".into())
                    }
                    (Refusal::NotAKey, label) if !label.ends_with(b"PRIVATE KEY") && label.ends_with(b"KEY") => {
                        Refusal::Invalid("kube-apiserver reads signing keys only from blocks labelled 'EC PRIVATE KEY', 'RSA PRIVATE KEY' or 'PRIVATE KEY'".into())
                    }
                    _ => reason,
                };
                skipped.push(Skipped {
                    block: i + 1,
                    label: block.label_str(),
                    reason,
                });
            }
        }
    }
    let reason = if skipped.is_empty() {
        NO_PEM_BLOCK.to_string()
    } else {
        "it contains no valid RSA or ECDSA private key".to_string()
    };
    Err((reason, skipped))
}

/// Reads a `--service-account-signing-key-file`.
pub fn load_signing_file(path: &Path) -> Result<SigningKey, KeyFileError> {
    let data = read(path)?;
    parse_signing_key(&data).map_err(|(reason, skipped)| {
        let reason = if skipped.is_empty() && is_openssh_public_key(&data) {
            "it is an OpenSSH public key (an `ssh-rsa AAAA...` line), and a public key cannot sign; give the private key in PEM form (ssh-keygen -p -m PEM -N '' -f PRIVATE_KEY rewrites an OpenSSH private key as PEM)".to_string()
        } else {
            reason
        };
        KeyFileError::BadSigningKey {
            path: path.to_path_buf(),
            reason,
            skipped,
        }
    })
}

/// Concatenates the keys of several files in flag order (what the apiserver verifies with).
pub fn load_verification_files(paths: &[PathBuf]) -> Result<Vec<PublicKey>, Vec<KeyFileError>> {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match load_verification_file(path) {
            Ok(parsed) => keys.extend(parsed.keys),
            Err(err) => errors.push(err),
        }
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(errors)
    }
}

/// Removes repeated keys (same kid), keeping the first occurrence.
pub fn dedup(keys: &[PublicKey]) -> Vec<PublicKey> {
    let mut seen = std::collections::HashSet::new();
    keys.iter()
        .filter(|k| seen.insert(k.kid()))
        .cloned()
        .collect()
}

/// Appends the keys of `more` whose kid `keys` does not have yet (in their order); returns
/// the kids appended.
pub fn add_missing(keys: &mut Vec<PublicKey>, more: Vec<PublicKey>) -> Vec<String> {
    let mut added = Vec::new();
    for key in more {
        let kid = key.kid();
        if !keys.iter().any(|k| k.kid() == kid) {
            added.push(kid);
            keys.push(key);
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_kid_test_vector() {
        // kubernetes pkg/serviceaccount/keyid_test.go: this RSA public key must give this kid.
        let pem = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA249XwEo9k4tM8fMxV7zx
OhcrP+WvXn917koM5Qr2ZXs4vo26e4ytdlrV0bQ9SlcLpQVSYjIxNfhTZdDt+ecI
zshKuv1gKIxbbLQMOuK1eA/4HALyEkFgmS/tleLJrhc65tKPMGD+pKQ/xhmzRuCG
51RoiMgbQxaCyYxGfNLpLAZK9L0Tctv9a0mJmGIYnIOQM4kC1A1I1n3EsXMWmeJU
j7OTh/AjjCnMnkgvKT2tpKxYQ59PgDgU8Ssc7RDSmSkLxnrv+OrN80j6xrw0OjEi
B4Ycr0PqfzZcvy8efTtFQ/Jnc4Bp1zUtFXt7+QeevePtQ2EcyELXE0i63T1CujRM
WwIDAQAB
-----END PUBLIC KEY-----
";
        let parsed = parse_verification_keys(pem.as_bytes()).unwrap_or_default();
        assert_eq!(parsed.keys.len(), 1, "{:?}", parsed.skipped);
        assert_eq!(
            parsed.keys[0].kid(),
            "JHJehTTTZlsspKHT-GaJxK7Kd1NQgZJu3fyK6K_QDYU"
        );
    }
}
