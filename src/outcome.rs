//! Outcomes of a request and the gateway's own answers.
//!
//! `Outcome` is the closed set of labels of DESIGN.md section 3 (the
//! `X-Sluice-Outcome` header and the `outcome` metric label), plus
//! `cached` for answers of the read cache and the stock view. `Answer` is a
//! refusal or notice the gateway makes itself; [`render`] is the one place
//! where an answer becomes status, headers and body, with a rule's
//! `responses` overrides applied on top.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

use crate::vocab::StoredResponse;

/// What happened to a request, as clients and dashboards see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A winner sent to the backend; the backend's answer is relayed.
    Forwarded,
    /// A winner held in the queue, with a ticket to poll.
    Queued,
    /// No stock left.
    SoldOut,
    /// A token bucket was empty.
    RateLimited,
    /// The same attempt again.
    Duplicate,
    /// The campaign window has not opened.
    NotStarted,
    /// The campaign window has closed.
    Ended,
    /// Malformed or missing input, or a request over a size limit.
    Invalid,
    /// The gateway cannot serve it safely now (store or backend down).
    Unavailable,
    /// No rule matched; proxied unchanged.
    Passthrough,
    /// Answered by the gateway's read cache (a fresh, stale or shared
    /// answer) or its local stock view, without a backend request of its own.
    Cached,
}

impl Outcome {
    /// Every outcome, in contract order (used to pre-register metric series).
    pub const ALL: [Outcome; 11] = [
        Outcome::Forwarded,
        Outcome::Queued,
        Outcome::SoldOut,
        Outcome::RateLimited,
        Outcome::Duplicate,
        Outcome::NotStarted,
        Outcome::Ended,
        Outcome::Invalid,
        Outcome::Unavailable,
        Outcome::Passthrough,
        Outcome::Cached,
    ];

    /// The contract name: header value and metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Queued => "queued",
            Outcome::SoldOut => "sold_out",
            Outcome::RateLimited => "rate_limited",
            Outcome::Duplicate => "duplicate",
            Outcome::NotStarted => "not_started",
            Outcome::Ended => "ended",
            Outcome::Invalid => "invalid",
            Outcome::Unavailable => "unavailable",
            Outcome::Passthrough => "passthrough",
            Outcome::Cached => "cached",
        }
    }

    /// Parses a contract name (used for `responses:` keys).
    pub fn from_name(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

/// An answer the gateway writes itself instead of asking the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Held in the queue: 202 with the ticket and its position.
    Queued { ticket: String, position: u64 },
    /// 410: nothing left.
    SoldOut,
    /// 429 with `Retry-After` (whole seconds, rounded up).
    RateLimited { retry_after: Duration },
    /// 409, or 202 with a position when the first attempt is queued.
    Duplicate {
        /// The first attempt's ticket, when there is one to point at.
        ticket: Option<String>,
        /// Its position, while queued.
        queued_position: Option<u64>,
        /// Why it is a duplicate.
        message: &'static str,
    },
    /// The first attempt is done: its stored answer, replayed as it was.
    Replay(StoredResponse),
    /// 425 with the seconds until the window opens.
    NotStarted { starts_in: Duration },
    /// 410: the window has closed.
    Ended,
    /// 400 with a message naming the field.
    Invalid { message: String },
    /// 413: a body over the configured limit.
    BodyTooLarge { limit: u64 },
    /// 431: request headers over the configured limit.
    HeadersTooLarge { limit: u64 },
    /// 503 with the reason.
    Unavailable { message: String },
    /// The answer to a stock poll (`GET /sluice/stock/{rule}/{sku}`).
    Stock(StockPoll),
    /// The answer to a ticket poll (`GET /sluice/tickets/{id}`).
    Ticket {
        /// The ticket as the client wrote it.
        id: String,
        /// Where it is.
        poll: TicketPoll,
    },
}

/// What a page polling a sku's stock is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StockPoll {
    /// 200 `{"available": N, "state": ...}`.
    Known {
        /// Units left, as this node last saw them.
        available: u64,
        /// Where the sale is.
        state: SaleState,
    },
    /// 404: no such rule, or a sku nobody loaded.
    Unknown {
        /// Why, for the page's developer.
        message: String,
    },
}

