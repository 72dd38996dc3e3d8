//! The queue drainer: a background service that, for each upstream, takes
//! a free slot, then the oldest queued request, and sends it to the
//! backend itself, through pingora's HTTP connector with the upstream's
//! own peer settings (`backend` presents the request as the proxied path
//! does). It takes the entry's hold back from the queue and settles it
//! like the proxy: success commits the ticket and keeps the answer for the
//! client's poll; a `release_on` failure is retried with doubling backoff
//! up to `admission.queue.max_attempts`, then the units are released and
//! the ticket shows the failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;

use crate::admission::hold::Settlement;
use crate::admission::{Admission, MAX_KEPT_BODY};
use crate::backend::exchange::{self, Connector};
use crate::backend::{self, ForwardEnd};
use crate::metrics::{Metrics, UpstreamClass};
use crate::outcome::{render, Answer};
use crate::queue::rates::DrainRates;
use crate::queue::{Delivery, Queue, QueuedRequest};
use crate::store::TicketState;
use crate::upstream::slots::Slot;
use crate::upstream::{UpstreamPool, Upstreams};
use crate::vocab::{now_ms, ReleaseReason, StoredResponse};

/// How long an idle drainer waits before looking at the queue again.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// After a queue error (store down), wait longer.
const ERROR_POLL: Duration = Duration::from_millis(250);
/// How often the queue depth gauge is refreshed.
const DEPTH_EVERY: Duration = Duration::from_millis(250);

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

/// Queued requests this node is sending, for a shutdown that waits for
/// them.
#[derive(Clone, Debug, Default)]
pub struct Sending(Arc<std::sync::atomic::AtomicUsize>);

impl Sending {
    /// How many now.
    pub fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn start(&self) -> SendingGuard {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        SendingGuard(self.clone())
    }
}

/// One request being sent; counted until dropped.
struct SendingGuard(Sending);

impl Drop for SendingGuard {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Inner {
    admission: Arc<Admission>,
    upstreams: Arc<Upstreams>,
    queue: Arc<dyn Queue>,
    metrics: Arc<Metrics>,
    rates: Arc<DrainRates>,
    consumer: String,
    connector: Connector,
    sending: Sending,
}

/// The drainer service.
pub struct Drainer {
    inner: Arc<Inner>,
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
        let connector = exchange::connector(&upstreams);
        Self {
            inner: Arc::new(Inner {
                admission,
                upstreams,
                queue,
                metrics,
                rates,
                consumer,
                connector,
                sending: Sending::default(),
            }),
        }
    }

