//! What may be cached, decided from headers alone (pure functions, one
//! table test each):
//!
//! - [`bypass`]: a request the cache must not answer (a body, an upgrade,
//!   `Authorization` or a session cookie the key does not name);
//! - [`key`]: the entry a request reads: path, then the rule's key parts,
//!   and always the host, so a forged `Host` fills only its own entry;
//! - [`fetch_request`]: the request sent to the backend on a miss: only
//!   what the key names can shape the answer (cookies not keyed, a client's
//!   `Accept-Encoding`, validators and ranges are left out), so the stored
//!   answer is right for every request with that key;
//! - [`judge`]: whether an answer is stored, shared with the requests
//!   waiting on the same fetch, or kept for the one that fetched it;
//! - [`not_modified`]: whether a conditional request gets 304.

use std::time::Duration;

use http::header::{self, HeaderName};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::rules::{CacheRule, KeyPart};

/// Why a request bypasses the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// It has a body.
    Body,
    /// It asks to switch protocols.
    Upgrade,
    /// It carries `Authorization`, not in the key.
    Authorization,
    /// It carries a session cookie, not in the key.
    Session,
}

/// Whether a request must go to the backend as it is, and why.
pub fn bypass(rule: &CacheRule, req: &RequestHeader, session_cookies: &[String]) -> Option<Bypass> {
    let h = &req.headers;
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Some(Bypass::Body);
    }
    if h.contains_key(header::UPGRADE) {
        return Some(Bypass::Upgrade);
    }
    if h.contains_key(header::AUTHORIZATION) && !rule.keys_header(&header::AUTHORIZATION) {
        return Some(Bypass::Authorization);
    }
    let personal = cookies(req).any(|(name, _)| {
        session_cookies.iter().any(|s| s.eq_ignore_ascii_case(name)) && !rule.keys_cookie(name)
    });
    personal.then_some(Bypass::Session)
}

/// Every `name=value` pair of a request's `Cookie` headers.
fn cookies(req: &RequestHeader) -> impl Iterator<Item = (&str, &str)> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (n, v) = pair.split_once('=')?;
            Some((n.trim(), v.trim()))
        })
}

/// The host a request names (`Host`, or the HTTP/2 authority).
fn host(req: &RequestHeader) -> &str {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// The key of a request under `rule`: `path[?query]`, then one line for
/// the host and one per other key part. The path comes first so a purge
/// can find entries by path prefix (in Redis too); neither a path nor a
/// query holds a newline, and header values cannot.
pub fn key(rule: &CacheRule, req: &RequestHeader) -> String {
    let path = req.uri.path();
    let query = req.uri.query().filter(|_| rule.keys_query());
    let mut key = String::with_capacity(path.len() + 64);
    key.push_str(path);
    if let Some(q) = query {
        key.push('?');
        key.push_str(q);
    }
    key.push('\n');
    // Lowercase, as hosts compare (no allocation of its own).
    key.extend(host(req).chars().map(|c| c.to_ascii_lowercase()));
    for part in &rule.key {
        match part {
            KeyPart::Path | KeyPart::Query => {}
            KeyPart::Header(name) => {
                key.push('\n');
                key.push_str(name.as_str());
                // Absent and empty differ: `!` marks absent.
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    key.push('!');
                }
                for (i, v) in values.enumerate() {
                    key.push(if i == 0 { ':' } else { ',' });
                    key.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
            }
            KeyPart::Cookie(name) => {
                key.push_str("\ncookie ");
                key.push_str(name);
                let mut found = cookies(req).filter(|(n, _)| n == name).peekable();
                if found.peek().is_none() {
                    key.push('!');
                }
                for (i, (_, v)) in found.enumerate() {
                    key.push(if i == 0 { ':' } else { ',' });
                    key.push_str(v);
                }
            }
        }
    }
    key
}

/// Request headers never sent on a cache fetch: hop-by-hop ones, the
/// client's validators and ranges (the cache wants the whole answer and
/// answers conditions itself), its cache directives (a shopper's reload
/// must not reach the backend through the cache), and `Expect`.
const NOT_FETCHED: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
    header::CACHE_CONTROL,
    header::PRAGMA,
    header::EXPECT,
];

/// Headers left out of a fetch unless the key names them: the answer
/// then cannot depend on them, so it is right for any value.
const UNLESS_KEYED: &[HeaderName] = &[
    header::ACCEPT_ENCODING,
    header::AUTHORIZATION,
    header::COOKIE,
];

