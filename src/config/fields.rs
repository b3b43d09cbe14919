//! Reading typed fields out of one YAML mapping while collecting every problem.
//!
//! A [`Fields`] wraps one mapping of one file. Each typed getter records a [`Problem`] (file,
//! dotted key, bad value, why) instead of stopping, and [`Fields::finish`] reports keys nobody
//! asked for, with a suggestion when one is close to a known key. So a config with five
//! mistakes yields five messages in one run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file it is in (`None` for problems of the merged result, e.g. a missing key).
    pub file: Option<PathBuf>,
    /// Dotted key, e.g. `publish[2].bucket`.
    pub key: String,
    /// The offending value as written, if there is one.
    pub value: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}", self.key)?;
        if let Some(value) = &self.value {
            write!(f, " = {value}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A short rendering of a YAML value for messages.
pub fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "(a list)".into(),
        Value::Mapping(_) => "(a mapping)".into(),
        Value::Tagged(t) => format!("!{} …", t.tag),
    }
}

/// Typed access to one mapping, recording problems.
pub struct Fields<'a> {
    file: &'a Path,
    prefix: String,
    map: &'a Mapping,
    known: Vec<&'static str>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Fields<'a> {
    pub fn new(
        file: &'a Path,
        prefix: impl Into<String>,
        map: &'a Mapping,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Fields {
            file,
            prefix: prefix.into(),
            map,
            known: Vec::new(),
            problems,
        }
    }

    pub fn file(&self) -> &'a Path {
        self.file
    }

    /// The problem list, for parsing nested structures with their own [`Fields`].
    pub fn problems(&mut self) -> &mut Vec<Problem> {
        self.problems
    }

    /// The dotted name of `key` in this mapping.
    pub fn key_name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// Records a problem with `key`.
    pub fn problem(&mut self, key: &str, value: Option<&Value>, message: impl Into<String>) {
        let key = self.key_name(key);
        self.problems.push(Problem {
            file: Some(self.file.to_path_buf()),
            key,
            value: value.map(show),
            message: message.into(),
        });
    }

    /// The raw value of `key` (marking it known). An explicit `null` counts as absent.
    pub fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn string(&mut self, key: &'static str) -> Option<String> {
        let value = self.raw(key)?;
        match value {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(key, Some(other), "expected a string (quote it)");
                None
            }
        }
    }

    pub fn bool(&mut self, key: &'static str) -> Option<bool> {
        let value = self.raw(key)?;
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                self.problem(key, Some(other), "expected true or false");
                None
            }
        }
    }

    /// One of `choices`, as written.
    pub fn choice(&mut self, key: &'static str, choices: &[&'static str]) -> Option<&'static str> {
        let value = self.raw(key)?;
        let found = value
            .as_str()
            .and_then(|s| choices.iter().find(|c| **c == s).copied());
        if found.is_none() {
            self.problem(
                key,
                Some(value),
                format!("expected one of {}", choices.join(", ")),
            );
        }
        found
    }

    /// A duration such as `90d`, `24h`, `1h30m`, `45s` (see [`parse_duration`]).
    pub fn duration(&mut self, key: &'static str) -> Option<Duration> {
        let value = self.raw(key)?;
        let parsed = match value {
            Value::String(s) => parse_duration(s),
            Value::Number(_) => Err(format!(
                "a duration needs a unit: write {}s, or use m, h, d, w",
                show(value)
            )),
            _ => Err("expected a duration such as 90d, 24h or 15m".into()),
        };
        match parsed {
            Ok(d) => Some(d),
            Err(why) => {
                self.problem(key, Some(value), why);
                None
            }
        }
    }

    /// A nested mapping.
    pub fn mapping(&mut self, key: &'static str) -> Option<&'a Mapping> {
        let value = self.raw(key)?;
        match value {
            Value::Mapping(m) => Some(m),
            other => {
                self.problem(key, Some(other), "expected a mapping of keys");
                None
            }
        }
    }

    /// A list.
    pub fn sequence(&mut self, key: &'static str) -> Option<&'a Vec<Value>> {
        let value = self.raw(key)?;
        match value {
            Value::Sequence(s) => Some(s),
            other => {
                self.problem(key, Some(other), "expected a list");
                None
            }
        }
    }

    /// Reports keys that no getter asked for.
    pub fn finish(self) {
        let known: BTreeSet<&str> = self.known.iter().copied().collect();
        for (key, value) in self.map {
            let name = match key {
                Value::String(s) => s.as_str(),
                other => {
                    let shown = show(other);
                    self.problems.push(Problem {
                        file: Some(self.file.to_path_buf()),
                        key: if self.prefix.is_empty() {
                            shown
                        } else {
                            format!("{}.{shown}", self.prefix)
                        },
                        value: None,
                        message: "keys must be strings".into(),
                    });
                    continue;
                }
            };
            if known.contains(name) {
                continue;
            }
            let mut message = "unknown key".to_string();
            if let Some(close) = suggest(name, &known) {
                message.push_str(&format!(" (did you mean `{close}`?)"));
            } else if !known.is_empty() {
                let list: Vec<&str> = known.iter().copied().collect();
                message.push_str(&format!("; known keys here: {}", list.join(", ")));
            }
            let key = if self.prefix.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", self.prefix)
            };
            self.problems.push(Problem {
                file: Some(self.file.to_path_buf()),
                key,
                value: Some(show(value)),
                message,
            });
        }
    }
}

/// The known key closest to `name`, if it is close enough to be a typo
/// (snake_case and camelCase spellings of kebab-case keys included).
fn suggest<'k>(name: &str, known: &BTreeSet<&'k str>) -> Option<&'k str> {
    let normalized: String = name
        .chars()
        .flat_map(|c| {
            if c.is_ascii_uppercase() {
                vec!['-', c.to_ascii_lowercase()]
            } else if c == '_' {
                vec!['-']
            } else {
                vec![c]
            }
        })
        .collect();
    known
        .iter()
        .map(|k| (edit_distance(&normalized, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses `90d`, `24h`, `1h30m`, `15m`, `45s`, `2w`, `250ms`: one or more number+unit pairs.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total_ms: u64 = 0;
    let mut digits = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit_ms: u64 = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 604_800_000,
            _ => {
                return Err(format!(
                    "unknown duration unit {c:?}; use ms, s, m, h, d or w (e.g. 90d, 1h30m)"
                ));
            }
        };
        if digits.is_empty() {
            return Err("a duration unit needs a number before it (e.g. 90d)".into());
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| "duration number is too large".to_string())?;
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| "duration is too large".to_string())?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!(
            "a duration needs a unit: write {digits}s, or use m, h, d, w"
        ));
    }
    Ok(Duration::from_millis(total_ms))
}

/// Renders a duration the way a person writes it (`90d`, `1h30m`, `250ms`, `0s`).
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 && millis == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        out.push_str(&format!("{millis}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90 * 86_400)), "90d");
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
    }

    #[test]
    fn suggestions() {
        let known: BTreeSet<&str> = ["issuer", "jwks-uri", "distribution"].into();
        assert_eq!(suggest("jwks_uri", &known), Some("jwks-uri"));
        assert_eq!(suggest("jwksUri", &known), Some("jwks-uri"));
        assert_eq!(suggest("isuer", &known), Some("issuer"));
        assert_eq!(suggest("completely-else", &known), None);
    }
}
