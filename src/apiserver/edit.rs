//! Byte-preserving edits of one list of strings in a YAML file.
//!
//! The agent edits exactly two shapes: a top-level `kube-apiserver-arg` list in a k3s/RKE2
//! `config.yaml` (or drop-in) and `spec.containers[0].command` in a kubeadm static pod manifest.
//! Round-tripping a user's file through a YAML library would lose comments, quoting and layout,
//! so this module works on the text:
//!
//! 1. [`Document::parse`] splits the text into lines and builds a small block-structure tree
//!    (block mappings and block sequences by indentation; everything else is an opaque inline
//!    value with its byte span). It understands comments, blank lines, CRLF, compact sequences
//!    (`key:` followed by `- item` at the same indentation), `- key: value` items, and flow
//!    lists (`[a, "b"]`, also over several lines).
//! 2. [`Document::locate`] finds the list and the byte span of every item; the items' values
//!    are taken from a real YAML parser (serde_yaml), which must agree on their number.
//! 3. [`edit_list`] rewrites only the spans of removed items and inserts new ones in the style
//!    of their neighbours (indentation, quoting, line ending); every other byte is copied.
//!
//! Callers re-parse the result and compare it with what they meant (see
//! [`check_only_list_changed`]); any mismatch aborts the edit before anything is written.
//! Anchors, aliases, tags and block scalars inside the edited list are refused.

use serde_yaml::Value;

/// Why a file cannot be edited safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "the edited file would not mean what was intended ({0}); nothing was written. Please report this with the file attached"
    )]
    Verify(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Blank,
    Comment,
    Content,
}

#[derive(Debug, Clone, Copy)]
struct Line {
    /// Byte offset of the first character.
    start: usize,
    /// Byte offset of the end of the content (before `\r\n` / `\n`).
    end: usize,
    /// Byte offset of the next line.
    next: usize,
    /// Number of leading spaces.
    indent: usize,
    kind: LineKind,
}

/// Where a list value is, and how it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListShape {
    /// `- item` lines at `indent`. `items[i]` spans whole lines (with their line break).
    /// `after_colon` is the offset just after the key's `:` (where `[]` goes when every item
    /// is removed).
    Block { indent: usize, after_colon: usize },
    /// `[a, b]`: `open` is the offset of `[`, `close` of `]`.
    Flow { open: usize, close: usize },
    /// A single string where a list is expected (`key: value`): `span` is the scalar.
    Scalar,
    /// `key:` with no value, or `key: null`/`~`: `at` is where the value goes (after `:`),
    /// `value_end` the end of an explicit null.
    Empty {
        at: usize,
        value_end: usize,
        line_end: usize,
        key_indent: usize,
    },
}

/// One item of a located list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemSpan {
    /// The decoded value (from the YAML parser).
    pub value: String,
    /// Byte span of the item: for block lists the whole line(s); for flow lists and scalars the
    /// scalar's text.
    pub start: usize,
    pub end: usize,
    /// The scalar's own text, as written (with quotes).
    pub raw: String,
}

/// A list found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListLoc {
    pub shape: ListShape,
    pub items: Vec<ItemSpan>,
}

/// Which list to edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locator<'k> {
    /// A key of the top-level mapping.
    TopLevel(&'k str),
    /// `spec.containers[0].command` of a Pod manifest.
    ContainerCommand,
}

/// One element of the new list: an old item kept as written, or a new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Keep(usize),
    New(String),
}

/// A parsed block node.
#[derive(Debug, Clone)]
enum Node {
    Map(Vec<MapEntry>),
    Seq(Vec<SeqEntry>),
    /// An inline value: a scalar or flow collection, from `start` to `end` (comment excluded),
    /// possibly continued on more-indented lines up to `end`.
    Inline {
        start: usize,
        end: usize,
    },
    /// Nothing after `key:` / `-`.
    Empty {
        at: usize,
        line_end: usize,
    },
}

#[derive(Debug, Clone)]
struct MapEntry {
    key: String,
    line: usize,
    col: usize,
    value: Node,
}

#[derive(Debug, Clone)]
struct SeqEntry {
    line: usize,
    value: Node,
    /// Index of the last line belonging to the item.
    last_line: usize,
}

/// A YAML text with its line table.
pub struct Document<'a> {
    text: &'a str,
    lines: Vec<Line>,
    /// `\r\n` when the file uses CRLF line endings.
    pub newline: &'static str,
    /// The parsed meaning of the whole document.
    pub value: Value,
}

/// The position of the comment start (` #`) in a content slice, outside quotes and flow text,
/// or the slice length.
fn comment_start(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut in_single = false;
    let mut in_double = false;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_double {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_double = false;
            }
        } else if in_single {
            if c == b'\'' {
                in_single = false;
            }
        } else {
            match c {
                b'"' if i == 0 || is_token_start(bytes, i) => in_double = true,
                b'\'' if i == 0 || is_token_start(bytes, i) => in_single = true,
                b'#' if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => return i,
                _ => {}
            }
        }
        i += 1;
    }
    bytes.len()
}

