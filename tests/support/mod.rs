//! Shared helpers for Sluice integration tests: a real Redis, a scriptable
//! HTTP upstream, a connection-exact HTTP client and the gateway process.
#![allow(dead_code)]
// Each test binary uses a subset of the re-exports below.
#![allow(unused_imports)]

/// Raw HTTP/1.1 client helpers with exact connection control.
pub mod client;
/// The real `sluice` binary run as a child process.
pub mod gateway;
/// A throwaway `redis-server` child process.
pub mod redis;
/// A scriptable hyper HTTP/1.1 upstream on its own runtime.
pub mod upstream;

pub use client::{get, request, Conn, Response};
pub use gateway::{free_addr, free_port, metric_value, sluice_cmd, Gateway, GatewayBuilder};
pub use redis::RedisServer;
pub use upstream::{Recorded, Upstream};
