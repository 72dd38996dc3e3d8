//! One canonical path, end to end through the real gateway binary and a
//! real loopback upstream: every spelling of a rule's path that the issue
//! lists (trailing slash, `//`, `/./`, `/x/../`, escaped unreserved
//! characters, `;params`, a `.json` suffix, upper case, a lower-case
//! method) gets an exact outcome and is never `passthrough`; what is
//! forwarded reaches the backend as the rule's own path (proxied or
//! queued and sent later); the stock view adds up afterwards and a normal
//! request still works. Requests go out on raw sockets, byte for byte.

use sluice_testkit as support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{mall_config, metric_value, put_stock, request, Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait and exchange.
const WAIT: Duration = Duration::from_secs(10);

/// The rule under test and two variations of it.
const RULES: &str = r#"rules:
  - name: phone
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }

  - name: tablet
    match: { method: POST, path: "/api/tablets/{sku}/order", variants: refuse }
    user: { header: X-User-Id }
    sku: { path: sku }

  - name: watch
    match:
      method: POST
      path: "/api/watches/{sku}/order"
      other_methods: pass
      case: strict
      trailing_slash: strict
      params: strict
      suffix: strict
    user: { header: X-User-Id }
    sku: { path: sku }
"#;

/// A gateway on the memory store in front of `mall` (`max_inflight`
/// slots, `max_wait` before a winner is queued).
fn start(mall: &Upstream, max_inflight: u32) -> Gateway {
    let config = mall_config(
        mall.addr(),
        "store: { backend: memory }\n",
        &format!("    max_inflight: {max_inflight}\n"),
    );
    // A short wait for a slot, so a second winner is queued at once.
    let rules = RULES.replace(
        "    sku: { path: sku }\n\n  - name: tablet",
        "    sku: { path: sku }\n    admission: { queue: { max_wait: 100ms } }\n\n  - name: tablet",
    );
    Gateway::builder()
        .config(&config)
        .file("lua-free-rules/sale.yaml", &rules)
        .start()
}

