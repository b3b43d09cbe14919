//! `irsa-agent doctor [--json]`: check every link from the key files to the public JWKS.

use std::time::Duration;

use clap::Args as ClapArgs;

use super::edge_args::parse_timeout;
use super::{Exit, Global};
use crate::doctor::{self, Options};

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Checks, in order: the configuration; each directory target (no other user can write its folders, the documents are root's 0644 regular files); the apiserver's effective flags (configured issuer first, \
old issuers still accepted, --api-audiences pinned and free of cloud audiences, jwks-uri), its key \
files (read as kube-apiserver reads them, signing key among the verification keys, private keys \
mode 0600); the running apiserver through the admin kubeconfig (ready, serving the issuer and keys \
of its files, every apiserver of the cluster serving the same keys); and the public discovery \
document and JWKS over HTTPS (TLS, issuer byte for byte, jwks_uri, answer time under 5 s, \
Content-Type, kids, at most 100 RSA + 100 EC keys, cache headers, clock skew).

Each check prints pass, WARN, FAIL or skip (with the reason) and, when something is wrong, the \
fix. The network checks run concurrently under --timeout.

Exit status: 0 no check failed (warnings allowed); 1 a check failed. --json prints one object \
(README, \"doctor --json\").")]
pub struct Args {
    /// Print one JSON object (see README, "doctor --json") instead of text.
    #[arg(long)]
    pub json: bool,

    /// Overall deadline for the network checks.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Do not touch the network: check only the files (network checks are reported as skipped).
    #[arg(long)]
    pub offline: bool,

    /// A JWKS answer slower than this fails (AWS STS gives up after about 5 s).
    #[arg(long, hide = true, value_name = "DURATION", default_value = "5s", value_parser = parse_timeout)]
    pub slow_threshold: Duration,

    /// The apiserver URL to ask [default: from the admin kubeconfig; kubeadm: the manifest's
    /// --advertise-address and --secure-port].
    #[arg(
        long,
        hide = true,
        value_name = "URL",
        env = "IRSA_AGENT_APISERVER_URL"
    )]
    pub apiserver_url: Option<String>,

    /// "Now" as Unix seconds, for the clock comparison (tests).
    #[arg(long, hide = true, value_name = "SECONDS")]
    pub now: Option<i64>,

    /// This server's node name in the cluster check [default: the one the daemon runs with
    /// (its `--node-name`, recorded in the state file), else the host name].
    #[arg(long, value_name = "NAME", env = "IRSA_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let options = Options {
        deadline: args.timeout,
        slow_threshold: args.slow_threshold,
        apiserver_url: args.apiserver_url,
        now: args.now,
        offline: args.offline,
        node: args.node_name,
    };
    let report = doctor::run(&global.root, global.config.as_deref(), &options);
    log::info!("doctor took {} ms", report.elapsed.as_millis());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.ok() { Exit::OK } else { Exit::FAILURE })
}
