//! Rate limits where traffic enters the callee: token buckets keyed by limit and verified caller
//! identity, pure (`now` is an argument), enforced by the callee's sidecar.
//!
//! Each limit of the service's Policy (`rateLimits[]`) that matches a request or flow must admit
//! it; one that does not refuses it, and no bucket is charged then (a refused request costs no
//! other limit a token). For a request, a limit counts:
//! - `total`: the whole service's rate, enforced as this endpoint's share of it (below);
//! - the caller's own bucket: the first `callers` entry that matches the caller, else
//!   `perCaller` — one bucket per identity, so one noisy caller cannot starve the others.
//!
//! For an L4 flow, `flows` counts new flows per second and open flows per identity. A limit whose
//! `to` names methods, paths or headers counts requests only.
//!
//! **Service-wide totals without a rate-limit server.** Every endpoint's sidecar knows the
//! service's live endpoints and their weights from the registry, so each enforces
//! `total × wᵢ / Σw` (burst likewise, at least 1), and re-divides when endpoints come and go.
//! Against one global counter the error is bounded:
//! - over-admission: at most the sum of the local bursts (≈ the total's burst, plus one per
//!   endpoint from rounding up) in any window, plus, while a change of endpoints propagates
//!   (milliseconds), the shares of both the old and the new set;
//! - under-admission: when callers send an endpoint more than its weight's share of the traffic
//!   while another gets less, the first refuses requests a global counter would have admitted:
//!   the admitted total is `Σ min(λᵢ, R·wᵢ/Σw)` against `min(Σλᵢ, R)`. The callers' balancing
//!   (weighted, least-request) keeps `λᵢ` close to the weights' shares; the sum of the
//!   differences bounds the error.
//!
//! Memory is bounded: a bucket that would be full again, or that nobody used for
//! [`IDLE_FORGET`], is forgotten (forgetting a full bucket changes nothing).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_registry::model::{Destination, Rate, RateLimit};

use super::policy::{source_matches, Peer, Target};

/// A bucket untouched this long is forgotten even if not full.
pub const IDLE_FORGET: Duration = Duration::from_secs(600);

/// Checks between two sweeps of idle buckets.
const SWEEP_EVERY: u32 = 1024;

/// What is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// An L7 request.
    Request,
    /// A new L4 flow.
    Flow,
}

/// Which bucket refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The service-wide total (this endpoint's share).
    Total,
    /// The caller's own request rate.
    Caller,
    /// The caller's new-flow rate.
    NewFlows,
    /// The caller's open flows.
    ConcurrentFlows,
}

impl Scope {
    /// The label value in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Total => "total",
            Scope::Caller => "caller",
            Scope::NewFlows => "new_flows",
            Scope::ConcurrentFlows => "concurrent_flows",
        }
    }
}

/// A refusal: which limit, which bucket, and when a token will be there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The limit's name.
    pub limit: String,
    /// The bucket that had no token.
    pub scope: Scope,
    /// Until the bucket holds a token again (zero for open flows: when one closes).
    pub retry_after: Duration,
}

impl Limited {
    /// The `retry-after` value (RFC 9110 §10.2.3): whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// One caller's open flows under one limit; the count goes down when the slot drops.
#[derive(Debug)]
pub struct FlowSlot(Arc<AtomicU32>);

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket (RFC 2697's committed rate and burst, counted in requests or flows).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Refills for the time passed; `Err` is the wait until one token is there.
    fn refill(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + passed * rate.per_second).min(f64::from(rate.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.per_second,
            ))
        }
    }

    fn full_by(&self, rate: Rate, now: Instant) -> bool {
        let passed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + passed * rate.per_second >= f64::from(rate.burst)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    limit: String,
    scope: Scope,
    /// The caller's identity; empty for the total.
    caller: String,
}

/// The buckets and open-flow counts of one sidecar.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<Key, (Bucket, Rate)>,
    open: HashMap<Key, Arc<AtomicU32>>,
    checks: u32,
}

/// What one check needs from one limit: buckets to charge, and an open-flow cap.
struct Need {
    key: Key,
    rate: Rate,
}

