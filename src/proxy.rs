//! The pingora glue: each `ProxyHttp` phase is a few lines that delegate
//! to the limits, the upstream pools, the responder and the metrics.
//!
//! ```text
//!  client ──► request_filter ── over a size limit? ──► gateway answer (413/431)
//!                  │
//!                  ▼
//!            upstream_peer ──── no healthy server? ──► fail_to_proxy ─► JSON 503
//!                  │                                        ▲
//!                  ▼                                        │
//!       upstream_request_filter  (strip X-Sluice-*,         │
//!                  │              set X-Forwarded-For)      │
//!                  ▼                                        │
//!   connect ── fail_to_connect ── retry next server ────────┘ (when all failed)
//!                  │
//!                  ▼
//!      upstream_response_filter  (class metric, X-Sluice-Outcome)
//!                  │
//!                  ▼
//!              logging  (sluice_requests_total, duration)
//! ```

pub mod forwarded;
pub mod respond;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Config;
use crate::metrics::{Metrics, UpstreamClass};
use crate::outcome::{render, Answer, Outcome};
use crate::rules::UpstreamId;
use crate::upstream::Upstreams;
use respond::{write_answer, OUTCOME_HEADER};

/// Client headers with this prefix are ours and never reach the backend.
const SLUICE_HEADER_PREFIX: &str = "x-sluice-";

/// The proxy service: shared, read-only state for every request.
pub struct SluiceProxy {
    config: Arc<Config>,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
}

/// Per-request state carried across phases.
pub struct RequestCtx {
    started: Instant,
    rule: Option<Arc<str>>,
    outcome: Outcome,
    upstream: UpstreamId,
    connect_failures: usize,
    body_bytes: u64,
}

impl SluiceProxy {
    /// A proxy over the given config, pools and metrics.
    pub fn new(config: Arc<Config>, upstreams: Arc<Upstreams>, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            upstreams,
            metrics,
        }
    }

    /// Writes a gateway answer and records its outcome.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        answer: &Answer,
    ) -> Result<()> {
        let rendered = render(answer, None);
        ctx.outcome = rendered.outcome;
        write_answer(session, &rendered).await
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
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
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
        Ok(false)
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
        _ctx: &mut RequestCtx,
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
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let pool = self.upstreams.pool(ctx.upstream);
        self.metrics.observe_upstream(
            &pool.config.name,
            UpstreamClass::of_status(upstream_response.status.as_u16()),
        );
        upstream_response.insert_header(OUTCOME_HEADER, ctx.outcome.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
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

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        self.metrics
            .observe_request(ctx.rule.as_deref(), ctx.outcome, ctx.started.elapsed());
    }
}
