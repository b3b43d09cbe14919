//! k3s and RKE2: the apiserver flags as the distribution computes them, and edits of its config.
//!
//! Reading (k3s `pkg/configfilearg` + `util.GetArgs`):
//! - `/etc/rancher/<k3s|rke2>/config.yaml`, then `config.yaml.d/*.yaml|*.yml` in file-name order
//!   (suffix case-insensitive, directories skipped). A later file replaces a key; `key+:` appends
//!   to the value so far. Keys keep the order they were first seen.
//! - The `kube-apiserver-arg` entries then go through `GetArgs` with the distribution's defaults:
//!   issuer `https://kubernetes.default.svc.<cluster-domain>`, api-audiences
//!   `https://kubernetes.default.svc.<cluster-domain>,<k3s|rke2>`, verification keys
//!   `<data-dir>/server/tls/service.key`, signing key `<data-dir>/server/tls/service.current.key`
//!   (or `service.key` on older releases that do not have `service.current.key`).
//!   `data-dir` and `cluster-domain` are honoured from the same files.
//!
//! Editing: for each managed flag whose effective value must change, every `kube-apiserver-arg`
//! entry for that flag (`name=`, `name+=`, `name-=`, with or without `--`) is removed from the
//! files that contribute to the effective list, and the desired entries are written where the
//! first of them was; a flag with no entry yet is appended to the last contributing file, or,
//! when no file has `kube-apiserver-arg`, to `config.yaml` (created if needed). Entries for other
//! flags, other keys, comments and layout are untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::edit::{self, Document, Item, Locator};
use super::flags::{self, Arg, ExtraArg};
use super::install::{
    self, HostChange, Install, Installing, KeyBlock, ROTATION_DIR, Refusal, dedup_kids, key_blocks,
    refuse,
};
use super::{FileChange, ObserveError};
use crate::host::HostRoot;

pub const ARG_KEY: &str = "kube-apiserver-arg";

/// k3s or RKE2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    K3s,
    Rke2,
}

impl Flavor {
    pub fn program(self) -> &'static str {
        match self {
            Flavor::K3s => "k3s",
            Flavor::Rke2 => "rke2",
        }
    }
    pub fn config_file(self) -> PathBuf {
        PathBuf::from(format!("/etc/rancher/{}/config.yaml", self.program()))
    }
    pub fn default_data_dir(self) -> String {
        format!("/var/lib/rancher/{}", self.program())
    }
    /// The admin kubeconfig the distribution writes.
    pub fn kubeconfig(self) -> PathBuf {
        PathBuf::from(format!("/etc/rancher/{p}/{p}.yaml", p = self.program()))
    }

    /// Paths whose existence says this distribution is installed here (`distribution: auto`).
    pub fn markers(self) -> [String; 2] {
        [
            format!("/etc/rancher/{}", self.program()),
            format!("{}/server", self.default_data_dir()),
        ]
    }

    /// Files whose appearance the daemon waits for while the apiserver cannot be read yet.
    pub fn awaited_files(self) -> [PathBuf; 2] {
        [
            self.config_file(),
            PathBuf::from(format!(
                "{}/server/tls/service.key",
                self.default_data_dir()
            )),
        ]
    }

    /// How the apiserver is restarted: the distribution's systemd unit.
    pub fn restart(self, root: &HostRoot) -> super::restart::Restart {
        super::restart::Restart::Unit(match self {
            Flavor::K3s => super::restart::detect_k3s_unit(root),
            Flavor::Rke2 => "rke2-server".to_string(),
        })
    }
}

impl Observed {
    /// The issuer k3s/RKE2 uses when none is configured.
    pub fn default_issuer(&self) -> String {
        format!("https://kubernetes.default.svc.{}", self.cluster_domain)
    }

    /// The files the daemon watches (config.yaml, its drop-ins, the key files k3s switches
    /// between) and the drop-in folder.
    pub fn watched(&self) -> super::Watched {
        let main = self.flavor.config_file();
        let mut files = vec![main.clone()];
        files.extend(self.files.iter().map(|f| f.path.clone()));
        // k3s switches the signing key to service.current.key when that file appears.
        let tls = PathBuf::from(&self.data_dir).join("server/tls");
        files.push(tls.join("service.current.key"));
        files.push(tls.join("service.key"));
        super::Watched {
            files,
            dropin_dirs: vec![PathBuf::from(format!("{}.d", main.display()))],
        }
    }

