//! The one place that writes files on the host.
//!
//! [`write_atomic`] never truncates a file in place: it writes a hidden temp file beside the
//! target (`.<name>.irsa-agent-tmp.<pid>.<n>`; hidden so kubelet, which runs every non-dot file in
//! `/etc/kubernetes/manifests`, never sees it), fsyncs it, gives it the old file's mode and owner,
//! renames it over the target and fsyncs the directory. When the bytes are already equal it does
//! nothing, so callers can tell "changed" from "unchanged" and never restart for nothing.
//! [`sweep_temp_files`] removes temp files a crash left behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const TEMP_MARKER: &str = ".irsa-agent-tmp.";

/// Whether [`write_atomic`] changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Unchanged,
    Written,
}

/// Mode and owner for a new file; an existing file keeps its own.
#[derive(Debug, Clone, Copy)]
pub struct NewFile {
    pub mode: u32,
    /// `(uid, gid)`; `None` keeps the writer's.
    pub owner: Option<(u32, u32)>,
}

impl NewFile {
    pub const PRIVATE: NewFile = NewFile {
        mode: 0o600,
        owner: None,
    };
    pub const PUBLIC: NewFile = NewFile {
        mode: 0o644,
        owner: None,
    };
}

fn temp_path(target: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = format!(
        ".{}{TEMP_MARKER}{}.{n}",
        name.to_string_lossy(),
        std::process::id()
    );
    Ok(target.with_file_name(temp))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `contents` (see the module docs). Existing files keep their
/// mode and owner; new files get `new`.
pub fn write_atomic(path: &Path, contents: &[u8], new: NewFile) -> io::Result<WriteOutcome> {
    let existing = match fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if existing.is_some() && fs::read(path)? == contents {
        return Ok(WriteOutcome::Unchanged);
    }
    let (mode, owner) = match &existing {
        Some(meta) => (
            meta.permissions().mode() & 0o7777,
            Some((meta.uid(), meta.gid())),
        ),
        None => (new.mode, new.owner),
    };
    let temp = temp_path(path)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        // The umask may have narrowed the mode; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            let meta = file.metadata()?;
            if (meta.uid(), meta.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        crate::failpoint::hit("fs:before-rename");
        fs::rename(&temp, path)?;
        sync_dir(parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| WriteOutcome::Written)
}

/// Creates a directory (and parents) with `mode` for the ones it creates.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// Creates a new directory `dir` with `mode` (its parent must exist). Returns `false` when it
/// already exists, so callers can pick another name.
pub fn create_new_dir(dir: &Path, mode: u32) -> io::Result<bool> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            sync_dir(parent_of(dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `src` to `dst` for a backup: parent folders are created (0700), the copy gets the
/// source's mode and owner, and is durable (temp + fsync + rename + fsync dir). Returns the
/// bytes copied.
pub fn backup_copy(src: &Path, dst: &Path) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(src)?;
    let bytes = fs::read(src)?;
    create_dir_all(parent_of(dst), 0o700)?;
    write_atomic(
        dst,
        &bytes,
        NewFile {
            mode: meta.permissions().mode() & 0o7777,
            owner: Some((meta.uid(), meta.gid())),
        },
    )?;
    Ok(bytes)
}

/// Removes a file (a missing file is fine) and fsyncs its folder.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `dir` and any missing parents with exactly `mode` (whatever the umask), e.g. 0o755 for
/// directories a web server must traverse. Existing directories are left as they are.
pub fn create_dir_all_exact(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_all_exact(parent, mode)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    sync_dir(parent_of(dir))
}

/// Adds permission `bits` (e.g. 0o444, world-readable) to an existing file. Returns whether
/// the mode changed.
pub fn add_mode_bits(path: &Path, bits: u32) -> io::Result<bool> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
    if mode & bits == bits {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode | bits))?;
    Ok(true)
}

/// An exclusive advisory lock (flock) on a directory, released on drop. Serializes writers that
/// compare-then-replace files in it (two agents publishing to one directory).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Takes [`DirLock`] on `dir`, waiting for another holder.
pub fn lock_dir(dir: &Path) -> io::Result<DirLock> {
    let file = File::open(dir)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(DirLock { _dir: file })
}

/// Removes temp files a crashed writer left in `dir`. Returns how many it removed.
pub fn sweep_temp_files(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(TEMP_MARKER) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_keeps_mode_and_skips_equal_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f.yaml");
        assert_eq!(
            write_atomic(&path, b"a", NewFile::PRIVATE)?,
            WriteOutcome::Written
        );
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640))?;
        assert_eq!(
            write_atomic(&path, b"a", NewFile::PUBLIC)?,
            WriteOutcome::Unchanged
        );
        assert_eq!(
            write_atomic(&path, b"b", NewFile::PUBLIC)?,
            WriteOutcome::Written
        );
        assert_eq!(fs::read(&path)?, b"b");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o640);
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names.len(), 1);
        Ok(())
    }

    #[test]
    fn backups_keep_mode_and_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("config.yaml");
        fs::write(&src, "a: 1\r\n")?;
        fs::set_permissions(&src, fs::Permissions::from_mode(0o640))?;
        let dst = dir.path().join("backups/x/etc/config.yaml");
        assert_eq!(backup_copy(&src, &dst)?, b"a: 1\r\n");
        assert_eq!(fs::read(&dst)?, b"a: 1\r\n");
        assert_eq!(fs::metadata(&dst)?.permissions().mode() & 0o777, 0o640);
        remove_durable(&dst)?;
        remove_durable(&dst)?;
        assert!(!dst.exists());
        Ok(())
    }

    #[test]
    fn sweep_removes_only_our_temp_files() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(
            dir.path().join(".kube-apiserver.yaml.irsa-agent-tmp.12.0"),
            "x",
        )?;
        fs::write(dir.path().join("kube-apiserver.yaml"), "x")?;
        fs::write(dir.path().join(".other"), "x")?;
        assert_eq!(sweep_temp_files(dir.path())?, 1);
        assert_eq!(fs::read_dir(dir.path())?.count(), 2);
        Ok(())
    }
}
