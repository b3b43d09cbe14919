//! Every YAML text the agent reads (its own configuration, k3s/RKE2 `config.yaml`, kubeadm
//! manifests) goes through [`from_str`]: size and nesting limits are checked by a cheap linear
//! pre-scan **before** the parser sees the text, because the parser's time is not linear in
//! nesting (200 KB of `[` took two minutes of CPU), and a leading UTF-8 byte order mark is
//! dropped (the parser took it for the start of a second document).
//!
//! The pre-scan ([`check_limits`]) follows YAML's structure closely enough to count real
//! nesting: flow collections (`[`/`{` outside quoted scalars, plain scalars and comments) and
//! block collections (indentation, and compact `- - item` on one line). Block scalars (`|`,
//! `>`) and quoted scalars are skipped. It errs on the side of counting: a plain scalar
//! continued on a line that starts with `[` is counted as a collection, which can only make a
//! file with more than [`MAX_DEPTH`] such lines be refused with a message saying why.

use serde::de::DeserializeOwned;

/// The largest YAML text parsed (the same cap as for reading a configuration file).
pub const MAX_BYTES: usize = 1 << 20;
/// The deepest nesting of collections accepted. Real files nest a handful of levels (a
/// kubeadm manifest about eight); yaml_serde itself refuses 128.
pub const MAX_DEPTH: usize = 64;

/// A limit the text breaks; the message reads after the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "is too large for a YAML file the agent reads ({size} bytes; at most {limit} bytes are parsed)"
    )]
    TooLarge { size: usize, limit: usize },
    #[error(
        "nests collections too deeply (more than {limit} levels at line {line}); not parsed, as deep nesting takes the YAML parser unbounded time"
    )]
    TooDeep { line: usize, limit: usize },
}

/// Why a YAML text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Limit(#[from] LimitError),
    #[error("not valid YAML: {0}")]
    Parse(#[from] serde_yaml::Error),
}

impl Error {
    /// The cause as it reads after a file name: `<file> is not valid YAML: ...`.
    pub fn after_path(&self) -> String {
        match self {
            Error::Limit(limit) => limit.to_string(),
            Error::Parse(e) => format!("is not valid YAML: {e}"),
        }
    }
}

/// The text without a leading UTF-8 byte order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses `text` (a leading byte order mark dropped) after [`check_limits`].
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    let text = strip_bom(text);
    check_limits(text)?;
    Ok(serde_yaml::from_str(text)?)
}

/// Checks size and nesting without parsing; time linear in the length of `text`.
pub fn check_limits(text: &str) -> Result<(), LimitError> {
    if text.len() > MAX_BYTES {
        return Err(LimitError::TooLarge {
            size: text.len(),
            limit: MAX_BYTES,
        });
    }
    let mut scan = Scan::default();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        scan.line(line.as_bytes())
            .map_err(|()| LimitError::TooDeep {
                line: n + 1,
                limit: MAX_DEPTH,
            })?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    Single,
    Double,
}

#[derive(Debug, Default)]
struct Scan {
    /// Columns where the open block collections' nodes start.
    block: Vec<usize>,
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// Inside a quoted scalar that goes on over lines.
    quote: Option<Quote>,
    /// Inside a block scalar: lines indented more than this belong to it.
    block_scalar: Option<usize>,
}

const fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl Scan {
    fn depth(&self) -> usize {
        self.block.len() + self.flow
    }

    fn check(&self) -> Result<(), ()> {
        if self.depth() > MAX_DEPTH {
            Err(())
        } else {
            Ok(())
        }
    }

    /// One line (without its line break).
    fn line(&mut self, line: &[u8]) -> Result<(), ()> {
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        if let Some(parent) = self.block_scalar {
            if line[indent..].iter().all(|&b| is_blank(b)) || indent > parent {
                return Ok(());
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        // Whether the next non-blank byte starts a node (so `[`, `{`, quotes, `|`, `>`, `-`,
        // `?` are indicators there, and plain text elsewhere).
        let mut node_start = true;
        if self.quote.is_none() && self.flow == 0 {
            let content = &line[indent..];
            if content.is_empty() || content[0] == b'#' {
                return Ok(());
            }
            if indent == 0 && content[0] == b'%' {
                return Ok(()); // a directive
            }
            if indent == 0
                && (content.starts_with(b"---") || content.starts_with(b"..."))
                && content.get(3).is_none_or(|&b| is_blank(b))
            {
                // A document marker: a new document's collections start afresh.
                self.block.clear();
                i = 3;
            } else {
                while self.block.last().is_some_and(|&col| col >= indent) {
                    self.block.pop();
                }
                self.block.push(indent);
                self.check()?;
                i = indent;
            }
        }
        while i < line.len() {
            let b = line[i];
            if let Some(quote) = self.quote {
                match (quote, b) {
                    (Quote::Double, b'\\') => i += 1,
                    (Quote::Double, b'"') => self.quote = None,
                    (Quote::Single, b'\'') if line.get(i + 1) == Some(&b'\'') => i += 1,
                    (Quote::Single, b'\'') => self.quote = None,
                    _ => {}
                }
                i += 1;
                continue;
            }
            let next_blank = line.get(i + 1).is_none_or(|&c| is_blank(c));
            let after_blank = i == 0 || is_blank(line[i - 1]);
            if b == b'#' && after_blank {
                return Ok(()); // a comment
            }
            if is_blank(b) {
                i += 1;
                continue;
            }
            if self.flow > 0 {
                match b {
                    b'[' | b'{' => {
                        self.flow += 1;
                        self.check()?;
                        node_start = true;
                    }
                    b']' | b'}' => {
                        self.flow -= 1;
                        node_start = false;
                    }
                    b',' => node_start = true,
                    b':' => node_start = true,
                    b'"' if node_start => self.quote = Some(Quote::Double),
                    b'\'' if node_start => self.quote = Some(Quote::Single),
                    b'!' | b'&' if node_start => {
                        // A tag or anchor: the node follows it.
                        while i + 1 < line.len()
                            && !is_blank(line[i + 1])
                            && !b",[]{}".contains(&line[i + 1])
                        {
                            i += 1;
                        }
                    }
                    b'?' if node_start && next_blank => {}
                    _ => node_start = false,
                }
                i += 1;
                continue;
            }
            // Block context.
            match b {
                b'-' | b'?' | b':' if node_start && next_blank => {
                    if b != b':' && i > indent {
                        // `- - item`: a collection nested on its parent's line.
                        self.block.push(i);
                        self.check()?;
                    }
                }
                b'[' | b'{' if node_start => {
                    self.flow = 1;
                    self.check()?;
                }
                b'"' if node_start => self.quote = Some(Quote::Double),
                b'\'' if node_start => self.quote = Some(Quote::Single),
                b'!' | b'&' if node_start => {
                    while i + 1 < line.len() && !is_blank(line[i + 1]) {
                        i += 1;
                    }
                }
                b'|' | b'>' if node_start => {
                    self.block_scalar = Some(indent);
                    return Ok(());
                }
                b':' if next_blank => node_start = true,
                _ => node_start = false,
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str) -> bool {
        check_limits(text).is_ok()
    }

    #[test]
    fn real_shapes_pass() {
        for text in [
            "issuer: https://oidc.example.com\npublish:\n  - type: directory\n    path: /srv/oidc\nrotation:\n  enabled: true\n",
            "kube-apiserver-arg:\n- \"a=[b\"\n- 'c[d'\n- e[f]\nnode-label: [a, \"b]\", {c: d}]\n",
            "script: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nnext: 1\n",
            "a: \"multi [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  line\"\n",
            "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nkey: x # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
        ] {
            assert!(depth_ok(text), "{text}");
            let _: serde_yaml::Value = from_str(text).expect(text);
        }
        assert!(depth_ok("---\na: 1\n...\n---\nb: [1, 2]\n"));
        // Plain scalars may hold brackets; many such lines never add up.
        let many = "arg: value[with\n".repeat(1000);
        assert!(depth_ok(&many));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let flow = "[".repeat(MAX_DEPTH + 1);
        assert_eq!(
            check_limits(&flow),
            Err(LimitError::TooDeep {
                line: 1,
                limit: MAX_DEPTH
            })
        );
        // The document's own node counts as one level.
        let deepest = MAX_DEPTH - 1;
        assert!(depth_ok(&format!(
            "{}{}",
            "[".repeat(deepest),
            "]".repeat(deepest)
        )));
        assert!(!depth_ok(&format!(
            "a: !!seq &x {}",
            "{a: ".repeat(MAX_DEPTH + 1)
        )));
        assert!(!depth_ok(&"- ".repeat(MAX_DEPTH + 1)));
        let mut block = String::new();
        for level in 0..=MAX_DEPTH {
            block.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        assert!(!depth_ok(&block));
        assert!(!depth_ok(&format!("--- {}", "[".repeat(MAX_DEPTH + 1))));
        assert!(!depth_ok(&format!("a:\n  {}", "[\n".repeat(MAX_DEPTH + 1))));
        assert!(!depth_ok(&format!("a: 1\n\t{}", "[".repeat(MAX_DEPTH + 1))));
        assert!(!depth_ok(&format!("a: \t{}", "[".repeat(MAX_DEPTH + 1))));
    }

    #[test]
    fn size_and_bom() {
        let big = "#".repeat(MAX_BYTES + 1);
        assert!(matches!(
            from_str::<serde_yaml::Value>(&big),
            Err(Error::Limit(LimitError::TooLarge { .. }))
        ));
        let value: serde_yaml::Value = from_str("\u{feff}issuer: x\n").expect("bom");
        assert_eq!(value["issuer"], "x");
    }
}