    /// Where a line for `flag` goes, in words, for fixes.
    pub fn flag_location(&self, flag: &str) -> String {
        let file = self
            .entries
            .iter()
            .find(|e| super::flags::ExtraArg::parse(&e.text).name == flag)
            .or(self.entries.last())
            .map(|e| self.files[e.file].path.clone())
            .unwrap_or_else(|| self.flavor.config_file());
        format!("the `kube-apiserver-arg:` list in {}", file.display())
    }

    /// The list item that sets `flag=value` in `kube-apiserver-arg:`.
    pub fn flag_item(flag: &str, value: &str) -> String {
        format!("- {flag}={value}")
    }
}

/// One config file as read.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Host path.
    pub path: PathBuf,
    /// `None` when the file does not exist (only possible for `config.yaml`).
    pub text: Option<String>,
    /// Top-level keys in order with their values.
    pub entries: Vec<(String, Value)>,
}

/// One effective `kube-apiserver-arg` entry and where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub text: String,
    /// Index into [`Observed::files`].
    pub file: usize,
    /// Index of the item in that file's `kube-apiserver-arg` list.
    pub item: usize,
}

/// What the host's k3s/RKE2 configuration says.
#[derive(Debug, Clone)]
pub struct Observed {
    pub flavor: Flavor,
    pub files: Vec<ConfigFile>,
    pub data_dir: String,
    pub cluster_domain: String,
    /// The effective `kube-apiserver-arg` entries, in order.
    pub entries: Vec<Entry>,
    /// Files whose `kube-apiserver-arg` (or `kube-apiserver-arg+`) contributes to `entries`.
    pub contributing: Vec<usize>,
    /// The distribution's default apiserver arguments (the ones this agent cares about).
    pub defaults: BTreeMap<String, String>,
    /// The apiserver arguments k3s computes.
    pub args: Vec<Arg>,
}

fn read_optional(path: &Path) -> Result<Option<String>, ObserveError> {
    match crate::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| ObserveError::File {
                path: path.to_path_buf(),
                message: "is not UTF-8 text".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ObserveError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

fn parse_entries(host: &Path, text: &str) -> Result<Vec<(String, Value)>, ObserveError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = crate::yaml::from_str(text).map_err(|e| ObserveError::File {
        path: host.to_path_buf(),
        message: e.after_path(),
    })?;
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Mapping(map) => Ok(map
            .into_iter()
            .map(|(k, v)| {
                let key = edit::scalar_string(&k).unwrap_or_default();
                (key, v)
            })
            .collect()),
        _ => Err(ObserveError::File {
            path: host.to_path_buf(),
            message: "is not a mapping of keys (k3s would refuse it)".into(),
        }),
    }
}

/// The config files k3s reads, as host paths: `config.yaml` then the drop-ins in name order.
fn config_files(root: &HostRoot, flavor: Flavor) -> Result<Vec<ConfigFile>, ObserveError> {
    let main = flavor.config_file();
    let mut files = Vec::new();
    let text = read_optional(&root.path(&main))?;
    let entries = match &text {
        Some(t) => parse_entries(&main, t)?,
        None => Vec::new(),
    };
    files.push(ConfigFile {
        path: main.clone(),
        text,
        entries,
    });
    let dir = PathBuf::from(format!("{}.d", main.display()));
    let mut names = Vec::new();
    match std::fs::read_dir(root.path(&dir)) {
        Ok(list) => {
            for entry in list.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let lower = name.to_ascii_lowercase();
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir && (lower.ends_with(".yaml") || lower.ends_with(".yml")) {
                    names.push(name);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ObserveError::File {
                path: dir,
                message: e.to_string(),
            });
        }
    }
    // Go's os.ReadDir sorts by name, byte-wise.
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let text = read_optional(&root.path(&host))?;
        let entries = match &text {
            Some(t) => parse_entries(&host, t)?,
            None => continue,
        };
        files.push(ConfigFile {
            path: host,
            text,
            entries,
        });
    }
    Ok(files)
}

