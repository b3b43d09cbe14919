//! The executor: carries out a [`Plan`] on the host.
//!
//! 1. Checks that every file still has the bytes the plan was computed from.
//! 2. Backs each one up under `/var/lib/irsa-agent/backups/<UTC time>/<host path>` (never next
//!    to the file: kubelet runs every non-dot file in `/etc/kubernetes/manifests`), keeping
//!    mode and owner.
//! 3. Writes the new texts atomically and durably ([`crate::fs::write_atomic`]; mode and owner
//!    kept, hidden temp files, leftovers of a crash swept first).
//! 4. Restarts the apiserver (unless `--no-restart`) and waits until it is ready **and** its own
//!    discovery document shows the new signing issuer.
//! 5. On a failed restart or a timeout: restores every file from its backup (or removes a file
//!    it created), restarts again and fails with one line naming every restored path and its
//!    backup.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::FileChange;
use super::plan::Plan;
use super::probe::ApiserverProbe;
use super::ready::{self, Patience};
use super::restart::{Restart, ServiceManager};
use crate::clock::{Clock, SystemClock};
use crate::config::Backups;
use crate::fs::{self, NewFile};
use crate::host::HostRoot;
use crate::state::{self, InFlight, InFlightFile, IssuerState, State};

/// How to carry out the plan.
#[derive(Debug, Clone)]
pub struct Options {
    pub no_restart: bool,
    /// How long to wait for the apiserver after a restart.
    pub timeout: Duration,
    /// How often to ask it.
    pub poll: Duration,
    /// How long backups are kept (`backups:` of the configuration).
    pub backups: Backups,
    /// The clock the wait is measured on.
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            no_restart: false,
            timeout: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            backups: Backups::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl Options {
    fn patience(&self) -> Patience {
        Patience {
            timeout: self.timeout,
            poll: self.poll,
        }
    }
}

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    /// Host path.
    pub path: PathBuf,
    /// Host path of the backup (`None` for a file irsa-agent created).
    pub backup: Option<PathBuf>,
    pub created: bool,
}

/// What happened after writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartOutcome {
    /// Nothing was written.
    NotNeeded,
    /// `--no-restart`: the new flags take effect at the next restart.
    Pending(Restart),
    /// Restarted, and the apiserver serves the new issuer.
    Verified {
        restart: Restart,
        /// Unix time it was seen serving the new issuer.
        at: u64,
        waited: Duration,
    },
}

/// The result of [`execute`].
#[derive(Debug, Clone)]
pub struct Outcome {
    pub written: Vec<Written>,
    pub backup_dir: Option<PathBuf>,
    pub restart: RestartOutcome,
}

/// Why the plan could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Changed(String),
    /// The change was undone; the message names every restored file and its backup.
    #[error("{0}")]
    RolledBack(String),
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ApplyError {
    ApplyError::Io(format!("cannot {what} {}: {e}", path.display()))
}

/// A new backup folder for this run (host path).
fn backup_dir(root: &HostRoot, now: u64) -> Result<PathBuf, ApplyError> {
    let base = PathBuf::from(state::BACKUP_DIR);
    fs::create_dir_all(&root.path(&base), 0o700).map_err(|e| io_err("create", &base, e))?;
    let stamp = state::compact_stamp(now);
    // After the last folder of this second: pruning may have freed a lower number, and a
    // reused one would sort as older than it is.
    let first = std::fs::read_dir(root.path(&base))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| super::backups::parse_folder_name(&e.file_name().to_string_lossy()))
                .filter(|(time, _)| state::compact_stamp(*time) == stamp)
                .map(|(_, n)| n + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    for n in first..first + 1000 {
        let name = if n == 0 {
            stamp.clone()
        } else {
            format!("{stamp}-{n}")
        };
        let dir = base.join(name);
        match fs::create_new_dir(&root.path(&dir), 0o700) {
            Ok(true) => return Ok(dir),
            Ok(false) => continue,
            Err(e) => return Err(io_err("create", &dir, e)),
        }
    }
    Err(ApplyError::Io(format!(
        "cannot find a free backup folder name in {}",
        base.display()
    )))
}

