//! The Redis connection shared by the Redis store and the Redis queue: one
//! multiplexed, self-reconnecting `ConnectionManager`, made on first use,
//! with the response timeout from the config and errors mapped to
//! `StoreError`; a few exclusive connections for the rare WATCH
//! transactions (a WATCH belongs to its connection, so those must not be
//! multiplexed); a lean connection for the winners' two transactions
//! (`redis_lean`); and a circuit breaker over all of them, so a dead Redis
//! costs one timeout per `breaker_interval`, not one per request. Also the
//! small `Value` readers the store and the queue need.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::AsyncConnectionConfig;
use redis::{Pipeline, RedisError, Value};

use super::redis_lean::LeanConn;
use super::resp::Transaction;
use super::StoreError;
use crate::config::RedisConfig;

/// Exclusive connections for WATCH transactions: releases, sweeps and
/// admin changes are rare next to reservations and commits.
const EXCLUSIVE: usize = 4;

/// Counts failures in a row and, past a threshold, fails calls at once
/// for an interval, then lets one call through to try again.
struct Breaker {
    threshold: u32,
    interval: Duration,
    failures: AtomicU32,
    /// While open: when the next try may go.
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// `Err(retry_in)` while open; `Ok` when a call may go (the first one
    /// after the interval is the try, the others keep waiting for it).
    fn admit(&self) -> Result<(), Duration> {
        if self.failures.load(Ordering::Relaxed) < self.threshold {
            return Ok(());
        }
        let Ok(mut open) = self.open_until.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        match *open {
            Some(until) if now < until => Err(until - now),
            // This call is the try; the next ones wait another interval
            // unless it succeeds first.
            _ => {
                *open = Some(now + self.interval);
                Ok(())
            }
        }
    }

    fn record(&self, ok: bool) {
        if ok {
            if self.failures.swap(0, Ordering::Relaxed) >= self.threshold {
                if let Ok(mut open) = self.open_until.lock() {
                    *open = None;
                }
                tracing::info!("store reachable again; circuit closed");
            }
        } else {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n == self.threshold {
                if let Ok(mut open) = self.open_until.lock() {
                    *open = Some(Instant::now() + self.interval);
                }
                tracing::warn!(failures = n, "store failing; circuit open");
            }
        }
    }
}

/// A lazily made connection to the configured Redis.
pub struct RedisConn {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    // Made on first use: the manager spawns its driver on the runtime it
    // is created in, and the gateway's runtimes exist only once it runs.
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// Reservations and commits, on their own lean connection.
    lean: LeanConn,
    // Plain connections, never reconnected behind our back (a manager may
    // reconnect between WATCH and EXEC, which would run EXEC unwatched):
    // one that failed is dropped and made anew.
    exclusive: Vec<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    next_exclusive: AtomicUsize,
    round_trips: AtomicU64,
    timeout: Duration,
    /// Dialling a new connection (at least 250 ms).
    connect_timeout: Duration,
    /// Shared by the connections to one Redis: any answer proves it up.
    breaker: Arc<Breaker>,
    /// An operator's connection: always tries, never refused by the open
    /// breaker; an answer closes it for everyone.
    operator: bool,
}

/// One exclusive connection, held for a WATCH transaction.
pub struct Exclusive<'a> {
    owner: &'a RedisConn,
    slot: tokio::sync::MutexGuard<'a, Option<MultiplexedConnection>>,
    /// Made just now (that was the breaker's try): the first query goes.
    fresh: bool,
}

impl Exclusive<'_> {
    /// Sends a pipeline on this connection; `Ok(None)` when it is an
    /// atomic pipeline whose WATCHed keys changed (EXEC aborted).
    pub async fn query(
        &mut self,
        op: &'static str,
        pipe: &Pipeline,
    ) -> Result<Option<Vec<Value>>, StoreError> {
        let owner = self.owner;
        if !std::mem::take(&mut self.fresh) {
            if let Err(retry_in) = owner.admit() {
                // A WATCH may be open on it: never reuse it.
                *self.slot = None;
                return Err(owner.circuit_open(op, retry_in));
            }
        }
        owner.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = match self.slot.as_mut() {
            Some(conn) => {
                tokio::time::timeout(owner.timeout, pipe.query_async::<Option<Vec<Value>>>(conn))
                    .await
            }
            None => Ok(Err(RedisError::from(std::io::Error::other(
                "no exclusive connection",
            )))),
        };
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        };
        owner.breaker.record(match &result {
            Ok(_) => true,
            Err(e) => answered(e),
        });
        if result.is_err() {
            // A connection in an unknown state (a WATCH or MULTI left
            // open) is never reused.
            *self.slot = None;
        }
        result.map_err(|e| owner.error(op, e))
    }
}

/// Whether an error is Redis's own answer (a wrong type, NOGROUP): then it
/// is up.
fn answered(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(_)) || e.clone().into_server_errors().is_some()
}

impl Exclusive<'_> {
    /// Drops the connection (a WATCH may still be open on it).
    pub fn discard(&mut self) {
        *self.slot = None;
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "store timeout",
    ))
}

