//! `irsa-agent trust-policy`: the IAM trust policy (and the Terraform, Azure and GCP
//! equivalents) for one service account of this cluster.

use clap::{Args as ClapArgs, ValueEnum};

use super::{Exit, Global};
use crate::config;
use crate::doctor::policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Everything below, with headings.
    All,
    /// Only the IAM trust policy JSON (feeds `verify-token --trust-policy`).
    Iam,
    /// Only the AWS CLI commands (provider, role, permissions, annotation).
    Aws,
    /// Only the Terraform snippet.
    Terraform,
    /// Only the Azure federated identity credential.
    Azure,
    /// Only the GCP workload identity pool provider.
    Gcp,
}

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
The policy trusts exactly one service account: `sub` = system:serviceaccount:NS:SA and `aud` = \
sts.amazonaws.com, with condition keys named after the issuer without https:// (the IAM OIDC \
provider). Save the IAM part with `--format iam > trust.json` and check a real token against \
it with `irsa-agent verify-token --namespace NS --service-account SA --trust-policy trust.json`.

`--format aws` prints the AWS CLI commands (create-open-id-connect-provider, create-role, \
put-role-policy, the kubectl annotation) and `--format terraform` the same as Terraform; role and \
resource names are derived from the namespace and the service account and never collide \
(<ns>_<sa>). The thumbprint: none is needed when the issuer's certificate chains to a public CA \
AWS trusts; for a private CA the output gives the openssl command that computes it (it needs a \
TLS connection to the issuer's host, which this command makes only with --thumbprint: it then \
says whether the chain verifies against this machine's CA store (SSL_CERT_FILE honoured; not \
ca-file:) and, if not, puts the SHA-1 of the top certificate the host serves into the output).")]
pub struct Args {
    /// The service account's namespace.
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: String,

    /// The service account's name.
    #[arg(long, value_name = "SA")]
    pub service_account: String,

    /// The IAM OIDC provider's ARN (it must end with :oidc-provider/<issuer without https://>).
    #[arg(long, value_name = "ARN", conflicts_with = "account_id")]
    pub provider_arn: Option<String>,

    /// The AWS account id the provider lives in (the ARN is built from it and the issuer).
    #[arg(long, value_name = "ID")]
    pub account_id: Option<String>,

    /// The audience the pod's token is requested with.
    #[arg(long, value_name = "AUD", default_value = policy::AWS_AUDIENCE)]
    pub audience: String,

    /// The issuer [default: the configured issuer].
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,

    /// What to print.
    #[arg(long, value_enum, default_value = "all")]
    pub format: Format,

    /// Ask the issuer's host (network): does its certificate chain to a public CA (no
    /// thumbprint needed), or is it private (then the SHA-1 of the top certificate it serves goes
    /// into the AWS CLI and Terraform output)?
    #[arg(long)]
    pub thumbprint: bool,

    /// Timeout of the --thumbprint requests.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    for (what, value) in [
        ("--namespace", &args.namespace),
        ("--service-account", &args.service_account),
    ] {
        if !valid_name(value) {
            anyhow::bail!(
                "{what} {value:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.')"
            );
        }
    }
    let (issuer, jwks_uri) = match &args.issuer {
        Some(i) => (i.clone(), crate::keys::jwks::default_jwks_uri(i)),
        None => {
            let settings = config::load(&global.root, global.config.as_deref())?.settings;
            (settings.issuer, settings.jwks_uri)
        }
    };
    let provider = policy::provider(&issuer);
    let arn = match (&args.provider_arn, &args.account_id) {
        (Some(arn), _) => {
            if !arn.ends_with(&format!(":oidc-provider/{provider}")) {
                log::warn!(
                    "--provider-arn {arn} does not end with :oidc-provider/{provider}: AWS matches tokens from {issuer} only to that provider, so this policy would never match"
                );
            }
            arn.clone()
        }
        (None, Some(id)) => {
            if id.len() != 12 || !id.chars().all(|c| c.is_ascii_digit()) {
                anyhow::bail!("--account-id {id:?} is not a 12-digit AWS account id");
            }
            policy::provider_arn(id, &issuer)
        }
        (None, None) => policy::provider_arn("<ACCOUNT_ID>", &issuer),
    };
    let subject = policy::subject(&args.namespace, &args.service_account);
    let iam = policy::iam_policy(&arn, &issuer, &subject, &args.audience);
    let account = arn
        .strip_prefix("arn:")
        .and_then(|rest| rest.split(':').nth(3))
        .filter(|a| !a.is_empty())
        .unwrap_or("<ACCOUNT_ID>")
        .to_string();
    let thumbprint = if args.thumbprint {
        let found = crate::doctor::thumbprint::probe(&issuer, args.timeout)
            .map_err(|e| anyhow::anyhow!("--thumbprint: {e}"))?;
        Some(found)
    } else {
        None
    };
    let aws = policy::aws_cli(
        args.provider_arn.as_deref(),
        &account,
        &issuer,
        &args.namespace,
        &args.service_account,
        &args.audience,
        thumbprint.as_ref(),
    );
    let terraform = policy::terraform(
        args.provider_arn.as_deref(),
        &issuer,
        &args.namespace,
        &args.service_account,
        &args.audience,
        thumbprint.as_ref(),
    );
    let azure = policy::azure(&issuer, &args.namespace, &args.service_account);
    let gcp = policy::gcp(&issuer, &jwks_uri, &args.namespace, &args.service_account);
    match args.format {
        Format::Iam => print!("{iam}"),
        Format::Aws => print!("{aws}"),
        Format::Terraform => print!("{terraform}"),
        Format::Azure => print!("{azure}"),
        Format::Gcp => print!("{gcp}"),
        Format::All => {
            println!(
                "# AWS IAM trust policy for the role of {}/{}",
                args.namespace, args.service_account
            );
            println!(
                "# (the IAM OIDC provider: URL {issuer}, audience {})",
                args.audience
            );
            print!("{iam}");
            println!(
                "# then annotate the service account (pod identity webhook): eks.amazonaws.com/role-arn: arn:aws:iam::{account}:role/{}",
                policy::role_name(&args.namespace, &args.service_account)
            );
            println!("\n# AWS CLI");
            print!("{aws}");
            println!("\n# Terraform");
            print!("{terraform}");
            println!();
            print!("{azure}");
            println!();
            print!("{gcp}");
        }
    }
    Ok(Exit::OK)
}
