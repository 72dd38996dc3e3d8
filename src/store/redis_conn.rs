//! The Redis connection shared by the Redis store and the Redis queue: one
//! multiplexed, self-reconnecting `ConnectionManager`, made on first use,
//! with the response timeout from the config and errors mapped to
//! `StoreError`. Also the small `Value` readers both need.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, RedisError, Value};

use super::StoreError;
use crate::config::RedisConfig;

/// A lazily made connection to the configured Redis.
pub struct RedisConn {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    // Made on first use: the manager spawns its driver on the runtime it
    // is created in, and the gateway's runtimes exist only once it runs.
    conn: tokio::sync::OnceCell<ConnectionManager>,
    round_trips: AtomicU64,
    timeout: Duration,
}

impl RedisConn {
    /// A connection to the configured Redis; nothing is dialled until the
    /// first command, so the gateway starts while Redis is down.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| StoreError::Backend {
            op: "connect",
            message: e.to_string(),
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            // Reconnect quickly when Redis comes back; requests meanwhile
            // fail fast and are answered `unavailable`.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            client,
            manager_config,
            conn: tokio::sync::OnceCell::new(),
            round_trips: AtomicU64::new(0),
            timeout: config.timeout,
        })
    }

    /// Round trips made so far (each pipeline or transaction is one).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Maps a client error: a timeout to `Timeout`, anything else to
    /// `Backend`.
    pub fn error(&self, op: &'static str, e: RedisError) -> StoreError {
        if e.is_timeout() {
            StoreError::Timeout {
                op,
                timeout: self.timeout,
            }
        } else {
            StoreError::Backend {
                op,
                message: e.to_string(),
            }
        }
    }

    /// Sends a pipeline (or transaction) in one round trip and gives the
    /// client's own error, for callers that react to a server error code.
    pub async fn query(&self, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut conn = self
            .conn
            .get_or_try_init(|| async {
                ConnectionManager::new_lazy_with_config(
                    self.client.clone(),
                    self.manager_config.clone(),
                )
            })
            .await?
            .clone();
        // The client's own response timeout does not cover its reconnect
        // attempts while Redis is down; the whole call is bounded here, so
        // admission fails closed within the configured timeout.
        match tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "store timeout",
            ))),
        }
    }

    /// Sends a pipeline (or transaction) in one round trip.
    pub async fn run(&self, op: &'static str, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        self.query(pipe).await.map_err(|e| self.error(op, e))
    }
}

/// Whether a server error (alone, or in a pipeline or transaction) has the
/// given code, such as `NOGROUP` or `BUSYGROUP`.
pub fn has_error_code(e: &RedisError, code: &str) -> bool {
    e.code() == Some(code)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, s)| s.code() == code))
}

/// A string reply (bulk, simple, integer or OK) as text.
pub fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

/// An integer reply, or a string holding one.
pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}

/// A map reply (RESP3) or a flat array of pairs (RESP2) as pairs.
pub fn as_pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| as_string(k).map(|k| (k, v.clone())))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => as_string(k).map(|k| (k, v.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
