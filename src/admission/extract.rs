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
//! Sources: a header (first value, visible ASCII), a cookie (exact name,
//! from every `Cookie` header), a query parameter (first occurrence,
//! percent-decoded with `+` as space), a path capture (percent-decoded), a
//! top-level JSON field, or a claim of an HS256 JWT (`Bearer` optional).
//! The HTTP syntax lives in `syntax`, quantities in `quantity`, tokens in
//! `jwt`; this file resolves sources into values.

mod jwt;
mod quantity;
mod syntax;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use http::HeaderMap;
use serde_json::{Map, Value};

use crate::rules::{FieldSource, Rule};
use crate::vocab::{valid_id, ID_SHAPE};

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
        Self {
            user: rule.user.clone(),
            sku: rule.sku.clone(),
            quantity: rule.quantity.source.clone(),
            default_qty: rule.quantity.default,
            max_qty: rule.quantity.max,
            needs_body,
        }
    }

    /// Whether any of user, sku or quantity is read from the JSON body.
    pub fn needs_body(&self) -> bool {
        self.needs_body
    }

    /// Reads and validates an attempt; `Err` is an `invalid` message naming the field.
    pub fn extract(&self, parts: &RequestParts<'_>) -> Result<Attempt, String> {
        let body = Body::new(parts.body);
        let user = id(Field::User, &self.user, parts, &body)?;
        let sku = id(Field::Sku, &self.sku, parts, &body)?;
        let qty = self.quantity(parts, &body)?;
        Ok(Attempt { user, sku, qty })
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
    parsed: OnceCell<Result<Map<String, Value>, &'static str>>,
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
    fn object(&self) -> Result<&Map<String, Value>, String> {
        self.parsed
            .get_or_init(|| parse_object(self.raw))
            .as_ref()
            .map_err(|e| (*e).to_string())
    }
}

fn parse_object(raw: Option<&[u8]>) -> Result<Map<String, Value>, &'static str> {
    #[cfg(test)]
    BODY_PARSES.with(|c| c.set(c.get() + 1));
    let raw = raw.ok_or("body: missing")?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err("body: missing");
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("body: not a JSON object"),
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
        FieldSource::Header(name) => match parts.headers.get(name) {
            None => Ok(None),
            Some(v) => match v.to_str() {
                Ok(s) if s.bytes().all(syntax::is_visible_ascii) => {
                    Ok(Some(Raw::Text(Cow::Borrowed(s))))
                }
                _ => Err(format!("{field}: header \"{name}\" must be visible ASCII")),
            },
        },
        FieldSource::Cookie(name) => {
            Ok(syntax::cookie(parts.headers, name).map(|v| Raw::Text(String::from_utf8_lossy(v))))
        }
        FieldSource::Query(name) => {
            let Some(value) = parts.query.and_then(|q| syntax::query_param(q, name)) else {
                return Ok(None);
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
        FieldSource::Json(name) => Ok(body
            .object()?
            .get(name)
            .filter(|v| !v.is_null())
            .map(|v| Raw::Value(Cow::Borrowed(v)))),
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