/// A merged value with, for lists, where each element came from.
#[derive(Debug, Clone)]
struct Merged {
    value: Value,
    /// (file, item) per element when the value is a list built from files' lists.
    origin: Vec<(usize, usize)>,
    files: Vec<usize>,
}

fn to_slice(value: &Value, file: usize) -> (Vec<Value>, Vec<(usize, usize)>) {
    match value {
        Value::Sequence(items) => (items.clone(), (0..items.len()).map(|i| (file, i)).collect()),
        Value::String(_) => (vec![value.clone()], vec![(file, 0)]),
        other => match edit::scalar_string(other) {
            Some(s) if !s.trim().is_empty() => {
                (vec![Value::String(s.trim().to_string())], vec![(file, 0)])
            }
            _ => (Vec::new(), Vec::new()),
        },
    }
}

/// k3s' merge of the files: a later key replaces, `key+` appends.
fn merge(files: &[ConfigFile]) -> BTreeMap<String, Merged> {
    let mut values: BTreeMap<String, Merged> = BTreeMap::new();
    for (fi, file) in files.iter().enumerate() {
        for (raw_key, v) in &file.entries {
            let append = raw_key.ends_with('+');
            let key = raw_key.trim_end_matches('+').to_string();
            match values.get_mut(&key) {
                Some(old) if append => {
                    let (mut items, _) = to_slice(&old.value, fi);
                    let mut origin = old.origin.clone();
                    let (new_items, new_origin) = to_slice(v, fi);
                    items.extend(new_items);
                    origin.extend(new_origin);
                    old.value = Value::Sequence(items);
                    old.origin = origin;
                    old.files.push(fi);
                }
                _ => {
                    let (_, origin) = to_slice(v, fi);
                    values.insert(
                        key,
                        Merged {
                            value: v.clone(),
                            origin,
                            files: vec![fi],
                        },
                    );
                }
            }
        }
    }
    values
}

fn string_of(merged: Option<&Merged>) -> Option<String> {
    let m = merged?;
    match &m.value {
        Value::Sequence(items) => items.last().and_then(edit::scalar_string),
        other => edit::scalar_string(other),
    }
}

