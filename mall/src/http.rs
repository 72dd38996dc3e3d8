//! The mall's HTTP face (HTTP/1.1, hyper), the shape of the seed's shop:
//!
//! - `POST /api/seckill/{sku}/order` with `X-User-Id` (and, through Sluice,
//!   `X-Sluice-Ticket`): 200 `{"code":0,"msg":"order placed","order_id":N}`
//!   (a redelivered ticket gets its first order again), 200 with code 1001
//!   sold out or 1002 already bought, 503 when no pool connection came free
//!   in time, 500 when the database failed;
//! - `GET /api/goods/{sku}`: the product page, which needs a pool
//!   connection too (503 when none comes free);
//! - `GET /health`: 200 without touching the database;
//! - `GET /mall/stats`: the counters of [`MallStats`] as JSON.
//!
//! An order runs in its own task, so a buyer who hangs up does not cancel
//! a transaction half way (a PHP or Java backend finishes it too).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::store::{MallStore, OrderOutcome, StoreError};

/// Largest request body read; the mall's requests are tiny.
const MAX_BODY: usize = 64 * 1024;
/// The header Sluice forwards its ticket in (DESIGN.md, section 3).
const TICKET_HEADER: &str = "x-sluice-ticket";
/// The header the demo's buyers name themselves in (the rule's `user`).
const USER_HEADER: &str = "x-user-id";

/// What the mall saw since the last [`MallStats::reset`].
#[derive(Default, Debug)]
pub struct MallStats {
    /// Order requests that reached the mall.
    pub orders_received: AtomicU64,
    /// Orders placed (a unit taken, a row inserted).
    pub orders_placed: AtomicU64,
    /// Orders answered with an earlier order of the same ticket.
    pub orders_replayed: AtomicU64,
    /// Orders refused for lack of stock.
    pub orders_sold_out: AtomicU64,
    /// Orders refused because the user already had one.
    pub orders_already_bought: AtomicU64,
    /// Orders refused with 503: no pool connection in time.
    pub orders_busy: AtomicU64,
    /// Orders that failed with 500 (database error) or were malformed.
    pub orders_failed: AtomicU64,
    /// Product pages served.
    pub pages_served: AtomicU64,
    /// Product pages refused with 503: no pool connection in time.
    pub pages_busy: AtomicU64,
    /// Product pages that failed otherwise (500, unknown sku).
    pub pages_failed: AtomicU64,
    /// Most order requests inside the mall at once (waiting for a
    /// connection, on the row lock, or in their transaction).
    pub orders_peak: AtomicU64,
    /// Order requests inside the mall now.
    orders_now: AtomicU64,
}

impl MallStats {
    /// Zeroes every counter (a new sale); requests in progress keep counting.
    pub fn reset(&self) {
        for c in [
            &self.orders_received,
            &self.orders_placed,
            &self.orders_replayed,
            &self.orders_sold_out,
            &self.orders_already_bought,
            &self.orders_busy,
            &self.orders_failed,
            &self.pages_served,
            &self.pages_busy,
            &self.pages_failed,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.orders_peak
            .store(self.orders_now.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Order requests inside the mall now.
    pub fn orders_now(&self) -> u64 {
        self.orders_now.load(Ordering::Relaxed)
    }

    /// The counters as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "orders_received": g(&self.orders_received),
            "orders_placed": g(&self.orders_placed),
            "orders_replayed": g(&self.orders_replayed),
            "orders_sold_out": g(&self.orders_sold_out),
            "orders_already_bought": g(&self.orders_already_bought),
            "orders_busy": g(&self.orders_busy),
            "orders_failed": g(&self.orders_failed),
            "orders_now": g(&self.orders_now),
            "orders_peak": g(&self.orders_peak),
            "pages_served": g(&self.pages_served),
            "pages_busy": g(&self.pages_busy),
            "pages_failed": g(&self.pages_failed),
        })
    }

    /// Counts an order request in until the guard drops.
    fn order_in(self: &Arc<Self>) -> OrderGauge {
        self.orders_received.fetch_add(1, Ordering::Relaxed);
        let now = self.orders_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.orders_peak.fetch_max(now, Ordering::Relaxed);
        OrderGauge(self.clone())
    }
}

/// One order request inside the mall.
struct OrderGauge(Arc<MallStats>);

