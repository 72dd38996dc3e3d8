//! What `request_filter` does with a request no flash-sale rule matched:
//! hands it to the read cache when a cache rule matches, and writes what
//! the cache gives (its answer, a 304, or 503 when the backend failed and
//! nothing stale may stand in); a bypassed request goes on to the backend
//! as it came. Session plumbing only; every decision is `cache`'s.

use pingora_core::Result;
use pingora_proxy::Session;

use super::respond::OUTCOME_HEADER;
use super::{RequestCtx, SluiceProxy};
use crate::cache::{CacheResult, Served};

impl SluiceProxy {
    /// `Ok(true)` when the cache answered; `Ok(false)` to proxy it.
    pub(super) async fn cached(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(m) = self.cache.find(session.req_header()) else {
            return Ok(false);
        };
        ctx.cache_rule = Some(m.name().clone());
        ctx.upstream = m.upstream();
        let config = ctx.config.clone();
        let from = self.client_hop(session, &config);
        let served = self.cache.serve(m, session.req_header(), from).await;
        let answer = match served {
            Served::Answer(a) => a,
            Served::Bypass => {
                ctx.cache_result = Some(CacheResult::Bypass);
                return Ok(false);
            }
            Served::Unavailable => {
                self.answer(session, ctx, &super::respond::busy()).await?;
                return Ok(true);
            }
        };
        let (mut header, body) = answer.render(session.req_header())?;
        ctx.outcome = answer.outcome();
        header.insert_header(OUTCOME_HEADER, ctx.outcome.as_str())?;
        let end = body.is_none();
        session.write_response_header(Box::new(header), end).await?;
        if let Some(body) = body {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }
}