/// Reads the host's k3s/RKE2 configuration and computes the apiserver arguments.
pub fn observe(root: &HostRoot, flavor: Flavor) -> Result<Observed, ObserveError> {
    let files = config_files(root, flavor)?;
    let merged = merge(&files);
    let data_dir = string_of(merged.get("data-dir"))
        .or_else(|| string_of(merged.get("d")))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| flavor.default_data_dir());
    let data_dir = data_dir.trim_end_matches('/').to_string();
    let cluster_domain = string_of(merged.get("cluster-domain"))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "cluster.local".to_string());
    if let Some(evidence) = agent_node_evidence(root, flavor, &data_dir) {
        return Err(ObserveError::AgentNode {
            program: flavor.program(),
            data_dir,
            evidence,
        });
    }
    let (entries, contributing) = effective_entries(&files, &merged)?;
    let tls = format!("{data_dir}/server/tls");
    let current = format!("{tls}/service.current.key");
    let signing = if root.path(&current).exists() {
        current
    } else {
        format!("{tls}/service.key")
    };
    let issuer = format!("https://kubernetes.default.svc.{cluster_domain}");
    let defaults: BTreeMap<String, String> = [
        (flags::ISSUER, issuer.clone()),
        (flags::AUDIENCES, format!("{issuer},{}", flavor.program())),
        (flags::KEY_FILE, format!("{tls}/service.key")),
        (flags::SIGNING_KEY_FILE, signing),
        ("anonymous-auth", "false".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
    let args = flags::k3s_get_args(&defaults, &texts);
    Ok(Observed {
        flavor,
        files,
        data_dir,
        cluster_domain,
        entries,
        contributing,
        defaults,
        args,
    })
}

/// What shows the host is an agent (worker) only: no `<data-dir>/server` (a server has both
/// `server` and `agent`), but `<data-dir>/agent` or the agent's systemd unit. `None` for a
/// server, and for a host where neither has run yet (a server before its first start).
fn agent_node_evidence(root: &HostRoot, flavor: Flavor, data_dir: &str) -> Option<String> {
    if root.path(format!("{data_dir}/server")).exists() {
        return None;
    }
    let agent_dir = format!("{data_dir}/agent");
    if root.path(&agent_dir).is_dir() {
        return Some(agent_dir);
    }
    let program = flavor.program();
    [
        format!("/etc/systemd/system/{program}-agent.service"),
        format!("/usr/local/lib/systemd/system/{program}-agent.service"),
        format!("/usr/lib/systemd/system/{program}-agent.service"),
        format!("/lib/systemd/system/{program}-agent.service"),
    ]
    .into_iter()
    .find(|unit| root.path(unit).exists())
}

/// The effective `kube-apiserver-arg` entries with their origin, and the contributing files.
fn effective_entries(
    files: &[ConfigFile],
    merged: &BTreeMap<String, Merged>,
) -> Result<(Vec<Entry>, Vec<usize>), ObserveError> {
    let mut entries = Vec::new();
    let Some(m) = merged.get(ARG_KEY) else {
        return Ok((entries, Vec::new()));
    };
    let (items, _) = to_slice(&m.value, 0);
    for (value, (file, item)) in items.iter().zip(&m.origin) {
        let Some(text) = edit::scalar_string(value) else {
            return Err(ObserveError::File {
                path: files[*file].path.clone(),
                message: format!(
                    "`{ARG_KEY}` holds {}, expected strings such as `audit-log-maxage=30`",
                    crate::config::fields::show(value)
                ),
            });
        };
        entries.push(Entry {
            text,
            file: *file,
            item: *item,
        });
    }
    Ok((entries, m.files.clone()))
}

/// The `kube-apiserver-arg` entries that set `flag` (any form).
fn entries_for<'a>(obs: &'a Observed, flag: &str) -> Vec<&'a Entry> {
    obs.entries
        .iter()
        .filter(|e| ExtraArg::parse(&e.text).name == flag)
        .collect()
}

/// The file edits that make the managed flags `changes` (flag name -> desired values).
pub fn edits(
    obs: &Observed,
    changes: &[(&'static str, Vec<String>)],
) -> Result<Vec<FileChange>, super::PlanError> {
    // Per file: removals (item indices) and insertions (before old item index, text).
    let mut removals: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut inserts: BTreeMap<usize, Vec<(usize, String)>> = BTreeMap::new();
    let mut new_key: Vec<String> = Vec::new();
    let last_contributing = obs.contributing.last().copied();
    for (flag, values) in changes {
        let rendered: Vec<String> = flags::render_managed(flag, values)
            .into_iter()
            .map(|a| format!("{}={}", a.name, a.value))
            .collect();
        let existing = entries_for(obs, flag);
        for e in &existing {
            removals.entry(e.file).or_default().push(e.item);
        }
        match (existing.first(), last_contributing) {
            (Some(first), _) => {
                let list = inserts.entry(first.file).or_default();
                list.extend(rendered.into_iter().map(|r| (first.item, r)));
            }
            (None, Some(file)) => {
                let list = inserts.entry(file).or_default();
                list.extend(rendered.into_iter().map(|r| (usize::MAX, r)));
            }
            (None, None) => new_key.extend(rendered),
        }
    }
    let mut out = Vec::new();
    let mut touched: Vec<usize> = removals.keys().chain(inserts.keys()).copied().collect();
    touched.sort();
    touched.dedup();
    for fi in touched {
        let file = &obs.files[fi];
        let text = file.text.clone().unwrap_or_default();
        let doc = Document::parse(&text).map_err(|e| edit_error(&file.path, e))?;
        // The list in this file under `kube-apiserver-arg` or `kube-apiserver-arg+`.
        let key = file
            .entries
            .iter()
            .rev()
            .map(|(k, _)| k.as_str())
            .find(|k| *k == ARG_KEY || *k == "kube-apiserver-arg+")
            .unwrap_or(ARG_KEY)
            .to_string();
        let (loc, _) = doc
            .locate(Locator::TopLevel(&key))
            .map_err(|e| edit_error(&file.path, e))?
            .ok_or_else(|| {
                edit_error(
                    &file.path,
                    edit::EditError::Unsupported(format!("`{key}` was not found")),
                )
            })?;
        let removed = removals.get(&fi).cloned().unwrap_or_default();
        let ins = inserts.get(&fi).cloned().unwrap_or_default();
        let items = build_items(loc.items.len(), &removed, &ins);
        let new_text =
            edit::edit_list(&doc, &loc, &items).map_err(|e| edit_error(&file.path, e))?;
        let expected: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Keep(k) => loc.items[*k].value.clone(),
                Item::New(v) => v.clone(),
            })
            .collect();
        edit::check_only_list_changed(&doc.value, &new_text, Locator::TopLevel(&key), &expected)
            .map_err(|e| edit_error(&file.path, e))?;
        out.push(FileChange {
            path: file.path.clone(),
            old: file.text.clone(),
            new: new_text,
        });
    }
    if !new_key.is_empty() {
        let file = &obs.files[0];
        let text = file.text.clone().unwrap_or_default();
        let doc = Document::parse(&text).map_err(|e| edit_error(&file.path, e))?;
        let new_text = edit::append_top_level_list(
            &text,
            ARG_KEY,
            &new_key,
            "irsa-agent: public service-account issuer (old issuers stay accepted); see `irsa-agent apply --help`",
        );
        edit::check_only_list_changed(&doc.value, &new_text, Locator::TopLevel(ARG_KEY), &new_key)
            .map_err(|e| edit_error(&file.path, e))?;
        out.push(FileChange {
            path: file.path.clone(),
            old: file.text.clone(),
            new: new_text,
        });
    }
    Ok(out)
}