impl Limiter {
    /// Admits `unit` from `peer` to `target` under `limits`, with `share` (0 < share ≤ 1) this
    /// endpoint's part of service-wide totals. On admission, the slots that count the flow as
    /// open (hold them while it lasts).
    pub fn check(
        &mut self,
        limits: &[RateLimit],
        peer: Peer<'_>,
        target: Target<'_>,
        unit: Unit,
        share: f64,
        now: Instant,
    ) -> Result<Vec<FlowSlot>, Limited> {
        self.sweep(now);
        let mut needs = Vec::new();
        let mut caps = Vec::new();
        for limit in limits.iter().filter(|l| applies(l, target, unit)) {
            self.needs(limit, peer, unit, share, &mut needs, &mut caps);
        }
        // All or nothing: find a refusal before charging anything.
        let mut refusal: Option<Limited> = None;
        for need in &needs {
            let entry = self
                .buckets
                .entry(need.key.clone())
                .or_insert((Bucket::full(need.rate, now), need.rate));
            entry.1 = need.rate;
            if let Err(wait) = entry.0.refill(need.rate, now) {
                let later = refusal.as_ref().is_none_or(|r| wait > r.retry_after);
                if later {
                    refusal = Some(Limited {
                        limit: need.key.limit.clone(),
                        scope: need.key.scope,
                        retry_after: wait,
                    });
                }
            }
        }
        if refusal.is_none() {
            refusal = caps.iter().find_map(|(key, max)| {
                let open = self.open.get(key).map_or(0, |c| c.load(Ordering::Acquire));
                (open >= *max).then(|| Limited {
                    limit: key.limit.clone(),
                    scope: Scope::ConcurrentFlows,
                    retry_after: Duration::ZERO,
                })
            });
        }
        if let Some(r) = refusal {
            return Err(r);
        }
        for need in &needs {
            if let Some((bucket, _)) = self.buckets.get_mut(&need.key) {
                bucket.tokens -= 1.0;
            }
        }
        let slots = caps
            .into_iter()
            .map(|(key, _)| {
                let count = self.open.entry(key).or_default().clone();
                count.fetch_add(1, Ordering::AcqRel);
                FlowSlot(count)
            })
            .collect();
        Ok(slots)
    }

    fn needs(
        &self,
        limit: &RateLimit,
        peer: Peer<'_>,
        unit: Unit,
        share: f64,
        needs: &mut Vec<Need>,
        caps: &mut Vec<(Key, u32)>,
    ) {
        let key = |scope, caller: &str| Key {
            limit: limit.name.as_str().to_owned(),
            scope,
            caller: caller.to_owned(),
        };
        let caller = peer.id.as_str();
        match unit {
            Unit::Request => {
                if let Some(total) = limit.total {
                    let rate = share_of(total, share);
                    needs.push(Need {
                        key: key(Scope::Total, ""),
                        rate,
                    });
                }
                let own = limit
                    .callers
                    .iter()
                    .find(|c| source_matches(&c.from, peer))
                    .map(|c| c.rate)
                    .or(limit.per_caller);
                if let Some(rate) = own {
                    needs.push(Need {
                        key: key(Scope::Caller, caller),
                        rate,
                    });
                }
            }
            Unit::Flow => {
                let Some(flows) = limit.flows else { return };
                if let Some(rate) = flows.new {
                    needs.push(Need {
                        key: key(Scope::NewFlows, caller),
                        rate,
                    });
                }
                if let Some(max) = flows.concurrent {
                    caps.push((key(Scope::ConcurrentFlows, caller), max));
                }
            }
        }
    }

    /// Forgets full or long-idle buckets and unused open-flow counts, every
    /// [`SWEEP_EVERY`] checks.
    fn sweep(&mut self, now: Instant) {
        self.checks = self.checks.wrapping_add(1);
        if self.checks % SWEEP_EVERY != 0 {
            return;
        }
        self.buckets.retain(|_, (b, rate)| {
            !b.full_by(*rate, now) && now.saturating_duration_since(b.at) < IDLE_FORGET
        });
        self.open
            .retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
    }

