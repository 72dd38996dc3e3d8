//! The drill's report: what was run, the outcomes table with latency
//! percentiles per outcome, requests per second, failed exchanges, ticket
//! follow-up, winners and the invariant checks; as text for people or as
//! one JSON object (`--json`) for scripts and CI.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::checks::Check;
use super::stats::{histogram, Kind, Stats, WonBy};
use crate::store::StockView;

/// What was asked for.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The target URL.
    pub target: String,
    /// The rule the request was built from or checked against.
    pub rule: Option<String>,
    /// The order request's method and path template, as text.
    pub request: String,
    /// The browse request's path template.
    pub browse: Option<String>,
    /// Distinct users.
    pub users: u64,
    /// Clicks per user (`None`: until `--duration`).
    pub attempts_per_user: Option<u64>,
    /// Keep-alive connections.
    pub concurrency: usize,
    /// Driver threads.
    pub threads: usize,
    /// `--duration`.
    pub duration: Option<Duration>,
    /// The skus.
    pub skus: Vec<String>,
    /// Units per order.
    pub quantity: u32,
}

/// The whole report.
pub struct Report {
    /// What was asked for.
    pub meta: Meta,
    /// What was counted.
    pub stats: Stats,
    /// From the first request to the last answer of the load.
    pub load_time: Duration,
    /// Including ticket follow-up.
    pub total_time: Duration,
    /// Stock views after the drill, per sku (with `--admin`).
    pub views: Vec<(String, StockView)>,
    /// The invariant checks that could run.
    pub checks: Vec<Check>,
}

/// Milliseconds with microsecond precision, from microseconds.
fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

impl Report {
    /// Whether every check passed (none ran counts as passed).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    /// Answers plus failed exchanges, of every kind.
    pub fn requests(&self) -> u64 {
        self.answered() + self.stats.errors.iter().map(|e| e.total()).sum::<u64>()
    }

    /// Answers of every kind.
    pub fn answered(&self) -> u64 {
        self.stats.answered(Kind::Order) + self.stats.answered(Kind::Browse)
    }

    /// Answers per second over the load.
    pub fn rps(&self) -> f64 {
        self.answered() as f64 / self.load_time.as_secs_f64().max(1e-9)
    }

    /// Units won by way of forwarded answers and of placed tickets.
    fn winners(&self) -> (u64, u64) {
        let mut by = (0, 0);
        for w in &self.stats.wins {
            match w.by {
                WonBy::Forwarded => by.0 += u64::from(w.units),
                WonBy::Queue => by.1 += u64::from(w.units),
            }
        }
        by
    }

    fn all_latency(&self, kind: Kind) -> Histogram<u64> {
        let mut all = histogram();
        for r in self.stats.rows.iter().filter(|r| r.kind == kind) {
            let _ = all.add(&r.latency);
        }
        all
    }

    /// Rows of a kind, the biggest first.
    fn rows(&self, kind: Kind) -> Vec<&super::stats::Row> {
        let mut rows: Vec<_> = self.stats.rows.iter().filter(|r| r.kind == kind).collect();
        rows.sort_by(|a, b| {
            b.latency
                .len()
                .cmp(&a.latency.len())
                .then(a.label.cmp(&b.label))
                .then(a.status.cmp(&b.status))
        });
        rows
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let m = &self.meta;
        let kinds: Vec<Kind> = if m.browse.is_some() {
            vec![Kind::Order, Kind::Browse]
        } else {
            vec![Kind::Order]
        };
        let mut outcomes = Vec::new();
        for kind in &kinds {
            for r in self.rows(*kind) {
                outcomes.push(json!({
                    "kind": kind.as_str(),
                    "outcome": r.label.name(r.status),
                    "status": r.status,
                    "count": r.latency.len(),
                    "latency_ms": percentiles(&r.latency),
                }));
            }
        }
        let by_kind: serde_json::Map<String, Value> = kinds
            .iter()
            .map(|k| {
                let e = &self.stats.errors[*k as usize];
                (
                    k.as_str().to_string(),
                    json!({
                        "answered": self.stats.answered(*k),
                        "connect_errors": e.connect,
                        "io_errors": e.io,
                        "timeouts": e.timeouts,
                        "latency_ms": percentiles(&self.all_latency(*k)),
                    }),
                )
            })
            .collect();
        let t = &self.stats.tickets;
        let (forwarded, placed) = self.winners();
        json!({
            "target": m.target,
            "rule": m.rule,
            "request": m.request,
            "browse": m.browse,
            "users": m.users,
            "attempts_per_user": m.attempts_per_user,
            "concurrency": m.concurrency,
            "threads": m.threads,
            "duration_s": m.duration.map(|d| d.as_secs_f64()),
            "skus": m.skus,
            "quantity": m.quantity,
            "requests": self.requests(),
            "answered": self.answered(),
            "seconds": self.load_time.as_secs_f64(),
            "rps": self.rps(),
            "connections_opened": self.stats.connections,
            "by_kind": by_kind,
            "outcomes": outcomes,
            "tickets": {
                "queued": t.queued,
                "placed": t.placed,
                "not_placed": t.failed,
                "unknown": t.unknown,
                "still_waiting": t.waiting,
                "polls": t.polls,
                "poll_errors": t.poll_errors,
                "time_to_placed_ms": percentiles(&t.time_to_placed),
                "seconds_with_polling": self.total_time.as_secs_f64(),
            },
            "winners": {
                "forwarded_units": forwarded,
                "placed_from_queue_units": placed,
                "units": forwarded + placed,
            },
            "stock": self.views.iter().map(|(sku, v)| json!({"sku": sku, "view": v})).collect::<Vec<_>>(),
            "checks": self.checks,
            "passed": self.passed(),
        })
    }

