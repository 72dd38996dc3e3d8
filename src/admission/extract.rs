//! Stage 2 of the admission pipeline (DESIGN.md section 3): read the user,
//! sku and quantity of an attempt where the rule says they are, and
//! validate them. Anything missing or malformed becomes `invalid` (400)
//! with a message that names the field.
//!
//! An [`Extractor`] is built per rule from its validated [`Rule`] (JWT
//! secrets were read by `config` when the rule was loaded).
//! [`Extractor::extract`] runs per request over the borrowed
//! [`RequestParts`]: it parses a JSON body at most once however many
//! fields read it, never panics on request data, and echoes at most a
//! short, escaped prefix of a bad value.
//!
//! Sources: a header (visible ASCII), a cookie (from every `Cookie`
//! header), a query parameter (percent-decoded with `+` as space), a path
//! capture (percent-decoded), a top-level JSON field, or a claim of an
//! HS256 JWT (`Bearer` optional).
//!
//! What the gateway decides on is what the backend reads, so a field must
//! come once: a header sent twice (or also spelled with `_` for `-`, which
//! CGI backends read alike), a cookie or query parameter present twice
//! (also under a name PHP reads the same, such as `user.id` or `user_id[]`
//! for `user_id`), a repeated JSON key, or a token header sent twice is
//! `invalid`. A comma-joined list in one header line is refused by the
//! value syntax itself (ids and quantities hold no `,`). A `Connection`
//! header naming a header the decision or the order rests on (the rule's
//! header sources, the token header, `Cookie` when a cookie is read,
//! `Idempotency-Key`, `X-Forwarded-For` (`-Host`, `-Proto`), `Host`, the
//! body's framing and type, any `X-Sluice-*`), or naming anything that is
//! not a token, is `invalid`: the hop before the backend would drop that
//! header, so the backend would not see what the gateway decided on.
//!
//! The HTTP syntax lives in `syntax`, the JSON body in `json`, quantities
//! in `quantity`, tokens in `jwt`; this file resolves sources into values.

mod json;
mod jwt;
mod quantity;
mod syntax;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use http::{HeaderMap, HeaderName};
use serde_json::Value;

use crate::backend::SLUICE_HEADER_PREFIX;
use crate::rules::{FieldSource, Rule};
use crate::vocab::{valid_id, ID_SHAPE};
use json::TopLevel;
use syntax::Single;

/// Headers that a `Connection` header may never name on a rule route,
/// whatever the rule reads: the request's target and framing, the body's
/// type, the client address the rate limits key on (and the forwarding
/// fields pingora itself refuses to see nominated, refused here before
/// any unit is taken), and the client's idempotency key (`X-Sluice-*` too,
/// by prefix).
const ALWAYS_KEPT: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "content-type",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    super::IDEMPOTENCY_HEADER,
];

/// At most this many characters of a bad value are echoed in a message.
const SHOWN_CHARS: usize = 40;

/// What a request carries, borrowed from the session.
pub struct RequestParts<'a> {
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The raw query string, without the `?`.
    pub query: Option<&'a str>,
    /// The rule's path template captures as `(name, raw value)`.
    pub captures: &'a [(&'a str, &'a str)],
    /// The whole request body, when the rule needs it ([`Extractor::needs_body`]).
    pub body: Option<&'a [u8]>,
}

/// The validated user, sku and quantity of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The user id; passes [`valid_id`].
    pub user: String,
    /// The sku; passes [`valid_id`].
    pub sku: String,
    /// Units asked for, from 1 to the rule's `quantity.max`.
    pub qty: u32,
}

/// Which part of an attempt is being read; its name prefixes messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    User,
    Sku,
    Quantity,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::User => "user",
            Field::Sku => "sku",
            Field::Quantity => "quantity",
        })
    }
}

