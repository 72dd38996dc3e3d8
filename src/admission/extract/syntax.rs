//! The bits of HTTP syntax extraction needs: cookies (RFC 6265), query
//! parameters and percent-decoding (RFC 3986), visible-ASCII header
//! values. Hand-written because each is a few lines over borrowed bytes
//! and must never allocate on the common path nor panic on request data.

use std::borrow::Cow;

use http::HeaderMap;

/// Whether a header byte is visible ASCII (no spaces, no controls).
pub(super) fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// The value of the first cookie named exactly `name` in any `Cookie` header.
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            if trim_ows(k) != name.as_bytes() {
                return None;
            }
            let v = trim_ows(v);
            // RFC 6265 allows a value in double quotes; the quotes are not part of it.
            Some(
                v.strip_prefix(b"\"")
                    .and_then(|inner| inner.strip_suffix(b"\""))
                    .unwrap_or(v),
            )
        })
}

/// `s` without leading and trailing spaces and tabs.
fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t');
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(a), Some(b)) => &s[a..=b],
        _ => &[],
    }
}

/// The raw value of the first `name` parameter of a query string.
pub(super) fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let matches = k == name || percent_decode(k, true).is_some_and(|k| k == name);
        matches.then_some(v)
    })
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); `None`
/// for a bad escape or a result that is not UTF-8.
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
    let needs_work = s.contains('%') || (plus_is_space && s.contains('+'));
    if !needs_work {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push((hi << 4) | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