/// A quote opens a quoted scalar only at the start of a token.
fn is_token_start(bytes: &[u8], i: usize) -> bool {
    matches!(
        bytes[i - 1],
        b' ' | b'\t' | b'[' | b',' | b'{' | b':' | b'-'
    )
}

/// If `s` starts with a mapping key (`key:` followed by a space or the end), the key text and
/// the byte offset just after the colon.
fn mapping_key(s: &str) -> Option<(String, usize)> {
    let bytes = s.as_bytes();
    match bytes.first()? {
        b'"' | b'\'' => {
            let quote = bytes[0];
            let mut i = 1;
            let mut key = String::new();
            while i < bytes.len() {
                if bytes[i] == quote {
                    if quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                        key.push('\'');
                        i += 2;
                        continue;
                    }
                    break;
                }
                if quote == b'"' && bytes[i] == b'\\' {
                    // Escapes in keys are not needed here; keep the raw text.
                    key.push(bytes[i] as char);
                    i += 1;
                }
                let ch = s[i..].chars().next()?;
                key.push(ch);
                i += ch.len_utf8();
            }
            let rest = &s[(i + 1).min(s.len())..];
            let trimmed = rest.trim_start_matches([' ', '\t']);
            let colon = s.len() - trimmed.len();
            if trimmed.starts_with(':')
                && trimmed[1..]
                    .chars()
                    .next()
                    .is_none_or(|c| c == ' ' || c == '\t')
            {
                Some((key, colon + 1))
            } else {
                None
            }
        }
        b'-' if bytes.get(1).is_none_or(|c| *c == b' ' || *c == b'\t') => None,
        b'[' | b'{' | b'#' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' | b'?' => None,
        _ => {
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b':' && bytes.get(i + 1).is_none_or(|c| *c == b' ' || *c == b'\t') {
                    let key = s[..i].trim_end().to_string();
                    return Some((key, i + 1));
                }
                if bytes[i] == b'#' && i > 0 && bytes[i - 1] == b' ' {
                    return None;
                }
                i += 1;
            }
            None
        }
    }
}

/// True for a block-sequence item start (`-` followed by a space or the end).
fn is_seq_item(s: &str) -> bool {
    let b = s.as_bytes();
    b.first() == Some(&b'-') && b.get(1).is_none_or(|c| *c == b' ' || *c == b'\t')
}