    /// Buckets and open-flow counts held (for tests and the admin page).
    pub fn len(&self) -> usize {
        self.buckets.len() + self.open.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This endpoint's part of a service-wide rate: `share` of the rate and of the burst (at
/// least 1 token).
pub fn share_of(total: Rate, share: f64) -> Rate {
    let share = share.clamp(f64::MIN_POSITIVE, 1.0);
    Rate {
        per_second: total.per_second * share,
        burst: ((f64::from(total.burst) * share).ceil() as u32).max(1),
    }
}

/// This endpoint's share of service-wide totals: its weight over the live endpoints' total
/// weight (1 when it is not listed yet, or all weights are 0).
pub fn endpoint_share(own_weight: Option<u32>, weights: impl Iterator<Item = u32>) -> f64 {
    let sum: u64 = weights.map(u64::from).sum();
    match own_weight {
        Some(w) if sum > 0 && w > 0 => (f64::from(w) / sum as f64).min(1.0),
        _ => 1.0,
    }
}

/// Whether a limit counts this unit: its ports match, and a limit that names request
/// conditions (methods, paths, headers) counts only requests that meet them.
fn applies(limit: &RateLimit, target: Target<'_>, unit: Unit) -> bool {
    let Some(to) = &limit.to else {
        return true;
    };
    let ports_ok = to.ports.is_empty() || to.ports.contains(&target.port);
    ports_ok
        && match unit {
            Unit::Flow => !names_request_conditions(to),
            Unit::Request => request_conditions_hold(to, target),
        }
}

fn names_request_conditions(to: &Destination) -> bool {
    !(to.methods.is_empty() && to.paths.is_empty() && to.headers.is_empty())
}

fn request_conditions_hold(to: &Destination, target: Target<'_>) -> bool {
    let methods_ok = to.methods.is_empty()
        || target
            .method
            .is_some_and(|m| to.methods.iter().any(|x| x.eq_ignore_ascii_case(m)));
    let paths_ok = to.paths.is_empty()
        || target
            .path
            .is_some_and(|p| to.paths.iter().any(|x| x.matches(p)));
    let headers_ok = to.headers.is_empty()
        || target
            .headers
            .is_some_and(|h| to.headers.iter().all(|n| h.contains_key(n.as_str())));
    methods_ok && paths_ok && headers_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_certs::SpiffeId;
    use halyard_registry::model::{parse_documents, Object};

    fn limits(yaml: &str) -> Vec<RateLimit> {
        let doc = format!("kind: Policy\nservice: ratings\nrateLimits:\n{yaml}");
        match parse_documents("t.yaml", &doc).unwrap().remove(0) {
            Object::Policy(p) => p.rate_limits,
            other => panic!("{other:?}"),
        }
    }

    fn id(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://mesh.local/ns/default/sa/{name}")).unwrap()
    }

    fn get(path: &str) -> Target<'_> {
        Target {
            port: 9080,
            method: Some("GET"),
            path: Some(path),
            headers: None,
        }
    }

    /// Admitted requests among `n` sent `every` apart by `who`.
    fn admitted(
        lim: &mut Limiter,
        limits: &[RateLimit],
        who: &str,
        n: u32,
        every: Duration,
        t0: Instant,
    ) -> u32 {
        let caller = id(who);
        let services = [who];
        let peer = Peer {
            id: &caller,
            services: &services,
        };
        (0..n)
            .filter(|i| {
                let now = t0 + every * *i;
                lim.check(limits, peer, get("/api/x"), Unit::Request, 1.0, now)
                    .is_ok()
            })
            .count() as u32
    }

    #[test]
    fn a_caller_at_three_times_its_rate_gets_the_rate_plus_the_burst() {
        let l = limits("  - perCaller: { perSecond: 100, burst: 10 }\n");
        let mut lim = Limiter::default();
        // 300 rps for 5 s.
        let n = admitted(
            &mut lim,
            &l,
            "noisy",
            1500,
            Duration::from_micros(3333),
            Instant::now(),
        );
        assert!((505..=511).contains(&n), "{n}");
    }

    #[test]
    fn one_noisy_caller_does_not_starve_another() {
        let l = limits("  - perCaller: { perSecond: 100, burst: 10 }\n");
        let mut lim = Limiter::default();
        let t0 = Instant::now();
        admitted(&mut lim, &l, "noisy", 1500, Duration::from_micros(3333), t0);
        let quiet = admitted(&mut lim, &l, "quiet", 100, Duration::from_millis(50), t0);
        assert_eq!(quiet, 100);
    }

    #[test]
    fn a_named_caller_gets_its_own_rate() {
        let l = limits(
            "  - perCaller: { perSecond: 1, burst: 1 }\n    callers:\n      - { from: { services: [reviews] }, perSecond: 1000, burst: 100 }\n",
        );
        let mut lim = Limiter::default();
        let t0 = Instant::now();
        let every = Duration::from_millis(10);
        assert_eq!(admitted(&mut lim, &l, "reviews", 100, every, t0), 100);
        assert_eq!(admitted(&mut lim, &l, "details", 100, every, t0), 1);
    }

    #[test]
    fn the_total_is_shared_by_weight() {
        let total = Rate {
            per_second: 200.0,
            burst: 40,
        };
        let share = endpoint_share(Some(1), [1, 1, 1, 1].into_iter());
        assert_eq!(share, 0.25);
        let r = share_of(total, share);
        assert_eq!((r.per_second, r.burst), (50.0, 10));
        // Three left: each takes a third.
        let r = share_of(total, endpoint_share(Some(1), [1, 1, 1].into_iter()));
        assert!((r.per_second - 66.67).abs() < 0.01 && r.burst == 14);
        // Not listed yet: the whole.
        assert_eq!(endpoint_share(None, [1, 1].into_iter()), 1.0);
    }

    #[test]
    fn a_refusal_charges_no_other_bucket() {
        let l = limits(
            "  - name: wide\n    perCaller: { perSecond: 1000, burst: 1000 }\n  - name: narrow\n    total: { perSecond: 1, burst: 1 }\n",
        );
        let mut lim = Limiter::default();
        let now = Instant::now();
        let caller = id("a");
        let peer = Peer {
            id: &caller,
            services: &[],
        };
        assert!(lim
            .check(&l, peer, get("/"), Unit::Request, 1.0, now)
            .is_ok());
        for _ in 0..10 {
            let e = lim
                .check(&l, peer, get("/"), Unit::Request, 1.0, now)
                .unwrap_err();
            assert_eq!((e.limit.as_str(), e.scope), ("narrow", Scope::Total));
            assert_eq!(e.retry_after_secs(), 1);
        }
        let wide = Key {
            limit: "wide".into(),
            scope: Scope::Caller,
            caller: caller.as_str().into(),
        };
        assert_eq!(lim.buckets[&wide].0.tokens, 999.0);
    }

    #[test]
    fn request_conditions_choose_what_a_limit_counts() {
        let l = limits("  - to: { paths: [\"/api/*\"] }\n    total: { perSecond: 1, burst: 1 }\n");
        let mut lim = Limiter::default();
        let now = Instant::now();
        let caller = id("a");
        let peer = Peer {
            id: &caller,
            services: &[],
        };
        for _ in 0..5 {
            assert!(lim
                .check(&l, peer, get("/other"), Unit::Request, 1.0, now)
                .is_ok());
            assert!(lim
                .check(&l, peer, Target::port(9080), Unit::Flow, 1.0, now)
                .is_ok());
        }
        assert!(lim
            .check(&l, peer, get("/api/a"), Unit::Request, 1.0, now)
            .is_ok());
        assert!(lim
            .check(&l, peer, get("/api/a"), Unit::Request, 1.0, now)
            .is_err());
    }

    #[test]
    fn open_flows_are_capped_per_caller_until_one_closes() {
        let l = limits("  - flows: { concurrent: 2 }\n");
        let mut lim = Limiter::default();
        let now = Instant::now();
        let (a, b) = (id("a"), id("b"));
        let pa = Peer {
            id: &a,
            services: &[],
        };
        let pb = Peer {
            id: &b,
            services: &[],
        };
        let flow = Target::port(9080);
        let s1 = lim.check(&l, pa, flow, Unit::Flow, 1.0, now).unwrap();
        let _s2 = lim.check(&l, pa, flow, Unit::Flow, 1.0, now).unwrap();
        let e = lim.check(&l, pa, flow, Unit::Flow, 1.0, now).unwrap_err();
        assert_eq!(e.scope, Scope::ConcurrentFlows);
        assert!(lim.check(&l, pb, flow, Unit::Flow, 1.0, now).is_ok());
        drop(s1);
        assert!(lim.check(&l, pa, flow, Unit::Flow, 1.0, now).is_ok());
        // Requests are not flows.
        assert!(lim
            .check(&l, pa, get("/"), Unit::Request, 1.0, now)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn new_flows_per_second_are_limited_per_caller() {
        let l = limits("  - flows: { perSecond: 10, burst: 2 }\n");
        let mut lim = Limiter::default();
        let now = Instant::now();
        let a = id("a");
        let pa = Peer {
            id: &a,
            services: &[],
        };
        let flow = Target::port(9080);
        let ok = (0..5)
            .filter(|_| lim.check(&l, pa, flow, Unit::Flow, 1.0, now).is_ok())
            .count();
        assert_eq!(ok, 2);
        let later = now + Duration::from_millis(100);
        assert!(lim.check(&l, pa, flow, Unit::Flow, 1.0, later).is_ok());
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let l = limits("  - perCaller: { perSecond: 10, burst: 5 }\n");
        let mut lim = Limiter::default();
        let t0 = Instant::now();
        for i in 0..2000u32 {
            let caller = id(&format!("c{i}"));
            let peer = Peer {
                id: &caller,
                services: &[],
            };
            let _ = lim.check(&l, peer, get("/"), Unit::Request, 1.0, t0);
        }
        assert_eq!(lim.len(), 2000);
        // A second later every bucket is full again: the next sweep forgets them.
        let t1 = t0 + Duration::from_secs(1);
        let caller = id("late");
        let peer = Peer {
            id: &caller,
            services: &[],
        };
        for _ in 0..SWEEP_EVERY {
            let _ = lim.check(&l, peer, get("/"), Unit::Request, 1.0, t1);
        }
        assert!(lim.len() <= 1, "{}", lim.len());
    }
}
