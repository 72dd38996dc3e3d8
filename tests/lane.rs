//! The fast lane (the gateway's own answers to rule requests, written from
//! the connection gate without a pingora session), tried from outside with
//! raw sockets against the real binary and a real loopback upstream: its
//! answer is the one pingora's path writes, pipelined requests are answered
//! in order on one connection (refusals by the lane, the rest by pingora),
//! a winner behind refusals reaches the backend whole and once,
//! `Connection: close` closes, each answer is counted and logged, a rule's
//! header overrides never duplicate the fields the gateway sets, a CRLF
//! after a body is not a late head, and what pingora would refuse (userinfo
//! in `Host`) is never admitted.

use sluice_testkit as support;

use std::time::{Duration, Instant};

use support::shop::field;
use support::{
    expect, mall_config, metric_value, put_stock, stock_view, Gateway, RawConn, Response, Upstream,
};

/// Bound on every polling wait.
const WAIT: Duration = Duration::from_secs(10);

/// A gateway on the memory store over `mall`: rule `sale` (`POST
/// /api/sale/{sku}/order`, user from `X-User-Id`, quantity from the JSON
/// body) and rule `limited` (one order per hour for the whole rule), with
/// an access log at `access.log`.
fn start(mall: &Upstream) -> Gateway {
    let rules = "rules:\n\
        \x20 - name: sale\n\
        \x20   match: { method: POST, path: \"/api/sale/{sku}/order\" }\n\
        \x20   user: { header: X-User-Id }\n\
        \x20   sku: { path: sku }\n\
        \x20   quantity: { json: qty, max: 2 }\n\
        \x20   dedup: { key: [user, sku], ttl: 1h }\n\
        \x20 - name: limited\n\
        \x20   match: { method: POST, path: \"/api/limited/{sku}/order\" }\n\
        \x20   user: { header: X-User-Id }\n\
        \x20   sku: { path: sku }\n\
        \x20   rate_limits: [{ key: rule, rate: 1, per: 1h }]\n\
        \x20 - name: odd\n\
        \x20   match: { method: POST, path: \"/api/odd/{sku}/order\" }\n\
        \x20   user: { header: X-User-Id }\n\
        \x20   sku: { path: sku }\n\
        \x20   responses: { sold_out: { headers: { Content-Length: \"99\", Connection: close, X-Shop: \"1\" } } }\n";
    let config = mall_config(
        mall.addr(),
        "store: { backend: memory }\n\
         limits: { header_timeout: 500ms }\n\
         access_log: { path: access.log, log_user: true }\n",
        "",
    );
    Gateway::builder()
        .config(&config)
        .file("lua-free-rules/sale.yaml", rules)
        .start()
}

