//! The load: `--threads` OS threads, each with its own single-threaded
//! tokio runtime and its share of the `--concurrency` keep-alive
//! connections (one worker task each), plus two ticket pollers per thread.
//! Workers take request numbers from one shared counter, so the sale's
//! order (every user's first click, then every user's second, ...) holds
//! whatever the thread count; each thread counts into its own [`Stats`],
//! merged at the end. The calling thread draws the progress bar and ends
//! a `--duration` run.
//!
//! ```text
//!            next request number (AtomicU64)
//!        ┌──────────────┼───────────────┐
//!   thread 1 ...                    thread T      (current-thread runtimes)
//!   workers: render → send → count  pollers: GET /sluice/tickets/{id}
//! ```

use std::cell::{Cell, RefCell};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::conn::{Client, Failure, Keep};
use super::plan::Plan;
use super::stats::{Kind, Label, Stats, Win, WonBy};
use super::template::Vars;
use super::tickets::{self, Pending, PollQueue, Polled};
use super::DrillError;
use crate::outcome::Outcome;
use crate::rules::ReleaseOn;

/// Ticket pollers per driver thread: enough to follow thousands of
/// tickets at one poll a second each, few enough not to compete with the
/// orders for the gateway.
const POLLERS_PER_THREAD: usize = 2;

/// A poller with nothing due looks again this often.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// The progress bar is redrawn this often.
const TICK: Duration = Duration::from_millis(100);

/// Parts per million: the unit of `--browse-ratio` in the schedule.
const PPM: u64 = 1_000_000;

/// The order of requests: which number is an order or a browse, and whose.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Distinct users.
    pub users: u64,
    /// Orders in all (users x attempts), or unbounded until `--duration`.
    pub orders: Option<u64>,
    /// Orders per million requests (the rest are browses).
    pub order_ppm: u64,
}

/// One request of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// An order click by `user` (1-based).
    Order {
        /// Who clicks.
        user: u64,
    },
    /// A product-page GET by `user`.
    Browse {
        /// Who browses.
        user: u64,
    },
}

impl Schedule {
    /// Request number `k` (0-based), or `None` past the last order.
    /// Orders are spread evenly among browses: request `k` is an order
    /// when the count of orders due by `k + 1` steps past the count due
    /// by `k`.
    pub fn slot(&self, k: u64) -> Option<Slot> {
        let due = |k: u64| (u128::from(k) * u128::from(self.order_ppm) / u128::from(PPM)) as u64;
        let j = due(k);
        if self.orders.is_some_and(|n| j >= n) {
            return None;
        }
        if due(k + 1) > j {
            Some(Slot::Order {
                user: j % self.users + 1,
            })
        } else {
            Some(Slot::Browse {
                user: (k - j) % self.users + 1,
            })
        }
    }

    /// How many requests the schedule holds, when bounded.
    pub fn total(&self) -> Option<u64> {
        let n = self.orders?;
        Some(((u128::from(n) * u128::from(PPM)).div_ceil(u128::from(self.order_ppm))) as u64)
    }
}

/// How to run the load.
#[derive(Clone, Debug)]
pub struct Load {
    /// The gateway.
    pub addr: SocketAddr,
    /// Keep-alive connections.
    pub concurrency: usize,
    /// Driver threads.
    pub threads: usize,
    /// The requests.
    pub schedule: Schedule,
    /// Stop sending after this long.
    pub duration: Option<Duration>,
    /// Bound on a connect and on each exchange.
    pub timeout: Duration,
    /// How long a ticket is followed after its click.
    pub ticket_timeout: Duration,
    /// Which forwarded answers give the units back (not winners).
    pub release_on: ReleaseOn,
    /// Draw the progress bar (stderr is a terminal, no `--json`).
    pub progress: bool,
}

/// What the load did.
pub struct Ran {
    /// Everything counted, all threads merged.
    pub stats: Stats,
    /// From the first request to the last order's answer.
    pub load_time: Duration,
    /// From the first request to the last ticket poll.
    pub total_time: Duration,
}

/// Counters every thread shares.
struct Shared {
    next: AtomicU64,
    stop: AtomicBool,
    finished: AtomicU64,
    tickets_open: AtomicU64,
}

