//! Choosing where a new flow goes: the route rule, the weighted backend (label subset), then an
//! endpoint inside it. Pure functions over registry data and per-endpoint load figures; the
//! randomness comes in as arguments so tests are exact.
//!
//! Every attempt of a flow or request stays inside its [`Scope`]: the backend subset its rule
//! picked (once, for all attempts), unless the rule's `fallback: service` lets it leave.

use std::collections::HashMap;
use std::time::Duration;

use halyard_registry::model::{subset_matches, Backend, Endpoint, Fallback, Labels, RouteRule};

/// Where the attempts of one flow or request may go: the backend subset its route rule picked
/// (an empty subset is the whole service) and whether retries and failover may leave it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Label selector of the backend.
    pub subset: Labels,
    /// The rule's `fallback`.
    pub fallback: Fallback,
}

impl Scope {
    /// A scope that never leaves `subset` (no rule, or a mirror).
    pub fn within(subset: Labels) -> Self {
        Scope {
            subset,
            fallback: Fallback::Subset,
        }
    }

    /// Whether `e` is in the backend subset itself.
    fn holds(&self, e: &Endpoint) -> bool {
        subset_matches(&self.subset, &e.labels)
    }

    /// The endpoints an attempt may go to at all: the subset's, or with `fallback: service`
    /// every endpoint of the service.
    fn allows(&self, e: &Endpoint) -> bool {
        self.fallback == Fallback::Service || self.holds(e)
    }
}

/// The endpoints an attempt may go to, among `endpoints` of the service: those `scope` allows
/// that this flow or request has not `tried` yet while there is one; after that, all of those
/// again only when `revisit` (see `retry::RetryPolicy::revisit`), else none. So a retry inside
/// a subset of one endpoint goes to that endpoint again, or nowhere; never to another subset
/// unless the rule says `fallback: service`.
pub fn candidates<'e>(
    endpoints: &[&'e Endpoint],
    scope: &Scope,
    tried: &[String],
    revisit: bool,
) -> Vec<&'e Endpoint> {
    let allowed: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| scope.allows(e))
        .copied()
        .collect();
    let untried: Vec<&Endpoint> = allowed
        .iter()
        .filter(|e| !tried.contains(&e.id))
        .copied()
        .collect();
    if untried.is_empty() && revisit {
        allowed
    } else {
        untried
    }
}

/// Smooth weighted round-robin (as in nginx): over any window of `sum(weights)` picks, each
/// backend is chosen exactly in proportion to its weight, and picks are spread evenly.
#[derive(Debug, Default, Clone)]
pub struct WeightedPicker {
    current: Vec<i64>,
}

impl WeightedPicker {
    /// The index of the next backend, or `None` when every weight is zero.
    pub fn pick(&mut self, weights: &[u32]) -> Option<usize> {
        if self.current.len() != weights.len() {
            self.current = vec![0; weights.len()];
        }
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        if total == 0 {
            return None;
        }
        for (c, &w) in self.current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let (best, _) = self
            .current
            .iter()
            .enumerate()
            .max_by_key(|&(i, &c)| (c, std::cmp::Reverse(i)))?;
        self.current[best] -= total;
        Some(best)
    }
}

/// Per-rule pickers, keyed by (service, rule index), reset when the rule's backends change.
#[derive(Debug, Default)]
pub struct BackendPickers {
    pickers: HashMap<(String, usize), (Vec<Backend>, WeightedPicker)>,
}

impl BackendPickers {
    /// The next backend of `rule` (number `index` of `service`'s route).
    pub fn pick<'r>(
        &mut self,
        service: &str,
        index: usize,
        rule: &'r RouteRule,
    ) -> Option<&'r Backend> {
        let entry = self
            .pickers
            .entry((service.to_owned(), index))
            .or_insert_with(|| (rule.backends.clone(), WeightedPicker::default()));
        if entry.0 != rule.backends {
            *entry = (rule.backends.clone(), WeightedPicker::default());
        }
        let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        entry.1.pick(&weights).map(|i| &rule.backends[i])
    }

    /// Forgets the pickers of rules `keep` rejects (routes or rules gone from the registry).
    pub fn retain(&mut self, keep: impl Fn(&str, usize) -> bool) {
        self.pickers
            .retain(|(service, index), _| keep(service, *index));
    }
}

