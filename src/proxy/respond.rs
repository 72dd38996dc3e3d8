//! Writes the gateway's own answers to the client, keeping the connection
//! alive (pingora's `respond_error*` helpers turn keep-alive off, which
//! costs about 4x on the refusal path; see ../shared/PINGORA.md), picks the
//! answer to a failed proxy attempt, and keeps a winner's backend answer
//! for duplicates and polls.

use bytes::BytesMut;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::admission::hold::Receipt;
use crate::admission::MAX_KEPT_BODY;
use crate::backend;
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
        _ => Some(Answer::Unavailable {
            message: "the shop is busy, please try again shortly".into(),
        }),
    }
}

/// A settled winner's backend answer, collected as it streams to the
/// client (bounded by [`MAX_KEPT_BODY`]) and kept once it is through.
pub struct KeptAnswer {
    receipt: Receipt,
    status: u16,
    content_type: Option<String>,
    body: BytesMut,
}

impl KeptAnswer {
    /// Starts keeping the answer that `header` begins.
    pub fn new(receipt: Receipt, header: &ResponseHeader) -> Self {
        Self {
            receipt,
            status: header.status.as_u16(),
            content_type: header
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: BytesMut::new(),
        }
    }

    /// Adds a body chunk, up to the bound.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = MAX_KEPT_BODY.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Keeps the whole answer, off the answer's path (the hold is already
    /// settled).
    pub fn finish(self) {
        tokio::spawn(async move {
            let answer = StoredResponse {
                status: self.status,
                content_type: self.content_type,
                body: self.body.freeze(),
            };
            self.receipt.keep(&answer).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;

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
