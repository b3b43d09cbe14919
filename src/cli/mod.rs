//! The command line. Parsing does no I/O; each subcommand lives in its own file and returns an
//! [`Exit`] code or an error that `main` prints.
//!
//! Exit codes (documented in the README and `--help`):
//! - 0: success (or, with `--check`, nothing to change);
//! - 1: failure;
//! - 2: `--check` found changes pending (drift), distinct from failure;
//! - 3: `publish` wrote every target, but the public copy is unreachable, stale or served with
//!   a Content-Type relying parties refuse;
//! - 64: bad command line (clap's own usage errors, moved off 2 so that 2 stays unambiguous).

mod apply;
mod check_config;
mod demo;
mod doctor;
pub(crate) mod edge_args;
mod finalize;
mod generate;
mod keys;
pub mod logging;
mod pod_config;
mod publish;
mod rotate;
mod run;
mod status;
mod trust_policy;
mod verify_token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::host::HostRoot;

/// A process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit(pub u8);

impl Exit {
    pub const OK: Exit = Exit(0);
    pub const FAILURE: Exit = Exit(1);
    pub const PENDING: Exit = Exit(2);
    /// `publish`: the targets are written, the public copy is not what relying parties need.
    pub const PUBLIC_COPY: Exit = Exit(3);
    pub const USAGE: Exit = Exit(64);
}

const AFTER_HELP: &str = "\
Exit status: 0 success, 1 failure, 2 changes pending (with --check), 3 published but the public copy is unreachable or wrong (publish), 64 bad usage.
Host paths (/etc/irsa-agent, /etc/rancher/k3s, /etc/kubernetes, /var/lib/irsa-agent) are resolved under --root.";

/// Keeps IRSA and workload identity federation working on k3s, RKE2 and kubeadm clusters:
/// sets the public service-account issuer, publishes the OIDC discovery document and JWKS,
/// and rotates the signing keys, unattended.
#[derive(Debug, Parser)]
#[command(name = "irsa-agent", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// Directory standing for the host's `/`: every host path is resolved under it
    /// (for tests, demos and chroots).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/",
        env = "IRSA_AGENT_ROOT"
    )]
    pub root: PathBuf,

    /// Read only this configuration file instead of /etc/irsa-agent/config.yaml and
    /// /etc/irsa-agent/config.d/*.yaml under --root.
    #[arg(long, global = true, value_name = "FILE", env = "IRSA_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// More detail: -v debug, -vv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the JWKS kube-apiserver serves at /openid/v1/jwks for these key files.
    Jwks(keys::JwksArgs),
    /// Print the OIDC discovery document for an issuer and key files.
    Discovery(keys::DiscoveryArgs),
    /// Check the configuration and print the settings in effect.
    CheckConfig(check_config::Args),
    /// Set the public issuer in the apiserver configuration (dual-issuer, audiences pinned),
    /// restart it safely and roll back if it does not come back.
    Apply(apply::Args),
    /// Retire the old issuers `apply` kept accepted, once no token minted with them can still
    /// be valid.
    Finalize(finalize::Args),
    /// Show the whole job on a bundled example k3s host (nothing on this machine changes).
    Demo(demo::Args),
    /// Publish the discovery document and JWKS to every `publish:` target once, then check the
    /// public copy (--check: change nothing, exit 2 when something differs).
    Publish(publish::Args),
    /// Run as a daemon: converge, then watch key files and configuration and keep the
    /// published documents true.
    Run(run::Args),
    /// Show what the agent last did and what it is waiting for.
    Status(status::Args),
    /// Check every link from the key files to the public JWKS and explain what is wrong.
    Doctor(doctor::Args),
    /// Rotate the service-account signing key without rejecting a single token.
    Rotate(rotate::Args),
    /// Decode a service-account token and explain why a relying party would accept or
    /// refuse it.
    VerifyToken(verify_token::Args),
    /// Print the IAM trust policy (and Terraform, Azure and GCP equivalents) for a service
    /// account.
    TrustPolicy(trust_policy::Args),
    /// Print the ServiceAccount and the pod template patch (projected token, variables) that
    /// give a workload its AWS, Azure or GCP identity, without a webhook.
    PodConfig(pod_config::Args),
    /// Generate the man page or shell completions (for packaging).
    #[command(hide = true)]
    Generate(generate::Args),
}

/// Options every subcommand shares.
#[derive(Debug, Clone)]
pub struct Global {
    pub root: HostRoot,
    pub config: Option<PathBuf>,
}

/// Parses arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { Exit::USAGE.0 } else { 0 });
        }
    };
    logging::init(logging::level(cli.verbose, cli.quiet));
    // Relative paths are made absolute once, here: the daemon's watches, messages and child
    // processes must not depend on a working directory (`--root ./host` missed every change).
    let global = Global {
        root: HostRoot::new(absolute(&cli.root)),
        config: cli.config.as_deref().map(absolute),
    };
    let result = match cli.command {
        Command::Jwks(args) => keys::jwks(&global, args),
        Command::Discovery(args) => keys::discovery(&global, args),
        Command::CheckConfig(args) => check_config::run(&global, args),
        Command::Apply(args) => apply::run(&global, args),
        Command::Finalize(args) => finalize::run(&global, args),
        Command::Demo(args) => demo::run(&global, args),
        Command::Publish(args) => publish::run(&global, args),
        Command::Run(args) => run::run(&global, args),
        Command::Status(args) => status::run(&global, args),
        Command::Doctor(args) => doctor::run(&global, args),
        Command::Rotate(args) => rotate::run(&global, args),
        Command::VerifyToken(args) => verify_token::run(&global, args),
        Command::TrustPolicy(args) => trust_policy::run(&global, args),
        Command::PodConfig(args) => pod_config::run(&global, args),
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code.0),
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::from(Exit::FAILURE.0)
        }
    }
}

/// `path` joined to the working directory when it is relative (not canonicalized: links
/// stay as given, and a path that does not exist yet is fine).
fn absolute(path: &std::path::Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path.to_path_buf(),
    }
}

/// The error and its causes in one line ([`crate::errors::chain`]).
pub fn error_chain(err: &anyhow::Error) -> String {
    crate::errors::chain(err.as_ref())
}

/// Writes a document to stdout exactly; adds a newline only for a terminal, so that
/// `irsa-agent jwks ... > jwks.json` is byte-identical to what the apiserver serves.
pub fn print_document(doc: &str) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let mut out = std::io::stdout().lock();
    out.write_all(doc.as_bytes())?;
    if out.is_terminal() {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let typed = crate::config::ConfigError::Read {
            path: "/etc/irsa-agent/config.yaml".into(),
            source: io,
        };
        let err = anyhow::Error::new(typed);
        assert_eq!(
            error_chain(&err),
            "cannot read /etc/irsa-agent/config.yaml: no such file"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
