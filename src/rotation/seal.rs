//! Sharing a rotation's new private key with the other kubeadm control-plane nodes.
//!
//! kubeadm gives every control-plane node the same `sa.key` (`kubeadm join --control-plane`
//! copies it, `kubeadm init --upload-certs` ships it in the `kubeadm-certs` Secret encrypted
//! with AES-GCM under a certificate key). A rotation on several kubeadm nodes does the same
//! with the new key: the driver seals it and stores the result in the Secret
//! `kube-system/irsa-agent-rotation-key`; every other node's agent opens it and installs the
//! key files itself ([`super::follow`]).
//!
//! The sealing key is derived (HKDF-SHA256) from the private keys every kubeadm control-plane
//! node already has: the `sa.key` it signs with, and the cluster CA's `ca.key` beside it (kubeadm
//! shares both). Only a node that holds them can open it, and such a node could already mint any
//! token and any client certificate: the Secret gives nobody anything new, and the private key
//! never crosses the network or rests in etcd in clear. Because of the CA key, a rotation made
//! because the old `sa.key` leaked does not hand the new key to whoever holds the leaked one and
//! can read the Secret (or an etcd backup). A cluster whose CA key is not on the nodes (an
//! external CA) is sealed with `sa.key` alone, and the agent says so. AES-256-GCM with a random
//! nonce; the rotation id, the new key's kid and the sealing keys' kids are bound as associated
//! data, so a blob cannot be replayed into another rotation. The opened key must have the
//! announced kid.
//!
//! The other design (each node its own key, every node verifying with all of them) was weighed
//! and not taken: it needs N keys in every JWKS, one kid per node in every phase of the machine,
//! and a node restored from a backup would sign with a key nobody else verifies; one shared key
//! keeps the rotation identical to k3s's, where the datastore shares `service.key`.

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keys::SigningKey;
use crate::keys::der::PrivateKey;

/// The Secret the sealed key is stored in, in [`crate::membership::NAMESPACE`].
pub const SECRET: &str = "irsa-agent-rotation-key";
/// The key of the Secret's data holding the [`Sealed`] document (JSON).
pub const SECRET_KEY: &str = "sealed.json";
const SALT: &[u8] = b"irsa-agent rotation key v1";

/// A rotation's new private key, sealed for the nodes that hold the current signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The rotation's id (`20261122T070542Z`): the key files are `sa-<id>.key|.pub`.
    pub rotation: String,
    pub new_kid: String,
    /// `rsa-2048`, `rsa-3072` or `ecdsa-p256`: how the opened key is checked.
    pub key_type: crate::config::KeyType,
    /// The new public key (SPKI PEM).
    pub new_public_pem: String,
    /// The kid of the key the sealing key was derived from (the signing key at the start).
    pub sealed_with: String,
    /// The kid (thumbprint of the public half) of the cluster CA's key that was derived from
    /// too; `None`: sealed with the signing key alone (no `ca.key` on the driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// base64 of the 12-byte nonce.
    pub nonce: String,
    /// base64 of the encrypted private key PEM with its tag.
    pub ciphertext: String,
}

/// Why a key cannot be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error(
        "the new key was sealed with the signing key {sealed_with}, and this node signs with {mine}: it does not share kubeadm's sa.key with the driver"
    )]
    OtherKey { sealed_with: String, mine: String },
    #[error(
        "the new key was sealed with the cluster CA key {sealed_with} too, and this node has {mine}: it does not share kubeadm's ca.key with the driver"
    )]
    OtherCa { sealed_with: String, mine: String },
    #[error("the sealed key does not open ({0})")]
    Open(String),
    #[error("cannot seal the new key ({0})")]
    Seal(String),
}

/// The cluster CA's private key beside `signing_file` (kubeadm: `/etc/kubernetes/pki/ca.key`
/// beside `sa.key`), read through the host root (bounded, no link followed); `None` when there is
/// none (an external CA).
pub fn ca_key(
    root: &crate::host::HostRoot,
    signing_file: &str,
) -> Result<Option<SigningKey>, String> {
    let path = std::path::Path::new(signing_file)
        .parent()
        .unwrap_or(std::path::Path::new("/etc/kubernetes/pki"))
        .join("ca.key");
    match std::fs::symlink_metadata(root.path(&path)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => crate::keys::load_signing_file(&root.path(&path))
            .map(Some)
            .map_err(|e| format!("{} ({e})", path.display())),
    }
}

