//! The webhook's own CA and serving certificate: no cert-manager, no CSR.
//!
//! * **The CA** (ECDSA P-256, [`CA_LIFETIME`]) is generated on first use and kept with its key
//!   in `/var/lib/irsa-agent/webhook-ca.pem` (0600, written atomically). Its certificate is the
//!   registration's `caBundle`. With the API reachable the cluster's CA wins: the first agent
//!   puts its CA in a Secret every agent adopts ([`super::kube_sync::sync_ca`]), and the file
//!   becomes this host's copy of it (served from at boot, before the API answers). The rules
//!   below are then applied to the Secret, once for the cluster.
//! * **Replaced with an overlap.** When the newest CA has less than [`CA_RENEW_BEFORE`] left, a
//!   new one is added. Both are in the bundle at once; the new one signs serving certificates
//!   only after [`CA_PROPAGATION`], by when every registration carries it. An expired CA is
//!   dropped.
//! * **The serving certificate** (P-256, [`SERVING_LIFETIME`], never past its CA) is made in
//!   memory at start and again when it has less than [`SERVING_RENEW_BEFORE`] left or a newer
//!   CA has taken over signing. Names: 127.0.0.1, ::1, localhost and the configured address.
//!
//! Every function takes `now` (seconds since the Unix epoch), so the renewal rules are tested
//! without waiting.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use der::asn1::{GeneralizedTime, Ia5String, OctetString};
use der::{Decode as _, Encode as _};
use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rsa::rand_core::{OsRng, RngCore as _};
use spki::SubjectPublicKeyInfoOwned;
use x509_cert::Certificate;
use x509_cert::builder::{Builder as _, CertificateBuilder, Profile};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use crate::fs::{self, NewFile};
use crate::keys::pem;

const DAY: u64 = 86_400;
/// How long a CA is valid.
pub const CA_LIFETIME: u64 = 3 * 365 * DAY;
/// A new CA is added when the newest has less than this left.
pub const CA_RENEW_BEFORE: u64 = 180 * DAY;
/// How long a new CA is only in the bundle before it signs.
pub const CA_PROPAGATION: u64 = 7 * DAY;
/// How long a serving certificate is valid.
pub const SERVING_LIFETIME: u64 = 30 * DAY;
/// A serving certificate is replaced when it has less than this left.
pub const SERVING_RENEW_BEFORE: u64 = 10 * DAY;
/// Certificates start this much in the past (clocks of the apiserver and agent may differ a
/// little; they are on one host, but a VM clock can step).
const BACKDATE: u64 = 300;

/// The file (host path) holding the CAs and their keys.
pub const CA_FILE: &str = "/var/lib/irsa-agent/webhook-ca.pem";

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot build a certificate: {0}")]
    Build(String),
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
}

fn build_err(e: impl std::fmt::Display) -> CertError {
    CertError::Build(e.to_string())
}

/// One CA: its certificate and key.
#[derive(Clone)]
pub struct Authority {
    pub cert_der: Vec<u8>,
    key: SigningKey,
    pub not_before: u64,
    pub not_after: u64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A serving certificate and its key (PKCS#8 DER).
#[derive(Debug, Clone)]
pub struct Serving {
    pub cert_der: Vec<u8>,
    pub key_pkcs8_der: Vec<u8>,
    pub not_after: u64,
    /// The CA certificate that signed it.
    pub issuer_der: Vec<u8>,
}

/// The CAs in use, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Authorities {
    pub cas: Vec<Authority>,
}

fn validity(not_before: u64, not_after: u64) -> Result<Validity, CertError> {
    let t = |s: u64| {
        GeneralizedTime::from_unix_duration(Duration::from_secs(s))
            .map(Time::GeneralTime)
            .map_err(build_err)
    };
    Ok(Validity {
        not_before: t(not_before)?,
        not_after: t(not_after)?,
    })
}

fn serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).map_err(build_err)
}

fn times(cert: &Certificate) -> (u64, u64) {
    let v = &cert.tbs_certificate.validity;
    (
        v.not_before.to_unix_duration().as_secs(),
        v.not_after.to_unix_duration().as_secs(),
    )
}

