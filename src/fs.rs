//! The one place that touches files on the host.
//!
//! The agent runs as root next to `sa.key` and `ca.key`, and some folders it works in belong to
//! other users (a publish target a web server or a deploy job also writes). So every reader and
//! writer here follows the same rules:
//!
//! * **Never follow a link where someone else can write, never act by path after a check.**
//!   Files are opened relative to a directory handle with `O_NOFOLLOW`; mode and owner are set on
//!   the open temp file (`fchmod`/`fchown`) before the rename, never by path afterwards.
//!   Folders that other users may write (publish targets) are walked one component at a time by
//!   [`tree`], checking each folder's owner and mode.
//! * **Never hang, never read unbounded.** Readers open with `O_NONBLOCK`, insist on a regular
//!   file (a FIFO, a device or a socket is refused, never read) and read at most a stated cap
//!   ([`CAP`] for key files, config files, manifests and state), naming the cap in the error.
//!   A symbolic link is followed only to a regular file owned by root (or by the agent's own
//!   user): users legitimately link `config.yaml` or a key into place, but never to someone
//!   else's file.
//! * **Never half-written.** [`write_atomic`] never truncates a file in place: it writes a hidden
//!   temp file beside the target (`.<name>.irsa-agent-tmp.<pid>.<n>`; hidden so kubelet, which
//!   runs every non-dot file in `/etc/kubernetes/manifests`, never sees it), fsyncs it, renames
//!   it over the target and fsyncs the directory. When the bytes are already equal it does
//!   nothing, so callers can tell "changed" from "unchanged" and never restart for nothing. It
//!   refuses to replace a symbolic link (a config file managed elsewhere through a link is the
//!   user's to change) or anything that is not a regular file.
//!   [`sweep_temp_files`] removes temp files a crash left behind.

pub mod tree;

use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

const TEMP_MARKER: &str = ".irsa-agent-tmp.";

/// The most the agent reads of a key file, a config file or fragment, a manifest, its state or
/// a credentials file: 1 MiB, hundreds of times what a real one holds.
pub const CAP: u64 = 1 << 20;

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

/// An error about `path` worded for the user: `path` and the cause.
pub(crate) fn refuse(kind: io::ErrorKind, message: String) -> io::Error {
    io::Error::new(kind, message)
}

/// Words a file type for messages.
pub(crate) fn type_name(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "not a regular file",
    }
}

/// True for the agent's own user and root: owners whose files the agent trusts.
pub(crate) fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

fn too_large(cap: u64) -> io::Error {
    refuse(
        io::ErrorKind::InvalidData,
        format!(
            "larger than the {} limit for this kind of file; is it the right file?",
            human_size(cap)
        ),
    )
}

/// `1 MiB`, `64 KiB`, `100 bytes`.
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads at most `cap` bytes from an open file; more is an error.
fn read_capped_fd(fd: OwnedFd, cap: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::from(fd).take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large(cap));
    }
    Ok(bytes)
}

/// Reads a whole regular file of at most `cap` bytes (see the module docs: no FIFO, device or
/// socket is ever opened for reading; a link is followed only to a file of root's or the
/// agent's own). The error says what is wrong; callers add the path.
pub fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    // Look before opening: opening some devices has effects of its own.
    let before = rustix::fs::stat(path)?;
    let file_type = FileType::from_raw_mode(before.st_mode);
    if file_type != FileType::RegularFile {
        return Err(refuse(
            io::ErrorKind::InvalidInput,
            format!(
                "is {}, not a regular file; refusing to read it",
                type_name(file_type)
            ),
        ));
    }
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    let file_type = FileType::from_raw_mode(st.st_mode);
    if file_type != FileType::RegularFile
        || (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino)
    {
        return Err(refuse(
            io::ErrorKind::InvalidInput,
            "was replaced while being opened; refusing to read it".to_string(),
        ));
    }
    if !trusted_owner(st.st_uid) {
        let link = rustix::fs::lstat(path)?;
        if FileType::from_raw_mode(link.st_mode) == FileType::Symlink {
            return Err(refuse(
                io::ErrorKind::PermissionDenied,
                format!(
                    "is a symbolic link to a file owned by uid {}; irsa-agent follows links only to root's own files",
                    st.st_uid
                ),
            ));
        }
    }
    read_capped_fd(fd, cap)
}

/// [`read_capped`] with [`CAP`]; a missing file is `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match read_capped(path, CAP) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn temp_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}{TEMP_MARKER}{}.{n}", std::process::id())
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn file_name_of(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
}

