//! Stage 2 of the admission pipeline (DESIGN.md section 3): read the user,
//! sku and quantity of an attempt where the rule says they are, and
//! validate them. Anything missing or malformed becomes `invalid` (400)
//! with a message that names the field.
//!
//! An [`Extractor`] is built per rule at start-up and on reload; that is
//! when JWT secrets are read from the environment, so a missing secret
//! fails the (re)load instead of every request. [`Extractor::extract`] then
//! runs per request over the borrowed [`RequestParts`]: it parses a JSON
//! body at most once however many fields read it, never panics on request
//! data, and echoes at most a short, escaped prefix of a bad value.
//!
//! Sources: a header (first value, visible ASCII), a cookie (exact name,
//! from every `Cookie` header), a query parameter (first occurrence,
//! percent-decoded with `+` as space), a path capture (percent-decoded), a
//! top-level JSON field, or a claim of an HS256 JWT (`Bearer` optional).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::ffi::OsString;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::rules::{FieldSource, Rule};

/// HMAC-SHA256, the MAC of HS256 tokens.
type HmacSha256 = Hmac<Sha256>;

/// The longest valid id, in characters (all ASCII, so also bytes).
const MAX_ID_LEN: usize = 128;

/// What an invalid id message says the id must be.
const ID_SHAPE: &str = "must be 1-128 characters of A-Z a-z 0-9 . _ : -";

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

/// Why an [`Extractor`] could not be built for a rule.
#[derive(Debug, thiserror::Error)]
pub enum ExtractorError {
    /// The environment variable holding a JWT secret is unset or empty.
    #[error("rule {rule:?}: {field}.jwt.secret_env: environment variable {var} is unset or empty")]
    MissingSecret {
        /// The rule's name.
        rule: String,
        /// The field that reads the JWT (`user`, `sku` or `quantity`).
        field: &'static str,
        /// The environment variable named by `secret_env`.
        var: String,
    },
}

/// Which part of an attempt is being read; its name prefixes messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    User,
    Sku,
    Quantity,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::User => "user",
            Field::Sku => "sku",
            Field::Quantity => "quantity",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A [`FieldSource`] ready for requests: JWT secrets already resolved.
#[derive(Clone)]
enum Source {
    Header(HeaderName),
    Cookie(String),
    Query(String),
    Path(String),
    Json(String),
    Jwt {
        header: HeaderName,
        claim: String,
        secret: Box<[u8]>,
    },
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Header(h) => f.debug_tuple("Header").field(h).finish(),
            Source::Cookie(n) => f.debug_tuple("Cookie").field(n).finish(),
            Source::Query(n) => f.debug_tuple("Query").field(n).finish(),
            Source::Path(n) => f.debug_tuple("Path").field(n).finish(),
            Source::Json(n) => f.debug_tuple("Json").field(n).finish(),
            Source::Jwt { header, claim, .. } => f
                .debug_struct("Jwt")
                .field("header", header)
                .field("claim", claim)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

impl Source {
    /// The "missing" message for this source.
    fn missing(&self, field: Field) -> String {
        match self {
            Source::Header(h) => format!("{field}: missing header \"{h}\""),
            Source::Cookie(n) => format!("{field}: missing cookie {n:?}"),
            Source::Query(n) => format!("{field}: missing query parameter {n:?}"),
            Source::Path(n) => format!("{field}: missing path capture {n:?}"),
            Source::Json(n) => format!("{field}: missing JSON field {n:?}"),
            Source::Jwt { header, .. } => format!("{field}: missing token in header \"{header}\""),
        }
    }
}

/// Per-rule extractor, built at start-up/reload (reads JWT secrets from the environment once).
#[derive(Clone, Debug)]
pub struct Extractor {
    user: Source,
    sku: Source,
    quantity: Option<Source>,
    default_qty: u32,
    max_qty: u32,
    needs_body: bool,
}

impl Extractor {
    /// Builds the extractor of a rule, reading its JWT secrets from the environment.
    pub fn new(rule: &Rule) -> Result<Self, ExtractorError> {
        Self::with_lookup(rule, |name| std::env::var_os(name))
    }

