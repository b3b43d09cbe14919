//! Any byte string fed to the PEM and key parsers gives a key list or an error, never a panic;
//! and whatever keys come out can be rendered. Inputs: random bytes, random DER in PEM armour
//! under every label the parsers treat specially, and real key files with DER and text mutated.
//! Large inputs (hundreds of KB of PEM and YAML fragments) must also come back, and the YAML
//! reader ([`irsa_agent::yaml`]) must answer any text with a value or an error.

use std::path::Path;

use irsa_agent::keys::{self, jwks, pem};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/parser_never_panics.txt",
        ))),
        ..ProptestConfig::default()
    }
}

fn real_blocks() -> &'static [pem::Block] {
    static BLOCKS: std::sync::LazyLock<Vec<pem::Block>> =
        std::sync::LazyLock::new(load_real_blocks);
    &BLOCKS
}

fn load_real_blocks() -> Vec<pem::Block> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver");
    let mut blocks = Vec::new();
    for case in std::fs::read_dir(root).expect("test data") {
        let keys_dir = case.expect("entry").path().join("keys");
        if !keys_dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(keys_dir).expect("keys dir") {
            let data = std::fs::read(file.expect("entry").path()).expect("readable");
            blocks.extend(pem::blocks(&data));
        }
    }
    assert!(blocks.len() >= 20, "fixtures hold many blocks");
    blocks
}

fn check(data: &[u8]) {
    if let Ok(parsed) = keys::parse_verification_keys(data) {
        for key in &parsed.keys {
            assert_eq!(key.kid().len(), 43);
            let _ = jwks::jwk_json(key);
        }
        for skipped in &parsed.skipped {
            let _ = skipped.to_string();
        }
    }
    match keys::parse_signing_key(data) {
        Ok(signing) => assert_eq!(signing.public.kid().len(), 43),
        Err((reason, skipped)) => {
            assert!(!reason.is_empty());
            let _ = skipped.len();
        }
    }
}

const LABELS: &[&str] = &[
    "RSA PRIVATE KEY",
    "PRIVATE KEY",
    "EC PRIVATE KEY",
    "PUBLIC KEY",
    "RSA PUBLIC KEY",
    "CERTIFICATE",
    "EC PARAMETERS",
    "ENCRYPTED PRIVATE KEY",
    "",
];

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..2048)) {
        check(&data);
    }

    #[test]
    fn arbitrary_der_in_armour(label in prop::sample::select(LABELS), der in vec(any::<u8>(), 0..700), crlf in any::<bool>()) {
        let mut text = pem::encode(label, &der);
        if crlf {
            text = text.replace('\n', "\r\n");
        }
        check(text.as_bytes());
    }

    #[test]
    fn pem_roundtrip(label in "[A-Z][A-Z ]{0,20}[A-Z]", der in vec(any::<u8>(), 0..300)) {
        let text = pem::encode(&label, &der);
        let blocks = pem::blocks(text.as_bytes());
        prop_assert_eq!(blocks.len(), 1);
        prop_assert_eq!(&blocks[0].label, &label.as_bytes().to_vec());
        prop_assert_eq!(&blocks[0].der, &der);
    }
}

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn mutated_real_der(pick in any::<prop::sample::Index>(), edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let blocks = real_blocks();
        let block = &blocks[pick.index(blocks.len())];
        let mut der = block.der.clone();
        for (at, byte) in edits {
            let i = at.index(der.len());
            der[i] = byte;
        }
        if truncate {
            der.truncate(cut.index(der.len() + 1));
        }
        check(pem::encode(&block.label_str(), &der).as_bytes());
    }

    #[test]
    fn mutated_real_text(pick in any::<prop::sample::Index>(), edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let blocks = real_blocks();
        let block = &blocks[pick.index(blocks.len())];
        let mut text = pem::encode(&block.label_str(), &block.der).into_bytes();
        for (at, byte) in edits {
            let i = at.index(text.len());
            text[i] = byte;
        }
        check(&text);
    }
}

/// Fragments of PEM files, glued many thousands of times into large inputs.
const PEM_PIECES: &[&str] = &[
    "-----BEGIN PUBLIC KEY-----\n",
    "-----BEGIN RSA PRIVATE KEY-----\n",
    "-----END PUBLIC KEY-----\n",
    "-----END RSA PRIVATE KEY----- x\n",
    "Proc-Type: 4,ENCRYPTED\n",
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n",
    "aGk=\n",
    "\r\n",
    "-----",
    " ",
];

/// Fragments of YAML, glued into large inputs.
const YAML_PIECES: &[&str] = &[
    "[", "]", "{", "}", "- ", "? ", ": ", "\n", "  ", "a", "\"", "'", "#", "|", ">", "&x ", "*x",
    "!!str ", "---\n", ",", "\\", "issuer: ", "\u{feff}", "\t",
];

fn glue(pieces: &[&str], picks: &[usize], repeat: usize) -> String {
    let unit: String = picks.iter().map(|&i| pieces[i % pieces.len()]).collect();
    unit.repeat(repeat)
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn large_pem_inputs(picks in vec(0..PEM_PIECES.len(), 1..12), repeat in 1000usize..20_000) {
        let text = glue(PEM_PIECES, &picks, repeat);
        check(text.as_bytes());
    }

    #[test]
    fn large_yaml_inputs(picks in vec(0..YAML_PIECES.len(), 1..12), repeat in 1000usize..20_000) {
        let text = glue(YAML_PIECES, &picks, repeat);
        let _ = irsa_agent::yaml::from_str::<serde_yaml::Value>(&text);
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn small_yaml_inputs(picks in vec(0..YAML_PIECES.len(), 0..200)) {
        let text = glue(YAML_PIECES, &picks, 1);
        let _ = irsa_agent::yaml::from_str::<serde_yaml::Value>(&text);
    }

    #[test]
    fn arbitrary_yaml_text(text in ".{0,300}") {
        let _ = irsa_agent::yaml::from_str::<serde_yaml::Value>(&text);
    }
}