    /// The count of queued requests being sent now.
    pub fn sending(&self) -> Sending {
        self.inner.sending.clone()
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
        // A shared queue's entries are taken by other nodes (or the next
        // process); a local one's would be lost, so it drains until the
        // process exits.
        if self.inner.queue.shared() {
            for t in tasks {
                t.abort();
            }
        } else {
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

/// The body a queued order that could not be placed keeps for its poll.
fn not_placed(reason: ReleaseReason) -> StoredResponse {
    let rendered = render(
        &Answer::Unavailable {
            message: format!("the order could not be placed ({})", reason.as_str()),
        },
        None,
    );
    StoredResponse {
        status: rendered.status.as_u16(),
        content_type: Some("application/json".into()),
        body: rendered.body,
    }
}

impl Inner {
    async fn drain(self: Arc<Self>, index: usize, mut shutdown: ShutdownWatch) {
        let Some(pool) = self.upstreams.pools().get(index) else {
            return;
        };
        let name = pool.name().to_string();
        let claim_idle_ms =
            u64::try_from(pool.config().queue_claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut depth_seen: Option<Instant> = None;
        let stops = self.queue.shared();
        loop {
            if stops && *shutdown.borrow() {
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
                _ = shutdown.changed(), if stops => return,
                slot = pool.slots.acquire() => slot,
            };
            let Some(slot) = slot else { return };
            match self.queue.pop(&name, &self.consumer, claim_idle_ms).await {
                Ok(Some(delivery)) => {
                    let inner = self.clone();
                    let sending = self.sending.start();
                    tokio::spawn(async move {
                        inner.serve(index, delivery, slot).await;
                        drop(sending);
                    });
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

    /// Sends one queued request, with retries, and settles its hold.
    async fn serve(self: Arc<Self>, index: usize, delivery: Delivery, mut slot: Slot) {
        let Some(pool) = self.upstreams.pools().get(index) else {
            return;
        };
        let req = &delivery.request;
        let Some(stage) = self.admission.stage_named(&req.key.rule) else {
            // Its rule is gone (removed by a reload, renamed across a
            // restart): nobody can send it under the right rule; give its
            // units back.
            let _ = self
                .admission
                .ledger()
                .release(&req.key, req.ticket, ReleaseReason::Admin)
                .await;
            self.ack(pool.name(), &delivery).await;
            return;
        };
        let terms = Admission::terms(&stage, req.qty);
        let max_attempts = stage.rule.queue.max_attempts;
        let hold = self
            .admission
            .ledger()
            .adopt(terms, req.key.clone(), req.ticket);
        // While this node serves it (tries, backoff, waiting for a slot),
        // keep the entry's idle time below the takeover threshold.
        let _heartbeat = Heartbeat::start(
            self.queue.clone(),
            pool.name().to_string(),
            self.consumer.clone(),
            delivery.clone(),
            pool.config().queue_claim_idle / 3,
        );
        let waited = Duration::from_millis(now_ms().saturating_sub(req.queued_at_ms));
        self.metrics.observe_queue_wait(pool.name(), waited);
        self.rates.record(pool.name());
        let mut attempt = 1;
        // Whether the ticket is still live is learnt from the first lease
        // renewal (no separate read of its state).
        let mut first = true;
        loop {
            // Tell the queue this node is alive and still on it, so the
            // entry is not taken over while a slow try or a retry runs.
            if let Err(e) = self
                .queue
                .touch(pool.name(), &self.consumer, &delivery)
                .await
            {
                tracing::debug!(ticket = %req.ticket, error = %e, "queue touch failed");
            }
            // Each try renews the hold's lease for one more try; a hold
            // whose lease ran out while it waited (a sweep returned its
            // units) is not sent: it was never placed.
            match hold.set_state(TicketState::Held).await {
                Ok(true) => {}
                // Done already (a slow node finished it), released by an
                // operator, or past its lease (a sweep returned its
                // units): nothing to send.
                Ok(false) => {
                    tracing::info!(ticket = %req.ticket, "queued order no longer holds its units; not sent");
                    hold.relinquish();
                    self.ack(pool.name(), &delivery).await;
                    return;
                }
                // The store cannot say: leave the entry unacknowledged,
                // taken again after the claim idle time, when it may.
                Err(e) if first => {
                    tracing::debug!(ticket = %req.ticket, error = %e, "cannot renew a queued ticket");
                    hold.into_queue();
                    return;
                }
                Err(e) => {
                    tracing::debug!(ticket = %req.ticket, error = %e, "lease renewal failed; trying anyway");
                }
            }
            first = false;
            let (end, answer) = self.send(pool, req).await;
            let settlement = hold.classify(end);
            if settlement.releases() && attempt < max_attempts {
                drop(slot);
                tokio::time::sleep(stage.rule.queue.backoff_after(attempt)).await;
                attempt += 1;
                slot = match pool.slots.acquire().await {
                    Some(s) => s,
                    // Slots only close at shutdown: the entry stays
                    // unacknowledged and the queue keeps the hold.
                    None => return hold.into_queue(),
                };
                continue;
            }
            // Kept for the client's poll: the backend's answer, or the
            // failure.
            let kept = match (answer, settlement) {
                (Some(a), _) => a,
                (None, Settlement::Release(r) | Settlement::Keep(r)) => not_placed(r),
                (None, Settlement::Commit) => not_placed(ReleaseReason::Timeout),
            };
            if let Err(e) = hold.settle_with_answer(settlement, &kept).await {
                tracing::warn!(ticket = %req.ticket, error = %e, "could not settle a queued ticket");
                return;
            }
            self.ack(pool.name(), &delivery).await;
            drop(slot);
            return;
        }
    }

    async fn ack(&self, upstream: &str, delivery: &Delivery) {
        if let Err(e) = self.queue.ack(upstream, delivery).await {
            tracing::debug!(error = %e, "queue ack failed; the entry will be taken again");
        }
    }

    /// One try: the request as the queue keeps it, within the upstream's
    /// connect and read timeouts.
    async fn send(
        &self,
        pool: &UpstreamPool,
        req: &QueuedRequest,
    ) -> (ForwardEnd, Option<StoredResponse>) {
        let sent = match backend::request_of(req) {
            Ok(header) => self.exchange(pool, header, req.body.clone()).await,
            // An entry that cannot be written: the backend never saw it.
            Err(_) => Err(ForwardEnd::ConnectError),
        };
        match sent {
            Ok(answer) => {
                self.metrics
                    .observe_upstream(pool.name(), UpstreamClass::of_status(answer.status));
                (ForwardEnd::Answered(answer.status), Some(answer))
            }
            Err(end) => {
                self.metrics
                    .observe_upstream(pool.name(), UpstreamClass::Error);
                (end, None)
            }
        }
    }

    /// Writes the request and reads the answer: the answer's header within
    /// `connect_timeout + read_timeout` (per try), its body within
    /// `read_timeout`.
    async fn exchange(
        &self,
        pool: &UpstreamPool,
        header: RequestHeader,
        body: Bytes,
    ) -> Result<StoredResponse, ForwardEnd> {
        let budget = pool.config().connect_timeout + pool.config().read_timeout;
        let mut opened = exchange::open(&self.connector, pool, header, &body, Some(budget))
            .await
            .map_err(|f| backend::end_of(&f.error, f.sent))?;
        let session = &mut opened.session;
        let (status, content_type) = match session.response_header() {
            Some(h) => (
                h.status.as_u16(),
                h.headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            ),
            None => return Err(ForwardEnd::Reset),
        };
        let read_body = async {
            let mut kept = BytesMut::new();
            while let Some(chunk) = session.read_response_body().await? {
                let room = MAX_KEPT_BODY.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok::<_, Box<pingora_core::Error>>(kept)
        };
        let kept = match tokio::time::timeout(pool.config().read_timeout, read_body).await {
            Ok(Ok(kept)) => kept,
            Ok(Err(e)) => return Err(backend::end_of(&e, true)),
            Err(_) => return Err(ForwardEnd::Timeout),
        };
        opened.release(&self.connector).await;
        Ok(StoredResponse {
            status,
            content_type,
            body: kept.freeze(),
        })
    }
}