    /// Builds the extractor of a rule with `lookup` standing in for the environment.
    fn with_lookup(
        rule: &Rule,
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ExtractorError> {
        let resolve = |field: Field, source: &FieldSource| -> Result<Source, ExtractorError> {
            Ok(match source {
                FieldSource::Header(h) => Source::Header(h.clone()),
                FieldSource::Cookie(n) => Source::Cookie(n.clone()),
                FieldSource::Query(n) => Source::Query(n.clone()),
                FieldSource::Path(n) => Source::Path(n.clone()),
                FieldSource::Json(n) => Source::Json(n.clone()),
                FieldSource::Jwt {
                    header,
                    claim,
                    secret_env,
                } => {
                    let secret = lookup(secret_env)
                        .map(OsString::into_encoded_bytes)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| ExtractorError::MissingSecret {
                            rule: rule.name.to_string(),
                            field: field.name(),
                            var: secret_env.clone(),
                        })?;
                    Source::Jwt {
                        header: header.clone(),
                        claim: claim.clone(),
                        secret: secret.into_boxed_slice(),
                    }
                }
            })
        };
        let user = resolve(Field::User, &rule.user)?;
        let sku = resolve(Field::Sku, &rule.sku)?;
        let quantity = match &rule.quantity.source {
            Some(s) => Some(resolve(Field::Quantity, s)?),
            None => None,
        };
        let needs_body = rule.user.needs_body()
            || rule.sku.needs_body()
            || rule
                .quantity
                .source
                .as_ref()
                .is_some_and(FieldSource::needs_body);
        Ok(Self {
            user,
            sku,
            quantity,
            default_qty: rule.quantity.default,
            max_qty: rule.quantity.max,
            needs_body,
        })
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
            Source::Jwt {
                header,
                claim,
                secret,
            } => jwt_claim(Field::Quantity, header, claim, secret, parts.headers)?
                .map(|v| Raw::Value(Cow::Owned(v))),
            _ => fetch(Field::Quantity, source, parts, body)?,
        };
        match raw {
            None => Ok(self.default_qty),
            Some(Raw::Text(t)) => qty_from_text(&t, self.max_qty),
            Some(Raw::Value(v)) => qty_from_json(&v, self.max_qty),
        }
    }
}

/// Whether `s` is a valid user id or sku: 1-128 chars of `[A-Za-z0-9._:-]`.
pub fn valid_id(s: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
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
    source: &Source,
    parts: &RequestParts<'_>,
    body: &Body<'_>,
) -> Result<String, String> {
    if let Source::Jwt {
        header,
        claim,
        secret,
    } = source
    {
        // Beyond "missing" and "expired", say nothing about what was wrong.
        let invalid = || format!("{field}: invalid token");
        let id = match jwt_claim(field, header, claim, secret, parts.headers)? {
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
        return Err(source.missing(field));
    };
    let text = match raw {
        Raw::Text(t) => t.into_owned(),
        Raw::Value(v) => match (field, v.as_ref()) {
            (_, Value::String(s)) => s.clone(),
            (Field::Sku, Value::Number(n)) if n.is_u64() => n.to_string(),
            _ => {
                let name = match source {
                    Source::Json(n) => n.as_str(),
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
    source: &Source,
    parts: &RequestParts<'b>,
    body: &'b Body<'_>,
) -> Result<Option<Raw<'b>>, String> {
    match source {
        Source::Header(name) => match parts.headers.get(name) {
            None => Ok(None),
            Some(v) => match v.to_str() {
                Ok(s) if s.bytes().all(is_visible_ascii) => Ok(Some(Raw::Text(Cow::Borrowed(s)))),
                _ => Err(format!("{field}: header \"{name}\" must be visible ASCII")),
            },
        },
        Source::Cookie(name) => {
            Ok(cookie(parts.headers, name).map(|v| Raw::Text(String::from_utf8_lossy(v))))
        }
        Source::Query(name) => {
            let Some(value) = parts.query.and_then(|q| query_param(q, name)) else {
                return Ok(None);
            };
            match percent_decode(value, true) {
                Some(v) => Ok(Some(Raw::Text(v))),
                None => Err(format!(
                    "{field}: query parameter {name:?} is not valid percent-encoded UTF-8"
                )),
            }
        }
        Source::Path(name) => {
            let Some(&(_, value)) = parts.captures.iter().find(|(n, _)| n == name) else {
                return Ok(None);
            };
            match percent_decode(value, false) {
                Some(v) => Ok(Some(Raw::Text(v))),
                None => Err(format!(
                    "{field}: path segment {name:?} is not valid percent-encoded UTF-8"
                )),
            }
        }
        Source::Json(name) => Ok(body
            .object()?
            .get(name)
            .filter(|v| !v.is_null())
            .map(|v| Raw::Value(Cow::Borrowed(v)))),
        // Claims are read by `jwt_claim`, which owns the token's messages.
        Source::Jwt { .. } => Ok(None),
    }
}

fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// The value of the first cookie named exactly `name` in any `Cookie` header.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
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
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let matches = k == name || percent_decode(k, true).is_some_and(|k| k == name);
        matches.then_some(v)
    })
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); `None`
/// for a bad escape or a result that is not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
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

/// A bad value for a message: escaped, quoted, and cut to [`SHOWN_CHARS`].
fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

fn qty_whole(max: u32) -> String {
    format!("quantity: must be a whole number from 1 to {max}")
}

fn qty_over(n: &str, max: u32) -> String {
    let n = match n.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}...", &n[..cut]),
        None => n.to_string(),
    };
    format!("quantity: {n} is over the maximum of {max}")
}

/// A quantity from a header, cookie, query parameter or path: ASCII digits only.
fn qty_from_text(s: &str, max: u32) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(qty_whole(max));
    }
    let digits = s.trim_start_matches('0');
    if digits.is_empty() {
        return Err(qty_whole(max));
    }
    match digits.parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(qty_over(digits, max)),
    }
}

