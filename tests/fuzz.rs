//! Property tests (proptest) over what operators and clients control:
//! loading a config never panics, whatever the files hold (random bytes,
//! YAML of the wrong shapes under the real keys, small edits of the full
//! good config and its rules), and a config that loads has every value in
//! range; extracting user, sku and quantity never panics on any headers,
//! query, captures or body (signed JWTs with any claims included), and
//! whatever it accepts is a valid id and a quantity within the rule's max.
//!
//! Bounded for CI: a few hundred cases per property (a few seconds in
//! all); `PROPTEST_CASES=N` runs N per property for a longer hunt.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};
use sha2::Sha256;

use sluice::admission::extract::{Extractor, RequestParts};
use sluice::config::Config;
use sluice::vocab::valid_id;

/// Cases per property: `PROPTEST_CASES`, or `default`.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // A failure prints its minimal input; no files are written into
        // the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The secrets the good fixture's JWT rules name.
const SECRET: &str = "fixture-secret";

fn env(name: &str) -> Option<std::ffi::OsString> {
    // SLUICE_LOG_KEY: the good fixture's access-log hash key.
    matches!(
        name,
        "SHOP_JWT_SECRET" | "SLUICE_JWT_SECRET" | "SLUICE_LOG_KEY"
    )
    .then(|| SECRET.into())
}

/// Writes `gateway` (and `rules/r.yaml` if given) into a fresh temp dir
/// and loads it. Must not panic; a loaded config is checked for sanity.
fn load(gateway: &[u8], rules: Option<&[u8]>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, gateway).expect("write gateway.yaml");
    if let Some(rules) = rules {
        std::fs::create_dir_all(dir.path().join("rules")).expect("rules dir");
        std::fs::write(dir.path().join("rules/r.yaml"), rules).expect("write rule file");
    }
    match sluice::config::load_with_env(&path, &env) {
        Ok(config) => check_loaded(&config),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a problem");
            for e in &errors.0 {
                assert!(e.line >= 1 && e.column >= 1, "{e}");
                assert!(!e.message.is_empty(), "{e}");
            }
        }
    }
}

/// What validation promises of a config that loads.
fn check_loaded(c: &Config) {
    assert!(!c.upstreams.is_empty());
    assert!(c.default_upstream.0 < c.upstreams.len());
    for u in &c.upstreams {
        assert!(!u.servers.is_empty() && u.max_inflight > 0, "{u:?}");
        assert!(!u.connect_timeout.is_zero() && !u.read_timeout.is_zero());
    }
    assert!(c.threads > 0);
    assert!(c.limits.max_header_bytes > 0 && c.limits.max_body_bytes > 0);
    assert!(!c.limits.header_timeout.is_zero() && !c.limits.keepalive_timeout.is_zero());
    assert_ne!(c.limits.max_connections, Some(0));
    for r in c.rules.rules() {
        assert!(r.upstream.0 < c.upstreams.len());
        assert!(r.quantity.default >= 1 && r.quantity.default <= r.quantity.max);
    }
}

/// Keys of `gateway.yaml` and rule files, so random documents reach past
/// "unknown field" into each key's own checks.
const KEYS: &[&str] = &[
    "listen",
    "admin",
    "token_env",
    "allow_remote_without_token",
    "store",
    "backend",
    "redis",
    "url",
    "key_prefix",
    "timeout",
    "on_failure",
    "pass_cap",
    "recheck_interval",
    "result_ttl",
    "upstreams",
    "mall",
    "servers",
    "max_inflight",
    "connect_timeout",
    "read_timeout",
    "write_timeout",
    "idle_timeout",
    "health_check",
    "path",
    "interval",
    "failures",
    "successes",
    "queue_claim_idle",
    "default_upstream",
    "rules",
    "trusted_proxies",
    "limits",
    "max_header_bytes",
    "max_rule_body_bytes",
    "max_body_bytes",
    "max_connections",
    "header_timeout",
    "keepalive_timeout",
    "shutdown",
    "grace_period",
    "threads",
    "h2c",
    "name",
    "match",
    "method",
    "user",
    "sku",
    "quantity",
    "header",
    "cookie",
    "query",
    "json",
    "jwt",
    "claim",
    "secret_env",
    "default",
    "max",
    "window",
    "start",
    "end",
    "rate_limits",
    "key",
    "rate",
    "per",
    "burst",
    "dedup",
    "ttl",
    "stock",
    "per_user_limit",
    "admission",
    "upstream",
    "queue",
    "max_wait",
    "capacity",
    "release_on",
    "responses",
    "sold_out",
    "status",
    "headers",
    "body",
];

