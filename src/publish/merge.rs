//! The three-way merge used after a write conflict, on keys read back from a published JWKS
//! ([`crate::keys::jwk`]).

use crate::keys::PublicKey;
pub use crate::keys::jwk::{key_from_jwk, keys_in, kids_in};

/// After a lost race: our keys, plus the keys the other writer added since our first read
/// (`base`), in their order after ours. Keys we dropped on purpose (in `base`, not in `ours`)
/// stay dropped. Returns the merged keys and the kids kept from the other writer.
pub fn three_way(
    ours: &[PublicKey],
    base: &[String],
    theirs: &[PublicKey],
) -> (Vec<PublicKey>, Vec<String>) {
    let mut merged = ours.to_vec();
    let mut kept = Vec::new();
    for key in theirs {
        let kid = key.kid();
        if !base.contains(&kid) && !merged.iter().any(|k| k.kid() == kid) {
            kept.push(kid);
            merged.push(key.clone());
        }
    }
    (merged, kept)
}

/// Why a stored JWKS differs from the one we want, in words.
pub fn describe_jwks_difference(stored: &[u8], desired_kids: &[String]) -> String {
    let stored_kids = kids_in(stored);
    let missing: Vec<&String> = desired_kids
        .iter()
        .filter(|k| !stored_kids.contains(k))
        .collect();
    let extra: Vec<&String> = stored_kids
        .iter()
        .filter(|k| !desired_kids.contains(k))
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return if stored_kids.is_empty() && !desired_kids.is_empty() {
            "is not a JWKS".to_string()
        } else {
            "same keys, other bytes (order or formatting)".to_string()
        };
    }
    let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("lacks kid {}", list(&missing)));
    }
    if !extra.is_empty() {
        parts.push(format!("has kid {} no longer in use", list(&extra)));
    }
    parts.join("; ")
}
