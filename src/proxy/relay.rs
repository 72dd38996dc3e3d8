//! The relay: a winner the fast lane judged, with a slot free at its
//! upstream at once, or a plain pass-through GET, is sent to the backend
//! and answered from the connection's own task, without a pingora session.
//!
//! Why: for a winner, pingora's session (its head parse, the proxy phases,
//! the two-way proxy loop with its channels, the response writer) cost
//! about 90k of 153k instructions (callgrind, BENCHMARKS.md), more than
//! all of Sluice's own work on it, Redis included; a pass-through GET
//! paid the same session for a plain forward.
//!
//! - The request: what a queued order's drainer would send
//!   (`backend::relayed`), through the same client code
//!   (`backend::exchange`): the admitted body whole, with its own
//!   `Content-Length`; a connect failure tries the next server.
//! - The answer: the backend's status and headers less the hop-by-hop ones,
//!   with the gateway's `Date`, `Connection` and `X-Sluice-Outcome`
//!   (`forwarded`, or `passthrough`); the body framed by the backend's
//!   `Content-Length`, else chunked. No answer (no server, a timeout, a
//!   reset): the JSON `unavailable` of the proxied path.
//! - A winner's hold: settled as on the proxied path
//!   (`respond::answered`): a releasing answer before the client reads it,
//!   a committing one after, with the body kept for duplicates and polls.
//!
//! A winner that has to wait for a slot (or be queued) goes to pingora's
//! session as before: waiting, queueing and the client-gone watch stay in
//! one place.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use pingora_core::protocols::Stream;
use pingora_http::{HeaderNameVariant, RequestHeader, ResponseHeader};
use tokio::io::AsyncWriteExt;

use super::access::logged_header;
use super::lane::FastLane;
use super::respond::{answered, busy, failure_answer, settle, wire_answer, KeptAnswer};
use crate::access_log::{clip_path, Entry};
use crate::admission::hold::Hold;
use crate::admission::{Admission, RuleStage};
use crate::backend::{self, exchange, ForwardEnd, HOP_BY_HOP};
use crate::deadline::within;
use crate::metrics::UpstreamClass;
use crate::outcome::Outcome;
use crate::upstream::slots::Slot;
use crate::vocab::{TicketId, UpstreamId};

/// Buffered answer bytes written before the next read of the backend.
const FLUSH_AT: usize = 16 << 10;

/// A request to relay, judged by the lane.
pub struct Relay {
    /// A winner's rule, hold and slot; `None` for a pass-through GET.
    pub(super) order: Option<Order>,
    /// The upstream it goes to: a winner's rule's, or the one a
    /// pass-through route picks.
    pub(super) upstream: UpstreamId,
    pub(super) request: RequestHeader,
    pub(super) body: Bytes,
    /// The request's head and body length in the gate's buffer.
    pub(super) used: usize,
    /// The client asked for `Connection: close`.
    pub(super) close: bool,
    pub(super) started: Instant,
    pub(super) seen: Seen,
}

/// A winner's part of a relay: what its answer settles.
pub(super) struct Order {
    pub(super) stage: Arc<RuleStage>,
    pub(super) hold: Hold,
    pub(super) slot: Slot,
}

/// What the decision line and the access log say of the request.
pub(super) struct Seen {
    pub(super) client_ip: IpAddr,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) referer: Option<String>,
    pub(super) user_agent: Option<String>,
    pub(super) user: Option<String>,
    pub(super) sku: Option<String>,
}

impl Seen {
    /// The parts of a request the lane read, for its log lines.
    pub(super) fn of(
        client_ip: IpAddr,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
        logged: bool,
    ) -> Self {
        Self {
            client_ip,
            method: method.clone(),
            path: if logged {
                clip_path(path)
            } else {
                String::new()
            },
            referer: logged
                .then(|| logged_header(headers, http::header::REFERER))
                .flatten(),
            user_agent: logged
                .then(|| logged_header(headers, http::header::USER_AGENT))
                .flatten(),
            user: None,
            sku: None,
        }
    }
}

impl Relay {
    /// The request's bytes at the front of the gate's buffer.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Whether the client asked for `Connection: close`.
    pub fn close(&self) -> bool {
        self.close
    }
}

/// How the answer's body goes to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// The backend's `Content-Length`, the bytes as they come.
    Length(u64),
    /// Chunked (the backend's own chunks, or a body ended by its close).
    Chunked,
}