fn edit_error(path: &Path, e: edit::EditError) -> super::PlanError {
    super::PlanError::Edit {
        path: path.to_path_buf(),
        source: e,
    }
}

/// The new item list: old items minus `removed`, with `inserts` placed before the old item
/// index they name (`usize::MAX` = at the end), in the given order.
pub fn build_items(n: usize, removed: &[usize], inserts: &[(usize, String)]) -> Vec<Item> {
    let mut items = Vec::new();
    for i in 0..n {
        for (at, text) in inserts {
            if *at == i {
                items.push(Item::New(text.clone()));
            }
        }
        if !removed.contains(&i) {
            items.push(Item::Keep(i));
        }
    }
    for (at, text) in inserts {
        if *at >= n {
            items.push(Item::New(text.clone()));
        }
    }
    items
}

/// The same host with some files replaced by new texts: what k3s will compute after the edit.
pub fn with_texts(obs: &Observed, changes: &[FileChange]) -> Result<Observed, ObserveError> {
    let mut files = obs.files.clone();
    for change in changes {
        if let Some(f) = files.iter_mut().find(|f| f.path == change.path) {
            f.entries = parse_entries(&f.path, &change.new)?;
            f.text = Some(change.new.clone());
        }
    }
    let merged = merge(&files);
    let (entries, contributing) = effective_entries(&files, &merged)?;
    let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
    let mut out = obs.clone();
    out.args = flags::k3s_get_args(&obs.defaults, &texts);
    out.files = files;
    out.entries = entries;
    out.contributing = contributing;
    Ok(out)
}

// Key rotation: how a new key is installed here (see [`super::install`]). `service.key` is
// bootstrap data in the datastore, so it is never edited in place: the wanted file is staged
// and loaded with `<program> certificate rotate-ca`, and takes effect at each server's restart.
impl Observed {
    /// `<data-dir>/server/tls/service.key` (host path).
    fn service_key(&self) -> PathBuf {
        PathBuf::from(format!("{}/server/tls/service.key", self.data_dir))
    }

