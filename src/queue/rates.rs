//! How fast each upstream's queue drains, from the last dispatches this
//! node made: the ETA a ticket poll shows.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Dispatches remembered per upstream to estimate the drain rate.
const RATE_WINDOW: usize = 64;

/// Recent dispatch times of each upstream, for the ETA of a poll.
#[derive(Default)]
pub struct DrainRates {
    recent: Mutex<Vec<(String, VecDeque<Instant>)>>,
}

impl DrainRates {
    /// Notes that a queued request of `upstream` was just sent.
    pub fn record(&self, upstream: &str) {
        if let Ok(mut all) = self.recent.lock() {
            let pos = all.iter().position(|(u, _)| u == upstream);
            let q = match pos {
                Some(i) => &mut all[i].1,
                None => {
                    all.push((upstream.to_string(), VecDeque::new()));
                    let last = all.len() - 1;
                    &mut all[last].1
                }
            };
            q.push_back(Instant::now());
            if q.len() > RATE_WINDOW {
                q.pop_front();
            }
        }
    }

    /// Seconds until `position` is served at the recently observed rate
    /// (`None` until there is a rate to go by).
    pub fn eta_seconds(&self, upstream: &str, position: u64) -> Option<u64> {
        let all = self.recent.lock().ok()?;
        let q = &all.iter().find(|(u, _)| u == upstream)?.1;
        let (first, last) = (q.front()?, q.back()?);
        let span = last.duration_since(*first).as_secs_f64();
        if q.len() < 2 || span <= 0.0 {
            return None;
        }
        let per_sec = (q.len() - 1) as f64 / span;
        Some((position as f64 / per_sec).ceil() as u64)
    }
}
