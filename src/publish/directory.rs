//! The `directory` target: files for nginx, Caddy, an Ingress in front of a small web server,
//! or a static-site host (Cloudflare Pages, Netlify) to serve.
//!
//! * The path is a host path, resolved under `--root` like every other.
//! * The folder is often someone else's too (a web server, a deploy job), so it is reached
//!   through [`crate::fs::tree`]: folders are walked without following links, a folder (or one
//!   above it) that a user other than root can write is refused unless `writable-by:` names
//!   that user, and every file is replaced by a new root-owned 0644 file renamed over it
//!   (a link, FIFO, device or someone else's file at that name is replaced, never opened or
//!   changed through). Folders the agent makes are 0755 whatever the umask, so the web server
//!   (another user) can read them. A file or folder with the wrong owner, mode or type is
//!   corrected and reported (log, and `publish --check` / `doctor` list it).
//! * A conditional write holds an flock on the target directory while it compares the current
//!   content hash (the "ETag" of a file) and replaces the file, so two agents writing one
//!   directory cannot interleave.
//! * Files have no extension, so the web server has to be told their Content-Type
//!   (`application/json`): `docs/publishing.md` has nginx and Caddy snippets, and
//!   `pages-headers: true` writes a `_headers` file that Cloudflare Pages and Netlify read.

use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

use super::{BoxFuture, Condition, Extra, Layout, Object, Stored, Target, TargetError, Version};
use crate::fs::tree::{self, TreeDir, Writers};
use crate::host::HostRoot;

/// First line of the `_headers` file the agent manages.
pub const HEADERS_MARKER: &str = "# managed by irsa-agent";

/// The most read of a published file: a JWKS with hundreds of keys is far smaller. A larger
/// file is not the agent's and is replaced.
const READ_CAP: u64 = 1 << 20;

/// A folder of the target, opened, with the file name in it and (for writes) the target's lock.
struct Opened {
    dir: TreeDir,
    name: String,
    _lock: Option<crate::fs::DirLock>,
}

/// A directory on the host.
#[derive(Debug, Clone)]
pub struct DirectoryTarget {
    /// As configured (for messages and the walk from the root).
    host_path: PathBuf,
    /// The host root the walk starts from.
    root: PathBuf,
    writers: Writers,
    cache_control: String,
    pages_headers: bool,
}