/// Waits ([`ready::wait_until`]) until the apiserver is ready and serves `issuer` (or, with
/// `issuer` `None`, is ready). On a timeout, returns what it last answered.
async fn wait_for(
    probe: &mut dyn ApiserverProbe,
    issuer: Option<&str>,
    opts: &Options,
) -> Result<Duration, String> {
    wait_for_restarted(probe, issuer, None, opts).await
}

/// [`wait_for`], and when `before` is the start time of the apiserver process that ran before
/// the change, until a process started since serves it: a change that leaves the signing
/// issuer as it was (phase one of a rollout, finalize) would otherwise be "verified" by the old
/// process, before kubelet has even stopped it (kubeadm), and the restart Lease given back
/// while the restart is still to come.
async fn wait_for_restarted(
    probe: &mut dyn ApiserverProbe,
    issuer: Option<&str>,
    before: Option<f64>,
    opts: &Options,
) -> Result<Duration, String> {
    let what = match issuer {
        Some(i) => format!("waiting for kube-apiserver to serve issuer {i}"),
        None => "waiting for kube-apiserver to be ready".to_string(),
    };
    ready::wait_until(&what, opts.clock.as_ref(), opts.patience(), async || {
        let status = probe.check().await;
        if !(status.ready && issuer.is_none_or(|i| status.issuer.as_deref() == Some(i))) {
            return Err(status.detail);
        }
        match (before, probe.started_at().await) {
            (Some(b), Some(now)) if now == b => Err(format!(
                "{}, but it is still the process that ran before the change: waiting for its restart",
                status.detail
            )),
            _ => Ok(()),
        }
    })
    .await
}

fn look_at(restart: &Restart) -> String {
    match restart {
        Restart::Unit(unit) => format!("`journalctl -u {unit}`"),
        Restart::KubeletStaticPod => {
            "`crictl ps -a --name kube-apiserver` and `journalctl -u kubelet`".to_string()
        }
    }
}

/// The files already say what the plan wants, but the running apiserver has not been seen
/// serving `issuer`: it signs with another one (`apply --no-restart`, or a run killed between
/// writing and restarting), or it does not answer (killed right after writing: kubelet is
/// restarting the static pod, or the apiserver is down). Finishes what the interrupted run
/// would have done: waits until it answers; restarts it when it still serves another issuer;
/// waits until it is ready serving `issuer`; and when it does not come within the timeout,
/// restores the files from the backups recorded in `in_flight` (when there are any) and
/// restarts again. Never declares the change applied without having seen it served.
pub async fn resume(
    root: &HostRoot,
    restart: &Restart,
    issuer: &str,
    in_flight: Option<&InFlight>,
    services: &mut dyn ServiceManager,
    probe: &mut dyn ApiserverProbe,
    opts: &Options,
) -> Result<RestartOutcome, ApplyError> {
    let start = opts.clock.monotonic();
    // Seen ready, serving the issuer: the change is applied.
    let verified = || {
        let waited = opts.clock.monotonic().saturating_sub(start);
        log::info!(
            "kube-apiserver is ready and serves issuer {issuer} (after {}s)",
            waited.as_secs()
        );
        clear_in_flight(root);
        RestartOutcome::Verified {
            restart: restart.clone(),
            at: state::unix_now(),
            waited,
        }
    };
    // 1. Wait until it answers at all.
    let answered = wait_for(probe, None, opts).await;
    let mut restarted = false;
    let failure = match answered {
        Ok(_) => {
            let status = probe.check().await;
            if status.ready && status.issuer.as_deref() == Some(issuer) {
                return Ok(verified());
            }
            // 2. It answers with another issuer: the restart the change needs has not happened.
            let restart_failed = match restart {
                Restart::Unit(unit) => {
                    log::info!(
                        "kube-apiserver still serves {}: restarting {unit} (systemctl restart {unit})",
                        status.issuer.as_deref().unwrap_or("(unreadable)")
                    );
                    restarted = true;
                    services.restart(unit).err()
                }
                Restart::KubeletStaticPod => {
                    log::info!(
                        "kube-apiserver still serves {}: waiting for kubelet to restart it with the new manifest",
                        status.issuer.as_deref().unwrap_or("(unreadable)")
                    );
                    None
                }
            };
            match restart_failed {
                Some(e) => e.to_string(),
                None => match wait_for(probe, Some(issuer), opts).await {
                    Ok(_) => {
                        return Ok(verified());
                    }
                    Err(last) => format!(
                        "kube-apiserver did not become ready serving issuer {issuer} within {}s{} (last: {})",
                        opts.timeout.as_secs(),
                        if restarted {
                            " after the pending restart"
                        } else {
                            ""
                        },
                        last
                    ),
                },
            }
        }
        Err(last) => format!(
            "kube-apiserver did not answer within {}s while irsa-agent waited to verify the change it wrote (issuer {issuer}; last: {last})",
            opts.timeout.as_secs(),
        ),
    };
    // 3. Roll back, as the interrupted run would have.
    let Some(change) = in_flight.filter(|c| !c.files.is_empty()) else {
        return Err(ApplyError::Io(format!(
            "{failure}; its configuration files were already in place and irsa-agent has no record of their backups, so nothing was restored: look at {}",
            look_at(restart)
        )));
    };
    let restored = restore_in_flight(root, change);
    let mut message = format!("{failure}; {restored}");
    match restart {
        Restart::Unit(unit) => match services.restart(unit) {
            Ok(()) => message.push_str(&format!("; restarted {unit} again")),
            Err(e) => message.push_str(&format!("; restarting {unit} again failed too: {e}")),
        },
        Restart::KubeletStaticPod => {
            message.push_str("; kubelet restarts the static pod with the restored manifest")
        }
    }
    match wait_for(probe, None, opts).await {
        Ok(_) => message.push_str("; the apiserver is ready with the old configuration"),
        Err(last) => message.push_str(&format!(
            "; the apiserver is still not ready ({last}): look at {} now",
            look_at(restart)
        )),
    }
    clear_in_flight(root);
    Err(ApplyError::RolledBack(message))
}

