//! What `request_filter` does with a request, read off the pingora
//! session: size limits, ticket and stock polls, rule matching (on the
//! canonical path; a refused spelling is `invalid`; no rule: the
//! pass-through route, then the read cache, `cached`), reading a rule's
//! body, and handing the attempt to the admission pipeline (stages 2-8).
//! Only session plumbing lives here; every decision is the pipeline's.

use bytes::{Bytes, BytesMut};
use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::{RequestCtx, SluiceProxy};
use crate::admission::extract::{Attempt, RequestParts};
use crate::admission::hold::Hold;
use crate::admission::overflow::Waited;
use crate::admission::{Candidate, RuleStage, Verdict};
use crate::backend::{self, forwarded};
use crate::config::{Config, Limits};
use crate::outcome::{Answer, Outcome};
use crate::queue::QueuedRequest;
use crate::rules::Route;

/// A rule-matched request's verdict: the lane's, or one to reach now from
/// the route's captures.
enum Judgement<'a> {
    /// The lane judged it from the same bytes.
    Made(Verdict, Option<Attempt>),
    /// To judge here.
    ToMake(&'a [(&'a str, &'a str)]),
}

/// The path prefix of ticket polls.
pub(super) const TICKETS_PATH: &str = "/sluice/tickets/";

/// The path prefix of stock polls (`/sluice/stock/{rule}/{sku}`).
pub(super) const STOCK_PATH: &str = "/sluice/stock/";

/// The body length a request declares (`None` for chunked or absent).
pub(super) fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Checks the size limits that apply before any rule: 431 and 413. The
/// limits are those of the config the request started under, as every
/// other decision on it.
fn size_refusal(req: &RequestHeader, limits: &Limits) -> Option<Answer> {
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
    match declared_length(req) {
        Some(n) if n > limits.max_body_bytes => Some(Answer::BodyTooLarge {
            limit: limits.max_body_bytes,
        }),
        _ => None,
    }
}

impl SluiceProxy {
    /// Everything before the backend; `Ok(true)` when the gateway answered.
    pub(super) async fn intake(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Bytes after a request's body are the next request (RFC 9112
        // section 9.3.2), served once this one is answered. Without this,
        // pingora takes them for a broken client mid-proxy and drops the
        // forward, often after the headers left and before the body did.
        session.as_downstream_mut().set_pipelining_enabled(true);
        if let Some(refusal) = size_refusal(session.req_header(), &ctx.config.limits) {
            // The body was not read: the connection cannot be reused.
            session.set_keepalive(None);
            self.answer(session, ctx, &refusal).await?;
            return Ok(true);
        }
        let req = session.req_header();
        if let Some(message) = backend::host_problem(req, false) {
            session.set_keepalive(None);
            let refusal = Answer::Invalid {
                message: message.into(),
            };
            self.answer(session, ctx, &refusal).await?;
            return Ok(true);
        }
        if req.method == http::Method::GET {
            if let Some(id) = req.uri.path().strip_prefix(TICKETS_PATH) {
                let answer = self.admission.poll(id).await;
                self.answer(session, ctx, &answer).await?;
                return Ok(true);
            }
            if let Some(rest) = req.uri.path().strip_prefix(STOCK_PATH) {
                let answer = self.stock.poll(rest).await;
                self.answer(session, ctx, &answer).await?;
                return Ok(true);
            }
        }
        // Judged by the lane already: matched and judged once.
        if let Some(judged) = super::lane::take_preset() {
            ctx.upstream = judged.stage.rule.upstream;
            ctx.path = Some(judged.path);
            ctx.stage = Some(judged.stage.clone());
            let verdict = Judgement::Made(judged.verdict, judged.attempt);
            return self.admit(session, ctx, &judged.stage, verdict).await;
        }
        // This request keeps the rules in force now, whatever a reload
        // does meanwhile.
        let rules = self.admission.rules();
        let m = match rules.find(&req.method, req.uri.path()) {
            Route::Unmatched => {
                ctx.upstream = self.routes.pick(req);
                return self.cached(session, ctx).await;
            }
            Route::Refused(r) => {
                ctx.stage = rules.stage(r.index).cloned();
                // The body was not read: the connection cannot be reused.
                session.set_keepalive(None);
                self.answer(session, ctx, &Answer::Invalid { message: r.message })
                    .await?;
                return Ok(true);
            }
            Route::Rule(m) => m,
        };
        let Some(stage) = rules.stage(m.index).cloned() else {
            return Ok(false);
        };
        ctx.upstream = stage.rule.upstream;
        ctx.path = Some(m.path);
        let captures: Vec<(&str, &str)> =
            m.captures.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ctx.stage = Some(stage.clone());
        self.admit(session, ctx, &stage, Judgement::ToMake(&captures))
            .await
    }