/// Where a sku's sale is, for pages (`state` of a stock poll).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaleState {
    /// Open, with units left.
    OnSale,
    /// Nothing left.
    SoldOut,
    /// Before the rule's window.
    NotStarted,
    /// After the rule's window.
    Ended,
}

impl SaleState {
    /// The contract name.
    pub const fn as_str(self) -> &'static str {
        match self {
            SaleState::OnSale => "on_sale",
            SaleState::SoldOut => "sold_out",
            SaleState::NotStarted => "not_started",
            SaleState::Ended => "ended",
        }
    }
}

/// Where a polled ticket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketPoll {
    /// Never issued, or expired: 404.
    Unknown,
    /// Waiting in the queue: 202 with its position and, once the drain
    /// rate is known, an ETA.
    Queued {
        /// 1 = next.
        position: u64,
        /// Seconds until it is sent, at the recent drain rate.
        eta_seconds: Option<u64>,
    },
    /// At the backend now: 409.
    InFlight,
    /// Placed: the backend's kept answer, or a plain 200.
    Done(Option<StoredResponse>),
    /// Not placed, units back in stock: the kept failure, or a plain 410.
    NotPlaced(Option<StoredResponse>),
}

impl Answer {
    /// The outcome label of this answer.
    pub fn outcome(&self) -> Outcome {
        match self {
            Answer::Queued { .. } => Outcome::Queued,
            Answer::SoldOut => Outcome::SoldOut,
            Answer::RateLimited { .. } => Outcome::RateLimited,
            Answer::Duplicate { .. } | Answer::Replay(_) => Outcome::Duplicate,
            Answer::NotStarted { .. } => Outcome::NotStarted,
            Answer::Ended => Outcome::Ended,
            Answer::Invalid { .. }
            | Answer::BodyTooLarge { .. }
            | Answer::HeadersTooLarge { .. } => Outcome::Invalid,
            Answer::Unavailable { .. } => Outcome::Unavailable,
            Answer::Stock(StockPoll::Known { .. }) => Outcome::Cached,
            Answer::Stock(StockPoll::Unknown { .. }) => Outcome::Invalid,
            Answer::Ticket { poll, .. } => match poll {
                TicketPoll::Unknown => Outcome::Invalid,
                TicketPoll::Queued { .. } => Outcome::Queued,
                TicketPoll::InFlight | TicketPoll::Done(_) => Outcome::Forwarded,
                TicketPoll::NotPlaced(_) => Outcome::Unavailable,
            },
        }
    }
}

/// A rule's override for one outcome's answer (`responses.<outcome>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseOverride {
    /// Replaces the default status.
    pub status: Option<StatusCode>,
    /// Added to (and replacing same-named) default headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Replaces the default JSON body.
    pub body: Option<Bytes>,
}

/// A fully formed gateway answer, ready to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The outcome label (for the header and metrics).
    pub outcome: Outcome,
    /// HTTP status.
    pub status: StatusCode,
    /// Headers other than Content-Length and `X-Sluice-Outcome`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Bytes,
}

