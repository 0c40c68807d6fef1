//! Circuit breakers at the caller's sidecar (Envoy's `circuit_breakers.thresholds`): per
//! destination service, counts of what is in flight, each against a threshold of the Service's
//! `circuitBreaker`. Past a threshold the request or flow fails fast (503, flag `UO`) instead of
//! queueing behind the others; the endpoints are not charged (an overflow says this caller sends
//! too much, not that an endpoint is unhealthy), so no endpoint is ever ejected for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use halyard_registry::model::CircuitBreaker;

/// One threshold of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Threshold {
    /// L7 requests in flight (`maxConcurrentRequests`).
    Requests,
    /// Requests and flows waiting for a connection or a stream (`maxPendingRequests`).
    Pending,
    /// L4 flows open (`maxConcurrentFlows`).
    Flows,
    /// Retries in flight (`maxRetriesInFlight`).
    Retries,
}

impl Threshold {
    /// The label value in metrics and the overflow header.
    pub fn as_str(self) -> &'static str {
        match self {
            Threshold::Requests => "max_concurrent_requests",
            Threshold::Pending => "max_pending_requests",
            Threshold::Flows => "max_concurrent_flows",
            Threshold::Retries => "max_retries_in_flight",
        }
    }

    /// The threshold's value in `cb`, if set.
    pub fn max(self, cb: &CircuitBreaker) -> Option<u32> {
        match self {
            Threshold::Requests => cb.max_concurrent_requests,
            Threshold::Pending => cb.max_pending_requests,
            Threshold::Flows => cb.max_concurrent_flows,
            Threshold::Retries => cb.max_retries_in_flight,
        }
    }
}

/// One unit in flight under a threshold; dropping it frees the place.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The counts of one sidecar, per destination service and threshold.
#[derive(Debug, Default)]
pub struct Breakers {
    counts: Mutex<HashMap<(String, Threshold), Arc<AtomicU32>>>,
}

impl Breakers {
    /// Takes a place under `threshold` for `service`: `Ok(None)` when the service sets no such
    /// threshold, `Ok(Some(slot))` while below it, `Err(threshold)` when it is full.
    pub fn take(
        &self,
        service: &str,
        cb: Option<&CircuitBreaker>,
        threshold: Threshold,
    ) -> Result<Option<Slot>, Threshold> {
        let Some(max) = cb.and_then(|cb| threshold.max(cb)) else {
            return Ok(None);
        };
        let count = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            counts
                .entry((service.to_owned(), threshold))
                .or_default()
                .clone()
        };
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Some(Slot(count)))
            .map_err(|_| threshold)
    }

    /// What is in flight under `threshold` for `service`.
    pub fn in_flight(&self, service: &str, threshold: Threshold) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .get(&(service.to_owned(), threshold))
            .map_or(0, |c| c.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_threshold_refuses_until_a_place_frees() {
        let b = Breakers::default();
        let cb = CircuitBreaker {
            max_concurrent_requests: Some(2),
            ..CircuitBreaker::default()
        };
        let one = b.take("reviews", Some(&cb), Threshold::Requests).unwrap();
        let _two = b.take("reviews", Some(&cb), Threshold::Requests).unwrap();
        assert_eq!(
            b.take("reviews", Some(&cb), Threshold::Requests)
                .unwrap_err(),
            Threshold::Requests
        );
        // Another service, another threshold: their own counts.
        assert!(b.take("ratings", Some(&cb), Threshold::Requests).is_ok());
        assert!(b
            .take("reviews", Some(&cb), Threshold::Flows)
            .unwrap()
            .is_none());
        drop(one);
        assert_eq!(b.in_flight("reviews", Threshold::Requests), 1);
        assert!(b.take("reviews", Some(&cb), Threshold::Requests).is_ok());
    }

    #[test]
    fn no_breaker_means_no_limit() {
        let b = Breakers::default();
        for _ in 0..1000 {
            assert!(b.take("x", None, Threshold::Requests).unwrap().is_none());
        }
    }
}
