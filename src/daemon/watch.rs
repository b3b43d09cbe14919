//! What the daemon watches, and the inotify watcher (notify 8) that tells it.
//!
//! Editors, kubeadm and k3s replace files by renaming a new file over the old one, which ends a
//! watch on the file itself. So the daemon watches **parent directories** (non-recursively) and
//! filters events by name: a [`WatchSet`] lists the files (and drop-in directories) that matter;
//! [`WatchSet::directories`] turns them into the directories to watch (the nearest existing
//! ancestor when a directory does not exist yet, so `mkdir /etc/irsa-agent` is noticed too);
//! [`WatchSet::classify`] says which group an event concerns. The [`Watcher`] adds and removes
//! inotify watches as the set changes, and re-adds a directory that was replaced.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::apiserver::Observed;
use crate::config::{self, Settings};
use crate::host::HostRoot;

/// Which part of the world a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The agent's own configuration: reload it, then converge.
    AgentConfig,
    /// The apiserver's configuration and key files: converge.
    Apiserver,
}

/// The files and drop-in directories that matter, as paths under the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchSet {
    /// Exact files.
    pub files: BTreeMap<PathBuf, Group>,
    /// Directories whose `*.yaml` / `*.yml` files all matter (drop-ins).
    pub dropin_dirs: BTreeMap<PathBuf, Group>,
}

