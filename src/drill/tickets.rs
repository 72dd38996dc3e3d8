//! Following `queued` answers: every ticket is polled with
//! `GET /sluice/tickets/{id}` until it is placed, not placed, unknown, or
//! its time is up (`--ticket-timeout` from the click), with a growing wait
//! between polls (100 ms doubling to 1 s: a shopper's page polls about
//! that often, and a long queue is not flooded with polls).
//!
//! How a poll answer reads (DESIGN.md section 3): 202 `queued` and 409
//! `{"state":"in_flight"}` mean wait; any other `forwarded` answer is the
//! placed order (its kept answer, replayed); `unavailable` means not
//! placed (units back in stock); 404 means unknown or expired.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::conn::Answer;
use super::stats::Label;
use crate::outcome::Outcome;

/// Wait before a ticket's first poll.
pub const FIRST_POLL: Duration = Duration::from_millis(100);

/// The longest wait between two polls of one ticket.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

/// A ticket being followed.
#[derive(Clone, Debug)]
pub struct Pending {
    /// When to poll it next.
    pub due: Instant,
    /// When its order was sent.
    pub clicked: Instant,
    /// When to stop polling.
    pub give_up: Instant,
    /// The wait after the next poll, if it still waits.
    pub wait: Duration,
    /// The ticket id (checked: 32 lowercase hex).
    pub ticket: String,
    /// Its user's number.
    pub user: u64,
    /// Its sku's index.
    pub sku: usize,
    /// Units it holds.
    pub units: u32,
}

impl Pending {
    /// The next poll after one that said "wait", or `None` when its time is up.
    pub fn again(mut self, now: Instant) -> Option<Pending> {
        if now >= self.give_up {
            return None;
        }
        self.due = (now + self.wait).min(self.give_up);
        self.wait = (self.wait * 2).min(MAX_POLL_WAIT);
        Some(self)
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    /// Reversed: the heap's top is the ticket due first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.due.cmp(&self.due)
    }
}

/// Tickets waiting for their next poll, the one due first on top.
pub type PollQueue = BinaryHeap<Pending>;

/// The ticket of a `queued` answer's body, if it names a well-formed one.
pub fn ticket_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Queued<'a> {
        #[serde(borrow)]
        ticket: Option<&'a str>,
    }
    let q: Queued<'_> = serde_json::from_slice(body).ok()?;
    q.ticket
        .filter(|t| t.len() == 32 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .map(str::to_string)
}

/// What a poll answer says about a ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// Still queued or at the backend.
    Waiting,
    /// The backend took the order.
    Placed,
    /// Not placed; the units went back.
    NotPlaced,
    /// Unknown or expired.
    Unknown,
    /// Not an answer about the ticket (a proxy's error page, a refusal):
    /// ask again later.
    Unclear,
}

/// Reads a poll answer (`body` is its whole body).
pub fn read_poll(answer: &Answer, body: &[u8]) -> Polled {
    match answer.label {
        Label::Outcome(Outcome::Queued) => Polled::Waiting,
        Label::Outcome(Outcome::Forwarded) if answer.status == 409 && in_flight(body) => {
            Polled::Waiting
        }
        Label::Outcome(Outcome::Forwarded) => Polled::Placed,
        Label::Outcome(Outcome::Unavailable) => Polled::NotPlaced,
        _ if answer.status == 404 => Polled::Unknown,
        _ => Polled::Unclear,
    }
}

/// Whether a 409 is the gateway's "being placed" rather than a kept 409
/// of the backend's.
fn in_flight(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct State<'a> {
        #[serde(borrow)]
        state: Option<&'a str>,
    }
    serde_json::from_slice::<State<'_>>(body).is_ok_and(|s| s.state == Some("in_flight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, outcome: Outcome) -> Answer {
        Answer {
            status,
            label: Label::Outcome(outcome),
        }
    }

    #[test]
    fn poll_answers_read_as_the_contract_says() {
        let t = "0123456789abcdef0123456789abcdef";
        let queued = format!(r#"{{"outcome":"queued","ticket":"{t}","position":3}}"#);
        assert_eq!(ticket_of(queued.as_bytes()).as_deref(), Some(t));
        assert_eq!(ticket_of(br#"{"ticket":"../x"}"#), None);
        assert_eq!(
            read_poll(&answer(202, Outcome::Queued), queued.as_bytes()),
            Polled::Waiting
        );
        assert_eq!(
            read_poll(
                &answer(409, Outcome::Forwarded),
                br#"{"outcome":"forwarded","state":"in_flight"}"#
            ),
            Polled::Waiting
        );
        assert_eq!(
            read_poll(&answer(409, Outcome::Forwarded), b"backend said 409"),
            Polled::Placed
        );
        assert_eq!(
            read_poll(&answer(201, Outcome::Forwarded), b"order 7"),
            Polled::Placed
        );
        assert_eq!(
            read_poll(&answer(410, Outcome::Unavailable), b""),
            Polled::NotPlaced
        );
        assert_eq!(
            read_poll(&answer(404, Outcome::Invalid), b""),
            Polled::Unknown
        );
        assert_eq!(
            read_poll(&answer(429, Outcome::RateLimited), b""),
            Polled::Unclear
        );
    }

    #[test]
    fn waits_grow_and_stop_at_the_deadline() {
        let now = Instant::now();
        let p = Pending {
            due: now,
            clicked: now,
            give_up: now + Duration::from_millis(1500),
            wait: FIRST_POLL,
            ticket: String::new(),
            user: 1,
            sku: 0,
            units: 1,
        };
        let p = p.again(now).expect("time left");
        assert_eq!(p.due, now + FIRST_POLL);
        let p = p
            .again(now + Duration::from_millis(1400))
            .expect("time left");
        assert_eq!(p.due, now + Duration::from_millis(1500));
        assert!(p.again(now + Duration::from_millis(1500)).is_none());
    }
}
