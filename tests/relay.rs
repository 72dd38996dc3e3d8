//! The relay (a winner with a free slot, or a plain pass-through GET, sent
//! to the backend and answered from the connection gate without a pingora
//! session), tried from outside with raw sockets against the real binary
//! and real loopback backends: the backend receives what the gateway
//! decided on (the rule's path, the admitted body with its own length, the
//! gateway's ticket and forwarding headers, no hop-by-hop or client
//! `X-Sluice-*` fields); the client gets the same answer as pingora's path
//! writes for the same order or page; chunked, close-delimited and large
//! answers reach the client whole; and a backend that cannot be reached,
//! or fails the order, gets the units back.

use sluice_testkit as support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use support::{expect, mall_config, put_stock, stock_view, Gateway, RawConn, Response, Upstream};

/// Bound on every polling wait.
const WAIT: Duration = Duration::from_secs(10);

/// A gateway on the memory store over the backend at `mall`: rule `sale`
/// (`POST /api/sale/{sku}/order`, user from `X-User-Id`, quantity from
/// the JSON body, one order per user and sku).
fn start(mall: SocketAddr) -> Gateway {
    let rules = "rules:\n\
        \x20 - name: sale\n\
        \x20   match: { method: POST, path: \"/api/sale/{sku}/order\" }\n\
        \x20   user: { header: X-User-Id }\n\
        \x20   sku: { path: sku }\n\
        \x20   quantity: { json: qty, max: 2 }\n\
        \x20   dedup: { key: [user, sku], ttl: 1h }\n";
    let config = mall_config(mall, "store: { backend: memory }\n", "");
    Gateway::builder()
        .config(&config)
        .file("lua-free-rules/sale.yaml", rules)
        .start()
}

