//! The canonical form of a request path, which rules match against, and
//! the per-rule options (`match.variants`, `case`, `trailing_slash`,
//! `params`, `suffix`) that say which other spellings reach a rule.
//!
//! A legacy backend routes many spellings of one path to the same handler
//! (Tomcat and Spring strip `;jsessionid=...` and merge slashes, Laravel
//! trims a trailing slash and decodes `%2F` before routing, ThinkPHP
//! drops a `.html` suffix and lowercases controller names, old Spring
//! matched `/order.*`). Matching the raw path would let each of those
//! spellings past admission as `passthrough`, so the rule set matches the
//! canonical form computed here:
//!
//! 1. escapes of unreserved characters (RFC 3986 2.3: `A-Z a-z 0-9 - . _
//!    ~`) are decoded, every other escape is kept with upper-case hex,
//!    non-ASCII bytes are escaped (RFC 3987 3.1) and a `%` that starts no
//!    escape becomes `%25`;
//! 2. with `params: ignore`, each segment loses its `;params`;
//! 3. empty segments are dropped (repeated slashes merged) and dot
//!    segments removed (RFC 3986 5.2.4; `..` never climbs above the root);
//!    a trailing slash is kept as written.
//!
//! Escapes of reserved characters (`%2F`, `%3B`, ...) stay encoded: RFC
//! 3986 says decoding them changes what the URI means (`a%2Fb` is one
//! segment, `a/b` two), so no canonical form may decode them. A backend
//! that decodes them anyway is covered by [`lenient`]: a path that reaches
//! a rule only when read that way is refused by the rule set, never passed
//! through.
//!
//! Letter case, a trailing slash and a `.json`-like suffix are compared by
//! the template (`rules::template`) per the rule's [`Spelling`].
//!
//! Hand-written rather than taken from a URI crate: the steps above must
//! follow the matching semantics exactly (`;params` before dot segments,
//! as Tomcat reads `/..;/`), and no crate normalizes by segment that way.
//! [`lenient`] uses `percent-encoding` for its plain decoding.

use std::borrow::Cow;

/// What a rule does with a request that reaches it only through another
/// spelling of its path (`match.variants`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variants {
    /// Admit it and forward the rule's own spelling (`forward`).
    Forward,
    /// Refuse it as `invalid` (`refuse`).
    Refuse,
}

/// Whether one kind of spelling difference leads to the same handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    /// The backend routes both spellings to the same handler (`ignore`).
    Ignore,
    /// The backend treats them as different paths (`strict`).
    Strict,
}

impl Fold {
    /// The config word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Fold::Ignore => "ignore",
            Fold::Strict => "strict",
        }
    }

    /// Index for per-mode caches.
    pub(crate) fn index(self) -> usize {
        match self {
            Fold::Ignore => 0,
            Fold::Strict => 1,
        }
    }
}

impl Variants {
    /// The config word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Variants::Forward => "forward",
            Variants::Refuse => "refuse",
        }
    }
}

/// How a rule treats other spellings of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spelling {
    /// A request that reaches the rule through another spelling.
    pub variants: Variants,
    /// `/API/Order` is `/api/order` (ASCII letters).
    pub case: Fold,
    /// `/api/order/` is `/api/order`.
    pub trailing_slash: Fold,
    /// `/api/order;jsessionid=1` is `/api/order` (on every segment).
    pub params: Fold,
    /// `/api/order.json` is `/api/order` (a literal last segment only).
    pub suffix: Fold,
}

impl Spelling {
    /// The defaults, in one place: assume the backend routes every such
    /// spelling to the rule's handler (the secure reading), and forward
    /// the rule's own spelling.
    pub const DEFAULT: Spelling = Spelling {
        variants: Variants::Forward,
        case: Fold::Ignore,
        trailing_slash: Fold::Ignore,
        params: Fold::Ignore,
        suffix: Fold::Ignore,
    };
}

impl Default for Spelling {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A path in canonical form: starts with `/`, ASCII only, no empty, `.`
/// or `..` segment, and ends with `/` (when not the root) only when the
/// request's path had a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalPath<'a>(Cow<'a, str>);

impl NormalPath<'_> {
    /// The canonical path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its segments; none for the root.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        let body = self.0.get(1..).unwrap_or_default();
        let body = body.strip_suffix('/').unwrap_or(body);
        // Only the root yields an empty piece: the others were dropped.
        body.split('/').filter(|s| !s.is_empty())
    }

    /// Whether it ends with a slash after a segment.
    pub fn trailing_slash(&self) -> bool {
        self.0.len() > 1 && self.0.ends_with('/')
    }
}

impl std::fmt::Display for NormalPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The canonical form of `path` (no query); `params` says whether
/// `;params` are dropped from each segment.
pub fn normalize(path: &str, params: Fold) -> NormalPath<'_> {
    if already_canonical(path) {
        // Most requests: nothing to rewrite, so nothing to allocate.
        return NormalPath(Cow::Borrowed(path));
    }
    NormalPath(Cow::Owned(rewrite(path, params)))
}

/// Whether `path` is its own canonical form under either `params` mode:
/// ASCII without `%` or `;`, and no empty (but a last), `.` or `..`
/// segment. `rewrite` leaves such a path as it is (a test checks).
fn already_canonical(path: &str) -> bool {
    let Some(body) = path.strip_prefix('/') else {
        return false;
    };
    // One pass over the bytes (every rule-matched request comes here): a
    // segment ends at each `/` and at the end; only the last may be empty.
    let bytes = body.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !b.is_ascii() || b == b'%' || b == b';' {
            return false;
        }
        if b == b'/' {
            if matches!(&bytes[start..i], b"" | b"." | b"..") {
                return false;
            }
            start = i + 1;
        }
    }
    !matches!(&bytes[start..], b"." | b"..")
}