/// Turns an answer into status, headers and body; the one mapping of the
/// contract's default statuses, with the rule's override (if any) on top.
pub fn render(answer: &Answer, overrides: Option<&ResponseOverride>) -> Rendered {
    let outcome = answer.outcome();
    let name = Some(outcome.as_str());
    let mut headers = vec![(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    let limit_message;
    let (status, body) = match answer {
        Answer::Queued { ticket, position } => (
            StatusCode::ACCEPTED,
            Body {
                outcome: name,
                ticket: Some(Some(ticket)),
                position: Some(*position),
                ..Body::default()
            },
        ),
        Answer::SoldOut => (StatusCode::GONE, Body::message(name, "sold out")),
        Answer::RateLimited { retry_after } => {
            let secs = retry_after_secs(*retry_after);
            headers.push((http::header::RETRY_AFTER, HeaderValue::from(secs)));
            (
                StatusCode::TOO_MANY_REQUESTS,
                Body {
                    retry_after: Some(secs),
                    ..Body::message(name, "too many requests, slow down")
                },
            )
        }
        Answer::Duplicate {
            ticket,
            queued_position,
            message,
        } => (
            if queued_position.is_some() {
                StatusCode::ACCEPTED
            } else {
                StatusCode::CONFLICT
            },
            Body {
                ticket: Some(ticket.as_deref()),
                position: *queued_position,
                ..Body::message(name, message)
            },
        ),
        // The first attempt's own answer, byte for byte; overrides do not
        // apply to what the backend said.
        Answer::Replay(stored) => return replayed(outcome, stored),
        Answer::NotStarted { starts_in } => (
            StatusCode::TOO_EARLY,
            Body {
                starts_in: Some(retry_after_secs(*starts_in)),
                ..Body::message(name, "not started yet")
            },
        ),
        Answer::Ended => (StatusCode::GONE, Body::message(name, "the sale has ended")),
        Answer::Invalid { message } => (StatusCode::BAD_REQUEST, Body::message(name, message)),
        Answer::BodyTooLarge { limit } => {
            limit_message = format!("request body over {limit} bytes");
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                Body::message(name, &limit_message),
            )
        }
        Answer::HeadersTooLarge { limit } => {
            limit_message = format!("request headers over {limit} bytes");
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Body::message(name, &limit_message),
            )
        }
        Answer::Unavailable { message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Body::message(name, message),
        ),
        Answer::Stock(StockPoll::Known { available, state }) => (
            StatusCode::OK,
            Body {
                available: Some(*available),
                state: Some(state.as_str()),
                ..Body::default()
            },
        ),
        Answer::Stock(StockPoll::Unknown { message }) => {
            (StatusCode::NOT_FOUND, Body::message(name, message))
        }
        Answer::Ticket { id, poll } => {
            let ticket = Some(Some(id.as_str()));
            match poll {
                TicketPoll::Unknown => (
                    StatusCode::NOT_FOUND,
                    Body {
                        ticket,
                        ..Body::message(name, "unknown or expired ticket")
                    },
                ),
                TicketPoll::Queued {
                    position,
                    eta_seconds,
                } => (
                    StatusCode::ACCEPTED,
                    Body {
                        outcome: name,
                        ticket,
                        position: Some(*position),
                        eta_seconds: Some(*eta_seconds),
                        ..Body::default()
                    },
                ),
                TicketPoll::InFlight => (
                    StatusCode::CONFLICT,
                    Body {
                        state: Some("in_flight"),
                        ticket,
                        ..Body::message(name, "the order is being placed")
                    },
                ),
                TicketPoll::Done(Some(r)) | TicketPoll::NotPlaced(Some(r)) => {
                    return replayed(outcome, r)
                }
                TicketPoll::Done(None) => (
                    StatusCode::OK,
                    Body {
                        outcome: name,
                        state: Some("done"),
                        ticket,
                        ..Body::default()
                    },
                ),
                TicketPoll::NotPlaced(None) => (
                    StatusCode::GONE,
                    Body {
                        state: Some("released"),
                        ticket,
                        ..Body::message(
                            name,
                            "the order was not placed; the units went back to stock",
                        )
                    },
                ),
            }
        }
    };
    let mut rendered = Rendered {
        outcome,
        status,
        headers,
        body: body.to_bytes(),
    };
    if let Some(o) = overrides {
        if let Some(status) = o.status {
            rendered.status = status;
        }
        for (name, value) in &o.headers {
            rendered.headers.retain(|(n, _)| n != name);
            rendered.headers.push((name.clone(), value.clone()));
        }
        if let Some(body) = &o.body {
            rendered.body = body.clone();
        }
    }
    rendered
}

/// A gateway answer's JSON body, serialized straight from borrowed parts
/// (no `serde_json::Value` map per answer). Fields are in alphabetical
/// order, the key order clients have always seen; `Some(None)` is a
/// `null` the contract shows (a duplicate without a ticket, an unknown ETA).
#[derive(Default, Serialize)]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    available: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eta_seconds: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    starts_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ticket: Option<Option<&'a str>>,
}

impl<'a> Body<'a> {
    /// `{"message": .., "outcome": ..}`, the shape of most answers.
    fn message(outcome: Option<&'a str>, message: &'a str) -> Self {
        Self {
            message: Some(message),
            outcome,
            ..Self::default()
        }
    }