    /// Checks that rotation can manage this host's keys; returns the kids the rotation will
    /// retire at the end (every key of `service.key`).
    pub fn rotation_preflight(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
    ) -> Result<Vec<String>, Refusal> {
        let f = &observed.flags;
        let flavor = self.flavor;
        let tls = format!("{}/server/tls", self.data_dir);
        let service_key = format!("{tls}/service.key");
        let allowed_signing = [format!("{tls}/service.current.key"), service_key.clone()];
        if f.key_files != [service_key.clone()]
            || !f
                .signing_key_file
                .as_ref()
                .is_some_and(|s| allowed_signing.contains(s))
        {
            return Err(refuse(format!(
                "kube-apiserver-arg sets its own service-account key files ({} / {}): irsa-agent rotates only {}'s own {service_key} through `{} certificate rotate-ca`; remove those entries or rotate by hand",
                f.key_files.join(", "),
                f.signing_key_file.as_deref().unwrap_or("-"),
                flavor.program(),
                flavor.program()
            )));
        }
        let host = install::signing_is_verified(observed)?;
        if let super::restart::Restart::Unit(unit) = flavor.restart(root) {
            let problems = super::restart::command_line_problems(root, &unit, flavor.program());
            if !problems.is_empty() {
                return Err(refuse(problems.join("\n")));
            }
        }
        let blocks = key_blocks(&install::read_file(root, Path::new(&service_key))?);
        if blocks.first().map(|b| &b.kid) != Some(&host.signing.kid()) {
            return Err(refuse(format!(
                "{service_key}: its first key is not the key the apiserver signs with ({}); {} has not been restarted since service.key changed? restart it first",
                host.signing.kid(),
                flavor.program()
            )));
        }
        Ok(dedup_kids(blocks.iter().map(|b| &b.kid)))
    }

    /// Keeps the new key in the agent's own rotation folder until `rotate-ca` has put it into
    /// the datastore; returns its host path.
    pub fn stage_new_key(
        &self,
        root: &HostRoot,
        id: &str,
        private_pem: &str,
    ) -> Result<String, Refusal> {
        let dir = PathBuf::from(format!("{ROTATION_DIR}/{id}"));
        crate::fs::create_dir_all(&root.path(&dir), 0o700)
            .map_err(|e| install::io("create", &dir, e))?;
        let file = dir.join("new.key");
        crate::fs::write_atomic(
            &root.path(&file),
            private_pem.as_bytes(),
            crate::fs::NewFile::PRIVATE,
        )
        .map_err(|e| install::io("write", &file, e))?;
        Ok(file.display().to_string())
    }

    /// What `install` changes on this host now (nothing when it is in place already). The
    /// order of the keys in the staged `service.key` decides what a restart does (see
    /// [`super::install`]).
    pub fn plan_install(
        &self,
        root: &HostRoot,
        rotation: &Installing<'_>,
        install: Install,
    ) -> Result<HostChange, Refusal> {
        let flavor = self.flavor;
        let service_key = self.service_key();
        let current = install::read_file(root, &service_key)?;
        let blocks = key_blocks(&current);
        let others: Vec<&KeyBlock> = blocks
            .iter()
            .filter(|b| b.kid != rotation.new_kid)
            .collect();
        let new_block = match install {
            Install::RemoveNew => None,
            _ => {
                let key = rotation.key()?;
                Some(KeyBlock {
                    kid: key.kid.clone(),
                    pem: key.private_pem.clone(),
                })
            }
        };
        let wanted: Vec<&KeyBlock> = match (install, &new_block) {
            (Install::VerifyOnly, Some(new)) => others.iter().copied().chain([new]).collect(),
            (Install::Trust | Install::Sign, Some(new)) => {
                std::iter::once(new).chain(others.iter().copied()).collect()
            }
            (Install::Retire, Some(new)) => vec![new],
            _ => others.clone(),
        };
        if wanted.is_empty() {
            return Err(refuse(format!(
                "{}: removing the new key would leave no key at all",
                service_key.display()
            )));
        }
        let content = install::join_blocks(&wanted);
        let expected = dedup_kids(wanted.iter().map(|b| &b.kid));
        let have = dedup_kids(blocks.iter().map(|b| &b.kid));
        if have == expected {
            return Ok(HostChange::None);
        }
        let dir = PathBuf::from(format!("{ROTATION_DIR}/{}/{}", rotation.id, install.name()));
        Ok(HostChange::RotateCa {
            program: flavor.program(),
            dir,
            content,
            data_dir_arg: (self.data_dir != flavor.default_data_dir())
                .then(|| self.data_dir.clone()),
            expected,
        })
    }
}