/// The canonical form, built segment by segment.
fn rewrite(path: &str, params: Fold) -> String {
    let text = percent_normalize(path);
    let body = text.strip_prefix('/').unwrap_or(&text);
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for raw in body.split('/') {
        let seg = match (params, raw.find(';')) {
            (Fold::Ignore, Some(at)) => &raw[..at],
            _ => raw,
        };
        // RFC 3986 5.2.4: a path ending in a dot segment ends in a slash.
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(text.len() + 1);
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// Step 1 of the canonical form: unreserved escapes decoded, the others
/// in upper-case hex, non-ASCII bytes escaped, a stray `%` as `%25`. The
/// result is ASCII.
pub fn percent_normalize(path: &str) -> Cow<'_, str> {
    if path.bytes().all(|b| b != b'%' && b.is_ascii()) {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                let v = hi * 16 + lo;
                if is_unreserved(v) {
                    out.push(char::from(v));
                } else {
                    push_escape(&mut out, v);
                }
                i += 3;
            } else {
                out.push_str("%25");
                i += 1;
            }
        } else if b.is_ascii() {
            out.push(char::from(b));
            i += 1;
        } else {
            push_escape(&mut out, b);
            i += 1;
        }
    }
    Cow::Owned(out)
}

/// Whether `path` is already its own canonical form under `params:
/// strict` (every escape upper-case and of a reserved byte, ASCII only, no
/// `;`, `\\`, empty or dot segment), checked without allocating: the read
/// cache matches only such paths, so a pass-through request pays one scan.
pub fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let upper_hex = |j: usize| {
                    bytes
                        .get(j)
                        .is_some_and(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                };
                if !(upper_hex(i + 1) && upper_hex(i + 2)) {
                    return false;
                }
                let hi = bytes.get(i + 1).copied().and_then(hex_value).unwrap_or(0);
                let lo = bytes.get(i + 2).copied().and_then(hex_value).unwrap_or(0);
                if is_unreserved(hi * 16 + lo) {
                    return false;
                }
                i += 3;
                continue;
            }
            b';' | b'\\' | b'?' | b'#' => return false,
            b'/' => {
                // The segment after this slash: empty (`//`) or a dot segment.
                let rest = &bytes[i + 1..];
                let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
                let seg = &rest[..seg_end];
                let last = seg_end == rest.len();
                if matches!(seg, b"." | b"..") || (seg.is_empty() && !last) {
                    return false;
                }
            }
            b if !b.is_ascii() || b.is_ascii_control() => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

/// How `path` reads to the most lenient backend, before its canonical
/// form is taken: every escape decoded (again, for double encodings, up
/// to three times), a decoded NUL ending the path (C string handling),
/// `\` as `/`, each segment trimmed of the characters Java's
/// `String.trim` drops (space and controls: Spring before 4.3 trims path
/// tokens, so `/order%20` is `/order` there), and, for a rule with
/// `case: ignore`, a non-ASCII letter whose case mapping is one ASCII
/// letter replaced by it (Java's `equalsIgnoreCase` takes the Kelvin sign
/// for `k`). `None` when nothing would be read differently.
pub fn lenient(path: &str, case: Fold) -> Option<String> {
    let suspect = |b: u8| b == b'%' || b == b'\\' || !b.is_ascii() || b <= b' ';
    if !path.bytes().any(suspect) {
        return None;
    }
    let mut text = path.to_string();
    // Three rounds cover a double and a triple encoding; a backend that
    // decodes more often than that is not a router seen in practice.
    for _ in 0..3 {
        if !text.contains('%') {
            break;
        }
        let decoded = percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == text {
            break;
        }
        text = decoded;
    }
    if let Some(nul) = text.find('\0') {
        text.truncate(nul);
    }
    let mut read = String::with_capacity(text.len());
    for c in text.chars() {
        read.push(match c {
            '\\' => '/',
            c if !c.is_ascii() && case == Fold::Ignore => ascii_fold(c).unwrap_or(c),
            c => c,
        });
    }
    let segments: Vec<String> = read.split('/').map(trimmed_segment).collect();
    Some(segments.join("/"))
}

/// A segment as Java's `String.trim` leaves it, before its `;params` too:
/// Spring drops those before it trims (`order%20;jsessionid=1` is `order`).
fn trimmed_segment(segment: &str) -> String {
    let blank = |c: char| c <= ' ';
    let segment = segment.trim_matches(blank);
    match segment.split_once(';') {
        Some((name, params)) => format!("{};{params}", name.trim_matches(blank)),
        None => segment.to_string(),
    }
}

/// The one ASCII letter a non-ASCII character maps to by case, if any.
fn ascii_fold(c: char) -> Option<char> {
    fn one(mut it: impl Iterator<Item = char>) -> Option<char> {
        let first = it.next()?;
        (it.next().is_none() && first.is_ascii_alphabetic()).then_some(first)
    }
    one(c.to_lowercase()).or_else(|| one(c.to_uppercase()))
}

/// RFC 3986 2.3 `unreserved`.
pub fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xF)]));
}

#[cfg(test)]
mod tests;
