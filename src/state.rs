//! The agent's own state: `/var/lib/irsa-agent/state.json` (under the host root).
//!
//! One small JSON object written atomically (through [`crate::fs::write_atomic`]) after every
//! step that matters. Each feature owns one top-level key; keys this version does not know are
//! kept as they are, so features added later (rotation, publishing) can share the file.
//!
//! ```json
//! {
//!   "issuer": {
//!     "issuer": "https://oidc.example.com/homelab",
//!     "previous": ["https://kubernetes.default.svc.cluster.local"],
//!     "switched_at": 1795000000,
//!     "pending_restart_since": null,
//!     "distribution": "k3s",
//!     "applied_at": 1795000000,
//!     "retired": [],
//!     "finalized_at": null
//!   }
//! }
//! ```

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::fs::{self, NewFile};
use crate::host::HostRoot;

/// Host path of the state directory.
pub const STATE_DIR: &str = "/var/lib/irsa-agent";
/// Host path of the state file.
pub const STATE_FILE: &str = "/var/lib/irsa-agent/state.json";
/// Host path of the backup directory.
pub const BACKUP_DIR: &str = "/var/lib/irsa-agent/backups";

/// What `apply`/`finalize` remember about the issuer switch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerState {
    /// The issuer irsa-agent made the signing (first) issuer.
    pub issuer: String,
    /// The other issuers still accepted, to be retired by `finalize`.
    #[serde(default)]
    pub previous: Vec<String>,
    /// Unix time when the apiserver was first seen serving `issuer` (after a verified restart,
    /// or observed later). Tokens with an old issuer may have been minted until then.
    #[serde(default)]
    pub switched_at: Option<u64>,
    /// Unix time of an `apply --no-restart` whose restart has not been seen yet.
    #[serde(default)]
    pub pending_restart_since: Option<u64>,
    /// Host path of the backup folder written by the change that awaits its restart (the
    /// files as the running apiserver read them); backup pruning keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_backup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<crate::config::Distribution>,
    #[serde(default)]
    pub applied_at: u64,
    /// Issuers `finalize` removed.
    #[serde(default)]
    pub retired: Vec<String>,
    #[serde(default)]
    pub finalized_at: Option<u64>,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<IssuerState>,
    /// Keys owned by other features, kept verbatim.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The state file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid irsa-agent state ({source}); move it away to start over", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl State {
    /// Reads the state; a missing file is an empty state.
    pub fn load(root: &HostRoot) -> Result<State, StateError> {
        let path = root.path(STATE_FILE);
        match crate::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: PathBuf::from(STATE_FILE),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Read {
                path: PathBuf::from(STATE_FILE),
                source,
            }),
        }
    }

    /// Writes the state atomically (0600, directory 0700). Private: every writer goes through
    /// [`State::update`], so no writer's snapshot overwrites another's change.
    fn save(&self, root: &HostRoot) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: PathBuf::from(STATE_FILE),
            source,
        };
        fs::create_dir_all(&root.path(STATE_DIR), 0o700).map_err(err)?;
        let mut text =
            serde_json::to_string_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        text.push('\n');
        fs::write_atomic(&root.path(STATE_FILE), text.as_bytes(), NewFile::PRIVATE).map_err(err)?;
        Ok(())
    }
}

impl State {
    /// Loads the state, lets `change` modify it, and saves it, holding an flock on the state
    /// directory throughout, so that features writing their own key from different processes
    /// (`apply` from a terminal while `run` works) do not lose each other's updates.
    pub fn update<T>(
        root: &HostRoot,
        change: impl FnOnce(&mut State) -> T,
    ) -> Result<T, StateError> {
        let err = |source| StateError::Write {
            path: PathBuf::from(STATE_FILE),
            source,
        };
        fs::create_dir_all(&root.path(STATE_DIR), 0o700).map_err(err)?;
        let _lock = fs::lock_dir(&root.path(STATE_DIR)).map_err(err)?;
        let mut state = State::load(root)?;
        let out = change(&mut state);
        state.save(root)?;
        Ok(out)
    }

    /// A section another feature owns (`daemon`, `rotation`, ...), if present.
    pub fn section(&self, key: &str) -> Option<&serde_json::Value> {
        self.other.get(key)
    }

    /// The apiserver change `apply` (or the daemon) wrote and has not yet seen the running
    /// apiserver serve; `None` when there is none or the section is unreadable.
    pub fn in_flight(&self) -> Option<InFlight> {
        serde_json::from_value(self.other.get(IN_FLIGHT_KEY)?.clone()).ok()
    }

    pub fn set_in_flight(&mut self, change: Option<&InFlight>) {
        match change.and_then(|c| serde_json::to_value(c).ok()) {
            Some(v) => {
                self.other.insert(IN_FLIGHT_KEY.to_string(), v);
            }
            None => {
                self.other.remove(IN_FLIGHT_KEY);
            }
        }
    }
}

/// The state file's section for an apiserver change in flight.
pub const IN_FLIGHT_KEY: &str = "apply_in_flight";

/// An apiserver configuration change that was written (saved right after the write, before
/// the restart) but not yet seen served: a run that is killed after writing leaves it, and the
/// next `apply` (or the daemon) waits for the apiserver, verifies it, and rolls the files back
/// from these backups when it does not come, as the interrupted run would have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The issuer the apiserver must serve (the first `--service-account-issuer` written).
    pub issuer: String,
    pub written_at: u64,
    /// `--no-restart`: the restart was left to the operator.
    #[serde(default)]
    pub no_restart: bool,
    pub backup_dir: Option<PathBuf>,
    pub files: Vec<InFlightFile>,
}

/// One file of an [`InFlight`] change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightFile {
    /// Host path.
    pub path: PathBuf,
    /// Host path of its backup; `None`: irsa-agent created the file (a rollback removes it).
    pub backup: Option<PathBuf>,
    /// What was written, so a rollback never undoes someone else's later edit.
    pub written: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// (year, month, day, hour, minute, second) in UTC.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// `2026-11-22T07:05:42Z`.
pub fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20261122T070542Z`: for file names.
pub fn compact_stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_334_742), "2026-11-22T08:05:42Z");
        assert_eq!(compact_stamp(1_795_334_742), "20261122T080542Z");
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let root = HostRoot::new(dir.path());
        assert_eq!(State::load(&root)?, State::default());
        std::fs::create_dir_all(root.path(STATE_DIR))?;
        std::fs::write(
            root.path(STATE_FILE),
            r#"{"rotation":{"phase":"idle"},"issuer":{"issuer":"https://a"}}"#,
        )?;
        let mut state = State::load(&root)?;
        assert_eq!(
            state.issuer.as_ref().map(|i| i.issuer.as_str()),
            Some("https://a")
        );
        state.issuer = Some(IssuerState {
            issuer: "https://b".into(),
            ..Default::default()
        });
        state.save(&root)?;
        let again = State::load(&root)?;
        assert_eq!(again.other.get("rotation"), state.other.get("rotation"));
        assert_eq!(
            again.issuer.map(|i| i.issuer),
            Some("https://b".to_string())
        );
        Ok(())
    }
}
