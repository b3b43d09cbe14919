//! `irsa-agent jwks` and `irsa-agent discovery`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

use super::{Exit, Global, print_document};
use crate::config::{self, issuer};
use crate::keys::{self, PublicKey, jwks};

/// Key-file options shared by `jwks` and `discovery`.
#[derive(Debug, Args)]
pub struct KeyFiles {
    /// A verification key file, as given to --service-account-key-file. Repeat it in the
    /// apiserver's flag order: keys are published in that order, then in PEM-block order.
    #[arg(long = "key-file", value_name = "FILE", required = true)]
    pub key_files: Vec<PathBuf>,

    /// The --service-account-signing-key-file: checked as the apiserver checks it, and its
    /// public half must be among the verification keys (else every token it signs fails).
    #[arg(long = "signing-key-file", value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,

    /// Keep a key that appears in several files once per appearance, as kube-apiserver does
    /// (by default each key is published once; AWS allows at most 100 RSA + 100 EC keys).
    #[arg(long)]
    pub keep_duplicates: bool,
}

/// `irsa-agent jwks`.
#[derive(Debug, Args)]
#[command(
    after_help = "The output has no trailing newline (unless stdout is a terminal): \
`irsa-agent jwks --key-file sa.pub > jwks.json` gives the exact bytes kube-apiserver serves."
)]
pub struct JwksArgs {
    #[command(flatten)]
    pub keys: KeyFiles,
}

/// `irsa-agent discovery`.
#[derive(Debug, Args)]
#[command(
    after_help = "Without --issuer, the issuer and jwks-uri come from the configuration \
(/etc/irsa-agent/config.yaml under --root, or --config)."
)]
pub struct DiscoveryArgs {
    /// The public issuer URL (the first --service-account-issuer).
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,

    /// The --service-account-jwks-uri [default: <issuer>/openid/v1/jwks].
    #[arg(long, value_name = "URL")]
    pub jwks_uri: Option<String>,

    #[command(flatten)]
    pub keys: KeyFiles,
}

/// Loads the verification keys of `args`, warning about skipped blocks and checking the
/// signing key. Returns the keys in publication order.
fn load_keys(args: &KeyFiles) -> anyhow::Result<Vec<PublicKey>> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for path in &args.key_files {
        match keys::load_verification_file(path) {
            Ok(parsed) => {
                for skipped in parsed.skipped.iter().filter(|s| s.looks_like_a_key()) {
                    log::warn!(
                        "{}: {}; kube-apiserver ignores this block too",
                        path.display(),
                        skipped.explain_for(path)
                    );
                }
                all.extend(parsed.keys);
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    if let Some(path) = &args.signing_key_file {
        match keys::load_signing_file(path) {
            Ok(signing) => {
                // Only meaningful when every verification file could be read.
                if errors.is_empty() && !all.iter().any(|k| k.kid() == signing.public.kid()) {
                    errors.push(format!(
                        "{}: the signing key ({}, kid {}) is not among the verification keys; every token it signs would be rejected; add its public half (openssl pkey -in {} -pubout) to a --key-file",
                        path.display(),
                        signing.public.describe(),
                        signing.public.kid(),
                        path.display()
                    ));
                }
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    if args.keep_duplicates {
        return Ok(all);
    }
    let unique = keys::dedup(&all);
    if unique.len() != all.len() {
        let repeated = all.len() - unique.len();
        log::info!(
            "{repeated} repeated key{} listed once (kube-apiserver would list {} again; --keep-duplicates does too)",
            if repeated == 1 { "" } else { "s" },
            if repeated == 1 { "it" } else { "them" },
        );
    }
    Ok(unique)
}

pub fn jwks(_global: &Global, args: JwksArgs) -> anyhow::Result<Exit> {
    let keys = load_keys(&args.keys)?;
    print_document(&jwks::jwks_json(&keys))?;
    Ok(Exit::OK)
}

pub fn discovery(global: &Global, args: DiscoveryArgs) -> anyhow::Result<Exit> {
    let (issuer_url, jwks_uri) = match args.issuer {
        Some(issuer_url) => {
            let check = issuer::check_issuer(&issuer_url);
            for warning in &check.warnings {
                log::warn!("--issuer {issuer_url:?}: {warning}");
            }
            if !check.errors.is_empty() {
                bail!("--issuer {issuer_url:?}: {}", check.errors.join("; "));
            }
            let jwks_uri = match args.jwks_uri {
                Some(uri) => {
                    let check = issuer::check_jwks_uri(&uri);
                    if !check.errors.is_empty() {
                        bail!("--jwks-uri {uri:?}: {}", check.errors.join("; "));
                    }
                    uri
                }
                None => jwks::default_jwks_uri(&issuer_url),
            };
            (issuer_url, jwks_uri)
        }
        None => {
            let loaded = config::load(&global.root, global.config.as_deref())
                .context("no --issuer given, so the configuration is needed")?;
            for warning in &loaded.warnings {
                log::warn!("{warning}");
            }
            let jwks_uri = args.jwks_uri.unwrap_or(loaded.settings.jwks_uri);
            (loaded.settings.issuer, jwks_uri)
        }
    };
    let keys = load_keys(&args.keys)?;
    print_document(&jwks::discovery_json(&issuer_url, &jwks_uri, &keys))?;
    Ok(Exit::OK)
}
