//! Running the distribution's own tool (`k3s` / `rke2`), behind a trait so tests can use a fake
//! that does what `certificate rotate-ca` does on a fake host.

use std::path::PathBuf;
use std::process::Command;

use crate::errors::ProgramError;

/// Runs a program of the host.
pub trait CommandRunner: Send {
    /// Runs `program args...`; `Ok(stdout)` when it exits 0, `Err` with its stderr otherwise.
    fn run(&mut self, program: &str, args: &[String]) -> Result<String, ProgramError>;
}

/// The real runner. `programs` maps a program name (`k3s`) to the binary to run (tests and
/// unusual installs); otherwise the name is looked up in `PATH`.
#[derive(Debug, Clone, Default)]
pub struct SystemRunner {
    pub programs: Vec<(String, PathBuf)>,
}

impl CommandRunner for SystemRunner {
    fn run(&mut self, program: &str, args: &[String]) -> Result<String, ProgramError> {
        let binary = self
            .programs
            .iter()
            .find(|(name, _)| name == program)
            .map(|(_, path)| path.clone())
            .unwrap_or_else(|| PathBuf::from(program));
        let output = Command::new(&binary)
            .args(args)
            .output()
            .map_err(|source| ProgramError::Spawn {
                program: binary.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // k3s logs with logrus: the last lines say why.
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            Err(ProgramError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status: output.status.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            })
        }
    }
}
