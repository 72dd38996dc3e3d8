//! How a request is presented to the backend, for the proxied path and
//! the queue drainer alike, and how an exchange with it ended.
//!
//! - Target: a rule-matched request is sent with the rule's own spelling
//!   of its path (`rules::RuleMatch::path`) and its query as received, in
//!   origin form, whatever spelling the client used.
//! - Headers: client headers named `X-Sluice-*` never reach the backend;
//!   `X-Forwarded-For` and `X-Forwarded-Proto` are rebuilt (`forwarded`); a winner carries
//!   `X-Sluice-Ticket`, `X-Sluice-Quantity` and `X-Sluice-Rule`. A queued
//!   request is sent later with its body in one piece, so it also loses
//!   the hop-by-hop headers and gets its own `Content-Length`.
//! - Timeouts: the upstream's peer options (`upstream::UpstreamPool`),
//!   used by both paths.
//! - Endings: [`end_of`] names a pingora error as a [`ForwardEnd`], which
//!   the admission side turns into a settlement.

pub mod exchange;
pub mod forwarded;

use std::net::IpAddr;

use bytes::Bytes;
use ipnet::IpNet;
use pingora_core::{Error, ErrorSource, ErrorType, OrErr, Result};
use pingora_http::RequestHeader;

use crate::queue::QueuedRequest;
use crate::vocab::{now_ms, SkuKey, TicketId};

/// Client headers with this prefix are ours and never reach the backend.
pub const SLUICE_HEADER_PREFIX: &str = "x-sluice-";

/// Hop-by-hop headers belong to one connection, not to the request; a
/// queued request is sent on another connection, framed anew.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

/// Every way a forward to the backend can end, as the proxy or the
/// drainer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardEnd {
    /// The backend answered with this status (not 1xx).
    Answered(u16),
    /// No connection could be made: the backend never saw the request.
    ConnectError,
    /// The backend did not answer in time after the request left.
    Timeout,
    /// The connection broke after the request left.
    Reset,
    /// The client went away; `sent` says whether the backend was asked.
    ClientGone {
        /// Whether the whole request reached the backend (a partial one
        /// places no order).
        sent: bool,
    },
}

/// The ticket a winner's request carries to the backend.
#[derive(Clone, Copy, Debug)]
pub struct TicketHeaders<'a> {
    /// The ticket (the backend's idempotency key).
    pub ticket: TicketId,
    /// Units held.
    pub qty: u32,
    /// Its stock (the rule name is sent).
    pub key: &'a SkuKey,
}

/// Where the request came from, for `X-Forwarded-For` and `-Proto`.
#[derive(Clone, Copy, Debug)]
pub struct ClientHop<'a> {
    /// The socket peer, when it is an inet address.
    pub peer: Option<IpAddr>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted: &'a [IpNet],
    /// Whether the client's connection to the gateway is TLS.
    pub tls: bool,
}

/// Rewrites a request header as the backend must see it; `path` is the
/// path a rule-matched request is sent with.
pub fn present(
    req: &mut RequestHeader,
    from: ClientHop<'_>,
    ticket: Option<TicketHeaders<'_>>,
    path: Option<&str>,
) -> Result<()> {
    if let Some(path) = path {
        set_path(req, path)?;
    }
    let ours: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with(SLUICE_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in ours {
        req.remove_header(&name);
    }
    if let Some(peer) = from.peer {
        let (xff, proto) = forwarded::outgoing(peer, &req.headers, from.tls, from.trusted);
        req.insert_header("X-Forwarded-For", xff)?;
        req.insert_header("X-Forwarded-Proto", http::HeaderValue::from_static(proto))?;
    }
    if let Some(t) = ticket {
        // The gateway holds a winner's whole body and sends it at once: the
        // client's expectation was answered already, by the gateway.
        req.remove_header(&http::header::EXPECT);
        set_ticket(req, t)?;
    }
    Ok(())
}

/// Sends `path` with the request's own query (its raw bytes, whatever
/// their encoding), in origin form; a target that is already that is left
/// alone.
fn set_path(req: &mut RequestHeader, path: &str) -> Result<()> {
    let raw = req.raw_path();
    // The first `?` starts the query in every target form: neither a path
    // nor an authority holds one.
    let query = raw
        .iter()
        .position(|&b| b == b'?')
        .map_or(&[][..], |at| &raw[at..]);
    let mut target = Vec::with_capacity(path.len() + query.len());
    target.extend_from_slice(path.as_bytes());
    target.extend_from_slice(query);
    if target == raw {
        return Ok(());
    }
    // An HTTP/2 request's URI carries its authority: keep it.
    let (Some(scheme), Some(authority), Ok(text)) = (
        req.uri.scheme().cloned(),
        req.uri.authority().cloned(),
        std::str::from_utf8(&target),
    ) else {
        return req.set_raw_path(&target);
    };
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(text)
        .build()
        .or_err(
            ErrorType::InvalidHTTPHeader,
            "the canonical path is not a URI",
        )?;
    req.set_uri(uri);
    Ok(())
}

/// Why a request's `Host` makes it unfit to forward, if it does (RFC 9112
/// section 3.2): more than one, or none in HTTP/1.1, which the RFC answers
/// with 400. HTTP/1.0 does not require one (old health checkers send none)
/// and such a request passes through as it came; an `order` (a rule-matched
/// request) without one is refused all the same, since a backend hosting
/// several shops routes on it. HTTP/2 carries `:authority` instead.
pub fn host_problem(req: &RequestHeader, order: bool) -> Option<&'static str> {
    if req.version >= http::Version::HTTP_2 {
        return None;
    }
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("Host: sent more than once"),
        (Some(_), None) => None,
        (None, _) if req.version == http::Version::HTTP_11 => {
            Some("Host: missing (HTTP/1.1 requires it)")
        }
        (None, _) if order => Some("Host: missing (an order must name the shop)"),
        (None, _) => None,
    }
}

