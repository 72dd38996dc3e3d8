//! Writes the gateway's own answers to the client, keeping the connection
//! alive (pingora's `respond_error*` helpers turn keep-alive off, which
//! costs about 4x on the refusal path; see ../shared/PINGORA.md), picks the
//! answer to a failed proxy attempt, and keeps a winner's backend answer
//! for duplicates and polls.

use bytes::BytesMut;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::admission::hold::{Hold, Receipt, Settlement};
use crate::admission::MAX_KEPT_BODY;
use crate::backend::{self, ForwardEnd};
use crate::outcome::{Answer, Rendered};
use crate::vocab::StoredResponse;

/// The response header every answer carries.
pub const OUTCOME_HEADER: &str = "X-Sluice-Outcome";

/// Writes a rendered answer: status, headers, Content-Length, body.
pub async fn write_answer(session: &mut Session, answer: &Rendered) -> Result<()> {
    let mut header = ResponseHeader::build(answer.status, Some(answer.headers.len() + 2))?;
    for (name, value) in &answer.headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    header.insert_header(http::header::CONTENT_LENGTH, answer.body.len())?;
    header.insert_header(OUTCOME_HEADER, answer.outcome.as_str())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(answer.body.clone()), true)
        .await
}

/// Header names as pingora spells them on the wire (its `titled_header_name`
/// list, which it keeps private); others go out in lower case, as there.
fn titled(name: &http::HeaderName) -> &str {
    use http::header as h;
    match *name {
        h::ACCEPT_RANGES => "Accept-Ranges",
        h::AGE => "Age",
        h::CACHE_CONTROL => "Cache-Control",
        h::CONNECTION => "Connection",
        h::CONTENT_TYPE => "Content-Type",
        h::CONTENT_ENCODING => "Content-Encoding",
        h::CONTENT_LENGTH => "Content-Length",
        h::DATE => "Date",
        h::TRANSFER_ENCODING => "Transfer-Encoding",
        h::HOST => "Host",
        h::SERVER => "Server",
        h::SET_COOKIE => "Set-Cookie",
        _ => name.as_str(),
    }
}

/// A rendered answer as the bytes of an HTTP/1.1 response, its fields in
/// the order and spelling [`write_answer`] has pingora write them, then
/// `more` fields.
pub fn to_wire(r: &Rendered, more: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + r.body.len());
    // The status line by hand: the formatter took 465 of the 20k
    // instructions of a sold_out answer (callgrind).
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(r.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(r.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut field = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let ours = |n: &http::HeaderName| {
        use http::header as h;
        [
            h::CONTENT_LENGTH,
            h::CONNECTION,
            h::DATE,
            h::TRANSFER_ENCODING,
        ]
        .contains(n)
            || n.as_str().eq_ignore_ascii_case(OUTCOME_HEADER)
            || more.iter().any(|(m, _)| n.as_str().eq_ignore_ascii_case(m))
    };
    // A rule's override naming one of the fields set here is replaced, as
    // pingora's `insert_header` replaces it.
    for (name, value) in r.headers.iter().filter(|(n, _)| !ours(n)) {
        field(titled(name), value.as_bytes());
    }
    field(
        "Content-Length",
        itoa::Buffer::new().format(r.body.len()).as_bytes(),
    );
    field(OUTCOME_HEADER, r.outcome.as_str().as_bytes());
    for (name, value) in more {
        field(name, value);
    }
    out.extend_from_slice(b"\r\n");
    // No body with 1xx, 204 or 304 (RFC 9110 section 6.4.1), as pingora's
    // body writer does.
    if !(r.status.is_informational() || matches!(r.status.as_u16(), 204 | 304)) {
        out.extend_from_slice(&r.body);
    }
    out
}

/// The bytes pingora writes for [`write_answer`] on an HTTP/1.1 session:
/// the answer, its `Date` and `Connection`.
pub fn wire_answer(r: &Rendered, keep_alive: bool) -> Vec<u8> {
    let date = pingora_core::protocols::http::date::get_cached_date();
    let connection: &[u8] = if keep_alive { b"keep-alive" } else { b"close" };
    to_wire(r, &[("Date", date.as_bytes()), ("Connection", connection)])
}

/// What to tell a client whose request failed with `e`; `None` when the
/// client itself went away (nobody to tell). A request pingora refuses to
/// forward (say `Connection` nominating `Host`) or a body with broken
/// chunked framing is `invalid`.
pub fn failure_answer(e: &Error, max_body_bytes: u64) -> Option<Answer> {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(413), _) => Some(Answer::BodyTooLarge {
            limit: max_body_bytes,
        }),
        (ErrorType::InvalidHTTPHeader, ErrorSource::Downstream) => Some(Answer::Invalid {
            message: format!(
                "request: {}",
                e.context.as_ref().map_or("malformed", |c| c.as_str())
            ),
        }),
        (_, ErrorSource::Downstream) => {
            backend::body_framing_error(e).map(|message| Answer::Invalid {
                message: message.into(),
            })
        }
        _ => Some(busy()),
    }
}

