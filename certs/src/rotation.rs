//! When to renew a leaf, and how long to wait after a failed renewal: pure functions of the
//! leaf's validity, the current time and a random sample, so they are tested without a clock.

use std::time::{Duration, SystemTime};

/// Longest wait between renewal attempts once the leaf has expired, seconds: 10.
pub const EXPIRED_RETRY_CAP: Duration = Duration::from_secs(10);

/// Renewal policy: renew at `ratio` of the lifetime, give or take `jitter` of the lifetime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// Share of the lifetime after which to renew (0.5 = half-life).
    pub ratio: f64,
    /// Spread of the renewal time, as a share of the lifetime, against CA stampedes.
    pub jitter: f64,
    /// First retry delay after a failed renewal.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            ratio: 0.5,
            jitter: 0.05,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(300),
        }
    }
}

impl RenewalPolicy {
    /// The moment to renew a leaf valid from `not_before` to `not_after`, given a uniform
    /// `sample` in [0, 1). Never before `not_before`, never after `not_after`.
    pub fn renew_at(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        sample: f64,
    ) -> SystemTime {
        let lifetime = not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let spread = (sample.clamp(0.0, 1.0) * 2.0 - 1.0) * self.jitter;
        let share = (self.ratio + spread).clamp(0.0, 1.0);
        not_before + Duration::from_secs_f64(lifetime * share)
    }

    /// How long to wait from `now` before renewing (zero when it is already time).
    pub fn wait(
        &self,
        now: SystemTime,
        not_before: SystemTime,
        not_after: SystemTime,
        sample: f64,
    ) -> Duration {
        self.renew_at(not_before, not_after, sample)
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// Delay before retry number `attempt` (0-based) after a failed renewal: exponential with
    /// full jitter, capped, and never past the leaf's expiry minus a small margin while any time
    /// is left. The old leaf stays in use meanwhile. Once it has expired the cap is
    /// [`EXPIRED_RETRY_CAP`]: soon enough to be back quickly when the CA is, slow enough that
    /// a refused re-enrollment (a spent token) does not hammer the CA.
    pub fn retry_delay(
        &self,
        attempt: u32,
        sample: f64,
        now: SystemTime,
        not_after: SystemTime,
    ) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.retry_cap);
        let jittered = exp.mul_f64(0.5 + sample.clamp(0.0, 1.0) / 2.0);
        match not_after.duration_since(now) {
            Ok(left) if left > Duration::from_secs(2) => jittered.min(left / 2),
            _ => jittered.min(EXPIRED_RETRY_CAP),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_at_half_life_within_jitter() {
        let p = RenewalPolicy::default();
        let (nb, na) = (t(1000), t(1000 + 86_400));
        assert_eq!(p.renew_at(nb, na, 0.5), t(1000 + 43_200));
        let early = p.renew_at(nb, na, 0.0);
        let late = p.renew_at(nb, na, 0.999_999);
        assert_eq!(early, t(1000 + 43_200 - 4_320));
        assert!(late > t(1000 + 43_200 + 4_310) && late <= t(1000 + 43_200 + 4_320));
        assert_eq!(p.wait(t(100_000), nb, na, 0.5), Duration::ZERO);
        assert_eq!(p.wait(t(1000), nb, na, 0.5), Duration::from_secs(43_200));
    }

    #[test]
    fn degenerate_validity_renews_at_start() {
        let p = RenewalPolicy::default();
        assert_eq!(p.renew_at(t(50), t(10), 0.3), t(50));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let p = RenewalPolicy::default();
        let far = t(1_000_000);
        assert_eq!(p.retry_delay(0, 1.0, t(0), far), Duration::from_secs(1));
        assert_eq!(p.retry_delay(3, 1.0, t(0), far), Duration::from_secs(8));
        assert_eq!(p.retry_delay(3, 0.0, t(0), far), Duration::from_secs(4));
        assert_eq!(p.retry_delay(40, 1.0, t(0), far), Duration::from_secs(300));
    }

    #[test]
    fn after_expiry_retries_back_off_to_a_short_cap() {
        let p = RenewalPolicy::default();
        let (now, expired) = (t(10), t(5));
        assert_eq!(p.retry_delay(0, 1.0, now, expired), Duration::from_secs(1));
        assert_eq!(p.retry_delay(2, 1.0, now, expired), Duration::from_secs(4));
        assert_eq!(p.retry_delay(40, 1.0, now, expired), EXPIRED_RETRY_CAP);
    }

    #[test]
    fn near_expiry_a_retry_comes_sooner_than_the_backoff() {
        let p = RenewalPolicy::default();
        // 100 s left: never wait more than half of it.
        assert_eq!(
            p.retry_delay(40, 1.0, t(0), t(100)),
            Duration::from_secs(50)
        );
        // Less than 2 s left: the expiry cap, not half of what is left.
        assert_eq!(p.retry_delay(0, 1.0, t(0), t(1)), Duration::from_secs(1));
    }
}
