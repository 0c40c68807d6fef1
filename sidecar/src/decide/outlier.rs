//! Passive outlier detection: endpoints that fail in a row are ejected for a growing interval,
//! with a cap on the share of a service ejected at once. Pure state; `now` is an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint (a failed connect counts as this many).
    pub consecutive_failures: u32,
    /// First ejection time; each later ejection of the same endpoint doubles it.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection time.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Largest share of a service's endpoints ejected at once, in percent.
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// The longest ejection whatever the config says (a year): far beyond any useful one.
const MAX_EJECTION: Duration = Duration::from_secs(365 * 24 * 3600);

/// How bad a failure was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint could not be reached at all (connect refused or timed out): ejects at once.
    Connect,
    /// The endpoint answered with an error (reset, 5xx): counts towards the threshold.
    Error,
}

#[derive(Debug, Default, Clone)]
struct EndpointState {
    consecutive: u32,
    times_ejected: u32,
    ejected_until: Option<Instant>,
}

/// Outlier state of one service's endpoints, keyed by endpoint id.
#[derive(Debug, Default)]
pub struct Outliers {
    endpoints: HashMap<String, EndpointState>,
}

impl Outliers {
    /// Whether `id` is ejected at `now`.
    pub fn is_ejected(&self, id: &str, now: Instant) -> bool {
        self.endpoints
            .get(id)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Records a success: the failure streak ends.
    pub fn success(&mut self, id: &str) {
        if let Some(s) = self.endpoints.get_mut(id) {
            s.consecutive = 0;
        }
    }

    /// Records a failure; returns true when it ejects the endpoint. `total` is how many
    /// endpoints the service has now, for the ejection cap.
    pub fn failure(
        &mut self,
        cfg: &OutlierConfig,
        id: &str,
        kind: Failure,
        total: usize,
        now: Instant,
    ) -> bool {
        let ejected_now = self.ejected_count(now);
        let state = self.endpoints.entry(id.to_owned()).or_default();
        state.consecutive = match kind {
            Failure::Connect => cfg.consecutive_failures.max(1),
            Failure::Error => state.consecutive.saturating_add(1),
        };
        let already = state.ejected_until.is_some_and(|u| now < u);
        let cap = total * usize::from(cfg.max_ejected_percent.min(100)) / 100;
        if already
            || state.consecutive < cfg.consecutive_failures.max(1)
            || ejected_now >= cap.max(1)
        {
            return false;
        }
        let factor = 1u32
            .checked_shl(state.times_ejected.min(16))
            .unwrap_or(u32::MAX);
        let interval = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection)
            // `max_ejection` comes from the config: an absurd one must not overflow `Instant`.
            .min(MAX_EJECTION);
        state.ejected_until = Some(now + interval);
        state.times_ejected = state.times_ejected.saturating_add(1);
        state.consecutive = 0;
        true
    }

    /// The ids of the endpoints ejected at `now`.
    pub fn ejected(&self, now: Instant) -> impl Iterator<Item = &str> + '_ {
        self.endpoints
            .iter()
            .filter(move |(_, s)| s.ejected_until.is_some_and(|u| now < u))
            .map(|(id, _)| id.as_str())
    }

    /// How many endpoints are ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.endpoints
            .values()
            .filter(|s| s.ejected_until.is_some_and(|u| now < u))
            .count()
    }

    /// Forgets endpoints that left the registry.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.endpoints.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_failure_ejects_at_once() {
        let cfg = OutlierConfig::default();
        let mut o = Outliers::default();
        let t0 = Instant::now();
        assert!(o.failure(&cfg, "a", Failure::Connect, 4, t0));
        assert!(o.is_ejected("a", t0 + Duration::from_secs(4)));
        assert!(!o.is_ejected("a", t0 + Duration::from_secs(5)));
    }

    #[test]
    fn each_ejection_of_an_endpoint_lasts_longer() {
        let cfg = OutlierConfig::default();
        let mut o = Outliers::default();
        let t0 = Instant::now();
        assert!(o.failure(&cfg, "a", Failure::Connect, 4, t0));
        assert!(!o.is_ejected("a", t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(6);
        assert!(o.failure(&cfg, "a", Failure::Connect, 4, t1));
        assert!(o.is_ejected("a", t1 + Duration::from_secs(9)));
        assert!(!o.is_ejected("a", t1 + Duration::from_secs(10)));
    }

    #[test]
    fn errors_eject_at_the_threshold() {
        let cfg = OutlierConfig::default();
        let mut o = Outliers::default();
        let t = Instant::now();
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(o.is_ejected("a", t));
    }

    #[test]
    fn a_success_resets_the_error_count() {
        let cfg = OutlierConfig::default();
        let mut o = Outliers::default();
        let t = Instant::now();
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        o.success("a");
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(!o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(o.failure(&cfg, "a", Failure::Error, 4, t));
        assert!(o.is_ejected("a", t));
    }

    #[test]
    fn an_absurd_configured_ejection_does_not_overflow_the_clock() {
        let cfg = OutlierConfig {
            base_ejection: Duration::MAX,
            max_ejection: Duration::MAX,
            ..OutlierConfig::default()
        };
        let mut o = Outliers::default();
        let t = Instant::now();
        assert!(o.failure(&cfg, "a", Failure::Connect, 1, t));
        assert!(o.is_ejected("a", t + Duration::from_secs(3600)));
    }

    #[test]
    fn ejection_cap_keeps_part_of_the_service() {
        let cfg = OutlierConfig::default();
        let mut o = Outliers::default();
        let t = Instant::now();
        assert!(o.failure(&cfg, "a", Failure::Connect, 4, t));
        assert!(o.failure(&cfg, "b", Failure::Connect, 4, t));
        assert!(!o.failure(&cfg, "c", Failure::Connect, 4, t), "50% cap");
        assert_eq!(o.ejected_count(t), 2);
        // With a single endpoint, one ejection is still allowed: failover handles the rest.
        let mut single = Outliers::default();
        assert!(single.failure(&cfg, "x", Failure::Connect, 1, t));
    }
}
