//! Stage 4 of the admission pipeline (DESIGN.md section 3): the token
//! buckets of one rule, keyed by client ip, by user id or by the rule
//! itself, backed by governor's GCRA limiters.
//!
//! The pipeline builds one [`RateLimitStage`] per rule from its
//! `rate_limits`, shares it across pingora worker threads behind an `Arc`,
//! and calls [`RateLimitStage::check`] for each matched request; a refusal
//! becomes `rate_limited` with `Retry-After`. A background task calls
//! [`RateLimitStage::prune`] so keyed state stays bounded by the keys seen
//! within roughly one refill time, not by every key ever seen.
//!
//! The clock is injected (`with_clock`) so tests drive time with governor's
//! `FakeRelativeClock` instead of sleeping.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use crate::rules::{RateKey, RateLimit};

/// The shortest wait ever reported. governor measures a refusal at one
/// instant and we read the clock again afterwards, so on a real clock the
/// wait may already have run out; a zero `Retry-After` would invite an
/// immediate retry storm, and 1 ms is the finest unit worth reporting.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// A limiter keyed by `K` whose state lives in a concurrent map.
type KeyedLimiter<K, C> =
    RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A single unkeyed limiter.
type DirectLimiter<C> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One configured limit, as a governor limiter of the right kind.
enum Bucket<C: Clock> {
    /// One bucket per client ip.
    Ip(KeyedLimiter<IpAddr, C>),
    /// One bucket per user id. Ids are at most 128 chars (stage 2), so a
    /// boxed copy is a bounded key; a hash would save the allocation but
    /// let two users collide into one bucket.
    User(KeyedLimiter<Box<str>, C>),
    /// One bucket for the whole rule.
    Rule(DirectLimiter<C>),
}

impl<C: Clock> Bucket<C> {
    fn kind(&self) -> RateKey {
        match self {
            Bucket::Ip(_) => RateKey::Ip,
            Bucket::User(_) => RateKey::User,
            Bucket::Rule(_) => RateKey::Rule,
        }
    }
}

/// The token buckets of one rule, checked in config order.
pub struct RateLimitStage<C: Clock = DefaultClock> {
    buckets: Vec<Bucket<C>>,
    clock: C,
}

