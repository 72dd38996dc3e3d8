//! The pingora glue: each `ProxyHttp` phase is a few lines that delegate
//! to the limits, the upstream pools, the responder and the metrics.
//!
//! ```text
//!  client ──► request_filter ── over a size limit? ──► gateway answer (413/431)
//!                  │
//!                  ├── matches a rule? ── admission pipeline ── refused ──► gateway answer
//!                  │                            │ winner (ticket)
//!                  ▼                            ▼
//!            upstream_peer ──── no healthy server? ──► fail_to_proxy ─► release, JSON 503
//!                  │                                        ▲
//!                  ▼                                        │
//!       upstream_request_filter  (strip X-Sluice-*,         │
//!                  │              set X-Forwarded-For)      │
//!                  ▼                                        │
//!   connect ── fail_to_connect ── retry next server ────────┘ (when all failed)
//!                  │
//!                  ▼
//!      upstream_response_filter  (class metric, X-Sluice-Outcome,
//!                  │           winner: commit or release before the answer)
//!                  ▼
//!      response_body_filter  (winner: keep the body for duplicates)
//!                  │
//!                  ▼
//!              logging  (sluice_requests_total, duration)
//! ```

pub mod forwarded;
pub mod respond;
pub mod tickets;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::admission::extract::RequestParts;
use crate::admission::{Admission, Candidate, Settlement, Verdict, Winner, MAX_KEPT_BODY};
use crate::config::Config;
use crate::metrics::{Metrics, UpstreamClass};
use crate::outcome::{render, Answer, Outcome};
use crate::queue::drain::DrainRates;
use crate::queue::{now_ms, Queue, QueuedRequest};
use crate::rules::UpstreamId;
use crate::store::{ReleaseReason, TicketId, TicketState};
use crate::upstream::slots::Slot;
use crate::upstream::Upstreams;
use respond::{write_answer, OUTCOME_HEADER};

/// Client headers with this prefix are ours and never reach the backend.
const SLUICE_HEADER_PREFIX: &str = "x-sluice-";

/// The proxy service: shared, read-only state for every request.
pub struct SluiceProxy {
    config: Arc<Config>,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    queue: Arc<dyn Queue>,
    rates: Arc<DrainRates>,
}

/// A winner's answer being kept for replay to duplicates.
struct KeptAnswer {
    status: u16,
    content_type: Option<String>,
    body: BytesMut,
}

/// Per-request state carried across phases.
pub struct RequestCtx {
    started: Instant,
    rule: Option<Arc<str>>,
    rule_index: Option<usize>,
    outcome: Outcome,
    upstream: UpstreamId,
    connect_failures: usize,
    body_bytes: u64,
    winner: Option<Winner>,
    settled: bool,
    sent_upstream: bool,
    kept: Option<KeptAnswer>,
    pass_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    slot: Option<Slot>,
}

/// The body length a request declares (`None` for chunked or absent).
fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The socket peer and the incoming `X-Forwarded-For` chain.
fn peer_and_chain(session: &Session) -> (IpAddr, Option<&str>) {
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let chain = session
        .req_header()
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    (peer, chain)
}

/// Which release reason a proxy error stands for.
fn failure_reason(e: &Error) -> ReleaseReason {
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::SocketError => ReleaseReason::ConnectError,
        // Timeouts, resets and closes after the request left: the backend
        // may have acted, which is what `release_on: [timeout]` is about.
        _ => ReleaseReason::Timeout,
    }
}

impl SluiceProxy {
    /// A proxy over the given config, pools, metrics and pipeline.
    pub fn new(
        config: Arc<Config>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
        queue: Arc<dyn Queue>,
        rates: Arc<DrainRates>,
    ) -> Self {
        Self {
            config,
            upstreams,
            metrics,
            admission,
            queue,
            rates,
        }
    }

