//! The admission pipeline end to end, through the real gateway binary and a
//! real loopback upstream: invalid input, campaign windows, rate limits,
//! the sale itself (tickets, stock view, metrics), not-loaded skus, dedup
//! and `Idempotency-Key`, per-user limits, releases on backend failure,
//! response overrides, the admin API with a token, and a concurrent burst.
//!
//! Every scenario runs twice: on the memory store, and on the Redis store
//! backed by a real `redis-server` started for that test.

use sluice_testkit as support;
use support::both_stores;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{expect, metric_value, request, Gateway, RedisServer, Response, Upstream};

/// The store a scenario runs on: its `store:` config snippet, and the Redis
/// server behind it (kept alive as long as this value lives).
struct StoreUnderTest {
    yaml: String,
    _redis: Option<RedisServer>,
}

fn memory() -> StoreUnderTest {
    StoreUnderTest {
        yaml: "store: { backend: memory }".into(),
        _redis: None,
    }
}

fn redis() -> StoreUnderTest {
    let server = RedisServer::start();
    StoreUnderTest {
        // Generous timeout: the machine is shared and noisy.
        yaml: format!(
            "store: {{ backend: redis, redis: {{ url: \"{}\", timeout: 1s }} }}",
            server.url()
        ),
        _redis: Some(server),
    }
}

both_stores!(
    invalid_input_is_refused_before_the_backend,
    campaign_window_not_started_and_ended,
    rate_limit_per_user_answers_retry_after,
    sale_forwards_exactly_the_stock_with_tickets,
    sku_never_loaded_is_unavailable,
    dedup_replays_or_points_at_the_first_attempt,
    idempotency_key_is_scoped_to_rule_and_user,
    per_user_limit_without_dedup_is_duplicate,
    backend_5xx_releases_the_units,
    connect_error_answers_unavailable_and_returns_units,
    response_overrides_keep_the_outcome_header,
    admin_api_needs_the_token_and_releases_tickets,
    concurrent_buyers_get_exactly_the_stock,
);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Bound on every polling wait.
const WAIT: Duration = Duration::from_secs(10);

/// Extra bits of gateway config a scenario needs.
#[derive(Default)]
struct Extra<'a> {
    /// Appended inside `admin: { listen: ..., <here> }`.
    admin: &'a str,
    /// More upstreams, already indented under `upstreams:`.
    upstreams: &'a str,
    /// Environment of the gateway process.
    env: &'a [(&'a str, &'a str)],
}

/// A gateway over `mall`, on `store`, with `rules` (a list of rule entries,
/// see [`rule`]) in `lua-free-rules/sale.yaml`.
fn start(store: &StoreUnderTest, mall: &Upstream, rules: &[String]) -> Gateway {
    start_with(store, mall, rules, Extra::default())
}

fn start_with(store: &StoreUnderTest, mall: &Upstream, rules: &[String], extra: Extra) -> Gateway {
    let admin = if extra.admin.is_empty() {
        String::new()
    } else {
        format!(", {}", extra.admin)
    };
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}}{admin} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         {store}\n\
         upstreams:\n  mall:\n    servers: [{mall}]\n    connect_timeout: 500ms\n    read_timeout: 10s\n\
         {more}\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        store = store.yaml,
        mall = mall.addr(),
        more = extra.upstreams,
    );
    let mut builder = Gateway::builder().config(&config).file(
        "lua-free-rules/sale.yaml",
        &format!("rules:\n{}", rules.concat()),
    );
    for (k, v) in extra.env {
        builder = builder.env(k, v);
    }
    builder.start()
}

/// A rule entry named `name` matching `POST /api/<name>/{sku}/order`, user
/// from `X-User-Id`, sku from the path; `more` is extra keys, one per line,
/// without indentation.
fn rule(name: &str, more: &[&str]) -> String {
    let mut s = format!(
        "  - name: {name}\n    match: {{ method: POST, path: \"/api/{name}/{{sku}}/order\" }}\n    \
         user: {{ header: X-User-Id }}\n    sku: {{ path: sku }}\n"
    );
    for line in more {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// `POST /api/<rule>/<sku>/order` with a JSON content type, `headers` and `body`.
async fn buy_with(
    addr: SocketAddr,
    rule: &str,
    sku: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let path = format!("/api/{rule}/{sku}/order");
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", &path, &all, body.as_bytes()).await
}

/// One unit bought by `user` (body `{}`).
async fn buy(gw: &Gateway, rule: &str, sku: &str, user: &str) -> Response {
    buy_with(gw.listen(), rule, sku, &[("x-user-id", user)], "{}").await
}

/// A gateway-made JSON answer: asserts status, header and `outcome` field.
#[track_caller]
fn expect_json(resp: &Response, status: u16, outcome: &str) -> Value {
    expect(resp, status, outcome);
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{}",
        resp.text()
    );
    let body = resp.json();
    assert_eq!(body["outcome"], outcome, "{body}");
    body
}

/// An admin request with optional bearer token.
async fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    request(gw.admin(), method, path, &headers, body.as_bytes()).await
}