impl<'a> Document<'a> {
    pub fn parse(text: &'a str) -> Result<Document<'a>, EditError> {
        if text.starts_with('\u{feff}') {
            // The edit works on byte offsets of lines; a file with a byte order mark is left
            // to the user rather than rewritten around an invisible character.
            return Err(EditError::Unsupported(
                "it starts with a UTF-8 byte order mark (U+FEFF); save it without one (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`) and run again".into(),
            ));
        }
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            crate::yaml::from_str(text).map_err(|e| match e {
                crate::yaml::Error::Parse(e) => EditError::Yaml(e.to_string()),
                crate::yaml::Error::Limit(limit) => EditError::Unsupported(format!("it {limit}")),
            })?
        };
        let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
        let mut lines = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let (end, next) = match text[start..].find('\n') {
                Some(i) => {
                    let nl = start + i;
                    let end = if nl > start && text.as_bytes()[nl - 1] == b'\r' {
                        nl - 1
                    } else {
                        nl
                    };
                    (end, nl + 1)
                }
                None => (text.len(), text.len()),
            };
            let line = &text[start..end];
            let indent = line.len() - line.trim_start_matches(' ').len();
            let rest = &line[indent..];
            let kind = if rest.trim().is_empty() {
                LineKind::Blank
            } else if rest.starts_with('#') {
                LineKind::Comment
            } else {
                LineKind::Content
            };
            if kind == LineKind::Content && rest.starts_with('\t') {
                return Err(EditError::Unsupported(format!(
                    "line {} is indented with a tab; YAML does not allow that",
                    lines.len() + 1
                )));
            }
            lines.push(Line {
                start,
                end,
                next,
                indent,
                kind,
            });
            start = next;
        }
        Ok(Document {
            text,
            lines,
            newline,
            value,
        })
    }

    fn content_from(&self, line: usize) -> Option<usize> {
        (line..self.lines.len()).find(|&i| self.lines[i].kind == LineKind::Content)
    }

    /// The text of line `line` from column `col`, comment excluded, trailing spaces trimmed.
    fn code(&self, line: usize, col: usize) -> &'a str {
        let l = self.lines[line];
        let s = &self.text[(l.start + col).min(l.end)..l.end];
        s[..comment_start(s)].trim_end()
    }

    /// Parses the node whose first token is at (`line`, `col`). Returns the node and the index
    /// of the first line after it.
    fn node_at(&self, line: usize, col: usize, parent_indent: isize) -> (Node, usize) {
        let code = self.code(line, col);
        if is_seq_item(code) {
            return self.seq_at(line, col);
        }
        if mapping_key(code).is_some() {
            return self.map_at(line, col);
        }
        let start = self.lines[line].start + col;
        self.inline_from(line, start, parent_indent)
    }

    /// An inline value starting at byte `start` on `line`, continued on lines indented more
    /// than `parent_indent`.
    fn inline_from(&self, line: usize, start: usize, parent_indent: isize) -> (Node, usize) {
        let l = self.lines[line];
        let first = &self.text[start..l.end];
        let mut end = start + first[..comment_start(first)].trim_end().len();
        let mut next = line + 1;
        let mut i = line + 1;
        while i < self.lines.len() {
            let li = self.lines[i];
            match li.kind {
                LineKind::Blank => {}
                LineKind::Comment if (li.indent as isize) <= parent_indent => break,
                LineKind::Comment => {}
                LineKind::Content => {
                    if (li.indent as isize) <= parent_indent {
                        break;
                    }
                    let s = &self.text[li.start..li.end];
                    end = li.start + s[..comment_start(s)].trim_end().len();
                    next = i + 1;
                }
            }
            i += 1;
        }
        (Node::Inline { start, end }, next)
    }

    fn map_at(&self, line: usize, col: usize) -> (Node, usize) {
        let mut entries = Vec::new();
        let mut i = line;
        let mut first = true;
        loop {
            let (key_line, key_col) = if first {
                (line, col)
            } else {
                match self.content_from(i) {
                    Some(j) if self.lines[j].indent == col => (j, col),
                    _ => break,
                }
            };
            first = false;
            let code = self.code(key_line, key_col);
            let Some((key, after)) = mapping_key(code) else {
                break;
            };
            let l = self.lines[key_line];
            let value_start = l.start + key_col + after;
            let rest = &self.text[value_start..l.end];
            let rest_code = rest[..comment_start(rest)].trim();
            let (value, next) = if !rest_code.is_empty() {
                let offset = rest.len() - rest.trim_start().len();
                self.inline_from(key_line, value_start + offset, col as isize)
            } else {
                match self.content_from(key_line + 1) {
                    Some(j) if self.lines[j].indent > col => {
                        self.node_at(j, self.lines[j].indent, col as isize)
                    }
                    Some(j) if self.lines[j].indent == col && is_seq_item(self.code(j, col)) => {
                        self.seq_at(j, col)
                    }
                    _ => (
                        Node::Empty {
                            at: value_start,
                            line_end: l.end,
                        },
                        key_line + 1,
                    ),
                }
            };
            let next = next.max(key_line + 1);
            entries.push(MapEntry {
                key,
                line: key_line,
                col: key_col,
                value,
            });
            i = next;
        }
        (Node::Map(entries), i)
    }

    /// The caller has checked that (`line`, `col`) starts an item (`- `); `col` may lie past the
    /// line's indent (`- - a`, a sequence nested on its parent's line). Later items must start
    /// at `col` as a line's first token.
    fn seq_at(&self, line: usize, col: usize) -> (Node, usize) {
        let mut items = Vec::new();
        let mut i = line;
        let mut first = true;
        loop {
            let item_line = if first {
                line
            } else {
                match self.content_from(i) {
                    Some(j) if self.lines[j].indent == col && is_seq_item(self.code(j, col)) => j,
                    _ => break,
                }
            };
            first = false;
            let l = self.lines[item_line];
            let after_dash = &self.text[l.start + col + 1..l.end];
            let pad = after_dash.len() - after_dash.trim_start_matches([' ', '\t']).len();
            let value_col = col + 1 + pad;
            let rest_code = self.code(item_line, value_col);
            let (value, next) = if rest_code.is_empty() {
                match self.content_from(item_line + 1) {
                    Some(j) if self.lines[j].indent > col => {
                        self.node_at(j, self.lines[j].indent, col as isize)
                    }
                    _ => (
                        Node::Empty {
                            at: l.start + col + 1,
                            line_end: l.end,
                        },
                        item_line + 1,
                    ),
                }
            } else if is_seq_item(rest_code) || mapping_key(rest_code).is_some() {
                self.node_at(item_line, value_col, col as isize)
            } else {
                self.inline_from(item_line, l.start + value_col, col as isize)
            };
            // Every item ends on its own line or later: the loop always moves on.
            let next = next.max(item_line + 1);
            items.push(SeqEntry {
                line: item_line,
                value,
                last_line: next.saturating_sub(1).max(item_line),
            });
            i = next;
        }
        (Node::Seq(items), i)
    }

    fn root(&self) -> Option<Node> {
        let first = self.content_from(0)?;
        let mut line = first;
        if self.code(first, 0) == "---" {
            line = self.content_from(first + 1)?;
        }
        let (node, _) = self.node_at(line, self.lines[line].indent, -1);
        Some(node)
    }

    /// Finds the list `locator` points at. `Ok(None)` when the key does not exist.
    pub fn locate(&self, locator: Locator<'_>) -> Result<Option<(ListLoc, Value)>, EditError> {
        let Some(root) = self.root() else {
            return Ok(None);
        };
        let (node, value) = match locator {
            Locator::TopLevel(key) => {
                let Node::Map(entries) = &root else {
                    return Err(EditError::Unsupported(
                        "the file is not a mapping of keys".into(),
                    ));
                };
                let Some(entry) = entries.iter().find(|e| e.key == key) else {
                    return Ok(None);
                };
                let value = self
                    .value
                    .as_mapping()
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or(Value::Null);
                (entry.clone(), value)
            }
            Locator::ContainerCommand => {
                let find = |node: &Node, key: &str| -> Option<MapEntry> {
                    match node {
                        Node::Map(entries) => entries.iter().find(|e| e.key == key).cloned(),
                        _ => None,
                    }
                };
                let missing = || {
                    EditError::Unsupported(
                        "spec.containers[0].command was not found as a block mapping; edit the manifest by hand".into(),
                    )
                };
                let spec = find(&root, "spec").ok_or_else(missing)?;
                let containers = find(&spec.value, "containers").ok_or_else(missing)?;
                let Node::Seq(items) = &containers.value else {
                    return Err(missing());
                };
                let first = items.first().ok_or_else(missing)?;
                let command = find(&first.value, "command").ok_or_else(missing)?;
                let value = self
                    .value
                    .get("spec")
                    .and_then(|s| s.get("containers"))
                    .and_then(|c| c.get(0))
                    .and_then(|c| c.get("command"))
                    .cloned()
                    .unwrap_or(Value::Null);
                (command, value)
            }
        };
        self.list_of(&node, &value).map(|loc| Some((loc, value)))
    }

    fn list_of(&self, entry: &MapEntry, value: &Value) -> Result<ListLoc, EditError> {
        let strings: Vec<String> = match value {
            Value::Sequence(items) => items
                .iter()
                .map(|v| scalar_string(v).ok_or_else(|| unsupported_item(&entry.key, v)))
                .collect::<Result<_, _>>()?,
            Value::Null => Vec::new(),
            other => vec![scalar_string(other).ok_or_else(|| unsupported_item(&entry.key, other))?],
        };
        match &entry.value {
            Node::Seq(items) => {
                if items.len() != strings.len() {
                    return Err(EditError::Unsupported(format!(
                        "could not match the items of `{}` to the lines of the file; edit it by hand",
                        entry.key
                    )));
                }
                let indent = items.first().map_or(0, |i| self.lines[i.line].indent);
                let mut spans = Vec::new();
                for (item, value) in items.iter().zip(strings) {
                    let Node::Inline { start, end } = item.value else {
                        return Err(EditError::Unsupported(format!(
                            "an item of `{}` (line {}) is not a plain string; edit it by hand",
                            entry.key,
                            item.line + 1
                        )));
                    };
                    let raw = &self.text[start..end];
                    check_plain_item(&entry.key, raw, item.line)?;
                    if item.last_line != item.line {
                        return Err(EditError::Unsupported(format!(
                            "an item of `{}` (line {}) continues on the next line; put it on one line first",
                            entry.key,
                            item.line + 1
                        )));
                    }
                    spans.push(ItemSpan {
                        value,
                        start: self.lines[item.line].start,
                        end: self.lines[item.last_line].next,
                        raw: raw.to_string(),
                    });
                }
                let after_colon = mapping_key(self.code(entry.line, entry.col))
                    .map(|(_, after)| self.lines[entry.line].start + entry.col + after)
                    .ok_or_else(|| {
                        EditError::Unsupported(format!("cannot find the `:` of `{}`", entry.key))
                    })?;
                Ok(ListLoc {
                    shape: ListShape::Block {
                        indent,
                        after_colon,
                    },
                    items: spans,
                })
            }
            Node::Inline { start, end } => {
                let raw = &self.text[*start..*end];
                if raw.starts_with('[') {
                    let items = flow_items(raw, *start)?;
                    if items.len() != strings.len() {
                        return Err(EditError::Unsupported(format!(
                            "could not match the items of `{}` to the text of the file; edit it by hand",
                            entry.key
                        )));
                    }
                    let spans = items
                        .into_iter()
                        .zip(strings)
                        .map(|((s, e), value)| {
                            check_plain_item(&entry.key, &self.text[s..e], entry.line)?;
                            Ok(ItemSpan {
                                value,
                                start: s,
                                end: e,
                                raw: self.text[s..e].to_string(),
                            })
                        })
                        .collect::<Result<Vec<_>, EditError>>()?;
                    Ok(ListLoc {
                        shape: ListShape::Flow {
                            open: *start,
                            close: *end - 1,
                        },
                        items: spans,
                    })
                } else if matches!(value, Value::Null) {
                    let l = self.lines[entry.line];
                    Ok(ListLoc {
                        shape: ListShape::Empty {
                            at: *start,
                            value_end: *end,
                            line_end: l.end,
                            key_indent: entry.col,
                        },
                        items: Vec::new(),
                    })
                } else {
                    check_plain_item(&entry.key, raw, entry.line)?;
                    Ok(ListLoc {
                        shape: ListShape::Scalar,
                        items: vec![ItemSpan {
                            value: strings.into_iter().next().unwrap_or_default(),
                            start: *start,
                            end: *end,
                            raw: raw.to_string(),
                        }],
                    })
                }
            }
            Node::Empty { at, line_end } => Ok(ListLoc {
                shape: ListShape::Empty {
                    at: *at,
                    value_end: *at,
                    line_end: *line_end,
                    key_indent: entry.col,
                },
                items: Vec::new(),
            }),
            Node::Map(_) => Err(EditError::Unsupported(format!(
                "`{}` is a mapping, expected a list of strings",
                entry.key
            ))),
        }
    }
}

