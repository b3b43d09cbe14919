//! A PEM decoder with the exact semantics of Go's `encoding/pem.Decode`.
//!
//! kube-apiserver reads key files with Go's decoder, so what counts as a block (and what is
//! silently skipped) must match it byte for byte, not some stricter or looser RFC 7468 reader:
//!
//! * a block starts at `-----BEGIN ` at the very start of the data or after a `\n`;
//! * the type line must end in `-----` (trailing spaces, tabs and a `\r` are trimmed);
//! * `Key: value` header lines may follow;
//! * the block ends at `\n-----END <same type>-----` followed only by spaces/tabs/`\r`;
//! * the body is standard, padded base64 in which spaces, tabs, `\r` and `\n` are ignored and
//!   non-zero trailing bits are tolerated;
//! * any malformed candidate is skipped and the search goes on after its BEGIN line; text
//!   between blocks is ignored.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// One decoded PEM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The label between `BEGIN ` and `-----`, as raw bytes (Go compares bytes).
    pub label: Vec<u8>,
    /// `Key: value` headers in file order (Go keeps a map; order only matters for display).
    pub headers: Vec<(String, String)>,
    /// The decoded DER bytes.
    pub der: Vec<u8>,
}

impl Block {
    /// The label for messages (lossy UTF-8).
    pub fn label_str(&self) -> String {
        String::from_utf8_lossy(&self.label).into_owned()
    }
}

const PEM_START: &[u8] = b"\n-----BEGIN ";
const PEM_END: &[u8] = b"\n-----END ";
const PEM_END_OF_LINE: &[u8] = b"-----";