/// One thread's view of the run.
struct Local {
    plan: Arc<Plan>,
    load: Load,
    shared: Arc<Shared>,
    stats: RefCell<Stats>,
    tickets: RefCell<PollQueue>,
    workers_left: Cell<usize>,
    polls_out: Cell<usize>,
    load_done: Cell<Option<Instant>>,
}

/// Runs the load and gives what it counted.
pub fn run(plan: Arc<Plan>, load: &Load) -> Result<Ran, DrillError> {
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        finished: AtomicU64::new(0),
        tickets_open: AtomicU64::new(0),
    });
    let bar = progress_bar(load);
    let start = Instant::now();
    let mut threads = Vec::with_capacity(load.threads);
    for t in 0..load.threads {
        // Connections split as evenly as they go.
        let conns =
            load.concurrency / load.threads + usize::from(t < load.concurrency % load.threads);
        let local_plan = plan.clone();
        let local_load = load.clone();
        let local_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("drill-{t}"))
            .spawn(move || drive(local_plan, local_load, local_shared, conns, start))
            .map_err(DrillError::Io)?;
        threads.push(handle);
    }
    let deadline = load.duration.map(|d| start + d);
    while threads.iter().any(|h| !h.is_finished()) {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            shared.stop.store(true, Ordering::Relaxed);
        }
        let nap = deadline
            .filter(|d| *d > now)
            .map_or(TICK, |d| (d - now).min(TICK));
        std::thread::sleep(nap);
        let done = shared.finished.load(Ordering::Relaxed);
        let open = shared.tickets_open.load(Ordering::Relaxed);
        match deadline {
            Some(_) if load.schedule.total().is_none() => {
                bar.set_position(start.elapsed().as_millis() as u64);
                bar.set_message(format!("{done} requests, {open} tickets open"));
            }
            _ => {
                bar.set_position(done);
                bar.set_message(format!("{open} tickets open"));
            }
        }
    }
    bar.finish_and_clear();
    let mut stats = Stats::default();
    let mut load_time = Duration::ZERO;
    for h in threads {
        let (s, done) = h
            .join()
            .map_err(|_| DrillError::Internal("a driver thread panicked".into()))??;
        stats.merge(s);
        load_time = load_time.max(done);
    }
    Ok(Ran {
        stats,
        load_time,
        total_time: start.elapsed(),
    })
}

fn progress_bar(load: &Load) -> ProgressBar {
    if !load.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, template) = match (load.schedule.total(), load.duration) {
        (None, Some(d)) => (
            d.as_millis() as u64,
            "{spinner} {elapsed_precise} [{wide_bar}] {msg}",
        ),
        (total, _) => (
            total.unwrap_or(0),
            "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} {per_sec} {msg}",
        ),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One driver thread: its workers and pollers on a current-thread runtime.
/// Gives its counts and when its last worker finished (from `start`).
fn drive(
    plan: Arc<Plan>,
    load: Load,
    shared: Arc<Shared>,
    conns: usize,
    start: Instant,
) -> Result<(Stats, Duration), DrillError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DrillError::Io)?;
    let local = Rc::new(Local {
        plan,
        load,
        shared,
        stats: RefCell::new(Stats::default()),
        tickets: RefCell::new(PollQueue::new()),
        workers_left: Cell::new(conns),
        polls_out: Cell::new(0),
        load_done: Cell::new(None),
    });
    let set = tokio::task::LocalSet::new();
    set.block_on(&runtime, async {
        let mut tasks = Vec::with_capacity(conns + POLLERS_PER_THREAD);
        for _ in 0..conns {
            tasks.push(tokio::task::spawn_local(worker(local.clone())));
        }
        for _ in 0..POLLERS_PER_THREAD {
            tasks.push(tokio::task::spawn_local(poller(local.clone())));
        }
        for t in tasks {
            // A task can only fail by panicking; the counts so far stand.
            let _ = t.await;
        }
    });
    let done = local.load_done.get().unwrap_or_else(Instant::now) - start;
    let stats = local.stats.replace(Stats::default());
    Ok((stats, done))
}