fn is_yaml(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

impl WatchSet {
    /// The agent's configuration: `--config FILE`, or config.yaml and config.d/.
    pub fn new(root: &HostRoot, explicit_config: Option<&Path>) -> WatchSet {
        let mut set = WatchSet::default();
        match explicit_config {
            Some(file) => {
                set.files.insert(file.to_path_buf(), Group::AgentConfig);
            }
            None => {
                set.files
                    .insert(root.path(config::CONFIG_FILE), Group::AgentConfig);
                set.dropin_dirs
                    .insert(root.path(config::CONFIG_DIR), Group::AgentConfig);
            }
        }
        set
    }

    /// Adds the apiserver's configuration files and key files.
    pub fn add_apiserver(&mut self, root: &HostRoot, observed: &Observed) {
        let mut add = |host: &Path| {
            self.files.insert(root.path(host), Group::Apiserver);
        };
        let watched = observed.source.watched();
        for file in &watched.files {
            add(file);
        }
        for dir in &watched.dropin_dirs {
            self.dropin_dirs.insert(root.path(dir), Group::Apiserver);
        }
        for file in &observed.flags.key_files {
            add(Path::new(file));
        }
        if let Some(file) = &observed.flags.signing_key_file {
            add(Path::new(file));
        }
    }

    /// When the apiserver cannot be read yet: the paths whose appearance identifies a
    /// distribution, and the configuration files of the one configured.
    pub fn add_markers(&mut self, root: &HostRoot, settings: &Settings) {
        for path in crate::apiserver::awaited_files(settings.distribution) {
            self.files.insert(root.path(path), Group::Apiserver);
        }
    }

    /// The files of one group (for fingerprints).
    pub fn files_of(&self, group: Group) -> impl Iterator<Item = &Path> {
        self.files
            .iter()
            .filter(move |(_, g)| **g == group)
            .map(|(p, _)| p.as_path())
    }

    /// The directories to watch: each file's parent and each drop-in directory, or the nearest
    /// existing ancestor of one that does not exist.
    pub fn directories(&self) -> BTreeMap<PathBuf, ()> {
        let mut out = BTreeMap::new();
        let wanted = self
            .files
            .keys()
            .filter_map(|f| f.parent())
            .chain(self.dropin_dirs.keys().map(PathBuf::as_path));
        for dir in wanted {
            let mut candidate = Some(dir);
            while let Some(d) = candidate {
                if d.is_dir() {
                    out.insert(d.to_path_buf(), ());
                    break;
                }
                candidate = d.parent();
            }
        }
        out
    }

    /// Which group an event on `path` concerns: a watched file, a drop-in in a watched
    /// directory, or a directory on the way to either (it appeared, went or was replaced).
    pub fn classify(&self, path: &Path) -> Option<Group> {
        if let Some(g) = self.files.get(path).or_else(|| self.dropin_dirs.get(path)) {
            return Some(*g);
        }
        if let (Some(parent), Some(name)) = (path.parent(), path.file_name())
            && let Some(g) = self.dropin_dirs.get(parent)
            && is_yaml(&name.to_string_lossy())
        {
            return Some(*g);
        }
        let mut found: Option<Group> = None;
        for (wanted, g) in self.files.iter().chain(self.dropin_dirs.iter()) {
            if wanted != path && wanted.starts_with(path) {
                // The agent's own configuration first: it is reloaded before converging.
                found = Some(found.map_or(*g, |f| f.min(*g)));
            }
        }
        found
    }
}

/// Whether an event kind can mean new content (not a mere read or a permission change).
pub fn is_change(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

/// A file-system event as the daemon sees it.
#[derive(Debug)]
pub enum WatchEvent {
    Changed(Vec<PathBuf>),
    /// The kernel dropped events (queue overflow): anything may have changed.
    Rescan,
    Error(String),
}

impl WatchEvent {
    pub fn from_notify(result: notify::Result<notify::Event>) -> Option<WatchEvent> {
        match result {
            Ok(event) if event.need_rescan() => Some(WatchEvent::Rescan),
            Ok(event) if is_change(&event.kind) => Some(WatchEvent::Changed(event.paths)),
            Ok(_) => None,
            Err(e) => Some(WatchEvent::Error(e.to_string())),
        }
    }
}

/// What [`Watcher::update`] did.
#[derive(Debug, Default)]
pub struct Updated {
    /// Directories watched now that were not before (or were replaced).
    pub added: usize,
    /// The directories that could not be watched, with the reason.
    pub problems: Vec<String>,
}

/// The inotify watcher, keeping one non-recursive watch per directory of the [`WatchSet`].
pub struct Watcher {
    inner: notify::RecommendedWatcher,
    /// Directory -> (device, inode) when the watch was added.
    watched: BTreeMap<PathBuf, (u64, u64)>,
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl Watcher {
    /// A watcher sending every event to `tx` (from notify's own thread).
    pub fn new(
        tx: tokio::sync::mpsc::UnboundedSender<WatchEvent>,
    ) -> Result<Watcher, notify::Error> {
        let inner = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            if let Some(event) = WatchEvent::from_notify(result) {
                let _ = tx.send(event);
            }
        })?;
        Ok(Watcher {
            inner,
            watched: BTreeMap::new(),
        })
    }

    /// Makes the watches match `set`. Returns how many directories are newly watched (a
    /// change in one before now was seen by nobody: whoever read the files in it must read them
    /// again) and the directories that could not be watched, with the reason.
    pub fn update(&mut self, set: &WatchSet) -> Updated {
        let wanted = set.directories();
        let mut updated = Updated::default();
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, id)| !wanted.contains_key(*dir) || identity(dir) != Some(**id))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            // A directory that went away has lost its watch already.
            let _ = self.inner.unwatch(&dir);
            self.watched.remove(&dir);
        }
        for dir in wanted.keys() {
            if self.watched.contains_key(dir) {
                continue;
            }
            let Some(id) = identity(dir) else { continue };
            match self.inner.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    log::debug!("watching {}", dir.display());
                    self.watched.insert(dir.clone(), id);
                    updated.added += 1;
                }
                Err(e) => updated
                    .problems
                    .push(format!("cannot watch {}: {e}", dir.display())),
            }
        }
        updated
    }

    /// The directories watched now.
    pub fn watched(&self) -> impl Iterator<Item = &Path> {
        self.watched.keys().map(PathBuf::as_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_files_dropins_and_directories_on_the_way() {
        let root = HostRoot::new("/r");
        let mut set = WatchSet::new(&root, None);
        set.files.insert(
            PathBuf::from("/r/var/lib/rancher/k3s/server/tls/service.key"),
            Group::Apiserver,
        );
        let c = |p: &str| set.classify(Path::new(p));
        assert_eq!(c("/r/etc/irsa-agent/config.yaml"), Some(Group::AgentConfig));
        assert_eq!(
            c("/r/etc/irsa-agent/config.d/50-x.yaml"),
            Some(Group::AgentConfig)
        );
        assert_eq!(c("/r/etc/irsa-agent/config.d/.50-x.yaml.swp"), None);
        assert_eq!(c("/r/etc/irsa-agent/config.yaml~"), None);
        assert_eq!(c("/r/etc/irsa-agent/4913"), None);
        assert_eq!(c("/r/etc/irsa-agent"), Some(Group::AgentConfig));
        // The drop-in directory itself appearing (mkdir config.d).
        assert_eq!(c("/r/etc/irsa-agent/config.d"), Some(Group::AgentConfig));
        assert_eq!(
            c("/r/var/lib/rancher/k3s/server/tls/service.key"),
            Some(Group::Apiserver)
        );
        assert_eq!(c("/r/var/lib/rancher/k3s/server/tls/server-ca.crt"), None);
        assert_eq!(c("/r/var/lib/rancher"), Some(Group::Apiserver));
        // A directory on the way to both: the configuration wins (reload, then converge).
        assert_eq!(c("/r"), Some(Group::AgentConfig));
    }

    #[test]
    fn watches_the_nearest_existing_directory() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = HostRoot::new(dir.path());
        let set = WatchSet::new(&root, None);
        let dirs: Vec<PathBuf> = set.directories().into_keys().collect();
        assert_eq!(dirs, vec![dir.path().to_path_buf()]);
        std::fs::create_dir_all(root.path("/etc/irsa-agent/config.d"))?;
        let dirs: Vec<PathBuf> = set.directories().into_keys().collect();
        assert_eq!(
            dirs,
            vec![
                root.path("/etc/irsa-agent"),
                root.path("/etc/irsa-agent/config.d")
            ]
        );
        Ok(())
    }
}
