//! Folders other users may write: the `directory` publish target.
//!
//! A web server user, a deploy job that syncs the folder to Pages or a colleague may own the
//! folder the documents are published into. Root writing there by path could be turned against
//! the host: a link swapped in between a check and a `chmod` makes `sa.key` world-readable, a
//! folder replaced by a link to `/etc/cron.d` receives root's writes. So:
//!
//! * [`open_target`] walks from the host root to the target one component at a time with
//!   `O_NOFOLLOW|O_DIRECTORY`, creating missing folders (0755, set on the open folder), and
//!   refuses any folder on the way that a user other than root can write, unless the
//!   configuration names that user (`writable-by:`). The refusal names the folder, its owner and
//!   mode, and the fix. A sticky folder above the target (`/tmp`) is fine: others cannot replace
//!   what they do not own there, and every folder below it is checked in turn. A link above the
//!   target, or the target itself, is followed only where no one else can write (so root put
//!   it there: `/srv -> /data/srv`), by walking its target from the host root again.
//! * Inside the target every operation is relative to the open folder ([`TreeDir`]): files are
//!   read with `O_NOFOLLOW|O_NONBLOCK` up to a cap, written as a new root-owned 0644 temp file
//!   renamed over the old entry (a link, a FIFO, a device or someone else's file at that name is
//!   replaced, never opened or changed through), and folders are opened without following
//!   links (a link where a folder belongs is removed and the folder made). Mode and owner are
//!   never changed by path.
//! * What was wrong and got corrected is returned as `problems`, for the log and `doctor`.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{refuse, trusted_owner, type_name};

/// Users and groups besides root that the configuration allows to write a publish target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writers {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// As configured, for messages.
    pub names: Vec<String>,
}

/// Mode of published files.
pub const FILE_MODE: u32 = 0o644;
/// Mode of the folders the agent makes or corrects inside a target.
pub const DIR_MODE: u32 = 0o755;

/// An open folder of a publish target.
#[derive(Debug)]
pub struct TreeDir {
    fd: OwnedFd,
    /// The host path, for messages.
    shown: PathBuf,
}

/// Where a folder sits: above the target (the user's), the target itself, or inside it (ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Above,
    Target,
    Inside,
}

/// A file read from a target folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The bytes, when a regular file within the cap is there.
    pub bytes: Option<Vec<u8>>,
    /// What is wrong with the entry (type, owner, mode, size); replacing it fixes each.
    pub problems: Vec<String>,
}