/// Whether a forwarded answer kept its units (its status is not one the
/// rule's `release_on` gives back).
fn kept(status: u16, release_on: &ReleaseOn) -> bool {
    !((500..600).contains(&status) && release_on.status_5xx
        || (400..500).contains(&status) && release_on.status_4xx)
}

/// One request that went out.
struct Sent {
    kind: Kind,
    user: u64,
    sku_index: usize,
    at: Instant,
    micros: u64,
}

/// Counts one request's answer (or failure), and follows a win or a ticket.
fn count(local: &Local, sent: &Sent, result: &Result<super::conn::Answer, Failure>, body: &[u8]) {
    let Sent {
        kind,
        user,
        sku_index,
        at: sent,
        micros,
    } = *sent;
    let plan = &*local.plan;
    let load = &local.load;
    let shared = &*local.shared;
    let mut stats = local.stats.borrow_mut();
    match result {
        Ok(answer) => {
            stats.record(kind, answer.label, answer.status, micros);
            if kind == Kind::Order {
                match answer.label {
                    Label::Outcome(Outcome::Forwarded) if kept(answer.status, &load.release_on) => {
                        stats.wins.push(Win {
                            user,
                            sku: sku_index,
                            units: plan.quantity,
                            by: WonBy::Forwarded,
                        });
                    }
                    Label::Outcome(Outcome::Queued) => {
                        stats.tickets.queued += 1;
                        match tickets::ticket_of(body) {
                            Some(ticket) => {
                                shared.tickets_open.fetch_add(1, Ordering::Relaxed);
                                local.tickets.borrow_mut().push(Pending {
                                    due: Instant::now() + tickets::FIRST_POLL,
                                    clicked: sent,
                                    give_up: sent + load.ticket_timeout,
                                    wait: tickets::FIRST_POLL,
                                    ticket,
                                    user,
                                    sku: sku_index,
                                    units: plan.quantity,
                                });
                            }
                            // A queued answer without a ticket (a rule
                            // overriding its body) cannot be followed.
                            None => stats.tickets.unknown += 1,
                        }
                    }
                    _ => {}
                }
            }
        }
        Err(failure) => {
            let errors = stats.errors_mut(kind);
            match failure {
                Failure::Connect => errors.connect += 1,
                Failure::Io => errors.io += 1,
                Failure::Timeout => errors.timeouts += 1,
            }
        }
    }
}