fn hash(bytes: &[u8]) -> String {
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn failed(what: &str, path: &Path, e: &std::io::Error) -> TargetError {
    // Refusals worded by crate::fs::tree already name the folder.
    if e.get_ref().is_some() {
        return TargetError::Failed(e.to_string());
    }
    TargetError::Failed(format!("cannot {what} {}: {e}", path.display()))
}

impl DirectoryTarget {
    /// `writable_by`: users or groups besides root allowed to write the folder (resolved here
    /// through the host's passwd and group files).
    pub fn new(
        root: &HostRoot,
        path: &Path,
        cache_control: &str,
        pages_headers: bool,
        writable_by: &[String],
    ) -> Result<Self, String> {
        Ok(DirectoryTarget {
            host_path: path.to_path_buf(),
            root: root.root().to_path_buf(),
            writers: Writers::resolve(root.root(), writable_by)?,
            cache_control: cache_control.to_string(),
            pages_headers,
        })
    }

    /// The folder holding `key` and the file name, refusing keys that would leave the
    /// directory. `None` when a folder is missing and `create` is false.
    fn open(
        &self,
        key: &str,
        create: bool,
        problems: &mut Vec<String>,
    ) -> Result<Option<Opened>, TargetError> {
        let rel = Path::new(key);
        let parts: Vec<String> = rel
            .components()
            .map(|c| match c {
                Component::Normal(part) => Ok(part.to_string_lossy().into_owned()),
                _ => Err(()),
            })
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        let Some((name, folders)) = parts.split_last() else {
            return Err(TargetError::Failed(format!(
                "refusing to write {key:?}: not a plain relative path inside {}",
                self.host_path.display()
            )));
        };
        let open_target =
            tree::open_target(&self.root, &self.host_path, &self.writers, create, problems)
                .map_err(|e| failed("open", &self.host_path, &e))?;
        let Some(mut dir) = open_target else {
            return Ok(None);
        };
        // Writers lock the target folder itself (see the module docs).
        let lock = if create {
            Some(
                dir.lock()
                    .map_err(|e| failed("lock", &self.host_path, &e))?,
            )
        } else {
            None
        };
        for folder in folders {
            let next = dir
                .subdir(folder, &self.writers, create, problems)
                .map_err(|e| failed("open", &dir.shown().join(folder), &e))?;
            let Some(next) = next else {
                return Ok(None);
            };
            dir = next;
        }
        Ok(Some(Opened {
            dir,
            name: name.clone(),
            _lock: lock,
        }))
    }

    fn stored(
        &self,
        dir: &TreeDir,
        name: &str,
        mut problems: Vec<String>,
    ) -> Result<Option<Stored>, TargetError> {
        let found = dir
            .read(name, READ_CAP)
            .map_err(|e| failed("read", &dir.shown().join(name), &e))?;
        Ok(found.map(|found| {
            problems.extend(found.problems);
            let bytes = found.bytes.unwrap_or_default();
            Stored {
                version: Version {
                    e_tag: Some(hash(&bytes)),
                    version: None,
                },
                bytes,
                // The web server sets these; the directory has nothing to compare.
                content_type: Some(super::CONTENT_TYPE.to_string()),
                cache_control: Some(self.cache_control.clone()),
                problems,
            }
        }))
    }

    fn read_sync(&self, key: &str) -> Result<Option<Stored>, TargetError> {
        let mut problems = Vec::new();
        match self.open(key, false, &mut problems)? {
            Some(opened) => self.stored(&opened.dir, &opened.name, problems),
            None => Ok(None),
        }
    }

    fn put_sync(&self, key: &str, bytes: &[u8], condition: Condition) -> Result<(), TargetError> {
        let mut problems = Vec::new();
        let Some(Opened { dir, name, _lock }) = self.open(key, true, &mut problems)? else {
            return Err(TargetError::Failed(format!(
                "cannot create the folders of {key} in {}",
                self.host_path.display()
            )));
        };
        let current = self.stored(&dir, &name, Vec::new())?;
        let holds = match (&condition, &current) {
            (Condition::Create, None) => true,
            (Condition::Update(v), Some(stored)) => v.e_tag == stored.version.e_tag,
            _ => false,
        };
        if !holds {
            return Err(TargetError::Conflict);
        }
        // Temp files a crash left behind would be served by the web server: remove them.
        if let Err(e) = dir.sweep_temp_files() {
            log::warn!("cannot sweep temp files in {}: {e}", dir.shown().display());
        }
        dir.replace(&name, bytes)
            .map_err(|e| failed("write", &dir.shown().join(&name), &e))?;
        for problem in problems {
            log::warn!("{problem}");
        }
        for problem in current.map(|c| c.problems).unwrap_or_default() {
            log::warn!("{problem}; replaced it with a root-owned 0644 file");
        }
        Ok(())
    }
}

/// What `doctor` reports for every `directory` target of `settings`: its description, and the
/// problems a publish would correct, or why publishing there is refused. Reads only.
pub fn inspect_all(
    root: &HostRoot,
    settings: &crate::config::Settings,
) -> Vec<(String, Result<Vec<String>, String>)> {
    let mut out = Vec::new();
    for target in &settings.publish {
        let crate::config::PublishTarget::Directory {
            path,
            cache_control,
            pages_headers,
            writable_by,
            ..
        } = target
        else {
            continue;
        };
        let layout = Layout::for_target(&settings.issuer, &settings.jwks_uri, target);
        let found = DirectoryTarget::new(root, path, cache_control, *pages_headers, writable_by)
            .and_then(|t| t.inspect(&[&layout.discovery_key, &layout.jwks_key]));
        out.push((target.describe(), found));
    }
    out
}

impl DirectoryTarget {
    /// The problems a publish would correct at `keys`, or why it would refuse the folder.
    fn inspect(&self, keys: &[&str]) -> Result<Vec<String>, String> {
        let mut problems = Vec::new();
        for key in keys {
            match self.open(key, false, &mut problems) {
                Ok(Some(opened)) => {
                    if let Some(stored) = self
                        .stored(&opened.dir, &opened.name, Vec::new())
                        .map_err(|e| e.to_string())?
                    {
                        problems.extend(stored.problems);
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        problems.dedup();
        Ok(problems)
    }
}

/// The `_headers` file (Cloudflare Pages, Netlify) giving both documents their Content-Type
/// and Cache-Control, paths relative to the directory (the site's root).
pub fn pages_headers(layout: &Layout, cache_control: &str) -> String {
    let mut out = format!(
        "{HEADERS_MARKER}: Content-Type and Cache-Control of the OIDC documents (Cloudflare Pages, Netlify)\n"
    );
    for key in [&layout.discovery_key, &layout.jwks_key] {
        out.push_str(&format!(
            "/{key}\n  Content-Type: {}\n  Cache-Control: {cache_control}\n",
            super::CONTENT_TYPE
        ));
    }
    out
}

impl Target for DirectoryTarget {
    fn describe(&self) -> String {
        format!("directory {}", self.host_path.display())
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, TargetError>> {
        Box::pin(async move { self.read_sync(key) })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        object: Object<'a>,
        condition: Condition,
    ) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move { self.put_sync(key, object.bytes, condition) })
    }

    fn extras(&self, layout: &Layout) -> Vec<Extra> {
        if !self.pages_headers {
            return Vec::new();
        }
        vec![Extra {
            key: "_headers".into(),
            bytes: pages_headers(layout, &self.cache_control).into_bytes(),
            content_type: "text/plain",
            marker: HEADERS_MARKER,
        }]
    }
}