/// The answer when the backend (or the store behind the cache) cannot
/// take the request now.
pub fn busy() -> Answer {
    Answer::Unavailable {
        message: "the shop is busy, please try again shortly".into(),
    }
}

/// Settles `hold` as `how`. A settlement that did not land in the store
/// is logged: the units stay held (never oversold) until an admin release
/// or reconcile.
pub async fn settle(hold: Hold, how: Settlement) -> Receipt {
    let ticket = hold.ticket();
    let (receipt, settled) = hold.settle(how).await;
    if let Err(e) = settled {
        tracing::warn!(ticket = %ticket, error = %e, "could not settle a ticket");
    }
    receipt
}

/// What a winner's answer (its header, just in) does to its hold: a
/// release (or keep) settles now, before the client reads the answer, so a
/// retry finds the units back; a commit waits for the body, to keep the
/// answer in the same round trip.
pub async fn answered(hold: Hold, status: u16, header: &ResponseHeader) -> KeptAnswer {
    match hold.classify(ForwardEnd::Answered(status)) {
        Settlement::Commit => KeptAnswer::commit_after(hold, header),
        how => KeptAnswer::keep_after(settle(hold, how).await, header),
    }
}

/// What follows the body of a winner's backend answer.
enum AfterBody {
    /// The answer places the order: the hold is committed with the answer
    /// once the body is through, in one store round trip.
    Commit(Hold),
    /// Settled already (released, or kept held): the answer is kept for
    /// the buyer's poll.
    Keep(Receipt),
}

/// A winner's backend answer, collected as it streams to the client
/// (bounded by [`MAX_KEPT_BODY`]), then committed with its hold or kept
/// for its settled ticket ([`KeptAnswer::finish`], in `logging`).
pub struct KeptAnswer {
    then: Option<AfterBody>,
    status: u16,
    content_type: Option<String>,
    body: BytesMut,
    /// The body went past the bound: only whole answers are replayed.
    truncated: bool,
    /// The body was read to its end.
    complete: bool,
}

impl KeptAnswer {
    fn new(then: AfterBody, header: &ResponseHeader) -> Self {
        Self {
            then: Some(then),
            status: header.status.as_u16(),
            content_type: header
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: BytesMut::new(),
            truncated: false,
            complete: false,
        }
    }

    /// An answer that commits `hold` once it is through.
    pub fn commit_after(hold: Hold, header: &ResponseHeader) -> Self {
        Self::new(AfterBody::Commit(hold), header)
    }

    /// The answer of a ticket already settled.
    pub fn keep_after(receipt: Receipt, header: &ResponseHeader) -> Self {
        Self::new(AfterBody::Keep(receipt), header)
    }