impl Authority {
    /// A new self-signed CA valid from `now`.
    pub fn generate(now: u64) -> Result<Authority, CertError> {
        let key = SigningKey::random(&mut OsRng);
        let subject = Name::from_str(&format!("CN=irsa-agent webhook CA {now},O=irsa-agent"))
            .map_err(build_err)?;
        let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).map_err(build_err)?;
        let builder = CertificateBuilder::new(
            Profile::Root,
            serial()?,
            validity(now.saturating_sub(BACKDATE), now + CA_LIFETIME)?,
            subject,
            spki,
            &key,
        )
        .map_err(build_err)?;
        let cert = builder.build::<DerSignature>().map_err(build_err)?;
        let (not_before, not_after) = times(&cert);
        Ok(Authority {
            cert_der: cert.to_der().map_err(build_err)?,
            key,
            not_before,
            not_after,
        })
    }

    fn certificate(&self) -> Result<Certificate, CertError> {
        Certificate::from_der(&self.cert_der).map_err(build_err)
    }

    /// A serving certificate for `ips` and `localhost`, valid from `now`.
    pub fn issue(&self, now: u64, ips: &[IpAddr]) -> Result<Serving, CertError> {
        let ca = self.certificate()?;
        let key = SigningKey::random(&mut OsRng);
        let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).map_err(build_err)?;
        let not_after = (now + SERVING_LIFETIME).min(self.not_after);
        let mut builder = CertificateBuilder::new(
            Profile::Leaf {
                issuer: ca.tbs_certificate.subject.clone(),
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            serial()?,
            validity(now.saturating_sub(BACKDATE), not_after)?,
            Name::from_str("CN=irsa-agent webhook").map_err(build_err)?,
            spki,
            &self.key,
        )
        .map_err(build_err)?;
        let mut names = vec![GeneralName::DnsName(
            Ia5String::new("localhost").map_err(build_err)?,
        )];
        for ip in ips {
            let bytes = match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            names.push(GeneralName::IpAddress(
                OctetString::new(bytes).map_err(build_err)?,
            ));
        }
        builder
            .add_extension(&SubjectAltName(names))
            .map_err(build_err)?;
        builder
            .add_extension(&ExtendedKeyUsage(vec![const_oid_server_auth()]))
            .map_err(build_err)?;
        let cert = builder.build::<DerSignature>().map_err(build_err)?;
        Ok(Serving {
            cert_der: cert.to_der().map_err(build_err)?,
            key_pkcs8_der: key.to_pkcs8_der().map_err(build_err)?.as_bytes().to_vec(),
            not_after: times(&cert).1,
            issuer_der: self.cert_der.clone(),
        })
    }
}

/// id-kp-serverAuth (RFC 5280).
fn const_oid_server_auth() -> der::oid::ObjectIdentifier {
    der::oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1")
}

impl Authorities {
    /// Reads the CAs from the file's text: each CA as a CERTIFICATE block followed by its
    /// PRIVATE KEY block.
    pub fn from_pem(text: &[u8]) -> Result<Authorities, String> {
        let blocks = pem::blocks(text);
        if !blocks.len().is_multiple_of(2) {
            return Err("expected CERTIFICATE and PRIVATE KEY blocks in pairs".into());
        }
        let mut cas = Vec::new();
        for pair in blocks.chunks(2) {
            let [cert, key] = pair else { continue };
            if cert.label != b"CERTIFICATE" || key.label != b"PRIVATE KEY" {
                return Err(format!(
                    "expected a CERTIFICATE block then a PRIVATE KEY block, found {} then {}",
                    cert.label_str(),
                    key.label_str()
                ));
            }
            let parsed =
                Certificate::from_der(&cert.der).map_err(|e| format!("a certificate: {e}"))?;
            let signing =
                SigningKey::from_pkcs8_der(&key.der).map_err(|e| format!("a key: {e}"))?;
            let spki = SubjectPublicKeyInfoOwned::from_key(*signing.verifying_key())
                .map_err(|e| e.to_string())?;
            if spki != parsed.tbs_certificate.subject_public_key_info {
                return Err("a key does not belong to the certificate before it".into());
            }
            let (not_before, not_after) = times(&parsed);
            cas.push(Authority {
                cert_der: cert.der.clone(),
                key: signing,
                not_before,
                not_after,
            });
        }
        cas.sort_by_key(|c| c.not_before);
        Ok(Authorities { cas })
    }

    /// The file's text.
    pub fn to_pem(&self) -> Result<String, CertError> {
        let mut out = String::new();
        for ca in &self.cas {
            out.push_str(&pem::encode("CERTIFICATE", &ca.cert_der));
            let key = ca.key.to_pkcs8_der().map_err(build_err)?;
            out.push_str(&pem::encode("PRIVATE KEY", key.as_bytes()));
        }
        Ok(out)
    }

    /// Brings the set up to date at `now`: drops expired CAs, adds one when there is none or
    /// the newest has less than [`CA_RENEW_BEFORE`] left. True when something changed.
    pub fn maintain(&mut self, now: u64) -> Result<bool, CertError> {
        let before = self.cas.len();
        self.cas.retain(|c| c.not_after > now);
        let mut changed = self.cas.len() != before;
        if self
            .cas
            .last()
            .is_none_or(|newest| newest.not_after.saturating_sub(now) < CA_RENEW_BEFORE)
        {
            self.cas.push(Authority::generate(now)?);
            changed = true;
        }
        Ok(changed)
    }

    /// The CA that signs serving certificates at `now`: the newest that has been in the bundle
    /// for [`CA_PROPAGATION`], else the oldest (the first CA signs at once: no registration
    /// can hold an older one).
    pub fn signer(&self, now: u64) -> Option<&Authority> {
        self.cas
            .iter()
            .rev()
            .find(|c| c.not_before + BACKDATE + CA_PROPAGATION <= now)
            .or_else(|| self.cas.first())
    }

