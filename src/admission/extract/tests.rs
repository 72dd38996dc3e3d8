//! The extraction table: one row per case, then the properties a table
//! cannot show (parse counts, redaction, helpers).

use std::path::PathBuf;
use std::time::Duration;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::Mac;
use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue};

use super::jwt::HmacSha256;
use super::syntax::percent_decode;
use super::*;
use crate::rules::{
    OtherMethods, PathTemplate, QuantitySpec, QueueSpec, ReleaseOn, Responses, Secret, Window,
};
use crate::vocab::UpstreamId;

const SECRET_ENV: &str = "T_SECRET";
const SECRET: &[u8] = b"s3cret-for-tests";

fn rule(user: FieldSource, sku: FieldSource, quantity: QuantitySpec) -> Rule {
    Rule {
        name: "test-rule".into(),
        method: http::Method::POST,
        path: PathTemplate::parse("/api/{sku}/order").expect("template"),
        other_methods: OtherMethods::Refuse,
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
            max_queue_time: Duration::from_secs(300),
        },
        release_on: ReleaseOn::default(),
        on_failure: None,
        responses: Responses::default(),
        origin: (PathBuf::from("rules.yaml"), 1),
    }
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
        secret: Secret::new(SECRET),
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
const CONN_USER: &str = r#"Connection: must not name "x-user-id": the gateway decides on it and the backend must see it"#;