    /// Adds a body chunk, up to the bound.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.body.len() + chunk.len() > MAX_KEPT_BODY {
            self.truncated = true;
            return;
        }
        self.body.extend_from_slice(chunk);
    }

    /// The body was read to its end.
    pub fn end(&mut self) {
        self.complete = true;
    }

    /// Commits the hold with the answer (without it when the body did not
    /// arrive whole: a repeat is never replayed half an answer), or keeps
    /// the answer of a settled ticket.
    pub async fn finish(mut self) {
        let answer = (self.complete && !self.truncated).then(|| StoredResponse {
            status: self.status,
            content_type: self.content_type.take(),
            body: std::mem::take(&mut self.body).freeze(),
        });
        match (self.then.take(), answer) {
            (Some(AfterBody::Commit(hold)), answer) => {
                let ticket = hold.ticket();
                let settled = match &answer {
                    Some(a) => hold.settle_with_answer(Settlement::Commit, a).await,
                    None => hold.settle(Settlement::Commit).await.1,
                };
                if let Err(e) = settled {
                    // Journaled by the ledger; the units stay held until
                    // it lands, never resold.
                    tracing::warn!(ticket = %ticket, error = %e, "could not commit a ticket");
                }
            }
            (Some(AfterBody::Keep(receipt)), Some(answer)) => receipt.keep(&answer).await,
            (Some(AfterBody::Keep(_)) | None, _) => {}
        }
    }
}

impl Drop for KeptAnswer {
    /// The backend answered with a committing status: whatever happens
    /// to the request task afterwards, the order is committed.
    fn drop(&mut self) {
        if let Some(AfterBody::Commit(hold)) = self.then.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = hold.settle(Settlement::Commit).await;
                });
            }
            // Without a runtime the hold's own drop keeps the units held.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;

    #[test]
    fn every_outcome_and_cache_result_is_a_static_header_value() {
        // The proxy inserts them with `HeaderValue::from_static`, which
        // panics on a byte a header value may not hold.
        let values = Outcome::ALL.iter().map(|o| o.as_str());
        let cached = crate::cache::CacheResult::ALL.iter().map(|r| r.as_str());
        for v in values.chain(cached) {
            assert_eq!(http::HeaderValue::from_static(v), v);
        }
    }

    #[test]
    fn the_wire_form_keeps_one_of_each_framing_field_and_no_body_where_none_goes() {
        let mut r = crate::outcome::render(&Answer::SoldOut, None);
        for (n, v) in [
            ("content-length", "99"),
            ("connection", "close"),
            ("x-shop", "1"),
        ] {
            r.headers.push((
                http::HeaderName::from_static(n),
                http::HeaderValue::from_static(v),
            ));
        }
        let text = String::from_utf8(wire_answer(&r, true)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 410 Gone\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        let count = |n: &str| {
            head.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with(n))
                .count()
        };
        assert_eq!(
            (
                count("content-length:"),
                count("connection:"),
                count("date:")
            ),
            (1, 1, 1),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            head.contains("Connection: keep-alive") && head.contains("x-shop: 1"),
            "{head}"
        );
        // A status without a reason phrase keeps the space before it.
        let mut odd = r.clone();
        odd.status = http::StatusCode::from_u16(599).unwrap_or(http::StatusCode::IM_A_TEAPOT);
        let text = String::from_utf8(wire_answer(&odd, true)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 599 \r\n"), "{text}");
        r.status = http::StatusCode::NO_CONTENT;
        let text = String::from_utf8(wire_answer(&r, true)).unwrap_or_default();
        assert!(text.ends_with("\r\n\r\n"), "no body after a 204: {text}");
    }

    #[test]
    fn failures_map_to_answers() {
        let outcome = |e: &Error| failure_answer(e, 100).map(|a| a.outcome());
        assert_eq!(
            failure_answer(&Error::new_down(ErrorType::HTTPStatus(413)), 100),
            Some(Answer::BodyTooLarge { limit: 100 })
        );
        let mut nominated = Error::new_down(ErrorType::InvalidHTTPHeader);
        nominated.context = Some("protected header cannot be nominated".into());
        assert_eq!(
            failure_answer(&nominated, 100),
            Some(Answer::Invalid {
                message: "request: protected header cannot be nominated".into()
            })
        );
        assert_eq!(
            outcome(&Error::new_down(ErrorType::Custom("InvalidChunk"))),
            Some(Outcome::Invalid)
        );
        assert_eq!(outcome(&Error::new_down(ErrorType::ConnectionClosed)), None);
        assert_eq!(
            outcome(&Error::new_up(ErrorType::ConnectRefused)),
            Some(Outcome::Unavailable)
        );
    }
}