/// The "missing" message for a source.
fn missing(field: Field, source: &FieldSource) -> String {
    match source {
        FieldSource::Header(h) => format!("{field}: missing header \"{h}\""),
        FieldSource::Cookie(n) => format!("{field}: missing cookie {n:?}"),
        FieldSource::Query(n) => format!("{field}: missing query parameter {n:?}"),
        FieldSource::Path(n) => format!("{field}: missing path capture {n:?}"),
        FieldSource::Json(n) => format!("{field}: missing JSON field {n:?}"),
        FieldSource::Jwt { header, .. } => format!("{field}: missing token in header \"{header}\""),
    }
}

/// Per-rule extractor, built when the rules are (start-up, reload).
#[derive(Clone, Debug)]
pub struct Extractor {
    user: FieldSource,
    sku: FieldSource,
    quantity: Option<FieldSource>,
    default_qty: u32,
    max_qty: u32,
    needs_body: bool,
    /// Header names a `Connection` header must not name, beyond
    /// [`ALWAYS_KEPT`]: the rule's header and token sources, `cookie`.
    kept: Vec<HeaderName>,
}

impl Extractor {
    /// The extractor of a rule.
    pub fn new(rule: &Rule) -> Self {
        let needs_body = rule.user.needs_body()
            || rule.sku.needs_body()
            || rule
                .quantity
                .source
                .as_ref()
                .is_some_and(FieldSource::needs_body);
        let mut kept = Vec::new();
        for source in [
            Some(&rule.user),
            Some(&rule.sku),
            rule.quantity.source.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let name = match source {
                FieldSource::Header(h) => h.clone(),
                FieldSource::Jwt { header, .. } => header.clone(),
                FieldSource::Cookie(_) => http::header::COOKIE,
                _ => continue,
            };
            if !kept.contains(&name) {
                kept.push(name);
            }
        }
        Self {
            user: rule.user.clone(),
            sku: rule.sku.clone(),
            quantity: rule.quantity.source.clone(),
            default_qty: rule.quantity.default,
            max_qty: rule.quantity.max,
            needs_body,
            kept,
        }
    }

    /// Whether any of user, sku or quantity is read from the JSON body.
    pub fn needs_body(&self) -> bool {
        self.needs_body
    }

    /// Reads and validates an attempt; `Err` is an `invalid` message naming the field.
    pub fn extract(&self, parts: &RequestParts<'_>) -> Result<Attempt, String> {
        self.check_connection(parts.headers)?;
        let body = Body::new(parts.body);
        let user = id(Field::User, &self.user, parts, &body)?;
        let sku = id(Field::Sku, &self.sku, parts, &body)?;
        let qty = self.quantity(parts, &body)?;
        Ok(Attempt { user, sku, qty })
    }

    /// Refuses a `Connection` header that names a header the decision or
    /// the order rests on, or an option that is not a token (a lenient hop
    /// might still drop what it names).
    fn check_connection(&self, headers: &HeaderMap) -> Result<(), String> {
        let options = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|o| !o.is_empty());
        for option in options {
            if !option.iter().all(|&b| syntax::is_tchar(b)) {
                let option = String::from_utf8_lossy(option);
                return Err(format!(
                    "Connection: {} is not a header name",
                    shown(&option)
                ));
            }
            let name = option.to_ascii_lowercase();
            // Tokens are ASCII: this is the exact text.
            let name = String::from_utf8_lossy(&name);
            let kept = ALWAYS_KEPT.contains(&&*name)
                || name.starts_with(SLUICE_HEADER_PREFIX)
                || self
                    .kept
                    .iter()
                    .any(|k| syntax::same_to_cgi(&name, k.as_str()));
            if kept {
                return Err(format!(
                    "Connection: must not name \"{name}\": the gateway decides on it and the backend must see it"
                ));
            }
        }
        Ok(())
    }

    /// The quantity: `default` when there is no source or the field is absent.
    fn quantity(&self, parts: &RequestParts<'_>, body: &Body<'_>) -> Result<u32, String> {
        let Some(source) = &self.quantity else {
            return Ok(self.default_qty);
        };
        let raw = match source {
            FieldSource::Jwt {
                header,
                claim,
                secret,
                ..
            } => jwt::claim(
                Field::Quantity,
                header,
                claim,
                secret.bytes(),
                parts.headers,
            )?
            .map(|v| Raw::Value(Cow::Owned(v))),
            _ => fetch(Field::Quantity, source, parts, body)?,
        };
        match raw {
            None => Ok(self.default_qty),
            Some(Raw::Text(t)) => quantity::from_text(&t, self.max_qty),
            Some(Raw::Value(v)) => quantity::from_json(&v, self.max_qty),
        }
    }
}

