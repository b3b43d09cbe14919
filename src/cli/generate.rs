//! `irsa-agent generate`: the man pages and shell completions the package ships.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args as ClapArgs, CommandFactory as _, Subcommand};
use clap_complete::Shell;

use super::{Cli, Exit};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Write irsa-agent.1 and one page per subcommand into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL.
    Completions { shell: Shell },
}

pub fn run(args: Args) -> anyhow::Result<Exit> {
    let cmd = Cli::command();
    match args.what {
        What::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
        }
        What::Completions { shell } => {
            let mut cmd = cmd;
            clap_complete::generate(shell, &mut cmd, "irsa-agent", &mut std::io::stdout());
        }
    }
    Ok(Exit::OK)
}
