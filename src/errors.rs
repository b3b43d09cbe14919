//! An error and its causes in one line, the way every command and the daemon print them; and
//! the error of the ports that run a host program ([`ProgramError`]).

use std::path::PathBuf;

/// A host program (`systemctl restart`, `k3s certificate rotate-ca`) could not be run or
/// failed. The error of [`crate::apiserver::restart::ServiceManager`] and
/// [`crate::rotation::runner::CommandRunner`].
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// It could not be started (not installed, not executable).
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// It ran and failed: the command line, how it exited, and the last lines it printed.
    #[error("`{command}` failed ({status}): {output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
}

/// The error and its causes, joined by ": ", each cause only when the text so far does not
/// already say it (typed errors often print their source in their own message; `{:#}` would
/// then print it twice: "cannot read X: no such file: no such file"; object_store puts the
/// store's answer in the sources).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::other("no such file");
        let outer = anyhow::Error::new(io).context("cannot read /etc/x: no such file");
        assert_eq!(
            super::chain(outer.as_ref()),
            "cannot read /etc/x: no such file"
        );
        let outer = anyhow::anyhow!("denied").context("cannot publish");
        assert_eq!(super::chain(outer.as_ref()), "cannot publish: denied");
    }
}
