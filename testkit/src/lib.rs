//! Real-process helpers shared by Sluice's integration tests (`tests/`)
//! and benchmarks (`benches/`): a throwaway `redis-server` and `mariadbd`, a scriptable
//! HTTP upstream, a connection-exact HTTP client and the `sluice` binary
//! run as a child process. Dev-only: never a dependency of the product.

/// Raw HTTP/1.1 client helpers with exact connection control.
pub mod client;
/// The real `sluice` binary run as a child process.
pub mod gateway;
/// A throwaway `mariadbd` child process with its own data dir.
pub mod mariadb;
/// A raw TCP client for malformed or hand-framed requests.
pub mod raw;
/// A throwaway `redis-server` child process.
pub mod redis;
/// Admin API calls of sale tests: stock loads, views, checks.
pub mod shop;
/// A scriptable hyper HTTP/1.1 upstream on its own runtime.
pub mod upstream;

pub use client::{expect, get, request, Conn, Response};
pub use gateway::{
    free_addr, free_port, mall_config, metric_value, sluice_bin, sluice_cmd, Gateway,
    GatewayBuilder,
};
pub use mariadb::MariaDbServer;
pub use raw::RawConn;
pub use redis::RedisServer;
pub use shop::{assert_adds_up, put_stock, stock_view, wait_for_stock};
pub use upstream::{Recorded, Upstream};

/// Runs each case twice: on the memory store and on Redis. The test file
/// provides `memory()` and `redis()`, each building the case's argument
/// (a Redis one keeps its own `RedisServer` alive for the case).
#[macro_export]
macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::redis()).await;
                }
            )*
        }
    };
}