/// Forgets the change in flight (it was verified or rolled back).
fn clear_in_flight(root: &HostRoot) {
    if let Err(e) = State::update(root, |s| s.set_in_flight(None)) {
        log::warn!("cannot clear the change in flight from the state: {e}");
    }
}

/// Puts back the files of a change in flight from their backups (removes the ones it
/// created), leaving alone any file changed since it was written.
fn restore_in_flight(root: &HostRoot, change: &InFlight) -> String {
    let mut parts = Vec::new();
    for f in &change.files {
        let path = root.path(&f.path);
        let current = std::fs::read(&path).ok();
        if current.as_deref() != Some(f.written.as_bytes()) {
            parts.push(format!(
                "left {} alone: it changed since irsa-agent wrote it",
                f.path.display()
            ));
            continue;
        }
        let result = match &f.backup {
            Some(backup) => std::fs::read(root.path(backup))
                .and_then(|bytes| fs::write_atomic(&path, &bytes, NewFile::PRIVATE).map(|_| ())),
            None => fs::remove_durable(&path),
        };
        parts.push(match (result, &f.backup) {
            (Ok(()), Some(b)) => format!("restored {} from {}", f.path.display(), b.display()),
            (Ok(()), None) => format!("removed {} (irsa-agent had created it)", f.path.display()),
            (Err(e), Some(b)) => format!(
                "FAILED to restore {} from {} ({e}): copy it back by hand",
                f.path.display(),
                b.display()
            ),
            (Err(e), None) => format!(
                "FAILED to remove {} ({e}): delete it by hand",
                f.path.display()
            ),
        });
    }
    parts.join("; ")
}

/// Files written by [`write_changes`]: what was written, and the bytes to put back.
#[derive(Debug)]
pub struct Prepared {
    pub written: Vec<Written>,
    pub backup_dir: PathBuf,
    originals: Vec<Option<Vec<u8>>>,
}