/// What the balancer knows of one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Flows in flight to it from this sidecar.
    pub outstanding: u32,
    /// Smoothed round-trip time to it, if measured.
    pub rtt: Option<Duration>,
    /// False while ejected by outlier detection.
    pub healthy: bool,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            outstanding: 0,
            rtt: None,
            healthy: true,
        }
    }
}

/// Where this sidecar runs, for locality preference.
#[derive(Debug, Clone, Default)]
pub struct Locality {
    /// Cluster name.
    pub cluster: String,
    /// Zone name.
    pub zone: String,
}

/// RTT assumed for an endpoint not yet measured: low, so new endpoints get tried.
const UNKNOWN_RTT: Duration = Duration::from_micros(500);
/// RTTs below this count as this in the cost: under a millisecond (loopback, one rack) the
/// differences are measurement noise, and letting them decide every tie would send most traffic
/// to whichever peer measured fastest (a skew that, among other things, leaves endpoints' shares
/// of a service-wide rate limit unused).
const RTT_FLOOR: Duration = Duration::from_millis(1);

/// Chooses an endpoint for an attempt inside `scope`, among `endpoints` (the candidates).
///
/// Candidates are the healthy endpoints of the subset. When none is healthy, a rule with
/// `fallback: service` fails over to the healthy endpoints of the whole service; otherwise, and
/// when the service has none either, panic mode (as Envoy's panic threshold) takes every
/// endpoint of the subset regardless of health, then (`fallback: service` only) of the service:
/// ejection alone never takes a subset down, and never sends it where the route did not. Among
/// candidates the closest locality tier wins (same cluster and zone, then same cluster, then
/// any), and inside it power of two choices on `(outstanding + 1) × RTT / weight` decides.
/// `samples` are two uniform random numbers.
pub fn choose<'e>(
    endpoints: &[&'e Endpoint],
    scope: &Scope,
    load: &dyn Fn(&Endpoint) -> Load,
    here: &Locality,
    samples: (u64, u64),
) -> Option<&'e Endpoint> {
    let healthy = |e: &&&Endpoint| e.weight > 0 && load(e).healthy;
    let in_subset = |e: &&&Endpoint| scope.holds(e);
    let allowed = |e: &&&Endpoint| scope.allows(e);
    let pick = |f: &dyn Fn(&&&Endpoint) -> bool| -> Vec<&'e Endpoint> {
        endpoints.iter().filter(|e| f(e)).copied().collect()
    };
    let tiers: [&dyn Fn(&&&Endpoint) -> bool; 4] = [
        &|e| in_subset(e) && healthy(e),
        &|e| allowed(e) && healthy(e),
        &|e| in_subset(e) && e.weight > 0,
        &|e| allowed(e) && e.weight > 0,
    ];
    let pool = tiers
        .iter()
        .map(|f| pick(*f))
        .find(|p| !p.is_empty())
        .unwrap_or_default();
    let tier = closest_tier(&pool, here);
    p2c(&tier, load, samples)
}

fn closest_tier<'e>(pool: &[&'e Endpoint], here: &Locality) -> Vec<&'e Endpoint> {
    let same_zone = |e: &&&Endpoint| e.cluster == here.cluster && e.zone == here.zone;
    let same_cluster = |e: &&&Endpoint| e.cluster == here.cluster;
    for tier in [
        pool.iter().filter(same_zone).copied().collect::<Vec<_>>(),
        pool.iter().filter(same_cluster).copied().collect(),
    ] {
        if !tier.is_empty() {
            return tier;
        }
    }
    pool.to_vec()
}

