//! Stage 5: the local sold-out flag. Once the store says a sku is gone,
//! losers on this node are answered without a round trip. The flag clears
//! when stock comes back: at once for releases and restocks made on this
//! node, and within one recheck interval for those made on other nodes
//! (a short poll of the store's availability). Flags are keyed by rule
//! name, so they survive a config reload for the rules it keeps.

use std::sync::{Arc, RwLock};

// foldhash, not SipHash: every loser of a sale looks its sku up here
// (two SipHash lookups were about 2% of a sold_out answer). Its seed is
// random per process, and only skus the store called sold out are keys.
use foldhash::{HashMap, HashSet};

/// Sold-out skus, by rule name.
#[derive(Default)]
pub struct SoldOutFlags {
    by_rule: RwLock<HashMap<Arc<str>, HashSet<Box<str>>>>,
}

impl SoldOutFlags {
    /// No sku flagged.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the sku is flagged sold out.
    pub fn is_set(&self, rule: &str, sku: &str) -> bool {
        self.by_rule
            .read()
            .ok()
            .is_some_and(|m| m.get(rule).is_some_and(|s| s.contains(sku)))
    }

    /// Flags a sku the store said is gone.
    pub fn set(&self, rule: &Arc<str>, sku: &str) {
        if let Ok(mut m) = self.by_rule.write() {
            m.entry(rule.clone()).or_default().insert(Box::from(sku));
        }
    }

    /// Clears a sku whose stock came back.
    pub fn clear(&self, rule: &str, sku: &str) {
        if let Ok(mut m) = self.by_rule.write() {
            if let Some(s) = m.get_mut(rule) {
                s.remove(sku);
            }
        }
    }

    /// Forgets every flag of a rule (a reload removed it).
    pub fn forget_rule(&self, rule: &str) {
        if let Ok(mut m) = self.by_rule.write() {
            m.remove(rule);
        }
    }

    /// Every flagged `(rule, sku)`, for the recheck poll.
    pub fn flagged(&self) -> Vec<(Arc<str>, String)> {
        self.by_rule.read().map_or_else(
            |_| Vec::new(),
            |m| {
                m.iter()
                    .flat_map(|(rule, skus)| skus.iter().map(|s| (rule.clone(), s.to_string())))
                    .collect()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_check_clear() {
        let f = SoldOutFlags::new();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(!f.is_set("a", "p1"));
        f.set(&a, "p1");
        assert!(f.is_set("a", "p1"));
        assert!(!f.is_set("b", "p1"), "flags are per rule");
        assert_eq!(f.flagged(), vec![(a.clone(), "p1".to_string())]);
        f.clear("a", "p1");
        assert!(!f.is_set("a", "p1"));
        f.set(&b, "x");
        f.forget_rule("b");
        assert!(!f.is_set("b", "x"));
        assert!(f.flagged().is_empty());
    }
}