fn unsupported_item(key: &str, v: &Value) -> EditError {
    EditError::Unsupported(format!(
        "`{key}` holds {}, expected strings",
        crate::config::fields::show(v)
    ))
}

/// The string a scalar stands for, as k3s' `convert.ToString` gives it.
pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn check_plain_item(key: &str, raw: &str, line: usize) -> Result<(), EditError> {
    if raw.starts_with(['&', '*', '!', '|', '>']) {
        return Err(EditError::Unsupported(format!(
            "an item of `{key}` (line {}) uses an anchor, alias, tag or block scalar; edit it by hand",
            line + 1
        )));
    }
    Ok(())
}

/// The byte spans of the items of a flow sequence `raw` (which starts with `[`), offset by `base`.
fn flow_items(raw: &str, base: usize) -> Result<Vec<(usize, usize)>, EditError> {
    let b = raw.as_bytes();
    let mut items = Vec::new();
    let mut i = 1;
    let unsupported = || {
        EditError::Unsupported(
            "a flow list ([...]) with nested collections or comments cannot be edited; edit it by hand"
                .into(),
        )
    };
    loop {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        if i >= b.len() {
            return Err(unsupported());
        }
        match b[i] {
            b']' => break,
            b'[' | b'{' | b'#' => return Err(unsupported()),
            b'"' | b'\'' => {
                let q = b[i];
                let s = i;
                i += 1;
                while i < b.len() {
                    if q == b'"' && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if q == b'\'' && b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
                items.push((base + s, base + i.min(b.len())));
            }
            _ => {
                let s = i;
                while i < b.len() && !matches!(b[i], b',' | b']') {
                    if b[i] == b'#' && matches!(b[i - 1], b' ' | b'\t') {
                        return Err(unsupported());
                    }
                    i += 1;
                }
                let item = raw[s..i].trim_end();
                items.push((base + s, base + s + item.len()));
            }
        }
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => break,
            _ => return Err(unsupported()),
        }
    }
    Ok(items)
}