/// `PUT /admin/v1/stock/{rule}/{sku}` `{"available": n}`; asserts 200.
async fn put_stock_as(gw: &Gateway, token: Option<&str>, rule: &str, sku: &str, n: u64) -> Value {
    let body = json!({ "available": n }).to_string();
    let resp = admin(
        gw,
        "PUT",
        &format!("/admin/v1/stock/{rule}/{sku}"),
        token,
        &body,
    )
    .await;
    assert_eq!(resp.status, 200, "PUT stock: {}", resp.text());
    let view = resp.json();
    assert_eq!(view["available"], n, "{view}");
    view
}

async fn put_stock(gw: &Gateway, rule: &str, sku: &str, n: u64) -> Value {
    put_stock_as(gw, None, rule, sku, n).await
}

/// `GET /admin/v1/stock/{rule}/{sku}`; asserts 200.
async fn stock_as(gw: &Gateway, token: Option<&str>, rule: &str, sku: &str) -> Value {
    let resp = admin(
        gw,
        "GET",
        &format!("/admin/v1/stock/{rule}/{sku}"),
        token,
        "",
    )
    .await;
    assert_eq!(resp.status, 200, "GET stock: {}", resp.text());
    resp.json()
}

async fn stock(gw: &Gateway, rule: &str, sku: &str) -> Value {
    stock_as(gw, None, rule, sku).await
}

/// Waits (bounded) until the stock view's counters are these, then
/// asserts them: a winner's commit lands just after its answer is written
/// (with the answer, in one store round trip).
async fn expect_stock(gw: &Gateway, rule: &str, sku: &str, counts: (u64, u64, u64, u64, u64)) {
    expect_stock_as(gw, None, rule, sku, counts).await;
}

/// [`expect_stock`] with an admin token.
async fn expect_stock_as(
    gw: &Gateway,
    token: Option<&str>,
    rule: &str,
    sku: &str,
    counts: (u64, u64, u64, u64, u64),
) {
    let (available, initial, sold, in_flight, released) = counts;
    let mut view = stock_as(gw, token, rule, sku).await;
    for _ in 0..200 {
        let same = [
            ("available", available),
            ("initial", initial),
            ("sold", sold),
            ("in_flight", in_flight),
            ("queued", 0),
            ("released", released),
        ]
        .iter()
        .all(|(k, v)| view[*k].as_u64() == Some(*v));
        if same {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        view = stock_as(gw, token, rule, sku).await;
    }
    expect_view(&view, available, initial, sold, in_flight, released);
}

/// Asserts the stock view's counters (all of them).
#[track_caller]
fn expect_view(
    view: &Value,
    available: u64,
    initial: u64,
    sold: u64,
    in_flight: u64,
    released: u64,
) {
    let want = json!({
        "available": available,
        "initial": initial,
        "sold": sold,
        "in_flight": in_flight,
        "queued": 0,
        "released": released,
    });
    for k in [
        "available",
        "initial",
        "sold",
        "in_flight",
        "queued",
        "released",
    ] {
        assert_eq!(
            view[k], want[k],
            "stock view field {k}: got {view}, want {want}"
        );
    }
}

/// Polls `cond` every 20 ms until it holds, or panics after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every value of header `name` in a recorded upstream request.
fn header_values<'a>(r: &'a support::Recorded, name: &str) -> Vec<&'a str> {
    r.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn is_ticket(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// A case of scenario 1: name, headers, body, the field the message names.
type InvalidCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str);