/// An answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts status and `X-Sluice-Outcome`.
    #[track_caller]
    fn expect(&self, status: u16, outcome: &str, what: &str) {
        assert_eq!(
            (self.status, self.header("x-sluice-outcome")),
            (status, Some(outcome)),
            "{what}: {}",
            self.body
        );
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `{method} {target}` with `X-User-Id: user` and a `{}` body, exactly
/// as written, on a fresh connection, and reads the whole answer.
async fn send(addr: SocketAddr, method: &str, target: &str, user: &str) -> Answer {
    let wire = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User-Id: {user}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(wire.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {target}: no answer in {WAIT:?}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {target}: not HTTP: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no status line: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The stock view once nothing is in flight (a winner's commit lands just
/// after its answer), asserted to add up: initial == available +
/// in_flight + queued + sold.
async fn stock(gw: &Gateway, rule: &str, sku: &str) -> Value {
    let mut v = Value::Null;
    for _ in 0..100 {
        let resp = request(
            gw.admin(),
            "GET",
            &format!("/admin/v1/stock/{rule}/{sku}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(resp.status, 200, "GET stock: {}", resp.text());
        v = resp.json();
        if v["in_flight"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert_eq!(
        n("initial"),
        n("available") + n("in_flight") + n("queued") + n("sold"),
        "the stock view does not add up: {v}"
    );
    v
}

/// `sluice_requests_total{rule, outcome}` (0 when the series is absent).
async fn requests_total(gw: &Gateway, rule: &str, outcome: &str) -> f64 {
    metric_value(
        &gw.metrics().await,
        "sluice_requests_total",
        &[("rule", rule), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// The request the upstream received last: its target and ticket.
#[track_caller]
fn last_forwarded(mall: &Upstream) -> (String, Option<String>, Option<String>) {
    let last = mall.last().expect("the upstream received a request");
    (
        last.uri.clone(),
        last.header("x-sluice-ticket").map(str::to_string),
        last.header("x-sluice-rule").map(str::to_string),
    )
}

/// Every spelling the issue lists (and a few more a Java or PHP router
/// reads the same way) reaches the rule, takes one unit each, and is
/// forwarded with exactly the rule's path and the client's query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_the_order_route_is_admitted_with_the_canonical_path() {
    let mall = Upstream::start();
    let gw = start(&mall, 64);
    put_stock(gw.admin(), "phone", "p1", 100).await;
    let canonical = "/api/seckill/p1/order";
    let spellings: &[(&str, &str)] = &[
        ("/api/seckill/p1/order/", canonical),
        ("/api//seckill//p1/order", canonical),
        ("//api/seckill/p1/order", canonical),
        ("/api/./seckill/p1/./order", canonical),
        ("/api/x/../seckill/p1/order", canonical),
        ("/api/seckill/%70%31/order", canonical),
        ("/%61pi/seckill/p1/ord%65r", canonical),
        ("/api/seckill/p1/order;jsessionid=0A1B2C", canonical),
        ("/api/seckill/p1;v=2/order", canonical),
        ("/api/seckill/p1/order.json", canonical),
        ("/API/SECKILL/p1/ORDER", canonical),
        // Tomcat's reading of /..;/
        ("/api/seckill/p1/x/..;/order", canonical),
        // All at once, with a query that is passed on as sent.
        (
            "/Api/SecKill/./p1//Order.json/?src=app&next=%2F",
            "/api/seckill/p1/order?src=app&next=%2F",
        ),
        // Absolute form: the path is read, the origin form is sent.
        ("http://127.0.0.1/api/seckill/p1/ORDER", canonical),
    ];
    for (i, (spelling, forwarded)) in spellings.iter().enumerate() {
        let before = mall.requests();
        let answer = send(gw.listen(), "POST", spelling, &format!("u{i}")).await;
        answer.expect(200, "forwarded", spelling);
        assert_eq!(mall.requests(), before + 1, "{spelling}");
        let (uri, ticket, rule) = last_forwarded(&mall);
        assert_eq!(uri, *forwarded, "{spelling}");
        assert_eq!(ticket.map(|t| t.len()), Some(32), "{spelling}");
        assert_eq!(rule.as_deref(), Some("phone"), "{spelling}");
    }
    let n = spellings.len() as u64;
    let view = stock(&gw, "phone", "p1").await;
    assert_eq!(
        (view["sold"].as_u64(), view["available"].as_u64()),
        (Some(n), Some(100 - n)),
        "{view}"
    );

    // The canonical spelling itself, afterwards: untouched, still sold.
    let answer = send(gw.listen(), "POST", canonical, "normal").await;
    answer.expect(200, "forwarded", canonical);
    assert_eq!(last_forwarded(&mall).0, canonical);
    assert_eq!(stock(&gw, "phone", "p1").await["sold"], n + 1);
    assert_eq!(requests_total(&gw, "none", "passthrough").await, 0.0);
    assert_eq!(
        requests_total(&gw, "phone", "forwarded").await,
        (n + 1) as f64
    );
}

/// A method in other letter case, and paths that reach the route only
/// when `%2F`, a backslash or a double encoding is decoded, are `invalid`:
/// nothing reaches the backend and no unit moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_that_must_not_pass_are_invalid() {
    let mall = Upstream::start();
    let gw = start(&mall, 64);
    put_stock(gw.admin(), "phone", "p1", 10).await;
    let refused: &[(&str, &str, &str)] = &[
        (
            "post",
            "/api/seckill/p1/order",
            "methods are case-sensitive",
        ),
        (
            "Post",
            "/API/seckill/p1/order/",
            "methods are case-sensitive",
        ),
        ("POST", "/api%2Fseckill%2Fp1%2Forder", "decoded"),
        ("POST", "/api/seckill/p1%2forder", "decoded"),
        ("POST", "/api\\seckill\\p1\\order", "decoded"),
        ("POST", "/api/seckill/p1/%256Frder", "decoded"),
        ("post", "/api/seckill%5Cp1/order", "decoded"),
        // Spring before 4.3 trims path tokens: these are its order route.
        ("POST", "/api/seckill/p1/order%20", "trimmed"),
        ("POST", "/api/seckill/p1/%09order", "trimmed"),
        ("POST", "/api/seckill/p1/order\t", "trimmed"),
        // Many legacy handlers take any method.
        (
            "PUT",
            "/api/seckill/p1/order",
            "is not taken here, this route takes POST",
        ),
        (
            "GET",
            "/api/seckill/p1/order/",
            "is not taken here, this route takes POST",
        ),
        ("DELETE", "/api/seckill/p1/order%20", "trimmed"),
    ];
    for (i, (method, target, why)) in refused.iter().enumerate() {
        let answer = send(gw.listen(), method, target, &format!("u{i}")).await;
        let what = format!("{method} {target}");
        answer.expect(400, "invalid", &what);
        let body = answer.json();
        assert_eq!(body["outcome"], "invalid", "{what}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{what}: {message}");
        assert!(
            message.contains("/api/seckill/p1/order"),
            "{what}: {message}"
        );
    }
    assert_eq!(mall.requests(), 0, "a refused spelling reached the backend");
    let view = stock(&gw, "phone", "p1").await;
    assert_eq!(
        (view["available"].as_u64(), view["sold"].as_u64()),
        (Some(10), Some(0)),
        "{view}"
    );
    assert_eq!(
        requests_total(&gw, "phone", "invalid").await,
        refused.len() as f64
    );
    assert_eq!(requests_total(&gw, "none", "passthrough").await, 0.0);

    // A normal order still goes through.
    send(gw.listen(), "POST", "/api/seckill/p1/order", "normal")
        .await
        .expect(200, "forwarded", "normal order");
    assert_eq!(last_forwarded(&mall).0, "/api/seckill/p1/order");
    assert_eq!(stock(&gw, "phone", "p1").await["sold"], 1);
}

/// `variants: refuse`: any spelling but the rule's own is `invalid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_refuses_variants_answers_invalid() {
    let mall = Upstream::start();
    let gw = start(&mall, 64);
    put_stock(gw.admin(), "tablet", "t1", 10).await;
    for (i, spelling) in [
        "/api/tablets/t1/order/",
        "/api//tablets/t1/order",
        "/api/./tablets/t1/order",
        "/api/x/../tablets/t1/order",
        "/api/tablets/%741/order",
        "/api/tablets/t1/order;jsessionid=1",
        "/api/tablets/t1/order.json",
        "/API/tablets/t1/order",
    ]
    .iter()
    .enumerate()
    {
        let answer = send(gw.listen(), "POST", spelling, &format!("u{i}")).await;
        answer.expect(400, "invalid", spelling);
        let message = answer.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains("/api/tablets/t1/order"),
            "{spelling}: {message}"
        );
    }
    assert_eq!(mall.requests(), 0);
    assert_eq!(stock(&gw, "tablet", "t1").await["available"], 10);

    let answer = send(gw.listen(), "POST", "/api/tablets/t1/order?x=1", "normal").await;
    answer.expect(200, "forwarded", "the rule's own spelling");
    assert_eq!(last_forwarded(&mall).0, "/api/tablets/t1/order?x=1");
    let view = stock(&gw, "tablet", "t1").await;
    assert_eq!(
        (view["available"].as_u64(), view["sold"].as_u64()),
        (Some(9), Some(1)),
        "{view}"
    );
}

/// A winner queued behind a busy backend is kept with the rule's path and
/// sent with it by the drainer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_variant_is_sent_later_with_the_canonical_path() {
    let mall = Upstream::start();
    let gw = start(&mall, 1);
    put_stock(gw.admin(), "phone", "p1", 10).await;

    // The one slot is busy with a slow order.
    mall.set_stall(Duration::from_secs(2));
    let listen = gw.listen();
    let first =
        tokio::spawn(async move { send(listen, "POST", "/api/seckill/p1/order", "first").await });
    let deadline = Instant::now() + WAIT;
    while mall.inflight() < 1 {
        assert!(
            Instant::now() < deadline,
            "the first order never reached the mall"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mall.set_stall(Duration::ZERO);

    let queued = send(
        listen,
        "POST",
        "/API//seckill/./p1/order.json;jsessionid=9?src=app",
        "second",
    )
    .await;
    queued.expect(202, "queued", "second order");
    let ticket = queued.json()["ticket"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(ticket.len(), 32, "{}", queued.body);

    first
        .await
        .expect("first order")
        .expect(200, "forwarded", "first order");
    // The record, not the request count: the mall counts a request as it
    // arrives and records it once its body is in.
    let deadline = Instant::now() + WAIT;
    while mall.recorded().len() < 2 {
        assert!(Instant::now() < deadline, "the queued order was never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (uri, sent_ticket, _) = last_forwarded(&mall);
    assert_eq!(uri, "/api/seckill/p1/order?src=app");
    assert_eq!(sent_ticket.as_deref(), Some(ticket.as_str()));

    // Settled once the backend answered.
    let deadline = Instant::now() + WAIT;
    loop {
        let view = stock(&gw, "phone", "p1").await;
        if view["sold"] == 2 {
            assert_eq!(view["available"], 8, "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send(listen, "POST", "/api/seckill/p1/order", "normal")
        .await
        .expect(200, "forwarded", "normal order");
    assert_eq!(stock(&gw, "phone", "p1").await["sold"], 3);
}

/// Strict options are the operator's word that the backend routes those
/// spellings elsewhere: they pass through unchanged, as does every path
/// no rule matches (no rewriting outside the rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_options_and_unmatched_paths_pass_through_unchanged() {
    let mall = Upstream::start();
    let gw = start(&mall, 64);
    put_stock(gw.admin(), "watch", "w1", 10).await;
    for spelling in [
        "/API/watches/w1/order",
        "/api/watches/w1/order/",
        "/api/watches/w1/order.json",
        "/api/watches/w1/order;jsessionid=1",
        "/static/./a//b;v=1/%7Ex",
        "/api/seckill/p1",
    ] {
        let answer = send(gw.listen(), "POST", spelling, "u1").await;
        answer.expect(200, "passthrough", spelling);
        assert_eq!(last_forwarded(&mall), (spelling.to_string(), None, None));
    }
    // `other_methods: pass`: another method is the backend's.
    for (method, spelling) in [
        ("PUT", "/api/watches/w1/order"),
        ("GET", "/api/watches/w1/order"),
    ] {
        send(gw.listen(), method, spelling, "u1").await.expect(
            200,
            "passthrough",
            &format!("{method} {spelling}"),
        );
        assert_eq!(last_forwarded(&mall), (spelling.to_string(), None, None));
    }
    // The steps of RFC 3986 still apply to a strict rule.
    let answer = send(gw.listen(), "POST", "/api//watches/./w%31/order", "u2").await;
    answer.expect(200, "forwarded", "dot segments on a strict rule");
    assert_eq!(last_forwarded(&mall).0, "/api/watches/w1/order");
    // ... and so does the method's case.
    send(gw.listen(), "post", "/api/watches/w1/order", "u3")
        .await
        .expect(400, "invalid", "lower-case method on a strict rule");
    let view = stock(&gw, "watch", "w1").await;
    assert_eq!(
        (view["available"].as_u64(), view["sold"].as_u64()),
        (Some(9), Some(1)),
        "{view}"
    );
}
