//! The effective kube-apiserver flag model.
//!
//! Every distribution ends up handing kube-apiserver a list of `--name=value` arguments. This
//! module models that list ([`Arg`]), computes it the way k3s/RKE2 do from their defaults and
//! `kube-apiserver-arg` entries ([`k3s_get_args`], a port of k3s `util.GetArgs`), and reads the
//! service-account flags out of it with kube-apiserver's own flag semantics
//! ([`ServiceAccountFlags::from_args`]):
//!
//! - `--service-account-issuer` and `--service-account-key-file` are string arrays: every
//!   occurrence adds one value, in order, no comma splitting;
//! - `--api-audiences` is a string slice: every occurrence adds its comma-separated values;
//!   an empty or absent value means "all issuers";
//! - `--service-account-signing-key-file` and `--service-account-jwks-uri` are plain strings:
//!   the last occurrence wins.

use std::collections::BTreeMap;

pub const ISSUER: &str = "service-account-issuer";
pub const AUDIENCES: &str = "api-audiences";
pub const JWKS_URI: &str = "service-account-jwks-uri";
pub const KEY_FILE: &str = "service-account-key-file";
pub const SIGNING_KEY_FILE: &str = "service-account-signing-key-file";
pub const SIGNING_ENDPOINT: &str = "service-account-signing-endpoint";
pub const MAX_TOKEN_EXPIRATION: &str = "service-account-max-token-expiration";
pub const EXTEND_TOKEN_EXPIRATION: &str = "service-account-extend-token-expiration";

/// The flags `apply` writes. Everything else is left exactly as it is.
pub const MANAGED: [&str; 3] = [ISSUER, AUDIENCES, JWKS_URI];

/// Flags that take a value, so `--name value` (two list items) is read as one flag.
const VALUED: [&str; 8] = [
    ISSUER,
    AUDIENCES,
    JWKS_URI,
    KEY_FILE,
    SIGNING_KEY_FILE,
    SIGNING_ENDPOINT,
    MAX_TOKEN_EXPIRATION,
    "advertise-address",
];

/// One kube-apiserver argument, `--name=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: String,
    pub value: String,
}

impl Arg {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Arg {
            name: name.into(),
            value: value.into(),
        }
    }

    /// `--name=value`.
    pub fn render(&self) -> String {
        format!("--{}={}", self.name, self.value)
    }
}