/// 1. Missing or malformed user, body or quantity: 400 `invalid`, a message
///    naming the field, nothing reaches the backend.
async fn invalid_input_is_refused_before_the_backend(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule("inv", &["quantity: { json: qty, max: 2 }"])],
    );
    put_stock(&gw, "inv", "p1", 100).await;

    let user = ("x-user-id", "u1");
    let cases: &[InvalidCase] = &[
        ("missing user header", vec![], r#"{"qty":1}"#, "user"),
        (
            "user with a space",
            vec![("x-user-id", "a b")],
            r#"{"qty":1}"#,
            "user",
        ),
        ("body not JSON", vec![user], "qty=1", "body"),
        ("quantity 0", vec![user], r#"{"qty":0}"#, "quantity"),
        ("quantity -1", vec![user], r#"{"qty":-1}"#, "quantity"),
        ("quantity 1.5", vec![user], r#"{"qty":1.5}"#, "quantity"),
        (
            "quantity as a string",
            vec![user],
            r#"{"qty":"2"}"#,
            "quantity",
        ),
        ("quantity over max", vec![user], r#"{"qty":3}"#, "quantity"),
        (
            "quantity over u32",
            vec![user],
            r#"{"qty":4294967296}"#,
            "quantity",
        ),
    ];
    let mut failures = Vec::new();
    for (name, headers, body, field) in cases {
        let resp = buy_with(gw.listen(), "inv", "p1", headers, body).await;
        let json: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        let message = json["message"].as_str().unwrap_or_default();
        let ok = resp.status == 400
            && resp.header("x-sluice-outcome") == Some("invalid")
            && json["outcome"] == "invalid"
            && message.contains(field);
        if !ok {
            failures.push(format!(
                "{name}: got {} {:?} {}; want 400 invalid with a message naming {field:?}",
                resp.status,
                resp.header("x-sluice-outcome"),
                resp.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        up.requests(),
        0,
        "the backend saw invalid requests: {:?}",
        up.recorded()
    );
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "inv"), ("outcome", "invalid")],
        cases.len() as f64,
    )
    .await;

    // The rule is live: a well-formed attempt goes through.
    let resp = buy_with(gw.listen(), "inv", "p1", &[user], r#"{"qty":2}"#).await;
    expect(&resp, 200, "forwarded");
    assert_eq!(up.requests(), 1);
    assert_eq!(up.last().unwrap().header("x-sluice-quantity"), Some("2"));
    expect_stock(&gw, "inv", "p1", (98, 100, 2, 0, 0)).await;
}

/// 2. Before the window: 425 `not_started` with `starts_in`; after: 410 `ended`.
async fn campaign_window_not_started_and_ended(store: StoreUnderTest) {
    let up = Upstream::start();
    let now = chrono::Utc::now();
    let hour = chrono::Duration::hours(1);
    let early = format!("window: {{ start: \"{}\" }}", (now + hour).to_rfc3339());
    let late = format!(
        "window: {{ start: \"{}\", end: \"{}\" }}",
        (now - hour - hour).to_rfc3339(),
        (now - hour).to_rfc3339()
    );
    let gw = start(
        &store,
        &up,
        &[rule("early", &[&early]), rule("late", &[&late])],
    );
    put_stock(&gw, "early", "p1", 5).await;
    put_stock(&gw, "late", "p1", 5).await;

    let body = expect_json(&buy(&gw, "early", "p1", "u1").await, 425, "not_started");
    let starts_in = body["starts_in"].as_u64().unwrap_or(0);
    assert!(starts_in > 0 && starts_in <= 3600, "starts_in {body}");

    expect_json(&buy(&gw, "late", "p1", "u1").await, 410, "ended");
    assert_eq!(up.requests(), 0);
    expect_stock(&gw, "early", "p1", (5, 5, 0, 0, 0)).await;
    expect_stock(&gw, "late", "p1", (5, 5, 0, 0, 0)).await;
}

/// 3. One request per 10 s per user: the second is 429 with `Retry-After`.
async fn rate_limit_per_user_answers_retry_after(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule(
            "rl",
            &["rate_limits: [ { key: user, rate: 1, per: 10s } ]"],
        )],
    );
    put_stock(&gw, "rl", "p1", 10).await;

    expect(&buy(&gw, "rl", "p1", "u1").await, 200, "forwarded");
    let resp = buy(&gw, "rl", "p1", "u1").await;
    let body = expect_json(&resp, 429, "rate_limited");
    let retry: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric retry-after: {:?}", resp.headers));
    assert!(retry >= 1, "retry-after {retry}");
    assert_eq!(body["retry_after"], retry);

    // Another user has its own bucket.
    expect(&buy(&gw, "rl", "p1", "u2").await, 200, "forwarded");
    assert_eq!(up.requests(), 2);
    expect_stock(&gw, "rl", "p1", (8, 10, 2, 0, 0)).await;
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "rl"), ("outcome", "rate_limited")],
        1.0,
    )
    .await;
}

/// 4. Three units, six buyers: three forwarded with tickets, three sold out.
async fn sale_forwards_exactly_the_stock_with_tickets(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(&store, &up, &[rule("sale", &[])]);
    let view = put_stock(&gw, "sale", "phone", 3).await;
    expect_view(&view, 3, 3, 0, 0, 0);

    let forged = "0123456789abcdef0123456789abcdef";
    let mut forwarded = Vec::new();
    let mut sold_out = Vec::new();
    for i in 1..=6 {
        let user = format!("buyer-{i}");
        let resp = buy_with(
            gw.listen(),
            "sale",
            "phone",
            &[
                ("x-user-id", &user),
                ("X-Sluice-Ticket", forged),
                ("X-Sluice-Rule", "forged"),
                ("X-Sluice-Quantity", "99"),
                ("X-Sluice-Admin", "yes"),
            ],
            "{}",
        )
        .await;
        match resp.header("x-sluice-outcome") {
            Some("forwarded") => {
                expect(&resp, 200, "forwarded");
                // The backend's own answer passes through.
                assert_eq!(resp.json()["uri"], "/api/sale/phone/order");
                forwarded.push(user);
            }
            _ => {
                expect_json(&resp, 410, "sold_out");
                sold_out.push(user);
            }
        }
    }
    assert_eq!(forwarded, ["buyer-1", "buyer-2", "buyer-3"]);
    assert_eq!(sold_out.len(), 3);

    let seen = up.recorded();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let mut tickets = HashSet::new();
    for (r, user) in seen.iter().zip(&forwarded) {
        assert_eq!(r.header("x-user-id"), Some(user.as_str()));
        let t = header_values(r, "x-sluice-ticket");
        assert_eq!(t.len(), 1, "one ticket header: {:?}", r.headers);
        assert!(is_ticket(t[0]), "ticket {:?} is not 32 lowercase hex", t[0]);
        assert_ne!(t[0], forged, "a client's forged ticket reached the backend");
        tickets.insert(t[0].to_string());
        assert_eq!(
            header_values(r, "x-sluice-quantity"),
            ["1"],
            "{:?}",
            r.headers
        );
        assert_eq!(
            header_values(r, "x-sluice-rule"),
            ["sale"],
            "{:?}",
            r.headers
        );
        let mut ours: Vec<&str> = r
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("x-sluice-"))
            .collect();
        ours.sort_unstable();
        assert_eq!(
            ours,
            ["x-sluice-quantity", "x-sluice-rule", "x-sluice-ticket"],
            "only the gateway's own X-Sluice-* headers reach the backend"
        );
    }
    assert_eq!(tickets.len(), 3, "tickets not distinct: {tickets:?}");

    // The gauge exists once the sku is loaded, and follows the sales
    // without an admin read (housekeeping refreshes it).
    let labels = [("rule", "sale"), ("sku", "phone")];
    let metrics = gw.metrics().await;
    assert!(
        metric_value(&metrics, "sluice_stock_available", &labels).is_some(),
        "no sluice_stock_available series for a loaded sku"
    );
    gw.wait_metric("sluice_stock_available", &labels, 0.0).await;

    expect_stock(&gw, "sale", "phone", (0, 3, 3, 0, 0)).await;
    for (outcome, n) in [("forwarded", 3.0), ("sold_out", 3.0)] {
        gw.wait_metric(
            "sluice_requests_total",
            &[("rule", "sale"), ("outcome", outcome)],
            n,
        )
        .await;
    }
}