/// Scalars that look like what the keys want, and some that almost do.
const SCALARS: &[&str] = &[
    "127.0.0.1:8080",
    "0.0.0.0:9901",
    "[::1]:80",
    "localhost:80",
    "10.0.0.0/8",
    "1s",
    "250ms",
    "0s",
    "10m",
    "1h",
    "5 sec",
    "-1s",
    "64KiB",
    "16MiB",
    "1GiB",
    "8 MB",
    "memory",
    "redis",
    "fail_closed",
    "pass_capped",
    "redis://127.0.0.1:6379/0",
    "rediss://a:b@h/1",
    "http://x",
    "/api/{sku}/order",
    "/{a}/{a}",
    "/x/{",
    "POST",
    "post",
    "GET",
    "X-User-Id",
    "sku",
    "qty",
    "ip",
    "user",
    "rule",
    "connect_error",
    "5xx",
    "2026-11-11T00:00:00+08:00",
    "2026-13-45",
    "SLUICE_ADMIN_TOKEN",
    "SHOP_JWT_SECRET",
    "mall",
    "none",
    "lua-free-rules/*.yaml",
    "*",
    "[",
    "{sku}",
    "",
    " ",
    "~",
    "null",
    "yes",
    "0x10",
    "1e400",
    "\u{0}",
    "é",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(KEYS).prop_map(str::to_string),
        1 => "[a-zA-Z_]{0,12}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => select(SCALARS).prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        2 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => ".{0,16}".prop_map(Value::from),
    ]
}

/// Nested maps, lists and scalars under real and random keys.
fn yaml_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A top-level mapping that often has the required keys right, so the
/// nested values get checked.
fn gateway_doc() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        prop::collection::vec((key(), yaml_value()), 0..8),
    )
        .prop_map(|(base, extra)| {
            let mut doc = if base {
                json!({
                    "listen": "127.0.0.1:8080",
                    "upstreams": {"mall": {"servers": ["127.0.0.1:8000"]}},
                    "default_upstream": "mall",
                    "rules": "rules/*.yaml",
                })
            } else {
                json!({})
            };
            if let Value::Object(map) = &mut doc {
                map.extend(extra);
            }
            doc
        })
}

/// A rule file: `rules:` and a list of random rule mappings.
fn rule_doc() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (
            any::<bool>(),
            prop::collection::vec((key(), yaml_value()), 0..8),
        )
            .prop_map(|(base, extra)| {
                let mut rule = if base {
                    json!({
                        "name": "r",
                        "match": {"method": "POST", "path": "/api/{sku}/order"},
                        "user": {"header": "X-User-Id"},
                        "sku": {"path": "sku"},
                    })
                } else {
                    json!({})
                };
                if let Value::Object(map) = &mut rule {
                    map.extend(extra);
                }
                rule
            }),
        0..3,
    )
    .prop_map(|rules| json!({ "rules": rules }))
}

/// The document as YAML text: block style, or JSON (YAML's flow style).
fn render(doc: &Value, block: bool) -> Vec<u8> {
    if block {
        if let Ok(text) = serde_saphyr::to_string(doc) {
            return text.into_bytes();
        }
    }
    doc.to_string().into_bytes()
}