    /// The `caBundle`: every CA's certificate, PEM.
    pub fn bundle_pem(&self) -> String {
        self.cas
            .iter()
            .map(|c| pem::encode("CERTIFICATE", &c.cert_der))
            .collect()
    }

    /// Whether `serving` must be replaced at `now`.
    pub fn needs_new_serving(&self, serving: &Serving, now: u64) -> bool {
        serving.not_after.saturating_sub(now) < SERVING_RENEW_BEFORE
            || self
                .signer(now)
                .is_none_or(|s| s.cert_der != serving.issuer_der)
    }

    /// A serving certificate from the signer at `now`.
    pub fn issue(&self, now: u64, ips: &[IpAddr]) -> Result<Serving, CertError> {
        self.signer(now)
            .ok_or_else(|| CertError::Build("no CA".into()))?
            .issue(now, ips)
    }
}

/// The CAs kept in [`CA_FILE`] under `root`: read, brought up to date at `now`, written back
/// (0600, atomically) when they changed.
pub fn load_and_maintain(
    root: &crate::host::HostRoot,
    now: u64,
) -> Result<(Authorities, bool), CertError> {
    let path = root.path(CA_FILE);
    let file_err = |why: String| CertError::File {
        path: root.host_view(&path).to_path_buf(),
        why,
    };
    let mut cas = match fs::read_optional(&path).map_err(|e| file_err(e.to_string()))? {
        Some(bytes) => Authorities::from_pem(&bytes).map_err(|why| {
            file_err(format!(
                "{why} (delete the file to make a new CA; the registration follows on its own)"
            ))
        })?,
        None => Authorities::default(),
    };
    let changed = cas.maintain(now)?;
    if changed {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir, 0o700).map_err(|e| file_err(e.to_string()))?;
        }
        fs::write_atomic(&path, cas.to_pem()?.as_bytes(), NewFile::PRIVATE)
            .map_err(|e| file_err(e.to_string()))?;
    }
    Ok((cas, changed))
}

/// The path for messages.
pub fn ca_file(root: &crate::host::HostRoot) -> PathBuf {
    root.host_view(&root.path(CA_FILE)).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn ca_is_replaced_with_an_overlap_and_serving_follows() {
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().expect("ip")];
        let mut cas = Authorities::default();
        assert!(cas.maintain(NOW).expect("first CA"));
        assert!(!cas.maintain(NOW + DAY).expect("nothing to do"));
        let first = cas.cas[0].cert_der.clone();
        let serving = cas.issue(NOW, &ips).expect("serving");
        assert_eq!(serving.issuer_der, first, "the first CA signs at once");
        assert!(!cas.needs_new_serving(&serving, NOW + 19 * DAY));
        assert!(
            cas.needs_new_serving(&serving, NOW + 21 * DAY),
            "renewed 10 days before expiry"
        );

        // Shortly before the CA has 180 days left: still one CA.
        let renew_at = cas.cas[0].not_after - CA_RENEW_BEFORE;
        assert!(!cas.maintain(renew_at - DAY).expect("maintain"));
        // Then a second CA: both in the bundle, the old one still signs.
        assert!(cas.maintain(renew_at + 1).expect("maintain"));
        assert_eq!(cas.cas.len(), 2);
        assert_eq!(pem::blocks(cas.bundle_pem().as_bytes()).len(), 2);
        let serving = cas.issue(renew_at + 1, &ips).expect("serving");
        assert_eq!(
            serving.issuer_der, first,
            "a new CA does not sign before propagation"
        );
        // After propagation, the new CA signs, and the old serving cert is replaced.
        let later = renew_at + CA_PROPAGATION + BACKDATE + 2;
        assert!(cas.needs_new_serving(&serving, later));
        let serving = cas.issue(later, &ips).expect("serving");
        assert_eq!(serving.issuer_der, cas.cas[1].cert_der);
        // Round trip through the file text.
        let text = cas.to_pem().expect("pem");
        let back = Authorities::from_pem(text.as_bytes()).expect("parse");
        assert_eq!(back.bundle_pem(), cas.bundle_pem());
        // The old CA is dropped once expired; the serving cert it signed never outlived it.
        let old_end = cas.cas[0].not_after;
        assert!(cas.maintain(old_end).expect("maintain"));
        assert_eq!(cas.cas.len(), 1);
        assert_eq!(cas.cas[0].cert_der, serving.issuer_der);
    }

    #[test]
    fn a_damaged_file_is_refused_with_the_reason() {
        let mut cas = Authorities::default();
        cas.maintain(NOW).expect("ca");
        let other = Authority::generate(NOW).expect("ca");
        let text = format!(
            "{}{}",
            pem::encode("CERTIFICATE", &cas.cas[0].cert_der),
            pem::encode(
                "PRIVATE KEY",
                other.key.to_pkcs8_der().expect("der").as_bytes()
            )
        );
        let err = Authorities::from_pem(text.as_bytes()).expect_err("mismatch");
        assert!(err.contains("does not belong"), "{err}");
        let err =
            Authorities::from_pem(pem::encode("CERTIFICATE", b"x").as_bytes()).expect_err("odd");
        assert!(err.contains("pairs"), "{err}");
    }
}