impl Prepared {
    /// Puts every original file back (removes the ones irsa-agent created); returns a one-line
    /// account naming each path and its backup.
    pub fn restore(&self, root: &HostRoot) -> String {
        restore(root, &self.written, &self.originals)
    }
}

/// Steps 1-3 of the executor (see the module docs): checks that every file still has the bytes
/// the changes were computed from, sweeps temp files, backs the files up and writes the new
/// texts atomically (a failure half-way restores what was written), then prunes older backups
/// by `retention` ([`super::backups`]). `None` when there is nothing to change. Used by
/// [`execute`] and by key rotation, which waits for the apiserver in its own way.
pub fn write_changes(
    root: &HostRoot,
    changes: &[FileChange],
    now: u64,
    retention: &Backups,
) -> Result<Option<Prepared>, ApplyError> {
    if changes.is_empty() {
        return Ok(None);
    }
    // 1. Nothing may have changed since the plan was made.
    for change in changes {
        let path = root.path(&change.path);
        // Also refuses, before anything is written, a link or a FIFO where a file belongs.
        let current = fs::read_replaceable(&path).map_err(|e| io_err("change", &change.path, e))?;
        if current.as_deref() != change.old.as_deref().map(str::as_bytes) {
            return Err(ApplyError::Changed(format!(
                "{} changed while irsa-agent was planning; nothing was written, run apply again",
                change.path.display()
            )));
        }
        if let Some(dir) = path.parent() {
            match fs::sweep_temp_files(dir) {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "removed {n} temp file(s) an interrupted write left in {}",
                    root.host_view(dir).display()
                ),
                Err(e) => return Err(io_err("clean up temp files in", dir, e)),
            }
        }
    }
    // 2. Backups.
    let dir = backup_dir(root, now)?;
    let mut written: Vec<Written> = Vec::new();
    let mut originals: Vec<Option<Vec<u8>>> = Vec::new();
    for change in changes {
        if change.old.is_some() {
            let backup = dir.join(change.path.strip_prefix("/").unwrap_or(&change.path));
            let bytes = fs::backup_copy(&root.path(&change.path), &root.path(&backup))
                .map_err(|e| io_err("back up", &change.path, e))?;
            originals.push(Some(bytes));
            written.push(Written {
                path: change.path.clone(),
                backup: Some(backup),
                created: false,
            });
        } else {
            originals.push(None);
            written.push(Written {
                path: change.path.clone(),
                backup: None,
                created: true,
            });
        }
    }
    crate::failpoint::hit("apply:after-backup");
    // 3. Writes. A failure half-way restores what was written.
    for (i, change) in changes.iter().enumerate() {
        let path = root.path(&change.path);
        let result = (|| {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent, 0o755)?;
            }
            fs::write_atomic(&path, change.new.as_bytes(), NewFile::PRIVATE)
        })();
        if let Err(e) = result {
            let restored = restore(root, &written[..i], &originals[..i]);
            return Err(ApplyError::Io(format!(
                "cannot write {}: {e}; {restored}",
                change.path.display()
            )));
        }
        log::info!(
            "wrote {}{}",
            change.path.display(),
            written[i]
                .backup
                .as_ref()
                .map(|b| format!(" (backup {})", b.display()))
                .unwrap_or_else(|| " (new file)".to_string())
        );
    }
    prune_backups(root, retention, now, Some(&dir));
    Ok(Some(Prepared {
        written,
        backup_dir: dir,
        originals,
    }))
}

/// Applies the retention (after a new backup, and from the daemon's converges, so that age
/// counts without new changes), keeping `new` and the backup a pending `apply --no-restart`
/// would go back to. A failure is logged, never fatal.
pub fn prune_backups(root: &HostRoot, retention: &Backups, now: u64, new: Option<&Path>) {
    let mut protect: Vec<PathBuf> = new.map(Path::to_path_buf).into_iter().collect();
    match State::load(root) {
        Ok(state) => protect.extend(state.issuer.and_then(|i| i.pending_backup)),
        Err(e) => {
            log::warn!("backups not pruned: {e}");
            return;
        }
    }
    match super::backups::prune(root, retention, now, &protect) {
        Ok(pruned) if pruned.files.is_empty() => {}
        Ok(pruned) => log::info!(
            "removed {} old backup cop{} ({} folder(s)) under {} (backups: keep {}, max-age {})",
            pruned.files.len(),
            if pruned.files.len() == 1 { "y" } else { "ies" },
            pruned.folders.len(),
            state::BACKUP_DIR,
            retention.keep,
            crate::config::format_duration(retention.max_age)
        ),
        Err(e) => log::warn!("cannot prune old backups under {}: {e}", state::BACKUP_DIR),
    }
}