impl Framing {
    fn of(header: &ResponseHeader) -> Self {
        let status = header.status.as_u16();
        if header.status.is_informational() || status == 204 || status == 304 {
            return Framing::Empty;
        }
        if header.headers.contains_key(http::header::TRANSFER_ENCODING) {
            return Framing::Chunked;
        }
        let mut lengths = header.headers.get_all(http::header::CONTENT_LENGTH).iter();
        match (lengths.next(), lengths.next()) {
            (Some(v), None) => std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map_or(Framing::Chunked, Framing::Length),
            _ => Framing::Chunked,
        }
    }

    fn put(self, out: &mut Vec<u8>, chunk: &[u8]) {
        match self {
            Framing::Empty => {}
            Framing::Length(_) => out.extend_from_slice(chunk),
            Framing::Chunked if chunk.is_empty() => {}
            Framing::Chunked => {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    fn end(self, out: &mut Vec<u8>) {
        if self == Framing::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
}

/// The head of the client's answer, from the backend's, in the order
/// pingora's path writes it: the backend's fields as it spelled them, with
/// the gateway's values in place for `Date`, `Connection`,
/// `X-Sluice-Outcome` and the framing field, appended when the backend had
/// none; its other hop-by-hop fields are its connection's and dropped.
fn head(header: &ResponseHeader, framing: Framing, keep_alive: bool, outcome: Outcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(header.status.as_str().as_bytes());
    out.push(b' ');
    let reason = header
        .get_reason_phrase()
        .or_else(|| header.status.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let date = pingora_core::protocols::http::date::get_cached_date();
    let connection: &[u8] = if keep_alive { b"keep-alive" } else { b"close" };
    let outcome = outcome.as_str().as_bytes();
    let length = match framing {
        Framing::Length(n) => Some(n.to_string()),
        _ => None,
    };
    let framing_field: Option<(&[u8], &[u8])> = match (framing, &length) {
        (Framing::Length(_), Some(n)) => Some((b"Content-Length", n.as_bytes())),
        (Framing::Chunked, _) => Some((b"Transfer-Encoding", b"chunked")),
        _ => None,
    };
    let (mut wrote_date, mut wrote_connection, mut wrote_outcome, mut wrote_framing) =
        (false, false, false, framing_field.is_none());
    let field = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    // `map` visits the names as the backend spelled them.
    let _ = header.map(|name, value| {
        let name = match name {
            HeaderNameVariant::Case(c) => c.as_slice(),
            HeaderNameVariant::Titled(t) => t.as_bytes(),
        };
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        // The gateway's fields are spelled as pingora spells what it
        // inserts; the framing field keeps the backend's spelling.
        let (spelled, ours, done): (&[u8], &[u8], &mut bool) = if is("date") {
            (b"Date", date.as_bytes(), &mut wrote_date)
        } else if is("connection") {
            (b"Connection", connection, &mut wrote_connection)
        } else if is(super::respond::OUTCOME_HEADER) {
            (
                super::respond::OUTCOME_HEADER.as_bytes(),
                outcome,
                &mut wrote_outcome,
            )
        } else if is("content-length") && matches!(framing, Framing::Length(_))
            || is("transfer-encoding") && framing == Framing::Chunked
        {
            match framing_field {
                Some((_, v)) => (name, v, &mut wrote_framing),
                None => return Ok(()),
            }
        } else if HOP_BY_HOP.iter().any(|h| is(h)) {
            return Ok(());
        } else {
            field(&mut out, name, value.as_bytes());
            return Ok(());
        };
        if !*done {
            *done = true;
            field(&mut out, spelled, ours);
        }
        Ok(())
    });
    if !wrote_outcome {
        field(&mut out, super::respond::OUTCOME_HEADER.as_bytes(), outcome);
    }
    if !wrote_date {
        field(&mut out, b"Date", date.as_bytes());
    }
    if !wrote_connection {
        field(&mut out, b"Connection", connection);
    }
    if let (Some((name, value)), false) = (framing_field, wrote_framing) {
        field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes `bytes` to the client within `timeout`; whether they all went.
async fn write(client: &mut Stream, bytes: &[u8], timeout: Duration) -> bool {
    let all = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    matches!(
        within(all, || tokio::time::Instant::now() + timeout).await,
        Ok(Ok(()))
    )
}

/// How a relay ended, for its log lines.
struct Ended {
    outcome: Outcome,
    status: u16,
    bytes: u64,
    upstream_time: Option<Duration>,
}

impl FastLane {
    /// Sends `relay`'s request to its upstream and writes the answer to
    /// `client`, each write within `write_timeout`; whether the answer went
    /// out whole (the gate then closes the connection if the client asked).
    pub async fn relay(
        &self,
        relay: Box<Relay>,
        client: &mut Stream,
        write_timeout: Duration,
    ) -> bool {
        let Relay {
            order,
            upstream,
            request,
            body,
            close,
            started,
            mut seen,
            ..
        } = *relay;
        let (stage, mut hold, slot) = match order {
            Some(o) => (Some(o.stage), Some(o.hold), Some(o.slot)),
            None => (None, None, None),
        };
        let pool = self.upstreams.pool(upstream);
        let ticket = hold.as_mut().map(|h| {
            h.mark_sent();
            h.ticket()
        });
        let upstream_started = Instant::now();
        let opened = exchange::open(&self.connector, pool, request, &body, None).await;
        // Counted as pingora's path counts them: one error per server that
        // could not be reached, one per exchange that broke after.
        let connect_failures = match &opened {
            Ok(o) => o.connect_failures,
            Err(f) => f.connect_failures,
        };
        for _ in 0..connect_failures {
            self.metrics
                .observe_upstream(pool.name(), UpstreamClass::Error);
        }
        let stage = stage.as_deref();
        let mut opened = match opened {
            Ok(o) => o,
            Err(failed) => {
                let end = backend::end_of(&failed.error, failed.sent);
                if end != ForwardEnd::ConnectError {
                    self.metrics
                        .observe_upstream(pool.name(), UpstreamClass::Error);
                }
                if let Some(hold) = hold {
                    let how = hold.classify(end);
                    settle(hold, how).await;
                }
                tracing::debug!(error = %failed.error, "request failed");
                let answer = failure_answer(&failed.error, 0).unwrap_or_else(busy);
                let rendered = Admission::render(stage, &answer);
                let written = write(client, &wire_answer(&rendered, !close), write_timeout).await;
                drop(slot);
                let ended = Ended {
                    outcome: rendered.outcome,
                    status: rendered.status.as_u16(),
                    bytes: if written {
                        rendered.body.len() as u64
                    } else {
                        0
                    },
                    upstream_time: Some(upstream_started.elapsed()),
                };
                self.relayed(stage, &mut seen, ticket, pool.name(), ended, started);
                return written;
            }
        };
        let Some(header) = opened.session.response_header() else {
            // `open` returns only with a header read.
            return false;
        };
        let status = header.status.as_u16();
        self.metrics
            .observe_upstream(pool.name(), UpstreamClass::of_status(status));
        let framing = Framing::of(header);
        let outcome = if hold.is_some() {
            Outcome::Forwarded
        } else {
            Outcome::Passthrough
        };
        let mut out = head(header, framing, !close, outcome);
        let mut kept: Option<KeptAnswer> = match hold {
            Some(hold) => Some(answered(hold, status, header).await),
            None => None,
        };
        // Body bytes in `out`, and those the client has.
        let (mut pending, mut delivered) = (0u64, 0u64);
        let (mut whole, mut written) = (false, true);
        loop {
            match opened.session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if let Some(kept) = kept.as_mut() {
                        kept.push(&chunk);
                    }
                    pending += chunk.len() as u64;
                    framing.put(&mut out, &chunk);
                    // Written now when more is to come (it may take a
                    // while) or much is waiting; else with the end.
                    if !opened.session.response_done() || out.len() >= FLUSH_AT {
                        written = write(client, &out, write_timeout).await;
                        out.clear();
                        if !written {
                            break;
                        }
                        delivered += std::mem::take(&mut pending);
                    }
                }
                Ok(None) => {
                    whole = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the backend's answer broke off");
                    self.metrics
                        .observe_upstream(pool.name(), UpstreamClass::Error);
                    break;
                }
            }
        }
        let upstream_time = Some(upstream_started.elapsed());
        if whole {
            framing.end(&mut out);
            if let Some(kept) = kept.as_mut() {
                kept.end();
            }
        }
        if written && !out.is_empty() {
            written = write(client, &out, write_timeout).await;
            if written {
                delivered += pending;
            }
        }
        if whole {
            opened.release(&self.connector).await;
        }
        // Committed once the client has it, as on the proxied path.
        if let Some(kept) = kept {
            kept.finish().await;
        }
        drop(slot);
        let ended = Ended {
            // A backend that broke off mid-answer: the client got a cut
            // answer and a closed connection, which pingora's path counts
            // as `unavailable`.
            outcome: if whole { outcome } else { Outcome::Unavailable },
            status,
            bytes: delivered,
            upstream_time,
        };
        self.relayed(stage, &mut seen, ticket, pool.name(), ended, started);
        // The gate closes the connection when the client asked.
        written && whole
    }

    /// The decision line, the request metrics and the access-log line of a
    /// relayed request (`stage` is a winner's rule).
    fn relayed(
        &self,
        stage: Option<&RuleStage>,
        seen: &mut Seen,
        ticket: Option<TicketId>,
        upstream: &str,
        ended: Ended,
        started: Instant,
    ) {
        let elapsed = started.elapsed();
        let rule = stage.map(|s| &s.rule.name);
        tracing::debug!(
            rule = rule.map_or(crate::metrics::NO_RULE, |r| &**r),
            outcome = ended.outcome.as_str(),
            status = ended.status,
            ticket = ?ticket.map(|t| t.to_string()),
            elapsed_ms = elapsed.as_millis() as u64,
            "decision"
        );
        self.metrics
            .observe_request(rule.map(|r| &**r), ended.outcome, elapsed);
        if let Some(log) = &self.access_log {
            log.send(Entry {
                time: SystemTime::now(),
                client_ip: seen.client_ip,
                method: seen.method.clone(),
                path: std::mem::take(&mut seen.path),
                version: http::Version::HTTP_11,
                status: ended.status,
                bytes: ended.bytes,
                referer: seen.referer.take(),
                user_agent: seen.user_agent.take(),
                outcome: ended.outcome,
                rule: rule.cloned(),
                sku: seen.sku.take(),
                user: seen.user.take(),
                ticket,
                upstream: Some(upstream.to_string()),
                upstream_time: ended.upstream_time,
                total_time: elapsed,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut h = ResponseHeader::build(status, None).expect("status");
        for (n, v) in headers {
            h.append_header(n.to_string(), *v).expect("header");
        }
        h
    }

    #[test]
    fn framing_follows_the_backend_or_chunks() {
        assert_eq!(Framing::of(&response(204, &[])), Framing::Empty);
        assert_eq!(
            Framing::of(&response(304, &[("ETag", "x")])),
            Framing::Empty
        );
        assert_eq!(
            Framing::of(&response(200, &[("Content-Length", "12")])),
            Framing::Length(12)
        );
        for odd in [
            &[("Transfer-Encoding", "chunked")][..],
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
            &[("Content-Length", "3"), ("Content-Length", "3")],
            &[("Content-Length", "x")],
            &[],
        ] {
            assert_eq!(
                Framing::of(&response(200, odd)),
                Framing::Chunked,
                "{odd:?}"
            );
        }
        let mut out = Vec::new();
        Framing::Chunked.put(&mut out, b"hello, world");
        Framing::Chunked.put(&mut out, b"");
        Framing::Chunked.end(&mut out);
        assert_eq!(out, b"c\r\nhello, world\r\n0\r\n\r\n");
    }

    #[test]
    fn the_head_keeps_the_backends_spelling_and_sets_the_gateways_fields() {
        let h = response(
            201,
            &[
                ("X-Order-Id", "42"),
                ("Content-Type", "application/json"),
                ("Connection", "keep-alive"),
                ("Keep-Alive", "timeout=5"),
                ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("Content-Length", "2"),
                ("x-sluice-outcome", "spoofed"),
            ],
        );
        let text =
            String::from_utf8(head(&h, Framing::of(&h), false, Outcome::Forwarded)).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 201 Created\r\n"), "{text}");
        assert!(text.contains("\r\nX-Order-Id: 42\r\n"), "{text}");
        assert!(
            text.contains("\r\nContent-Type: application/json\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(
            text.contains("\r\nX-Sluice-Outcome: forwarded\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nContent-Length: 2\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        for gone in ["Keep-Alive", "2024", "spoofed", "keep-alive"] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert_eq!(text.matches("Date: ").count(), 1, "{text}");
    }
}