/// A value as found in the request, before it is checked for its field.
enum Raw<'b> {
    /// From a header, cookie, query parameter or path capture.
    Text(Cow<'b, str>),
    /// From the JSON body or a JWT claim; never `null`.
    Value(Cow<'b, Value>),
}

/// The request body, parsed as a JSON object on first use only.
struct Body<'a> {
    raw: Option<&'a [u8]>,
    parsed: OnceCell<Result<TopLevel, &'static str>>,
}

#[cfg(test)]
thread_local! {
    /// How many times this thread parsed a body, to test "at most once".
    static BODY_PARSES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl<'a> Body<'a> {
    fn new(raw: Option<&'a [u8]>) -> Self {
        Self {
            raw,
            parsed: OnceCell::new(),
        }
    }

    /// The body's top-level object, or the `body: ...` message.
    fn object(&self) -> Result<&TopLevel, String> {
        self.parsed
            .get_or_init(|| parse_object(self.raw))
            .as_ref()
            .map_err(|e| (*e).to_string())
    }
}

fn parse_object(raw: Option<&[u8]>) -> Result<TopLevel, &'static str> {
    #[cfg(test)]
    BODY_PARSES.with(|c| c.set(c.get() + 1));
    let raw = raw.ok_or("body: missing")?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err("body: missing");
    }
    TopLevel::parse(raw).ok_or("body: not a JSON object")
}

/// The one value of header `name`; a second line, or the same name
/// spelled with `_` for `-`, makes it [`Single::Repeated`].
fn single_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Single<&'h http::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let found = match (values.next(), values.next()) {
        (None, _) => Single::Absent,
        (Some(v), None) => Single::One(v),
        (Some(_), Some(_)) => return Single::Repeated,
    };
    // Alone, the other spelling is the header missing (still refused).
    let alias = || {
        headers
            .keys()
            .any(|k| k != name && syntax::same_to_cgi(k.as_str(), name.as_str()))
    };
    match found {
        Single::One(_) if alias() => Single::Repeated,
        found => found,
    }
}

/// The message for a field sent more than once.
fn repeated(field: Field, source: &FieldSource) -> String {
    match source {
        FieldSource::Header(h) => format!("{field}: header \"{h}\" sent more than once"),
        FieldSource::Cookie(n) => format!("{field}: cookie {n:?} sent more than once"),
        FieldSource::Query(n) => format!("{field}: query parameter {n:?} sent more than once"),
        FieldSource::Path(n) => format!("{field}: path capture {n:?} sent more than once"),
        FieldSource::Json(n) => format!("{field}: JSON field {n:?} sent more than once"),
        FieldSource::Jwt { header, .. } => {
            format!("{field}: header \"{header}\" sent more than once")
        }
    }
}

