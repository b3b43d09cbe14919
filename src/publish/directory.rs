//! The `directory` target: files for nginx, Caddy, an Ingress in front of a small web server,
//! or a static-site host (Cloudflare Pages, Netlify) to serve.
//!
//! * The path is a host path, resolved under `--root` like every other.
//! * Files are replaced atomically through [`crate::fs::write_atomic`] (hidden temp file,
//!   fsync, rename, fsync the directory) and are world-readable (0644; an existing file that
//!   is not gets `o+r` added); directories the agent creates are 0755 whatever the umask, so
//!   the web server (another user) can read them.
//! * A conditional write holds an flock on the target directory while it compares the current
//!   content hash (the "ETag" of a file) and replaces the file, so two agents writing one
//!   directory cannot interleave.
//! * Files have no extension, so the web server has to be told their Content-Type
//!   (`application/json`): `docs/publishing.md` has nginx and Caddy snippets, and
//!   `pages-headers: true` writes a `_headers` file that Cloudflare Pages and Netlify read.

use std::io;
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;

use super::{BoxFuture, Condition, Extra, Layout, Object, Stored, Target, TargetError, Version};
use crate::fs::{self, NewFile};
use crate::host::HostRoot;

/// First line of the `_headers` file the agent manages.
pub const HEADERS_MARKER: &str = "# managed by irsa-agent";

/// A directory on the host.
#[derive(Debug, Clone)]
pub struct DirectoryTarget {
    /// As configured (for messages).
    host_path: PathBuf,
    /// Resolved under the root.
    dir: PathBuf,
    cache_control: String,
    pages_headers: bool,
}

fn hash(bytes: &[u8]) -> String {
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(what: &str, path: &Path, e: &io::Error) -> TargetError {
    TargetError::Failed(format!("cannot {what} {}: {e}", path.display()))
}

impl DirectoryTarget {
    pub fn new(root: &HostRoot, path: &Path, cache_control: &str, pages_headers: bool) -> Self {
        DirectoryTarget {
            host_path: path.to_path_buf(),
            dir: root.path(path),
            cache_control: cache_control.to_string(),
            pages_headers,
        }
    }

    /// The file for `key`, refusing keys that would leave the directory.
    fn file(&self, key: &str) -> Result<PathBuf, TargetError> {
        let rel = Path::new(key);
        if key.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(TargetError::Failed(format!(
                "refusing to write {key:?}: not a plain relative path inside {}",
                self.host_path.display()
            )));
        }
        Ok(self.dir.join(rel))
    }

    fn read_sync(&self, key: &str) -> Result<Option<Stored>, TargetError> {
        let path = self.file(key)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Stored {
                version: Version {
                    e_tag: Some(hash(&bytes)),
                    version: None,
                },
                bytes,
                // The web server sets these; the directory has nothing to compare.
                content_type: Some(super::CONTENT_TYPE.to_string()),
                cache_control: Some(self.cache_control.clone()),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path, &e)),
        }
    }

    fn put_sync(&self, key: &str, bytes: &[u8], condition: Condition) -> Result<(), TargetError> {
        let path = self.file(key)?;
        fs::create_dir_all_exact(&self.dir, 0o755)
            .map_err(|e| io_error("create", &self.dir, &e))?;
        let _lock = fs::lock_dir(&self.dir).map_err(|e| io_error("lock", &self.dir, &e))?;
        let current = self.read_sync(key)?;
        let holds = match (&condition, &current) {
            (Condition::Create, None) => true,
            (Condition::Update(v), Some(stored)) => v.e_tag == stored.version.e_tag,
            _ => false,
        };
        if !holds {
            return Err(TargetError::Conflict);
        }
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all_exact(parent, 0o755).map_err(|e| io_error("create", parent, &e))?;
        // Temp files a crash left behind would be served by the web server: remove them.
        if let Err(e) = fs::sweep_temp_files(parent) {
            log::warn!("cannot sweep temp files in {}: {e}", parent.display());
        }
        fs::write_atomic(&path, bytes, NewFile::PUBLIC)
            .map_err(|e| io_error("write", &path, &e))?;
        if fs::add_mode_bits(&path, 0o444).map_err(|e| io_error("chmod", &path, &e))? {
            log::warn!(
                "{} was not world-readable; added read permission so the web server can serve it",
                path.display()
            );
        }
        Ok(())
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
