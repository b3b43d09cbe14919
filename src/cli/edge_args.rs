//! Options shared by the subcommands that restart and probe the apiserver (`apply`, `finalize`,
//! `run`, `rotate`), flattened into each one's arguments so they spell and mean the same.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;

use crate::apiserver::flags;
use crate::config::parse_duration;

/// `5m`, `90s`, `1h30m`, `500ms`; Go's spelling (`1m30s`, `1.5h`) too.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s).or_else(|e| flags::parse_go_duration(s).ok_or(e))
}

/// How the apiserver is restarted and asked whether it came back.
#[derive(Debug, Clone, ClapArgs)]
pub struct ApiserverArgs {
    /// How long to wait for a restarted apiserver to be ready (and serve the expected issuer)
    /// before restoring the backup.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// The systemd unit to restart [default: detected: k3s (or k3s-<name>), rke2-server].
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,

    /// The systemctl program (tests point it at a fake).
    #[arg(
        long,
        hide = true,
        value_name = "PATH",
        env = "IRSA_AGENT_SYSTEMCTL",
        default_value = "systemctl"
    )]
    pub systemctl: PathBuf,

    /// How often to ask the apiserver while waiting.
    #[arg(long, hide = true, value_name = "DURATION", default_value = "2s", value_parser = parse_timeout)]
    pub poll_interval: Duration,

    /// How often a rotation looks again at what it waits for (another server's step, the
    /// driver's next step); tests shorten it.
    #[arg(long, hide = true, value_name = "DURATION", default_value = "1m", value_parser = parse_timeout)]
    pub recheck_interval: Duration,

    /// The apiserver URL to probe [default: from the admin kubeconfig; kubeadm: the manifest's
    /// --advertise-address and --secure-port].
    #[arg(
        long,
        hide = true,
        value_name = "URL",
        env = "IRSA_AGENT_APISERVER_URL"
    )]
    pub apiserver_url: Option<String>,

    /// This server's node name, as its apiserver names its host (the `kubernetes.io/hostname`
    /// of its identity Lease): the name the agent coordinates under with the other servers
    /// (restart Lease, rollout) [default: the kernel's host name].
    #[arg(long, value_name = "NAME", env = "IRSA_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
}

use crate::host::host_name;

impl ApiserverArgs {
    /// This server's node name (`--node-name`, else the host name).
    pub fn node(&self) -> String {
        self.node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(host_name)
    }

    /// The timeout of one request to the apiserver.
    pub fn request_timeout(&self) -> Duration {
        self.poll_interval.max(Duration::from_secs(5))
    }
}

/// The distribution programs key rotation runs (`k3s|rke2 certificate rotate-ca`).
#[derive(Debug, Clone, ClapArgs)]
pub struct ProgramArgs {
    /// The k3s binary (tests point it at a fake) [default: k3s from PATH].
    #[arg(long, hide = true, value_name = "PATH", env = "IRSA_AGENT_K3S")]
    pub k3s: Option<PathBuf>,

    /// The rke2 binary (tests point it at a fake) [default: rke2 from PATH].
    #[arg(long, hide = true, value_name = "PATH", env = "IRSA_AGENT_RKE2")]
    pub rke2: Option<PathBuf>,
}

impl ProgramArgs {
    /// The overrides as rotation takes them: (program name, path).
    pub fn programs(&self) -> Vec<(String, PathBuf)> {
        [("k3s", &self.k3s), ("rke2", &self.rke2)]
            .into_iter()
            .filter_map(|(name, path)| path.clone().map(|p| (name.to_string(), p)))
            .collect()
    }
}
