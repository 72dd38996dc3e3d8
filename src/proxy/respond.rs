//! Writes the gateway's own answers to the client, keeping the connection
//! alive (pingora's `respond_error*` helpers turn keep-alive off, which
//! costs about 4x on the refusal path; see ../shared/PINGORA.md).

use pingora_core::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::outcome::Rendered;

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