/// How new items are quoted: like the existing ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Plain,
    Double,
    Single,
}

fn style_of(items: &[ItemSpan]) -> Quote {
    match items.last().map(|i| i.raw.as_bytes().first().copied()) {
        Some(Some(b'"')) => Quote::Double,
        Some(Some(b'\'')) => Quote::Single,
        Some(_) => Quote::Plain,
        None => Quote::Plain,
    }
}

/// True when `s` reads back as the same string when written without quotes (inside a flow
/// list `[...]` when `flow`).
fn plain_safe(s: &str, flow: bool) -> bool {
    if s.is_empty() || s.trim() != s {
        return false;
    }
    if flow && s.contains([',', '[', ']', '{', '}']) {
        return false;
    }
    let first = s.as_bytes()[0];
    if b"-?:,[]{}#&*!|>'\"%@`".contains(&first) && !(first == b'-' && s.starts_with("--")) {
        return false;
    }
    if s.contains(": ") || s.contains(" #") || s.ends_with(':') || s.contains(['\n', '\t']) {
        return false;
    }
    // Must stay a string for a YAML 1.1 and 1.2 reader alike.
    matches!(serde_yaml::from_str::<Value>(s), Ok(Value::String(ref v)) if v == s)
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null" | "~"
        )
}

fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_scalar(s: &str, quote: Quote, flow: bool) -> String {
    match quote {
        Quote::Plain if plain_safe(s, flow) => s.to_string(),
        Quote::Single if !s.contains(['\n', '\t']) => format!("'{}'", s.replace('\'', "''")),
        _ => double_quoted(s),
    }
}

/// For each new item, where to insert it: the byte offset and whether it goes into a block
/// list (as lines) or a flow list.
fn insertion_points(
    loc: &ListLoc,
    items: &[Item],
) -> Result<Vec<(usize, Option<usize>)>, EditError> {
    // Returns, per element of `items`, (position in old-item order, Some(anchor offset)) for new
    // ones; `None` for kept ones.
    let n = loc.items.len();
    let mut kept = vec![false; n];
    let mut last_kept: Option<usize> = None;
    for item in items {
        if let Item::Keep(i) = item {
            if *i >= n || kept[*i] || last_kept.is_some_and(|l| l >= *i) {
                return Err(EditError::Verify(
                    "kept items must stay in their order".into(),
                ));
            }
            kept[*i] = true;
            last_kept = Some(*i);
        }
    }
    let mut out = Vec::new();
    let mut prev: Option<usize> = None;
    for (pos, item) in items.iter().enumerate() {
        match item {
            Item::Keep(i) => {
                prev = Some(*i);
                out.push((*i, None));
            }
            Item::New(_) => {
                let next_kept = items[pos..].iter().find_map(|it| match it {
                    Item::Keep(i) => Some(*i),
                    Item::New(_) => None,
                });
                let lo = prev.map_or(0, |p| p + 1);
                let hi = next_kept.unwrap_or(n);
                let removed = (lo..hi).find(|&r| !kept[r]);
                let anchor = match (removed, prev, next_kept) {
                    (Some(r), _, _) => loc.items[r].start,
                    (None, Some(p), _) => loc.items[p].end,
                    (None, None, Some(k)) => loc.items[k].start,
                    (None, None, None) => usize::MAX,
                };
                out.push((lo, Some(anchor)));
            }
        }
    }
    Ok(out)
}

