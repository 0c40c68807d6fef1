//! The retry budget (as Linkerd's): retries may add at most a share of the requests seen over a
//! sliding window, plus a floor of a few retries per second so a quiet service can still retry.
//! Retries therefore cannot multiply an outage: when every request fails, load on the failing
//! service grows by at most the ratio (plus the floor), not by the number of attempts. Pure
//! state; `now` is an argument.

use std::time::{Duration, Instant};

/// Budget settings: `[failure.retry_budget]` of the sidecar config. Retries allowed in the
/// window = requests in the window × `percent` / 100 + `min_per_second` × the window's seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Retries allowed as a share of the requests seen in the window, in percent (0-100).
    pub percent: u8,
    /// Retries always allowed per second of the window, however few the requests (0-10000).
    pub min_per_second: u32,
    /// The sliding window (1s-300s).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            percent: 20,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Retries allowed in a window that saw `requests` first attempts.
    fn allowed(&self, requests: u64) -> u64 {
        let share = requests.saturating_mul(u64::from(self.percent.min(100))) / 100;
        let floor = u64::from(self.min_per_second).saturating_mul(self.window.as_secs().max(1));
        share.saturating_add(floor)
    }
}

/// Slots the window is divided into: the window slides by a tenth of itself.
const SLOTS: usize = 10;

/// Requests and retries in the window, for one destination service: counts per slot of a
/// tenth of the window, so the state is a few words whatever the request rate (one entry per
/// request would hold rate × window timestamps).
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// (requests, retries) per slot; slot `n % SLOTS` holds slot number `n`.
    slots: [(u64, u64); SLOTS],
    /// When slot number 0 began (the first call).
    epoch: Option<Instant>,
    /// The newest slot number written.
    current: u64,
}

impl RetryBudget {
    /// The slot for `now`, with slots that fell out of the window cleared.
    fn slot(&mut self, cfg: &BudgetConfig, now: Instant) -> &mut (u64, u64) {
        let epoch = *self.epoch.get_or_insert(now);
        let width = (cfg.window / SLOTS as u32).max(Duration::from_nanos(1));
        let n = u64::try_from(now.saturating_duration_since(epoch).as_nanos() / width.as_nanos())
            .unwrap_or(u64::MAX);
        if n > self.current {
            let stale = (n - self.current).min(SLOTS as u64);
            for k in 1..=stale {
                self.slots[((self.current + k) % SLOTS as u64) as usize] = (0, 0);
            }
            self.current = n;
        }
        &mut self.slots[(self.current % SLOTS as u64) as usize]
    }

    /// Counts a first attempt.
    pub fn request(&mut self, cfg: &BudgetConfig, now: Instant) {
        self.slot(cfg, now).0 += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&mut self, cfg: &BudgetConfig, now: Instant) -> bool {
        self.slot(cfg, now);
        let (requests, retries) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(q, r), s| (q + s.0, r + s.1));
        let allowed = cfg.allowed(requests);
        if retries >= allowed {
            return false;
        }
        self.slot(cfg, now).1 += 1;
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

    #[test]
    fn the_window_slides_by_slots() {
        let cfg = BudgetConfig {
            min_per_second: 0,
            ..BudgetConfig::default()
        };
        let mut b = RetryBudget::default();
        let t = Instant::now();
        for _ in 0..10 {
            b.request(&cfg, t);
        }
        let later = |s| t + Duration::from_secs(s);
        for _ in 0..10 {
            b.request(&cfg, later(5));
        }
        // 20 requests in the window: 4 retries.
        assert_eq!((0..10).filter(|_| b.try_retry(&cfg, later(9))).count(), 4);
        // At 10.5 s the first 10 requests have left the window: 10 allow 2, and 4 were taken.
        assert!(!b.try_retry(&cfg, t + Duration::from_millis(10_500)));
        // At 15.5 s the second 10 have left too: nothing is allowed without a floor.
        for _ in 0..5 {
            b.request(&cfg, t + Duration::from_millis(15_500));
        }
        assert_eq!(
            (0..10)
                .filter(|_| b.try_retry(&cfg, t + Duration::from_millis(15_600)))
                .count(),
            0,
            "5 requests allow 1 retry, but the 4 taken at 9 s are still in the window"
        );
        // At 20 s the retries at 9 s are gone; the 5 requests at 15.5 s allow 1.
        assert_eq!((0..10).filter(|_| b.try_retry(&cfg, later(20))).count(), 1);
    }
}
