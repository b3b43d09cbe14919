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

/// What one [`decode`] call has learnt about the input, so that no byte is scanned again for
/// every candidate BEGIN line. Go's loop searches for the END line, checks the END line's tail
/// and decodes the body afresh for each candidate; a file of many BEGIN lines and one END line
/// (or none) made that quadratic (270 KB took 5 s, 1 MB over a minute). The answers are the
/// same as Go's, only remembered (see the reference implementation in the tests).
struct Scan<'a> {
    data: &'a [u8],
    /// The first `\n-----END ` at or after `from` (absolute offsets), once looked for.
    next_end: Option<(usize, Option<usize>)>,
    /// Whether the END line's tail at an offset is blank, per offset already checked.
    blank_tail: Vec<(usize, bool)>,
}

impl<'a> Scan<'a> {
    /// The first `\n-----END ` starting at or after absolute offset `from`.
    fn end_from(&mut self, from: usize) -> Option<usize> {
        if let Some((searched_from, found)) = self.next_end {
            // The last answer holds for any later start up to the occurrence it found.
            let still_valid = match found {
                Some(at) => searched_from <= from && from <= at,
                None => searched_from <= from,
            };
            if still_valid {
                return found;
            }
        }
        let found = find(&self.data[from..], PEM_END).map(|i| from + i);
        self.next_end = Some((from, found));
        found
    }

    /// Whether the rest of the END line starting at absolute offset `at` is empty once
    /// [`get_line`] has trimmed it: only spaces and tabs, then an optional `\r`, then `\n` or
    /// the end of the data. Stops at the first byte that decides it.
    fn end_tail_blank(&mut self, at: usize) -> bool {
        if let Some(&(_, blank)) = self.blank_tail.iter().find(|(pos, _)| *pos == at) {
            return blank;
        }
        let tail = &self.data[at..];
        let mut blank = true;
        for (i, &b) in tail.iter().enumerate() {
            match b {
                b' ' | b'\t' => {}
                b'\n' => break,
                b'\r' => {
                    blank = matches!(tail.get(i + 1), None | Some(b'\n'));
                    break;
                }
                _ => {
                    blank = false;
                    break;
                }
            }
        }
        // Few distinct offsets occur (one per END line and label length); keep the list short.
        if self.blank_tail.len() >= 16 {
            self.blank_tail.remove(0);
        }
        self.blank_tail.push((at, blank));
        blank
    }
}

/// Whether `body` can only fail base64 decoding: it holds a byte that is neither base64 nor
/// ignored white space. Stops at the first such byte, so a body running over later BEGIN lines
/// costs only up to the next one (their dashes are not base64).
fn has_foreign_byte(body: &[u8]) -> bool {
    body.iter().any(|&b| {
        !(b.is_ascii_alphanumeric()
            || matches!(b, b'+' | b'/' | b'=' | b' ' | b'\t' | b'\r' | b'\n'))
    })
}

