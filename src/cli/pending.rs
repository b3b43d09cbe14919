//! Subcommands whose issues are not done yet: they say so instead of pretending.

use clap::Args as ClapArgs;

use super::Exit;

/// Options are added by the issue that implements the subcommand.
#[derive(Debug, ClapArgs)]
pub struct Args {}

pub fn not_implemented(name: &str) -> anyhow::Result<Exit> {
    anyhow::bail!("`irsa-agent {name}` is not implemented yet")
}
