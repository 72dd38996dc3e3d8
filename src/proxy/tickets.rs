//! `GET /sluice/tickets/{id}` on the main listener: where a ticket is,
//! answered by any node (the ticket lives in the store). 202 with the
//! position and an ETA while queued, 409 while in flight, the backend's
//! answer once done (or the failure, when a queued order could not be
//! placed), 404 when unknown or expired.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use crate::outcome::{replayed, Outcome, Rendered};
use crate::store::{TicketRecord, TicketState};

/// The path prefix of ticket polls.
pub const TICKETS_PATH: &str = "/sluice/tickets/";

fn json_answer(outcome: Outcome, status: StatusCode, body: serde_json::Value) -> Rendered {
    Rendered {
        outcome,
        status,
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body: Bytes::from(body.to_string()),
    }
}

/// The answer to a poll of a ticket in `record` (`None`: unknown), with
/// its queue position and ETA when queued.
pub fn poll_answer(
    id: &str,
    record: Option<TicketRecord>,
    position: Option<u64>,
    eta_seconds: Option<u64>,
) -> Rendered {
    let Some(record) = record else {
        return json_answer(
            Outcome::Invalid,
            StatusCode::NOT_FOUND,
            json!({"outcome": "invalid", "message": "unknown or expired ticket", "ticket": id}),
        );
    };
    match (record.state, record.response) {
        (TicketState::Queued, _) => json_answer(
            Outcome::Queued,
            StatusCode::ACCEPTED,
            json!({"outcome": "queued", "ticket": id, "position": position.unwrap_or(1), "eta_seconds": eta_seconds}),
        ),
        (TicketState::Held, _) => json_answer(
            Outcome::Forwarded,
            StatusCode::CONFLICT,
            json!({"outcome": "forwarded", "state": "in_flight", "ticket": id, "message": "the order is being placed"}),
        ),
        (TicketState::Committed, Some(r)) => replayed(Outcome::Forwarded, &r),
        (TicketState::Committed, None) => json_answer(
            Outcome::Forwarded,
            StatusCode::OK,
            json!({"outcome": "forwarded", "state": "done", "ticket": id}),
        ),
        (TicketState::Released, Some(r)) => replayed(Outcome::Unavailable, &r),
        (TicketState::Released, None) => json_answer(
            Outcome::Unavailable,
            StatusCode::GONE,
            json!({"outcome": "unavailable", "state": "released", "ticket": id, "message": "the order was not placed; the units went back to stock"}),
        ),
    }
}