impl Drop for OrderGauge {
    fn drop(&mut self) {
        self.0.orders_now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The mall: a store and its counters.
pub struct Mall {
    store: Arc<dyn MallStore>,
    stats: Arc<MallStats>,
}

/// A serving mall; the accept loop stops when this drops.
pub struct MallServer {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl MallServer {
    /// The address the mall listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MallServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Mall {
    /// A mall on `store`.
    pub fn new(store: Arc<dyn MallStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            stats: Arc::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn MallStore> {
        &self.store
    }

    /// The counters.
    pub fn stats(&self) -> &MallStats {
        &self.stats
    }

    /// Starts a fresh sale of `stock` units of `sku` and zeroes the counters.
    pub async fn reset(&self, sku: &str, stock: u64) -> Result<(), StoreError> {
        self.store.reset(sku, stock).await?;
        self.stats.reset();
        Ok(())
    }

    /// Binds `addr` (port 0 for a free one) and serves until the returned
    /// server drops.
    pub async fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<MallServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mall = self.clone();
        let accept = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors or a reset before accept:
                    // a real server logs and goes on accepting.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let mall = mall.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let mall = mall.clone();
                        async move { Ok::<_, Infallible>(mall.handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(MallServer { addr, accept })
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let user = header(USER_HEADER);
        let ticket = header(TICKET_HEADER);
        // Read the body as a real backend would, bounded.
        if Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .is_err()
        {
            return json(StatusCode::BAD_REQUEST, r#"{"code":400,"msg":"bad body"}"#);
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (&method, parts.as_slice()) {
            (&Method::POST, ["api", "seckill", sku, "order"]) => {
                let sku = sku.to_string();
                let mall = self.clone();
                // Its own task: a hang-up does not cut a transaction short.
                tokio::spawn(async move { mall.order(&sku, user, ticket).await })
                    .await
                    .unwrap_or_else(|_| json(StatusCode::INTERNAL_SERVER_ERROR, r#"{"code":500}"#))
            }
            (&Method::GET, ["api", "goods", sku]) => self.page(sku).await,
            (&Method::GET, ["health"]) => json(StatusCode::OK, r#"{"code":0}"#),
            (&Method::GET, ["mall", "stats"]) => {
                json(StatusCode::OK, self.stats.to_json().to_string())
            }
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"code":404,"msg":"no such page"}"#,
            ),
        }
    }

    async fn order(
        &self,
        sku: &str,
        user: Option<String>,
        ticket: Option<String>,
    ) -> Response<Full<Bytes>> {
        let s = &self.stats;
        let _inside = s.order_in();
        let user = match user.filter(|u| valid_id(u, 128)) {
            Some(u) => u,
            None => {
                s.orders_failed.fetch_add(1, Ordering::Relaxed);
                return json(
                    StatusCode::BAD_REQUEST,
                    r#"{"code":400,"msg":"X-User-Id is required"}"#,
                );
            }
        };
        if !valid_id(sku, 64) || ticket.as_deref().is_some_and(|t| !valid_id(t, 64)) {
            s.orders_failed.fetch_add(1, Ordering::Relaxed);
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"code":400,"msg":"bad sku or ticket"}"#,
            );
        }
        let placed = |order: crate::store::Order| {
            serde_json::json!({
                "code": 0, "msg": "order placed", "order_id": order.id, "sku": order.sku,
            })
            .to_string()
        };
        match self.store.order(sku, &user, ticket.as_deref()).await {
            Ok(OrderOutcome::Placed(order)) => {
                s.orders_placed.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, placed(order))
            }
            Ok(OrderOutcome::Replayed(order)) => {
                s.orders_replayed.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, placed(order))
            }
            Ok(OrderOutcome::SoldOut) => {
                s.orders_sold_out.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, r#"{"code":1001,"msg":"sold out"}"#)
            }
            Ok(OrderOutcome::AlreadyBought) => {
                s.orders_already_bought.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, r#"{"code":1002,"msg":"already bought"}"#)
            }
            Ok(OrderOutcome::NoSuchGoods) => {
                s.orders_failed.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::NOT_FOUND,
                    r#"{"code":404,"msg":"no such goods"}"#,
                )
            }
            Err(StoreError::Busy { .. }) => {
                s.orders_busy.fetch_add(1, Ordering::Relaxed);
                busy()
            }
            Err(StoreError::Db(_)) => {
                s.orders_failed.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    r#"{"code":500,"msg":"database error"}"#,
                )
            }
        }
    }

    async fn page(&self, sku: &str) -> Response<Full<Bytes>> {
        let s = &self.stats;
        if !valid_id(sku, 64) {
            s.pages_failed.fetch_add(1, Ordering::Relaxed);
            return json(StatusCode::NOT_FOUND, r#"{"code":404}"#);
        }
        match self.store.page(sku).await {
            Ok(Some(goods)) => {
                s.pages_served.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::OK,
                    serde_json::json!({
                        "code": 0, "sku": goods.sku, "name": goods.name,
                        "price_cents": goods.price_cents, "stock": goods.stock,
                    })
                    .to_string(),
                )
            }
            Ok(None) => {
                s.pages_failed.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::NOT_FOUND,
                    r#"{"code":404,"msg":"no such goods"}"#,
                )
            }
            Err(StoreError::Busy { .. }) => {
                s.pages_busy.fetch_add(1, Ordering::Relaxed);
                busy()
            }
            Err(StoreError::Db(_)) => {
                s.pages_failed.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::INTERNAL_SERVER_ERROR, r#"{"code":500}"#)
            }
        }
    }
}

/// 1 to `max` characters of `[A-Za-z0-9._:-]`.
fn valid_id(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn busy() -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"code":503,"msg":"the system is busy, please try again"}"#,
    )
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
