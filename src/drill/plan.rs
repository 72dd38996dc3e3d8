//! What the drill sends: the order request, built from a rule (its method,
//! path template, and where user, sku and quantity come from: header,
//! cookie, query, JSON body, path capture, or a signed JWT claim) or from
//! `--method/--path/--header/--body`; and the optional browse request.
//! Flags given beside a rule override its method, path and body and add
//! (or replace) headers.
//!
//! Each request is compiled into [`Template`]s once and rendered per
//! request into reused buffers.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use super::template::{Piece, Template, Vars};
use super::DrillError;
use crate::rules::{FieldSource, Rule};
use crate::vocab::valid_id;

/// Query names are written with everything but unreserved characters escaped.
const QUERY_NAME: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Tokens the drill signs are valid this long (the gateway honours `exp`).
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// One request shape.
#[derive(Clone, Debug)]
pub struct RequestPlan {
    /// The method, as sent.
    pub method: String,
    /// Path and query.
    pub target: Template,
    /// `(name, value)` header lines besides Host and Content-Length.
    pub headers: Vec<(String, Template)>,
    /// The body, if any.
    pub body: Option<Template>,
}

impl RequestPlan {
    /// Renders the whole request into `out` (the body via `scratch`).
    pub fn render(&self, host: &str, v: &Vars<'_>, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        out.clear();
        scratch.clear();
        if let Some(b) = &self.body {
            b.render(v, scratch);
        }
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        self.target.render(v, out);
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            value.render(v, out);
            out.extend_from_slice(b"\r\n");
        }
        let framed =
            self.body.is_some() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH");
        if framed {
            use std::io::Write as _;
            let _ = write!(out, "Content-Length: {}\r\n", scratch.len());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(scratch);
    }

    /// Whether any part uses a placeholder.
    pub fn uses(&self, piece: &Piece) -> bool {
        self.target.uses(piece)
            || self.headers.iter().any(|(_, v)| v.uses(piece))
            || self.body.as_ref().is_some_and(|b| b.uses(piece))
    }
}

/// Signs the HS256 token a rule reads its user (and maybe quantity) from.
#[derive(Clone)]
pub struct Signer {
    key: Hmac<Sha256>,
    /// The claims as JSON: the user (and maybe quantity) and `exp`.
    payload: Template,
    /// The encoded JOSE header, with the dot.
    head: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl Signer {
    fn new(secret: &[u8], claims: Vec<(String, Piece)>) -> Result<Self, DrillError> {
        let key = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|e| DrillError::Rule(format!("cannot key the token signer: {e}")))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        head.push('.');
        let mut payload = Template::default();
        payload.lit("{");
        for (claim, piece) in &claims {
            payload.lit(&json_string(claim));
            payload.lit(":");
            if *piece == Piece::Qty {
                payload.push(Piece::Qty);
            } else {
                payload.lit("\"");
                payload.push(piece.clone());
                payload.lit("\"");
            }
            payload.lit(",");
        }
        payload.lit(&format!("\"exp\":{}}}", now + TOKEN_LIFETIME_SECS));
        Ok(Self { key, payload, head })
    }

    /// Writes the user's signed token into `out` (cleared first).
    pub fn sign(&self, v: &Vars<'_>, out: &mut String) {
        let mut json = Vec::with_capacity(96);
        self.payload.render(v, &mut json);
        out.clear();
        out.push_str(&self.head);
        URL_SAFE_NO_PAD.encode_string(&json, out);
        let mut mac = self.key.clone();
        mac.update(out.as_bytes());
        let signature = mac.finalize().into_bytes();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, out);
    }
}

/// Everything the drill sends.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The order attempt.
    pub order: RequestPlan,
    /// The product-page GET, when browsing is mixed in.
    pub browse: Option<RequestPlan>,
    /// The Host header.
    pub host: String,
    /// Units each order asks for.
    pub quantity: u32,
    /// Signs tokens when the rule reads a JWT.
    pub signer: Option<Signer>,
    /// User ids are this plus the user's number.
    pub user_prefix: String,
    /// The skus; user `i` buys `skus[(i - 1) % len]`. One empty entry when
    /// no request names a sku.
    pub skus: Vec<String>,
}

