//! The pingora glue: each `ProxyHttp` phase makes one or two calls into
//! the admission pipeline (`intake`), the backend presentation
//! (`backend`), the responder (`respond`) or the metrics. Before any of
//! it, the connection gate hands a rule request whose whole body came with
//! its head to the fast lane (`lane`): refusals are answered there, and a
//! winner with a slot free at once is relayed (`relay`), as is a plain
//! pass-through GET; only the rest reach these phases.
//!
//! ```text
//!  client ──► request_filter ── intake: size limits, Host, ticket and stock polls ─► gateway answer
//! (HTTP or TLS)    │            rule? admission stages 2-8 ── refused ──► gateway answer
//!                  │                  winner: a Hold and a slot (or queued ► 202)
//!                  │            no rule: routes pick the upstream (else default_upstream)
//!                  │            cache rule? (`cached`) hit, stale, shared, own fetch ─► answer
//!                  │                  bypass ─► on to the backend
//!                  ▼
//!            upstream_peer ──── no healthy server? ──► fail_to_proxy
//!                  │                                      settle the hold (classify),
//!                  ▼                                      JSON 503
//!       upstream_request_filter  backend::present: the rule's own path,
//!                  │             strip X-Sluice-*, X-Forwarded-For,
//!                  │             the ticket headers
//!                  ▼
//!   connect ── fail_to_connect ── retry next server ───► fail_to_proxy when all failed
//!                  │
//!                  ▼
//!      upstream_response_filter  class metric, X-Sluice-Outcome,
//!                  │             settle the hold before the answer is written
//!                  ▼
//!      response_body_filter  keep the body for duplicates and polls
//!                  │
//!                  ▼
//!              logging  sluice_requests_total, duration; a hold still
//!                       here (client gone) is settled; the access-log line
//! ```

mod access;
mod cached;
mod intake;
pub mod lane;
pub mod relay;
pub mod respond;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::OwnedSemaphorePermit;

use crate::access_log::AccessLog;
use crate::admission::hold::{Hold, Receipt};
use crate::admission::{Admission, RuleStage};
use crate::backend::{self, ClientHop, ForwardEnd};
use crate::cache::stock::StockView;
use crate::cache::{CacheResult, ReadCache, CACHE_HEADER};
use crate::config::Config;
use crate::metrics::{Metrics, UpstreamClass};
use crate::outcome::{Answer, Outcome};
use crate::routes::Routes;
use crate::upstream::slots::Slot;
use crate::upstream::Upstreams;
use crate::vocab::{TicketId, UpstreamId};
use respond::{answered, failure_answer, write_answer, KeptAnswer, OUTCOME_HEADER};

/// The proxy service: shared, read-only state for every request.
pub struct SluiceProxy {
    config: Arc<ArcSwap<Config>>,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    routes: Arc<Routes>,
    access_log: Option<AccessLog>,
    cache: Arc<ReadCache>,
    stock: Arc<StockView>,
}

/// Per-request state carried across phases.
pub struct RequestCtx {
    started: Instant,
    /// The config in force when the request started (a reload swaps it
    /// for later requests only).
    config: Arc<Config>,
    /// The matched rule's stage, as it was when the request started.
    stage: Option<Arc<RuleStage>>,
    /// The rule's own spelling of the request's path, sent to the backend.
    path: Option<String>,
    outcome: Outcome,
    upstream: UpstreamId,
    connect_failures: usize,
    body_bytes: u64,
    /// The length of a winner's admitted body, the one forwarded.
    admitted_body: Option<u64>,
    /// A winner's units, until settled.
    hold: Option<Hold>,
    /// A winner's ticket, for the decision log line.
    ticket: Option<TicketId>,
    sent_upstream: bool,
    kept: Option<KeptAnswer>,
    pass_permit: Option<OwnedSemaphorePermit>,
    slot: Option<Slot>,
    /// The user and sku admission read, for the access log.
    user: Option<String>,
    sku: Option<String>,
    /// When a server was first chosen, and how long until the upstream's
    /// answer ended (the access log's upstream time).
    upstream_started: Option<Instant>,
    upstream_time: Option<Duration>,
    /// The cache rule that matched (the `rule` label when no flash-sale
    /// rule did).
    cache_rule: Option<Arc<str>>,
    /// Set when the cache sent the request on to the backend.
    cache_result: Option<CacheResult>,
}

impl RequestCtx {
    fn new(config: Arc<Config>) -> Self {
        Self {
            started: Instant::now(),
            upstream: config.default_upstream,
            config,
            stage: None,
            path: None,
            outcome: Outcome::Passthrough,
            connect_failures: 0,
            body_bytes: 0,
            admitted_body: None,
            hold: None,
            ticket: None,
            sent_upstream: false,
            kept: None,
            pass_permit: None,
            slot: None,
            user: None,
            sku: None,
            upstream_started: None,
            upstream_time: None,
            cache_rule: None,
            cache_result: None,
        }
    }
}

