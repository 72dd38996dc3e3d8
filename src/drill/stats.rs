//! What one driver thread counted: answers by kind, outcome and status
//! with their latencies, failed exchanges, winners, and ticket polls.
//! Each thread keeps its own `Stats` (no sharing on the hot path); the
//! drill merges them at the end.

use hdrhistogram::Histogram;

use crate::outcome::Outcome;

/// Latencies are kept in microseconds, up to a minute (longer ones are
/// clamped to it: a minute is already a failed sale).
const MAX_MICROS: u64 = 60_000_000;

/// Three significant digits: 1 µs resolution under 1 ms, 1 ms around a second.
const SIGFIGS: u8 = 3;

/// An empty latency histogram.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGFIGS).expect("constant bounds are valid")
}

/// Which traffic a request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An order attempt (the rule's request).
    Order,
    /// A product-page GET (`--browse-path`).
    Browse,
}

impl Kind {
    /// Its name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Browse => "browse",
        }
    }
}

/// How an answer is labelled: its `X-Sluice-Outcome`, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Label {
    /// A contract outcome.
    Outcome(Outcome),
    /// An `X-Sluice-Outcome` value this drill does not know.
    Other,
    /// No `X-Sluice-Outcome` header: the status stands for it.
    Absent,
}

impl Label {
    /// Reads an `X-Sluice-Outcome` value.
    pub fn parse(value: &[u8]) -> Label {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| Outcome::from_name(v.trim()))
            .map_or(Label::Other, Label::Outcome)
    }

    /// Its name in the report (`http_<status>` when absent).
    pub fn name(self, status: u16) -> String {
        match self {
            Label::Outcome(o) => o.as_str().to_string(),
            Label::Other => "other".to_string(),
            Label::Absent => format!("http_{status}"),
        }
    }
}

/// Answers of one kind, label and status.
pub struct Row {
    /// Order or browse.
    pub kind: Kind,
    /// The outcome label.
    pub label: Label,
    /// The HTTP status.
    pub status: u16,
    /// Latencies in microseconds (its `len()` is the count).
    pub latency: Histogram<u64>,
}

/// Exchanges that got no answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Errors {
    /// The connection could not be opened.
    pub connect: u64,
    /// The connection broke, or the answer was not HTTP.
    pub io: u64,
    /// No whole answer within `--timeout`.
    pub timeouts: u64,
}

impl Errors {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.connect + self.io + self.timeouts
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.io += o.io;
        self.timeouts += o.timeouts;
    }
}

/// How a winner won.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WonBy {
    /// Forwarded, and the backend's answer kept the units.
    Forwarded,
    /// Queued, and its ticket was later seen placed.
    Queue,
}

/// One winning attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Win {
    /// The user's number (1-based).
    pub user: u64,
    /// Index of its sku in the drill's sku list.
    pub sku: usize,
    /// Units it took.
    pub units: u32,
    /// How.
    pub by: WonBy,
}

/// What became of queued answers' tickets.
pub struct TicketTally {
    /// Tickets handed out (`queued` answers to orders).
    pub queued: u64,
    /// Seen placed (the backend took the order).
    pub placed: u64,
    /// Seen not placed (units back in stock).
    pub failed: u64,
    /// 404: unknown or expired when polled.
    pub unknown: u64,
    /// Still queued or in flight when the drill stopped polling.
    pub waiting: u64,
    /// Polls sent.
    pub polls: u64,
    /// Polls that got no usable answer (retried while time was left).
    pub poll_errors: u64,
    /// From the click to the poll that saw it placed, microseconds.
    pub time_to_placed: Histogram<u64>,
}

impl Default for TicketTally {
    fn default() -> Self {
        Self {
            queued: 0,
            placed: 0,
            failed: 0,
            unknown: 0,
            waiting: 0,
            polls: 0,
            poll_errors: 0,
            time_to_placed: histogram(),
        }
    }
}

/// Everything one thread (or, merged, the whole drill) counted.
#[derive(Default)]
pub struct Stats {
    /// Answers, one row per (kind, label, status), in first-seen order.
    pub rows: Vec<Row>,
    /// Exchanges without an answer, per kind.
    pub errors: [Errors; 2],
    /// Winning attempts.
    pub wins: Vec<Win>,
    /// Ticket polling.
    pub tickets: TicketTally,
    /// Connections opened.
    pub connections: u64,
}

impl Stats {
    /// Counts one answer.
    pub fn record(&mut self, kind: Kind, label: Label, status: u16, micros: u64) {
        // A handful of rows: a scan beats hashing.
        let row = match self
            .rows
            .iter_mut()
            .position(|r| r.kind == kind && r.label == label && r.status == status)
        {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    kind,
                    label,
                    status,
                    latency: histogram(),
                });
                let last = self.rows.len() - 1;
                &mut self.rows[last]
            }
        };
        row.latency.saturating_record(micros.max(1));
    }

    /// The error counters of a kind.
    pub fn errors_mut(&mut self, kind: Kind) -> &mut Errors {
        &mut self.errors[kind as usize]
    }

    /// Adds another thread's counts.
    pub fn merge(&mut self, other: Stats) {
        for row in other.rows {
            match self
                .rows
                .iter_mut()
                .find(|r| r.kind == row.kind && r.label == row.label && r.status == row.status)
            {
                // Same bounds on both sides: adding cannot fail.
                Some(mine) => {
                    let _ = mine.latency.add(&row.latency);
                }
                None => self.rows.push(row),
            }
        }
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors.iter()) {
            mine.add(theirs);
        }
        self.wins.extend(other.wins);
        let t = &mut self.tickets;
        let o = other.tickets;
        t.queued += o.queued;
        t.placed += o.placed;
        t.failed += o.failed;
        t.unknown += o.unknown;
        t.waiting += o.waiting;
        t.polls += o.polls;
        t.poll_errors += o.poll_errors;
        let _ = t.time_to_placed.add(&o.time_to_placed);
        self.connections += other.connections;
    }

    /// Answers of a kind.
    pub fn answered(&self, kind: Kind) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.latency.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_the_contract_names() {
        assert_eq!(Label::parse(b"sold_out"), Label::Outcome(Outcome::SoldOut));
        assert_eq!(Label::parse(b"bogus"), Label::Other);
        assert_eq!(Label::Absent.name(502), "http_502");
    }

    #[test]
    fn merged_rows_add_up() {
        let mut a = Stats::default();
        a.record(Kind::Order, Label::Outcome(Outcome::SoldOut), 410, 100);
        a.record(Kind::Order, Label::Outcome(Outcome::SoldOut), 410, 200);
        let mut b = Stats::default();
        b.record(Kind::Order, Label::Outcome(Outcome::SoldOut), 410, 300);
        b.record(Kind::Browse, Label::Absent, 200, 50);
        b.errors_mut(Kind::Order).timeouts += 1;
        a.merge(b);
        assert_eq!(a.answered(Kind::Order), 3);
        assert_eq!(a.answered(Kind::Browse), 1);
        assert_eq!(a.errors[0].timeouts, 1);
    }
}