/// The flags that shape requests.
pub struct Shape<'a> {
    /// `--method`.
    pub method: Option<&'a str>,
    /// `--path`.
    pub path: Option<&'a str>,
    /// `--header`.
    pub headers: &'a [String],
    /// `--body`.
    pub body: Option<&'a str>,
    /// `--quantity`.
    pub quantity: Option<u32>,
    /// `--browse-path`.
    pub browse_path: Option<&'a str>,
    /// `--sku`.
    pub skus: &'a [String],
    /// `--user-prefix`.
    pub user_prefix: &'a str,
    /// `--users`.
    pub users: u64,
    /// The Host header.
    pub host: String,
}

fn flag(flag: &'static str, message: impl Into<String>) -> DrillError {
    DrillError::Flag {
        flag,
        message: message.into(),
    }
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Builds the plan from the rule (if any) and the flags.
pub fn build(rule: Option<&Rule>, shape: &Shape<'_>) -> Result<Plan, DrillError> {
    let (mut order, signer) = match rule {
        Some(r) => from_rule(r, shape.path.is_some())?,
        None => (
            RequestPlan {
                method: String::new(),
                target: Template::default(),
                headers: Vec::new(),
                body: None,
            },
            None,
        ),
    };
    if let Some(m) = shape.method {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(flag("--method", format!("{m:?} is not an HTTP method")));
        }
        order.method = m.to_string();
    }
    if let Some(p) = shape.path {
        order.target = parse_target("--path", p)?;
    }
    if let Some(b) = shape.body {
        order.body = Some(Template::parse(b));
    }
    for h in shape.headers {
        let (name, value) = parse_header(h)?;
        order
            .headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        order.headers.push((name, value));
    }
    if order.target.is_empty() {
        return Err(flag(
            "--path",
            "no request to send: give --config and --rule to build it from a rule, or --path (with --method, --header, --body)",
        ));
    }
    if order.method.is_empty() {
        order.method = if order.body.is_some() { "POST" } else { "GET" }.to_string();
    }
    let quantity = quantity(rule, shape.quantity)?;
    let browse = match shape.browse_path {
        Some(p) => Some(RequestPlan {
            method: "GET".to_string(),
            target: parse_target("--browse-path", p)?,
            headers: Vec::new(),
            body: None,
        }),
        None => None,
    };
    let last_user = format!("{}{}", shape.user_prefix, shape.users);
    if !valid_id(&last_user) {
        return Err(flag(
            "--user-prefix",
            format!("user ids like {last_user:?} must be 1-128 characters of A-Z a-z 0-9 . _ : -"),
        ));
    }
    for sku in shape.skus {
        if !valid_id(sku) {
            return Err(flag(
                "--sku",
                format!("{sku:?} must be 1-128 characters of A-Z a-z 0-9 . _ : -"),
            ));
        }
    }
    let uses_sku = order.uses(&Piece::Sku) || browse.as_ref().is_some_and(|b| b.uses(&Piece::Sku));
    let skus = if shape.skus.is_empty() {
        if uses_sku {
            return Err(flag(
                "--sku",
                "the request names a sku (the rule's sku source, or {sku} in a flag): give one or more --sku",
            ));
        }
        vec![String::new()]
    } else {
        shape.skus.to_vec()
    };
    Ok(Plan {
        order,
        browse,
        host: shape.host.clone(),
        quantity,
        signer,
        user_prefix: shape.user_prefix.to_string(),
        skus,
    })
}

/// The quantity sent: `--quantity`, else the rule's default, else 1.
fn quantity(rule: Option<&Rule>, asked: Option<u32>) -> Result<u32, DrillError> {
    let Some(rule) = rule else {
        return Ok(asked.unwrap_or(1));
    };
    let spec = &rule.quantity;
    let q = asked.unwrap_or(spec.default);
    if q == 0 || q > spec.max {
        return Err(flag(
            "--quantity",
            format!(
                "{q} is outside the rule {}'s quantity range 1..={}",
                rule.name, spec.max
            ),
        ));
    }
    if spec.source.is_none() && q != spec.default {
        return Err(flag(
            "--quantity",
            format!(
                "the rule {} reads no quantity from the request (always {})",
                rule.name, spec.default
            ),
        ));
    }
    Ok(q)
}

