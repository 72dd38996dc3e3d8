//! Sluice: a flash-sale gateway in front of a legacy mall backend.
//!
//! The library holds everything; `main.rs` only parses the command line.
//!
//! Modules, leaves first (each imports only those above it):
//!
//! | module | owns |
//! |---|---|
//! | `alloc` | the binary's global allocator: mimalloc, large blocks off its aligned slow path |
//! | `vocab` | shared value types: ticket ids, sku keys, upstream ids, kept answers, release reasons, id validation |
//! | `outcome` | outcomes and every answer the gateway writes itself |
//! | `rules` | the run-time rule model, the canonical form of a path, matching by method and path |
//! | `config` | loading and validating `gateway.yaml` and rule files (secrets too), `path:line:col` errors |
//! | `metrics` | the Prometheus series of one gateway |
//! | `store` | stock, dedup marks and the ticket ledger: memory and Redis |
//! | `queue` | the overflow queue of winners: memory and Redis Streams |
//! | `upstream` | server pools, health checks, `max_inflight` slots |
//! | `backend` | how a request is presented to the backend and how an exchange ended |
//! | `admission` | the pipeline: stages 2-8, a winner's [`admission::hold::Hold`], ticket polls |
//! | `cache` | the read cache (memory and Redis tiers, single flight, stale answers) and the stock view of pages |
//! | `drain` | the background sender of queued winners |
//! | `reconcile` | `sluice reconcile`: ledger checks and repairs after a crash |
//! | `drill` | `sluice drill`: a load test that plays a flash sale against a running gateway and checks its invariants (a client: nothing of the gateway imports it) |
//! | `routes` | which upstream serves pass-through traffic (`routes:`), swappable |
//! | `tls` | the TLS listener's certificate (a rustls resolver), re-read on reload |
//! | `access_log` | one line per request, written off the request path; SIGUSR1 reopens the file |
//! | `proxy` | the pingora glue, one or two calls per phase; the fast lane (refusals answered from the connection gate) |
//! | `reload` | SIGHUP and admin reloads: validate, refuse restart-only changes, swap |
//! | `admin` | the admin listener: metrics, health, stock, release and reload API |
//! | `server` | builds and runs the pingora server from a config |
//! | `logging` | tracing set-up (text or JSON on stderr) |
//!
//! The path of a request (details in `proxy`); a rule request whose whole
//! body came with its head is first judged by `proxy::lane`, from the
//! connection gate: a refusal is answered there, a winner's verdict goes
//! along to `request_filter`.
//!
//! ```text
//! client ─► proxy::request_filter ─► rules::RuleSet::find ── no rule ──► cache rule? read cache (hit, stale,
//!                                        │                               one fetch per key) ── else ──► passthrough
//!                  (the canonical path)  │  └─ refused spelling ──► invalid
//!                                        │ rule
//!                                        ▼
//!           admission::Admission::admit: extract, window, rate limits,
//!           sold-out flag, dedup + stock in the store ── refused ──► outcome::render ─► client
//!                                        │ winner: a Hold
//!                                        ▼
//!           admission overflow: a slot now or within max_wait ── none ──► queue (202 + ticket)
//!                                        │                                  │ drain, later
//!                                        ▼                                  ▼
//!           backend::present (the rule's path) ─► the backend ─► hold.settle(classify(how it ended)) ─► client
//! ```

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod alloc;
pub mod backend;
pub mod cache;
pub mod config;
pub mod deadline;
pub mod drain;
pub mod drill;
pub mod logging;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod queue;
pub mod reconcile;
pub mod reload;
pub mod routes;
pub mod rules;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod vocab;