/// Carries out `plan`. `now` is the Unix time used for the backup folder name.
pub async fn execute(
    root: &HostRoot,
    plan: &Plan,
    restart: &Restart,
    services: &mut dyn ServiceManager,
    probe: &mut dyn ApiserverProbe,
    opts: &Options,
    now: u64,
) -> Result<Outcome, ApplyError> {
    // The process that runs now, to tell its restarted successor from it (kubelet restarts a
    // static pod a little after the manifest changes).
    let before = match opts.no_restart {
        true => None,
        false => probe.started_at().await,
    };
    let Some(prepared) = write_changes(root, &plan.changes, now, &opts.backups)? else {
        return Ok(Outcome {
            written: Vec::new(),
            backup_dir: None,
            restart: RestartOutcome::NotNeeded,
        });
    };
    let Prepared {
        written,
        backup_dir: dir,
        originals,
    } = prepared;
    // Before anything else: a run killed from here on leaves the record the next run needs
    // to verify the change (and to roll it back when the apiserver does not come).
    let issuer = plan.desired.issuers.first().cloned().unwrap_or_default();
    let change = InFlight {
        issuer: issuer.clone(),
        written_at: now,
        no_restart: opts.no_restart,
        backup_dir: Some(dir.clone()),
        files: plan
            .changes
            .iter()
            .zip(&written)
            .map(|(c, w)| InFlightFile {
                path: w.path.clone(),
                backup: w.backup.clone(),
                written: c.new.clone(),
            })
            .collect(),
    };
    // Only a change of the signing issuer can be verified from outside (the apiserver's own
    // discovery document shows it); other changes (phase one of a rollout, a jwks-uri) are
    // verified by this run only.
    if plan.switches_issuer()
        && let Err(e) = State::update(root, |s| s.set_in_flight(Some(&change)))
    {
        let restored = restore(root, &written, &originals);
        return Err(ApplyError::Io(format!(
            "cannot record the change in the state file ({e}), so it could not be verified after a crash; {restored}"
        )));
    }
    crate::failpoint::hit("apply:after-write");
    if opts.no_restart {
        return Ok(Outcome {
            written,
            backup_dir: Some(dir),
            restart: RestartOutcome::Pending(restart.clone()),
        });
    }
    // 4. Restart and verify.
    let failure = match restart {
        Restart::Unit(unit) => {
            log::info!("restarting {unit} (systemctl restart {unit})");
            services.restart(unit).err()
        }
        Restart::KubeletStaticPod => {
            log::info!("kubelet restarts the kube-apiserver static pod with the new manifest");
            None
        }
    };
    crate::failpoint::hit("apply:after-restart");
    let failure = match failure {
        Some(e) => e.to_string(),
        None => match wait_for_restarted(probe, Some(&issuer), before, opts).await {
            Ok(waited) => {
                log::info!(
                    "kube-apiserver is ready and serves issuer {issuer} (after {}s)",
                    waited.as_secs()
                );
                return Ok(Outcome {
                    written,
                    backup_dir: Some(dir),
                    restart: RestartOutcome::Verified {
                        restart: restart.clone(),
                        at: state::unix_now(),
                        waited,
                    },
                });
            }
            Err(last) => format!(
                "kube-apiserver did not become ready serving issuer {issuer} within {}s (last: {last})",
                opts.timeout.as_secs(),
            ),
        },
    };
    // 5. Roll back.
    let restored = restore(root, &written, &originals);
    if plan.switches_issuer() {
        clear_in_flight(root);
    }
    let mut message = format!("{failure}; {restored}");
    match restart {
        Restart::Unit(unit) => match services.restart(unit) {
            Ok(()) => message.push_str(&format!("; restarted {unit} again")),
            Err(e) => message.push_str(&format!("; restarting {unit} again failed too: {e}")),
        },
        Restart::KubeletStaticPod => {
            message.push_str("; kubelet restarts the static pod with the restored manifest")
        }
    }
    match wait_for(probe, None, opts).await {
        Ok(_) => message.push_str("; the apiserver is ready with the old configuration"),
        Err(last) => message.push_str(&format!(
            "; the apiserver is still not ready ({last}): look at {} now",
            look_at(restart)
        )),
    }
    Err(ApplyError::RolledBack(message))
}