/// A path (and query) from a flag: must start with `/` and hold no
/// whitespace or control characters.
fn parse_target(name: &'static str, text: &str) -> Result<Template, DrillError> {
    if !text.starts_with('/') {
        return Err(flag(name, format!("{text:?} must start with '/'")));
    }
    if text
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(flag(
            name,
            format!("{text:?} holds a space or a control character (escape it as %20)"),
        ));
    }
    Ok(Template::parse(text))
}

/// `Name: value` from `--header`.
fn parse_header(text: &str) -> Result<(String, Template), DrillError> {
    let Some((name, value)) = text.split_once(':') else {
        return Err(flag("--header", format!("{text:?} is not \"Name: value\"")));
    };
    let name = name.trim();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(flag("--header", format!("{name:?} is not a header name")));
    }
    if ["host", "content-length", "transfer-encoding"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
    {
        return Err(flag(
            "--header",
            format!("{name} is set by the drill itself"),
        ));
    }
    let value = value.trim();
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(flag(
            "--header",
            format!("the value of {name} holds a line break"),
        ));
    }
    Ok((name.to_string(), Template::parse(value)))
}

/// The token a rule reads: its header, secret, and `(claim, value)`s.
type Token<'r> = (&'r http::HeaderName, &'r [u8], Vec<(String, Piece)>);