/// Opens a directory for `*at` calls.
pub(crate) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// fsyncs a directory so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    Ok(rustix::fs::fsync(open_dir(dir)?)?)
}

/// What is at `name` in `dir` (not following a link), `None` when nothing is.
pub(crate) fn stat_entry(dir: impl AsFd, name: &str) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What [`read_entry`] found: a regular file's bytes and metadata, or another type of entry.
pub(crate) type Entry = Result<(Vec<u8>, rustix::fs::Stat), FileType>;

/// Reads the regular file `name` in `dir` without following a link and without blocking;
/// `Ok(Err(type))` when something other than a regular file is there.
pub(crate) fn read_entry(dir: impl AsFd, name: &str, cap: u64) -> io::Result<Option<Entry>> {
    let Some(st) = stat_entry(&dir, name)? else {
        return Ok(None);
    };
    let file_type = FileType::from_raw_mode(st.st_mode);
    if file_type != FileType::RegularFile {
        return Ok(Some(Err(file_type)));
    }
    let fd = match rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => return Ok(Some(Err(FileType::Symlink))),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&fd)?;
    let file_type = FileType::from_raw_mode(st.st_mode);
    if file_type != FileType::RegularFile {
        return Ok(Some(Err(file_type)));
    }
    Ok(Some(Ok((read_capped_fd(fd, cap)?, st))))
}

/// Writes `contents` to a new temp file in `dir` with exactly `mode` (and `owner`), fsyncs it,
/// renames it over `name` and fsyncs `dir`. The temp file is removed on failure.
pub(crate) fn replace_entry(
    dir: impl AsFd,
    name: &str,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let temp = temp_name(name);
    let result = (|| {
        let fd = rustix::fs::openat(
            &dir,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        // The umask may have narrowed the mode; set it exactly, on the open file.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        if let Some((uid, gid)) = owner {
            let st = rustix::fs::fstat(&fd)?;
            if (st.st_uid, st.st_gid) != (uid, gid) {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )?;
            }
        }
        let mut file = File::from(fd);
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        crate::failpoint::hit("fs:before-rename");
        rustix::fs::renameat(&dir, temp.as_str(), &dir, name)?;
        rustix::fs::fsync(&dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir, temp.as_str(), AtFlags::empty());
    }
    result
}

/// Checks that `path` may be replaced by [`write_atomic`]: absent, or a regular file (never a
/// link, a FIFO, a device or a socket). Returns its current bytes (at most [`CAP`]).
pub fn read_replaceable(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let dir = match open_dir(parent_of(path)) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match read_entry(&dir, &file_name_of(path)?, CAP)? {
        None => Ok(None),
        Some(Ok((bytes, _))) => Ok(Some(bytes)),
        Some(Err(FileType::Symlink)) => {
            let to = fs::read_link(path)
                .map(|t| format!(" (to {})", t.display()))
                .unwrap_or_default();
            Err(refuse(
                io::ErrorKind::InvalidInput,
                format!(
                    "is a symbolic link{to}; irsa-agent never replaces a link: edit the file it points to yourself, or make it a regular file"
                ),
            ))
        }
        Some(Err(other)) => Err(refuse(
            io::ErrorKind::InvalidInput,
            format!(
                "is {}, not a regular file; refusing to replace it",
                type_name(other)
            ),
        )),
    }
}