impl SluiceProxy {
    /// A proxy over the given config, pools, metrics, pipeline,
    /// pass-through routes and read path (cache and stock view).
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
        routes: Arc<Routes>,
        (cache, stock): (Arc<ReadCache>, Arc<StockView>),
    ) -> Self {
        Self {
            config,
            upstreams,
            metrics,
            admission,
            routes,
            access_log: None,
            cache,
            stock,
        }
    }

    /// Writes one access-log line per request into `log`, when set.
    pub fn with_access_log(mut self, log: Option<AccessLog>) -> Self {
        self.access_log = log;
        self
    }

    /// The socket peer's ip, when it is an inet address.
    fn peer(&self, session: &Session) -> Option<IpAddr> {
        session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
    }

    /// Where the request came from, as the backend is told.
    fn client_hop<'a>(&self, session: &Session, config: &'a Config) -> ClientHop<'a> {
        ClientHop {
            peer: self.peer(session),
            trusted: &config.trusted_proxies,
            tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
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
        let rendered = Admission::render(ctx.stage.as_deref(), answer);
        ctx.outcome = rendered.outcome;
        write_answer(session, &rendered).await
    }

    /// Settles the request's hold, if it still has one, by how its
    /// forward ended.
    async fn settle(&self, ctx: &mut RequestCtx, end: ForwardEnd) -> Option<Receipt> {
        let hold = ctx.hold.take()?;
        let how = hold.classify(end);
        Some(respond::settle(hold, how).await)
    }
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.config.load_full())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.intake(session, ctx).await
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
        if ctx.body_bytes > ctx.config.limits.max_body_bytes {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_started.get_or_insert_with(Instant::now);
        let pool = self.upstreams.pool(ctx.upstream);
        pool.select().map_or_else(
            || {
                Error::e_explain(
                    ErrorType::ConnectNoRoute,
                    format!("upstream {}: no healthy server", pool.name()),
                )
            },
            Ok,
        )
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
            .observe_upstream(pool.name(), UpstreamClass::Error);
        // The request never left: trying the next server is safe even for
        // POST. Each server gets one try per request.
        ctx.connect_failures += 1;
        if ctx.connect_failures < pool.config().servers.len() {
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
                .observe_upstream(pool.name(), UpstreamClass::Error);
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
        let from = self.client_hop(session, &ctx.config);
        let ticket = ctx.hold.as_ref().map(Hold::ticket_headers);
        backend::present(upstream_request, from, ticket, ctx.path.as_deref())?;
        ctx.sent_upstream = true;
        if let Some(hold) = ctx.hold.as_mut() {
            hold.mark_sent();
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if upstream_response.status.is_informational() {
            // 100 Continue / 103 Early Hints: not the answer yet.
            return Ok(());
        }
        let status = upstream_response.status.as_u16();
        let upstream = &self.upstreams.pool(ctx.upstream).name();
        self.metrics
            .observe_upstream(upstream, UpstreamClass::of_status(status));
        // Static values: no copy or check of a value known to be valid.
        let outcome = http::HeaderValue::from_static(ctx.outcome.as_str());
        upstream_response.insert_header(OUTCOME_HEADER, outcome)?;
        if let Some(r) = ctx.cache_result {
            upstream_response
                .insert_header(CACHE_HEADER, http::HeaderValue::from_static(r.as_str()))?;
        }
        if let Some(hold) = ctx.hold.take() {
            ctx.kept = Some(answered(hold, status, upstream_response).await);
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
        if let (Some(kept), Some(chunk)) = (&mut ctx.kept, body) {
            kept.push(chunk);
        }
        if end_of_stream {
            if let Some(kept) = ctx.kept.as_mut() {
                kept.end();
            }
            ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
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
        let delivered = backend::delivered(
            ctx.sent_upstream,
            ctx.admitted_body,
            session.upstream_body_bytes_sent(),
        );
        self.settle(ctx, backend::end_of(e, delivered)).await;
        tracing::debug!(error = %e, "request failed");
        let Some(answer) = failure_answer(e, ctx.config.limits.max_body_bytes) else {
            ctx.outcome = Outcome::Invalid;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        // Headers may already be on the wire if the upstream failed
        // mid-body; then all we can do is close.
        let code = Admission::render(None, &answer).status.as_u16();
        // A `100 Continue` sent before the body does not count as the answer.
        if session
            .response_written()
            .is_none_or(|r| r.status.is_informational())
        {
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
            rule = ctx
                .stage
                .as_ref()
                .map(|s| &*s.rule.name)
                .or(ctx.cache_rule.as_deref())
                .unwrap_or(crate::metrics::NO_RULE),
            outcome = ctx.outcome.as_str(),
            status = session.response_written().map_or(0, |r| r.status.as_u16()),
            ticket = ?ctx.ticket.map(|t| t.to_string()),
            elapsed_ms = ctx.started.elapsed().as_millis() as u64,
            "decision"
        );
        // A committing answer is committed with its body now that the
        // client has it: one store round trip per winner after the
        // reservation.
        if let Some(kept) = ctx.kept.take() {
            kept.finish().await;
        }
        // Ended without an upstream answer or a proxy failure: the client
        // went away, before the backend had the whole order or while it
        // worked (as uncertain as a timeout).
        let delivered = backend::delivered(
            ctx.sent_upstream,
            ctx.admitted_body,
            session.upstream_body_bytes_sent(),
        );
        let end = if delivered {
            ForwardEnd::Timeout
        } else {
            ForwardEnd::ClientGone { sent: false }
        };
        self.settle(ctx, end).await;
        ctx.pass_permit = None;
        ctx.slot = None;
        self.metrics.observe_request(
            ctx.stage
                .as_ref()
                .map(|s| &*s.rule.name)
                .or(ctx.cache_rule.as_deref()),
            ctx.outcome,
            ctx.started.elapsed(),
        );
        self.log_access(session, ctx);
    }
}