/// The order request a rule expects, and its token signer when it reads a
/// JWT; without its path when `own_path` (`--path` replaces it).
fn from_rule(rule: &Rule, own_path: bool) -> Result<(RequestPlan, Option<Signer>), DrillError> {
    let mut captures: Vec<(&str, Piece)> = Vec::new();
    let mut query: Vec<(&str, Piece)> = Vec::new();
    let mut cookies: Vec<(&str, Piece)> = Vec::new();
    let mut json: Vec<(&str, Piece)> = Vec::new();
    let mut headers: Vec<(String, Template)> = Vec::new();
    let mut jwt: Option<Token<'_>> = None;
    let sources = [
        (Some(&rule.user), Piece::User),
        (Some(&rule.sku), Piece::Sku),
        (rule.quantity.source.as_ref(), Piece::Qty),
    ];
    for (source, piece) in sources {
        let Some(source) = source else { continue };
        match source {
            FieldSource::Header(h) => {
                let mut t = Template::default();
                t.push(piece);
                headers.push((h.as_str().to_string(), t));
            }
            FieldSource::Cookie(n) => cookies.push((n, piece)),
            FieldSource::Query(n) => query.push((n, piece)),
            FieldSource::Path(c) => captures.push((c, piece)),
            FieldSource::Json(f) => json.push((f, piece)),
            FieldSource::Jwt {
                header,
                claim,
                secret,
                ..
            } => match &mut jwt {
                None => jwt = Some((header, secret.bytes(), vec![(claim.clone(), piece)])),
                Some((h, s, claims)) if *h == header && *s == secret.bytes() => {
                    claims.push((claim.clone(), piece));
                }
                Some(_) => {
                    return Err(DrillError::Rule(format!(
                        "the rule {} reads two different tokens; the drill signs one: give the request with --header",
                        rule.name
                    )))
                }
            },
        }
    }
    let mut target = Template::default();
    let text = rule.path.as_str();
    for (i, seg) in text.split('/').enumerate() {
        if i > 0 {
            target.lit("/");
        }
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => match captures.iter().find(|(c, _)| *c == name) {
                Some((_, piece)) => target.push(piece.clone()),
                None if own_path => {}
                None => {
                    return Err(DrillError::Rule(format!(
                        "the rule {}'s path {text} has a capture {{{name}}} that is not the user, the sku or the quantity: give the request with --path",
                        rule.name
                    )))
                }
            },
            None => target.lit(seg),
        }
    }
    for (i, (name, piece)) in query.iter().enumerate() {
        target.lit(if i == 0 { "?" } else { "&" });
        target.lit(&utf8_percent_encode(name, QUERY_NAME).to_string());
        target.lit("=");
        target.push(piece.clone());
    }
    if !cookies.is_empty() {
        // One Cookie header: the gateway refuses a field sent twice.
        let mut t = Template::default();
        for (i, (name, piece)) in cookies.iter().enumerate() {
            if i > 0 {
                t.lit("; ");
            }
            t.lit(name);
            t.lit("=");
            t.push(piece.clone());
        }
        headers.push(("Cookie".to_string(), t));
    }
    let body = if json.is_empty() {
        None
    } else {
        let mut t = Template::default();
        t.lit("{");
        for (i, (field, piece)) in json.iter().enumerate() {
            if i > 0 {
                t.lit(",");
            }
            t.lit(&json_string(field));
            t.lit(":");
            // A quantity is a JSON number; ids are strings.
            if *piece == Piece::Qty {
                t.push(Piece::Qty);
            } else {
                t.lit("\"");
                t.push(piece.clone());
                t.lit("\"");
            }
        }
        t.lit("}");
        let mut ct = Template::default();
        ct.lit("application/json");
        headers.push(("Content-Type".to_string(), ct));
        Some(t)
    };
    let signer = match jwt {
        Some((header, secret, claims)) => {
            let mut t = Template::default();
            t.lit("Bearer ");
            t.push(Piece::Token);
            headers.push((header.as_str().to_string(), t));
            Some(Signer::new(secret, claims)?)
        }
        None => None,
    };
    Ok((
        RequestPlan {
            method: rule.method.as_str().to_string(),
            target,
            headers,
            body,
        },
        signer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(token: &'a str) -> Vars<'a> {
        Vars {
            user_prefix: "u",
            user: 3,
            sku: "p1",
            n: 9,
            qty: 1,
            token,
        }
    }

    fn shape<'a>(headers: &'a [String], skus: &'a [String]) -> Shape<'a> {
        Shape {
            method: Some("POST"),
            path: Some("/buy/{sku}?n={n}"),
            headers,
            body: Some(r#"{"user":"{user}"}"#),
            quantity: None,
            browse_path: None,
            skus,
            user_prefix: "u",
            users: 10,
            host: "127.0.0.1:8080".into(),
        }
    }

    #[test]
    fn flags_render_a_whole_request() {
        let headers = vec!["X-User-Id: {user}".to_string()];
        let skus = vec!["p1".to_string()];
        let plan = build(None, &shape(&headers, &skus)).expect("plan");
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        plan.order
            .render(&plan.host, &vars(""), &mut out, &mut scratch);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "POST /buy/p1?n=9 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-User-Id: u3\r\nContent-Length: 13\r\n\r\n{\"user\":\"u3\"}"
        );
    }

    #[test]
    fn bad_flags_name_themselves() {
        let skus = vec!["p1".to_string()];
        let bad = vec!["no colon".to_string()];
        let e = build(None, &shape(&bad, &skus)).expect_err("bad header");
        assert!(e.to_string().starts_with("--header:"), "{e}");
        let e = build(None, &shape(&[], &[])).expect_err("no sku");
        assert!(e.to_string().starts_with("--sku:"), "{e}");
        let bad_sku = vec!["a b".to_string()];
        let e = build(None, &shape(&[], &bad_sku)).expect_err("bad sku");
        assert!(e.to_string().starts_with("--sku:"), "{e}");
    }

    #[test]
    fn signed_tokens_verify_with_the_secret() {
        let signer = Signer::new(b"s3cret", vec![("sub".into(), Piece::User)]).expect("signer");
        let mut token = String::new();
        signer.sign(&vars(""), &mut token);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").expect("key");
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        mac.verify_slice(&sig).expect("signature");
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(payload["sub"], "u3");
    }
}