/// Splits one command-line item: `--name=value` -> (name, Some(value)), `--name` -> (name, None).
/// Returns `None` for items that are not flags (the binary name, stray values).
pub fn split_flag(item: &str) -> Option<(&str, Option<&str>)> {
    let body = item.strip_prefix("--").or_else(|| item.strip_prefix('-'))?;
    if body.is_empty() {
        return None;
    }
    Some(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

/// Reads a command line (`kube-apiserver --a=b --c d ...`) into arguments, as pflag does for
/// the flags this agent cares about: `--name value` is one flag for flags that take a value.
/// Returns each argument with the index of the item(s) it came from.
pub fn parse_command(items: &[String]) -> Vec<(Arg, Vec<usize>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        match split_flag(&items[i]) {
            Some((name, Some(value))) => out.push((Arg::new(name, value), vec![i])),
            Some((name, None)) => {
                let takes_value = VALUED.contains(&name);
                let next_is_value = items.get(i + 1).is_some_and(|next| !next.starts_with('-'));
                if takes_value && next_is_value {
                    out.push((Arg::new(name, items[i + 1].clone()), vec![i, i + 1]));
                    i += 1;
                } else {
                    out.push((Arg::new(name, "true"), vec![i]));
                }
            }
            None => {}
        }
        i += 1;
    }
    out
}

/// One `kube-apiserver-arg` entry split as k3s splits it: the leading `--` removed, the name,
/// and the `+` (append to the default) / `-` (prepend) suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraArg {
    /// The flag name without `--` and without the `+`/`-` suffix.
    pub name: String,
    pub value: String,
    pub mode: ExtraMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraMode {
    /// `name=value`: replaces the default.
    Replace,
    /// `name+=value`: after the default.
    Append,
    /// `name-=value`: before the default.
    Prepend,
}

impl ExtraArg {
    /// k3s: `strings.SplitN(strings.TrimPrefix(arg, "--"), "=", 2)`, value `true` without `=`,
    /// the name cleaned with `strings.TrimRight(name, "-+")`.
    pub fn parse(entry: &str) -> ExtraArg {
        let body = entry.strip_prefix("--").unwrap_or(entry);
        let (raw_name, value) = match body.split_once('=') {
            Some((n, v)) => (n, v.to_string()),
            None => (body, "true".to_string()),
        };
        let mode = if raw_name.ends_with('+') {
            ExtraMode::Append
        } else if raw_name.ends_with('-') {
            ExtraMode::Prepend
        } else {
            ExtraMode::Replace
        };
        ExtraArg {
            name: raw_name.trim_end_matches(['-', '+']).to_string(),
            value,
            mode,
        }
    }
}

/// k3s `util.GetArgs`: the default arguments overridden, appended to or prepended to by the
/// `kube-apiserver-arg` entries, sorted by flag name, repeated flags in entry order.
pub fn k3s_get_args(defaults: &BTreeMap<String, String>, extra: &[String]) -> Vec<Arg> {
    let mut initial = defaults.clone();
    let mut multi: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in extra {
        let arg = ExtraArg::parse(entry);
        let initial_value = initial.get(&arg.name).cloned();
        let existing = multi.get(&arg.name).cloned().unwrap_or_default();
        let mut values = Vec::new();
        match arg.mode {
            ExtraMode::Append => {
                values.extend(initial_value);
                values.extend(existing);
                values.push(arg.value);
            }
            ExtraMode::Prepend => {
                values.push(arg.value);
                values.extend(initial_value);
                values.extend(existing);
            }
            ExtraMode::Replace => {
                values.extend(existing);
                values.push(arg.value);
            }
        }
        initial.remove(&arg.name);
        multi.insert(arg.name, values);
    }
    for (name, value) in initial {
        multi.insert(name, vec![value]);
    }
    multi
        .into_iter()
        .flat_map(|(name, values)| values.into_iter().map(move |v| Arg::new(name.clone(), v)))
        .collect()
}

/// The service-account flags kube-apiserver ends up with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAccountFlags {
    /// `--service-account-issuer`s in order; the first signs.
    pub issuers: Vec<String>,
    /// `--api-audiences` as given; `None` when absent or empty (then the issuers are used).
    pub api_audiences: Option<Vec<String>>,
    pub jwks_uri: Option<String>,
    /// `--service-account-key-file`s in order, as written (host paths).
    pub key_files: Vec<String>,
    pub signing_key_file: Option<String>,
    /// `--service-account-signing-endpoint` (ExternalJWTSigner): no key files are used then.
    pub signing_endpoint: Option<String>,
    pub max_token_expiration: Option<String>,
    pub extend_token_expiration: Option<String>,
}

/// Go's `encoding/csv` reading of one line, as pflag's string slices use it: fields separated
/// by commas, a field may be double-quoted (`""` inside is a quote).
pub fn split_csv(value: &str) -> Vec<String> {
    if value.is_empty() {
        return Vec::new();
    }
    let mut fields = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        break;
                    }
                } else {
                    field.push(c);
                }
            }
            // Anything up to the next comma after a closing quote is kept (Go would refuse it).
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                field.push(c);
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
        if chars.next().is_none() {
            break;
        }
    }
    fields
}

impl ServiceAccountFlags {
    pub fn from_args(args: &[Arg]) -> Self {
        let mut flags = ServiceAccountFlags::default();
        let mut audiences: Option<Vec<String>> = None;
        for arg in args {
            let value = arg.value.clone();
            match arg.name.as_str() {
                ISSUER => flags.issuers.push(value),
                AUDIENCES => audiences
                    .get_or_insert_with(Vec::new)
                    .extend(split_csv(&value)),
                JWKS_URI => flags.jwks_uri = Some(value),
                KEY_FILE => flags.key_files.push(value),
                SIGNING_KEY_FILE => flags.signing_key_file = Some(value),
                SIGNING_ENDPOINT => flags.signing_endpoint = Some(value),
                MAX_TOKEN_EXPIRATION => flags.max_token_expiration = Some(value),
                EXTEND_TOKEN_EXPIRATION => flags.extend_token_expiration = Some(value),
                _ => {}
            }
        }
        flags.api_audiences = audiences.filter(|a| !a.is_empty());
        flags
    }

    /// The audiences tokens are accepted for: `--api-audiences`, or all issuers when unset.
    pub fn effective_audiences(&self) -> Vec<String> {
        self.api_audiences
            .clone()
            .unwrap_or_else(|| self.issuers.clone())
    }

    /// The `--service-account-jwks-uri` / `jwks_uri` the apiserver advertises, if set.
    pub fn jwks_uri(&self) -> Option<&str> {
        self.jwks_uri.as_deref().filter(|u| !u.is_empty())
    }
}

