//! The queue drainer: a background service that, for each upstream, takes
//! a free slot, then the oldest queued request, and sends it to the
//! backend itself. Success commits the ticket and keeps the answer for the
//! client's poll; a `release_on` failure is retried with doubling backoff
//! up to `admission.queue.max_attempts`, then the units are released and
//! the ticket shows the failure.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::{now_ms, Delivery, Queue};
use crate::admission::{Admission, Settlement, Winner, MAX_KEPT_BODY};
use crate::metrics::{Metrics, UpstreamClass};
use crate::store::{ReleaseReason, StoredResponse, TicketState};
use crate::upstream::slots::Slot;
use crate::upstream::{UpstreamPool, Upstreams};

/// How long an idle drainer waits before looking at the queue again.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// After a queue error (store down), wait longer.
const ERROR_POLL: Duration = Duration::from_millis(250);
/// Retries never wait longer than this, however many there are.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the queue depth gauge is refreshed.
const DEPTH_EVERY: Duration = Duration::from_millis(250);
/// Dispatches remembered per upstream to estimate the drain rate.
const RATE_WINDOW: usize = 64;
/// Hop-by-hop headers are the connection's, not the request's.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// Recent dispatch times of each upstream, for the ETA of a poll.
#[derive(Default)]
pub struct DrainRates {
    recent: Mutex<Vec<(String, VecDeque<Instant>)>>,
}

impl DrainRates {
    fn record(&self, upstream: &str) {
        if let Ok(mut all) = self.recent.lock() {
            let pos = all.iter().position(|(u, _)| u == upstream);
            let q = match pos {
                Some(i) => &mut all[i].1,
                None => {
                    all.push((upstream.to_string(), VecDeque::new()));
                    let last = all.len() - 1;
                    &mut all[last].1
                }
            };
            q.push_back(Instant::now());
            if q.len() > RATE_WINDOW {
                q.pop_front();
            }
        }
    }

    /// Seconds until `position` is served at the recently observed rate
    /// (`None` until there is a rate to go by).
    pub fn eta_seconds(&self, upstream: &str, position: u64) -> Option<u64> {
        let all = self.recent.lock().ok()?;
        let q = &all.iter().find(|(u, _)| u == upstream)?.1;
        let (first, last) = (q.front()?, q.back()?);
        let span = last.duration_since(*first).as_secs_f64();
        if q.len() < 2 || span <= 0.0 {
            return None;
        }
        let per_sec = (q.len() - 1) as f64 / span;
        Some((position as f64 / per_sec).ceil() as u64)
    }
}

/// Touches a queue entry periodically until dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(
        queue: Arc<dyn Queue>,
        upstream: String,
        consumer: String,
        delivery: Delivery,
        every: Duration,
    ) -> Self {
        let every = every.max(Duration::from_millis(100));
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = queue.touch(&upstream, &consumer, &delivery).await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Inner {
    admission: Arc<Admission>,
    upstreams: Arc<Upstreams>,
    queue: Arc<dyn Queue>,
    metrics: Arc<Metrics>,
    rates: Arc<DrainRates>,
    consumer: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The drainer service.
pub struct Drainer {
    inner: Arc<Inner>,
}

/// What one try of sending a queued request gave.
enum Sent {
    Answered(StoredResponse),
    Failed(ReleaseReason),
}

impl Drainer {
    /// A drainer for every upstream, identified as `consumer` in the queue.
    pub fn new(
        admission: Arc<Admission>,
        upstreams: Arc<Upstreams>,
        queue: Arc<dyn Queue>,
        metrics: Arc<Metrics>,
        rates: Arc<DrainRates>,
        consumer: String,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            inner: Arc::new(Inner {
                admission,
                upstreams,
                queue,
                metrics,
                rates,
                consumer,
                client,
            }),
        }
    }
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = Vec::new();
        for index in 0..self.inner.upstreams.pools().len() {
            let inner = self.inner.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(
                async move { inner.drain(index, shutdown).await },
            ));
        }
        let _ = shutdown.changed().await;
        for t in tasks {
            t.abort();
        }
    }
}