/// Puts the original files back; returns a one-line account naming each path and its backup.
fn restore(root: &HostRoot, written: &[Written], originals: &[Option<Vec<u8>>]) -> String {
    let mut parts = Vec::new();
    for (w, original) in written.iter().zip(originals).rev() {
        let path = root.path(&w.path);
        let result = match original {
            Some(bytes) => fs::write_atomic(&path, bytes, NewFile::PRIVATE).map(|_| ()),
            None => fs::remove_durable(&path),
        };
        parts.push(match (result, &w.backup) {
            (Ok(()), Some(backup)) => {
                format!("restored {} from {}", w.path.display(), backup.display())
            }
            (Ok(()), None) => format!("removed {} (irsa-agent had created it)", w.path.display()),
            (Err(e), Some(backup)) => format!(
                "FAILED to restore {} from {} ({e}): copy it back by hand",
                w.path.display(),
                backup.display()
            ),
            (Err(e), None) => format!(
                "FAILED to remove {} ({e}): delete it by hand",
                w.path.display()
            ),
        });
    }
    parts.reverse();
    parts.join("; ")
}

/// Records what `apply` did in the state.
pub fn record(state: &mut State, plan: &Plan, outcome: &Outcome, now: u64) {
    let Some(first) = plan.desired.issuers.first().cloned() else {
        return;
    };
    let previous: Vec<String> = plan.desired.issuers[1..].to_vec();
    let entry = state.issuer.get_or_insert_with(IssuerState::default);
    // A repaired hand migration counts as a switch too: until the apiserver restarts with the
    // in-cluster audiences back, default tokens are minted with the external audience alone,
    // and `finalize` may drop that audience only the longest token lifetime after.
    let repair = !plan.kept_external_audiences().is_empty() && !plan.changes.is_empty();
    if entry.issuer != first || plan.switches_issuer() || repair {
        // A (new or repeated) switch: tokens with an older issuer may be minted until the
        // apiserver is seen serving this one.
        entry.switched_at = None;
        entry.pending_restart_since = None;
        entry.pending_backup = None;
    }
    entry.issuer = first;
    entry.previous = previous;
    entry.distribution = Some(plan.distribution);
    match &outcome.restart {
        // A pending restart: the apiserver signed with another issuer until just now.
        RestartOutcome::Verified { at, .. } if plan.in_sync() => {
            entry.switched_at = Some(*at);
            entry.pending_restart_since = None;
            entry.pending_backup = None;
        }
        RestartOutcome::Verified { at, .. } => {
            entry.switched_at.get_or_insert(*at);
            entry.pending_restart_since = None;
            entry.pending_backup = None;
            entry.applied_at = now;
            state.set_in_flight(None);
        }
        RestartOutcome::Pending(_) => {
            // The backup of the first pending change holds the files as the running apiserver
            // read them: the one to go back to, kept until the restart is seen.
            if entry.pending_restart_since.is_none() {
                entry.pending_backup = outcome.backup_dir.clone();
            }
            entry.pending_restart_since.get_or_insert(now);
            entry.applied_at = now;
        }
        RestartOutcome::NotNeeded => {}
    }
    if matches!(outcome.restart, RestartOutcome::Verified { .. }) {
        state.set_in_flight(None);
    }
}