fn p2c<'e>(
    tier: &[&'e Endpoint],
    load: &dyn Fn(&Endpoint) -> Load,
    samples: (u64, u64),
) -> Option<&'e Endpoint> {
    let n = tier.len() as u64;
    match n {
        0 => None,
        1 => Some(tier[0]),
        _ => {
            let a = (samples.0 % n) as usize;
            // Second choice from the others, so the two are distinct.
            let b = ((a as u64 + 1 + samples.1 % (n - 1)) % n) as usize;
            let cost = |e: &Endpoint| {
                let l = load(e);
                let rtt = l.rtt.unwrap_or(UNKNOWN_RTT).max(RTT_FLOOR).as_nanos() as f64;
                (f64::from(l.outstanding) + 1.0) * rtt / f64::from(e.weight.max(1))
            };
            Some(if cost(tier[b]) < cost(tier[a]) {
                tier[b]
            } else {
                tier[a]
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_prefers_endpoints_not_tried() {
        let (a, b) = (ep("a", "v1", "", ""), ep("b", "v1", "", ""));
        let all = [&a, &b];
        let whole = Scope::default();
        assert_eq!(ids(&candidates(&all, &whole, &["a".into()], true)), ["b"]);
    }

    #[test]
    fn once_every_endpoint_was_tried_only_revisit_allows_another_attempt() {
        let (a, b) = (ep("a", "v1", "", ""), ep("b", "v1", "", ""));
        let all = [&a, &b];
        let tried = ["a".to_owned(), "b".to_owned()];
        let whole = Scope::default();
        assert_eq!(candidates(&all, &whole, &tried, true).len(), 2);
        assert!(candidates(&all, &whole, &tried, false).is_empty());
    }
    use halyard_registry::model::Name;

    fn ep(id: &str, version: &str, cluster: &str, zone: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            service: Name::new("reviews").unwrap(),
            address: "127.0.0.1:1".parse().unwrap(),
            identity: "spiffe://mesh.local/ns/default/sa/reviews".parse().unwrap(),
            labels: [("version".to_owned(), version.to_owned())].into(),
            cluster: cluster.into(),
            zone: zone.into(),
            weight: 1,
        }
    }

    fn labels(version: &str) -> Labels {
        [("version".to_owned(), version.to_owned())].into()
    }

    /// The endpoints of `version`, staying inside it.
    fn only(version: &str) -> Scope {
        Scope::within(labels(version))
    }

    /// The endpoints of `version`, and the service when they cannot serve.
    fn then_service(version: &str) -> Scope {
        Scope {
            subset: labels(version),
            fallback: Fallback::Service,
        }
    }

    fn ids(v: &[&Endpoint]) -> Vec<String> {
        v.iter().map(|e| e.id.clone()).collect()
    }

    fn here() -> Locality {
        Locality {
            cluster: "c".into(),
            zone: "z".into(),
        }
    }

    fn ejected(ids: &'static [&'static str]) -> impl Fn(&Endpoint) -> Load {
        move |e: &Endpoint| Load {
            healthy: !ids.contains(&e.id.as_str()),
            ..Load::default()
        }
    }

    #[test]
    fn a_retry_inside_a_subset_of_one_goes_to_the_same_endpoint_again() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let tried = ["a".to_owned()];
        assert_eq!(
            ids(&candidates(&[&a, &b], &only("v1"), &tried, true)),
            ["a"]
        );
    }

    #[test]
    fn a_retry_never_leaves_its_subset_by_default() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let tried = ["a".to_owned()];
        assert!(candidates(&[&a, &b], &only("v1"), &tried, false).is_empty());
    }

    #[test]
    fn a_retry_goes_to_the_untried_endpoints_of_its_subset_first() {
        let (a1, a2) = (ep("a1", "v1", "c", "z"), ep("a2", "v1", "c", "z"));
        let b = ep("b", "v2", "c", "z");
        let all = [&a1, &b, &a2];
        let tried = ["a1".to_owned()];
        assert_eq!(ids(&candidates(&all, &only("v1"), &tried, true)), ["a2"]);
        let pool = candidates(&all, &then_service("v1"), &tried, true);
        let got = choose(
            &pool,
            &then_service("v1"),
            &|_| Load::default(),
            &here(),
            (0, 0),
        );
        assert_eq!(got.unwrap().id, "a2");
    }

    #[test]
    fn with_fallback_service_a_retry_may_leave_the_subset() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let tried = ["a".to_owned()];
        let pool = candidates(&[&a, &b], &then_service("v1"), &tried, true);
        assert_eq!(ids(&pool), ["b"]);
        let got = choose(
            &pool,
            &then_service("v1"),
            &|_| Load::default(),
            &here(),
            (0, 0),
        );
        assert_eq!(got.unwrap().id, "b");
    }

    #[test]
    fn a_fully_ejected_subset_is_served_in_panic_mode_inside_it() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let pool = candidates(&[&a, &b], &only("v1"), &[], true);
        let got = choose(&pool, &only("v1"), &ejected(&["a"]), &here(), (0, 0));
        assert_eq!(got.unwrap().id, "a");
        // Even when the candidates handed in hold other endpoints.
        let got = choose(&[&a, &b], &only("v1"), &ejected(&["a"]), &here(), (0, 0));
        assert_eq!(got.unwrap().id, "a");
    }

    #[test]
    fn with_fallback_service_a_fully_ejected_subset_fails_over_to_the_service() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let scope = then_service("v1");
        let pool = candidates(&[&a, &b], &scope, &[], true);
        let got = choose(&pool, &scope, &ejected(&["a"]), &here(), (0, 0));
        assert_eq!(got.unwrap().id, "b");
        // Nothing healthy anywhere: panic mode prefers the subset.
        let got = choose(&pool, &scope, &ejected(&["a", "b"]), &here(), (0, 0));
        assert_eq!(got.unwrap().id, "a");
    }

    #[test]
    fn a_subset_without_endpoints_gets_nothing_by_default() {
        let b = ep("b", "v2", "c", "z");
        assert!(candidates(&[&b], &only("v1"), &[], true).is_empty());
        assert!(choose(&[&b], &only("v1"), &|_| Load::default(), &here(), (0, 0)).is_none());
    }

    #[test]
    fn with_fallback_service_a_subset_without_endpoints_uses_the_service() {
        let b = ep("b", "v2", "c", "z");
        let scope = then_service("v1");
        let pool = candidates(&[&b], &scope, &[], true);
        let got = choose(&pool, &scope, &|_| Load::default(), &here(), (0, 0));
        assert_eq!(got.unwrap().id, "b");
    }

    /// Ten picks from a fresh picker over weights 80 and 20: the picker and its picks.
    fn ten_picks_of_80_20() -> (WeightedPicker, Vec<usize>) {
        let mut p = WeightedPicker::default();
        let picks = (0..10).map(|_| p.pick(&[80, 20]).unwrap()).collect();
        (p, picks)
    }

    #[test]
    fn smooth_weighted_round_robin_is_exact() {
        let (mut p, picks) = ten_picks_of_80_20();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 8);
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[p.pick(&[5, 0, 3]).unwrap()] += 1;
        }
        assert_eq!(counts, [1250, 0, 750]);
        assert_eq!(WeightedPicker::default().pick(&[0, 0]), None);
    }

    #[test]
    fn smooth_weighted_round_robin_spreads_the_picks() {
        let (_, picks) = ten_picks_of_80_20();
        // The light backend is not picked twice in a row.
        assert!(picks.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)));
    }

    #[test]
    fn a_subset_is_chosen_over_the_rest_of_the_service() {
        let (a, b) = (ep("a", "v1", "c", "z"), ep("b", "v2", "c", "z"));
        let got = choose(
            &[&a, &b],
            &only("v2"),
            &|_| Load::default(),
            &here(),
            (0, 0),
        );
        assert_eq!(got.unwrap().id, "b");
    }

    #[test]
    fn locality_then_least_loaded_of_two() {
        let near = ep("near", "v1", "c", "z");
        let far = ep("far", "v1", "other", "z");
        let here = Locality {
            cluster: "c".into(),
            zone: "z".into(),
        };
        let any = Scope::default();
        for s in 0..10 {
            let got = choose(
                &[&far, &near],
                &any,
                &|_| Load::default(),
                &here,
                (s, s + 3),
            );
            assert_eq!(got.unwrap().id, "near");
        }
        let (busy, idle) = (ep("busy", "v1", "c", "z"), ep("idle", "v1", "c", "z"));
        let load = |e: &Endpoint| Load {
            outstanding: if e.id == "busy" { 10 } else { 0 },
            ..Load::default()
        };
        for s in 0..10 {
            let got = choose(&[&busy, &idle], &any, &load, &here, (s, s * 7));
            assert_eq!(got.unwrap().id, "idle");
        }
        let slow = |e: &Endpoint| Load {
            rtt: Some(Duration::from_millis(if e.id == "busy" { 50 } else { 1 })),
            ..Load::default()
        };
        assert_eq!(
            choose(&[&busy, &idle], &any, &slow, &here, (0, 0))
                .unwrap()
                .id,
            "idle"
        );
    }
}