impl RedisConn {
    /// A connection to the configured Redis; nothing is dialled until the
    /// first command, so the gateway starts while Redis is down.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| StoreError::Backend {
            op: "connect",
            message: e.to_string(),
        })?;
        // A connect takes a round trip more than a command: never less
        // than 250 ms, whatever the (possibly 50 ms) command timeout.
        let connect_timeout = config.timeout.max(Duration::from_millis(250));
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(connect_timeout))
            // Reconnect quickly when Redis comes back; requests meanwhile
            // fail fast and are answered `unavailable`.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let lean = LeanConn::new(
            client.get_connection_info(),
            config.timeout,
            connect_timeout,
        );
        Ok(Self {
            client,
            manager_config,
            conn: tokio::sync::OnceCell::new(),
            lean,
            exclusive: (0..EXCLUSIVE)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_exclusive: AtomicUsize::new(0),
            round_trips: AtomicU64::new(0),
            timeout: config.timeout,
            connect_timeout,
            breaker: Arc::new(Breaker {
                threshold: config.breaker_failures.max(1),
                interval: config.breaker_interval,
                failures: AtomicU32::new(0),
                open_until: Mutex::new(None),
            }),
            operator: false,
        })
    }

    /// The same Redis for operators (admin operations): their own
    /// connections and longer `timeout`, the same breaker, which never
    /// refuses them (an operator wants the real answer).
    pub fn for_operators(
        &self,
        config: &RedisConfig,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let mut config = config.clone();
        config.timeout = timeout;
        let mut other = Self::new(&config)?;
        other.breaker = self.breaker.clone();
        other.operator = true;
        Ok(other)
    }

    fn admit(&self) -> Result<(), Duration> {
        if self.operator {
            return Ok(());
        }
        self.breaker.admit()
    }

    /// Whether the breaker is open now (the store is considered down).
    pub fn circuit_open_now(&self) -> bool {
        self.breaker.failures.load(Ordering::Relaxed) >= self.breaker.threshold
    }

    fn circuit_open(&self, op: &'static str, retry_in: Duration) -> StoreError {
        StoreError::CircuitOpen {
            op,
            failures: self.breaker.failures.load(Ordering::Relaxed),
            retry_in,
        }
    }

    /// An exclusive connection for a WATCH transaction (connected on
    /// first use, replaced after any error).
    pub async fn exclusive(&self, op: &'static str) -> Result<Exclusive<'_>, StoreError> {
        let i = self.next_exclusive.fetch_add(1, Ordering::Relaxed) % self.exclusive.len();
        let mut slot = self.exclusive[i].lock().await;
        let mut fresh = false;
        if slot.is_none() {
            if let Err(retry_in) = self.admit() {
                return Err(self.circuit_open(op, retry_in));
            }
            let config = AsyncConnectionConfig::new()
                .set_response_timeout(Some(self.timeout))
                .set_connection_timeout(Some(self.connect_timeout));
            let made = tokio::time::timeout(
                self.connect_timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await;
            match made {
                Ok(Ok(conn)) => {
                    *slot = Some(conn);
                    fresh = true;
                }
                Ok(Err(e)) => {
                    self.breaker.record(false);
                    return Err(self.error(op, e));
                }
                Err(_) => {
                    self.breaker.record(false);
                    return Err(self.error(op, timed_out()));
                }
            }
        }
        Ok(Exclusive {
            owner: self,
            slot,
            fresh,
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
        match self.guarded(pipe).await {
            Ok(result) => result,
            Err(retry_in) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("circuit open, next try in {retry_in:?}"),
            ))),
        }
    }

    /// The pipeline's result, or `Err(retry_in)` while the breaker is
    /// open; feeds the breaker.
    async fn guarded(&self, pipe: &Pipeline) -> Result<Result<Vec<Value>, RedisError>, Duration> {
        self.breaker_around(self.query_through(pipe)).await
    }

    /// `call`'s result, or `Err(retry_in)` (and `call` never runs) while
    /// the breaker is open; feeds the breaker.
    async fn breaker_around(
        &self,
        call: impl std::future::Future<Output = Result<Vec<Value>, RedisError>>,
    ) -> Result<Result<Vec<Value>, RedisError>, Duration> {
        self.admit()?;
        let result = call.await;
        self.breaker.record(match &result {
            Ok(_) => true,
            Err(e) => answered(e),
        });
        Ok(result)
    }

    /// Runs a MULTI/EXEC (or a pipeline) on the lean connection in one round trip, within
    /// the timeout; gives one reply per command. A server error in a
    /// reply fails the call unless `errors_in_place` (then the caller
    /// reads it), as redis-rs's `ignore_errors` does.
    pub async fn transact(
        &self,
        op: &'static str,
        t: Transaction,
        errors_in_place: bool,
    ) -> Result<Vec<Value>, StoreError> {
        let call = async {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let vals = match tokio::time::timeout(self.timeout, self.lean.exec(t)).await {
                Ok(result) => result?,
                Err(_) => return Err(timed_out()),
            };
            if !errors_in_place {
                if let Some(Value::ServerError(e)) =
                    vals.iter().find(|v| matches!(v, Value::ServerError(_)))
                {
                    return Err(e.clone().into());
                }
            }
            Ok(vals)
        };
        match self.breaker_around(call).await {
            Ok(result) => result.map_err(|e| self.error(op, e)),
            Err(retry_in) => Err(self.circuit_open(op, retry_in)),
        }
    }

    async fn query_through(&self, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
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
            Err(_) => Err(timed_out()),
        }
    }

    /// Sends a pipeline of reads; one that met a connection broken while
    /// Redis was away (a restart) is sent once more on the new one, since
    /// reading twice changes nothing.
    pub async fn read(&self, op: &'static str, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        match self.guarded(pipe).await {
            Ok(Err(e)) if e.is_connection_dropped() || (e.is_io_error() && !e.is_timeout()) => {
                self.run(op, pipe).await
            }
            Ok(result) => result.map_err(|e| self.error(op, e)),
            Err(retry_in) => Err(self.circuit_open(op, retry_in)),
        }
    }

    /// Sends a pipeline (or transaction) in one round trip.
    pub async fn run(&self, op: &'static str, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        match self.guarded(pipe).await {
            Ok(result) => result.map_err(|e| self.error(op, e)),
            Err(retry_in) => Err(self.circuit_open(op, retry_in)),
        }
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