/// The running apiserver was seen serving `issuer` (the files already said so): the first
/// evidence that the change irsa-agent wrote is in effect.
pub fn record_seen_serving(state: &mut State, issuer: &str, at: u64) {
    if let Some(entry) = state.issuer.as_mut().filter(|e| e.issuer == issuer) {
        entry.switched_at.get_or_insert(at);
        entry.pending_restart_since = None;
    }
    if state.in_flight().is_some_and(|c| c.issuer == issuer) {
        state.set_in_flight(None);
    }
}

/// Why the running apiserver must be seen serving `issuer` before the change irsa-agent
/// wrote may be called applied: a change in flight (written, never seen served), or a switch
/// to `issuer` recorded but never seen (`--no-restart`). `None`: nothing unverified.
pub fn unverified_change(state: &State, issuer: &str) -> Option<String> {
    if let Some(c) = state.in_flight().filter(|c| c.issuer == issuer) {
        return Some(format!(
            "irsa-agent wrote the change to issuer {issuer} at {}{} and has not seen the running apiserver serve it since",
            state::rfc3339(c.written_at),
            if c.no_restart { " (--no-restart)" } else { "" }
        ));
    }
    let entry = state.issuer.as_ref().filter(|e| e.issuer == issuer)?;
    if entry.switched_at.is_some() {
        return None;
    }
    Some(format!(
        "irsa-agent switched the configuration to issuer {issuer}{} and has not seen the running apiserver serve it since",
        entry
            .pending_restart_since
            .map(|t| format!(" at {} (restart pending)", state::rfc3339(t)))
            .unwrap_or_default()
    ))
}

/// Why old issuers may or may not be retired now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalizeDecision {
    /// `apply` has not switched this host to the configured issuer.
    NotApplied,
    /// Only the configured issuer is accepted.
    NothingToRetire,
    /// The switch was written but the apiserver has not been seen serving it yet.
    AwaitingSwitch {
        retire: Vec<String>,
    },
    /// Tokens with an old issuer may still be valid.
    TooEarly {
        retire: Vec<String>,
        switched_at: u64,
        remaining: Duration,
    },
    Ready {
        retire: Vec<String>,
    },
}

/// The pure rule behind `finalize`: old issuers (and the external audiences `drop`, kept by a
/// hand-migration repair) go only once every token minted with them has expired, i.e.
/// `lifetime` after the apiserver was first seen signing with the new issuer (or restarted with
/// the in-cluster audiences back).
pub fn finalize_decision(
    state: Option<&IssuerState>,
    configured: &str,
    current_issuers: &[String],
    drop: &[String],
    now: u64,
    lifetime: Duration,
) -> FinalizeDecision {
    let Some(st) = state.filter(|s| s.issuer == configured) else {
        return FinalizeDecision::NotApplied;
    };
    if current_issuers.first().map(String::as_str) != Some(configured) {
        return FinalizeDecision::NotApplied;
    }
    let retire: Vec<String> = current_issuers
        .iter()
        .skip(1)
        .filter(|i| st.previous.contains(i))
        .cloned()
        .collect();
    if retire.is_empty() && drop.is_empty() {
        return FinalizeDecision::NothingToRetire;
    }
    let Some(switched_at) = st.switched_at else {
        return FinalizeDecision::AwaitingSwitch { retire };
    };
    let age = Duration::from_secs(now.saturating_sub(switched_at));
    if age <= lifetime {
        return FinalizeDecision::TooEarly {
            retire,
            switched_at,
            remaining: lifetime - age,
        };
    }
    FinalizeDecision::Ready { retire }
}

/// The longest lifetime a token minted here can have: `configured` (`rotation.token-lifetime`)
/// or the apiserver's `--service-account-max-token-expiration`, whichever is longer. What
/// `finalize` (by hand or by the daemon) waits after the switch.
pub fn longest_token_lifetime(configured: Duration, observed: &super::Observed) -> Duration {
    observed
        .flags
        .max_token_expiration
        .as_deref()
        .and_then(super::flags::parse_go_duration)
        .map_or(configured, |max| configured.max(max))
}