/// The request a miss sends to the backend: GET of the path (and the
/// query when keyed), with the client's headers less those above; only
/// the keyed cookies are sent. `X-Sluice-*` and `X-Forwarded-For` are
/// then set by `backend::present`.
pub fn fetch_request(rule: &CacheRule, req: &RequestHeader) -> pingora_core::Result<RequestHeader> {
    let path = req.uri.path();
    let target = match req.uri.query().filter(|_| rule.keys_query()) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut out = RequestHeader::build("GET", target.as_bytes(), Some(req.headers.len()))?;
    let named_by_connection: Vec<String> = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in &req.headers {
        let dropped = NOT_FETCHED.contains(name)
            || (UNLESS_KEYED.contains(name) && !rule.keys_header(name))
            || named_by_connection.iter().any(|n| n == name.as_str())
            || name.as_str().eq_ignore_ascii_case("keep-alive")
            || name.as_str().eq_ignore_ascii_case("proxy-connection");
        if !dropped {
            out.append_header(name.clone(), value.clone())?;
        }
    }
    if !rule.keys_header(&header::COOKIE) {
        let keyed: Vec<String> = cookies(req)
            .filter(|(n, _)| rule.keys_cookie(n))
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        if !keyed.is_empty() {
            out.insert_header(header::COOKIE, keyed.join("; "))?;
        }
    }
    Ok(out)
}

/// What may be done with a backend answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Stored: fresh for `fresh_for` from when its age was 0; `initial_age`
    /// is the backend's own `Age`; stale windows only when `stale_ok`.
    Store {
        /// The rule's ttl, or the backend's shorter `s-maxage`/`max-age`.
        fresh_for: Duration,
        /// The backend's `Age`.
        initial_age: Duration,
        /// False under `must-revalidate`/`proxy-revalidate`.
        stale_ok: bool,
    },
    /// Not stored (a status the rule does not cache), but public: the
    /// requests waiting on the same fetch get it too.
    Share,
    /// Personal or forbidden to reuse (`Set-Cookie`, `private`,
    /// `no-store`, `no-cache`, `Vary: *` or a `Vary` header the key does
    /// not name): only the request that fetched it gets it.
    Private,
}

/// The `Cache-Control` directives of an answer, lowercase, with values.
fn directives(resp: &ResponseHeader) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    resp.headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|d| !d.trim().is_empty())
        .map(|d| match d.split_once('=') {
            Some((k, v)) => (
                k.trim().to_ascii_lowercase(),
                Some(v.trim().trim_matches('"').to_string()),
            ),
            None => (d.trim().to_ascii_lowercase(), None),
        })
}

/// Whether a `Vary`'d request header cannot differ between requests of
/// one key: it is keyed, or it was left out of the fetch.
fn vary_covered(rule: &CacheRule, name: &str) -> bool {
    let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) else {
        return false;
    };
    rule.keys_header(&name) || (UNLESS_KEYED.contains(&name) && !rule.keys_header(&name))
}

/// Judges a backend answer for `rule`.
pub fn judge(rule: &CacheRule, resp: &ResponseHeader) -> Verdict {
    let h = &resp.headers;
    if h.contains_key(header::SET_COOKIE) || h.contains_key("set-cookie2") {
        return Verdict::Private;
    }
    let pragma_no_cache = h.get_all(header::PRAGMA).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache"))
    });
    let mut max_age = None;
    let mut s_maxage = None;
    let mut stale_ok = true;
    for (name, value) in directives(resp) {
        match name.as_str() {
            "private" | "no-store" | "no-cache" => return Verdict::Private,
            "max-age" => max_age = value.and_then(|v| v.parse::<u64>().ok()),
            "s-maxage" => s_maxage = value.and_then(|v| v.parse::<u64>().ok()),
            "must-revalidate" | "proxy-revalidate" => stale_ok = false,
            _ => {}
        }
    }
    if pragma_no_cache && max_age.is_none() && s_maxage.is_none() {
        return Verdict::Private;
    }
    let varies_beyond_key = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|n| !n.trim().is_empty())
        .any(|n| n.trim() == "*" || !vary_covered(rule, n));
    if varies_beyond_key {
        return Verdict::Private;
    }
    if !rule.caches_status(resp.status.as_u16()) {
        return Verdict::Share;
    }
    // A shared cache takes s-maxage over max-age (RFC 9111 5.2.2.10).
    let fresh_for = match s_maxage.or(max_age) {
        Some(secs) => rule.ttl.min(Duration::from_secs(secs)),
        None => rule.ttl,
    };
    let initial_age = h
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    Verdict::Store {
        fresh_for,
        initial_age,
        stale_ok,
    }
}

/// Whether a conditional request is answered 304 by a stored 200 with
/// these validators: `If-None-Match` against the `ETag` (weak
/// comparison, `*` matches any), else `If-Modified-Since` equal to the
/// `Last-Modified` byte for byte (nginx's default `if_modified_since
/// exact`: no date parsing, and a client echoes the value it got).
pub fn not_modified(req: &RequestHeader, stored: &ResponseHeader) -> bool {
    if stored.status != http::StatusCode::OK {
        return false;
    }
    let mut inm = req.headers.get_all(header::IF_NONE_MATCH).iter().peekable();
    if inm.peek().is_some() {
        let Some(etag) = stored
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let ours = weak(etag);
        return inm
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == "*" || weak(t) == ours);
    }
    match (
        req.headers.get(header::IF_MODIFIED_SINCE),
        stored.headers.get(header::LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => since.as_bytes() == modified.as_bytes(),
        _ => false,
    }
}

/// Headers a 304 carries from the stored answer (RFC 9110 15.4.5).
pub const NOT_MODIFIED_KEEPS: &[HeaderName] = &[
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

#[cfg(test)]
mod tests;