/// Whether the client waits for `100 Continue` before sending its body
/// (RFC 9110 section 10.1.1; an HTTP/1.0 client's expectation is ignored).
pub fn expects_continue(req: &RequestHeader) -> bool {
    req.version >= http::Version::HTTP_11
        && req
            .headers
            .get_all(http::header::EXPECT)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The `invalid` message for a request body whose framing is broken (bad
/// chunk sizes or trailers), `None` for other failures (the client left,
/// stalled or reset: nobody to answer). pingora names its chunk errors by
/// custom error types that it does not export.
pub fn body_framing_error(e: &Error) -> Option<&'static str> {
    match e.etype() {
        ErrorType::Custom("InvalidChunk") | ErrorType::Custom("InvalidTrailerEnd") => {
            Some("body: invalid chunked encoding")
        }
        ErrorType::InvalidHTTPHeader => Some("body: invalid framing"),
        _ => None,
    }
}

fn set_ticket(req: &mut RequestHeader, t: TicketHeaders<'_>) -> Result<()> {
    let [ticket, qty, rule] = ticket_values(t)?;
    req.insert_header("X-Sluice-Ticket", ticket)?;
    req.insert_header("X-Sluice-Quantity", qty)?;
    req.insert_header("X-Sluice-Rule", rule)
}

/// The values of `X-Sluice-Ticket`, `-Quantity` and `-Rule`, in that order.
fn ticket_values(t: TicketHeaders<'_>) -> Result<[http::HeaderValue; 3]> {
    let ticket = http::HeaderValue::try_from(t.ticket.hex().as_str()).or_err(
        ErrorType::InvalidHTTPHeader,
        "the ticket is not a header value",
    )?;
    let rule = http::HeaderValue::from_str(&t.key.rule).or_err(
        ErrorType::InvalidHTTPHeader,
        "the rule name is not a header value",
    )?;
    Ok([ticket, http::HeaderValue::from(t.qty), rule])
}

/// The `Content-Length` a request sent with its whole body carries: its
/// length, and none for a bodiless GET or DELETE, as the client sent it.
fn sent_length(method: &http::Method, body_len: usize) -> Option<usize> {
    let carries_body = matches!(method.as_str(), "POST" | "PUT" | "PATCH");
    (body_len > 0 || carries_body).then_some(body_len)
}

/// A winner's request as the queue keeps it: presented as the backend
/// will receive it (with the rule's `path`), with its whole body.
pub fn queued(
    req: &RequestHeader,
    body: Bytes,
    from: ClientHop<'_>,
    ticket: TicketHeaders<'_>,
    path: Option<&str>,
) -> Result<QueuedRequest> {
    let mut presented = req.clone();
    present(&mut presented, from, Some(ticket), path)?;
    let headers = presented
        .headers
        .iter()
        .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.to_string(), v.to_string())))
        .collect();
    Ok(QueuedRequest {
        ticket: ticket.ticket,
        key: ticket.key.clone(),
        qty: ticket.qty,
        method: req.method.to_string(),
        path_and_query: presented
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        headers,
        body,
        queued_at_ms: now_ms(),
    })
}

