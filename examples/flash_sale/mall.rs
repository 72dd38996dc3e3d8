//! A stand-in for a legacy mall backend: every order takes a lock on the
//! sku's stock row (like `SELECT ... FOR UPDATE` in MySQL), holds it for a
//! few milliseconds, and decrements stock if any is left. Under a burst,
//! orders pile up on that lock exactly as they do in a real shop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the mall saw, for the report.
#[derive(Default)]
pub struct MallStats {
    /// Order requests that reached the mall.
    pub orders_received: AtomicU64,
    /// Orders that got a unit.
    pub orders_sold: AtomicU64,
    /// Orders refused for lack of stock.
    pub orders_refused: AtomicU64,
    /// Other requests (browsing, health checks).
    pub other_requests: AtomicU64,
    /// Most orders waiting on the row lock at once.
    pub peak_waiting: AtomicU64,
    waiting: AtomicU64,
}

/// The mall: stock rows behind a lock, and its counters.
pub struct Mall {
    stock: tokio::sync::Mutex<HashMap<String, u64>>,
    /// Users who bought, to show whether anyone bought twice.
    buyers: Mutex<HashMap<String, u64>>,
    row_lock_hold: Duration,
    /// Counters for the report.
    pub stats: MallStats,
}

impl Mall {
    /// A mall with `units` of `sku`, holding the row lock this long per order.
    pub fn new(sku: &str, units: u64, row_lock_hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            stock: tokio::sync::Mutex::new(HashMap::from([(sku.to_string(), units)])),
            buyers: Mutex::new(HashMap::new()),
            row_lock_hold,
            stats: MallStats::default(),
        })
    }

    /// Users who bought more than once.
    pub fn repeat_buyers(&self) -> usize {
        self.buyers
            .lock()
            .map(|b| b.values().filter(|n| **n > 1).count())
            .unwrap_or(0)
    }

    /// Serves HTTP/1.1 on a free loopback port until the process ends.
    pub async fn serve(self: Arc<Self>) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mall = self.clone();
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
        Ok(addr)
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let user = req
            .headers()
            .get("x-user-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("anonymous")
            .to_string();
        // Drain the body like a real backend would.
        let _ = req.into_body().collect().await;
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["api", "seckill", sku, "order"] => self.order(sku, &user).await,
            _ => {
                self.stats.other_requests.fetch_add(1, Ordering::Relaxed);
                json(
                    StatusCode::OK,
                    r#"{"code":0,"msg":"welcome to the mall"}"#.into(),
                )
            }
        }
    }

    async fn order(&self, sku: &str, user: &str) -> Response<Full<Bytes>> {
        let s = &self.stats;
        s.orders_received.fetch_add(1, Ordering::Relaxed);
        let waiting = s.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        s.peak_waiting.fetch_max(waiting, Ordering::Relaxed);
        let mut rows = self.stock.lock().await;
        s.waiting.fetch_sub(1, Ordering::Relaxed);
        // The row lock is held for the whole transaction.
        tokio::time::sleep(self.row_lock_hold).await;
        let left = rows.get_mut(sku);
        match left {
            Some(n) if *n > 0 => {
                *n -= 1;
                s.orders_sold.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut b) = self.buyers.lock() {
                    *b.entry(user.to_string()).or_default() += 1;
                }
                json(
                    StatusCode::OK,
                    format!(r#"{{"code":0,"msg":"order placed","sku":"{sku}"}}"#),
                )
            }
            _ => {
                s.orders_refused.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, r#"{"code":1001,"msg":"sold out"}"#.into())
            }
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
