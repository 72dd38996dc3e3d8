//! The demo's embedded mall, counted rather than timed: while an order
//! transaction sits on the stock row (the test holds the row lock, so the
//! pile-up lasts however slow the machine is), a burst straight at the mall
//! fills its connection pool and product pages are refused (the white
//! screen); the same burst through Sluice leaves the mall at most
//! `max_inflight` orders, pages keep loading, and the sale ends with
//! exactly the stock in the mall's books.

use sluice_testkit as support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_demo_mall::{EmbeddedStore, Mall, MallConfig, MallServer, MallStore};
use support::{assert_adds_up, get, put_stock, request, wait_for_stock, Gateway, Response};

const SKU: &str = "phone-1";
/// The mall's connection pool.
const POOL: usize = 4;

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
    admission: { upstream: mall, queue: { max_wait: 100ms, capacity: 1000 } }
    release_on: [connect_error, timeout, 5xx]
"#;

async fn embedded_mall(stock: u64) -> (Arc<Mall>, Arc<EmbeddedStore>, MallServer) {
    let store = Arc::new(EmbeddedStore::new(MallConfig {
        pool: POOL,
        // A request over the pool waits this long and is refused; the row
        // lock is held by the test, so no connection frees meanwhile.
        pool_wait: Duration::from_millis(100),
        row_lock_hold: Duration::ZERO,
    }));
    let mall = Mall::new(store.clone());
    mall.reset(SKU, stock).await.expect("load the sale");
    let server = mall
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("serve the mall");
    (mall, store, server)
}

/// `n` buyers order at once; each task ends with its answer.
fn burst(
    target: SocketAddr,
    n: usize,
    done: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Response>> {
    (0..n)
        .map(|b| {
            let done = done.clone();
            tokio::spawn(async move {
                let user = format!("buyer-{b}");
                let resp = request(
                    target,
                    "POST",
                    &format!("/api/seckill/{SKU}/order"),
                    &[("x-user-id", &user), ("content-type", "application/json")],
                    b"{}",
                )
                .await;
                done.fetch_add(1, Ordering::Relaxed);
                resp
            })
        })
        .collect()
}

/// Polls `cond` (a bounded loop: panics after 30 s with `what`).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn code(resp: &Response) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|v| v["code"].as_i64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sluice_a_burst_fills_the_pool_and_product_pages_fail() {
    const BURST: usize = 12;
    const PAGES: usize = 10;
    let (mall, store, server) = embedded_mall(100).await;
    let row = store.hold_row(SKU).await.expect("the row");
    let done = Arc::new(AtomicUsize::new(0));
    let orders = burst(server.addr(), BURST, done.clone());
    // POOL orders hold the connections, waiting on the row; the rest wait
    // for a connection in vain and are refused.
    let stats = mall.stats();
    until("the pool full and the rest refused", || {
        store.pool_in_use() == POOL
            && stats.orders_busy.load(Ordering::Relaxed) == (BURST - POOL) as u64
    })
    .await;

    let mut refused = 0;
    for _ in 0..PAGES {
        let page = get(server.addr(), &format!("/api/goods/{SKU}")).await;
        if page.status == 503 {
            refused += 1;
        }
    }
    assert_eq!(refused, PAGES, "every product page is a white screen");
    assert_eq!(stats.pages_busy.load(Ordering::Relaxed), PAGES as u64);
    assert_eq!(stats.orders_received.load(Ordering::Relaxed), BURST as u64);

    drop(row);
    let mut placed = 0;
    let mut busy = 0;
    for o in orders {
        let resp = o.await.expect("buyer");
        match (resp.status, code(&resp)) {
            (200, Some(0)) => placed += 1,
            (503, _) => busy += 1,
            other => panic!("unexpected answer {other:?}: {}", resp.text()),
        }
    }
    assert_eq!((placed, busy), (POOL, BURST - POOL));
    assert_eq!(done.load(Ordering::Relaxed), BURST);
    // Once the pile-up is gone, pages load again.
    assert_eq!(
        get(server.addr(), &format!("/api/goods/{SKU}"))
            .await
            .status,
        200
    );
    let books = store.books(SKU).await.expect("books");
    assert_eq!((books.orders.len(), books.stock), (POOL, 100 - POOL as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sluice_the_mall_keeps_pages_loading_and_sells_exactly_the_stock() {
    const STOCK: u64 = 10;
    const BURST: usize = 40;
    const MAX_INFLIGHT: usize = 2;
    const PAGES: usize = 10;
    let (mall, store, server) = embedded_mall(STOCK).await;
    let gw = Gateway::builder()
        .config(&format!(
            "listen: ${{LISTEN}}\n\
             admin: {{ listen: ${{ADMIN}} }}\n\
             threads: 2\n\
             store: {{ backend: memory }}\n\
             shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
             upstreams:\n  mall:\n    servers: [{}]\n    max_inflight: {MAX_INFLIGHT}\n    read_timeout: 60s\n\
             default_upstream: mall\n\
             rules: lua-free-rules/*.yaml\n",
            server.addr()
        ))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start();
    put_stock(gw.admin(), "seckill", SKU, STOCK).await;

    let row = store.hold_row(SKU).await.expect("the row");
    let done = Arc::new(AtomicUsize::new(0));
    let orders = burst(gw.listen(), BURST, done.clone());
    // Sluice lets MAX_INFLIGHT orders into the mall (stuck on the row) and
    // answers every other buyer itself: queued or sold out.
    let stats = mall.stats();
    until(
        "max_inflight orders in the mall, everyone else answered",
        || {
            stats.orders_now() == MAX_INFLIGHT as u64
                && done.load(Ordering::Relaxed) == BURST - MAX_INFLIGHT
        },
    )
    .await;
    for _ in 0..PAGES {
        let page = get(gw.listen(), &format!("/api/goods/{SKU}")).await;
        assert_eq!(page.status, 200, "a product page: {}", page.text());
    }
    assert_eq!(stats.pages_served.load(Ordering::Relaxed), PAGES as u64);
    assert_eq!(stats.pages_busy.load(Ordering::Relaxed), 0);

    drop(row);
    let mut outcomes = std::collections::BTreeMap::new();
    for o in orders {
        let resp = o.await.expect("buyer");
        let outcome = resp
            .header("x-sluice-outcome")
            .unwrap_or("none")
            .to_string();
        *outcomes.entry(outcome).or_insert(0usize) += 1;
    }
    let view = wait_for_stock(gw.admin(), "seckill", SKU, Duration::from_secs(60), |v| {
        v["queued"] == 0 && v["in_flight"] == 0
    })
    .await;
    assert_adds_up(&view);
    assert_eq!(view["sold"], STOCK, "{view} {outcomes:?}");
    assert_eq!(
        outcomes.get("sold_out").copied(),
        Some(BURST - STOCK as usize),
        "{outcomes:?}"
    );
    let books = store.books(SKU).await.expect("books");
    assert_eq!(books.stock, 0);
    assert_eq!(books.orders.len() as u64, STOCK);
    assert!(books.orders.iter().all(|o| o.ticket.is_some()));
    let users: std::collections::HashSet<&str> =
        books.orders.iter().map(|o| o.user.as_str()).collect();
    assert_eq!(users.len() as u64, STOCK, "no user twice");
    assert!(
        stats.orders_peak.load(Ordering::Relaxed) <= MAX_INFLIGHT as u64,
        "{}",
        stats.to_json()
    );
    assert_eq!(stats.orders_received.load(Ordering::Relaxed), STOCK);
}