/// The request header the drainer sends for a queued request. The ticket
/// headers are set again from the entry itself, so an entry is sent under
/// its own ticket whatever its headers say.
pub fn request_of(q: &QueuedRequest) -> Result<RequestHeader> {
    let mut req = RequestHeader::build(q.method.as_str(), q.path_and_query.as_bytes(), None)?;
    for (name, value) in &q.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) {
            continue;
        }
        req.append_header(lower, value.as_str())?;
    }
    if let Some(n) = sent_length(&req.method, q.body.len()) {
        req.insert_header(http::header::CONTENT_LENGTH, n)?;
    }
    set_ticket(
        &mut req,
        TicketHeaders {
            ticket: q.ticket,
            qty: q.qty,
            key: &q.key,
        },
    )?;
    Ok(req)
}

/// A request as the relay (`proxy::relay`) sends it, from the head the
/// fast lane parsed. A winner's is presented as a queued one is (`queued`,
/// then [`request_of`]): the rule's `path` with the client's query, the
/// client's headers less the hop-by-hop ones and `X-Sluice-*`, its own
/// `X-Forwarded-For` and `-Proto`, a `Content-Length` for the whole body,
/// and the `ticket` headers. A pass-through GET (no `ticket`) is the same
/// with its own path. Built without pingora's case map: names go out in
/// lower case, as a queued request's do.
pub fn relayed(
    method: http::Method,
    path: &str,
    query: Option<&str>,
    headers: http::HeaderMap,
    body_len: usize,
    from: ClientHop<'_>,
    ticket: Option<TicketHeaders<'_>>,
) -> Result<RequestHeader> {
    use http::header::{HeaderName, HeaderValue};
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static TICKET: HeaderName = HeaderName::from_static("x-sluice-ticket");
    static QUANTITY: HeaderName = HeaderName::from_static("x-sluice-quantity");
    static RULE: HeaderName = HeaderName::from_static("x-sluice-rule");
    let forwarded = from
        .peer
        .map(|peer| forwarded::outgoing(peer, &headers, from.tls, from.trusted));
    let target = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let uri = http::Uri::try_from(target).or_err(
        ErrorType::InvalidHTTPHeader,
        "the canonical path is not a URI",
    )?;
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    let mut out = http::HeaderMap::with_capacity(headers.len() + 6);
    let mut name = None;
    for (n, value) in headers {
        // Later values of a name come without it.
        if let Some(n) = n {
            name = Some(n);
        }
        let Some(n) = name.as_ref() else { continue };
        let replaced = forwarded.is_some() && (*n == XFF || *n == XFP);
        if replaced
            || *n == http::header::EXPECT
            || HOP_BY_HOP.contains(&n.as_str())
            || n.as_str().starts_with(SLUICE_HEADER_PREFIX)
        {
            continue;
        }
        out.append(n.clone(), value);
    }
    if let Some((xff, proto)) = forwarded {
        let xff = HeaderValue::try_from(xff).or_err(
            ErrorType::InvalidHTTPHeader,
            "X-Forwarded-For is not a header value",
        )?;
        out.insert(XFF.clone(), xff);
        out.insert(XFP.clone(), HeaderValue::from_static(proto));
    }
    if let Some(n) = sent_length(&parts.method, body_len) {
        out.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(t) = ticket {
        let [ticket, qty, rule] = ticket_values(t)?;
        out.insert(TICKET.clone(), ticket);
        out.insert(QUANTITY.clone(), qty);
        out.insert(RULE.clone(), rule);
    }
    parts.headers = out;
    Ok(RequestHeader::from(parts))
}

/// Whether a forwarded request reached the backend whole: its header was
/// sent and, for a winner, every byte of the admitted body was written.
/// An HTTP server does not act on a request it did not get whole, so a
/// forward cut before the end of its body placed no order. `body_sent` is
/// pingora's count of body bytes written upstream (`None` when it does not
/// track it: assumed whole).
pub fn delivered(header_sent: bool, admitted_body: Option<u64>, body_sent: Option<usize>) -> bool {
    match (admitted_body, body_sent) {
        (Some(len), Some(sent)) => header_sent && sent as u64 >= len,
        _ => header_sent,
    }
}

/// How an exchange that failed with `e` ended; `sent` says whether the
/// whole request reached the backend (see [`delivered`]).
pub fn end_of(e: &Error, sent: bool) -> ForwardEnd {
    if e.esource() == &ErrorSource::Downstream {
        return ForwardEnd::ClientGone { sent };
    }
    match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::SocketError => ForwardEnd::ConnectError,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => ForwardEnd::Timeout,
        _ => ForwardEnd::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req =
            RequestHeader::build("POST", b"/api/seckill/p1/order?x=1", None).expect("req");
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).expect("header");
        }
        req
    }

    fn peer(ip: &str) -> ClientHop<'static> {
        ClientHop {
            peer: Some(ip.parse().expect("ip")),
            trusted: &[],
            tls: false,
        }
    }

    #[test]
    fn clients_cannot_send_our_headers_and_winners_carry_their_ticket() {
        let key = SkuKey::new("phone", "p1");
        let mut req = request(&[
            ("x-sluice-ticket", "forged"),
            ("X-Sluice-Rule", "other"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-user-id", "u1"),
        ]);
        let ticket = TicketHeaders {
            ticket: TicketId(7),
            qty: 2,
            key: &key,
        };
        present(&mut req, peer("203.0.113.9"), Some(ticket), None).expect("present");
        let h = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(h("x-sluice-ticket"), Some(TicketId(7).to_string()));
        assert_eq!(h("x-sluice-quantity").as_deref(), Some("2"));
        assert_eq!(h("x-sluice-rule").as_deref(), Some("phone"));
        assert_eq!(h("x-forwarded-for").as_deref(), Some("203.0.113.9"));
        assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(h("x-user-id").as_deref(), Some("u1"));

        let mut plain = request(&[("x-sluice-ticket", "forged")]);
        present(&mut plain, peer("203.0.113.9"), None, None).expect("present");
        assert!(plain.headers.get("x-sluice-ticket").is_none());
    }

    #[test]
    fn a_queued_request_is_framed_anew_and_keeps_its_ticket() {
        let key = SkuKey::new("phone", "p1");
        let mut req = request(&[
            ("content-type", "application/json"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("x-sluice-quantity", "99"),
        ]);
        // The client's spelling; the queue keeps the rule's own.
        req.set_raw_path(b"/API//seckill/./p1/order/?x=1")
            .expect("target");
        let ticket = TicketHeaders {
            ticket: TicketId(9),
            qty: 1,
            key: &key,
        };
        let q = queued(
            &req,
            Bytes::from_static(b"{\"qty\":1}"),
            peer("10.0.0.1"),
            ticket,
            Some("/api/seckill/p1/order"),
        )
        .expect("queued");
        assert_eq!(q.path_and_query, "/api/seckill/p1/order?x=1");
        let sent = request_of(&q).expect("request");
        let h = |n: &str| {
            sent.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(h("content-length").as_deref(), Some("9"));
        assert_eq!(h("transfer-encoding"), None);
        assert_eq!(h("connection"), None);
        assert_eq!(h("x-sluice-quantity").as_deref(), Some("1"));
        assert_eq!(h("x-sluice-ticket"), Some(TicketId(9).to_string()));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(sent.method, http::Method::POST);
    }

    #[test]
    fn a_rule_matched_request_is_sent_with_the_rules_path_and_its_own_query() {
        let target = |raw: &[u8], path: &str| {
            let mut req = RequestHeader::build("POST", raw, None).expect("req");
            present(&mut req, peer("10.0.0.1"), None, Some(path)).expect("present");
            req.raw_path().to_vec()
        };
        let path = "/api/seckill/p1/order";
        for (raw, want) in [
            (&b"/api/seckill/p1/order"[..], &b"/api/seckill/p1/order"[..]),
            (b"/API/seckill//p1/order/", b"/api/seckill/p1/order"),
            (
                b"/api/seckill/p1/order;jsessionid=1?a=%2F&b",
                b"/api/seckill/p1/order?a=%2F&b",
            ),
            // Absolute form becomes origin form (Host already names the site).
            (
                b"http://shop.test/api/seckill/p1/order.json?a=1",
                b"/api/seckill/p1/order?a=1",
            ),
            // A query that is not UTF-8 keeps its bytes.
            (
                b"/api/./seckill/p1/order?n=\xd6\xd0",
                b"/api/seckill/p1/order?n=\xd6\xd0",
            ),
        ] {
            assert_eq!(target(raw, path), want, "{}", String::from_utf8_lossy(raw));
        }
        // An HTTP/2 request keeps the authority its URI carries.
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri("https://shop.test/API/seckill/p1/order/?a=1")
            .body(())
            .expect("request")
            .into_parts();
        let mut req = RequestHeader::from(parts);
        present(&mut req, peer("10.0.0.1"), None, Some(path)).expect("present");
        assert_eq!(
            req.uri.to_string(),
            "https://shop.test/api/seckill/p1/order?a=1"
        );
        // Nothing to rewrite for a request no rule matched.
        let mut req = RequestHeader::build("GET", b"/static//a/./b", None).expect("req");
        present(&mut req, peer("10.0.0.1"), None, None).expect("present");
        assert_eq!(req.raw_path(), b"/static//a/./b");
    }

    #[test]
    fn a_winner_goes_without_the_expectation_the_gateway_met() {
        let key = SkuKey::new("phone", "p1");
        let ticket = TicketHeaders {
            ticket: TicketId(3),
            qty: 1,
            key: &key,
        };
        let mut req = request(&[("expect", "100-continue")]);
        present(&mut req, peer("10.0.0.1"), Some(ticket), None).expect("present");
        assert!(req.headers.get("expect").is_none());
        // Pass-through: the backend answers the expectation itself.
        let mut req = request(&[("expect", "100-continue")]);
        present(&mut req, peer("10.0.0.1"), None, None).expect("present");
        assert!(req.headers.get("expect").is_some());
    }

    #[test]
    fn host_rules_follow_rfc_9112() {
        let with = |version, hosts: &[&str]| {
            let mut req = RequestHeader::build("POST", b"/o", None).expect("req");
            req.set_version(version);
            for h in hosts {
                req.append_header("host", *h).expect("host");
            }
            req
        };
        use http::Version as V;
        assert_eq!(host_problem(&with(V::HTTP_11, &["a"]), true), None);
        assert_eq!(
            host_problem(&with(V::HTTP_11, &[]), false),
            Some("Host: missing (HTTP/1.1 requires it)")
        );
        assert_eq!(
            host_problem(&with(V::HTTP_11, &["a", "b"]), false),
            Some("Host: sent more than once")
        );
        assert_eq!(host_problem(&with(V::HTTP_10, &[]), false), None);
        assert_eq!(
            host_problem(&with(V::HTTP_10, &[]), true),
            Some("Host: missing (an order must name the shop)")
        );
        assert_eq!(host_problem(&with(V::HTTP_2, &[]), true), None);
    }

    #[test]
    fn only_http_1_1_clients_wait_for_100_continue() {
        let mut req = request(&[("expect", "100-Continue")]);
        assert!(expects_continue(&req));
        req.set_version(http::Version::HTTP_10);
        assert!(!expects_continue(&req));
        assert!(!expects_continue(&request(&[])));
        assert!(!expects_continue(&request(&[("expect", "something-else")])));
    }

    #[test]
    fn broken_chunked_framing_is_told_apart_from_a_client_gone() {
        let e = |t| Error::new_down(t);
        assert_eq!(
            body_framing_error(&e(ErrorType::Custom("InvalidChunk"))),
            Some("body: invalid chunked encoding")
        );
        assert_eq!(
            body_framing_error(&e(ErrorType::Custom("InvalidTrailerEnd"))),
            Some("body: invalid chunked encoding")
        );
        assert_eq!(body_framing_error(&e(ErrorType::ConnectionClosed)), None);
        assert_eq!(body_framing_error(&e(ErrorType::ReadTimedout)), None);
        assert_eq!(body_framing_error(&e(ErrorType::ReadError)), None);
    }

    #[test]
    fn a_forward_is_delivered_only_with_its_whole_body() {
        // Header not sent: nothing reached the backend.
        assert!(!delivered(false, Some(10), Some(0)));
        assert!(!delivered(false, None, None));
        // Cut inside the admitted body: no order can have been placed.
        assert!(!delivered(true, Some(10), Some(0)));
        assert!(!delivered(true, Some(10), Some(9)));
        // The whole body went out.
        assert!(delivered(true, Some(10), Some(10)));
        assert!(delivered(true, Some(0), Some(0)));
        // Not tracked (no admitted body, or pingora does not count): as sent.
        assert!(delivered(true, None, Some(0)));
        assert!(delivered(true, Some(10), None));
    }

    #[test]
    fn errors_name_how_the_exchange_ended() {
        let up = Error::new_up;
        assert_eq!(
            end_of(&up(ErrorType::ConnectRefused), false),
            ForwardEnd::ConnectError
        );
        assert_eq!(
            end_of(&up(ErrorType::ConnectTimedout), false),
            ForwardEnd::ConnectError
        );
        assert_eq!(
            end_of(&up(ErrorType::ReadTimedout), true),
            ForwardEnd::Timeout
        );
        assert_eq!(
            end_of(&up(ErrorType::ConnectionClosed), true),
            ForwardEnd::Reset
        );
        let down = Error::new_down(ErrorType::ConnectionClosed);
        assert_eq!(end_of(&down, false), ForwardEnd::ClientGone { sent: false });
        assert_eq!(end_of(&down, true), ForwardEnd::ClientGone { sent: true });
    }
}
