//! The admin API calls every sale test makes: load stock, read the stock
//! view, and check that it adds up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::request;

/// `PUT /admin/v1/stock/{rule}/{sku}` with `{"available": n}`; panics
/// unless 200. Gives the stock view.
pub async fn put_stock(admin: SocketAddr, rule: &str, sku: &str, n: u64) -> serde_json::Value {
    let resp = request(
        admin,
        "PUT",
        &format!("/admin/v1/stock/{rule}/{sku}"),
        &[("content-type", "application/json")],
        format!("{{\"available\": {n}}}").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "load stock: {}", resp.text());
    resp.json()
}

/// `GET /admin/v1/stock/{rule}/{sku}`; panics unless 200.
pub async fn stock_view(admin: SocketAddr, rule: &str, sku: &str) -> serde_json::Value {
    let resp = request(
        admin,
        "GET",
        &format!("/admin/v1/stock/{rule}/{sku}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(resp.status, 200, "stock view: {}", resp.text());
    resp.json()
}

/// A stock view's integer field.
pub fn field(view: &serde_json::Value, name: &str) -> u64 {
    view[name]
        .as_u64()
        .unwrap_or_else(|| panic!("stock view has no {name}: {view}"))
}

/// Panics unless `initial == available + in_flight + queued + sold`.
pub fn assert_adds_up(view: &serde_json::Value) {
    let parts = ["available", "in_flight", "queued", "sold"];
    let sum: u64 = parts.iter().map(|p| field(view, p)).sum();
    assert_eq!(
        field(view, "initial"),
        sum,
        "the stock view does not add up: {view}"
    );
}

/// Polls the stock view until `done` holds, or panics after `within` with
/// the last view.
pub async fn wait_for_stock(
    admin: SocketAddr,
    rule: &str,
    sku: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let view = stock_view(admin, rule, sku).await;
        if done(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "the stock view never got there within {within:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