fn mode_text(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Checks that only trusted users (root, the agent's user, `writers`) can write a folder.
fn check_folder(
    st: &rustix::fs::Stat,
    shown: &Path,
    role: Role,
    writers: &Writers,
) -> io::Result<()> {
    let mode = st.st_mode & 0o7777;
    let owner_ok = trusted_owner(st.st_uid) || writers.uids.contains(&st.st_uid);
    let group_ok = mode & 0o020 == 0 || st.st_gid == 0 || writers.gids.contains(&st.st_gid);
    let sticky = mode & 0o1000 != 0;
    let other_ok = mode & 0o002 == 0 || (role == Role::Above && sticky && trusted_owner(st.st_uid));
    if owner_ok && group_ok && other_ok {
        return Ok(());
    }
    let mut who = Vec::new();
    if !owner_ok {
        who.push(format!("its owner (uid {})", st.st_uid));
    }
    if !group_ok {
        who.push(format!("group gid {}", st.st_gid));
    }
    if !other_ok {
        who.push("every user".to_string());
    }
    let allowed = if writers.names.is_empty() {
        String::new()
    } else {
        format!(" (writable-by allows {})", writers.names.join(", "))
    };
    Err(refuse(
        io::ErrorKind::PermissionDenied,
        format!(
            "{shown} (owner uid {}, group gid {}, mode {}) can be written by {}{allowed}: that user could make irsa-agent, running as root, write elsewhere or publish keys of their own. Make it root's and not writable by others (chown root:root {shown} && chmod go-w {shown}), or, if that user must write there (a deploy job, a web server), name it in the target's `writable-by:`",
            st.st_uid,
            st.st_gid,
            mode_text(mode),
            who.join(" and "),
            shown = shown.display()
        ),
    ))
}

fn open_dir_at(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (or makes) folder `name` in `parent`, without following a link.
/// `Ok(None)`: missing and `create` is false.
fn open_or_make(
    parent: &OwnedFd,
    name: &str,
    shown: &Path,
    role: Role,
    create: bool,
    problems: &mut Vec<String>,
) -> io::Result<Option<OwnedFd>> {
    match open_dir_at(parent, name) {
        Ok(fd) => return Ok(Some(fd)),
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(Errno::NOENT) => {}
        Err(Errno::LOOP | Errno::NOTDIR) => {
            let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
            let file_type = FileType::from_raw_mode(st.st_mode);
            // Inside the target the layout is ours: anything but a folder or a regular file
            // where a folder belongs is replaced. Above it, the folders are the user's.
            let replaceable = role == Role::Inside
                && !matches!(file_type, FileType::RegularFile | FileType::Directory);
            if !replaceable {
                return Err(refuse(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {}, not a folder; irsa-agent never follows links in a publish target or writes through them: replace it with a real folder",
                        shown.display(),
                        type_name(file_type)
                    ),
                ));
            }
            if !create {
                problems.push(format!(
                    "{} is {}, not a folder (publish replaces it)",
                    shown.display(),
                    type_name(file_type)
                ));
                return Ok(None);
            }
            rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
            problems.push(format!(
                "{} was {}, not a folder; replaced it with a folder",
                shown.display(),
                type_name(file_type)
            ));
        }
        Err(e) => return Err(e.into()),
    }
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(DIR_MODE)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = open_dir_at(parent, name).map_err(|e| {
        refuse(
            io::ErrorKind::Other,
            format!(
                "cannot open {} after creating it ({e}): something else replaced it at once; not writing there",
                shown.display()
            ),
        )
    })?;
    let st = rustix::fs::fstat(&fd)?;
    if trusted_owner(st.st_uid) && st.st_mode & 0o7777 != DIR_MODE {
        // The umask narrowed it; set it on the open folder.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))?;
    }
    rustix::fs::fsync(parent)?;
    Ok(Some(fd))
}

/// Opens the publish target `host_path` under `root` (see the module docs). With `create`,
/// missing folders are made; without, a missing one is `Ok(None)`. `problems` collects what was
/// corrected (or, without `create`, what would be).
pub fn open_target(
    root: &Path,
    host_path: &Path,
    writers: &Writers,
    create: bool,
    problems: &mut Vec<String>,
) -> io::Result<Option<TreeDir>> {
    let root_fd = super::open_dir(root)?;
    let mut fd = root_fd.try_clone()?;
    let mut shown = PathBuf::from("/");
    let mut queue: VecDeque<OsString> = normal_parts(host_path).collect();
    let role_at = |queue: &VecDeque<OsString>| {
        if queue.is_empty() {
            Role::Target
        } else {
            Role::Above
        }
    };
    check_folder(&rustix::fs::fstat(&fd)?, &shown, role_at(&queue), writers)?;
    let mut links = 0;
    while let Some(part) = queue.pop_front() {
        let name = part.to_string_lossy().into_owned();
        let role = role_at(&queue);
        // A link in a folder only trusted users can write (checked before we got here) was
        // put there by them (/srv -> /data/srv on a Pi's SSD): follow it, by walking its target
        // from the host root again, so every folder on the real path is checked in turn.
        if let Some(st) = super::stat_entry(&fd, &name)?
            && FileType::from_raw_mode(st.st_mode) == FileType::Symlink
        {
            let folder = rustix::fs::fstat(&fd)?;
            let folder_mode = folder.st_mode & 0o7777;
            let only_root_writes = trusted_owner(folder.st_uid)
                && (folder_mode & 0o020 == 0 || folder.st_gid == 0)
                && folder_mode & 0o002 == 0;
            if !(only_root_writes && trusted_owner(st.st_uid)) {
                return Err(refuse(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is a symbolic link (owner uid {}) in a folder other users can write; irsa-agent follows links above a publish target only where only root can write: point `path:` at the real folder",
                        shown.join(&name).display(),
                        st.st_uid
                    ),
                ));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(refuse(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} goes through more than {MAX_LINKS} symbolic links",
                        host_path.display()
                    ),
                ));
            }
            let to = rustix::fs::readlinkat(&fd, name.as_str(), Vec::new())?;
            let to = PathBuf::from(std::ffi::OsStr::from_bytes(to.as_bytes()));
            let resolved = lexical(&shown.join(&to));
            let rest: Vec<OsString> = queue.drain(..).collect();
            queue.extend(normal_parts(&resolved));
            queue.extend(rest);
            fd = root_fd.try_clone()?;
            shown = PathBuf::from("/");
            continue;
        }
        shown.push(&part);
        let Some(next) = open_or_make(&fd, &name, &shown, role, create, problems)? else {
            return Ok(None);
        };
        check_folder(&rustix::fs::fstat(&next)?, &shown, role, writers)?;
        fd = next;
    }
    Ok(Some(TreeDir { fd, shown }))
}

/// The most symbolic links followed above a target (Linux's own limit is 40).
const MAX_LINKS: usize = 16;

fn normal_parts(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(part) => Some(part.to_os_string()),
        _ => None,
    })
}

/// Resolves `.` and `..` in a path with no links in it (the walk's own path).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

