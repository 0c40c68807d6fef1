//! The retry budget (as Linkerd's): retries may add at most a share of the requests seen over a
//! sliding window, plus a floor of a few retries per second so a quiet service can still retry.
//! Retries therefore cannot multiply an outage: when every request fails, load on the failing
//! service grows by at most the ratio (plus the floor), not by the number of attempts. Pure
//! state; `now` is an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Budget settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed as a share of requests in the window.
    pub ratio: f64,
    /// Retries always allowed per window (10 per second over the window).
    pub min_retries: u32,
    /// The window.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_retries: 100,
            window: Duration::from_secs(10),
        }
    }
}

/// Requests and retries in the window, for one destination service.
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

impl RetryBudget {
    fn expire(&mut self, cfg: &BudgetConfig, now: Instant) {
        let cutoff = now.checked_sub(cfg.window);
        for q in [&mut self.requests, &mut self.retries] {
            while q.front().is_some_and(|&t| cutoff.is_some_and(|c| t < c)) {
                q.pop_front();
            }
        }
    }

    /// Counts a first attempt.
    pub fn request(&mut self, cfg: &BudgetConfig, now: Instant) {
        self.expire(cfg, now);
        self.requests.push_back(now);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&mut self, cfg: &BudgetConfig, now: Instant) -> bool {
        self.expire(cfg, now);
        let allowed = (self.requests.len() as f64 * cfg.ratio) as usize + cfg.min_retries as usize;
        if self.retries.len() >= allowed {
            return false;
        }
        self.retries.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_share_of_requests() {
        let cfg = BudgetConfig::default();
        let mut b = RetryBudget::default();
        let t = Instant::now();
        for _ in 0..1000 {
            b.request(&cfg, t);
        }
        let granted = (0..1000).filter(|_| b.try_retry(&cfg, t)).count();
        assert_eq!(granted, 300, "20% of 1000 plus the floor of 100");
        // The window slides: an hour later the old requests no longer count.
        let later = t + Duration::from_secs(3600);
        assert_eq!((0..200).filter(|_| b.try_retry(&cfg, later)).count(), 100);
    }
}
