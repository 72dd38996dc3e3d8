//! Single flight: one piece of work per key at a time, however many ask.
//! The first caller for a key leads ([`Join::Lead`]) and starts the work;
//! everyone who asks while it runs follows ([`Join::Follow`]) and waits
//! for the same value. The map holds only keys being worked on, so its
//! size is bounded by the work in flight; its mutex is held for a lookup
//! or an insert, never across an await, and never on a cache hit.
//!
//! Used by the read cache (one backend fetch per key) and the stock view
//! (one store read per sku). Hand-written over a tokio `watch` channel
//! rather than taken from a crate: the waiters' bound (`lock_timeout`) and
//! the leader that may be a background task want the channel itself, and
//! the whole of it is this page.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// The keys being worked on, each with the channel its value comes on.
pub struct Flights<K, V> {
    map: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

/// What a caller of [`Flights::join`] does.
pub enum Join<K: Hash + Eq + Clone, V: Clone> {
    /// Someone else is on it: wait for its value.
    Follow(Follower<V>),
    /// Nobody was: do the work, then [`Lead::finish`].
    Lead(Lead<K, V>),
}

/// A waiter for another's value.
pub struct Follower<V> {
    rx: watch::Receiver<Option<V>>,
}

/// What a follower got.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited<V> {
    /// The leader's value.
    Value(V),
    /// Not within the wait: go alone.
    TimedOut,
    /// The leader gave up without a value (its task ended early).
    Abandoned,
}

impl<V: Clone> Follower<V> {
    /// Waits for the leader's value, at most `limit` (`None`: as long as
    /// the leader works).
    pub async fn wait(mut self, limit: Option<Duration>) -> Waited<V> {
        let got = async {
            match self.rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().map_or(Waited::Abandoned, Waited::Value),
                Err(_) => Waited::Abandoned,
            }
        };
        match limit {
            Some(limit) => tokio::time::timeout(limit, got)
                .await
                .unwrap_or(Waited::TimedOut),
            None => got.await,
        }
    }
}

/// The leader of one key's flight; dropping it without finishing releases
/// the followers ([`Waited::Abandoned`]) and the key.
pub struct Lead<K: Hash + Eq + Clone, V: Clone> {
    flights: Arc<Flights<K, V>>,
    key: K,
    tx: watch::Sender<Option<V>>,
    /// The map's entry for `key` is this flight's (until [`Lead::free`]).
    holds_key: bool,
}

impl<K: Hash + Eq + Clone, V: Clone> Lead<K, V> {
    /// A follower of this very flight (the leader's own caller waits like
    /// the others when the work runs in a task).
    pub fn follower(&self) -> Follower<V> {
        Follower {
            rx: self.tx.subscribe(),
        }
    }

    /// Frees the key, then hands the value to every follower: whoever
    /// asks once a follower (or the leader's own caller) has the value
    /// starts a flight of its own, never joins this one for a value older
    /// than its request.
    pub fn finish(mut self, value: V) {
        self.free();
        self.tx.send_replace(Some(value));
    }

    /// Takes the key out of the map, once.
    fn free(&mut self) {
        if std::mem::take(&mut self.holds_key) {
            if let Ok(mut map) = self.flights.map.lock() {
                map.remove(&self.key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Lead<K, V> {
    fn drop(&mut self) {
        self.free();
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    /// Follows the flight of `key`, or leads a new one.
    pub fn join(self: &Arc<Self>, key: &K) -> Join<K, V> {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map cannot coordinate: everyone leads (no worse
            // than no cache) rather than panic.
            let (tx, _) = watch::channel(None);
            return Join::Lead(Lead {
                flights: self.clone(),
                key: key.clone(),
                tx,
                holds_key: false,
            });
        };
        if let Some(rx) = map.get(key) {
            return Join::Follow(Follower { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        Join::Lead(Lead {
            flights: self.clone(),
            key: key.clone(),
            tx,
            holds_key: true,
        })
    }

    /// Keys being worked on now.
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// Whether nothing is being worked on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_followers_one_value() {
        let flights: Arc<Flights<String, u32>> = Arc::default();
        let Join::Lead(lead) = flights.join(&"k".to_string()) else {
            panic!("the first caller leads");
        };
        let followers: Vec<_> = (0..100)
            .map(|_| match flights.join(&"k".to_string()) {
                Join::Follow(f) => tokio::spawn(f.wait(None)),
                Join::Lead(_) => panic!("only one leader"),
            })
            .collect();
        assert_eq!(flights.len(), 1);
        lead.finish(7);
        for f in followers {
            assert_eq!(f.await.expect("join"), Waited::Value(7));
        }
        assert!(flights.is_empty(), "the key is freed");
        assert!(matches!(flights.join(&"k".to_string()), Join::Lead(_)));
    }

    /// Once the value is out, a new caller leads a flight of its own, and
    /// the old leader's end does not free the new flight's key.
    #[tokio::test]
    async fn a_caller_after_the_value_leads_anew() {
        let flights: Arc<Flights<u8, u8>> = Arc::default();
        let Join::Lead(lead) = flights.join(&1) else {
            panic!("the first caller leads");
        };
        let Join::Follow(f) = flights.join(&1) else {
            panic!("follows")
        };
        lead.finish(1);
        assert_eq!(f.wait(None).await, Waited::Value(1));
        let Join::Lead(second) = flights.join(&1) else {
            panic!("a caller after the value leads a new flight");
        };
        assert_eq!(flights.len(), 1);
        drop(second);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_followers() {
        let flights: Arc<Flights<u8, u8>> = Arc::default();
        let lead = flights.join(&1);
        let Join::Follow(f) = flights.join(&1) else {
            panic!("follows")
        };
        drop(lead);
        assert_eq!(f.wait(None).await, Waited::Abandoned);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_follower_waits_no_longer_than_its_bound() {
        let flights: Arc<Flights<u8, u8>> = Arc::default();
        let _lead = flights.join(&1);
        let Join::Follow(f) = flights.join(&1) else {
            panic!("follows")
        };
        assert_eq!(
            f.wait(Some(Duration::from_millis(1))).await,
            Waited::TimedOut
        );
    }
}
