//! A burst of buyers: `concurrency` keep-alive connections share the
//! buyer ids, each buyer clicks "order" once, and every answer is recorded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One answer a buyer got.
pub struct Answer {
    /// `X-Sluice-Outcome`, or `error` when no answer came.
    pub outcome: String,
    /// HTTP status (0 when no answer came).
    pub status: u16,
    /// Time from send to the end of the answer.
    pub latency: Duration,
}

/// What the burst saw.
pub struct Report {
    /// Every answer.
    pub answers: Vec<Answer>,
    /// Wall time of the burst.
    pub elapsed: Duration,
}

impl Report {
    /// Counts by outcome label and status.
    pub fn outcomes(&self) -> BTreeMap<(&str, u16), usize> {
        let mut out = BTreeMap::new();
        for a in &self.answers {
            *out.entry((a.outcome.as_str(), a.status)).or_default() += 1;
        }
        out
    }

    /// The latency at quantile `q` (0.0-1.0).
    pub fn latency(&self, q: f64) -> Duration {
        let mut all: Vec<Duration> = self.answers.iter().map(|a| a.latency).collect();
        all.sort();
        let i = ((all.len() as f64 - 1.0) * q).round() as usize;
        all.get(i).copied().unwrap_or_default()
    }
}

/// Sends `buyers` orders for `sku` to `gateway`, `concurrency` at a time.
pub async fn burst(gateway: SocketAddr, sku: &str, buyers: u64, concurrency: u64) -> Report {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let path = format!("/api/seckill/{sku}/order");
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut conn = None;
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= buyers {
                    break;
                }
                let t0 = Instant::now();
                let (outcome, status) = match order(&mut conn, gateway, &path, id).await {
                    Ok(r) => r,
                    Err(_) => {
                        conn = None;
                        ("error".to_string(), 0)
                    }
                };
                answers.push(Answer {
                    outcome,
                    status,
                    latency: t0.elapsed(),
                });
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for w in workers {
        if let Ok(mut a) = w.await {
            answers.append(&mut a);
        }
    }
    Report {
        answers,
        elapsed: started.elapsed(),
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn order(
    conn: &mut Option<Sender>,
    gateway: SocketAddr,
    path: &str,
    buyer: u64,
) -> Result<(String, u16), String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(gateway)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        *conn = Some(sender);
    }
    let sender = conn.as_mut().ok_or("no connection")?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::post(path)
        .header("host", gateway.to_string())
        .header("x-user-id", format!("buyer-{buyer}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"qty":1}"#)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let outcome = resp
        .headers()
        .get("x-sluice-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((outcome, status))
}