/// Atomically replaces `path` with `contents` (see the module docs). Existing files keep their
/// mode and owner; new files get `new`.
pub fn write_atomic(path: &Path, contents: &[u8], new: NewFile) -> io::Result<WriteOutcome> {
    let dir = open_dir(parent_of(path))?;
    let name = file_name_of(path)?;
    let current = read_replaceable(path)?;
    if current.as_deref() == Some(contents) {
        return Ok(WriteOutcome::Unchanged);
    }
    let (mode, owner) = match stat_entry(&dir, &name)? {
        Some(st) if current.is_some() => (st.st_mode & 0o7777, Some((st.st_uid, st.st_gid))),
        _ => (new.mode, new.owner),
    };
    replace_entry(&dir, &name, contents, mode, owner)?;
    Ok(WriteOutcome::Written)
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
    let dir = open_dir(parent_of(src))?;
    let (bytes, st) = match read_entry(&dir, &file_name_of(src)?, CAP)? {
        Some(Ok(found)) => found,
        Some(Err(other)) => {
            return Err(refuse(
                io::ErrorKind::InvalidInput,
                format!("is {}, not a regular file", type_name(other)),
            ));
        }
        None => return Err(io::ErrorKind::NotFound.into()),
    };
    create_dir_all(parent_of(dst), 0o700)?;
    write_atomic(
        dst,
        &bytes,
        NewFile {
            mode: st.st_mode & 0o7777,
            owner: Some((st.st_uid, st.st_gid)),
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

/// An exclusive advisory lock (flock) on a directory, released on drop. Serializes writers that
/// compare-then-replace files in it (two agents publishing to one directory).
#[derive(Debug)]
pub struct DirLock {
    _dir: OwnedFd,
}

/// Takes [`DirLock`] on an open directory, waiting for another holder.
pub fn lock_fd(dir: OwnedFd) -> io::Result<DirLock> {
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(DirLock { _dir: dir })
}

/// Takes [`DirLock`] on `dir`, waiting for another holder.
pub fn lock_dir(dir: &Path) -> io::Result<DirLock> {
    lock_fd(open_dir(dir)?)
}

/// Removes temp files a crashed writer left in an open directory. Returns how many.
pub(crate) fn sweep_temp_entries(dir: impl AsFd) -> io::Result<usize> {
    let mut removed = 0;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(TEMP_MARKER) {
            names.push(name);
        }
    }
    for name in names {
        // Only files: a folder of that name is not ours.
        match rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty()) {
            Ok(()) => removed += 1,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::ISDIR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

/// Removes temp files a crashed writer left in `dir`. Returns how many it removed.
pub fn sweep_temp_files(dir: &Path) -> io::Result<usize> {
    match open_dir(dir) {
        Ok(fd) => sweep_temp_entries(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// [`read_capped`] with [`CAP`]: the reader for every host file the agent parses (key files,
/// configuration, manifests, kubeconfigs, credentials, state).
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    read_capped(path.as_ref(), CAP)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| {
        refuse(
            io::ErrorKind::InvalidData,
            format!(
                "is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    }

    #[test]
    fn writes_keeps_mode_and_skips_equal_bytes() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f.yaml");
        assert_eq!(
            write_atomic(&path, b"a", NewFile::PRIVATE)?,
            WriteOutcome::Written
        );
        assert_eq!(mode(&path), 0o600);
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
        assert_eq!(mode(&path), 0o640);
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
        assert_eq!(mode(&dst), 0o640);
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

    #[test]
    fn readers_refuse_fifos_devices_and_oversized_files_without_blocking() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let fifo = dir.path().join("sa.pub");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o644))?;
        let e = read(&fifo).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("FIFO"), "{e}");
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero)?;
        let e = read(&zero).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("character device"), "{e}");
        let big = dir.path().join("big.pem");
        fs::write(&big, vec![b'a'; (CAP + 1) as usize])?;
        let e = read(&big).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("larger than the 1 MiB limit"), "{e}");
        fs::write(&big, vec![b'a'; CAP as usize])?;
        assert_eq!(read(&big)?.len() as u64, CAP);
        Ok(())
    }

    #[test]
    fn writers_never_replace_a_link_or_a_fifo() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let real = dir.path().join("managed.yaml");
        fs::write(&real, "a: 1\n")?;
        let link = dir.path().join("90-irsa-agent.yaml");
        std::os::unix::fs::symlink(&real, &link)?;
        let e = write_atomic(&link, b"b: 2\n", NewFile::PRIVATE)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("symbolic link") && e.contains("never replaces a link"),
            "{e}"
        );
        assert!(fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(fs::read(&real)?, b"a: 1\n");
        let fifo = dir.path().join("config.yaml");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o644))?;
        let e = write_atomic(&fifo, b"x", NewFile::PRIVATE)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("FIFO"), "{e}");
        Ok(())
    }

    #[test]
    fn links_are_followed_only_to_trusted_files() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("sa.pub");
        fs::write(&key, "k")?;
        let link = dir.path().join("link.pub");
        std::os::unix::fs::symlink(&key, &link)?;
        assert_eq!(read(&link)?, b"k");
        if rustix::process::geteuid().is_root() {
            rustix::fs::chown(&key, Some(rustix::fs::Uid::from_raw(65534)), None)?;
            let e = read(&link).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("owned by uid 65534"), "{e}");
            // The file itself (not through a link) is read: its folder is the user's choice.
            assert_eq!(read(&key)?, b"k");
        }
        Ok(())
    }
}