/// Reads and validates the user id or the sku.
fn id(
    field: Field,
    source: &FieldSource,
    parts: &RequestParts<'_>,
    body: &Body<'_>,
) -> Result<String, String> {
    if let FieldSource::Jwt {
        header,
        claim,
        secret,
        ..
    } = source
    {
        // Beyond "missing" and "expired", say nothing about what was wrong.
        let invalid = || format!("{field}: invalid token");
        let id = match jwt::claim(field, header, claim, secret.bytes(), parts.headers)? {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(invalid()),
        };
        return if valid_id(&id) {
            Ok(id)
        } else {
            Err(invalid())
        };
    }
    let Some(raw) = fetch(field, source, parts, body)? else {
        return Err(missing(field, source));
    };
    let text = match raw {
        Raw::Text(t) => t.into_owned(),
        Raw::Value(v) => match (field, v.as_ref()) {
            (_, Value::String(s)) => s.clone(),
            (Field::Sku, Value::Number(n)) if n.is_u64() => n.to_string(),
            _ => {
                let name = match source {
                    FieldSource::Json(n) => n.as_str(),
                    _ => "",
                };
                let shape = if field == Field::Sku {
                    "a string or a non-negative integer"
                } else {
                    "a string"
                };
                return Err(format!("{field}: JSON field {name:?} must be {shape}"));
            }
        },
    };
    if valid_id(&text) {
        Ok(text)
    } else {
        Err(format!("{field}: {} {ID_SHAPE}", shown(&text)))
    }
}

/// Reads a field from a non-JWT source; `Ok(None)` when it is absent.
fn fetch<'b>(
    field: Field,
    source: &FieldSource,
    parts: &RequestParts<'b>,
    body: &'b Body<'_>,
) -> Result<Option<Raw<'b>>, String> {
    match source {
        FieldSource::Header(name) => match single_header(parts.headers, name) {
            Single::Absent => Ok(None),
            Single::Repeated => Err(repeated(field, source)),
            Single::One(v) => match v.to_str() {
                Ok(s) if s.bytes().all(syntax::is_visible_ascii) => {
                    Ok(Some(Raw::Text(Cow::Borrowed(s))))
                }
                _ => Err(format!("{field}: header \"{name}\" must be visible ASCII")),
            },
        },
        FieldSource::Cookie(name) => match syntax::cookie(parts.headers, name) {
            Single::Absent => Ok(None),
            Single::Repeated => Err(repeated(field, source)),
            Single::One(v) => Ok(Some(Raw::Text(String::from_utf8_lossy(v)))),
        },
        FieldSource::Query(name) => {
            let found = parts
                .query
                .map_or(Single::Absent, |q| syntax::query_param(q, name));
            let value = match found {
                Single::Absent => return Ok(None),
                Single::Repeated => return Err(repeated(field, source)),
                Single::One(v) => v,
            };
            match syntax::percent_decode(value, true) {
                Some(v) => Ok(Some(Raw::Text(v))),
                None => Err(format!(
                    "{field}: query parameter {name:?} is not valid percent-encoded UTF-8"
                )),
            }
        }
        FieldSource::Path(name) => {
            let Some(&(_, value)) = parts.captures.iter().find(|(n, _)| n == name) else {
                return Ok(None);
            };
            match syntax::percent_decode(value, false) {
                Some(v) => Ok(Some(Raw::Text(v))),
                None => Err(format!(
                    "{field}: path segment {name:?} is not valid percent-encoded UTF-8"
                )),
            }
        }
        FieldSource::Json(name) => {
            let top = body.object()?;
            if top.repeated.iter().any(|k| k == name) {
                return Err(repeated(field, source));
            }
            Ok(top
                .map
                .get(name)
                .filter(|v| !v.is_null())
                .map(|v| Raw::Value(Cow::Borrowed(v))))
        }
        // Claims are read by `jwt::claim`, which owns the token's messages.
        FieldSource::Jwt { .. } => Ok(None),
    }
}

/// A bad value for a message, cut to [`SHOWN_CHARS`] and not quoted.
fn shown_raw(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => Cow::Owned(format!("{}...", &s[..cut])),
        None => Cow::Borrowed(s),
    }
}

/// A bad value for a message: escaped, quoted, and cut to [`SHOWN_CHARS`].
fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}