impl RateLimitStage {
    /// Builds the stage on the real (monotonic) clock.
    pub fn new(limits: &[RateLimit]) -> Self {
        Self::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimitStage<C> {
    /// Builds the stage on the given clock (a fake one in tests).
    pub fn with_clock(limits: &[RateLimit], clock: C) -> Self {
        let buckets = limits
            .iter()
            .filter_map(|limit| {
                let Some(quota) = quota(limit) else {
                    // Config validation rejects these; skipping keeps a
                    // bad value from panicking the gateway if it slips by.
                    tracing::warn!(
                        key = ?limit.key,
                        rate = limit.rate.get(),
                        per = ?limit.per,
                        "rate limit refills faster than 1 token per ns; limit skipped"
                    );
                    return None;
                };
                let clock = clock.clone();
                Some(match limit.key {
                    RateKey::Ip => Bucket::Ip(RateLimiter::dashmap_with_clock(quota, clock)),
                    RateKey::User => Bucket::User(RateLimiter::dashmap_with_clock(quota, clock)),
                    RateKey::Rule => Bucket::Rule(RateLimiter::direct_with_clock(quota, clock)),
                })
            })
            .collect();
        Self { buckets, clock }
    }

    /// Ok, or Err(retry_after) from the first bucket that refuses.
    ///
    /// Buckets before the refusing one keep the token they gave: governor
    /// cannot hand one back, and a refused client is over some limit anyway.
    /// `user` is the id validated by stage 2.
    pub fn check(&self, ip: IpAddr, user: &str) -> Result<(), Duration> {
        // Allocated at most once, and only if some bucket is keyed by user.
        let mut user_key: Option<Box<str>> = None;
        for bucket in &self.buckets {
            let refused: Option<NotUntil<C::Instant>> = match bucket {
                Bucket::Ip(limiter) => limiter.check_key(&ip).err(),
                Bucket::User(limiter) => limiter
                    .check_key(user_key.get_or_insert_with(|| user.into()))
                    .err(),
                Bucket::Rule(limiter) => limiter.check().err(),
            };
            if let Some(not_until) = refused {
                let wait = not_until.wait_time_from(self.clock.now());
                return Err(wait.max(MIN_RETRY_AFTER));
            }
        }
        Ok(())
    }

    /// Drops keyed state of buckets that are full again (called from a background task).
    ///
    /// governor drops a key one refill interval (`per / rate`) after its
    /// bucket is full again, so a key never loses tokens it still owes.
    pub fn prune(&self) {
        for bucket in &self.buckets {
            match bucket {
                Bucket::Ip(limiter) => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                Bucket::User(limiter) => {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                Bucket::Rule(_) => {}
            }
        }
    }

    /// Number of keys held across keyed limiters (for tests and a gauge).
    pub fn keys(&self) -> usize {
        self.buckets
            .iter()
            .map(|bucket| match bucket {
                Bucket::Ip(limiter) => limiter.len(),
                Bucket::User(limiter) => limiter.len(),
                Bucket::Rule(_) => 0,
            })
            .sum()
    }

    /// Whether no limits are configured, so every request passes.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

impl<C: Clock> fmt::Debug for RateLimitStage<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitStage")
            .field(
                "buckets",
                &self.buckets.iter().map(Bucket::kind).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// `rate` tokens every `per` is one token every `per / rate`, up to `burst`.
/// `None` when that interval rounds down to zero nanoseconds.
fn quota(limit: &RateLimit) -> Option<Quota> {
    // Division by a NonZeroU32 cannot panic.
    Quota::with_period(limit.per / limit.rate.get()).map(|q| q.allow_burst(limit.burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use governor::clock::FakeRelativeClock;
    use governor::nanos::Nanos;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("test values are non-zero")
    }

    fn limit(key: RateKey, rate: u32, per: Duration, burst: u32) -> RateLimit {
        RateLimit {
            key,
            rate: nz(rate),
            per,
            burst: nz(burst),
        }
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn stage(limits: &[RateLimit]) -> (RateLimitStage<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RateLimitStage::with_clock(limits, clock.clone()), clock)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn rule_bucket_refuses_after_burst_with_exact_wait() {
        let (stage, clock) = stage(&[limit(RateKey::Rule, 5, SEC, 5)]);
        for i in 0..5 {
            assert_eq!(stage.check(ip(i), "u"), Ok(()), "request {i}");
        }
        // One token every 1s / 5 = 200ms.
        assert_eq!(stage.check(ip(9), "v"), Err(Duration::from_millis(200)));
        clock.advance(Duration::from_millis(200));
        assert_eq!(stage.check(ip(9), "v"), Ok(()));
        assert_eq!(stage.check(ip(9), "v"), Err(Duration::from_millis(200)));
    }

    #[test]
    fn burst_larger_than_rate() {
        let (stage, clock) = stage(&[limit(RateKey::Rule, 1, Duration::from_secs(3), 2)]);
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
        assert_eq!(stage.check(ip(1), "u"), Err(Duration::from_secs(3)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(stage.check(ip(1), "u"), Err(Duration::from_secs(2)));
        clock.advance(Duration::from_secs(2));
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
    }

    #[test]
    fn ip_keys_are_independent() {
        let (stage, _clock) = stage(&[limit(RateKey::Ip, 1, SEC, 2)]);
        for addr in [ip(1), ip(2), "::1".parse().expect("valid ip")] {
            assert_eq!(stage.check(addr, "u"), Ok(()));
            assert_eq!(stage.check(addr, "u"), Ok(()));
            assert_eq!(stage.check(addr, "u"), Err(SEC));
        }
        assert_eq!(stage.keys(), 3);
    }

    #[test]
    fn user_keys_are_independent() {
        let (stage, _clock) = stage(&[limit(RateKey::User, 1, SEC, 2)]);
        for user in ["alice", "bob"] {
            // Different ips: only the user key matters.
            assert_eq!(stage.check(ip(1), user), Ok(()));
            assert_eq!(stage.check(ip(2), user), Ok(()));
            assert_eq!(stage.check(ip(3), user), Err(SEC));
        }
        assert_eq!(stage.keys(), 2);
    }

    #[test]
    fn first_refusing_bucket_in_config_order_answers() {
        let (stage, _clock) = stage(&[
            limit(RateKey::Ip, 1, SEC, 1),
            limit(RateKey::Rule, 100, SEC, 100),
        ]);
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
        // The ip's 1s, not the rule bucket's 10ms.
        assert_eq!(stage.check(ip(1), "u"), Err(SEC));
        // The rule bucket still has tokens for another ip.
        assert_eq!(stage.check(ip(2), "u"), Ok(()));
    }

    #[test]
    fn prune_drops_only_full_buckets() {
        let (stage, clock) = stage(&[limit(RateKey::Ip, 1, SEC, 1)]);
        for n in 0..10_000 {
            assert_eq!(stage.check(ip(n), "u"), Ok(()));
        }
        assert_eq!(stage.keys(), 10_000);

        // Still refilling: pruning must not hand these ips a fresh bucket.
        clock.advance(Duration::from_millis(500));
        stage.prune();
        assert_eq!(stage.keys(), 10_000);
        assert_eq!(stage.check(ip(0), "u"), Err(Duration::from_millis(500)));

        // Refill takes 1s; governor keeps a full key one more interval (1s).
        clock.advance(Duration::from_millis(1_500));
        stage.prune();
        assert_eq!(stage.keys(), 0);
        assert_eq!(stage.check(ip(0), "u"), Ok(()));
    }

    #[test]
    fn keys_and_prune_cover_every_keyed_limiter() {
        let (stage, clock) = stage(&[
            limit(RateKey::Ip, 10, SEC, 10),
            limit(RateKey::User, 10, SEC, 10),
            limit(RateKey::Rule, 10, SEC, 10),
        ]);
        for (n, user) in ["a", "b", "c"].into_iter().enumerate() {
            assert_eq!(stage.check(ip(n as u32), user), Ok(()));
        }
        assert_eq!(stage.keys(), 6);
        clock.advance(SEC);
        stage.prune();
        assert_eq!(stage.keys(), 0);
    }

    #[test]
    fn empty_limits_always_pass() {
        let (stage, _clock) = stage(&[]);
        assert!(stage.is_empty());
        for n in 0..1_000 {
            assert_eq!(stage.check(ip(n % 3), "u"), Ok(()));
        }
        assert_eq!(stage.keys(), 0);
        assert!(!RateLimitStage::new(&[limit(RateKey::Rule, 1, SEC, 1)]).is_empty());
    }

    #[test]
    fn sub_nanosecond_interval_is_skipped_not_a_panic() {
        // 1ns / 2 rounds down to a zero refill interval.
        let (stage, _clock) = stage(&[limit(RateKey::Rule, 2, Duration::from_nanos(1), 1)]);
        assert!(stage.is_empty());
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
    }

    /// A clock that moves `step` forward on every read, so the wait measured
    /// after a refusal can already have run out.
    #[derive(Clone)]
    struct SteppingClock {
        now: Arc<AtomicU64>,
        step: u64,
    }

    impl Clock for SteppingClock {
        type Instant = Nanos;

        fn now(&self) -> Nanos {
            Nanos::from(self.now.fetch_add(self.step, Ordering::Relaxed))
        }
    }

    #[test]
    fn retry_after_is_never_zero() {
        let clock = SteppingClock {
            now: Arc::new(AtomicU64::new(0)),
            step: 600_000_000, // 600ms: two reads pass the 1s refill
        };
        let stage = RateLimitStage::with_clock(&[limit(RateKey::Rule, 1, SEC, 1)], clock);
        assert_eq!(stage.check(ip(1), "u"), Ok(()));
        assert_eq!(stage.check(ip(1), "u"), Err(MIN_RETRY_AFTER));
    }

    #[test]
    fn stage_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimitStage>();
        assert_send_sync::<RateLimitStage<FakeRelativeClock>>();
    }

    #[test]
    fn debug_lists_bucket_kinds() {
        let (stage, _clock) = stage(&[
            limit(RateKey::Ip, 1, SEC, 1),
            limit(RateKey::Rule, 1, SEC, 1),
        ]);
        assert_eq!(
            format!("{stage:?}"),
            "RateLimitStage { buckets: [Ip, Rule], .. }"
        );
    }
}