/// The audiences `finalize` looks at: the external ones in `--api-audiences`
/// (`sts.amazonaws.com`, ...), and the in-cluster ones missing from it (those `apply` puts back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalizeAudiences {
    /// `--api-audiences` as in force.
    pub in_force: Vec<String>,
    /// External audiences in force: dropped with the old issuers.
    pub external: Vec<String>,
    /// In-cluster audiences not in force. While any is missing the external ones must stay:
    /// default tokens are minted with the external audience alone.
    pub missing: Vec<String>,
}

impl FinalizeAudiences {
    pub fn of(observed: &super::Observed, previous: &[String]) -> FinalizeAudiences {
        let origin = super::plan::origin(observed, previous);
        let in_force = observed.flags.effective_audiences();
        let external = in_force
            .iter()
            .filter(|a| super::plan::is_external_audience(a))
            .cloned()
            .collect();
        let missing = origin
            .audiences
            .iter()
            .filter(|a| !in_force.contains(a))
            .cloned()
            .collect();
        FinalizeAudiences {
            in_force,
            external,
            missing,
        }
    }

    /// The external audiences would go while an in-cluster one is missing: refuse.
    pub fn blocked(&self) -> bool {
        !self.external.is_empty() && !self.missing.is_empty()
    }
}

/// Records a successful `finalize`.
pub fn record_finalize(state: &mut State, retired: &[String], outcome: &Outcome, now: u64) {
    if let Some(entry) = state.issuer.as_mut() {
        entry.previous.retain(|i| !retired.contains(i));
        for r in retired {
            if !entry.retired.contains(r) {
                entry.retired.push(r.clone());
            }
        }
        if !matches!(outcome.restart, RestartOutcome::NotNeeded) {
            entry.finalized_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(switched_at: Option<u64>) -> IssuerState {
        IssuerState {
            issuer: "https://new".into(),
            previous: vec!["https://old".into()],
            switched_at,
            ..Default::default()
        }
    }

    #[test]
    fn finalize_waits_for_the_longest_token_lifetime() {
        let day = Duration::from_secs(86_400);
        let current = vec!["https://new".to_string(), "https://old".to_string()];
        assert_eq!(
            finalize_decision(None, "https://new", &current, &[], 0, day),
            FinalizeDecision::NotApplied
        );
        assert_eq!(
            finalize_decision(Some(&state(None)), "https://new", &current, &[], 0, day),
            FinalizeDecision::AwaitingSwitch {
                retire: vec!["https://old".into()]
            }
        );
        assert_eq!(
            finalize_decision(
                Some(&state(Some(1000))),
                "https://new",
                &current,
                &[],
                1000 + 3600,
                day
            ),
            FinalizeDecision::TooEarly {
                retire: vec!["https://old".into()],
                switched_at: 1000,
                remaining: day - Duration::from_secs(3600),
            }
        );
        assert_eq!(
            finalize_decision(
                Some(&state(Some(1000))),
                "https://new",
                &current,
                &[],
                1000 + 86_401,
                day
            ),
            FinalizeDecision::Ready {
                retire: vec!["https://old".into()]
            }
        );
        // An issuer the user added by hand is not irsa-agent's to retire.
        let current = vec!["https://new".to_string(), "https://mine".to_string()];
        assert_eq!(
            finalize_decision(
                Some(&state(Some(0))),
                "https://new",
                &current,
                &[],
                999_999,
                day
            ),
            FinalizeDecision::NothingToRetire
        );
        // An external audience kept by a hand-migration repair waits like an old issuer.
        let sts = vec!["sts.amazonaws.com".to_string()];
        assert_eq!(
            finalize_decision(
                Some(&state(Some(0))),
                "https://new",
                &current,
                &sts,
                60,
                day
            ),
            FinalizeDecision::TooEarly {
                retire: Vec::new(),
                switched_at: 0,
                remaining: day - Duration::from_secs(60),
            }
        );
        // Configured issuer changed since: apply first.
        assert_eq!(
            finalize_decision(
                Some(&state(Some(0))),
                "https://other",
                &current,
                &[],
                999_999,
                day
            ),
            FinalizeDecision::NotApplied
        );
    }
}