/// 5. A sku never loaded is `unavailable`, never unlimited.
async fn sku_never_loaded_is_unavailable(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(&store, &up, &[rule("nl", &[])]);
    put_stock(&gw, "nl", "loaded", 1).await;

    expect_json(&buy(&gw, "nl", "ghost", "u1").await, 503, "unavailable");
    assert_eq!(up.requests(), 0);
    let resp = admin(&gw, "GET", "/admin/v1/stock/nl/ghost", None, "").await;
    assert_eq!(resp.status, 404, "{}", resp.text());
    // Still not loaded after the attempt (no record was made for it).
    expect_json(&buy(&gw, "nl", "ghost", "u2").await, 503, "unavailable");
    assert_eq!(up.requests(), 0);
}

/// 6. Dedup by user and sku, and by `Idempotency-Key`.
async fn dedup_replays_or_points_at_the_first_attempt(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule("dd", &["dedup: { key: [user, sku], ttl: 10m }"])],
    );
    put_stock(&gw, "dd", "s1", 10).await;

    // Done: the stored answer is replayed with its status and body. The
    // body is kept just after the answer, so poll briefly for it.
    let first = buy(&gw, "dd", "s1", "u1").await;
    expect(&first, 200, "forwarded");
    let deadline = Instant::now() + WAIT;
    let replay = loop {
        let again = buy(&gw, "dd", "s1", "u1").await;
        assert_eq!(
            again.header("x-sluice-outcome"),
            Some("duplicate"),
            "{}",
            again.text()
        );
        if again.status == first.status && again.body == first.body {
            break again;
        }
        assert!(
            Instant::now() < deadline,
            "no replay of the first answer within {WAIT:?}; last: {} {}",
            again.status,
            again.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(replay.header("content-type"), Some("application/json"));
    assert_eq!(up.requests(), 1, "a duplicate reached the backend");
    expect_stock(&gw, "dd", "s1", (9, 10, 1, 0, 0)).await;

    // In flight: a second click gets 409 with the first's ticket.
    up.set_stall(Duration::from_secs(1));
    let addr = gw.listen();
    let slow =
        tokio::spawn(async move { buy_with(addr, "dd", "s1", &[("x-user-id", "u2")], "{}").await });
    // (The upstream counts a request before recording it: wait for the record.)
    wait_until("the first click to reach the backend", || {
        up.recorded().len() == 2
    })
    .await;
    let ticket = up.recorded()[1]
        .header("x-sluice-ticket")
        .map(str::to_string)
        .expect("the first click carried a ticket");
    let resp = buy(&gw, "dd", "s1", "u2").await;
    let body = expect_json(&resp, 409, "duplicate");
    assert_eq!(body["ticket"], ticket.as_str(), "{body}");
    let first = slow.await.expect("first click task");
    expect(&first, 200, "forwarded");
    up.set_stall(Duration::ZERO);
    assert_eq!(up.requests(), 2);

    // Idempotency-Key: two users, one key, one sku. Issue 8 (case 4): keys
    // are scoped to (rule, user), so the second user's attempt is its own,
    // not a duplicate of the first's (this used to pin `duplicate`).
    let key = ("idempotency-key", "order-42");
    let a = buy_with(gw.listen(), "dd", "s1", &[("x-user-id", "u3"), key], "{}").await;
    expect(&a, 200, "forwarded");
    let b = buy_with(gw.listen(), "dd", "s1", &[("x-user-id", "u4"), key], "{}").await;
    expect(&b, 200, "forwarded");
    let users: Vec<_> = up
        .recorded()
        .iter()
        .map(|r| r.header("x-user-id").unwrap_or_default().to_string())
        .collect();
    assert_eq!(users, ["u1", "u2", "u3", "u4"]);
    expect_stock(&gw, "dd", "s1", (6, 10, 4, 0, 0)).await;
}

/// 6c. `Idempotency-Key` marks are scoped to (rule, user): user B sending
///     user A's key is B's own new attempt, never a replay of A's kept
///     answer, nor A's ticket while A's order is in flight or queued. A's
///     own retry with the key is still A's duplicate, on any sku of the rule.
async fn idempotency_key_is_scoped_to_rule_and_user(store: StoreUnderTest) {
    let up = Upstream::start();
    // One backend slot and a short wait: a second order while one stalls
    // at the backend is queued (half a second is ample for a finished
    // order to give its slot back).
    let upstreams = format!(
        "  one:\n    servers: [{}]\n    max_inflight: 1\n    read_timeout: 10s\n",
        up.addr()
    );
    let gw = start_with(
        &store,
        &up,
        &[rule(
            "idem",
            &["admission: { upstream: one, queue: { max_wait: 500ms } }"],
        )],
        Extra {
            upstreams: &upstreams,
            ..Extra::default()
        },
    );
    put_stock(&gw, "idem", "s1", 10).await;
    put_stock(&gw, "idem", "s2", 10).await;
    let key = ("idempotency-key", "k-1");
    let addr = gw.listen();

    // Done: A's answer is kept; B with A's key gets its own order placed.
    let a = buy_with(
        addr,
        "idem",
        "s1",
        &[("x-user-id", "alice"), key],
        r#"{"who":"a"}"#,
    )
    .await;
    expect(&a, 200, "forwarded");
    let a_answer = a.json();
    let b = buy_with(
        addr,
        "idem",
        "s1",
        &[("x-user-id", "bob"), key],
        r#"{"who":"b"}"#,
    )
    .await;
    expect(&b, 200, "forwarded");
    assert_eq!(
        b.json()["body"],
        r#"{"who":"b"}"#,
        "B got someone else's answer"
    );
    assert_ne!(b.json()["n"], a_answer["n"]);
    // A's own retry is A's duplicate (the kept answer once it is kept), on
    // the same sku or another of the rule.
    for sku in ["s1", "s2"] {
        let deadline = Instant::now() + WAIT;
        loop {
            let again = buy_with(
                addr,
                "idem",
                sku,
                &[("x-user-id", "alice"), key],
                r#"{"who":"a"}"#,
            )
            .await;
            assert_eq!(
                again.header("x-sluice-outcome"),
                Some("duplicate"),
                "{}",
                again.text()
            );
            if again.status == 200 {
                assert_eq!(again.json(), a_answer, "A's replay is A's own answer");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no replay: {} {}",
                again.status,
                again.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(up.requests(), 2);

    // In flight and queued: A's order stalls at the backend, C's is queued
    // behind it; D and E reuse their keys and get orders of their own.
    up.set_stall(Duration::from_secs(5));
    let key2 = ("idempotency-key", "k-2");
    let first = tokio::spawn(async move {
        buy_with(addr, "idem", "s1", &[("x-user-id", "carol"), key2], "{}").await
    });
    wait_until("carol's order at the backend", || up.recorded().len() == 3).await;
    let carol_ticket = up.recorded()[2]
        .header("x-sluice-ticket")
        .map(str::to_string)
        .expect("a ticket");
    let key3 = ("idempotency-key", "k-3");
    let queued = buy_with(addr, "idem", "s1", &[("x-user-id", "dave"), key3], "{}").await;
    let queued_body = expect_json(&queued, 202, "queued");
    let dave_ticket = queued_body["ticket"]
        .as_str()
        .expect("a ticket")
        .to_string();
    for (user, k, not) in [("erin", key2, &carol_ticket), ("frank", key3, &dave_ticket)] {
        let resp = buy_with(addr, "idem", "s1", &[("x-user-id", user), k], "{}").await;
        let body = expect_json(&resp, 202, "queued");
        assert_ne!(
            body["ticket"],
            not.as_str(),
            "{user} got another buyer's ticket"
        );
    }
    // The owners' own retries point at their own tickets.
    let again = buy_with(addr, "idem", "s1", &[("x-user-id", "carol"), key2], "{}").await;
    let body = expect_json(&again, 409, "duplicate");
    assert_eq!(body["ticket"], carol_ticket.as_str());
    let again = buy_with(addr, "idem", "s1", &[("x-user-id", "dave"), key3], "{}").await;
    let body = expect_json(&again, 202, "duplicate");
    assert_eq!(body["ticket"], dave_ticket.as_str());

    // Only carol's order stalls; the queued ones go through at once.
    up.set_stall(Duration::ZERO);
    expect(&first.await.expect("carol's order"), 200, "forwarded");
    // Everything drains: 2 + carol + dave, erin, frank = 6 orders placed.
    let deadline = Instant::now() + WAIT;
    loop {
        let view = stock(&gw, "idem", "s1").await;
        if view["sold"] == 6 {
            expect_view(&view, 4, 10, 6, 0, 0);
            break;
        }
        assert!(Instant::now() < deadline, "queue did not drain: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let users: HashSet<String> = up
        .recorded()
        .iter()
        .map(|r| r.header("x-user-id").unwrap_or_default().to_string())
        .collect();
    assert_eq!(users.len(), 6, "{users:?}");
    // The gateway still serves a normal order.
    expect(&buy(&gw, "idem", "s2", "gina").await, 200, "forwarded");
}

/// 7. `per_user_limit: 1` without dedup: a second unit is `duplicate`.
async fn per_user_limit_without_dedup_is_duplicate(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule(
            "pul",
            &[
                "quantity: { json: qty, max: 2 }",
                "stock: { per_user_limit: 1 }",
            ],
        )],
    );
    put_stock(&gw, "pul", "s1", 10).await;

    let one = r#"{"qty":1}"#;
    let resp = buy_with(gw.listen(), "pul", "s1", &[("x-user-id", "u1")], one).await;
    expect(&resp, 200, "forwarded");
    assert_eq!(up.last().unwrap().header("x-sluice-quantity"), Some("1"));
    let resp = buy_with(gw.listen(), "pul", "s1", &[("x-user-id", "u1")], one).await;
    expect_json(&resp, 409, "duplicate");

    // Two units at once is over the limit too; one is fine.
    let two = r#"{"qty":2}"#;
    let resp = buy_with(gw.listen(), "pul", "s1", &[("x-user-id", "u2")], two).await;
    expect_json(&resp, 409, "duplicate");
    let resp = buy_with(gw.listen(), "pul", "s1", &[("x-user-id", "u2")], one).await;
    expect(&resp, 200, "forwarded");

    assert_eq!(up.requests(), 2);
    expect_stock(&gw, "pul", "s1", (8, 10, 2, 0, 0)).await;
}

/// 8. A 5xx from the backend is relayed and returns the units; the same
///    user may buy again.
async fn backend_5xx_releases_the_units(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule(
            "rel",
            &[
                "dedup: { key: [user, sku], ttl: 10m }",
                "stock: { per_user_limit: 1 }",
            ],
        )],
    );
    put_stock(&gw, "rel", "s1", 1).await;

    up.set_status(500);
    let resp = buy(&gw, "rel", "s1", "u1").await;
    expect(&resp, 500, "forwarded");
    assert_eq!(
        resp.json()["uri"],
        "/api/rel/s1/order",
        "the backend's own body"
    );
    expect_stock(&gw, "rel", "s1", (1, 1, 0, 0, 1)).await;
    gw.wait_metric(
        "sluice_released_total",
        &[("rule", "rel"), ("reason", "5xx")],
        1.0,
    )
    .await;

    up.set_status(200);
    expect(&buy(&gw, "rel", "s1", "u1").await, 200, "forwarded");
    expect_stock(&gw, "rel", "s1", (0, 1, 1, 0, 1)).await;
    assert_eq!(up.requests(), 2);
}

/// 9. The rule's upstream refuses connections: `unavailable`, units back.
async fn connect_error_answers_unavailable_and_returns_units(store: StoreUnderTest) {
    let up = Upstream::start();
    let mut dead = Upstream::start();
    dead.stop();
    // Keep its port bound (without SO_REUSEADDR) but not listening:
    // connects are refused, and no other test can be handed or bind the
    // port meanwhile. Best effort: without it the port is merely free.
    let _hold = tokio::net::TcpSocket::new_v4().and_then(|s| s.bind(dead.addr()).map(|()| s));
    let upstreams = format!(
        "  dead:\n    servers: [{}]\n    connect_timeout: 500ms\n",
        dead.addr()
    );
    let gw = start_with(
        &store,
        &up,
        &[rule("conn", &["admission: { upstream: dead }"])],
        Extra {
            upstreams: &upstreams,
            ..Extra::default()
        },
    );
    put_stock(&gw, "conn", "s1", 2).await;

    expect_json(&buy(&gw, "conn", "s1", "u1").await, 503, "unavailable");
    expect_stock(&gw, "conn", "s1", (2, 2, 0, 0, 1)).await;
    expect_json(&buy(&gw, "conn", "s1", "u2").await, 503, "unavailable");
    expect_stock(&gw, "conn", "s1", (2, 2, 0, 0, 2)).await;
    assert_eq!(
        up.requests(),
        0,
        "the default upstream got the rule's traffic"
    );
    gw.wait_metric(
        "sluice_released_total",
        &[("rule", "conn"), ("reason", "connect_error")],
        2.0,
    )
    .await;
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "conn"), ("outcome", "unavailable")],
        2.0,
    )
    .await;
}

