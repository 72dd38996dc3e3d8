//! Stage 5: the local sold-out flag. Once the store says a sku is gone,
//! losers on this node are answered without a round trip. The flag clears
//! when stock comes back: at once for releases and restocks made on this
//! node, and within one recheck interval for those made on other nodes
//! (a short poll of the store's availability).

use std::collections::HashSet;
use std::sync::RwLock;

/// Sold-out skus, one set per rule (indexed like the rule set).
pub struct SoldOutFlags {
    per_rule: Vec<RwLock<HashSet<Box<str>>>>,
}

impl SoldOutFlags {
    /// Flags for `rules` rules, all clear.
    pub fn new(rules: usize) -> Self {
        Self {
            per_rule: (0..rules).map(|_| RwLock::new(HashSet::new())).collect(),
        }
    }

    /// Whether the sku is flagged sold out.
    pub fn is_set(&self, rule: usize, sku: &str) -> bool {
        self.per_rule
            .get(rule)
            .and_then(|set| set.read().ok().map(|s| s.contains(sku)))
            .unwrap_or(false)
    }

    /// Flags a sku the store said is gone.
    pub fn set(&self, rule: usize, sku: &str) {
        if let Some(Ok(mut s)) = self.per_rule.get(rule).map(|l| l.write()) {
            s.insert(Box::from(sku));
        }
    }

    /// Clears a sku whose stock came back.
    pub fn clear(&self, rule: usize, sku: &str) {
        if let Some(Ok(mut s)) = self.per_rule.get(rule).map(|l| l.write()) {
            s.remove(sku);
        }
    }

    /// Every flagged `(rule, sku)`, for the recheck poll.
    pub fn flagged(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (rule, set) in self.per_rule.iter().enumerate() {
            if let Ok(s) = set.read() {
                out.extend(s.iter().map(|sku| (rule, sku.to_string())));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_check_clear() {
        let f = SoldOutFlags::new(2);
        assert!(!f.is_set(0, "p1"));
        f.set(0, "p1");
        assert!(f.is_set(0, "p1"));
        assert!(!f.is_set(1, "p1"), "flags are per rule");
        assert_eq!(f.flagged(), vec![(0, "p1".to_string())]);
        f.clear(0, "p1");
        assert!(!f.is_set(0, "p1"));
        // Out-of-range rules are never flagged and never panic.
        f.set(9, "x");
        assert!(!f.is_set(9, "x"));
    }
}