fn fixture(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One small edit of a text: a cut, an insertion or a replaced span.
#[derive(Clone, Debug)]
enum Edit {
    Cut(usize, usize),
    Insert(usize, String),
    Replace(usize, usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let text = prop_oneof![
        select(SCALARS).prop_map(str::to_string),
        select(KEYS).prop_map(|k| format!("{k}: ")),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just(": ".to_string()),
        Just("- ".to_string()),
        Just("{".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        ".{0,8}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, len)| Edit::Cut(at, len)),
        (any::<usize>(), text.clone()).prop_map(|(at, t)| Edit::Insert(at, t)),
        (any::<usize>(), 0usize..12, text).prop_map(|(at, len, t)| Edit::Replace(at, len, t)),
    ]
}

/// Applies `edits` on character boundaries.
fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len().max(1);
        match e {
            Edit::Cut(at, len) => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                chars.drain(at.min(chars.len())..end);
            }
            Edit::Insert(at, t) => {
                let at = (at % (chars.len() + 1)).min(chars.len());
                chars.splice(at..at, t.chars());
            }
            Edit::Replace(at, len, t) => {
                let at = (at % n).min(chars.len());
                let end = (at + len).min(chars.len());
                chars.splice(at..end, t.chars());
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_loading_never_panics_on_arbitrary_bytes(
        gateway in prop::collection::vec(any::<u8>(), 0..400),
        rules in prop::option::of(prop::collection::vec(any::<u8>(), 0..400)),
    ) {
        load(&gateway, rules.as_deref());
    }

    #[test]
    fn config_loading_never_panics_on_yaml_of_any_shape(
        gateway in gateway_doc(),
        rules in prop::option::of(rule_doc()),
        block in any::<bool>(),
    ) {
        let rules = rules.map(|r| render(&r, block));
        load(&render(&gateway, block), rules.as_deref());
    }

    #[test]
    fn config_loading_never_panics_on_edits_of_the_good_config(
        gateway_edits in prop::collection::vec(edit(), 0..4),
        rule_edits in prop::collection::vec(edit(), 0..4),
    ) {
        static GOOD: OnceLock<(String, String)> = OnceLock::new();
        let (gateway, rules) = GOOD.get_or_init(|| {
            let gateway = fixture("tests/fixtures/good/gateway.yaml")
                .replace("lua-free-rules/*.yaml", "rules/*.yaml");
            (gateway, fixture("tests/fixtures/good/lua-free-rules/vouchers.yaml"))
        });
        let gateway = apply(gateway, &gateway_edits);
        let rules = apply(rules, &rule_edits);
        load(gateway.as_bytes(), Some(rules.as_bytes()));
    }
}

/// The good fixture's rules (header, cookie, query, path, JSON and JWT
/// sources), loaded once.
fn good_rules() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let path: PathBuf =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good/gateway.yaml");
        sluice::config::load_with_env(&path, &env).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// An HS256 token over `claims`, signed with the fixture secret (or not).
fn token(claims: &Value, signed: bool) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{head}.{body}");
    let key: &[u8] = if signed { SECRET.as_bytes() } else { b"wrong" };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{sig}")
}

/// Header names the rules read, and others.
const HEADER_NAMES: &[&str] = &[
    "x-user-id",
    "x-batch-id",
    "x-count",
    "x-token",
    "authorization",
    "cookie",
    "content-type",
    "x-other",
];

/// Id-ish strings, and some that are not.
const IDS: &[&str] = &[
    "u1",
    "p100",
    "A.b_c:d-e",
    "",
    " ",
    "u 1",
    "%41",
    "a%2",
    "ü",
    "1",
    "0",
    "-1",
    "5",
    "99999999999",
    "null",
    "true",
    "\"q\"",
    "session_user=u9",
    "session_user=u1; session_user=u2",
    "a=b; c",
];

/// Mostly valid ids (so extraction gets past the first field), else junk.
fn id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9._:-]{1,24}",
        3 => select(IDS).prop_map(str::to_string),
        1 => "[A-Za-z0-9._:-]{120,130}",
        1 => ".{0,40}",
    ]
}

/// Mostly small quantities, else anything.
fn qty() -> impl Strategy<Value = Value> {
    prop_oneof![4 => (-1i64..8).prop_map(Value::from), 1 => scalar()]
}

/// A JWT `Authorization`-style value: usually signed right, with the
/// claim as an id and sometimes `exp`/`nbf`; or a broken one.
fn jwt(claim: &'static str) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop_oneof![4 => id_text().prop_map(Value::from), 1 => scalar()],
        prop::option::of((select(&["exp", "nbf"][..]), scalar())),
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_map(move |(bearer, id, extra, signed)| {
            let mut claims = Map::new();
            claims.insert(claim.to_string(), id);
            if let Some((k, v)) = extra {
                claims.insert(k.to_string(), v);
            }
            let t = token(&Value::Object(claims), signed);
            if bearer { format!("Bearer {t}") } else { t }.into_bytes()
        })
}