/// The values one managed flag must have, rendered as kube-apiserver arguments.
pub fn render_managed(name: &str, values: &[String]) -> Vec<Arg> {
    if name == AUDIENCES {
        vec![Arg::new(name, values.join(","))]
    } else {
        values.iter().map(|v| Arg::new(name, v.clone())).collect()
    }
}

/// Parses a Go duration as kube-apiserver flags take it (`24h`, `1h30m`, `3600s`); `None` when
/// it is not one.
pub fn parse_go_duration(value: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(std::time::Duration::ZERO);
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    Some(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> BTreeMap<String, String> {
        [
            (ISSUER, "https://kubernetes.default.svc.cluster.local"),
            (
                AUDIENCES,
                "https://kubernetes.default.svc.cluster.local,k3s",
            ),
            (KEY_FILE, "/var/lib/rancher/k3s/server/tls/service.key"),
            (
                SIGNING_KEY_FILE,
                "/var/lib/rancher/k3s/server/tls/service.current.key",
            ),
            ("anonymous-auth", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn issuers(extra: &[&str]) -> Vec<String> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        ServiceAccountFlags::from_args(&k3s_get_args(&defaults(), &extra)).issuers
    }

    #[test]
    fn k3s_entries_replace_append_and_prepend_the_default() {
        let default = "https://kubernetes.default.svc.cluster.local";
        assert_eq!(issuers(&[]), vec![default]);
        assert_eq!(
            issuers(&["service-account-issuer=https://a"]),
            vec!["https://a"]
        );
        assert_eq!(
            issuers(&[
                "service-account-issuer=https://a",
                "--service-account-issuer=https://b"
            ]),
            vec!["https://a", "https://b"]
        );
        assert_eq!(
            issuers(&["service-account-issuer+=https://a"]),
            vec![default, "https://a"]
        );
        assert_eq!(
            issuers(&["service-account-issuer-=https://a"]),
            vec!["https://a", default]
        );
        // A prepend after other entries goes before all of them (k3s puts the value first).
        assert_eq!(
            issuers(&[
                "service-account-issuer=https://a",
                "service-account-issuer-=https://b"
            ]),
            vec!["https://b", "https://a"]
        );
        assert_eq!(
            issuers(&[
                "service-account-issuer-=https://a",
                "service-account-issuer+=https://b"
            ]),
            vec!["https://a", default, "https://b"]
        );
    }

    #[test]
    fn output_is_sorted_by_name_and_keeps_repeats_in_order() {
        let args = k3s_get_args(&defaults(), &["zz=1".into(), "aa".into(), "zz=0".into()]);
        let names: Vec<_> = args.iter().map(|a| a.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(args[0], Arg::new("aa", "true"));
        let zz: Vec<_> = args.iter().filter(|a| a.name == "zz").collect();
        assert_eq!(zz[0].value, "1");
        assert_eq!(zz[1].value, "0");
    }

    #[test]
    fn audiences_split_on_commas_and_default_to_issuers() {
        let flags = ServiceAccountFlags::from_args(&[
            Arg::new(ISSUER, "https://a"),
            Arg::new(ISSUER, "https://b"),
        ]);
        assert_eq!(flags.effective_audiences(), vec!["https://a", "https://b"]);
        let flags = ServiceAccountFlags::from_args(&[
            Arg::new(AUDIENCES, "x,y"),
            Arg::new(AUDIENCES, "\"z,w\""),
        ]);
        assert_eq!(flags.effective_audiences(), vec!["x", "y", "z,w"]);
        let flags = ServiceAccountFlags::from_args(&[
            Arg::new(ISSUER, "https://a"),
            Arg::new(AUDIENCES, ""),
        ]);
        assert_eq!(flags.api_audiences, None);
        assert_eq!(flags.effective_audiences(), vec!["https://a"]);
    }

    #[test]
    fn command_lines_with_separate_values() {
        let items: Vec<String> = [
            "kube-apiserver",
            "--service-account-issuer",
            "https://a",
            "--allow-privileged=true",
            "--profiling",
            "--service-account-key-file=/k",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args = parse_command(&items);
        assert_eq!(args[0], (Arg::new(ISSUER, "https://a"), vec![1, 2]));
        assert_eq!(args[2], (Arg::new("profiling", "true"), vec![4]));
        assert_eq!(args[3].0, Arg::new(KEY_FILE, "/k"));
    }

    #[test]
    fn go_durations() {
        assert_eq!(
            parse_go_duration("24h"),
            Some(std::time::Duration::from_secs(86400))
        );
        assert_eq!(
            parse_go_duration("1h30m"),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(parse_go_duration("5d"), None);
    }
}