/// 10. A rule's `responses.sold_out` replaces status, headers and body.
async fn response_overrides_keep_the_outcome_header(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start(
        &store,
        &up,
        &[rule(
            "ovr",
            &[
                r#"responses: { sold_out: { status: 200, headers: { X-Shop: "1" }, body: '{"code":1001}' } }"#,
            ],
        )],
    );
    put_stock(&gw, "ovr", "s1", 0).await;
    // Twice: once from the store, once from the local sold-out flag.
    for user in ["u1", "u2"] {
        let resp = buy(&gw, "ovr", "s1", user).await;
        expect(&resp, 200, "sold_out");
        assert_eq!(resp.header("x-shop"), Some("1"));
        assert_eq!(resp.text(), r#"{"code":1001}"#);
    }
    assert_eq!(up.requests(), 0);
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "ovr"), ("outcome", "sold_out")],
        2.0,
    )
    .await;
}

/// 11. The admin API behind a bearer token; releases by ticket.
async fn admin_api_needs_the_token_and_releases_tickets(store: StoreUnderTest) {
    let up = Upstream::start();
    let gw = start_with(
        &store,
        &up,
        &[rule("adm", &[])],
        Extra {
            admin: "token_env: T",
            env: &[("T", "s3cret")],
            ..Extra::default()
        },
    );
    let token = Some("s3cret");
    let path = "/admin/v1/stock/adm/s1";
    let load = r#"{"available": 1}"#;

    for wrong in [None, Some("wrong"), Some("s3cre")] {
        let resp = admin(&gw, "GET", path, wrong, "").await;
        assert_eq!(resp.status, 401, "GET with {wrong:?}: {}", resp.text());
        let resp = admin(&gw, "PUT", path, wrong, load).await;
        assert_eq!(resp.status, 401, "PUT with {wrong:?}: {}", resp.text());
    }
    let resp = admin(&gw, "GET", path, token, "").await;
    assert_eq!(
        resp.status,
        404,
        "refused PUTs loaded nothing: {}",
        resp.text()
    );
    expect_view(
        &put_stock_as(&gw, token, "adm", "s1", 1).await,
        1,
        1,
        0,
        0,
        0,
    );
    assert_eq!(support::get(gw.admin(), "/metrics").await.status, 200);
    assert_eq!(support::get(gw.admin(), "/healthz").await.status, 200);

    expect(&buy(&gw, "adm", "s1", "u1").await, 200, "forwarded");
    let ticket = up
        .last()
        .and_then(|r| r.header("x-sluice-ticket").map(str::to_string))
        .expect("the winner carried a ticket");
    expect_json(&buy(&gw, "adm", "s1", "u2").await, 410, "sold_out");

    let release = json!({ "ticket": ticket }).to_string();
    let resp = admin(&gw, "POST", "/admin/v1/release", None, &release).await;
    assert_eq!(resp.status, 401, "release without a token: {}", resp.text());
    let resp = admin(&gw, "POST", "/admin/v1/release", token, &release).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["released"], 1, "{}", resp.text());
    let resp = admin(&gw, "POST", "/admin/v1/release", token, &release).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["released"], 0, "a second release is a no-op");
    let unknown = json!({ "ticket": "0123456789abcdef0123456789abcdef" }).to_string();
    let resp = admin(&gw, "POST", "/admin/v1/release", token, &unknown).await;
    assert_eq!(resp.status, 404, "{}", resp.text());
    for bad in ["not json", r#"{"ticket": "XYZ"}"#, r#"{"id": 1}"#] {
        let resp = admin(&gw, "POST", "/admin/v1/release", token, bad).await;
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
    }
    expect_stock_as(&gw, token, "adm", "s1", (1, 1, 0, 0, 1)).await;
    gw.wait_metric(
        "sluice_released_total",
        &[("rule", "adm"), ("reason", "admin")],
        1.0,
    )
    .await;

    // The sold-out flag set by u2's refusal is gone: the unit sells again.
    expect(&buy(&gw, "adm", "s1", "u2").await, 200, "forwarded");
    expect_stock_as(&gw, token, "adm", "s1", (0, 1, 1, 0, 1)).await;
    assert_eq!(up.requests(), 2);
}