/// The bytes every encoding of the same private key has in common.
fn key_material(key: &SigningKey) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    match &key.private {
        PrivateKey::Rsa(der) => {
            out.extend_from_slice(b"rsa:");
            out.extend_from_slice(der);
        }
        PrivateKey::Ec(curve, scalar) => {
            out.extend_from_slice(format!("ec:{curve:?}:").as_bytes());
            out.extend_from_slice(scalar);
        }
    }
    out
}

fn aead_key(
    old: &SigningKey,
    ca: Option<&SigningKey>,
    rotation: &str,
) -> Result<LessSafeKey, String> {
    let mut material = key_material(old);
    if let Some(ca) = ca {
        material.extend_from_slice(b"\nca:");
        material.extend_from_slice(&key_material(ca));
    }
    let prk = Salt::new(HKDF_SHA256, SALT).extract(&material);
    let info = [rotation.as_bytes()];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .map_err(|_| "HKDF refused the length".to_string())?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn aad(sealed: &Sealed) -> Vec<u8> {
    format!(
        "{}\n{}\n{}\n{}",
        sealed.rotation,
        sealed.new_kid,
        sealed.sealed_with,
        sealed.ca.as_deref().unwrap_or("")
    )
    .into_bytes()
}

/// Seals `private_pem` (the new key, kid `new_kid`) under a key derived from `old` (the signing
/// key every node has) and `ca` (the cluster CA's key, when the nodes have it).
pub fn seal(
    old: &SigningKey,
    ca: Option<&SigningKey>,
    rotation: &str,
    key_type: crate::config::KeyType,
    new_kid: &str,
    new_public_pem: &str,
    private_pem: &str,
) -> Result<Sealed, SealError> {
    let key = aead_key(old, ca, rotation).map_err(SealError::Seal)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Seal("no randomness".into()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut sealed = Sealed {
        rotation: rotation.to_string(),
        new_kid: new_kid.to_string(),
        key_type,
        new_public_pem: new_public_pem.to_string(),
        sealed_with: old.public.kid(),
        ca: ca.map(|c| c.public.kid()),
        nonce: b64.encode(nonce),
        ciphertext: String::new(),
    };
    let mut data = private_pem.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(&sealed)),
        &mut data,
    )
    .map_err(|_| SealError::Seal("AES-GCM refused".into()))?;
    sealed.ciphertext = b64.encode(&data);
    Ok(sealed)
}

