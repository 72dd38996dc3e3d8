//! Sluice: a flash-sale gateway in front of a legacy mall backend.
//!
//! The library holds everything; `main.rs` only parses the command line.
//! Module map (see `proxy` for the path of a request):
//! - `config`: strict YAML config and rule files, typed model;
//! - `rules`: flash-sale rules and request matching;
//! - `outcome`: outcomes and the gateway's own answers;
//! - `upstream`: upstream server pools, round robin, health checks;
//! - `proxy`: the pingora glue, phase by phase;
//! - `admin`: the admin listener (metrics, health, admin API);
//! - `metrics`: Prometheus metrics owned by the gateway;
//! - `server`: builds and runs the pingora server from a config;
//! - `logging`: tracing set-up.

pub mod admin;
pub mod admission;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod queue;
pub mod rules;
pub mod server;
pub mod store;
pub mod upstream;