fn run(c: &Case) -> Result<Attempt, String> {
    let r = rule(c.user.clone(), c.sku.clone(), c.qty.clone());
    let ex = Extractor::new(&r);
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
        // Issue 8 (case 5): a second value used to be ignored ("first value
        // wins") while many backends read the last; now it is refused.
        Case {
            name: "header twice is invalid",
            headers: vec![h("x-user-id", "u1"), h("x-user-id", "u2")],
            want: err(r#"user: header "x-user-id" sent more than once"#),
            ..base()
        },
        Case {
            name: "header twice with the same value is invalid too",
            headers: vec![h("x-user-id", "u1"), h("x-user-id", "u1")],
            want: err(r#"user: header "x-user-id" sent more than once"#),
            ..base()
        },
        Case {
            name: "header also spelled with _ (CGI reads it alike) is invalid",
            headers: vec![h("x-user-id", "u1"), h("x_user_id", "u2")],
            want: err(r#"user: header "x-user-id" sent more than once"#),
            ..base()
        },
        Case {
            name: "header spelled only with _ is missing",
            headers: vec![h("x_user_id", "u2")],
            want: err(r#"user: missing header "x-user-id""#),
            ..base()
        },
        Case {
            name: "header: a comma-joined list is not an id",
            headers: vec![h("x-user-id", "u1,u2")],
            want: err(r#"user: "u1,u2" must be 1-128 characters of A-Z a-z 0-9 . _ : -"#),
            ..base()
        },
        Case {
            name: "header: a comma-joined list with a space is not visible ASCII",
            headers: vec![h("x-user-id", "u1, u2")],
            want: err(r#"user: header "x-user-id" must be visible ASCII"#),
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
            name: "cookie: exact name, among several Cookie headers",
            user: cookie("uid"),
            headers: vec![h("cookie", "xuid=no; uidx=no"), h("cookie", "uid=u8")],
            want: ok("u8", "p1", 1),
            ..base()
        },
        // Issue 8 (case 5): this row used to pin "first wins" (u8).
        Case {
            name: "cookie twice across Cookie headers is invalid",
            user: cookie("uid"),
            headers: vec![
                h("cookie", "xuid=no; uidx=no"),
                h("cookie", "uid=u8"),
                h("cookie", "uid=u9"),
            ],
            want: err(r#"user: cookie "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "cookie twice in one Cookie header is invalid",
            user: cookie("uid"),
            headers: vec![h("cookie", "uid=u8; a=1; uid=u8")],
            want: err(r#"user: cookie "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "cookie also under a name PHP reads alike is invalid",
            user: cookie("u_id"),
            headers: vec![h("cookie", "u_id=u8; u.id=u9")],
            want: err(r#"user: cookie "u_id" sent more than once"#),
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
        // Issue 8 (case 5): this row used to pin "first occurrence wins".
        Case {
            name: "query parameter twice is invalid",
            user: query("uid"),
            query: Some("uid=first&uid=second"),
            want: err(r#"user: query parameter "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "query: the same key plain and encoded is twice",
            user: query("uid"),
            query: Some("uid=a&u%69d=b"),
            want: err(r#"user: query parameter "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "query: a PHP array of the same name is twice",
            user: query("uid"),
            query: Some("uid=a&uid[]=b"),
            want: err(r#"user: query parameter "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "query: a name PHP reads alike (. for _) is twice",
            user: query("user_id"),
            query: Some("user_id=a&user.id=b"),
            want: err(r#"user: query parameter "user_id" sent more than once"#),
            ..base()
        },
        Case {
            name: "query: a longer name is another parameter",
            user: query("uid"),
            query: Some("uid=a&uidx=b&xuid=c&uid_=d"),
            want: ok("a", "p1", 1),
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
            name: "json user twice is invalid",
            user: json("uid"),
            body: Some(r#"{"uid":"u4","qty":1,"uid":"admin"}"#),
            want: err(r#"user: JSON field "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "json user twice, once escaped, is invalid",
            user: json("uid"),
            body: Some(r#"{"uid":"u4","u\u0069d":"admin"}"#),
            want: err(r#"user: JSON field "uid" sent more than once"#),
            ..base()
        },
        Case {
            name: "json: another key twice does not matter",
            user: json("uid"),
            body: Some(r#"{"note":"a","uid":"u4","note":"b"}"#),
            want: ok("u4", "p1", 1),
            ..base()
        },
        Case {
            name: "json: a nested key of the same name is not the field",
            user: json("uid"),
            body: Some(r#"{"uid":"u4","extra":{"uid":"x","uid":"y"}}"#),
            want: ok("u4", "p1", 1),
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
            name: "header sku twice is invalid",
            sku: hdr("x-sku"),
            headers: vec![h("x-user-id", "u1"), h("x-sku", "S.9"), h("x-sku", "S.1")],
            want: err(r#"sku: header "x-sku" sent more than once"#),
            ..base()
        },
        Case {
            name: "query sku twice is invalid",
            sku: query("sku"),
            query: Some("sku=a&sku=b"),
            want: err(r#"sku: query parameter "sku" sent more than once"#),
            ..base()
        },
        Case {
            name: "json sku twice is invalid",
            sku: json("sku"),
            body: Some(r#"{"sku":"p-7","sku":"p-8"}"#),
            want: err(r#"sku: JSON field "sku" sent more than once"#),
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
            name: "qty header twice is invalid",
            qty: qty(Some(hdr("x-qty")), 1, 5),
            headers: vec![h("x-user-id", "u1"), h("x-qty", "1"), h("x-qty", "5")],
            want: err(r#"quantity: header "x-qty" sent more than once"#),
            ..base()
        },
        Case {
            name: "qty header comma list is not a number",
            qty: qty(Some(hdr("x-qty")), 1, 5),
            headers: vec![h("x-user-id", "u1"), h("x-qty", "1,5")],
            want: err(WHOLE_5),
            ..base()
        },
        Case {
            name: "qty json twice is invalid",
            qty: qty(Some(json("qty")), 1, 5),
            body: Some(r#"{"qty":1,"qty":5}"#),
            want: err(r#"quantity: JSON field "qty" sent more than once"#),
            ..base()
        },
        Case {
            name: "qty query twice is invalid",
            qty: qty(Some(query("n")), 1, 5),
            query: Some("n=1&n=5"),
            want: err(r#"quantity: query parameter "n" sent more than once"#),
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
            name: "jwt header twice is invalid",
            user: jwt("sub"),
            headers: vec![
                h("authorization", hs256(r#"{"sub":"u1"}"#)),
                h("authorization", hs256(r#"{"sub":"admin"}"#)),
            ],
            want: err(r#"user: header "authorization" sent more than once"#),
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
        // --- Connection must not drop what the decision rests on ---
        Case {
            name: "Connection: keep-alive and close are fine",
            headers: vec![h("x-user-id", "u1"), h("connection", "keep-alive, close")],
            ..base()
        },
        Case {
            name: "Connection naming the user header",
            headers: vec![
                h("x-user-id", "u1"),
                h("connection", "keep-alive, X-User-Id"),
            ],
            want: err(CONN_USER),
            ..base()
        },
        Case {
            name: "Connection naming the user header in a second Connection line",
            headers: vec![
                h("x-user-id", "u1"),
                h("connection", "keep-alive"),
                h("connection", "x-user-id"),
            ],
            want: err(CONN_USER),
            ..base()
        },
        Case {
            name: "Connection naming the user header spelled with _",
            headers: vec![h("x-user-id", "u1"), h("connection", "x_user_id")],
            want: err(
                r#"Connection: must not name "x_user_id": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming a quoted header is not a token",
            headers: vec![h("x-user-id", "u1"), h("connection", r#""x-user-id""#)],
            want: err(r#"Connection: "\"x-user-id\"" is not a header name"#),
            ..base()
        },
        Case {
            name: "Connection naming the quantity header",
            qty: qty(Some(hdr("x-qty")), 1, 5),
            headers: vec![
                h("x-user-id", "u1"),
                h("x-qty", "2"),
                h("connection", "x-qty"),
            ],
            want: err(
                r#"Connection: must not name "x-qty": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming Cookie when a cookie is read",
            user: cookie("uid"),
            headers: vec![h("cookie", "uid=u1"), h("connection", "cookie")],
            want: err(
                r#"Connection: must not name "cookie": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming Cookie when no cookie is read is fine",
            headers: vec![h("x-user-id", "u1"), h("connection", "cookie")],
            ..base()
        },
        Case {
            name: "Connection naming the token header",
            user: jwt("sub"),
            headers: vec![
                h("authorization", hs256(r#"{"sub":"u1"}"#)),
                h("connection", "Authorization"),
            ],
            want: err(
                r#"Connection: must not name "authorization": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming Idempotency-Key",
            headers: vec![h("x-user-id", "u1"), h("connection", "idempotency-key")],
            want: err(
                r#"Connection: must not name "idempotency-key": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming X-Forwarded-For",
            headers: vec![h("x-user-id", "u1"), h("connection", "x-forwarded-for")],
            want: err(
                r#"Connection: must not name "x-forwarded-for": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming Content-Length",
            headers: vec![h("x-user-id", "u1"), h("connection", "Content-Length")],
            want: err(
                r#"Connection: must not name "content-length": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming Host",
            headers: vec![h("x-user-id", "u1"), h("connection", "host")],
            want: err(
                r#"Connection: must not name "host": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming one of our headers",
            headers: vec![h("x-user-id", "u1"), h("connection", "x-sluice-ticket")],
            want: err(
                r#"Connection: must not name "x-sluice-ticket": the gateway decides on it and the backend must see it"#,
            ),
            ..base()
        },
        Case {
            name: "Connection naming an unrelated header is fine",
            headers: vec![h("x-user-id", "u1"), h("connection", "x-trace")],
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
    let ex = Extractor::new(&rule(hdr("x-user-id"), path("sku"), qty(None, 1, 5)));
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
    let ex = Extractor::new(&rule(
        json("uid"),
        json("sku"),
        qty(Some(json("qty")), 1, 5),
    ));
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
    let ex = Extractor::new(&rule(hdr("x-user-id"), path("sku"), qty(None, 1, 5)));
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
    let needs = |user, sku, q| Extractor::new(&rule(user, sku, q)).needs_body();
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

#[test]
fn names_are_matched_as_backends_read_them() {
    use super::syntax::{reads_as, same_to_cgi};
    assert!(reads_as(b"uid", "uid"));
    assert!(reads_as(b"uid[]", "uid"));
    assert!(reads_as(b"uid[a]", "uid"));
    assert!(reads_as(b"user.id", "user_id"));
    assert!(reads_as(b"user id", "user_id"));
    assert!(reads_as(b"user[id", "user_id"));
    assert!(!reads_as(b"uidx", "uid"));
    assert!(!reads_as(b"xuid", "uid"));
    assert!(!reads_as(b"uid_", "uid"));
    assert!(
        !reads_as(b"user_id", "user.id"),
        "only _ in the name is loose"
    );
    assert!(!reads_as(b"", "uid"));
    assert!(same_to_cgi("x_user_id", "x-user-id"));
    assert!(same_to_cgi("x-user-id", "x-user-id"));
    assert!(!same_to_cgi("x-user-ids", "x-user-id"));
    assert!(!same_to_cgi("x.user.id", "x-user-id"));
}
