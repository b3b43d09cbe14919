//! Retention of the backups `apply` and rotation write under
//! `/var/lib/irsa-agent/backups/<UTC time>[-n]/<host path>`.
//!
//! Each copy of k3s's `config.yaml` holds the cluster's `token:`, so copies are not kept
//! forever: per backed-up file, the newest [`Backups::keep`] copies are kept, and of those only
//! the newest one may be older than [`Backups::max_age`]. Folders listed as protected (the one
//! just written, and the one a pending `apply --no-restart` may need to go back to) are never
//! touched; folder names that are not a backup time are not ours and are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Backups;
use crate::fs;
use crate::host::HostRoot;
use crate::state;

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Copies removed (host paths).
    pub files: Vec<PathBuf>,
    /// Backup folders left empty and removed (host paths).
    pub folders: Vec<PathBuf>,
}

/// The Unix time and sequence number of a backup folder named by [`state::compact_stamp`]
/// (`20261122T080542Z`, or `20261122T080542Z-3` for the fourth in that second).
pub fn parse_folder_name(name: &str) -> Option<(u64, u32)> {
    let (stamp, n) = match name.split_once('-') {
        Some((stamp, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (stamp, n.parse().ok()?)
        }
        Some(_) => return None,
        None => (name, 0),
    };
    let b = stamp.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u64> {
        let s = stamp.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (y, mo, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (h, mi, s) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), the inverse of state::civil.
    let y = i64::try_from(y).ok()? - i64::from(mo <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mo = i64::try_from(mo).ok()?;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + i64::try_from(d).ok()? - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + i64::try_from(h * 3600 + mi * 60 + s).ok()?;
    Some((u64::try_from(secs).ok()?, n))
}

/// Every regular file (or symlink, never followed) under `dir`, relative to it.
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(rel);
            } else {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

/// Removes empty folders under `dir` (deepest first) and `dir` itself when empty.
fn remove_empty_folders(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_folders(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok()
}

/// Applies `retention` to the backup folders (see the module docs). `now` is Unix time;
/// `protect` are host paths of backup folders that must stay whole.
pub fn prune(
    root: &HostRoot,
    retention: &Backups,
    now: u64,
    protect: &[PathBuf],
) -> std::io::Result<Pruned> {
    let base = PathBuf::from(state::BACKUP_DIR);
    let mut folders: Vec<((u64, u32), PathBuf)> = Vec::new();
    match std::fs::read_dir(root.path(&base)) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                let Some(when) = name.to_str().and_then(parse_folder_name) else {
                    continue;
                };
                if entry.file_type()?.is_dir() {
                    folders.push((when, base.join(name)));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pruned::default()),
        Err(e) => return Err(e),
    }
    // Newest first.
    folders.sort_by_key(|f| std::cmp::Reverse(f.0));
    // Per backed-up file, its copies newest first: (folder time, folder).
    let mut copies: BTreeMap<PathBuf, Vec<(u64, &Path)>> = BTreeMap::new();
    for ((time, _), folder) in &folders {
        for rel in files_under(&root.path(folder))? {
            copies.entry(rel).or_default().push((*time, folder));
        }
    }
    let max_age = retention.max_age.as_secs();
    let mut pruned = Pruned::default();
    let mut touched: Vec<&Path> = Vec::new();
    for (rel, list) in &copies {
        for (i, (time, folder)) in list.iter().enumerate() {
            let too_many = i >= retention.keep;
            let too_old = i > 0 && now.saturating_sub(*time) > max_age;
            if !(too_many || too_old) || protect.iter().any(|p| p == folder) {
                continue;
            }
            let copy = folder.join(rel);
            fs::remove_durable(&root.path(&copy))?;
            pruned.files.push(copy);
            if !touched.contains(folder) {
                touched.push(folder);
            }
        }
    }
    for folder in touched {
        if remove_empty_folders(&root.path(folder)) {
            pruned.folders.push(folder.to_path_buf());
        }
    }
    if !pruned.folders.is_empty() {
        fs::sync_dir(&root.path(&base))?;
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: u64 = 86_400;

    #[test]
    fn folder_names_round_trip() {
        for secs in [0, 951_782_400, 1_795_334_742, 4_102_444_799] {
            let stamp = state::compact_stamp(secs);
            assert_eq!(parse_folder_name(&stamp), Some((secs, 0)), "{stamp}");
            assert_eq!(parse_folder_name(&format!("{stamp}-12")), Some((secs, 12)));
        }
        for bad in [
            "",
            "x",
            "20261122T080542",
            "20261122T080542Z-",
            "20261122T080542Z-a",
            "20261322T080542Z",
            "lost+found",
        ] {
            assert_eq!(parse_folder_name(bad), None, "{bad}");
        }
    }

    fn backup(root: &HostRoot, time: u64, n: u32, files: &[&str]) -> PathBuf {
        let mut name = state::compact_stamp(time);
        if n > 0 {
            name = format!("{name}-{n}");
        }
        let folder = Path::new(state::BACKUP_DIR).join(name);
        for file in files {
            let path = root.path(folder.join(file.trim_start_matches('/')));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, format!("token: {time}\n")).expect("write");
        }
        folder
    }

    fn exists(root: &HostRoot, folder: &Path, file: &str) -> bool {
        root.path(folder.join(file.trim_start_matches('/')))
            .exists()
    }

    #[test]
    fn keeps_the_newest_per_file_and_none_too_old_once_a_newer_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = HostRoot::new(dir.path());
        let now = 1_795_334_742;
        let k3s = "/etc/rancher/k3s/config.yaml";
        let manifest = "/etc/kubernetes/manifests/kube-apiserver.yaml";
        // 14 copies of k3s's config a day apart, the newest today (3 of them in one second).
        let mut k3s_folders: Vec<PathBuf> = (0..12)
            .map(|d| backup(&root, now - d * DAY, 0, &[k3s]))
            .collect();
        k3s_folders.push(backup(&root, now - 20 * DAY, 1, &[k3s]));
        k3s_folders.push(backup(&root, now - 20 * DAY, 2, &[k3s]));
        // One old copy of another file: the newest of its file, so kept whatever its age.
        let lone = backup(&root, now - 400 * DAY, 0, &[manifest]);
        // Not a backup folder: left alone.
        std::fs::create_dir_all(root.path(Path::new(state::BACKUP_DIR).join("notes")))
            .expect("mkdir");
        let retention = Backups {
            keep: 10,
            max_age: Duration::from_secs(30 * DAY),
        };
        let protect = vec![k3s_folders[12].clone()];
        let pruned = prune(&root, &retention, now, &protect).expect("prune");
        // Kept: the 10 newest, and the protected one; removed: the others.
        for (i, folder) in k3s_folders.iter().enumerate() {
            assert_eq!(exists(&root, folder, k3s), i < 10 || i == 12, "copy {i}");
            assert_eq!(root.path(folder).exists(), i < 10 || i == 12, "folder {i}");
        }
        assert_eq!(pruned.files.len(), 3, "{pruned:?}");
        assert_eq!(pruned.folders.len(), 3, "{pruned:?}");
        assert!(exists(&root, &lone, manifest));
        assert!(
            root.path(Path::new(state::BACKUP_DIR).join("notes"))
                .exists()
        );

        // Age: with keep 10 but max-age 5d, only copies at most 5 days old stay, and the
        // newest copy of each file whatever its age.
        let retention = Backups {
            keep: 10,
            max_age: Duration::from_secs(5 * DAY),
        };
        prune(&root, &retention, now, &[]).expect("prune");
        for (i, folder) in k3s_folders.iter().enumerate() {
            assert_eq!(exists(&root, folder, k3s), i <= 5, "copy {i}");
        }
        assert!(exists(&root, &lone, manifest));
        // keep 1: only the newest.
        let retention = Backups {
            keep: 1,
            max_age: Duration::from_secs(5 * DAY),
        };
        prune(&root, &retention, now, &[]).expect("prune");
        for (i, folder) in k3s_folders.iter().enumerate() {
            assert_eq!(exists(&root, folder, k3s), i == 0, "copy {i}");
        }
    }

    #[test]
    fn no_backup_folder_is_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = HostRoot::new(dir.path());
        let pruned = prune(&root, &Backups::default(), 1_795_334_742, &[]).expect("prune");
        assert_eq!(pruned, Pruned::default());
    }
}
