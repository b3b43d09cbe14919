//! Saying exactly how two strings differ, the way a person debugging an issuer or audience
//! mismatch needs it: "a trailing '/'", "differs in case at byte 9", "looks like a typo of
//! sts.amazonaws.com: lacks "aws"". Pure functions, shared by doctor and verify-token.

use std::time::Duration;

use crate::config::format_duration;

/// A character shown unambiguously in a message (`'/'`, `' '`, `'\n'`).
fn show_char(c: char) -> String {
    match c {
        ' ' => "' ' (a space)".to_string(),
        '\t' => "'\\t' (a tab)".to_string(),
        '\n' => "'\\n' (a newline)".to_string(),
        '\r' => "'\\r' (a carriage return)".to_string(),
        c if c.is_control() || c.is_whitespace() => format!("U+{:04X}", c as u32),
        c => format!("'{c}'"),
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

fn common_suffix(a: &str, b: &str, max: usize) -> usize {
    let n = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum::<usize>();
    n.min(max)
}

/// How `got` differs from `want`, as a phrase to put after "it ..." (`None` when equal).
///
/// Byte positions count from 1, as an editor's column does for ASCII.
pub fn difference(got: &str, want: &str) -> Option<String> {
    if got == want {
        return None;
    }
    if got.trim() == want {
        let lead = &got[..got.len() - got.trim_start().len()];
        let trail = &got[got.trim_end().len()..];
        let mut parts = Vec::new();
        if !lead.is_empty() {
            parts.push(format!(
                "leading {}",
                lead.chars().map(show_char).collect::<Vec<_>>().join(", ")
            ));
        }
        if !trail.is_empty() {
            parts.push(format!(
                "trailing {}",
                trail.chars().map(show_char).collect::<Vec<_>>().join(", ")
            ));
        }
        return Some(format!("has {} around the value", parts.join(" and ")));
    }
    if want.trim() == got {
        return Some("lacks the whitespace the expected value has around it".to_string());
    }
    if let Some(extra) = got.strip_prefix(want)
        && !extra.is_empty()
        && extra.chars().all(|c| c == '/')
    {
        return Some(format!(
            "has a trailing '/' (byte {}) that the expected value does not have",
            want.len() + 1
        ));
    }
    if let Some(extra) = want.strip_prefix(got)
        && !extra.is_empty()
        && extra.chars().all(|c| c == '/')
    {
        return Some(format!(
            "lacks the trailing '/' the expected value has (byte {})",
            got.len() + 1
        ));
    }
    let at = common_prefix(got, want);
    let g = got[at..].chars().next();
    let w = want[at..].chars().next();
    if got.eq_ignore_ascii_case(want) {
        let (g, w) = (g.unwrap_or(' '), w.unwrap_or(' '));
        return Some(format!(
            "differs only in upper/lower case, first at byte {}: {} where the expected value has {} (relying parties compare byte for byte)",
            at + 1,
            show_char(g),
            show_char(w)
        ));
    }
    if let (Some(rest_g), Some(rest_w)) =
        (got.strip_prefix("http://"), want.strip_prefix("https://"))
        && rest_g == rest_w
    {
        return Some("uses http:// where the expected value uses https://".to_string());
    }
    Some(match (g, w) {
        (Some(g), Some(w)) => format!(
            "differs from byte {} on: {} where the expected value has {}",
            at + 1,
            show_char(g),
            show_char(w)
        ),
        (Some(_), None) => format!(
            "is longer: it goes on with {:?} after the expected value ends (byte {})",
            &got[at..],
            at + 1
        ),
        (None, _) => format!(
            "is shorter: it ends where the expected value goes on with {:?} (byte {})",
            &want[at..],
            at + 1
        ),
    })
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// When `got` looks like a mistyped `want` (a few characters off, case, a slash, spaces),
/// what exactly is off; `None` when they are equal or unrelated.
pub fn near_miss(got: &str, want: &str) -> Option<String> {
    if got == want {
        return None;
    }
    let norm = |s: &str| s.trim().trim_end_matches('/').to_ascii_lowercase();
    if norm(got) == norm(want) {
        return difference(got, want);
    }
    let distance = levenshtein(got, want);
    if distance > 3.max(want.chars().count() / 5) {
        return None;
    }
    let prefix = common_prefix(got, want);
    let suffix = common_suffix(&got[prefix..], &want[prefix..], usize::MAX);
    let g_mid = &got[prefix..got.len() - suffix];
    let w_mid = &want[prefix..want.len() - suffix];
    let place = if prefix > 0 {
        format!(" after {:?}", &want[..prefix])
    } else if suffix > 0 {
        format!(" before {:?}", &want[want.len() - suffix..])
    } else {
        String::new()
    };
    Some(match (g_mid.is_empty(), w_mid.is_empty()) {
        (true, false) => format!("lacks {w_mid:?}{place}"),
        (false, true) => format!("has an extra {g_mid:?}{place}"),
        _ => format!("has {g_mid:?} where {want:?} has {w_mid:?}{place}"),
    })
}

/// "3h20m", "45s", "0s".
pub fn duration(d: Duration) -> String {
    format_duration(d)
}

/// A signed time difference in words: "in 5m", "2h ago".
pub fn relative(seconds: i64) -> String {
    if seconds >= 0 {
        format!(
            "in {}",
            duration(Duration::from_secs(seconds.unsigned_abs()))
        )
    } else {
        format!(
            "{} ago",
            duration(Duration::from_secs(seconds.unsigned_abs()))
        )
    }
}

/// A list for messages: `a, b, c` or `(none)`.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

/// `1 key`, `2 keys`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 IMF-fixdate, and the
/// obsolete RFC 850 form) into Unix seconds.
pub fn parse_http_date(value: &str) -> Option<i64> {
    let value = value.trim();
    let (_, rest) = value.split_once(", ")?;
    let parts: Vec<&str> = rest.split([' ', '-']).filter(|p| !p.is_empty()).collect();
    let [day, month, year, time, zone] = parts.as_slice() else {
        return None;
    };
    if *zone != "GMT" && *zone != "UTC" {
        return None;
    }
    let day: i64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let mut year: i64 = year.parse().ok()?;
    if year < 100 {
        year += if year < 70 { 2000 } else { 1900 };
    }
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Howard Hinnant's days_from_civil.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 UTC for a Unix time (negative times, which no token has, show as the epoch).
pub fn time(secs: i64) -> String {
    crate::state::rfc3339(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_named() {
        assert_eq!(difference("a", "a"), None);
        assert_eq!(
            difference("https://x.example/a/", "https://x.example/a").as_deref(),
            Some("has a trailing '/' (byte 20) that the expected value does not have")
        );
        assert_eq!(
            difference("https://x.example/a", "https://x.example/a/").as_deref(),
            Some("lacks the trailing '/' the expected value has (byte 20)")
        );
        assert_eq!(
            difference("https://X.example/a", "https://x.example/a").as_deref(),
            Some(
                "differs only in upper/lower case, first at byte 9: 'X' where the expected value has 'x' (relying parties compare byte for byte)"
            )
        );
        assert_eq!(
            difference("https://x.example/a\n", "https://x.example/a").as_deref(),
            Some("has trailing '\\n' (a newline) around the value")
        );
        assert_eq!(
            difference("https://y.example/a", "https://x.example/a").as_deref(),
            Some("differs from byte 9 on: 'y' where the expected value has 'x'")
        );
    }

    #[test]
    fn near_misses_are_typos_not_other_values() {
        assert_eq!(
            near_miss("sts.amazon.com", "sts.amazonaws.com").as_deref(),
            Some("lacks \"aws\" after \"sts.amazon\"")
        );
        assert_eq!(
            near_miss("sts.amazonaws.com/", "sts.amazonaws.com").as_deref(),
            Some("has a trailing '/' (byte 18) that the expected value does not have")
        );
        assert!(near_miss("sts.amazonws.com", "sts.amazonaws.com").is_some());
        assert_eq!(
            near_miss("api://AzureADTokenExchange", "sts.amazonaws.com"),
            None
        );
        assert_eq!(near_miss("k3s", "sts.amazonaws.com"), None);
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(time(784_111_777), "1994-11-06T08:49:37Z");
    }
}