/// The raw bytes of an order to `rule` for `sku` by `user` with a JSON
/// body, plus `extra` header lines.
fn order(rule: &str, sku: &str, user: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/{rule}/{sku}/order HTTP/1.1\r\nHost: shop.test\r\nX-User-Id: {user}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sells `sku` out: no stock, then one order that finds none (which sets
/// the local sold-out flag every later order is refused from).
async fn sell_out(gw: &Gateway, sku: &str) {
    put_stock(gw.admin(), "sale", sku, 0).await;
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&order("sale", sku, "first", r#"{"qty":1}"#, ""))
        .await;
    expect(&c.read_final().await.expect("an answer"), 410, "sold_out");
}

/// A sold-out answer from the lane (head and body in one write) is the
/// same status, header fields and body as pingora's path writes (the body
/// sent after the head, so the lane leaves the request to pingora).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lane_answers_exactly_as_pingora_does() {
    let mall = Upstream::start();
    let gw = start(&mall);
    sell_out(&gw, "p1").await;

    let mut lane = RawConn::connect(gw.listen()).await;
    lane.send(&order("sale", "p1", "u1", r#"{"qty":1}"#, ""))
        .await;
    let by_lane = lane.read_final().await.expect("the lane's answer");

    let mut slow = RawConn::connect(gw.listen()).await;
    slow.send_with_late_tail(&order("sale", "p1", "u2", r#"{"qty":1}"#, ""), 9)
        .await;
    let by_pingora = slow.read_final().await.expect("pingora's answer");

    expect(&by_lane, 410, "sold_out");
    assert_eq!(
        Response::fields_but_date(&by_lane),
        Response::fields_but_date(&by_pingora)
    );
    assert_eq!(by_lane.body, by_pingora.body);
    assert!(by_lane.header("date").is_some(), "{:?}", by_lane.headers);
    assert_eq!(by_lane.header("connection"), Some("keep-alive"));
    // Both connections are still open for the next request.
    for c in [&mut lane, &mut slow] {
        c.send(&order("sale", "p1", "u3", r#"{"qty":1}"#, "")).await;
        expect(
            &c.read_final().await.expect("a second answer"),
            410,
            "sold_out",
        );
    }
}

/// One write carrying refusals of both rules, an invalid order, a winner
/// and a pass-through GET: every answer comes back in order on the one
/// connection, the winner reaches the backend once with its own body, and
/// the lane's answers are counted and logged like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let mall = Upstream::start();
    let gw = start(&mall);
    sell_out(&gw, "gone").await;
    put_stock(gw.admin(), "sale", "here", 5).await;
    put_stock(gw.admin(), "limited", "x", 5).await;

    let mut bytes = Vec::new();
    bytes.extend(order("sale", "gone", "a1", r#"{"qty":1}"#, ""));
    bytes.extend(order("limited", "x", "a2", "", ""));
    bytes.extend(order("limited", "x", "a3", "", ""));
    bytes.extend(order("sale", "gone", "", r#"{"qty":1}"#, ""));
    bytes.extend(order("sale", "here", "w1", r#"{"qty":2,"note":"hi"}"#, ""));
    bytes.extend(order("sale", "gone", "a4", r#"{"qty":1}"#, ""));
    bytes.extend_from_slice(b"GET /page HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&bytes).await;
    let want = [
        (410, "sold_out"),
        (200, "forwarded"),
        (429, "rate_limited"),
        (400, "invalid"),
        (200, "forwarded"),
        (410, "sold_out"),
        (200, "passthrough"),
    ];
    for (i, (status, outcome)) in want.into_iter().enumerate() {
        let resp = c
            .read_final()
            .await
            .unwrap_or_else(|e| panic!("answer {i}: {e}"));
        expect(&resp, status, outcome);
    }

    let winner: Vec<_> = mall
        .recorded()
        .into_iter()
        .filter(|r| r.header("x-user-id") == Some("w1"))
        .collect();
    assert_eq!(
        winner.len(),
        1,
        "the winner's order reached the backend once"
    );
    assert_eq!(winner[0].uri, "/api/sale/here/order");
    assert_eq!(winner[0].body, br#"{"qty":2,"note":"hi"}"#);
    assert_eq!(winner[0].header("x-sluice-quantity"), Some("2"));
    assert_eq!(
        mall.recorded().len(),
        3,
        "the winner, the one limited order and the page"
    );

    // sell_out's order and the two here: three sold_out answers.
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "sale"), ("outcome", "sold_out")],
        3.0,
    )
    .await;
    let text = gw.metrics().await;
    let count = |rule, outcome| {
        metric_value(
            &text,
            "sluice_requests_total",
            &[("rule", rule), ("outcome", outcome)],
        )
    };
    assert_eq!(count("limited", "rate_limited"), Some(1.0));
    assert_eq!(count("sale", "invalid"), Some(1.0));
    assert_eq!(count("sale", "forwarded"), Some(1.0));

    let log = gw.dir().join("access.log");
    let deadline = Instant::now() + WAIT;
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 8 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let a4 = lines
        .lines()
        .find(|l| l.contains("\"a4\""))
        .unwrap_or_else(|| panic!("no access-log line for a4:\n{lines}"));
    for part in [
        "\"sold_out\"",
        "\"sale\"",
        "\"gone\"",
        "/api/sale/gone/order",
        "410",
    ] {
        assert!(a4.contains(part), "{part} missing from {a4}");
    }
}

/// `Connection: close` gets its answer with `Connection: close`, then the
/// gateway closes the connection, whatever else was sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_answered_then_closed() {
    let mall = Upstream::start();
    let gw = start(&mall);
    sell_out(&gw, "p1").await;

    let mut bytes = order("sale", "p1", "u1", r#"{"qty":1}"#, "Connection: close\r\n");
    bytes.extend(order("sale", "p1", "u2", r#"{"qty":1}"#, ""));
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&bytes).await;
    let resp = c.read_final().await.expect("an answer");
    expect(&resp, 410, "sold_out");
    assert_eq!(resp.header("connection"), Some("close"));
    let rest = c.read_to_close().await.expect("the gateway closes");
    assert!(
        rest.is_empty(),
        "nothing after the closing answer: {rest:?}"
    );
    assert_eq!(mall.requests(), 0);
}

/// A rule's override naming `Content-Length` and `Connection` is replaced
/// by the gateway's own, on the lane as on pingora's path: one length, the
/// connection kept, the rest of the override sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_never_duplicate_the_framing_fields() {
    let mall = Upstream::start();
    let gw = start(&mall);
    put_stock(gw.admin(), "odd", "p1", 0).await;
    let mut c = RawConn::connect(gw.listen()).await;
    for user in ["u1", "u2", "u3"] {
        c.send(&order("odd", "p1", user, "", "")).await;
        let resp = c.read_final().await.expect("an answer");
        expect(&resp, 410, "sold_out");
        let named = |n: &str| {
            resp.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .count()
        };
        assert_eq!(
            (named("content-length"), named("connection")),
            (1, 1),
            "{:?}",
            resp.headers
        );
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body.len().to_string().as_str())
        );
        assert_eq!(resp.header("connection"), Some("keep-alive"));
        assert_eq!(resp.header("x-shop"), Some("1"));
    }
    let whole = order("odd", "p1", "u4", "", "");
    let (head, rest) = whole.split_at(whole.len() - 2);
    let mut slow = RawConn::connect(gw.listen()).await;
    slow.send(head).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.send(rest).await;
    let by_pingora = slow.read_final().await.expect("pingora's answer");
    c.send(&order("odd", "p1", "u5", "", "")).await;
    let by_lane = c.read_final().await.expect("the lane's answer");
    assert_eq!(
        Response::fields_but_date(&by_lane),
        Response::fields_but_date(&by_pingora)
    );
}

/// A CRLF some clients send after a body is no head: the connection then
/// waits the keep-alive time for the next request, not `header_timeout`
/// (500 ms here), and is not answered 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crlf_after_the_body_is_not_a_late_head() {
    let mall = Upstream::start();
    let gw = start(&mall);
    sell_out(&gw, "p1").await;
    let mut c = RawConn::connect(gw.listen()).await;
    let mut bytes = order("sale", "p1", "u1", r#"{"qty":1}"#, "");
    bytes.extend_from_slice(b"\r\n");
    c.send(&bytes).await;
    expect(&c.read_final().await.expect("an answer"), 410, "sold_out");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.send(&order("sale", "p1", "u2", r#"{"qty":1}"#, "")).await;
    expect(
        &c.read_final().await.expect("the next answer"),
        410,
        "sold_out",
    );
}

/// Userinfo in `Host` is pingora's to refuse (400, close): the lane leaves
/// it alone, so no unit is reserved and nothing reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_pingora_refuses_is_never_admitted() {
    let mall = Upstream::start();
    let gw = start(&mall);
    put_stock(gw.admin(), "sale", "p1", 5).await;
    let bytes = String::from_utf8(order("sale", "p1", "u1", r#"{"qty":1}"#, ""))
        .unwrap_or_default()
        .replace("Host: shop.test", "Host: me@shop.test");
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(bytes.as_bytes()).await;
    let resp = c.read_final().await.expect("an answer");
    assert_eq!(resp.status, 400, "{}", resp.text());
    let view = stock_view(gw.admin(), "sale", "p1").await;
    assert_eq!(
        (field(&view, "available"), field(&view, "in_flight")),
        (5, 0),
        "{view}"
    );
    assert_eq!(mall.requests(), 0);
}
