//! The access-log line of a request, read off the pingora session and the
//! request's context at the `logging` phase, and handed to the access log
//! (which formats and writes it on its own thread). Session plumbing only.

use std::time::SystemTime;

use pingora_proxy::Session;

use super::{RequestCtx, SluiceProxy};
use crate::access_log::{clip_header, clip_path, Entry};
use crate::backend::forwarded;

/// A request header's value as the log keeps it (visible ASCII, else lossy).
pub(super) fn logged_header(
    headers: &http::HeaderMap,
    name: http::header::HeaderName,
) -> Option<String> {
    headers
        .get(name)
        .map(|v| clip_header(&String::from_utf8_lossy(v.as_bytes())))
}

impl SluiceProxy {
    /// Sends the request's line to the access log, when there is one.
    pub(super) fn log_access(&self, session: &Session, ctx: &mut RequestCtx) {
        let Some(log) = &self.access_log else {
            return;
        };
        let req = session.req_header();
        let client_ip = forwarded::client_ip_of(
            self.peer(session),
            &req.headers,
            &ctx.config.trusted_proxies,
        );
        let upstream = ctx
            .upstream_started
            .map(|_| self.upstreams.pool(ctx.upstream).name().to_string());
        log.send(Entry {
            time: SystemTime::now(),
            client_ip,
            method: req.method.clone(),
            path: clip_path(req.uri.path()),
            version: req.version,
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            bytes: session.body_bytes_sent() as u64,
            referer: logged_header(&req.headers, http::header::REFERER),
            user_agent: logged_header(&req.headers, http::header::USER_AGENT),
            outcome: ctx.outcome,
            rule: ctx.stage.as_ref().map(|s| s.rule.name.clone()),
            sku: ctx.sku.take(),
            user: ctx.user.take(),
            ticket: ctx.ticket,
            upstream,
            upstream_time: ctx
                .upstream_time
                .or_else(|| ctx.upstream_started.map(|t| t.elapsed())),
            total_time: ctx.started.elapsed(),
        });
    }
}