/// A quantity from JSON or a JWT claim: a whole number, not a string.
fn qty_from_json(v: &Value, max: u32) -> Result<u32, String> {
    let Value::Number(n) = v else {
        return Err(qty_whole(max));
    };
    let value = if let Some(u) = n.as_u64() {
        u
    } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0) {
        // `2.0` is a whole number; anything past u64 is over any maximum.
        if f >= u64::MAX as f64 {
            return Err(qty_over(&n.to_string(), max));
        }
        f as u64
    } else {
        return Err(qty_whole(max));
    };
    if value == 0 {
        return Err(qty_whole(max));
    }
    match u32::try_from(value) {
        Ok(q) if q <= max => Ok(q),
        _ => Err(qty_over(&value.to_string(), max)),
    }
}

/// Verifies the HS256 token in `header` and returns `claim` (absent or
/// `null` gives `Ok(None)`). Messages: missing token, token expired, or
/// invalid token, with no further detail.
fn jwt_claim(
    field: Field,
    header: &HeaderName,
    claim: &str,
    secret: &[u8],
    headers: &HeaderMap,
) -> Result<Option<Value>, String> {
    let missing = || format!("{field}: missing token in header \"{header}\"");
    let invalid = || format!("{field}: invalid token");
    let Some(value) = headers.get(header) else {
        return Err(missing());
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    let token = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    };
    if token.is_empty() || token.eq_ignore_ascii_case("bearer") {
        return Err(missing());
    }
    let mut payload = verify_hs256(token, secret).ok_or_else(invalid)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    match payload.get("exp") {
        None | Some(Value::Null) => {}
        Some(Value::Number(exp)) => match exp.as_f64() {
            Some(exp) if now < exp => {}
            Some(_) => return Err(format!("{field}: token expired")),
            None => return Err(invalid()),
        },
        // An expiry we cannot read is not one we can honour.
        Some(_) => return Err(invalid()),
    }
    match payload.get("nbf") {
        None | Some(Value::Null) => {}
        Some(Value::Number(nbf)) if nbf.as_f64().is_some_and(|nbf| nbf <= now) => {}
        Some(_) => return Err(invalid()),
    }
    Ok(payload.remove(claim).filter(|v| !v.is_null()))
}