/// Rewrites the list at `loc` in `text` to `items`. Only removed items' bytes disappear and new
/// items' bytes appear; everything else is copied.
pub fn edit_list(doc: &Document<'_>, loc: &ListLoc, items: &[Item]) -> Result<String, EditError> {
    let text = doc.text;
    let nl = doc.newline;
    let quote = style_of(&loc.items);
    let points = insertion_points(loc, items)?;
    let kept: Vec<bool> = (0..loc.items.len())
        .map(|i| items.contains(&Item::Keep(i)))
        .collect();
    let new_values: Vec<(usize, String)> = items
        .iter()
        .zip(&points)
        .filter_map(|(item, (_, anchor))| match (item, anchor) {
            (Item::New(v), Some(a)) => Some((*a, v.clone())),
            _ => None,
        })
        .collect();
    match &loc.shape {
        ListShape::Block {
            indent,
            after_colon,
        } => {
            // Pieces: (offset, text to insert) and spans to delete.
            let mut out = String::with_capacity(text.len() + 256);
            let mut cursor = 0;
            let mut inserts: Vec<(usize, String)> = Vec::new();
            for (anchor, value) in &new_values {
                let at = if *anchor == usize::MAX {
                    loc.items.last().map_or(text.len(), |i| i.end)
                } else {
                    *anchor
                };
                let mut line = format!(
                    "{}- {}{nl}",
                    " ".repeat(*indent),
                    render_scalar(value, quote, false)
                );
                // An insert at the very end of a file without a final newline.
                if at == text.len() && !text.ends_with('\n') {
                    line = format!("{nl}{}", line.trim_end_matches(['\r', '\n']));
                }
                inserts.push((at, line));
            }
            if items.is_empty() {
                // An empty block list would read as null (k3s would pass an empty flag).
                inserts.push((*after_colon, " []".to_string()));
            }
            let mut deletes: Vec<(usize, usize)> = loc
                .items
                .iter()
                .enumerate()
                .filter(|(i, _)| !kept[*i])
                .map(|(_, it)| (it.start, it.end))
                .collect();
            deletes.sort();
            // Merge: walk offsets in order; inserts at a position go before a delete starting
            // there.
            let mut events: Vec<(usize, u8, usize, String)> = Vec::new();
            for (i, (at, s)) in inserts.into_iter().enumerate() {
                events.push((at, 0, i, s));
            }
            for (s, e) in deletes {
                events.push((s, 1, e, String::new()));
            }
            events.sort_by_key(|e| (e.0, e.1, e.2));
            for (at, kind, extra, s) in events {
                if at > cursor {
                    out.push_str(&text[cursor..at]);
                    cursor = at;
                }
                if kind == 0 {
                    out.push_str(&s);
                } else {
                    cursor = cursor.max(extra);
                }
            }
            out.push_str(&text[cursor..]);
            Ok(out)
        }
        ListShape::Flow { open, close } => {
            let rendered: Vec<String> = items
                .iter()
                .map(|item| match item {
                    Item::Keep(i) => loc.items[*i].raw.clone(),
                    Item::New(v) => render_scalar(v, quote, true),
                })
                .collect();
            let inner = &text[open + 1..*close];
            let multiline = inner.contains('\n');
            let body = if rendered.is_empty() {
                String::new()
            } else if multiline {
                // Keep the layout of the original when only appending or removing at the end:
                // rebuild from the original text up to the last kept item.
                return Ok(flow_edit_multiline(text, loc, items, quote, *close));
            } else {
                let padded = inner.starts_with(' ') && inner.ends_with(' ');
                let joined = rendered.join(", ");
                if padded {
                    format!(" {joined} ")
                } else {
                    joined
                }
            };
            Ok(format!("{}{}{}", &text[..open + 1], body, &text[*close..]))
        }
        ListShape::Scalar => {
            // A single string where a list is allowed: becomes a flow list.
            let rendered: Vec<String> = items
                .iter()
                .map(|item| match item {
                    Item::Keep(i) => loc.items[*i].raw.clone(),
                    Item::New(v) => render_scalar(v, quote, true),
                })
                .collect();
            let item = &loc.items[0];
            Ok(format!(
                "{}[{}]{}",
                &text[..item.start],
                rendered.join(", "),
                &text[item.end..]
            ))
        }
        ListShape::Empty {
            at,
            value_end,
            line_end,
            key_indent,
        } => {
            let values: Vec<String> = items
                .iter()
                .filter_map(|item| match item {
                    Item::New(v) => Some(v.clone()),
                    Item::Keep(_) => None,
                })
                .collect();
            if values.is_empty() {
                return Ok(format!("{} []{}", &text[..*at], &text[*value_end..]));
            }
            if value_end > at {
                // An explicit null: replace it with a flow list.
                let rendered: Vec<String> = values
                    .iter()
                    .map(|v| render_scalar(v, Quote::Plain, true))
                    .collect();
                return Ok(format!(
                    "{} [{}]{}",
                    &text[..*at],
                    rendered.join(", "),
                    &text[*value_end..]
                ));
            }
            let indent = " ".repeat(key_indent + 2);
            let mut block = String::new();
            for v in &values {
                block.push_str(&format!(
                    "{nl}{indent}- {}",
                    render_scalar(v, Quote::Plain, false)
                ));
            }
            Ok(format!(
                "{}{}{}",
                &text[..*line_end],
                block,
                &text[*line_end..]
            ))
        }
    }
}