impl Inner {
    async fn drain(self: Arc<Self>, index: usize, mut shutdown: ShutdownWatch) {
        let Some(pool) = self.upstreams.pools().get(index) else {
            return;
        };
        let name = pool.config.name.clone();
        let claim_idle_ms =
            u64::try_from(pool.config.queue_claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut depth_seen: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            // The depth gauge follows the queue while it drains, at a
            // bounded cost (one read per DEPTH_EVERY).
            if depth_seen.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                depth_seen = Some(Instant::now());
                if let Ok(depth) = self.queue.depth(&name).await {
                    self.metrics.set_queue_depth(&name, depth);
                }
            }
            let slot = tokio::select! {
                _ = shutdown.changed() => return,
                slot = pool.slots.acquire() => slot,
            };
            let Some(slot) = slot else { return };
            match self.queue.pop(&name, &self.consumer, claim_idle_ms).await {
                Ok(Some(delivery)) => {
                    let inner = self.clone();
                    tokio::spawn(async move { inner.serve(index, delivery, slot).await });
                }
                Ok(None) => {
                    drop(slot);
                    tokio::time::sleep(IDLE_POLL).await;
                }
                Err(e) => {
                    drop(slot);
                    tracing::debug!(upstream = %name, error = %e, "queue unavailable");
                    tokio::time::sleep(ERROR_POLL).await;
                }
            }
        }
    }

    /// Sends one queued request, with retries, and settles its ticket.
    async fn serve(self: Arc<Self>, index: usize, delivery: Delivery, mut slot: Slot) {
        let Some(pool) = self.upstreams.pools().get(index) else {
            return;
        };
        let req = &delivery.request;
        let store = self.admission.store().clone();
        let state = match store.ticket(req.ticket).await {
            Ok(r) => r.map(|r| r.state),
            Err(e) => {
                // Leave it unacknowledged: it is taken again after the
                // claim idle time, when the store may answer.
                tracing::debug!(ticket = %req.ticket, error = %e, "cannot read a queued ticket");
                return;
            }
        };
        let Some(rule) = self.admission.rule_index(&req.key.rule) else {
            // Its rule is gone (renamed across a restart): nobody can send
            // it under the right rule; give its units back.
            let _ = store
                .release(&req.key, req.ticket, ReleaseReason::Admin)
                .await;
            self.ack(&pool.config.name, &delivery).await;
            return;
        };
        match state {
            Some(TicketState::Queued) | Some(TicketState::Held) => {}
            // Done already (a slow node finished it), released by an
            // operator, or expired: nothing to send.
            _ => {
                self.ack(&pool.config.name, &delivery).await;
                return;
            }
        }
        let _ = store
            .set_state(&req.key, req.ticket, TicketState::Held)
            .await;
        // While this node serves it (tries, backoff, waiting for a slot),
        // keep the entry's idle time below the takeover threshold.
        let _heartbeat = Heartbeat::start(
            self.queue.clone(),
            pool.config.name.clone(),
            self.consumer.clone(),
            delivery.clone(),
            pool.config.queue_claim_idle / 3,
        );
        let waited = Duration::from_millis(now_ms().saturating_sub(req.queued_at_ms));
        self.metrics.observe_queue_wait(&pool.config.name, waited);
        self.rates.record(&pool.config.name);
        let winner = Winner {
            rule,
            key: req.key.clone(),
            ticket: req.ticket,
            qty: req.qty,
        };
        let (max_attempts, backoff) = self.admission.stage(rule).map_or((1, Duration::ZERO), |s| {
            (s.rule.queue.max_attempts, s.rule.queue.backoff)
        });
        let mut attempt = 1;
        loop {
            // Tell the queue this node is alive and still on it, so the
            // entry is not taken over while a slow try or a retry runs.
            if let Err(e) = self
                .queue
                .touch(&pool.config.name, &self.consumer, &delivery)
                .await
            {
                tracing::debug!(ticket = %req.ticket, error = %e, "queue touch failed");
            }
            let sent = self.send(pool, &delivery).await;
            let settlement = match &sent {
                Sent::Answered(r) => Settlement::Answered {
                    status: r.status,
                    content_type: r.content_type.clone(),
                },
                Sent::Failed(reason) => Settlement::Failed(*reason),
            };
            let releases = self.admission.would_release(rule, &settlement);
            if releases && attempt < max_attempts {
                drop(slot);
                let wait = backoff
                    .checked_mul(2u32.saturating_pow(attempt - 1))
                    .unwrap_or(MAX_BACKOFF)
                    .min(MAX_BACKOFF);
                tokio::time::sleep(wait).await;
                attempt += 1;
                slot = match pool.slots.acquire().await {
                    Some(s) => s,
                    None => return,
                };
                continue;
            }
            // Kept for the client's poll: the answer, or the failure. A
            // failure is kept before the release, so a poll never sees a
            // released ticket without its reason; an answer after the
            // commit, like on the proxied path.
            let kept = match &sent {
                Sent::Answered(r) => r.clone(),
                Sent::Failed(reason) => StoredResponse {
                    status: 503,
                    content_type: Some("application/json".into()),
                    body: Bytes::from(format!(
                        "{{\"outcome\":\"unavailable\",\"message\":\"the order could not be placed ({})\"}}",
                        reason.as_str()
                    )),
                },
            };
            if releases {
                self.admission
                    .keep_body(
                        &winner,
                        kept.status,
                        kept.content_type.clone(),
                        kept.body.clone(),
                    )
                    .await;
            }
            if let Err(e) = self.admission.settle(&winner, &settlement).await {
                tracing::warn!(ticket = %req.ticket, error = %e, "could not settle a queued ticket");
                return;
            }
            if !releases {
                self.admission
                    .keep_body(&winner, kept.status, kept.content_type, kept.body)
                    .await;
            }
            self.ack(&pool.config.name, &delivery).await;
            drop(slot);
            return;
        }
    }

    async fn ack(&self, upstream: &str, delivery: &Delivery) {
        if let Err(e) = self.queue.ack(upstream, delivery).await {
            tracing::debug!(error = %e, "queue ack failed; the entry will be taken again");
        }
    }

    /// One try: the request as the client sent it, plus the ticket headers.
    async fn send(&self, pool: &UpstreamPool, delivery: &Delivery) -> Sent {
        let req = &delivery.request;
        let Some(addr): Option<SocketAddr> = pool.select_addr() else {
            return Sent::Failed(ReleaseReason::ConnectError);
        };
        let mut builder = hyper::Request::builder()
            .method(req.method.as_str())
            .uri(format!("http://{addr}{}", req.path_and_query));
        for (name, value) in &req.headers {
            if !HOP_BY_HOP.contains(&name.to_ascii_lowercase().as_str()) {
                builder = builder.header(name, value);
            }
        }
        builder = builder
            .header("x-sluice-ticket", req.ticket.to_string())
            .header("x-sluice-quantity", req.qty.to_string())
            .header("x-sluice-rule", &*req.key.rule);
        let Ok(request) = builder.body(Full::new(req.body.clone())) else {
            return Sent::Failed(ReleaseReason::ConnectError);
        };
        let budget = pool.config.connect_timeout + pool.config.read_timeout;
        let response = match tokio::time::timeout(budget, self.client.request(request)).await {
            Ok(Ok(r)) => r,
            failed => {
                self.metrics
                    .observe_upstream(&pool.config.name, UpstreamClass::Error);
                return Sent::Failed(match failed {
                    Ok(Err(e)) if e.is_connect() => ReleaseReason::ConnectError,
                    _ => ReleaseReason::Timeout,
                });
            }
        };
        let status = response.status().as_u16();
        self.metrics
            .observe_upstream(&pool.config.name, UpstreamClass::of_status(status));
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body =
            match tokio::time::timeout(pool.config.read_timeout, response.into_body().collect())
                .await
            {
                Ok(Ok(b)) => b.to_bytes(),
                _ => return Sent::Failed(ReleaseReason::Timeout),
            };
        let body = body.slice(..body.len().min(MAX_KEPT_BODY));
        Sent::Answered(StoredResponse {
            status,
            content_type,
            body,
        })
    }
}
