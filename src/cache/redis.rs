//! The shared Redis tier (`cache.redis: true`): entries under
//! `{store.redis.key_prefix}cache:{key}`, each with a TTL of what is left
//! of its life, so a cold or restarted node answers from what another
//! node fetched. Lua-free, through the store's connection layer
//! ([`RedisConn`]: response timeout, circuit breaker) on a connection of
//! its own, so a slow cache never opens the store's breaker. Every
//! failure reads as a miss: the cache degrades to its memory tier, then to
//! the backend behind single flight, never to an error.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::entry::Entry;
use crate::config::RedisConfig;
use crate::store::redis_conn::RedisConn;
use crate::store::StoreError;
use crate::vocab::now_ms;

/// Keys scanned per SCAN step while purging.
const SCAN_COUNT: u64 = 1000;

/// The Redis tier.
pub struct RedisTier {
    conn: RedisConn,
    /// `{key_prefix}cache:`
    prefix: String,
}

impl RedisTier {
    /// A tier on the configured Redis; nothing is dialled until used.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: RedisConn::new(config)?,
            prefix: format!("{}cache:", config.key_prefix),
        })
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The entry of a key; `None` when absent, unreadable or Redis fails.
    pub async fn get(&self, key: &str) -> Option<Entry> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.redis_key(key));
        match self.conn.read("cache_get", &pipe).await {
            Ok(vals) => match vals.first() {
                Some(Value::BulkString(b)) => Entry::decode(Bytes::from(b.clone())),
                _ => None,
            },
            Err(e) => {
                tracing::debug!(error = %e, "cache redis tier unavailable");
                None
            }
        }
    }

    /// Stores an entry for what is left of its life; failures are logged
    /// at debug and dropped (the memory tier still has it).
    pub async fn set(&self, key: &str, entry: &Entry) {
        let ttl = entry.remaining(now_ms());
        if ttl < Duration::from_millis(1) {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.redis_key(key))
            .arg(entry.encode().as_ref())
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .ignore();
        if let Err(e) = self.conn.run("cache_set", &pipe).await {
            tracing::debug!(error = %e, "cache redis tier: could not store");
        }
    }

    /// Deletes every entry whose path starts with `prefix` (SCAN MATCH,
    /// then UNLINK); how many.
    pub async fn purge(&self, prefix: &str) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(&self.redis_key(prefix)));
        let mut cursor: u64 = 0;
        let mut purged = 0;
        loop {
            let mut scan = redis::pipe();
            scan.cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let vals = self.conn.read("cache_purge", &scan).await?;
            let (next, keys) = match vals.first() {
                Some(Value::Array(parts)) => match parts.as_slice() {
                    [next, Value::Array(keys)] => (
                        crate::store::redis_conn::as_int(next).unwrap_or(0),
                        keys.clone(),
                    ),
                    _ => (0, Vec::new()),
                },
                _ => (0, Vec::new()),
            };
            if !keys.is_empty() {
                let mut del = redis::pipe();
                let cmd = del.cmd("UNLINK");
                for k in &keys {
                    if let Value::BulkString(b) = k {
                        cmd.arg(b.as_slice());
                    }
                }
                let removed = self.conn.run("cache_purge", &del).await?;
                let n = removed.first().and_then(crate::store::redis_conn::as_int);
                purged += n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            }
            cursor = u64::try_from(next).unwrap_or(0);
            if cursor == 0 {
                return Ok(purged);
            }
        }
    }
}

/// `text` with Redis glob specials escaped, so it matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_patterns_match_only_the_prefix() {
        assert_eq!(
            glob_escape("sluice:cache:/a*b?[c]\\"),
            "sluice:cache:/a\\*b\\?\\[c\\]\\\\"
        );
    }
}