/// A multi-line flow list: delete removed items (with their separator) and append new ones after
/// the last item, keeping every other byte.
fn flow_edit_multiline(
    text: &str,
    loc: &ListLoc,
    items: &[Item],
    quote: Quote,
    close: usize,
) -> String {
    let kept: Vec<usize> = items
        .iter()
        .filter_map(|i| match i {
            Item::Keep(k) => Some(*k),
            Item::New(_) => None,
        })
        .collect();
    let new: Vec<String> = items
        .iter()
        .filter_map(|i| match i {
            Item::New(v) => Some(render_scalar(v, quote, true)),
            Item::Keep(_) => None,
        })
        .collect();
    let mut out = String::new();
    let mut cursor = 0;
    let n = loc.items.len();
    for i in 0..n {
        if kept.contains(&i) {
            continue;
        }
        let it = &loc.items[i];
        // Delete the item and the separator after it (or before it, for the last item).
        let (s, e) = if i + 1 < n {
            (it.start, loc.items[i + 1].start)
        } else if i > 0 {
            (loc.items[i - 1].end, it.end)
        } else {
            (it.start, it.end)
        };
        if s >= cursor {
            out.push_str(&text[cursor..s]);
            cursor = e;
        }
    }
    let append_at = kept.last().map(|k| loc.items[*k].end).unwrap_or(close);
    if append_at >= cursor {
        out.push_str(&text[cursor..append_at]);
        cursor = append_at;
    }
    if !new.is_empty() {
        if kept.is_empty() {
            out.push_str(&new.join(", "));
        } else {
            out.push_str(&format!(", {}", new.join(", ")));
        }
    }
    out.push_str(&text[cursor..]);
    out
}

/// Appends a new top-level `key:` with `values` as a block list at the end of `text` (which
/// may be empty), after a comment line.
pub fn append_top_level_list(text: &str, key: &str, values: &[String], comment: &str) -> String {
    let nl = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push_str(nl);
    }
    if !comment.is_empty() {
        out.push_str(&format!("# {comment}{nl}"));
    }
    out.push_str(&format!("{key}:{nl}"));
    for v in values {
        out.push_str(&format!(
            "  - {}{nl}",
            render_scalar(v, Quote::Plain, false)
        ));
    }
    out
}

/// Checks that `new_text` means `old` with the list at `locator` replaced by `expected`, and
/// nothing else changed.
pub fn check_only_list_changed(
    old: &Value,
    new_text: &str,
    locator: Locator<'_>,
    expected: &[String],
) -> Result<(), EditError> {
    let new: Value = crate::yaml::from_str(new_text)
        .map_err(|e| EditError::Verify(format!("the result is not valid YAML: {e}")))?;
    let mut want = if old.is_null() {
        Value::Mapping(Default::default())
    } else {
        old.clone()
    };
    let list = Value::Sequence(expected.iter().cloned().map(Value::String).collect());
    let slot = match locator {
        Locator::TopLevel(key) => want
            .as_mapping_mut()
            .map(|m| m.entry(Value::String(key.into())).or_insert(Value::Null)),
        Locator::ContainerCommand => want
            .get_mut("spec")
            .and_then(|s| s.get_mut("containers"))
            .and_then(|c| c.get_mut(0))
            .and_then(|c| c.get_mut("command")),
    };
    let Some(slot) = slot else {
        return Err(EditError::Verify("the list is missing".into()));
    };
    *slot = list;
    let got = normalize(&new);
    if got != normalize(&want) {
        return Err(EditError::Verify(
            "the parsed result differs from the intended change".into(),
        ));
    }
    Ok(())
}