    /// The report as text.
    pub fn to_text(&self) -> String {
        let m = &self.meta;
        let mut out = String::new();
        let clicks = match m.attempts_per_user {
            Some(a) => format!("{} users x {a} attempts", m.users),
            None => format!("{} users clicking until the time is up", m.users),
        };
        let _ = writeln!(
            out,
            "sluice drill: {clicks}, {} connections on {} thread{} -> {}{}",
            m.concurrency,
            m.threads,
            if m.threads == 1 { "" } else { "s" },
            m.target,
            m.rule
                .as_ref()
                .map(|r| format!(", rule {r}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "order: {} (skus: {}; quantity {})",
            m.request,
            if m.skus.iter().all(String::is_empty) {
                "-".to_string()
            } else {
                m.skus.join(", ")
            },
            m.quantity
        );
        if let Some(b) = &m.browse {
            let _ = writeln!(out, "browse: GET {b}");
        }
        let _ = writeln!(
            out,
            "{} requests in {:.2} s: {:.0} req/s; {} connection errors, {} broken, {} timeouts; {} connections opened\n",
            self.requests(),
            self.load_time.as_secs_f64(),
            self.rps(),
            self.stats.errors.iter().map(|e| e.connect).sum::<u64>(),
            self.stats.errors.iter().map(|e| e.io).sum::<u64>(),
            self.stats.errors.iter().map(|e| e.timeouts).sum::<u64>(),
            self.stats.connections,
        );
        let mut kinds = vec![(Kind::Order, "orders")];
        if m.browse.is_some() {
            kinds.push((Kind::Browse, "browse"));
        }
        for (kind, title) in kinds {
            let total = self.stats.answered(kind);
            let _ = writeln!(
                out,
                "{title:<16} {:>6} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "status", "count", "%", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
            );
            for r in self.rows(kind) {
                self.table_row(
                    &mut out,
                    &r.label.name(r.status),
                    &r.status.to_string(),
                    &r.latency,
                    total,
                );
            }
            let all = self.all_latency(kind);
            self.table_row(&mut out, "all", "", &all, total);
            let e = &self.stats.errors[kind as usize];
            if e.total() > 0 {
                let _ = writeln!(
                    out,
                    "{:<16} {:>6} {:>9}  ({} connect, {} broken, {} timeouts)",
                    "no answer",
                    "",
                    e.total(),
                    e.connect,
                    e.io,
                    e.timeouts
                );
            }
            out.push('\n');
        }
        let t = &self.stats.tickets;
        if t.queued > 0 {
            let ttp = &t.time_to_placed;
            let pct = if ttp.is_empty() {
                String::new()
            } else {
                format!(
                    "; time to placed p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    ms(ttp.value_at_quantile(0.5)),
                    ms(ttp.value_at_quantile(0.9)),
                    ms(ttp.value_at_quantile(0.99)),
                    ms(ttp.max())
                )
            };
            let _ = writeln!(
                out,
                "tickets: {} queued -> {} placed, {} not placed, {} unknown, {} still waiting ({} polls, {} unclear){pct}",
                t.queued, t.placed, t.failed, t.unknown, t.waiting, t.polls, t.poll_errors
            );
        }
        let (forwarded, placed) = self.winners();
        let _ = writeln!(
            out,
            "winners: {forwarded} units forwarded + {placed} placed from the queue = {} units",
            forwarded + placed
        );
        for (sku, v) in &self.views {
            let _ = writeln!(
                out,
                "stock {sku}: available {}, in_flight {}, queued {}, sold {}, released {}, initial {}",
                v.available, v.in_flight, v.queued, v.sold, v.released, v.initial
            );
        }
        if !self.checks.is_empty() {
            out.push_str("\nchecks\n");
            for c in &self.checks {
                let _ = writeln!(
                    out,
                    "  {}  {:<24} {}",
                    if c.pass { "PASS" } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
        }
        out
    }

    fn table_row(
        &self,
        out: &mut String,
        name: &str,
        status: &str,
        h: &Histogram<u64>,
        total: u64,
    ) {
        let pct = 100.0 * h.len() as f64 / (total.max(1)) as f64;
        if h.is_empty() {
            let _ = writeln!(out, "{name:<16} {status:>6} {:>9} {:>6.1}%", 0, pct);
            return;
        }
        let _ = writeln!(
            out,
            "{name:<16} {status:>6} {:>9} {:>6.1}% {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            h.len(),
            pct,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max())
        );
    }
}