/// The raw bytes of an order for `sku` by `user` with a JSON body and a
/// query, plus `extra` header lines.
fn order(sku: &str, user: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/sale/{sku}/order?src=app HTTP/1.1\r\nHost: shop.test\r\nX-User-Id: {user}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The relay's answer and pingora's to the same request agree: the same
/// fields, in the same order, but `Date`; and the same body, as the mall
/// echoes the request (only its request count differs).
fn same_answer(by_relay: &Response, by_pingora: &Response) {
    assert_eq!(
        Response::fields_but_date(by_relay),
        Response::fields_but_date(by_pingora)
    );
    let echo = |r: &Response| {
        let mut v = r.json();
        v["n"] = serde_json::Value::Null;
        v
    };
    assert_eq!(echo(by_relay), echo(by_pingora));
}

/// Waits until the stock view of `sku` shows `field` at `value`.
async fn wait_stock(gw: &Gateway, sku: &str, field: &str, value: u64) -> serde_json::Value {
    let until = Instant::now() + WAIT;
    loop {
        let view = stock_view(gw.admin(), "sale", sku).await;
        if view[field] == value || Instant::now() > until {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A winner's order, sent whole in one write (the relay's) and with its
/// body late (pingora's path): the client gets the same fields and body
/// from both, the backend gets the rule's path and query, the admitted
/// body with its own length and the gateway's ticket and forwarding
/// headers; the client's hop-by-hop and `X-Sluice-*` fields never reach
/// it, and the connection serves the next order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_winner_is_sent_and_answered_as_the_proxy_would() {
    let mall = Upstream::start();
    mall.set_response_headers(&[("X-Order-Id", "7")]);
    let gw = start(mall.addr());
    put_stock(gw.admin(), "sale", "p1", 10).await;
    put_stock(gw.admin(), "sale", "p2", 10).await;
    let extra = "X-Sluice-Ticket: forged\r\nX-Forwarded-For: 6.6.6.6\r\n\
                 Keep-Alive: timeout=5\r\nConnection: keep-alive\r\n";

    let mut relayed = RawConn::connect(gw.listen()).await;
    relayed
        .send(&order("p1", "u1", r#"{"qty":1}"#, extra))
        .await;
    let by_relay = relayed.read_final().await.expect("the relay's answer");
    let seen_by_relay = mall.last().expect("the backend got the relayed order");

    let mut slow = RawConn::connect(gw.listen()).await;
    slow.send_with_late_tail(&order("p1", "u2", r#"{"qty":1}"#, extra), 9)
        .await;
    let by_pingora = slow.read_final().await.expect("pingora's answer");

    expect(&by_relay, 200, "forwarded");
    assert_eq!(by_relay.header("X-Order-Id"), Some("7"));
    same_answer(&by_relay, &by_pingora);
    assert!(by_relay.header("date").is_some());

    assert_eq!(seen_by_relay.uri, "/api/sale/p1/order?src=app");
    assert_eq!(seen_by_relay.body, br#"{"qty":1}"#);
    assert_eq!(seen_by_relay.header("content-length"), Some("9"));
    assert_eq!(seen_by_relay.header("x-user-id"), Some("u1"));
    assert_eq!(seen_by_relay.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen_by_relay.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen_by_relay.header("x-sluice-rule"), Some("sale"));
    assert_eq!(seen_by_relay.header("x-sluice-quantity"), Some("1"));
    let ticket = seen_by_relay.header("x-sluice-ticket").expect("a ticket");
    assert!(
        ticket.len() == 32 && ticket.bytes().all(|b| b.is_ascii_hexdigit()),
        "{ticket}"
    );
    for hop in ["keep-alive", "connection", "transfer-encoding"] {
        assert_eq!(seen_by_relay.header(hop), None, "{hop} reached the backend");
    }
    let ours = seen_by_relay
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-sluice-"))
        .count();
    assert_eq!(ours, 3, "{:?}", seen_by_relay.headers);

    // The connection serves the next order, relayed again.
    relayed.send(&order("p2", "u1", r#"{"qty":2}"#, "")).await;
    expect(
        &relayed.read_final().await.expect("a second answer"),
        200,
        "forwarded",
    );
    assert_eq!(mall.last().map(|r| r.body), Some(br#"{"qty":2}"#.to_vec()));

    // Committed once answered; a repeat is answered from the kept answer.
    let view = wait_stock(&gw, "p1", "sold", 2).await;
    assert_eq!(
        (&view["sold"], &view["in_flight"]),
        (&2.into(), &0.into()),
        "{view}"
    );
    let before = mall.requests();
    relayed.send(&order("p1", "u1", r#"{"qty":1}"#, "")).await;
    let repeat = relayed.read_final().await.expect("the repeat's answer");
    assert_eq!(repeat.status, 200, "{}", repeat.text());
    assert_eq!(repeat.body, by_relay.body);
    assert_eq!(
        mall.requests(),
        before,
        "a repeat never reaches the backend"
    );
}

/// A backend that answers each connection's request with the next of
/// `answers` (raw bytes), then closes that connection; it waits at most
/// `WAIT` for each connection. Answers that frame their own end say
/// `Connection: close`: a kept connection the backend closes unannounced
/// may be taken for the next order before its close is seen, and an order
/// is never sent twice.
fn raw_backend(answers: Vec<&'static [u8]>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        // Bounded: a connection that never comes ends the thread.
        listener.set_nonblocking(true).expect("nonblocking");
        for answer in answers {
            let until = Instant::now() + WAIT;
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            };
            conn.set_nonblocking(false).expect("blocking");
            conn.set_read_timeout(Some(WAIT)).expect("timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // The whole request: its head and the body its length names.
            loop {
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if got.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let _ = conn.write_all(answer);
            // Dropped: closed after each answer.
        }
    });
    (addr, thread)
}

/// A backend that answers in chunks, then one that ends its body by
/// closing: each answer reaches the client whole, chunked, and the order
/// is committed with it; then one that answers 101 to a plain order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_answers_reach_the_client_whole() {
    let (addr, backend) = raw_backend(vec![
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nX-Shop: a\r\n\r\n\
          5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nConnection: close\r\nX-Shop: b\r\n\r\nplaced by close",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ]);
    let gw = start(addr);
    put_stock(gw.admin(), "sale", "p1", 10).await;
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&order("p1", "u1", r#"{"qty":1}"#, "")).await;
    let first = c.read_final().await.expect("the chunked answer");
    expect(&first, 200, "forwarded");
    assert_eq!(first.body, b"hello, world");
    assert_eq!(first.header("transfer-encoding"), Some("chunked"));
    assert_eq!(first.header("x-shop"), Some("a"));

    c.send(&order("p1", "u2", r#"{"qty":1}"#, "")).await;
    let second = c.read_final().await.expect("the close-delimited answer");
    expect(&second, 201, "forwarded");
    assert_eq!(second.body, b"placed by close");
    assert_eq!(second.header("connection"), Some("keep-alive"));
    assert_eq!(second.header("x-shop"), Some("b"));
    let view = wait_stock(&gw, "p1", "sold", 2).await;
    assert_eq!(
        (&view["sold"], &view["in_flight"]),
        (&2.into(), &0.into()),
        "{view}"
    );

    // A 101 to an order that asked for no upgrade is a broken answer: not
    // passed on, and no sale.
    c.send(&order("p1", "u3", r#"{"qty":1}"#, "")).await;
    let third = c.read_final().await.expect("an answer to the third order");
    expect(&third, 503, "unavailable");
    let view = stock_view(gw.admin(), "sale", "p1").await;
    assert_eq!(view["sold"], 2, "{view}");
    backend.join().expect("the backend thread");
}

/// A backend nobody listens on: the winner is answered `unavailable` and
/// its units come back; a backend that fails the order (500) is answered
/// with its own failure and the units come back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_take_the_order_gets_the_units_back() {
    let gone = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = gone.local_addr().expect("addr");
    drop(gone);
    let gw = start(addr);
    put_stock(gw.admin(), "sale", "p1", 1).await;
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&order("p1", "u1", r#"{"qty":1}"#, "")).await;
    let resp = c.read_final().await.expect("an answer");
    expect(&resp, 503, "unavailable");
    let view = wait_stock(&gw, "p1", "available", 1).await;
    assert_eq!(
        (&view["available"], &view["in_flight"]),
        (&1.into(), &0.into()),
        "{view}"
    );

    let mall = Upstream::start();
    mall.set_status(500);
    let gw = start(mall.addr());
    put_stock(gw.admin(), "sale", "p1", 1).await;
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&order("p1", "u1", r#"{"qty":1}"#, "")).await;
    let resp = c.read_final().await.expect("an answer");
    expect(&resp, 500, "forwarded");
    let view = wait_stock(&gw, "p1", "available", 1).await;
    assert_eq!(
        (&view["available"], &view["in_flight"]),
        (&1.into(), &0.into()),
        "{view}"
    );
    assert_eq!(mall.requests(), 1);
}

/// A plain pass-through GET, `extra` header lines added.
fn page(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: t\r\n{extra}\r\n").into_bytes()
}

/// A pass-through GET is relayed as pingora's path forwards it: the client
/// gets the same fields and body (a large one included) as from pingora's
/// path (the head spelled with two `Connection` lines, which the lane
/// leaves to pingora); the backend gets the path and query as sent and the
/// gateway's forwarding headers, and no hop-by-hop or `X-Sluice-*` field;
/// requests pipelined in one write are answered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_get_is_relayed_as_the_proxy_would_forward_it() {
    let mall = Upstream::start();
    mall.set_response_headers(&[("Cache-Control", "max-age=5")]);
    let gw = start(mall.addr());
    let extra = "X-Sluice-Ticket: forged\r\nX-Forwarded-For: 6.6.6.6\r\nKeep-Alive: timeout=5\r\n";

    let mut relayed = RawConn::connect(gw.listen()).await;
    relayed
        .send(&page(
            "/products/1?p=%2Fx&q",
            &format!("{extra}Connection: keep-alive\r\n"),
        ))
        .await;
    let by_relay = relayed.read_final().await.expect("the relay's answer");
    let seen = mall.last().expect("the backend got the page request");

    let mut other = RawConn::connect(gw.listen()).await;
    let twice = "Connection: keep-alive\r\nConnection: keep-alive\r\n";
    other
        .send(&page("/products/1?p=%2Fx&q", &format!("{extra}{twice}")))
        .await;
    let by_pingora = other.read_final().await.expect("pingora's answer");

    expect(&by_relay, 200, "passthrough");
    assert_eq!(by_relay.header("cache-control"), Some("max-age=5"));
    assert_eq!(by_relay.header("connection"), Some("keep-alive"));
    same_answer(&by_relay, &by_pingora);

    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("GET", "/products/1?p=%2Fx&q")
    );
    assert!(seen.body.is_empty());
    assert_eq!(seen.header("host"), Some("shop.test"));
    assert_eq!(seen.header("user-agent"), Some("t"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    for gone in [
        "keep-alive",
        "connection",
        "content-length",
        "x-sluice-ticket",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the backend");
    }

    // A large answer reaches the client whole, on the same connection.
    mall.set_padding(200_000);
    relayed.send(&page("/products/2", "")).await;
    let large = relayed.read_final().await.expect("the large answer");
    expect(&large, 200, "passthrough");
    assert_eq!(large.json()["pad"].as_str().map(str::len), Some(200_000));
    assert_eq!(
        large.header("content-length"),
        Some(large.body.len().to_string().as_str())
    );
    mall.set_padding(0);

    // Two pages pipelined in one write: both answered, in order.
    let mut both = page("/products/3", "");
    both.extend_from_slice(&page("/products/4", ""));
    relayed.send(&both).await;
    for want in ["/products/3", "/products/4"] {
        let r = relayed.read_final().await.expect("a pipelined answer");
        expect(&r, 200, "passthrough");
        assert_eq!(r.json()["uri"], want);
    }
}

/// A pass-through GET whose backend is not listening gets the same
/// `unavailable` answer from the relay as from pingora's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_get_to_a_dead_backend_is_answered_as_the_proxy_would() {
    let gone = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = gone.local_addr().expect("addr");
    drop(gone);
    let gw = start(addr);
    let mut c = RawConn::connect(gw.listen()).await;
    c.send(&page("/products/1", "")).await;
    let by_relay = c.read_final().await.expect("the relay's answer");
    let mut other = RawConn::connect(gw.listen()).await;
    other
        .send(&page(
            "/products/1",
            "Connection: keep-alive\r\nConnection: keep-alive\r\n",
        ))
        .await;
    let by_pingora = other.read_final().await.expect("pingora's answer");
    expect(&by_relay, 503, "unavailable");
    assert_eq!(
        Response::fields_but_date(&by_relay),
        Response::fields_but_date(&by_pingora)
    );
    assert_eq!(by_relay.body, by_pingora.body);
}
