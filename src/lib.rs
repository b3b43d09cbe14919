//! irsa-agent: makes IRSA and workload identity federation work on self-managed Kubernetes.
//!
//! The crate is laid out like the job:
//! - [`apiserver`]: the host's kube-apiserver: distribution, flags, key files;
//! - [`config`]: the agent's own configuration (fragments, merge, validation);
//! - [`keys`]: service-account key files, JWKS and discovery documents, exactly as
//!   kube-apiserver reads and renders them;
//! - [`publish`]: putting the discovery document and JWKS where relying parties fetch them
//!   (directory, S3, GCS, Azure), credentials for that, and the check of the public copy;
//! - [`doctor`]: `doctor`, `verify-token`, `trust-policy`: checks and explanations of what is
//!   wrong between the key files and a relying party;
//! - [`identity`]: what a pod needs for its cloud identity (projected token, variables) and
//!   the JSON Patch that adds it (the webhook, `pod-config`);
//! - [`host`]: the injectable host root every host path goes through;
//! - [`fs`]: the one module that writes host files (atomic, durable, mode-preserving);
//! - [`clock`] and [`runtime`]: the one clock (real or simulated) and the one async runtime
//!   every part of the process shares;
//! - [`state`]: the agent's own state file (`/var/lib/irsa-agent/state.json`);
//! - [`yaml`]: the one YAML entry point (size and nesting limits before parsing);
//! - [`daemon`]: `irsa-agent run`, the loop that keeps all of the above true (watch, converge,
//!   retry, systemd, metrics) and the extension point for scheduled work (rotation);
//! - [`unit`]: what the packaged systemd unit lets the agent write;
//! - [`cli`]: the command line, one file per subcommand.

pub mod apiserver;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod errors;
pub mod exposition;
pub mod failpoint;
pub mod fs;
pub mod host;
pub mod identity;
pub mod k8s;
pub mod keys;
pub mod membership;
pub mod publish;
pub mod rollout;
pub mod rotation;
pub mod runtime;
pub mod state;
pub mod unit;
pub mod webhook;
pub mod yaml;