/// Go's base64.StdEncoding: padding required, trailing bits not checked.
const GO_STD_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Splits off one line: returns the line without its `\n` (and a `\r` before it), with trailing
/// spaces and tabs trimmed, and the rest after the `\n`.
fn get_line(data: &[u8]) -> (&[u8], &[u8]) {
    let (mut line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    if let Some(stripped) = line.strip_suffix(b"\r") {
        line = stripped;
    }
    while let Some((&last, head)) = line.split_last() {
        if last == b' ' || last == b'\t' {
            line = head;
        } else {
            break;
        }
    }
    (line, rest)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim_space(s: &[u8]) -> &[u8] {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let start = s.iter().position(|b| !is_space(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

fn decode_body(body: &[u8]) -> Option<Vec<u8>> {
    let cleaned: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .collect();
    GO_STD_BASE64.decode(cleaned).ok()
}

/// Decodes the next PEM block. Returns `None` when no further block can be found.
pub fn decode(data: &[u8]) -> Option<(Block, &[u8])> {
    let mut rest = data;
    loop {
        if rest.starts_with(&PEM_START[1..]) {
            rest = &rest[PEM_START.len() - 1..];
        } else if let Some(i) = find(rest, PEM_START) {
            rest = &rest[i + PEM_START.len()..];
        } else {
            return None;
        }

        let (type_line, after_type) = get_line(rest);
        rest = after_type;
        let Some(label) = type_line.strip_suffix(PEM_END_OF_LINE) else {
            continue;
        };

        let mut headers = Vec::new();
        loop {
            if rest.is_empty() {
                // Go returns "no block" here rather than searching on.
                return None;
            }
            let (line, next) = get_line(rest);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                break;
            };
            let key = String::from_utf8_lossy(trim_space(&line[..colon])).into_owned();
            let val = String::from_utf8_lossy(trim_space(&line[colon + 1..])).into_owned();
            headers.push((key, val));
            rest = next;
        }

        let (end_index, end_trailer_index) =
            if headers.is_empty() && rest.starts_with(&PEM_END[1..]) {
                (0usize, PEM_END.len() - 1)
            } else {
                match find(rest, PEM_END) {
                    Some(i) => (i, i + PEM_END.len()),
                    None => continue,
                }
            };

        let end_trailer = &rest[end_trailer_index..];
        let end_trailer_len = label.len() + PEM_END_OF_LINE.len();
        if end_trailer.len() < end_trailer_len {
            continue;
        }
        let (end_trailer, rest_of_end_line) = end_trailer.split_at(end_trailer_len);
        if !end_trailer.starts_with(label) || !end_trailer.ends_with(PEM_END_OF_LINE) {
            continue;
        }
        if !get_line(rest_of_end_line).0.is_empty() {
            continue;
        }

        let Some(der) = decode_body(&rest[..end_index]) else {
            continue;
        };

        let (_, after) = get_line(&rest[end_index + PEM_END.len() - 1..]);
        return Some((
            Block {
                label: label.to_vec(),
                headers,
                der,
            },
            after,
        ));
    }
}

/// Every block in `data`, in order, as Go's `for { block, rest = pem.Decode(rest) }` loop sees them.
pub fn blocks(data: &[u8]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((block, next)) = decode(rest) {
        out.push(block);
        rest = next;
    }
    out
}

/// Encodes one block the way Go's `pem.EncodeToMemory` does (64-column lines, `\n` endings).
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(data: &[u8]) -> Vec<String> {
        blocks(data).iter().map(Block::label_str).collect()
    }

    #[test]
    fn roundtrip_and_text_between_blocks() {
        let a = encode("PUBLIC KEY", b"hello");
        let b = encode("EC PARAMETERS", &[6, 1, 2]);
        let data = format!("# comment\n{a}garbage line\n\n{b}trailing");
        let got = blocks(data.as_bytes());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].der, b"hello");
        assert_eq!(got[1].label_str(), "EC PARAMETERS");
        assert_eq!(got[1].der, vec![6, 1, 2]);
    }

    #[test]
    fn crlf_and_trailing_spaces() {
        let data = "-----BEGIN X-----  \r\naGVs\r\nbG8=\r\n-----END X-----\t\r\n";
        let got = blocks(data.as_bytes());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].der, b"hello");
    }

    #[test]
    fn begin_must_start_a_line() {
        let data = "x-----BEGIN X-----\naGVsbG8=\n-----END X-----\n";
        assert!(blocks(data.as_bytes()).is_empty());
    }

    #[test]
    fn mismatched_end_label_is_skipped() {
        let data = "-----BEGIN X-----\naGVsbG8=\n-----END Y-----\n";
        assert!(blocks(data.as_bytes()).is_empty());
    }

    #[test]
    fn bad_base64_is_skipped_and_search_continues() {
        let good = encode("B", b"ok");
        let data = format!("-----BEGIN A-----\n!!!!\n-----END A-----\n{good}");
        assert_eq!(labels(data.as_bytes()), vec!["B"]);
    }

    #[test]
    fn padding_required_trailing_bits_tolerated() {
        // "aGVsbG8" lacks its '=': Go refuses it.
        let unpadded = "-----BEGIN X-----\naGVsbG8\n-----END X-----\n";
        assert!(blocks(unpadded.as_bytes()).is_empty());
        // "aGVsbG9=" has non-zero trailing bits: Go accepts it.
        let sloppy = "-----BEGIN X-----\naGVsbG9=\n-----END X-----\n";
        assert_eq!(blocks(sloppy.as_bytes())[0].der, b"hello");
    }

    #[test]
    fn headers_and_empty_body() {
        let data = "-----BEGIN X-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES\n\naGk=\n-----END X-----\n-----BEGIN E-----\n-----END E-----\n";
        let got = blocks(data.as_bytes());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].headers.len(), 2);
        assert_eq!(got[0].der, b"hi");
        assert!(got[1].der.is_empty());
    }

    #[test]
    fn junk_after_end_line_rejects_block() {
        let data = "-----BEGIN X-----\naGk=\n-----END X----- junk\n";
        assert!(blocks(data.as_bytes()).is_empty());
    }

    #[test]
    fn begin_at_eof_stops() {
        assert!(blocks(b"-----BEGIN X-----\n").is_empty());
        assert!(blocks(b"-----BEGIN X-----").is_empty());
    }
}
