//! The demo mall on a real MariaDB (its own `mariadbd` on a free loopback
//! port, temporary data dir) behind a real gateway on the memory store: a
//! small sale with double clicks and retries must leave exactly the stock
//! in the database's orders table, no user or ticket twice and the stock
//! row at zero; a ticket delivered again, even at the same moment, is
//! answered with its first order and never makes a second row.

use sluice_testkit as support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_demo_mall::mysql_async::prelude::Queryable;
use sluice_demo_mall::{mysql_async, Mall, MallConfig, MallServer, MallStore, MySqlStore};
use support::{
    assert_adds_up, put_stock, request, wait_for_stock, Gateway, MariaDbServer, Response,
};

const SKU: &str = "phone-1";

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
    admission: { upstream: mall, queue: { max_wait: 200ms, capacity: 1000 } }
    release_on: [connect_error, timeout, 5xx]
"#;

/// The mall on `db`, serving on a free loopback port.
async fn mysql_mall(db: &MariaDbServer, stock: u64) -> (Arc<Mall>, Arc<MySqlStore>, MallServer) {
    let store = Arc::new(
        MySqlStore::connect(
            &db.url("mall"),
            MallConfig {
                pool: 20,
                pool_wait: Duration::from_secs(1),
                row_lock_hold: Duration::from_millis(2),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("connect the mall to mariadbd: {e}\n{}", db.log())),
    );
    let mall = Mall::new(store.clone());
    mall.reset(SKU, stock).await.expect("load the sale");
    let server = mall
        .serve(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("serve the mall");
    (mall, store, server)
}

/// One integer from the database.
async fn scalar(conn: &mut mysql_async::Conn, sql: &str) -> u64 {
    let v: Option<u64> = conn
        .query_first(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    v.unwrap_or_else(|| panic!("{sql}: no row"))
}

async fn order(addr: SocketAddr, user: &str, extra: &[(&str, &str)]) -> Response {
    let mut headers = vec![("x-user-id", user), ("content-type", "application/json")];
    headers.extend_from_slice(extra);
    request(
        addr,
        "POST",
        &format!("/api/seckill/{SKU}/order"),
        &headers,
        b"{}",
    )
    .await
}

/// The mall's order id in an answer that placed (or replayed) an order.
fn order_id(resp: &Response) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(&resp.body).ok()?;
    (resp.status == 200 && v["code"] == 0)
        .then(|| v["order_id"].as_u64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_through_sluice_leaves_exactly_the_stock_in_mariadb() {
    const STOCK: u64 = 20;
    const BUYERS: usize = 200;
    let db = MariaDbServer::start();
    let (_mall, store, server) = mysql_mall(&db, STOCK).await;
    let gw = Gateway::builder()
        .config(&format!(
            "listen: ${{LISTEN}}\n\
             admin: {{ listen: ${{ADMIN}} }}\n\
             threads: 2\n\
             store: {{ backend: memory }}\n\
             shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
             upstreams:\n  mall:\n    servers: [{}]\n    max_inflight: 4\n    read_timeout: 30s\n\
             default_upstream: mall\n\
             rules: lua-free-rules/*.yaml\n",
            server.addr()
        ))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start();
    put_stock(gw.admin(), "seckill", SKU, STOCK).await;

    // Every buyer clicks once; every tenth clicks twice at the same moment;
    // a buyer who sees a 5xx clicks again.
    let listen = gw.listen();
    let mut clicks = Vec::new();
    for b in 0..BUYERS {
        let times = if b % 10 == 0 { 2 } else { 1 };
        for _ in 0..times {
            clicks.push(tokio::spawn(async move {
                let user = format!("buyer-{b}");
                let mut resp = order(listen, &user, &[]).await;
                if resp.status >= 500 {
                    resp = order(listen, &user, &[]).await;
                }
                (user, resp)
            }));
        }
    }
    let mut told_placed: HashMap<String, u64> = HashMap::new();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for c in clicks {
        let (user, resp) = c.await.expect("buyer task");
        let outcome = resp
            .header("x-sluice-outcome")
            .unwrap_or("none")
            .to_string();
        *outcomes.entry(outcome).or_default() += 1;
        if let Some(id) = order_id(&resp) {
            assert!(
                told_placed.insert(user.clone(), id).is_none(),
                "{user} was told twice that an order was placed"
            );
        }
    }
    assert!(
        outcomes.get("sold_out").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
    // Queued winners are sent by the gateway itself; wait for them.
    let view = wait_for_stock(gw.admin(), "seckill", SKU, Duration::from_secs(60), |v| {
        v["queued"] == 0 && v["in_flight"] == 0
    })
    .await;
    assert_adds_up(&view);
    assert_eq!(view["sold"], STOCK, "{view}");
    assert_eq!(view["available"], 0, "{view}");

    // The database itself.
    let mut conn = store.pool().get_conn().await.expect("connection");
    assert_eq!(
        scalar(&mut conn, "SELECT COUNT(*) FROM orders").await,
        STOCK,
        "order rows"
    );
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT COUNT(*) FROM (SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(*) > 1) t"
        )
        .await,
        0,
        "a user with two orders"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT COUNT(DISTINCT ticket) FROM orders").await,
        STOCK,
        "every order carries its own ticket"
    );
    assert_eq!(
        scalar(&mut conn, "SELECT stock FROM goods WHERE sku = 'phone-1'").await,
        0,
        "the stock row"
    );
    // Everyone told "order placed" has that very order in the database.
    let rows: Vec<(u64, String)> = conn
        .query("SELECT id, user_id FROM orders")
        .await
        .expect("orders");
    let in_db: HashSet<(u64, String)> = rows.into_iter().collect();
    for (user, id) in &told_placed {
        assert!(
            in_db.contains(&(*id, user.clone())),
            "{user} was told order {id}, which is not in the database"
        );
    }
    let books = store.books(SKU).await.expect("books");
    assert_eq!(books.orders.len() as u64, STOCK);
    drop(conn);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_ticket_gets_its_first_order_and_no_second_row() {
    let db = MariaDbServer::start();
    let (mall, store, server) = mysql_mall(&db, 5).await;
    let addr = server.addr();
    let ticket = "0123456789abcdef0123456789abcdef";

    // The same ticket delivered eight times at once (a drainer's retries
    // racing each other): one row, one order id for all.
    let mut deliveries = Vec::new();
    for _ in 0..8 {
        deliveries.push(tokio::spawn(async move {
            order(addr, "u1", &[("x-sluice-ticket", ticket)]).await
        }));
    }
    let mut ids = HashSet::new();
    for d in deliveries {
        let resp = d.await.expect("delivery");
        ids.insert(order_id(&resp).unwrap_or_else(|| panic!("{}", resp.text())));
    }
    assert_eq!(ids.len(), 1, "one order for one ticket: {ids:?}");
    // Once more, later: the same order.
    let again = order(addr, "u1", &[("x-sluice-ticket", ticket)]).await;
    assert_eq!(order_id(&again).as_ref(), ids.iter().next());
    // Another ticket of the same user is a second purchase: refused.
    let other = order(
        addr,
        "u1",
        &[("x-sluice-ticket", "ffffffffffffffffffffffffffffffff")],
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.json()["code"], 1002, "{}", other.text());

    let mut conn = store.pool().get_conn().await.expect("connection");
    assert_eq!(scalar(&mut conn, "SELECT COUNT(*) FROM orders").await, 1);
    assert_eq!(
        scalar(&mut conn, "SELECT stock FROM goods WHERE sku = 'phone-1'").await,
        4,
        "one unit taken"
    );
    let stats = mall.stats().to_json();
    assert_eq!(stats["orders_placed"], 1, "{stats}");
    assert_eq!(stats["orders_replayed"], 8, "{stats}");
    assert_eq!(stats["orders_already_bought"], 1, "{stats}");
}