/// One keep-alive connection sending schedule slots until none are left.
async fn worker(local: Rc<Local>) {
    let plan = &*local.plan;
    let load = &local.load;
    let shared = &*local.shared;
    let mut client = Client::new(load.addr, load.timeout);
    let mut request = Vec::with_capacity(1024);
    let mut scratch = Vec::with_capacity(256);
    let mut body = Vec::with_capacity(256);
    let mut token = String::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let k = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = load.schedule.slot(k) else {
            break;
        };
        let (kind, user, shape) = match slot {
            Slot::Order { user } => (Kind::Order, user, &plan.order),
            Slot::Browse { user } => match &plan.browse {
                Some(b) => (Kind::Browse, user, b),
                None => (Kind::Order, user, &plan.order),
            },
        };
        let sku_index = ((user - 1) % plan.skus.len() as u64) as usize;
        let mut vars = Vars {
            user_prefix: &plan.user_prefix,
            user,
            sku: &plan.skus[sku_index],
            n: k,
            qty: plan.quantity,
            token: "",
        };
        if let Some(signer) = &plan.signer {
            signer.sign(&vars, &mut token);
            vars.token = &token;
        }
        shape.render(&plan.host, &vars, &mut request, &mut scratch);
        let keep = if kind == Kind::Order {
            Keep::Queued
        } else {
            Keep::Nothing
        };
        let sent = Instant::now();
        let result = client.send(&request, &mut body, keep).await;
        let micros = sent.elapsed().as_micros() as u64;
        let out = Sent {
            kind,
            user,
            sku_index,
            at: sent,
            micros,
        };
        count(&local, &out, &result, &body);
        shared.finished.fetch_add(1, Ordering::Relaxed);
        if matches!(result, Err(Failure::Connect)) {
            // A refused connect fails at once; pause so a dead target is
            // not spun on.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    local.stats.borrow_mut().connections += client.opened;
    local.workers_left.set(local.workers_left.get() - 1);
    if local.workers_left.get() == 0 {
        local.load_done.set(Some(Instant::now()));
    }
}

/// Polls due tickets until the workers are done and no ticket is left.
async fn poller(local: Rc<Local>) {
    let plan = &*local.plan;
    let load = &local.load;
    let mut client = Client::new(load.addr, load.timeout);
    let mut request = Vec::with_capacity(128);
    let mut body = Vec::with_capacity(256);
    loop {
        let now = Instant::now();
        let next = {
            let mut queue = local.tickets.borrow_mut();
            match queue.peek() {
                Some(p) if p.due <= now => queue.pop(),
                _ => None,
            }
        };
        let Some(pending) = next else {
            let idle = local.tickets.borrow().is_empty() && local.polls_out.get() == 0;
            if idle && local.workers_left.get() == 0 {
                break;
            }
            let due = local.tickets.borrow().peek().map(|p| p.due);
            let nap = due.map_or(IDLE_POLL, |d| {
                d.saturating_duration_since(now).min(IDLE_POLL)
            });
            tokio::time::sleep(nap).await;
            continue;
        };
        local.polls_out.set(local.polls_out.get() + 1);
        request.clear();
        request.extend_from_slice(b"GET /sluice/tickets/");
        request.extend_from_slice(pending.ticket.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        request.extend_from_slice(plan.host.as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        let result = client.send(&request, &mut body, Keep::All).await;
        let now = Instant::now();
        let polled = match &result {
            Ok(answer) => tickets::read_poll(answer, &body),
            Err(_) => Polled::Unclear,
        };
        let mut stats = local.stats.borrow_mut();
        let tally = &mut stats.tickets;
        tally.polls += 1;
        if polled == Polled::Unclear {
            tally.poll_errors += 1;
        }
        let settled = match polled {
            Polled::Placed => {
                tally.placed += 1;
                let micros = (now - pending.clicked).as_micros() as u64;
                tally.time_to_placed.saturating_record(micros.max(1));
                stats.wins.push(Win {
                    user: pending.user,
                    sku: pending.sku,
                    units: pending.units,
                    by: WonBy::Queue,
                });
                true
            }
            Polled::NotPlaced => {
                tally.failed += 1;
                true
            }
            Polled::Unknown => {
                tally.unknown += 1;
                true
            }
            Polled::Waiting | Polled::Unclear => match pending.again(now) {
                Some(next) => {
                    local.tickets.borrow_mut().push(next);
                    false
                }
                None => {
                    tally.waiting += 1;
                    true
                }
            },
        };
        drop(stats);
        if settled {
            local.shared.tickets_open.fetch_sub(1, Ordering::Relaxed);
        }
        local.polls_out.set(local.polls_out.get() - 1);
    }
    local.stats.borrow_mut().connections += client.opened;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_come_user_by_user_then_again() {
        let s = Schedule {
            users: 3,
            orders: Some(6),
            order_ppm: PPM,
        };
        let users: Vec<u64> = (0..7)
            .map_while(|k| match s.slot(k) {
                Some(Slot::Order { user }) => Some(user),
                _ => None,
            })
            .collect();
        assert_eq!(users, vec![1, 2, 3, 1, 2, 3]);
        assert_eq!(s.total(), Some(6));
    }

    #[test]
    fn browses_are_mixed_in_at_the_ratio() {
        let s = Schedule {
            users: 10,
            orders: Some(100),
            order_ppm: PPM / 10,
        };
        let slots: Vec<Slot> = (0..).map_while(|k| s.slot(k)).collect();
        let orders = slots
            .iter()
            .filter(|s| matches!(s, Slot::Order { .. }))
            .count();
        assert_eq!(orders, 100);
        assert_eq!(slots.len() as u64, s.total().expect("bounded"));
        assert_eq!(slots.len(), 1000);
    }

    #[test]
    fn release_on_decides_who_kept_the_units() {
        let on = ReleaseOn {
            connect_error: true,
            timeout: true,
            status_5xx: true,
            status_4xx: false,
        };
        assert!(kept(200, &on) && kept(409, &on));
        assert!(!kept(502, &on));
    }
}