    /// Stages 2-8 for a request that matched `stage`'s rule.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        stage: &RuleStage,
        judgement: Judgement<'_>,
    ) -> Result<bool> {
        if let Some(message) = backend::host_problem(session.req_header(), true) {
            session.set_keepalive(None);
            let refusal = Answer::Invalid {
                message: message.into(),
            };
            self.answer(session, ctx, &refusal).await?;
            return Ok(true);
        }
        let body = match self.read_rule_body(session).await? {
            Ok(b) => b,
            Err(refusal) => {
                session.set_keepalive(None);
                self.answer(session, ctx, &refusal).await?;
                return Ok(true);
            }
        };
        let (verdict, attempt) = match judgement {
            Judgement::Made(verdict, attempt) => (verdict, attempt),
            Judgement::ToMake(captures) => {
                let req = session.req_header();
                let candidate = Candidate {
                    parts: RequestParts {
                        headers: &req.headers,
                        query: req.uri.query(),
                        captures,
                        body: Some(&body),
                    },
                    client_ip: forwarded::client_ip_of(
                        self.peer(session),
                        &req.headers,
                        &ctx.config.trusted_proxies,
                    ),
                };
                self.admission.admit_seen(stage, &candidate).await
            }
        };
        if let Some(a) = attempt {
            (ctx.user, ctx.sku) = (Some(a.user), Some(a.sku));
        }
        let hold = match verdict {
            Verdict::Answer(answer) => {
                self.answer(session, ctx, &answer).await?;
                return Ok(true);
            }
            Verdict::PassCapped(permit) => {
                ctx.admitted_body = Some(body.len() as u64);
                ctx.outcome = Outcome::Forwarded;
                ctx.pass_permit = Some(permit);
                return Ok(false);
            }
            Verdict::Forward(hold) => hold,
        };
        let pool = self.upstreams.pool(ctx.upstream);
        // While waiting, watch the client: one who leaves gets its units
        // back instead of an order nobody will read.
        let gone = async {
            let _ = session.as_downstream_mut().read_body_or_idle(true).await;
        };
        match self.admission.wait_for_slot(hold, stage, pool, gone).await {
            Waited::Slot(hold, slot) => {
                // From here the order goes out whole: a client that
                // half-closes after sending it still gets it placed and
                // answered (RFC 9112 section 9.6), instead of the forward
                // being cut between its headers and its body.
                session.as_downstream_mut().set_abort_on_close(false);
                ctx.admitted_body = Some(body.len() as u64);
                ctx.outcome = Outcome::Forwarded;
                ctx.ticket = Some(hold.ticket());
                ctx.hold = Some(hold);
                ctx.slot = Some(slot);
                Ok(false)
            }
            Waited::Full(hold) => {
                ctx.ticket = Some(hold.ticket());
                let request =
                    self.queued_request(session, &ctx.config, &hold, body, ctx.path.as_deref());
                let answer = self.admission.enqueue(hold, request, stage, pool).await;
                self.answer(session, ctx, &answer).await?;
                Ok(true)
            }
            Waited::ClientGone => Error::e_explain(
                ErrorType::ConnectionClosed,
                "client left while waiting for a slot",
            ),
        }
    }

    /// A winner's request as the queue keeps it.
    fn queued_request(
        &self,
        session: &Session,
        config: &Config,
        hold: &Hold,
        body: Bytes,
        path: Option<&str>,
    ) -> Option<QueuedRequest> {
        let from = self.client_hop(session, config);
        backend::queued(
            session.req_header(),
            body,
            from,
            hold.ticket_headers(),
            path,
        )
        .map_err(|e| tracing::warn!(error = %e, "cannot keep a winner's request"))
        .ok()
    }

    /// Reads a rule-matched body (bounded) into pingora's retry buffer, so
    /// it can be inspected now and reach the backend later: exactly these
    /// bytes, or nothing (pingora sends the retry buffer, then finds the
    /// body done). A client waiting on `Expect: 100-continue` is told to go
    /// on first. Broken chunked framing is `invalid`; a client that leaves
    /// or stalls mid-body is a downstream error (nothing to answer).
    async fn read_rule_body(
        &self,
        session: &mut Session,
    ) -> Result<std::result::Result<Bytes, Answer>> {
        let limit = self.config.load().limits.max_rule_body_bytes;
        if declared_length(session.req_header()).is_some_and(|n| n > limit) {
            return Ok(Err(Answer::BodyTooLarge { limit }));
        }
        let downstream = session.as_downstream_mut();
        if backend::expects_continue(downstream.req_header()) && !downstream.is_body_done() {
            // pingora closes a connection answered before its body was
            // read; here the body is read next, so keep-alive is safe.
            downstream.set_close_on_response_before_downstream_finish(false);
            let sent = downstream.write_continue_response().await;
            downstream.set_close_on_response_before_downstream_finish(true);
            sent.map_err(|e| e.into_down())?;
        }
        downstream.enable_retry_buffering();
        let mut body = BytesMut::new();
        loop {
            let chunk = match downstream.read_request_body().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    return match backend::body_framing_error(&e) {
                        Some(message) => Ok(Err(Answer::Invalid {
                            message: message.into(),
                        })),
                        None => Err(e.into_down()),
                    }
                }
            };
            body.extend_from_slice(&chunk);
            if body.len() as u64 > limit {
                return Ok(Err(Answer::BodyTooLarge { limit }));
            }
        }
        if downstream.retry_buffer_truncated() {
            // pingora could not keep it all: it would forward a cut body.
            return Ok(Err(Answer::BodyTooLarge { limit }));
        }
        Ok(Ok(body.freeze()))
    }
}