    /// Writes a gateway answer (with the rule's overrides) and records its
    /// outcome.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: &Answer,
    ) -> Result<()> {
        let overrides = ctx
            .rule_index
            .and_then(|i| self.admission.stage(i))
            .and_then(|s| s.rule.responses.get(answer.outcome()));
        let rendered = render(answer, overrides);
        ctx.outcome = rendered.outcome;
        write_answer(session, &rendered).await
    }

    /// Reads a rule-matched body (bounded) into pingora's retry buffer, so
    /// it can be inspected now and still reach the backend later.
    async fn read_rule_body(
        &self,
        session: &mut Session,
    ) -> Result<std::result::Result<Bytes, Answer>> {
        let limit = self.config.limits.max_rule_body_bytes;
        session.as_downstream_mut().enable_retry_buffering();
        let mut body = BytesMut::new();
        while let Some(chunk) = session.as_downstream_mut().read_request_body().await? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > limit {
                return Ok(Err(Answer::BodyTooLarge { limit }));
            }
        }
        Ok(Ok(body.freeze()))
    }

    /// Settles a winner once, whatever path the request takes.
    async fn settle(&self, ctx: &mut RequestCtx, how: Settlement) {
        if ctx.settled {
            return;
        }
        let Some(winner) = &ctx.winner else { return };
        ctx.settled = true;
        if let Err(e) = self.admission.settle(winner, &how).await {
            // Not settled in the store: the units stay held (never
            // oversold) until an admin release or reconcile.
            tracing::warn!(ticket = %winner.ticket, error = %e, "could not settle a ticket");
        }
    }

    /// Stages 1-7 for a request that matched a rule; `Ok(true)` when the
    /// gateway has answered.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        index: usize,
        captures: Vec<(String, String)>,
    ) -> Result<bool> {
        let declared = declared_length(session.req_header());
        let limit = self.config.limits.max_rule_body_bytes;
        let body = if declared.is_some_and(|n| n > limit) {
            Err(Answer::BodyTooLarge { limit })
        } else {
            self.read_rule_body(session).await?
        };
        let body = match body {
            Ok(b) => b,
            Err(refusal) => {
                session.set_keepalive(None);
                self.answer(session, ctx, &refusal).await?;
                return Ok(true);
            }
        };
        let req = session.req_header();
        let (peer, xff) = peer_and_chain(session);
        let captures: Vec<(&str, &str)> = captures
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let candidate = Candidate {
            parts: RequestParts {
                headers: &req.headers,
                query: req.uri.query(),
                captures: &captures,
                body: Some(&body),
            },
            client_ip: forwarded::client_ip(peer, xff, &self.config.trusted_proxies),
        };
        let verdict = self.admission.admit(index, &candidate).await;
        match verdict {
            Verdict::Answer(answer) => {
                self.answer(session, ctx, &answer).await?;
                Ok(true)
            }
            Verdict::Forward(winner) => {
                // Stage 8: a slot now, or within max_wait in FIFO order,
                // or the queue.
                let max_wait = self
                    .admission
                    .stage(index)
                    .map_or(Duration::ZERO, |s| s.rule.queue.max_wait);
                let pool = self.upstreams.pool(ctx.upstream);
                ctx.winner = Some(winner);
                // While waiting, watch the client: one who leaves gets its
                // units back instead of an order nobody will read.
                let waited = tokio::select! {
                    slot = pool.slots.acquire_within(max_wait) => Some(slot),
                    _ = session.as_downstream_mut().read_body_or_idle(true) => None,
                };
                match waited {
                    Some(Some(slot)) => {
                        ctx.outcome = Outcome::Forwarded;
                        ctx.slot = Some(slot);
                        Ok(false)
                    }
                    Some(None) => {
                        self.enqueue(session, ctx, index, body).await?;
                        Ok(true)
                    }
                    None => {
                        self.settle(ctx, Settlement::Failed(ReleaseReason::ClientGone))
                            .await;
                        Error::e_explain(
                            ErrorType::ConnectionClosed,
                            "client left while waiting for a slot",
                        )
                    }
                }
            }
            Verdict::PassCapped(permit) => {
                ctx.outcome = Outcome::Forwarded;
                ctx.pass_permit = Some(permit);
                Ok(false)
            }
        }
    }

    /// Answers a ticket poll from the store (any node can).
    async fn poll_ticket(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        id: &str,
    ) -> Result<()> {
        let rendered = match TicketId::parse(id) {
            None => tickets::poll_answer(id, None, None, None),
            Some(ticket) => match self.admission.store().ticket(ticket).await {
                Err(e) => {
                    tracing::debug!(error = %e, "ticket poll: store unavailable");
                    render(
                        &Answer::Unavailable {
                            message: "the sale is busy, please try again shortly".into(),
                        },
                        None,
                    )
                }
                Ok(record) => {
                    let upstream = record
                        .as_ref()
                        .filter(|r| r.state == TicketState::Queued)
                        .and_then(|r| self.admission.rule_index(&r.key.rule))
                        .and_then(|i| self.admission.stage(i))
                        .map(|s| self.upstreams.pool(s.rule.upstream).config.name.clone());
                    let position = match &upstream {
                        Some(u) => self.queue.position(u, ticket).await.ok().flatten(),
                        None => None,
                    };
                    let eta = match (&upstream, position) {
                        (Some(u), Some(p)) => self.rates.eta_seconds(u, p),
                        _ => None,
                    };
                    tickets::poll_answer(id, record, position, eta)
                }
            },
        };
        ctx.outcome = rendered.outcome;
        write_answer(session, &rendered).await
    }

    /// Keeps a winner's request in the queue and answers `queued`; a full
    /// queue returns the units and answers `unavailable`.
    async fn enqueue(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rule: usize,
        body: Bytes,
    ) -> Result<()> {
        let Some(winner) = ctx.winner.clone() else {
            return Ok(());
        };
        let pool = self.upstreams.pool(ctx.upstream);
        let capacity = self
            .admission
            .stage(rule)
            .map_or(0, |s| s.rule.queue.capacity);
        let req = session.req_header();
        let (peer, incoming) = peer_and_chain(session);
        let mut headers: Vec<(String, String)> = req
            .headers
            .iter()
            .filter(|(n, _)| {
                !n.as_str().starts_with(SLUICE_HEADER_PREFIX) && n.as_str() != "x-forwarded-for"
            })
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.to_string(), v.to_string())))
            .collect();
        headers.push((
            "x-forwarded-for".into(),
            forwarded::forwarded_for(peer, incoming, &self.config.trusted_proxies),
        ));
        let queued = QueuedRequest {
            ticket: winner.ticket,
            key: winner.key.clone(),
            qty: winner.qty,
            method: req.method.to_string(),
            path_and_query: req
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            headers,
            body,
            queued_at_ms: now_ms(),
        };
        let answer = self
            .admission
            .enqueue(&winner, &queued, &pool.config.name, capacity)
            .await;
        // Queued, the ticket is the queue's now; refused, it was released.
        ctx.settled = true;
        self.answer(session, ctx, &answer).await
    }

    /// Checks the size limits that apply before any rule: 431 and 413.
    fn size_refusal(&self, req: &RequestHeader) -> Option<Answer> {
        let limits = &self.config.limits;
        let header_bytes: u64 = req
            .headers
            .iter()
            // name + ": " + value + CRLF, as on the wire.
            .map(|(n, v)| (n.as_str().len() + v.len() + 4) as u64)
            .sum();
        if header_bytes > limits.max_header_bytes {
            return Some(Answer::HeadersTooLarge {
                limit: limits.max_header_bytes,
            });
        }
        let declared = declared_length(req);
        match declared {
            Some(n) if n > limits.max_body_bytes => Some(Answer::BodyTooLarge {
                limit: limits.max_body_bytes,
            }),
            _ => None,
        }
    }
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            rule: None,
            outcome: Outcome::Passthrough,
            upstream: self.config.default_upstream,
            connect_failures: 0,
            body_bytes: 0,
            rule_index: None,
            winner: None,
            settled: false,
            sent_upstream: false,
            kept: None,
            pass_permit: None,
            slot: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(refusal) = self.size_refusal(session.req_header()) {
            // The body was not read: the connection cannot be reused.
            session.set_keepalive(None);
            self.answer(session, ctx, &refusal).await?;
            return Ok(true);
        }
        ctx.upstream = self.config.default_upstream;
        let req = session.req_header();
        if req.method == http::Method::GET {
            if let Some(id) = req.uri.path().strip_prefix(tickets::TICKETS_PATH) {
                let id = id.to_string();
                self.poll_ticket(session, ctx, &id).await?;
                return Ok(true);
            }
        }
        let Some(m) = self.admission.find(&req.method, req.uri.path()) else {
            return Ok(false);
        };
        let index = m.index;
        ctx.rule = Some(m.rule.name.clone());
        ctx.rule_index = Some(index);
        ctx.upstream = m.rule.upstream;
        let captures = m
            .captures
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.admit(session, ctx, index, captures).await
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Chunked bodies have no Content-Length to check up front.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > self.config.limits.max_body_bytes {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pool = self.upstreams.pool(ctx.upstream);
        match pool.select() {
            Some(peer) => Ok(peer),
            None => Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {}: no healthy server", pool.config.name),
            ),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let pool = self.upstreams.pool(ctx.upstream);
        self.metrics
            .observe_upstream(&pool.config.name, UpstreamClass::Error);
        // The request never left: trying the next server is safe even for
        // POST. Each server gets one try per request.
        ctx.connect_failures += 1;
        if ctx.connect_failures < pool.config.servers.len() {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if e.esource() == &ErrorSource::Upstream {
            let pool = self.upstreams.pool(ctx.upstream);
            self.metrics
                .observe_upstream(&pool.config.name, UpstreamClass::Error);
        }
        let mut e = e.more_context(format!("peer: {peer}"));
        // Only idempotent requests on a reused connection may be retried:
        // the backend may already have acted on anything else.
        if !session.req_header().method.is_idempotent() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let ours: Vec<http::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|n| n.as_str().starts_with(SLUICE_HEADER_PREFIX))
            .cloned()
            .collect();
        for name in ours {
            upstream_request.remove_header(&name);
        }
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let incoming = upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok());
            let xff = forwarded::forwarded_for(peer, incoming, &self.config.trusted_proxies);
            upstream_request.insert_header("X-Forwarded-For", xff)?;
        }
        if let Some(w) = &ctx.winner {
            upstream_request.insert_header("X-Sluice-Ticket", w.ticket.to_string())?;
            upstream_request.insert_header("X-Sluice-Quantity", w.qty.to_string())?;
            upstream_request.insert_header("X-Sluice-Rule", &*w.key.rule)?;
        }
        ctx.sent_upstream = true;
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let pool = self.upstreams.pool(ctx.upstream);
        let status = upstream_response.status.as_u16();
        if upstream_response.status.is_informational() {
            // 100 Continue / 103 Early Hints: not the answer yet.
            return Ok(());
        }
        self.metrics
            .observe_upstream(&pool.config.name, UpstreamClass::of_status(status));
        upstream_response.insert_header(OUTCOME_HEADER, ctx.outcome.as_str())?;
        if ctx.winner.is_some() && !ctx.settled {
            let content_type = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            self.settle(
                ctx,
                Settlement::Answered {
                    status,
                    content_type: content_type.clone(),
                },
            )
            .await;
            ctx.kept = Some(KeptAnswer {
                status,
                content_type,
                body: BytesMut::new(),
            });
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(kept) = &mut ctx.kept {
            if let Some(chunk) = body {
                let room = MAX_KEPT_BODY.saturating_sub(kept.body.len());
                kept.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if end_of_stream {
                if let (Some(kept), Some(winner)) = (ctx.kept.take(), ctx.winner.clone()) {
                    // Off the answer's path: the state is already committed.
                    let admission = self.admission.clone();
                    tokio::spawn(async move {
                        admission
                            .keep_body(&winner, kept.status, kept.content_type, kept.body.freeze())
                            .await;
                    });
                }
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // Release (or keep, per release_on) before the answer is written.
        if ctx.winner.is_some() && !ctx.settled {
            let reason = if e.esource() == &ErrorSource::Downstream && !ctx.sent_upstream {
                Some(ReleaseReason::ClientGone)
            } else if e.esource() == &ErrorSource::Downstream {
                // The client left after the backend was asked: we cannot
                // know what it did; the units stay held for reconcile.
                None
            } else {
                Some(failure_reason(e))
            };
            match reason {
                Some(r) => self.settle(ctx, Settlement::Failed(r)).await,
                None => {
                    ctx.settled = true;
                    tracing::warn!(error = %e, "client left after its order was sent; ticket left in flight");
                }
            }
        }
        let answer = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(413), _) => Some(Answer::BodyTooLarge {
                limit: self.config.limits.max_body_bytes,
            }),
            // The client went away or sent garbage: nothing useful to say.
            (_, ErrorSource::Downstream) => None,
            _ => Some(Answer::Unavailable {
                message: "the shop is busy, please try again shortly".into(),
            }),
        };
        tracing::debug!(error = %e, "request failed");
        let Some(answer) = answer else {
            ctx.outcome = Outcome::Invalid;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        // Headers may already be on the wire if the upstream failed
        // mid-body; then all we can do is close.
        let code = render(&answer, None).status.as_u16();
        if session.response_written().is_none() {
            if let Err(write_err) = self.answer(session, ctx, &answer).await {
                tracing::debug!(error = %write_err, "could not write the error answer");
            }
        } else {
            ctx.outcome = answer.outcome();
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Failures are counted in metrics and logged at debug by
        // fail_to_proxy; an error line per request would flood the log
        // exactly when the backend is down.
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // One line per decision, at debug only: never per request at info.
        tracing::debug!(
            rule = ctx.rule.as_deref().unwrap_or(crate::metrics::NO_RULE),
            outcome = ctx.outcome.as_str(),
            status = session.response_written().map_or(0, |r| r.status.as_u16()),
            ticket = ?ctx.winner.as_ref().map(|w| w.ticket.to_string()),
            elapsed_ms = ctx.started.elapsed().as_millis() as u64,
            "decision"
        );
        if ctx.winner.is_some() && !ctx.settled {
            // Ended without an upstream answer or a proxy failure (the
            // client went away early): the backend was never asked.
            let reason = if ctx.sent_upstream {
                ReleaseReason::Timeout
            } else {
                ReleaseReason::ClientGone
            };
            self.settle(ctx, Settlement::Failed(reason)).await;
        }
        ctx.pass_permit = None;
        ctx.slot = None;
        self.metrics
            .observe_request(ctx.rule.as_deref(), ctx.outcome, ctx.started.elapsed());
    }
}