/// 12. 300 buyers, 40 at a time, 25 units: exactly 25 winners.
async fn concurrent_buyers_get_exactly_the_stock(store: StoreUnderTest) {
    const USERS: usize = 300;
    const TASKS: usize = 40;
    const STOCK: u64 = 25;
    let up = Upstream::start();
    let gw = start(&store, &up, &[rule("rush", &[])]);
    put_stock(&gw, "rush", "s1", STOCK).await;

    let next = Arc::new(AtomicUsize::new(0));
    let addr = gw.listen();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let next = next.clone();
        tasks.spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= USERS {
                    return results;
                }
                let user = format!("user-{i}");
                let resp = buy_with(addr, "rush", "s1", &[("x-user-id", &user)], "{}").await;
                results.push((user, resp));
            }
        });
    }
    let mut winners = HashSet::new();
    let mut losers = 0;
    let mut others = Vec::new();
    while let Some(done) = tasks.join_next().await {
        for (user, resp) in done.expect("buyer task") {
            match (resp.status, resp.header("x-sluice-outcome")) {
                (200, Some("forwarded")) => {
                    winners.insert(user);
                }
                (410, Some("sold_out")) => losers += 1,
                _ => others.push(format!("{user}: {} {}", resp.status, resp.text())),
            }
        }
    }
    assert!(
        others.is_empty(),
        "unexpected answers:\n{}",
        others.join("\n")
    );
    assert_eq!(winners.len() as u64, STOCK);
    assert_eq!(losers, USERS - STOCK as usize);

    let seen = up.recorded();
    assert_eq!(seen.len() as u64, STOCK);
    let tickets: HashSet<_> = seen
        .iter()
        .filter_map(|r| r.header("x-sluice-ticket"))
        .collect();
    assert_eq!(tickets.len() as u64, STOCK, "tickets not distinct");
    assert!(tickets.iter().all(|t| is_ticket(t)), "{tickets:?}");
    let users: HashSet<String> = seen
        .iter()
        .filter_map(|r| r.header("x-user-id").map(str::to_string))
        .collect();
    assert_eq!(
        users, winners,
        "the backend saw other users than the winners"
    );

    expect_stock(&gw, "rush", "s1", (0, STOCK, STOCK, 0, 0)).await;
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "rush"), ("outcome", "forwarded")],
        STOCK as f64,
    )
    .await;
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "rush"), ("outcome", "sold_out")],
        (USERS as u64 - STOCK) as f64,
    )
    .await;
}

