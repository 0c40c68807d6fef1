//! A budget of requests a peer may abandon (reset before its headers completed), refilled
//! over time: past it, the connection is closed. Pure: `now` is a parameter.

use std::time::{Duration, Instant};

/// Abandoned requests tolerated in a burst.
const BURST: u32 = 200;
/// Refill rate: one more tolerated abandoned request per this interval.
const REFILL: Duration = Duration::from_millis(10);

/// A token bucket of abandoned requests.
#[derive(Debug, Clone)]
pub struct ResetBudget {
    tokens: u32,
    last: Option<Instant>,
}

impl Default for ResetBudget {
    fn default() -> Self {
        ResetBudget {
            tokens: BURST,
            last: None,
        }
    }
}

impl ResetBudget {
    /// Spends one token for an abandoned request at `now`; false when the budget is exhausted.
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_millis() / REFILL.as_millis();
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            if earned > 0 {
                self.tokens = self.tokens.saturating_add(earned).min(BURST);
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget with its whole burst spent at `t0`.
    fn spent_budget(t0: Instant) -> ResetBudget {
        let mut budget = ResetBudget::default();
        for _ in 0..BURST {
            assert!(budget.allow(t0));
        }
        budget
    }

    #[test]
    fn a_burst_past_the_budget_is_refused() {
        let t0 = Instant::now();
        let mut budget = spent_budget(t0);
        assert!(!budget.allow(t0));
    }

    #[test]
    fn time_refills_the_budget_up_to_one_burst() {
        let t0 = Instant::now();
        let mut budget = spent_budget(t0);
        assert!(budget.allow(t0 + REFILL));
        assert!(!budget.allow(t0 + REFILL));
        let later = t0 + REFILL * (BURST * 10);
        for _ in 0..BURST {
            assert!(budget.allow(later));
        }
        assert!(!budget.allow(later));
    }
}