impl TreeDir {
    /// The host path, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// Opens (or makes) the folder `name` inside this one: its owner must be trusted, its mode
    /// is corrected to 0755 when it is ours.
    pub fn subdir(
        &self,
        name: &str,
        writers: &Writers,
        create: bool,
        problems: &mut Vec<String>,
    ) -> io::Result<Option<TreeDir>> {
        let shown = self.shown.join(name);
        let Some(fd) = open_or_make(&self.fd, name, &shown, Role::Inside, create, problems)? else {
            return Ok(None);
        };
        let st = rustix::fs::fstat(&fd)?;
        check_folder(&st, &shown, Role::Inside, writers)?;
        if trusted_owner(st.st_uid) && st.st_mode & 0o7777 != DIR_MODE {
            let was = mode_text(st.st_mode);
            if create {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))?;
                problems.push(format!(
                    "{} had mode {was}; corrected to {}",
                    shown.display(),
                    mode_text(DIR_MODE)
                ));
            } else {
                problems.push(format!(
                    "{} has mode {was}, should be {}",
                    shown.display(),
                    mode_text(DIR_MODE)
                ));
            }
        }
        Ok(Some(TreeDir { fd, shown }))
    }

    /// Reads the file `name` (see [`Found`]); `None` when nothing is there.
    pub fn read(&self, name: &str, cap: u64) -> io::Result<Option<Found>> {
        let shown = self.shown.join(name);
        let entry = match super::read_entry(&self.fd, name, cap) {
            Ok(entry) => entry,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                // Over the cap: not something the agent wrote.
                return Ok(Some(Found {
                    bytes: None,
                    problems: vec![format!("{} {e}", shown.display())],
                }));
            }
            Err(e) => return Err(e),
        };
        Ok(entry.map(|entry| match entry {
            Ok((bytes, st)) => {
                let mut problems = Vec::new();
                if !trusted_owner(st.st_uid) {
                    problems.push(format!(
                        "{} is owned by uid {}, should be root's",
                        shown.display(),
                        st.st_uid
                    ));
                }
                if st.st_mode & 0o7777 != FILE_MODE {
                    problems.push(format!(
                        "{} has mode {}, should be {}{}",
                        shown.display(),
                        mode_text(st.st_mode),
                        mode_text(FILE_MODE),
                        if st.st_mode & 0o022 != 0 {
                            " (others could change the keys relying parties trust)"
                        } else {
                            ""
                        }
                    ));
                }
                Found {
                    bytes: Some(bytes),
                    problems,
                }
            }
            Err(FileType::Directory) => Found {
                bytes: None,
                problems: vec![format!("{} is a directory", shown.display())],
            },
            Err(other) => Found {
                bytes: None,
                problems: vec![format!(
                    "{} is {}, not a regular file",
                    shown.display(),
                    type_name(other)
                )],
            },
        }))
    }

    /// Replaces whatever is at `name` with a new root-owned 0644 file holding `bytes`.
    pub fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if let Some(st) = super::stat_entry(&self.fd, name)?
            && FileType::from_raw_mode(st.st_mode) == FileType::Directory
        {
            return Err(refuse(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a directory; remove it so the document can be written",
                    self.shown.join(name).display()
                ),
            ));
        }
        super::replace_entry(&self.fd, name, bytes, FILE_MODE, None)
    }

    /// Takes an exclusive flock on this folder (released on drop).
    pub fn lock(&self) -> io::Result<super::DirLock> {
        super::lock_fd(self.fd.try_clone()?)
    }

    /// Removes temp files a crash left here (the web server would serve them).
    pub fn sweep_temp_files(&self) -> io::Result<usize> {
        super::sweep_temp_entries(&self.fd)
    }
}

impl Writers {
    /// Resolves configured user or group names (or numeric ids) through the host's
    /// `/etc/passwd` and `/etc/group` under `root`. A name is taken as a user and as a group
    /// wherever it exists; one found in neither is an error.
    pub fn resolve(root: &Path, names: &[String]) -> Result<Writers, String> {
        let mut out = Writers {
            names: names.to_vec(),
            ..Writers::default()
        };
        if names.is_empty() {
            return Ok(out);
        }
        let table = |file: &str| -> Result<Vec<(String, u32)>, String> {
            let path = root.join(file);
            let text = match super::read_capped(&path, super::CAP) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(format!("cannot read /{file}: {e}")),
            };
            Ok(text
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let id = fields.nth(1)?.parse().ok()?;
                    Some((name.to_string(), id))
                })
                .collect())
        };
        let users = table("etc/passwd")?;
        let groups = table("etc/group")?;
        for name in names {
            if let Ok(id) = name.parse::<u32>() {
                out.uids.push(id);
                out.gids.push(id);
                continue;
            }
            let user = users.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
            let group = groups.iter().find(|(n, _)| n == name).map(|(_, id)| *id);
            if user.is_none() && group.is_none() {
                return Err(format!(
                    "writable-by: {name:?} is neither a user in /etc/passwd nor a group in /etc/group"
                ));
            }
            out.uids.extend(user);
            out.gids.extend(group);
        }
        Ok(out)
    }
}
