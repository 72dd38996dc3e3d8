//! The bits of HTTP syntax extraction needs: cookies (RFC 6265), query
//! parameters and percent-decoding (RFC 3986), visible-ASCII header
//! values, tokens. Hand-written because each is a few lines over borrowed
//! bytes and must never allocate on the common path nor panic on request
//! data. A field the gateway decides on must appear once: lookups say
//! [`Single::Repeated`] rather than pick one, and they match names the
//! way common backends read them, so a second spelling counts too.

use std::borrow::Cow;

use http::HeaderMap;

/// Whether a header byte is visible ASCII (no spaces, no controls).
pub(super) fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// What a lookup of a field that must appear once found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Single<T> {
    /// Not there.
    Absent,
    /// Exactly once, with this value.
    One(T),
    /// More than once: the gateway and the backend could read different
    /// ones (one keeps the first, another the last).
    Repeated,
}

impl<T> Single<T> {
    /// Adds one more occurrence.
    fn push(self, value: T) -> Self {
        match self {
            Single::Absent => Single::One(value),
            _ => Single::Repeated,
        }
    }
}

/// Whether a backend reads a parameter or cookie named `key` as `name`:
/// exactly, or the way PHP does (`name[]` and `name[k]` are the array
/// `name`; `.`, space and `[` in a name become `_`). Java servlets match
/// names exactly, so for them this only errs on the strict side.
pub(super) fn reads_as(key: &[u8], name: &str) -> bool {
    let name = name.as_bytes();
    if key == name {
        return true;
    }
    // PHP: `name[...]` is an array named `name`.
    let base = match key.iter().position(|&b| b == b'[') {
        Some(i) if key[i..].contains(&b']') => &key[..i],
        _ => key,
    };
    base.len() == name.len()
        && base
            .iter()
            .zip(name)
            .all(|(&k, &n)| k == n || (n == b'_' && matches!(k, b'.' | b' ' | b'[')))
}

/// The cookie named `name` (as [`reads_as`] matches names) across every
/// `Cookie` header.
pub(super) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Single<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            if !reads_as(trim_ows(k), name) {
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
        .fold(Single::Absent, Single::push)
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

/// The raw value of the `name` parameter of a query string (keys are
/// compared percent-decoded, as [`reads_as`] matches names).
pub(super) fn query_param<'q>(query: &'q str, name: &str) -> Single<&'q str> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let matches = reads_as(k.as_bytes(), name)
                || percent_decode(k, true).is_some_and(|k| reads_as(k.as_bytes(), name));
            matches.then_some(v)
        })
        .fold(Single::Absent, Single::push)
}

/// Whether a header name is `name` to a CGI backend, which reads `-` and
/// `_` alike (PHP-FPM sees both `X-User-Id` and `X_User_Id` as
/// `HTTP_X_USER_ID`); header names are already lower case.
pub(super) fn same_to_cgi(header: &str, name: &str) -> bool {
    header.len() == name.len()
        && header
            .bytes()
            .zip(name.bytes())
            .all(|(h, n)| h == n || (matches!(h, b'-' | b'_') && matches!(n, b'-' | b'_')))
}

/// Whether a byte may appear in an HTTP token (RFC 9110 section 5.6.2).
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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