/// Headers the good rules read, each present or not, plus random ones.
fn headers() -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
    let text = |s: String| s.into_bytes();
    (
        prop::option::weighted(0.8, id_text().prop_map(text)),
        prop::option::weighted(0.8, id_text().prop_map(text)),
        prop::option::weighted(
            0.6,
            qty().prop_map(|v| match v {
                Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            }),
        ),
        prop::option::weighted(
            0.7,
            id_text().prop_map(|id| format!("session_user={id}").into_bytes()),
        ),
        prop::option::weighted(0.8, jwt("sub")),
        prop::option::weighted(0.8, jwt("uid")),
        prop::collection::vec(
            (
                select(HEADER_NAMES),
                prop_oneof![
                    id_text().prop_map(String::into_bytes),
                    prop::collection::vec(any::<u8>(), 0..40)
                ],
            ),
            0..3,
        ),
    )
        .prop_map(|(user, batch, count, cookie, token, auth, extra)| {
            let named = [
                ("x-user-id", user),
                ("x-batch-id", batch),
                ("x-count", count),
                ("cookie", cookie),
                ("x-token", token),
                ("authorization", auth),
            ];
            let mut out: Vec<(&'static str, Vec<u8>)> = named
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, v)))
                .collect();
            out.extend(extra);
            out
        })
}

/// A query string the rules read (`uid`, `item`, `n`), or anything.
fn query() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        4 => (id_text(), id_text(), qty()).prop_map(|(uid, item, n)| {
            let n = match n { Value::String(s) => s, other => other.to_string() };
            Some(format!("uid={uid}&item={item}&n={n}"))
        }),
        1 => ".{0,40}".prop_map(Some),
        1 => select(&["uid=%ZZ", "item=a+b&item=c", "n=99999999999999999999", "&&=&"][..])
            .prop_map(|q| Some(q.to_string())),
    ]
}

/// A JSON body with the fields the rules read (`qty`, `sku_id`), or not.
fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        4 => (qty(), prop_oneof![3 => id_text().prop_map(Value::from), 1 => scalar()], any::<bool>())
            .prop_map(|(qty, sku, both)| {
                let v = if both { json!({"qty": qty, "sku_id": sku}) } else { json!({"sku_id": sku}) };
                Some(v.to_string().into_bytes())
            }),
        1 => yaml_value().prop_map(|v| Some(v.to_string().into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn extraction_never_panics_and_accepts_only_valid_attempts(
        rule in 0usize..5,
        headers in headers(),
        query in query(),
        captures in prop::collection::vec(id_text(), 2),
        body in body(),
    ) {
        let config = good_rules();
        let rules = config.rules.rules();
        let rule = &rules[rule % rules.len()];
        let extractor = Extractor::new(rule);
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                map.append(HeaderName::from_static(name), value);
            }
        }
        let captures = [("sku", captures[0].as_str()), ("batch", captures[1].as_str())];
        let parts = RequestParts {
            headers: &map,
            query: query.as_deref(),
            captures: &captures,
            body: body.as_deref(),
        };
        match extractor.extract(&parts) {
            Ok(attempt) => {
                prop_assert!(valid_id(&attempt.user), "user {:?}", attempt.user);
                prop_assert!(valid_id(&attempt.sku), "sku {:?}", attempt.sku);
                prop_assert!(
                    (1..=rule.quantity.max).contains(&attempt.qty),
                    "qty {} of max {}", attempt.qty, rule.quantity.max
                );
            }
            Err(message) => {
                // Messages name the field and echo a bounded prefix only:
                // 40 characters, each at most 10 once escaped (`\u{10ffff}`),
                // plus the message's own words, whatever the input's size.
                prop_assert!(
                    ["user", "sku", "quantity", "body"].iter().any(|f| message.starts_with(f)),
                    "{message}"
                );
                prop_assert!(message.chars().count() <= 600, "{message}");
            }
        }
    }
}