/// Numbers and booleans inside lists compare as the strings k3s would pass.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Sequence(items) => Value::Sequence(
            items
                .iter()
                .map(|i| match i {
                    Value::Number(_) | Value::Bool(_) => {
                        Value::String(scalar_string(i).unwrap_or_default())
                    }
                    other => normalize(other),
                })
                .collect(),
        ),
        Value::Mapping(m) => {
            Value::Mapping(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_or_deep_nesting_is_refused_with_its_cause() {
        let bom = Document::parse("\u{feff}kube-apiserver-arg:\n- a=b\n").err();
        assert!(
            matches!(&bom, Some(EditError::Unsupported(m)) if m.contains("byte order mark")),
            "{bom:?}"
        );
        let deep = Document::parse(&format!("a: {}", "[".repeat(100_000))).err();
        assert!(
            matches!(&deep, Some(EditError::Unsupported(m)) if m.starts_with("it nests collections too deeply")),
            "{deep:?}"
        );
    }

    fn edit(text: &str, loc: Locator<'_>, f: impl Fn(&[ItemSpan]) -> Vec<Item>) -> String {
        let doc = Document::parse(text).expect("parse");
        let (list, _) = doc.locate(loc).expect("locate").expect("present");
        let items = f(&list.items);
        let expected: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Keep(k) => list.items[*k].value.clone(),
                Item::New(v) => v.clone(),
            })
            .collect();
        let out = edit_list(&doc, &list, &items).expect("edit");
        check_only_list_changed(&doc.value, &out, loc, &expected).expect("verify");
        out
    }

    #[test]
    fn block_list_keeps_comments_and_quotes() {
        let text = "# k3s\nwrite-kubeconfig-mode: \"0644\"\nkube-apiserver-arg:\n  # audit\n  - \"audit-log-maxage=30\" # days\n  - \"service-account-issuer=https://old\"\ntls-san:\n  - a\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![
                Item::Keep(0),
                Item::New("service-account-issuer=https://new".into()),
                Item::New("service-account-issuer=https://old".into()),
            ]
        });
        assert_eq!(
            out,
            "# k3s\nwrite-kubeconfig-mode: \"0644\"\nkube-apiserver-arg:\n  # audit\n  - \"audit-log-maxage=30\" # days\n  - \"service-account-issuer=https://new\"\n  - \"service-account-issuer=https://old\"\ntls-san:\n  - a\n"
        );
    }

    #[test]
    fn compact_sequence_and_crlf() {
        let text = "kube-apiserver-arg:\r\n- a=b\r\n- c=d\r\nnode-name: x\r\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![Item::Keep(0), Item::Keep(1), Item::New("e=f".into())]
        });
        assert_eq!(
            out,
            "kube-apiserver-arg:\r\n- a=b\r\n- c=d\r\n- e=f\r\nnode-name: x\r\n"
        );
    }

    #[test]
    fn flow_lists() {
        let text = "kube-apiserver-arg: [\"a=b\", 'c=d'] # args\nx: 1\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![Item::Keep(1), Item::New("e=f".into())]
        });
        assert_eq!(out, "kube-apiserver-arg: ['c=d', 'e=f'] # args\nx: 1\n");
        let text = "kube-apiserver-arg: [\n    \"a=b\",\n    \"c=d\"\n  ]\nx: 1\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![Item::Keep(0), Item::New("e=f".into())]
        });
        assert_eq!(
            out,
            "kube-apiserver-arg: [\n    \"a=b\", \"e=f\"\n  ]\nx: 1\n"
        );
    }

    #[test]
    fn scalar_and_empty_values() {
        let text = "kube-apiserver-arg: a=b\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![Item::Keep(0), Item::New("c=d".into())]
        });
        assert_eq!(out, "kube-apiserver-arg: [a=b, c=d]\n");
        let text = "kube-apiserver-arg: # later\nx: 1\n";
        let out = edit(text, Locator::TopLevel("kube-apiserver-arg"), |_| {
            vec![Item::New("c=d".into())]
        });
        assert_eq!(out, "kube-apiserver-arg: # later\n  - c=d\nx: 1\n");
    }

    #[test]
    fn kubeadm_command_in_place() {
        let text = "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - command:\n    - kube-apiserver\n    - --secure-port=6443\n    - --service-account-issuer=https://kubernetes.default.svc.cluster.local\n    - --service-account-key-file=/etc/kubernetes/pki/sa.pub\n    image: x\n  hostNetwork: true\n";
        let out = edit(text, Locator::ContainerCommand, |_| {
            vec![
                Item::Keep(0),
                Item::Keep(1),
                Item::New("--service-account-issuer=https://new".into()),
                Item::New(
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                ),
                Item::Keep(3),
            ]
        });
        assert!(out.contains("    - --secure-port=6443\n    - --service-account-issuer=https://new\n    - --service-account-issuer=https://kubernetes.default.svc.cluster.local\n    - --service-account-key-file"));
    }

    #[test]
    fn plain_safety() {
        assert!(plain_safe(
            "--service-account-issuer=https://x.example/a",
            false
        ));
        assert!(plain_safe("service-account-issuer=https://x", true));
        assert!(plain_safe("api-audiences=a,b", false));
        assert!(!plain_safe("api-audiences=a,b", true));
        assert!(!plain_safe("yes", false));
        assert!(!plain_safe("a: b", false));
        assert!(!plain_safe("-x", false));
        assert!(!plain_safe("123", false));
    }
}