/// Decodes the next PEM block. Returns `None` when no further block can be found.
///
/// Time is linear in the length of `data` whatever it holds (see [`Scan`]).
pub fn decode(data: &[u8]) -> Option<(Block, &[u8])> {
    let mut scan = Scan {
        data,
        next_end: None,
        blank_tail: Vec::new(),
    };
    // Absolute offset of `rest` in `data`.
    let offset = |rest: &[u8]| data.len() - rest.len();
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
                let from = offset(rest);
                match scan.end_from(from) {
                    Some(at) => (at - from, at - from + PEM_END.len()),
                    // No END line anywhere after this candidate: none for any later one
                    // either (Go would go on trying each, finding nothing).
                    None => return None,
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
        if !scan.end_tail_blank(offset(rest_of_end_line)) {
            continue;
        }

        let body = &rest[..end_index];
        if has_foreign_byte(body) {
            continue;
        }
        let Some(der) = decode_body(body) else {
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

    /// Go's `pem.Decode` as written (before Go 1.25.2 changed it to fix the same quadratic
    /// time): the byte-for-byte reference the linear [`decode`] must agree with.
    fn decode_reference(data: &[u8]) -> Option<(Block, &[u8])> {
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

    fn blocks_reference(data: &[u8]) -> Vec<Block> {
        let mut out = Vec::new();
        let mut rest = data;
        while let Some((block, next)) = decode_reference(rest) {
            out.push(block);
            rest = next;
        }
        out
    }

    /// Pieces PEM files are made of, and the ways they go wrong, glued at random.
    const PIECES: &[&str] = &[
        "-----BEGIN X-----\n",
        "-----BEGIN Y-----\n",
        "-----BEGIN X-----",
        "-----BEGIN X----- \r\n",
        "-----BEGIN X",
        "-----END X-----\n",
        "-----END Y-----\n",
        "-----END X-----",
        "-----END X----- \t\r\n",
        "-----END X-----junk\n",
        "-----END X-----\r \n",
        "-----END X------\n",
        "-----END ",
        "-----BEGIN X------\n",
        "-----END X-------\n",
        "Proc-Type: 4,ENCRYPTED\n",
        "K: v\n",
        "aGk=\n",
        "aGVsbG8=\n",
        "aGVsbG8\n",
        "!!\n",
        "\n",
        "\r\n",
        " ",
        "x",
        "-----",
        "=",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4000))]

        /// The linear decoder finds exactly the blocks (and rests) Go's loop finds.
        #[test]
        fn same_blocks_as_gos_loop(picks in proptest::collection::vec(0..PIECES.len(), 0..40)) {
            let data: String = picks.iter().map(|&i| PIECES[i]).collect();
            proptest::prop_assert_eq!(blocks(data.as_bytes()), blocks_reference(data.as_bytes()));
            let ours = decode(data.as_bytes()).map(|(b, rest)| (b, rest.len()));
            let go = decode_reference(data.as_bytes()).map(|(b, rest)| (b, rest.len()));
            proptest::prop_assert_eq!(ours, go);
        }
    }

    /// Inputs that took Go's loop (and this decoder before) time quadratic in their size: each
    /// must finish well under a second at 1 MiB. A guard thread fails the test instead of
    /// letting it hang.
    #[test]
    fn hostile_inputs_take_linear_time() {
        let mib = 1 << 20;
        let repeat = |unit: &str, tail: &str| {
            let mut s = unit.repeat(mib / unit.len());
            s.push_str(tail);
            s.into_bytes()
        };
        let key = encode("X", b"hello");
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("BEGIN lines, no END", repeat("-----BEGIN X-----\n", ""), 0),
            (
                "BEGIN lines, one END at the end",
                repeat("-----BEGIN X-----\n", "aGk=\n-----END X-----\n"),
                1,
            ),
            (
                "BEGIN lines, a mismatched END",
                repeat("-----BEGIN X-----\n", "-----END Y-----\n"),
                0,
            ),
            (
                "BEGIN lines, END with a long junk tail",
                repeat(
                    "-----BEGIN X-----\n",
                    &format!("-----END X-----{}x", " ".repeat(mib / 2)),
                ),
                0,
            ),
            (
                "headers, no END",
                repeat("-----BEGIN X-----\nK: v\n", ""),
                0,
            ),
            ("valid blocks", repeat(&key, ""), mib / key.len()),
            ("one long line", vec![b'-'; mib], 0),
        ];
        for (what, data, want) in cases {
            let (tx, rx) = std::sync::mpsc::channel();
            let started = std::time::Instant::now();
            std::thread::spawn(move || {
                let _ = tx.send(blocks(&data).len());
            });
            match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(got) => assert_eq!(got, want, "{what}"),
                Err(_) => panic!("{what}: still decoding after 10 s"),
            }
            let took = started.elapsed();
            assert!(
                took < std::time::Duration::from_secs(1),
                "{what}: took {took:?}"
            );
        }
    }

    #[test]
    fn begin_at_eof_stops() {
        assert!(blocks(b"-----BEGIN X-----\n").is_empty());
        assert!(blocks(b"-----BEGIN X-----").is_empty());
    }
}