    fn to_bytes(&self) -> Bytes {
        // Plain strings and numbers: serializing them cannot fail.
        serde_json::to_vec(self).map_or_else(|_| Bytes::new(), Bytes::from)
    }
}

/// A kept backend answer as it was (status, Content-Type, body), under the
/// given outcome label: replays to duplicates and ticket polls.
pub fn replayed(outcome: Outcome, stored: &StoredResponse) -> Rendered {
    let mut headers = Vec::new();
    if let Some(ct) = stored
        .content_type
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        headers.push((http::header::CONTENT_TYPE, ct));
    }
    Rendered {
        outcome,
        status: StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
        headers,
        body: stored.body.clone(),
    }
}

/// Whole seconds, rounded up and at least 1, so a client never retries early.
fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(r: &Rendered) -> serde_json::Value {
        serde_json::from_slice(&r.body).expect("json body")
    }

    fn ticket(poll: TicketPoll) -> Answer {
        Answer::Ticket {
            id: "0123".into(),
            poll,
        }
    }

    #[test]
    fn a_polled_ticket_that_is_done_replays_the_kept_answer() {
        let kept = StoredResponse {
            status: 201,
            content_type: Some("text/plain".into()),
            body: Bytes::from_static(b"order 7"),
        };
        let done = render(&ticket(TicketPoll::Done(Some(kept.clone()))), None);
        assert_eq!(
            (done.status.as_u16(), done.outcome),
            (201, Outcome::Forwarded)
        );
        assert_eq!(&done.body[..], b"order 7");
        let failed = render(&ticket(TicketPoll::NotPlaced(Some(kept))), None);
        assert_eq!(failed.outcome, Outcome::Unavailable);
        let queued = render(
            &ticket(TicketPoll::Queued {
                position: 3,
                eta_seconds: None,
            }),
            None,
        );
        assert_eq!(
            body(&queued),
            json!({"outcome": "queued", "ticket": "0123", "position": 3, "eta_seconds": null})
        );
    }

    #[test]
    fn every_answer_maps_to_its_contract_status() {
        let table: Vec<(Answer, u16, Outcome)> = vec![
            (
                Answer::Queued {
                    ticket: "t".into(),
                    position: 3,
                },
                202,
                Outcome::Queued,
            ),
            (Answer::SoldOut, 410, Outcome::SoldOut),
            (
                Answer::RateLimited {
                    retry_after: Duration::from_millis(1500),
                },
                429,
                Outcome::RateLimited,
            ),
            (
                Answer::Duplicate {
                    ticket: Some("t".into()),
                    queued_position: None,
                    message: "already in progress",
                },
                409,
                Outcome::Duplicate,
            ),
            (
                Answer::Duplicate {
                    ticket: Some("t".into()),
                    queued_position: Some(7),
                    message: "already queued",
                },
                202,
                Outcome::Duplicate,
            ),
            (
                Answer::NotStarted {
                    starts_in: Duration::from_secs(30),
                },
                425,
                Outcome::NotStarted,
            ),
            (Answer::Ended, 410, Outcome::Ended),
            (
                Answer::Invalid {
                    message: "user: missing header X-User-Id".into(),
                },
                400,
                Outcome::Invalid,
            ),
            (Answer::BodyTooLarge { limit: 10 }, 413, Outcome::Invalid),
            (Answer::HeadersTooLarge { limit: 10 }, 431, Outcome::Invalid),
            (
                Answer::Unavailable {
                    message: "down".into(),
                },
                503,
                Outcome::Unavailable,
            ),
            (ticket(TicketPoll::Unknown), 404, Outcome::Invalid),
            (
                ticket(TicketPoll::Queued {
                    position: 2,
                    eta_seconds: Some(1),
                }),
                202,
                Outcome::Queued,
            ),
            (ticket(TicketPoll::InFlight), 409, Outcome::Forwarded),
            (ticket(TicketPoll::Done(None)), 200, Outcome::Forwarded),
            (
                ticket(TicketPoll::NotPlaced(None)),
                410,
                Outcome::Unavailable,
            ),
        ];
        for (answer, status, outcome) in table {
            let r = render(&answer, None);
            assert_eq!(r.status.as_u16(), status, "{answer:?}");
            assert_eq!(r.outcome, outcome, "{answer:?}");
            assert_eq!(body(&r)["outcome"], outcome.as_str(), "{answer:?}");
            assert_eq!(
                r.headers[0],
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json")
                )
            );
        }
    }

    #[test]
    fn replay_is_the_stored_answer_untouched_by_overrides() {
        let answer = Answer::Replay(StoredResponse {
            status: 201,
            content_type: Some("text/plain".into()),
            body: Bytes::from_static(b"order 7"),
        });
        let o = ResponseOverride {
            status: Some(StatusCode::OK),
            headers: vec![],
            body: Some(Bytes::from_static(b"x")),
        };
        let r = render(&answer, Some(&o));
        assert_eq!(r.outcome, Outcome::Duplicate);
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(&r.body[..], b"order 7");
        assert_eq!(
            r.headers,
            vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain")
            )]
        );
    }

    #[test]
    fn a_stock_poll_is_the_bare_view_or_a_404() {
        let r = render(
            &Answer::Stock(StockPoll::Known {
                available: 7,
                state: SaleState::OnSale,
            }),
            None,
        );
        assert_eq!((r.status.as_u16(), r.outcome), (200, Outcome::Cached));
        assert_eq!(body(&r), json!({"available": 7, "state": "on_sale"}));
        let r = render(
            &Answer::Stock(StockPoll::Unknown {
                message: "no rule".into(),
            }),
            None,
        );
        assert_eq!((r.status.as_u16(), r.outcome), (404, Outcome::Invalid));
        for (s, name) in [
            (SaleState::SoldOut, "sold_out"),
            (SaleState::NotStarted, "not_started"),
            (SaleState::Ended, "ended"),
        ] {
            assert_eq!(s.as_str(), name);
        }
    }

    #[test]
    fn rate_limited_carries_retry_after_rounded_up() {
        let r = render(
            &Answer::RateLimited {
                retry_after: Duration::from_millis(1200),
            },
            None,
        );
        let retry = r
            .headers
            .iter()
            .find(|(n, _)| n == http::header::RETRY_AFTER)
            .map(|(_, v)| v.to_str().unwrap_or_default().to_string());
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(body(&r)["retry_after"], 2);
    }

    #[test]
    fn queued_body_has_ticket_and_position() {
        let r = render(
            &Answer::Queued {
                ticket: "abc".into(),
                position: 12,
            },
            None,
        );
        assert_eq!(
            body(&r),
            json!({"outcome": "queued", "ticket": "abc", "position": 12})
        );
    }

    #[test]
    fn overrides_replace_status_headers_and_body() {
        let o = ResponseOverride {
            status: Some(StatusCode::OK),
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            )],
            body: Some(Bytes::from_static(b"{\"code\":1001}")),
        };
        let r = render(&Answer::SoldOut, Some(&o));
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.outcome, Outcome::SoldOut);
        assert_eq!(r.headers.len(), 1);
        assert_eq!(r.headers[0].1, "text/plain");
        assert_eq!(&r.body[..], b"{\"code\":1001}");
    }

    #[test]
    fn names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::from_name(o.as_str()), Some(o));
        }
        assert_eq!(Outcome::from_name("nope"), None);
    }

    #[test]
    fn bodies_keep_their_exact_bytes() {
        let cases = [
            (
                Answer::SoldOut,
                r#"{"message":"sold out","outcome":"sold_out"}"#,
            ),
            (
                Answer::RateLimited {
                    retry_after: Duration::from_millis(2500),
                },
                r#"{"message":"too many requests, slow down","outcome":"rate_limited","retry_after":3}"#,
            ),
            (
                Answer::Duplicate {
                    ticket: None,
                    queued_position: None,
                    message: "already in progress",
                },
                r#"{"message":"already in progress","outcome":"duplicate","ticket":null}"#,
            ),
            (
                Answer::Queued {
                    ticket: "t1".into(),
                    position: 4,
                },
                r#"{"outcome":"queued","position":4,"ticket":"t1"}"#,
            ),
            (
                Answer::Invalid {
                    message: "say \"hi\"".into(),
                },
                r#"{"message":"say \"hi\"","outcome":"invalid"}"#,
            ),
        ];
        for (answer, want) in cases {
            assert_eq!(std::str::from_utf8(&render(&answer, None).body), Ok(want));
        }
    }
}