// ---------------------------------------------------------------------------
// A second click while the first attempt's answer is still streaming from
// the backend: the ticket is committed at the headers, its answer kept only
// once the body is through, so the repeat is told "in progress" (409), never
// replayed half an answer. (Found by this test; fixed in the store commit.)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_while_the_first_answer_streams_is_in_progress_on_memory() {
    duplicate_while_the_first_answer_streams(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_while_the_first_answer_streams_is_in_progress_on_redis() {
    duplicate_while_the_first_answer_streams(redis()).await;
}

/// A raw HTTP/1.1 backend that sends `200` headers at once and the body
/// only after a delay, recording each request's `X-Sluice-Ticket`.
struct SlowBody {
    addr: SocketAddr,
    /// Tickets of requests whose response headers were sent.
    heads_sent: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowBody {
    async fn start(body: &'static [u8], delay: Duration) -> SlowBody {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind slow backend");
        let addr = listener.local_addr().expect("slow backend addr");
        let heads_sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sent = heads_sent.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let sent = sent.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let ticket = text
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("x-sluice-ticket")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = stream.flush().await;
                    sent.lock().expect("heads_sent lock").push(ticket);
                    tokio::time::sleep(delay).await;
                    let _ = stream.write_all(body).await;
                    let _ = stream.flush().await;
                    // Hold the connection until the gateway closes it.
                    let _ = stream.read(&mut buf).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        SlowBody {
            addr,
            heads_sent,
            task,
        }
    }

    fn heads_sent(&self) -> Vec<String> {
        self.heads_sent.lock().expect("heads_sent lock").clone()
    }
}

impl Drop for SlowBody {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

/// 6b. The first attempt is committed when the backend's headers arrive,
///     but its body is kept only once it has streamed through. A second
///     click in between must get 409 `duplicate` with the first's ticket
///     (still in flight) or the full replay, never a 200 with an empty body.
async fn duplicate_while_the_first_answer_streams(store: StoreUnderTest) {
    const BODY: &[u8] = br#"{"order":7}"#;
    let slow = SlowBody::start(BODY, Duration::from_millis(1500)).await;
    let up = Upstream::start();
    let upstreams = format!(
        "  slow:\n    servers: [{}]\n    read_timeout: 10s\n",
        slow.addr
    );
    let gw = start_with(
        &store,
        &up,
        &[rule(
            "ds",
            &[
                "dedup: { key: [user, sku], ttl: 10m }",
                "admission: { upstream: slow }",
            ],
        )],
        Extra {
            upstreams: &upstreams,
            env: &[("RUST_LOG", "info,sluice=debug")],
            ..Extra::default()
        },
    );
    put_stock(&gw, "ds", "s1", 5).await;

    let addr = gw.listen();
    let first =
        tokio::spawn(async move { buy_with(addr, "ds", "s1", &[("x-user-id", "u1")], "{}").await });
    wait_until("the backend to send its response headers", || {
        !slow.heads_sent().is_empty()
    })
    .await;
    let ticket = slow.heads_sent()[0].clone();
    assert!(is_ticket(&ticket), "ticket {ticket:?}");

    let again = buy(&gw, "ds", "s1", "u1").await;
    let in_flight = again.status == 409
        && serde_json::from_slice::<Value>(&again.body)
            .is_ok_and(|b| b["outcome"] == "duplicate" && b["ticket"] == ticket.as_str());
    let full_replay = again.status == 200 && again.body == BODY;
    let stock_now = stock(&gw, "ds", "s1").await;
    let ok = again.header("x-sluice-outcome") == Some("duplicate") && (in_flight || full_replay);
    if !ok {
        // The gateway dies with the panic below; the first click with it.
        first.abort();
    }
    assert!(
        ok,
        "second click while the first answer streams: got {} {:?} content-type {:?} body {:?}; \
         want 409 duplicate with ticket {ticket} (or the full replay {:?}); stock view then: {stock_now}",
        again.status,
        again.header("x-sluice-outcome"),
        again.header("content-type"),
        again.text(),
        String::from_utf8_lossy(BODY),
    );

    let first = first.await.expect("first click task");
    expect(&first, 200, "forwarded");
    assert_eq!(first.body, BODY);
}
