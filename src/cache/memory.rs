//! The memory tier: a moka cache bounded in bytes (`cache.max_bytes`;
//! each entry weighs its key, headers, body and a fixed overhead) with
//! TinyLFU admission: when it is full, a new key gets in only if it has
//! been asked for more often than the entry it would evict, so a flood of
//! one-off keys (a crawler, random query strings) cannot push out the
//! hot product pages. Entries expire on their own once no window can
//! serve them any more (fresh, then the longer stale window).
//!
//! A lookup is one read of moka's concurrent hash table: no lock shared by
//! all requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use super::entry::Entry;
use crate::vocab::now_ms;

/// Expires each entry when its last window closes.
struct Lifetime;

impl Lifetime {
    fn of(entry: &Entry) -> Option<Duration> {
        // At least a millisecond: moka takes zero as "expired", which is
        // what it is, but a stored pass marker must be seen once.
        Some(entry.remaining(now_ms()).max(Duration::from_millis(1)))
    }
}

impl Expiry<Box<str>, Arc<Entry>> for Lifetime {
    fn expire_after_create(
        &self,
        _key: &Box<str>,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Self::of(value)
    }

    fn expire_after_update(
        &self,
        _key: &Box<str>,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Self::of(value)
    }
}

/// The memory tier of one gateway.
pub struct MemoryTier {
    cache: Cache<Box<str>, Arc<Entry>>,
}

/// The weigher: an entry's bytes under its key.
#[allow(clippy::borrowed_box)] // moka hands the key as stored
fn weigh(key: &Box<str>, entry: &Arc<Entry>) -> u32 {
    entry.weight(key)
}

impl MemoryTier {
    /// A tier holding at most `max_bytes` of entries.
    pub fn new(max_bytes: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .expire_after(Lifetime)
                .build(),
        }
    }

    /// The entry of a key, if held.
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    /// Offers an entry (admission may turn a cold key away when full).
    pub fn insert(&self, key: &str, entry: Arc<Entry>) {
        self.cache.insert(Box::from(key), entry);
    }

    /// Drops every entry whose path starts with `prefix`; how many.
    pub fn purge(&self, prefix: &str) -> u64 {
        let mut purged = 0;
        for (key, entry) in self.cache.iter() {
            if entry.path.starts_with(prefix) {
                self.cache.invalidate(key.as_ref());
                purged += 1;
            }
        }
        self.cache.run_pending_tasks();
        purged
    }

    /// Bytes held and entries held, once pending evictions are applied.
    pub fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use pingora_http::ResponseHeader;

    use super::*;

    fn entry(path: &str, body: usize) -> Arc<Entry> {
        Arc::new(Entry {
            path: path.into(),
            header: ResponseHeader::build(200, None).expect("header"),
            body: Bytes::from(vec![b'x'; body]),
            born_ms: now_ms(),
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            pass: false,
        })
    }

    #[test]
    fn a_flood_of_one_off_keys_stays_under_the_bound_and_keeps_the_hot_key() {
        let tier = MemoryTier::new(64 << 10);
        tier.insert("/hot", entry("/hot", 500));
        for round in 0..2_000 {
            for _ in 0..3 {
                assert!(tier.get("/hot").is_some(), "hot key lost at round {round}");
            }
            let key = format!("/cold/{round}");
            tier.insert(&key, entry(&key, 500));
        }
        let (bytes, entries) = tier.size();
        assert!(bytes <= 64 << 10, "{bytes} bytes held");
        assert!(entries > 10, "{entries} entries");
        assert!(tier.get("/hot").is_some());
    }

    #[test]
    fn purge_goes_by_path_prefix() {
        let tier = MemoryTier::new(1 << 20);
        for p in ["/api/goods/1", "/api/goods/2", "/api/shop/1"] {
            tier.insert(p, entry(p, 10));
        }
        assert_eq!(tier.purge("/api/goods/"), 2);
        assert!(tier.get("/api/goods/1").is_none());
        assert!(tier.get("/api/shop/1").is_some());
    }
}