/// Opens a sealed key with `mine`, the key this node signs with, and `ca`, the cluster CA's key
/// this node has; the PEM is checked to be the announced key (kid) before it is returned.
pub fn open(
    sealed: &Sealed,
    mine: &SigningKey,
    ca: Option<&SigningKey>,
) -> Result<super::keygen::NewKey, SealError> {
    if mine.public.kid() != sealed.sealed_with {
        return Err(SealError::OtherKey {
            sealed_with: sealed.sealed_with.clone(),
            mine: mine.public.kid(),
        });
    }
    let ca_kid = ca.map(|c| c.public.kid());
    if sealed.ca.is_some() && sealed.ca != ca_kid {
        return Err(SealError::OtherCa {
            sealed_with: sealed.ca.clone().unwrap_or_default(),
            mine: ca_kid.unwrap_or_else(|| "no ca.key".into()),
        });
    }
    let ca = if sealed.ca.is_some() { ca } else { None };
    let b64 = base64::engine::general_purpose::STANDARD;
    let nonce: [u8; NONCE_LEN] = b64
        .decode(&sealed.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| SealError::Open("the nonce is not 12 bytes of base64".into()))?;
    let mut data = Zeroizing::new(
        b64.decode(&sealed.ciphertext)
            .map_err(|e| SealError::Open(format!("the ciphertext is not base64: {e}")))?,
    );
    let key = aead_key(mine, ca, &sealed.rotation).map_err(SealError::Open)?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(sealed)),
            &mut data,
        )
        .map_err(|_| {
            SealError::Open("authentication failed: altered, or sealed for another rotation".into())
        })?;
    let pem = Zeroizing::new(
        String::from_utf8(plain.to_vec())
            .map_err(|_| SealError::Open("the opened key is not text".into()))?,
    );
    let key = super::keygen::check(sealed.key_type, pem)
        .map_err(|e| SealError::Open(format!("the opened key is unusable: {e}")))?;
    if key.kid() != sealed.new_kid {
        return Err(SealError::Open(format!(
            "the opened key is {}, not the announced {}",
            key.kid(),
            sealed.new_kid
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyType;
    use crate::rotation::keygen;

    fn pem_of(k: &keygen::NewKey) -> String {
        k.pem.to_string()
    }

    #[test]
    fn only_the_holder_of_the_signing_key_opens_the_new_key() {
        let old = keygen::generate(KeyType::EcdsaP256).expect("old");
        let ca = keygen::generate(KeyType::Rsa2048).expect("ca");
        let new = keygen::generate(KeyType::Rsa2048).expect("new");
        let public = new.public().to_spki_pem();
        let sealed = seal(
            &old.signing,
            Some(&ca.signing),
            "20261207T100000Z",
            KeyType::Rsa2048,
            &new.kid(),
            &public,
            &pem_of(&new),
        )
        .expect("sealed");
        // Nothing of the key is in the document.
        let doc = serde_json::to_string(&sealed).expect("json");
        assert!(!doc.contains("PRIVATE KEY"));
        let opened = open(&sealed, &old.signing, Some(&ca.signing)).expect("opened");
        assert_eq!(opened.pem.as_str(), pem_of(&new));
        // Another node's key does not.
        let other = keygen::generate(KeyType::EcdsaP256).expect("other");
        let err = open(&sealed, &other.signing, Some(&ca.signing)).expect_err("another key");
        assert!(matches!(err, SealError::OtherKey { .. }));
        // The refusal names both keys, so the node's agent can say which sa.key differs.
        assert!(err.to_string().contains(&old.kid()) && err.to_string().contains(&other.kid()));
        // The signing key alone does not open it: the cluster CA's key is needed too (a leaked
        // sa.key plus read access to the Secret gives nothing).
        let err = open(&sealed, &old.signing, None).expect_err("no CA key");
        assert!(matches!(err, SealError::OtherCa { .. }), "{err}");
        let other_ca = keygen::generate(KeyType::Rsa2048).expect("other CA");
        assert!(matches!(
            open(&sealed, &old.signing, Some(&other_ca.signing)),
            Err(SealError::OtherCa { .. })
        ));
        let mut no_ca = sealed.clone();
        no_ca.ca = None;
        assert!(matches!(
            open(&no_ca, &old.signing, None),
            Err(SealError::Open(_))
        ));
        // Claiming to be sealed with the other key does not help: the derived key differs.
        let mut forged = sealed.clone();
        forged.sealed_with = other.kid();
        assert!(matches!(
            open(&forged, &other.signing, Some(&ca.signing)),
            Err(SealError::Open(_))
        ));
        // Replayed into another rotation, or with another kid announced: refused.
        let mut replayed = sealed.clone();
        replayed.rotation = "20270101T000000Z".into();
        assert!(matches!(
            open(&replayed, &old.signing, Some(&ca.signing)),
            Err(SealError::Open(_))
        ));
        let mut renamed = sealed.clone();
        renamed.new_kid = "someone-elses".into();
        assert!(matches!(
            open(&renamed, &old.signing, Some(&ca.signing)),
            Err(SealError::Open(_))
        ));
        // A flipped bit: refused.
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut bytes = b64.decode(&sealed.ciphertext).expect("b64");
        bytes[3] ^= 1;
        let mut flipped = sealed.clone();
        flipped.ciphertext = b64.encode(bytes);
        assert!(matches!(
            open(&flipped, &old.signing, Some(&ca.signing)),
            Err(SealError::Open(_))
        ));
        // Two seals of the same key differ (random nonce).
        let again = seal(
            &old.signing,
            Some(&ca.signing),
            "20261207T100000Z",
            KeyType::Rsa2048,
            &new.kid(),
            &public,
            &pem_of(&new),
        )
        .expect("sealed");
        assert_ne!(again.ciphertext, sealed.ciphertext);
    }

    #[test]
    fn the_same_rsa_key_in_pkcs1_and_pkcs8_derives_the_same_sealing_key() {
        use rsa::pkcs8::EncodePrivateKey as _;
        let old = keygen::generate(KeyType::Rsa2048).expect("old");
        let PrivateKey::Rsa(der) = &old.signing.private else {
            panic!("rsa")
        };
        let rsa_key = <rsa::RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_der(der)
            .expect("der");
        let pkcs8_der = rsa_key.to_pkcs8_der().expect("pkcs8");
        let pkcs8_pem = crate::keys::pem::encode("PRIVATE KEY", pkcs8_der.as_bytes());
        let pkcs8 = crate::keys::parse_signing_key(pkcs8_pem.as_bytes()).expect("pkcs8");
        let new = keygen::generate(KeyType::EcdsaP256).expect("new");
        let sealed = seal(
            &old.signing,
            None,
            "r1",
            KeyType::EcdsaP256,
            &new.kid(),
            "",
            &pem_of(&new),
        )
        .expect("sealed");
        assert_eq!(
            open(&sealed, &pkcs8, None).expect("opened").pem.as_str(),
            pem_of(&new)
        );
    }
}