/// The payload of a well-formed, correctly signed HS256 JWT.
fn verify_hs256(token: &str, secret: &[u8]) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let Value::Object(head) = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?
    else {
        return None;
    };
    // Only HS256, and no critical extensions we would have to understand.
    if head.get("alg").and_then(Value::as_str) != Some("HS256") || head.contains_key("crit") {
        return None;
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature).ok()?;
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use http::header::AUTHORIZATION;
    use http::HeaderValue;

    use super::*;
    use crate::rules::{
        PathTemplate, QuantitySpec, QueueSpec, ReleaseOn, Responses, UpstreamId, Window,
    };

    const SECRET_ENV: &str = "T_SECRET";
    const SECRET: &[u8] = b"s3cret-for-tests";

    fn rule(user: FieldSource, sku: FieldSource, quantity: QuantitySpec) -> Rule {
        Rule {
            name: "test-rule".into(),
            method: http::Method::POST,
            path: PathTemplate::parse("/api/{sku}/order").expect("template"),
            user,
            sku,
            quantity,
            window: Window::default(),
            rate_limits: Vec::new(),
            dedup: None,
            per_user_limit: None,
            upstream: UpstreamId(0),
            queue: QueueSpec {
                max_wait: Duration::from_secs(1),
                capacity: 100,
                max_attempts: 3,
                backoff: Duration::from_millis(200),
            },
            release_on: ReleaseOn::default(),
            responses: Responses::default(),
            origin: (PathBuf::from("rules.yaml"), 1),
        }
    }

    fn test_env(name: &str) -> Option<OsString> {
        (name == SECRET_ENV).then(|| OsString::from("s3cret-for-tests"))
    }

    fn hdr(n: &'static str) -> FieldSource {
        FieldSource::Header(HeaderName::from_static(n))
    }
    fn cookie(n: &str) -> FieldSource {
        FieldSource::Cookie(n.into())
    }
    fn query(n: &str) -> FieldSource {
        FieldSource::Query(n.into())
    }
    fn path(n: &str) -> FieldSource {
        FieldSource::Path(n.into())
    }
    fn json(n: &str) -> FieldSource {
        FieldSource::Json(n.into())
    }
    fn jwt(claim: &str) -> FieldSource {
        FieldSource::Jwt {
            header: AUTHORIZATION,
            claim: claim.into(),
            secret_env: SECRET_ENV.into(),
        }
    }
    fn qty(source: Option<FieldSource>, default: u32, max: u32) -> QuantitySpec {
        QuantitySpec {
            source,
            default,
            max,
        }
    }

    fn b64(data: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(data)
    }

    /// An HS256-style token with any header, payload and key.
    fn token(header: &str, payload: &str, secret: &[u8]) -> String {
        let signing = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
        let mut mac = HmacSha256::new_from_slice(secret).expect("hmac key");
        mac.update(signing.as_bytes());
        format!("{signing}.{}", b64(&mac.finalize().into_bytes()))
    }

    fn hs256(payload: &str) -> String {
        token(r#"{"alg":"HS256","typ":"JWT"}"#, payload, SECRET)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
    }

    struct Case {
        name: &'static str,
        user: FieldSource,
        sku: FieldSource,
        qty: QuantitySpec,
        headers: Vec<(&'static str, String)>,
        query: Option<&'static str>,
        captures: Vec<(&'static str, &'static str)>,
        body: Option<&'static str>,
        want: Result<(&'static str, &'static str, u32), String>,
    }

    /// User from `x-user-id`, sku from the `{sku}` capture, quantity 1 of at most 5.
    fn base() -> Case {
        Case {
            name: "",
            user: hdr("x-user-id"),
            sku: path("sku"),
            qty: qty(None, 1, 5),
            headers: vec![("x-user-id", "u1".into())],
            query: None,
            captures: vec![("sku", "p1")],
            body: None,
            want: Ok(("u1", "p1", 1)),
        }
    }

    fn h(name: &'static str, value: impl Into<String>) -> (&'static str, String) {
        (name, value.into())
    }
    fn ok(
        user: &'static str,
        sku: &'static str,
        qty: u32,
    ) -> Result<(&'static str, &'static str, u32), String> {
        Ok((user, sku, qty))
    }
    fn err(msg: impl Into<String>) -> Result<(&'static str, &'static str, u32), String> {
        Err(msg.into())
    }

    const WHOLE_5: &str = "quantity: must be a whole number from 1 to 5";

    fn run(c: &Case) -> Result<Attempt, String> {
        let r = rule(c.user.clone(), c.sku.clone(), c.qty.clone());
        let ex = Extractor::with_lookup(&r, test_env).expect("extractor");
        let mut headers = HeaderMap::new();
        for (name, value) in &c.headers {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        ex.extract(&RequestParts {
            headers: &headers,
            query: c.query,
            captures: &c.captures,
            body: c.body.map(str::as_bytes),
        })
    }

    #[test]
    fn table() {
        let long_ok: &'static str = Box::leak("a".repeat(128).into_boxed_str());
        let long_bad = "b".repeat(129);
        let t = now();
        let cases = vec![
            // --- user sources ---
            Case {
                name: "header user",
                ..base()
            },
            Case {
                name: "header: first value wins",
                headers: vec![h("x-user-id", "u1"), h("x-user-id", "u2")],
                ..base()
            },
            Case {
                name: "header missing",
                headers: vec![],
                want: err(r#"user: missing header "x-user-id""#),
                ..base()
            },
            Case {
                name: "header with a space is not visible ASCII",
                headers: vec![h("x-user-id", "a b")],
                want: err(r#"user: header "x-user-id" must be visible ASCII"#),
                ..base()
            },
            Case {
                name: "cookie among several, with spaces",
                user: cookie("uid"),
                headers: vec![h("cookie", "a=1;  uid=u7 ; b=2")],
                want: ok("u7", "p1", 1),
                ..base()
            },
            Case {
                name: "cookie: exact name, several Cookie headers, first wins",
                user: cookie("uid"),
                headers: vec![
                    h("cookie", "xuid=no; uidx=no"),
                    h("cookie", "uid=u8"),
                    h("cookie", "uid=u9"),
                ],
                want: ok("u8", "p1", 1),
                ..base()
            },
            Case {
                name: "cookie: quoted value",
                user: cookie("uid"),
                headers: vec![h("cookie", r#"uid="u10""#)],
                want: ok("u10", "p1", 1),
                ..base()
            },
            Case {
                name: "cookie missing",
                user: cookie("uid"),
                headers: vec![h("cookie", "session=abc; myuid=x")],
                want: err(r#"user: missing cookie "uid""#),
                ..base()
            },
            Case {
                name: "cookie with no Cookie header",
                user: cookie("uid"),
                headers: vec![],
                want: err(r#"user: missing cookie "uid""#),
                ..base()
            },
            Case {
                name: "cookie: empty value is a bad id",
                user: cookie("uid"),
                headers: vec![h("cookie", "uid=")],
                want: err(r#"user: "" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "query user, percent-decoded",
                user: query("uid"),
                query: Some("a=1&uid=u%3A1"),
                headers: vec![],
                want: ok("u:1", "p1", 1),
                ..base()
            },
            Case {
                name: "query: first occurrence wins",
                user: query("uid"),
                query: Some("uid=first&uid=second"),
                want: ok("first", "p1", 1),
                ..base()
            },
            Case {
                name: "query: encoded key",
                user: query("uid"),
                query: Some("u%69d=u5"),
                want: ok("u5", "p1", 1),
                ..base()
            },
            Case {
                name: "query: + is a space",
                user: query("uid"),
                query: Some("uid=a+b"),
                want: err(r#"user: "a b" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "query: bad escape",
                user: query("uid"),
                query: Some("uid=%zz"),
                want: err(r#"user: query parameter "uid" is not valid percent-encoded UTF-8"#),
                ..base()
            },
            Case {
                name: "query: truncated escape",
                user: query("uid"),
                query: Some("uid=ab%4"),
                want: err(r#"user: query parameter "uid" is not valid percent-encoded UTF-8"#),
                ..base()
            },
            Case {
                name: "query: escape that is not UTF-8",
                user: query("uid"),
                query: Some("uid=%ff"),
                want: err(r#"user: query parameter "uid" is not valid percent-encoded UTF-8"#),
                ..base()
            },
            Case {
                name: "query missing",
                user: query("uid"),
                query: Some("uidx=1&x=uid"),
                want: err(r#"user: missing query parameter "uid""#),
                ..base()
            },
            Case {
                name: "query: no query string",
                user: query("uid"),
                query: None,
                want: err(r#"user: missing query parameter "uid""#),
                ..base()
            },
            Case {
                name: "path user",
                user: path("uid"),
                captures: vec![("uid", "u3"), ("sku", "p1")],
                want: ok("u3", "p1", 1),
                ..base()
            },
            Case {
                name: "json user",
                user: json("uid"),
                body: Some(r#"{"uid":"u4"}"#),
                want: ok("u4", "p1", 1),
                ..base()
            },
            Case {
                name: "json user must be a string",
                user: json("uid"),
                body: Some(r#"{"uid":42}"#),
                want: err(r#"user: JSON field "uid" must be a string"#),
                ..base()
            },
            Case {
                name: "json user missing",
                user: json("uid"),
                body: Some(r#"{"user":"u4"}"#),
                want: err(r#"user: missing JSON field "uid""#),
                ..base()
            },
            // --- sku sources ---
            Case {
                name: "path sku, percent-decoded",
                captures: vec![("sku", "p%3A1")],
                want: ok("u1", "p:1", 1),
                ..base()
            },
            Case {
                name: "path sku: + is literal in paths",
                captures: vec![("sku", "p+1")],
                want: err(r#"sku: "p+1" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "path sku: bad escape",
                captures: vec![("sku", "p%g1")],
                want: err(r#"sku: path segment "sku" is not valid percent-encoded UTF-8"#),
                ..base()
            },
            Case {
                name: "path capture missing",
                captures: vec![],
                want: err(r#"sku: missing path capture "sku""#),
                ..base()
            },
            Case {
                name: "query sku",
                sku: query("sku"),
                query: Some("sku=iphone-16"),
                want: ok("u1", "iphone-16", 1),
                ..base()
            },
            Case {
                name: "header sku",
                sku: hdr("x-sku"),
                headers: vec![h("x-user-id", "u1"), h("x-sku", "S.9")],
                want: ok("u1", "S.9", 1),
                ..base()
            },
            Case {
                name: "cookie sku",
                sku: cookie("sku"),
                headers: vec![h("x-user-id", "u1"), h("cookie", "sku=s_2")],
                want: ok("u1", "s_2", 1),
                ..base()
            },
            Case {
                name: "json sku string",
                sku: json("sku"),
                body: Some(r#"{"sku":"p-7"}"#),
                want: ok("u1", "p-7", 1),
                ..base()
            },
            Case {
                name: "json sku integer",
                sku: json("sku"),
                body: Some(r#"{"sku":12345}"#),
                want: ok("u1", "12345", 1),
                ..base()
            },
            Case {
                name: "json sku negative",
                sku: json("sku"),
                body: Some(r#"{"sku":-1}"#),
                want: err(r#"sku: JSON field "sku" must be a string or a non-negative integer"#),
                ..base()
            },
            Case {
                name: "json sku fractional",
                sku: json("sku"),
                body: Some(r#"{"sku":1.5}"#),
                want: err(r#"sku: JSON field "sku" must be a string or a non-negative integer"#),
                ..base()
            },
            Case {
                name: "json sku object",
                sku: json("sku"),
                body: Some(r#"{"sku":{"id":1}}"#),
                want: err(r#"sku: JSON field "sku" must be a string or a non-negative integer"#),
                ..base()
            },
            Case {
                name: "json sku missing",
                sku: json("x"),
                body: Some(r#"{"sku":"p"}"#),
                want: err(r#"sku: missing JSON field "x""#),
                ..base()
            },
            Case {
                name: "json sku null is missing",
                sku: json("sku"),
                body: Some(r#"{"sku":null}"#),
                want: err(r#"sku: missing JSON field "sku""#),
                ..base()
            },
            Case {
                name: "json: no body",
                sku: json("sku"),
                body: None,
                want: err("body: missing"),
                ..base()
            },
            Case {
                name: "json: empty body",
                sku: json("sku"),
                body: Some(" \n"),
                want: err("body: missing"),
                ..base()
            },
            Case {
                name: "json: array body",
                sku: json("sku"),
                body: Some(r#"[{"sku":"p"}]"#),
                want: err("body: not a JSON object"),
                ..base()
            },
            Case {
                name: "json: not JSON",
                sku: json("sku"),
                body: Some("sku=p"),
                want: err("body: not a JSON object"),
                ..base()
            },
            // --- ids ---
            Case {
                name: "id: every allowed character",
                headers: vec![h("x-user-id", "AZaz09._:-")],
                want: ok("AZaz09._:-", "p1", 1),
                ..base()
            },
            Case {
                name: "id: empty",
                headers: vec![h("x-user-id", "")],
                want: err(r#"user: "" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "id: bad char",
                captures: vec![("sku", "a/b")],
                want: err(r#"sku: "a/b" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "id: non-ASCII sku",
                captures: vec![("sku", "caf%C3%A9")],
                want: err(r#"sku: "café" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
                ..base()
            },
            Case {
                name: "id: 128 characters",
                headers: vec![h("x-user-id", long_ok)],
                want: ok(long_ok, "p1", 1),
                ..base()
            },
            Case {
                name: "id: 129 characters, echo cut to 40",
                headers: vec![h("x-user-id", long_bad)],
                want: err(format!(
                    "user: \"{}\"... must be 1-128 characters of A-Z a-z 0-9 . _ : -",
                    "b".repeat(40)
                )),
                ..base()
            },
            // --- quantity ---
            Case {
                name: "qty: no source gives default",
                qty: qty(None, 3, 5),
                want: ok("u1", "p1", 3),
                ..base()
            },
            Case {
                name: "qty json",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":2}"#),
                want: ok("u1", "p1", 2),
                ..base()
            },
            Case {
                name: "qty json at max",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":5}"#),
                want: ok("u1", "p1", 5),
                ..base()
            },
            Case {
                name: "qty json over max",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":6}"#),
                want: err("quantity: 6 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty json 0",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":0}"#),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty json -1",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":-1}"#),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty json 1.5",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":1.5}"#),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty json 2.0 is whole",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":2.0}"#),
                want: ok("u1", "p1", 2),
                ..base()
            },
            Case {
                name: "qty json string \"2\"",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":"2"}"#),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty json bool",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":true}"#),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty json 2^32",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":4294967296}"#),
                want: err("quantity: 4294967296 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty json 2^32 with max u32::MAX",
                qty: qty(Some(json("qty")), 1, u32::MAX),
                body: Some(r#"{"qty":4294967296}"#),
                want: err("quantity: 4294967296 is over the maximum of 4294967295"),
                ..base()
            },
            Case {
                name: "qty json u32::MAX with max u32::MAX",
                qty: qty(Some(json("qty")), 1, u32::MAX),
                body: Some(r#"{"qty":4294967295}"#),
                want: ok("u1", "p1", u32::MAX),
                ..base()
            },
            Case {
                name: "qty json 1e30",
                qty: qty(Some(json("qty")), 1, 5),
                body: Some(r#"{"qty":1e30}"#),
                want: err("quantity: 1e+30 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty json absent gives default",
                qty: qty(Some(json("qty")), 2, 5),
                body: Some(r#"{"other":1}"#),
                want: ok("u1", "p1", 2),
                ..base()
            },
            Case {
                name: "qty json null gives default",
                qty: qty(Some(json("qty")), 2, 5),
                body: Some(r#"{"qty":null}"#),
                want: ok("u1", "p1", 2),
                ..base()
            },
            Case {
                name: "qty json with no body",
                qty: qty(Some(json("qty")), 1, 5),
                body: None,
                want: err("body: missing"),
                ..base()
            },
            Case {
                name: "qty query",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=3"),
                want: ok("u1", "p1", 3),
                ..base()
            },
            Case {
                name: "qty query leading zero",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=05"),
                want: ok("u1", "p1", 5),
                ..base()
            },
            Case {
                name: "qty query 0",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=000"),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty query -1",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=-1"),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty query 1.5",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=1.5"),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty query +2 (a space after decoding)",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=+2"),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty query empty",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n="),
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty query over max",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=6"),
                want: err("quantity: 6 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty query 2^32",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=4294967296"),
                want: err("quantity: 4294967296 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty query huge",
                qty: qty(Some(query("n")), 1, 5),
                query: Some("n=123456789012345678901234567890"),
                want: err("quantity: 123456789012345678901234567890 is over the maximum of 5"),
                ..base()
            },
            Case {
                name: "qty query absent gives default",
                qty: qty(Some(query("n")), 4, 5),
                query: Some("x=1"),
                want: ok("u1", "p1", 4),
                ..base()
            },
            Case {
                name: "qty header",
                qty: qty(Some(hdr("x-qty")), 1, 5),
                headers: vec![h("x-user-id", "u1"), h("x-qty", "2")],
                want: ok("u1", "p1", 2),
                ..base()
            },
            Case {
                name: "qty header not digits",
                qty: qty(Some(hdr("x-qty")), 1, 5),
                headers: vec![h("x-user-id", "u1"), h("x-qty", "two")],
                want: err(WHOLE_5),
                ..base()
            },
            Case {
                name: "qty header absent gives default",
                qty: qty(Some(hdr("x-qty")), 1, 5),
                want: ok("u1", "p1", 1),
                ..base()
            },
            // --- several fields from one body ---
            Case {
                name: "user, sku and qty from one JSON body",
                user: json("uid"),
                sku: json("sku"),
                qty: qty(Some(json("qty")), 1, 5),
                headers: vec![],
                body: Some(r#"{"uid":"u9","sku":77,"qty":3}"#),
                want: ok("u9", "77", 3),
                ..base()
            },
            // --- JWT ---
            Case {
                name: "jwt with Bearer",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    format!("Bearer {}", hs256(r#"{"sub":"u-jwt"}"#)),
                )],
                want: ok("u-jwt", "p1", 1),
                ..base()
            },
            Case {
                name: "jwt with lower-case bearer",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    format!("bearer {}", hs256(r#"{"sub":"u-jwt"}"#)),
                )],
                want: ok("u-jwt", "p1", 1),
                ..base()
            },
            Case {
                name: "jwt without Bearer",
                user: jwt("sub"),
                headers: vec![h("authorization", hs256(r#"{"sub":"u-jwt"}"#))],
                want: ok("u-jwt", "p1", 1),
                ..base()
            },
            Case {
                name: "jwt integer claim",
                user: jwt("uid"),
                headers: vec![h("authorization", hs256(r#"{"uid":42}"#))],
                want: ok("42", "p1", 1),
                ..base()
            },
            Case {
                name: "jwt exp in the future",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    hs256(&format!(r#"{{"sub":"u2","exp":{}}}"#, t + 3600)),
                )],
                want: ok("u2", "p1", 1),
                ..base()
            },
            Case {
                name: "jwt expired",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    hs256(&format!(r#"{{"sub":"u2","exp":{}}}"#, t - 60)),
                )],
                want: err("user: token expired"),
                ..base()
            },
            Case {
                name: "jwt exp not a number",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    hs256(r#"{"sub":"u2","exp":"tomorrow"}"#),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt not yet valid",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    hs256(&format!(r#"{{"sub":"u2","nbf":{}}}"#, t + 3600)),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt wrong signature",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    token(r#"{"alg":"HS256"}"#, r#"{"sub":"u1"}"#, b"other"),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt payload swapped under a valid signature",
                user: jwt("sub"),
                headers: vec![h("authorization", {
                    let good = hs256(r#"{"sub":"u1"}"#);
                    let parts: Vec<&str> = good.split('.').collect();
                    format!("{}.{}.{}", parts[0], b64(br#"{"sub":"admin"}"#), parts[2])
                })],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt alg none",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(br#"{"sub":"u1"}"#)),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt alg HS512 signed with the secret",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    token(r#"{"alg":"HS512"}"#, r#"{"sub":"u1"}"#, SECRET),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt crit header",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    token(r#"{"alg":"HS256","crit":["x"]}"#, r#"{"sub":"u1"}"#, SECRET),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt missing header",
                user: jwt("sub"),
                headers: vec![],
                want: err(r#"user: missing token in header "authorization""#),
                ..base()
            },
            Case {
                name: "jwt Bearer with no token",
                user: jwt("sub"),
                headers: vec![h("authorization", "Bearer ")],
                want: err(r#"user: missing token in header "authorization""#),
                ..base()
            },
            Case {
                name: "jwt not three parts",
                user: jwt("sub"),
                headers: vec![h("authorization", "Bearer abc.def")],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt four parts",
                user: jwt("sub"),
                headers: vec![h(
                    "authorization",
                    format!("{}.x", hs256(r#"{"sub":"u1"}"#)),
                )],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt padded base64",
                user: jwt("sub"),
                headers: vec![h("authorization", format!("{}=", hs256(r#"{"sub":"u1"}"#)))],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt claim missing",
                user: jwt("sub"),
                headers: vec![h("authorization", hs256(r#"{"name":"u1"}"#))],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt claim not a valid id",
                user: jwt("sub"),
                headers: vec![h("authorization", hs256(r#"{"sub":"a b"}"#))],
                want: err("user: invalid token"),
                ..base()
            },
            Case {
                name: "jwt payload not an object",
                user: jwt("sub"),
                headers: vec![h("authorization", hs256(r#"["u1"]"#))],
                want: err("user: invalid token"),
                ..base()
            },
        ];

        let mut failures = Vec::new();
        for c in &cases {
            let got = run(c);
            let want = c.want.clone().map(|(user, sku, qty)| Attempt {
                user: user.into(),
                sku: sku.into(),
                qty,
            });
            if got != want {
                failures.push(format!("{}:\n   got  {got:?}\n   want {want:?}", c.name));
            }
        }
        assert!(
            failures.is_empty(),
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn header_with_non_ascii_bytes_is_invalid() {
        let ex = Extractor::with_lookup(
            &rule(hdr("x-user-id"), path("sku"), qty(None, 1, 5)),
            test_env,
        )
        .expect("extractor");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-user-id",
            HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text"),
        );
        let got = ex.extract(&RequestParts {
            headers: &headers,
            query: None,
            captures: &[("sku", "p1")],
            body: None,
        });
        assert_eq!(
            got,
            Err(r#"user: header "x-user-id" must be visible ASCII"#.to_string())
        );
    }

    #[test]
    fn json_body_is_parsed_once() {
        let ex = Extractor::with_lookup(
            &rule(json("uid"), json("sku"), qty(Some(json("qty")), 1, 5)),
            test_env,
        )
        .expect("extractor");
        let headers = HeaderMap::new();
        let parts = RequestParts {
            headers: &headers,
            query: None,
            captures: &[],
            body: Some(br#"{"uid":"u1","sku":"s1","qty":2}"#),
        };
        BODY_PARSES.with(|c| c.set(0));
        let got = ex.extract(&parts);
        assert_eq!(
            got,
            Ok(Attempt {
                user: "u1".into(),
                sku: "s1".into(),
                qty: 2
            })
        );
        assert_eq!(BODY_PARSES.with(|c| c.get()), 1);
    }

    #[test]
    fn body_is_not_parsed_when_no_field_reads_it() {
        let ex = Extractor::with_lookup(
            &rule(hdr("x-user-id"), path("sku"), qty(None, 1, 5)),
            test_env,
        )
        .expect("extractor");
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", HeaderValue::from_static("u1"));
        BODY_PARSES.with(|c| c.set(0));
        let got = ex.extract(&RequestParts {
            headers: &headers,
            query: None,
            captures: &[("sku", "p1")],
            body: Some(b"not json"),
        });
        assert!(got.is_ok(), "{got:?}");
        assert_eq!(BODY_PARSES.with(|c| c.get()), 0);
    }

    #[test]
    fn needs_body_when_any_field_reads_json() {
        let needs = |user, sku, q| {
            Extractor::with_lookup(&rule(user, sku, q), test_env)
                .expect("extractor")
                .needs_body()
        };
        assert!(!needs(
            hdr("x-user-id"),
            path("sku"),
            qty(Some(query("n")), 1, 5)
        ));
        assert!(!needs(jwt("sub"), cookie("sku"), qty(None, 1, 5)));
        assert!(needs(json("uid"), path("sku"), qty(None, 1, 5)));
        assert!(needs(hdr("x-user-id"), json("sku"), qty(None, 1, 5)));
        assert!(needs(
            hdr("x-user-id"),
            path("sku"),
            qty(Some(json("qty")), 1, 5)
        ));
    }

    #[test]
    fn new_fails_when_secret_env_is_unset() {
        let var = "SLUICE_TEST_EXTRACT_UNSET_5B1E";
        let r = rule(
            FieldSource::Jwt {
                header: AUTHORIZATION,
                claim: "sub".into(),
                secret_env: var.into(),
            },
            path("sku"),
            qty(None, 1, 5),
        );
        let e = Extractor::new(&r).expect_err("secret is unset");
        let msg = e.to_string();
        assert!(msg.contains("test-rule") && msg.contains(var), "{msg}");
        assert_eq!(
            msg,
            "rule \"test-rule\": user.jwt.secret_env: environment variable \
             SLUICE_TEST_EXTRACT_UNSET_5B1E is unset or empty"
        );
    }

    #[test]
    fn new_fails_when_secret_env_is_empty() {
        let var = "SLUICE_TEST_EXTRACT_EMPTY_9C42";
        std::env::set_var(var, "");
        let r = rule(
            FieldSource::Jwt {
                header: AUTHORIZATION,
                claim: "sub".into(),
                secret_env: var.into(),
            },
            path("sku"),
            qty(None, 1, 5),
        );
        let msg = Extractor::new(&r).expect_err("secret is empty").to_string();
        assert!(msg.contains("test-rule") && msg.contains(var), "{msg}");
    }

    #[test]
    fn new_reads_the_secret_from_the_environment() {
        let var = "SLUICE_TEST_EXTRACT_SET_3D77";
        std::env::set_var(var, "env-secret");
        let r = rule(
            FieldSource::Jwt {
                header: AUTHORIZATION,
                claim: "sub".into(),
                secret_env: var.into(),
            },
            path("sku"),
            qty(None, 1, 5),
        );
        let ex = Extractor::new(&r).expect("secret is set");
        // The secret is read once: later changes do not affect this extractor.
        std::env::set_var(var, "changed");
        let mut headers = HeaderMap::new();
        let t = token(r#"{"alg":"HS256"}"#, r#"{"sub":"u-env"}"#, b"env-secret");
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&t).expect("token"));
        let got = ex.extract(&RequestParts {
            headers: &headers,
            query: None,
            captures: &[("sku", "p1")],
            body: None,
        });
        assert_eq!(got.map(|a| a.user), Ok("u-env".to_string()));
        assert!(
            !format!("{ex:?}").contains("env-secret"),
            "Debug must redact secrets"
        );
    }

    #[test]
    fn valid_id_bounds() {
        assert!(valid_id("a"));
        assert!(valid_id("Az09._:-"));
        assert!(valid_id(&"x".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(129)));
        for bad in [
            "a b", "a/b", "a%b", "a+b", "é", "a\0", "a\n", "<script>", "a,b",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("plain", true).as_deref(), Some("plain"));
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%3a%3A", true).as_deref(), Some("::"));
        assert_eq!(percent_decode("%C3%A9", true).as_deref(), Some("é"));
        assert_eq!(percent_decode("%", true), None);
        assert_eq!(percent_decode("%4", true), None);
        assert_eq!(percent_decode("%g0", true), None);
        assert_eq!(percent_decode("%ff", true), None);
    }

    #[test]
    fn shown_cuts_long_values() {
        assert_eq!(shown("ab\"c"), r#""ab\"c""#);
        let long = "é".repeat(50);
        assert_eq!(shown(&long), format!("{:?}...", "é".repeat(40)));
    }
}
