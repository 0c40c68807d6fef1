//! Choosing where a new flow goes: the route rule, the weighted backend (label subset), then an
//! endpoint inside it. Pure functions over registry data and per-endpoint load figures; the
//! randomness comes in as arguments so tests are exact.
//!
//! Every attempt of a flow or request stays inside its [`Scope`]: the backend subset its rule
//! picked (once, for all attempts), unless the rule's `fallback: service` lets it leave.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{subset_matches, Backend, Endpoint, Fallback, Labels, RouteRule};
use halyard_registry::Snapshot;

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
///
/// Linear in the endpoints: the data path uses [`ServiceEndpoints::choose`], which applies the
/// same rules over an index built per snapshot; this function and [`choose`] are its reference.
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
    /// For the service being chosen from: the clusters to fail over to, in order, once this
    /// cluster has no candidate (its Route's `failover`, else its Service's); clusters not
    /// listed come after.
    pub failover: Vec<String>,
}

impl Locality {
    /// This locality as seen for the service `name` of `snap`: the failover order of its Route
    /// when that names one, else of its Service.
    pub fn for_service(&self, snap: &halyard_registry::Snapshot, name: &str) -> Locality {
        let route = snap.route(name).map(|r| &r.failover);
        let failover = match route {
            Some(order) if !order.is_empty() => order.clone(),
            _ => snap
                .service(name)
                .map(|s| s.failover.clone())
                .unwrap_or_default(),
        };
        Locality {
            failover,
            ..self.clone()
        }
    }
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
///
/// Linear in the endpoints (every one is filtered and its load read): the reference for
/// [`ServiceEndpoints::choose`], which the data path uses.
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
    let local = [
        pool.iter().filter(same_zone).copied().collect::<Vec<_>>(),
        pool.iter().filter(same_cluster).copied().collect(),
    ];
    let failover = here
        .failover
        .iter()
        .map(|c| pool.iter().filter(|e| &e.cluster == c).copied().collect());
    for tier in local.into_iter().chain(failover) {
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
            let cost = |e: &Endpoint| cost(load(e), e.weight);
            Some(if cost(tier[b]) < cost(tier[a]) {
                tier[b]
            } else {
                tier[a]
            })
        }
    }
}

/// The P2C cost of an endpoint: `(outstanding + 1) × RTT / weight`, the RTT floored at
/// [`RTT_FLOOR`] and [`UNKNOWN_RTT`] while unmeasured, in nanoseconds per unit of weight.
fn cost(l: Load, weight: u32) -> f64 {
    let rtt = l.rtt.unwrap_or(UNKNOWN_RTT).max(RTT_FLOOR).as_nanos() as f64;
    (f64::from(l.outstanding) + 1.0) * rtt / f64::from(weight.max(1))
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PickError {
    /// The service has no endpoint left to try inside the scope.
    NoEndpoint,
    /// Every endpoint left is ejected or has weight 0.
    NoHealthy,
}

/// The endpoints of one snapshot, indexed once so that choosing one costs the same at 10 or
/// 10,000 endpoints: per service, its endpoints in registry (id) order and, per label subset
/// its route names (backends and mirrors, plus the empty subset: the whole service), the
/// positions of the subset's endpoints of weight above 0 by locality tier. Built when a
/// snapshot arrives ([`EndpointIndex::build`]), read by every pick
/// ([`ServiceEndpoints::choose`]); it chooses exactly what [`candidates`] then [`choose`] choose
/// over the same snapshot, load, ejections and samples (the test `indexed_choice_is_the_linear_one`
/// holds it to that).
#[derive(Debug, Default)]
pub struct EndpointIndex {
    services: HashMap<String, ServiceEndpoints>,
}

/// One service's endpoints, indexed (see [`EndpointIndex`]).
#[derive(Debug)]
pub struct ServiceEndpoints {
    /// In registry order: by id.
    endpoints: Vec<Arc<Endpoint>>,
    /// Positions into `endpoints` by endpoint id (for `tried` and ejected ids).
    by_id: HashMap<String, u32>,
    /// Per label subset the route names, its members; the empty subset is always there.
    subsets: HashMap<Labels, Members>,
    /// Where this sidecar runs.
    here: Locality,
}

/// The endpoints of one label subset of a service.
#[derive(Debug, Clone, Default)]
struct Members {
    /// How many endpoints the subset holds, weight 0 included.
    count: usize,
    /// Positions (ascending) of the subset's endpoints of weight above 0: in this sidecar's
    /// cluster and zone, in its cluster (any zone), in each cluster of the failover order,
    /// anywhere.
    tiers: Vec<Vec<u32>>,
}

impl Members {
    fn of(endpoints: &[Arc<Endpoint>], subset: &Labels, here: &Locality) -> Self {
        let mut m = Members {
            count: 0,
            tiers: vec![Vec::new(); 3 + here.failover.len()],
        };
        let last = m.tiers.len() - 1;
        for (i, e) in endpoints.iter().enumerate() {
            if !subset_matches(subset, &e.labels) {
                continue;
            }
            m.count += 1;
            if e.weight == 0 {
                continue;
            }
            let pos = i as u32;
            if e.cluster == here.cluster {
                if e.zone == here.zone {
                    m.tiers[0].push(pos);
                }
                m.tiers[1].push(pos);
            } else if let Some(k) = here.failover.iter().position(|c| *c == e.cluster) {
                m.tiers[2 + k].push(pos);
            }
            m.tiers[last].push(pos);
        }
        m
    }
}

/// A list of positions less some of them: the `k`-th one left, without building the list.
struct Remaining<'a> {
    list: &'a [u32],
    /// Indexes into `list` of the positions taken out, ascending.
    out: Vec<usize>,
}

impl<'a> Remaining<'a> {
    /// `list` less `excluded` (both ascending).
    fn new(list: &'a [u32], excluded: &[u32]) -> Self {
        let out = excluded
            .iter()
            .filter_map(|p| list.binary_search(p).ok())
            .collect();
        Remaining { list, out }
    }

    fn len(&self) -> usize {
        self.list.len() - self.out.len()
    }

    /// The `k`-th position left (`k < len()`).
    fn nth(&self, k: usize) -> u32 {
        let mut i = k;
        for &o in &self.out {
            if o > i {
                break;
            }
            i += 1;
        }
        self.list[i]
    }
}

impl EndpointIndex {
    /// Indexes the endpoints of `snap` for a sidecar at `here`: for each service, its whole
    /// endpoint set and each label subset its route's backends and mirrors name. Linear in
    /// endpoints × subsets per service.
    pub fn build(snap: &Snapshot, here: &Locality) -> Self {
        let services = snap
            .endpoints
            .iter()
            .map(|(service, eps)| {
                let endpoints: Vec<Arc<Endpoint>> = eps.values().cloned().collect();
                let here = here.for_service(snap, service);
                let by_id = (endpoints.iter().enumerate())
                    .map(|(i, e)| (e.id.clone(), i as u32))
                    .collect();
                let mut subsets = HashMap::new();
                let named = snap.route(service).into_iter().flat_map(|r| {
                    r.rules.iter().flat_map(|rule| {
                        (rule.backends.iter().map(|b| &b.subset))
                            .chain(rule.mirror.iter().map(|m| &m.subset))
                    })
                });
                for subset in std::iter::once(&Labels::new()).chain(named) {
                    if !subsets.contains_key(subset) {
                        let members = Members::of(&endpoints, subset, &here);
                        subsets.insert(subset.clone(), members);
                    }
                }
                let indexed = ServiceEndpoints {
                    endpoints,
                    by_id,
                    subsets,
                    here,
                };
                (service.clone(), indexed)
            })
            .collect();
        EndpointIndex { services }
    }

    /// The indexed endpoints of `service`, if it has any.
    pub fn service(&self, service: &str) -> Option<&ServiceEndpoints> {
        self.services.get(service)
    }
}

impl ServiceEndpoints {
    /// The members of `subset`: indexed, or (a subset no route of this snapshot names, as a
    /// retry under a route that changed meanwhile) gathered now.
    fn members(&self, subset: &Labels) -> Cow<'_, Members> {
        match self.subsets.get(subset) {
            Some(m) => Cow::Borrowed(m),
            None => Cow::Owned(Members::of(&self.endpoints, subset, &self.here)),
        }
    }

    /// The positions of the endpoints called `ids` (unknown ids left out), ascending, once each.
    fn positions<'i>(&self, ids: impl IntoIterator<Item = &'i str>) -> Vec<u32> {
        let mut out: Vec<u32> = ids
            .into_iter()
            .filter_map(|id| self.by_id.get(id).copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The tried endpoints an attempt inside `scope` (whose endpoints are `allowed`) must skip
    /// (positions, ascending), or `None` when it has no candidate at all (as [`candidates`]
    /// returning none).
    fn skipped(
        &self,
        allowed: &Members,
        scope: &Scope,
        tried: &[String],
        revisit: bool,
    ) -> Option<Vec<u32>> {
        let allowed = allowed.count;
        let tried = self.positions(tried.iter().map(String::as_str));
        let tried_allowed = tried
            .iter()
            .filter(|&&p| scope.allows(&self.endpoints[p as usize]))
            .count();
        match (allowed - tried_allowed, revisit) {
            _ if allowed == 0 => None,
            (0, true) => Some(Vec::new()),
            (0, false) => None,
            _ => Some(tried),
        }
    }

    /// Whether an attempt inside `scope` that has `tried` these endpoints has any candidate
    /// left (as `!candidates(..).is_empty()`, see [`candidates`]).
    pub fn has_candidate(&self, scope: &Scope, tried: &[String], revisit: bool) -> bool {
        let allowed = self.allowed(scope);
        self.skipped(&allowed, scope, tried, revisit).is_some()
    }

    /// The endpoints attempts inside `scope` may go to: the subset's, or with
    /// `fallback: service` the service's.
    fn allowed(&self, scope: &Scope) -> Cow<'_, Members> {
        match scope.fallback {
            Fallback::Service => self.members(&Labels::new()),
            Fallback::Subset => self.members(&scope.subset),
        }
    }

    /// Chooses an endpoint for an attempt inside `scope` that has `tried` these endpoint ids,
    /// by the rules of [`candidates`] then [`choose`]: the same endpoint for the same inputs.
    /// `ejected` are the ids of the endpoints outlier detection ejects now (ids not in the
    /// service are ignored); `load` gives the outstanding count and RTT of the two endpoints
    /// power of two choices compares (its `healthy` is not read: `ejected` says that).
    /// `samples` are two uniform random numbers. Costs O((tried + ejected) × log n) plus two
    /// `load` calls, with n the service's endpoints.
    ///
    /// # Errors
    /// [`PickError::NoEndpoint`] when no endpoint is left to try inside the scope,
    /// [`PickError::NoHealthy`] when every one left has weight 0.
    pub fn choose<'s>(
        &'s self,
        attempt: (&Scope, &[String], bool),
        ejected: &[&str],
        load: &dyn Fn(&Endpoint) -> Load,
        samples: (u64, u64),
    ) -> Result<&'s Arc<Endpoint>, PickError> {
        let (scope, tried, revisit) = attempt;
        let subset = self.members(&scope.subset);
        let allowed = match scope.fallback {
            Fallback::Service => self.members(&Labels::new()),
            Fallback::Subset => Cow::Borrowed(subset.as_ref()),
        };
        let skipped = self
            .skipped(&allowed, scope, tried, revisit)
            .ok_or(PickError::NoEndpoint)?;
        let mut unhealthy = self.positions(ejected.iter().copied());
        unhealthy.extend_from_slice(&skipped);
        unhealthy.sort_unstable();
        unhealthy.dedup();
        let pools = [
            (&subset, &unhealthy),
            (&allowed, &unhealthy),
            (&subset, &skipped),
            (&allowed, &skipped),
        ];
        for (members, excluded) in pools {
            for tier in &members.tiers {
                let left = Remaining::new(tier, excluded);
                if left.len() > 0 {
                    return Ok(self.p2c(&left, load, samples));
                }
            }
        }
        Err(PickError::NoHealthy)
    }

    /// Power of two choices among the positions `left` (at least one), as [`p2c`].
    fn p2c(
        &self,
        left: &Remaining<'_>,
        load: &dyn Fn(&Endpoint) -> Load,
        samples: (u64, u64),
    ) -> &Arc<Endpoint> {
        let at = |k: usize| &self.endpoints[left.nth(k) as usize];
        let n = left.len() as u64;
        if n == 1 {
            return at(0);
        }
        let a = (samples.0 % n) as usize;
        let b = ((a as u64 + 1 + samples.1 % (n - 1)) % n) as usize;
        let (ea, eb) = (at(a), at(b));
        if cost(load(eb), eb.weight) < cost(load(ea), ea.weight) {
            eb
        } else {
            ea
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
            gateway: None,
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
            failover: Vec::new(),
        }
    }

    #[test]
    fn a_routes_failover_order_replaces_its_services() {
        let objects = |yaml: &str| {
            Snapshot::of_objects(
                halyard_registry::Origin::Live,
                halyard_registry::model::parse_documents("test", yaml).unwrap(),
            )
        };
        let service =
            "kind: Service\nname: svc\nfailover: [b, x]\nports: [{ port: 80, protocol: tcp }]\n";
        let route = |order: &str| {
            format!("---\nkind: Route\nservice: svc\nfailover: {order}\nrules: [{{ backends: [{{ weight: 1 }}] }}]\n")
        };
        let order = |snap: &Snapshot| here().for_service(snap, "svc").failover;
        assert_eq!(order(&objects(service)), ["b", "x"]);
        assert_eq!(
            order(&objects(&(service.to_owned() + &route("[x, c2]")))),
            ["x", "c2"]
        );
        // An empty order on the route leaves the Service's in force.
        assert_eq!(
            order(&objects(&(service.to_owned() + &route("[]")))),
            ["b", "x"]
        );
        let only_route = route("[c2]");
        assert_eq!(order(&objects(&only_route[4..])), ["c2"]);
        assert!(order(&objects(
            "kind: Service\nname: other\nports: [{ port: 80, protocol: tcp }]\n"
        ))
        .is_empty());
    }

    #[test]
    fn the_failover_order_is_followed_once_the_own_cluster_has_no_candidate() {
        let (local, b, x, c2) = (
            ep("local", "v1", "c", "z"),
            ep("in-b", "v1", "b", "b1"),
            ep("in-x", "v1", "x", "x1"),
            ep("in-c2", "v1", "c2", "q"),
        );
        let pool = [&local, &b, &x, &c2];
        let scope = only("v1");
        let mut here = here();
        here.failover = vec!["c2".into(), "b".into()];
        let pick = |dead: &'static [&'static str]| {
            choose(&pool, &scope, &ejected(dead), &here, (3, 9)).map(|e| e.id.clone())
        };
        assert_eq!(pick(&[]).as_deref(), Some("local"));
        assert_eq!(pick(&["local"]).as_deref(), Some("in-c2"));
        assert_eq!(pick(&["local", "in-c2"]).as_deref(), Some("in-b"));
        assert_eq!(pick(&["local", "in-c2", "in-b"]).as_deref(), Some("in-x"));
        // Without an order, every other cluster is one tier.
        here.failover.clear();
        let others: std::collections::BTreeSet<_> = (0..64)
            .filter_map(|s| choose(&pool, &scope, &ejected(&["local"]), &here, (s, s * 7 + 1)))
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(others.len(), 3, "{others:?}");
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
            failover: Vec::new(),
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

/// The indexed choice against the linear one (`candidates` then `choose`, kept as the
/// reference): many generated snapshots, routes, scopes, tried lists, ejections, loads and
/// samples, the same answer every time.
#[cfg(test)]
mod indexed {
    use std::collections::{BTreeMap, HashMap};

    use halyard_registry::model::{parse_documents, Name, Object, Route};
    use halyard_registry::Origin;

    use super::*;

    /// SplitMix64: a seeded stream, so a failing case is found again by its number.
    struct Dice(u64);

    impl Dice {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len() as u64) as usize]
        }
    }

    /// Label subsets routes and scopes draw from: some match many endpoints, some few, one none.
    const SUBSETS: [&[(&str, &str)]; 6] = [
        &[],
        &[("version", "v1")],
        &[("version", "v2")],
        &[("version", "v3"), ("tier", "a")],
        &[("tier", "b")],
        &[("version", "v9")],
    ];

    fn labels_of(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn endpoint(d: &mut Dice, i: usize) -> Endpoint {
        let mut labels = Labels::new();
        if d.below(5) > 0 {
            labels.insert("version".into(), format!("v{}", 1 + d.below(3)));
        }
        if d.below(2) == 0 {
            labels.insert("tier".into(), d.pick(&["a", "b"]).to_string());
        }
        Endpoint {
            id: format!("e{i}"),
            service: Name::new("svc").unwrap(),
            address: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
            identity: "spiffe://mesh.local/ns/default/sa/svc".parse().unwrap(),
            labels,
            cluster: d.pick(&["c", "d", ""]).to_string(),
            zone: d.pick(&["z", "y"]).to_string(),
            weight: d.pick(&[0, 1, 1, 2, 3, 7]),
            gateway: None,
        }
    }

    fn yaml_labels(pairs: &[(&str, &str)]) -> String {
        let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{{ {} }}", inner.join(", "))
    }

    /// A Route of `svc` naming two or three of [`SUBSETS`] (backends, sometimes a mirror).
    fn route(d: &mut Dice) -> Route {
        let mut yaml = String::from("kind: Route\nservice: svc\nrules:\n  - backends:\n");
        for _ in 0..1 + d.below(2) {
            let subset = yaml_labels(d.pick(&SUBSETS));
            yaml += &format!("      - {{ subset: {subset}, weight: 1 }}\n");
        }
        if d.below(2) == 0 {
            let subset = yaml_labels(d.pick(&SUBSETS));
            yaml += &format!("    mirror: {{ subset: {subset}, percent: 10 }}\n");
        }
        // A third of the routes name a failover order of their own (replacing the Service's).
        if d.below(3) == 0 {
            let order = d.pick(&["[c]", "[e, d]", "[d, c]"]);
            yaml = yaml.replacen(
                "service: svc\n",
                &format!("service: svc\nfailover: {order}\n"),
                1,
            );
        }
        match parse_documents("test", &yaml).unwrap().pop() {
            Some(Object::Route(r)) => r,
            other => panic!("not a route: {other:?}"),
        }
    }

    /// One generated case: a snapshot of up to 40 endpoints and a route, then the state of one
    /// attempt.
    struct Case {
        snap: Snapshot,
        here: Locality,
        load: HashMap<String, Load>,
        ejected: Vec<String>,
    }

    fn case(d: &mut Dice) -> Case {
        let n = d.below(41) as usize;
        let eps: BTreeMap<String, Arc<Endpoint>> = (0..n)
            .map(|i| endpoint(d, i))
            .map(|e| (e.id.clone(), Arc::new(e)))
            .collect();
        let mut snap = Snapshot::empty(Origin::Empty);
        if n > 0 {
            snap.endpoints.insert("svc".into(), eps);
        }
        if d.below(4) > 0 {
            snap.routes.insert("svc".into(), Arc::new(route(d)));
        }
        // Half the cases name a failover order (clusters with endpoints, and one without).
        if d.below(2) == 0 {
            let order = d.pick(&["[d, c]", "[c]", "[e, d]", "[d]"]);
            let yaml = format!(
                "kind: Service\nname: svc\nfailover: {order}\nports: [{{ port: 80, protocol: tcp }}]\n"
            );
            if let Some(Object::Service(s)) = parse_documents("test", &yaml).unwrap().pop() {
                snap.services.insert("svc".into(), Arc::new(s));
            }
        }
        let ejected_share = d.below(4); // of 4: none, a quarter, half, three quarters
        let mut ejected = Vec::new();
        let mut load = HashMap::new();
        for i in 0..n {
            let id = format!("e{i}");
            if d.below(4) < ejected_share {
                ejected.push(id.clone());
            }
            let rtt = match d.below(4) {
                0 => None,
                _ => Some(Duration::from_micros(100 * d.below(30))),
            };
            let outstanding = d.below(4) as u32;
            load.insert(
                id,
                Load {
                    outstanding,
                    rtt,
                    healthy: true,
                },
            );
        }
        ejected.push("gone".into());
        let here = Locality {
            cluster: d.pick(&["c", "d"]).to_string(),
            zone: d.pick(&["z", "y"]).to_string(),
            failover: Vec::new(),
        };
        Case {
            snap,
            here,
            load,
            ejected,
        }
    }

    /// What the linear reference chooses, as the index reports it; with `even_load`, every
    /// endpoint's load the same (so power of two choices takes its first sample).
    fn reference(
        c: &Case,
        attempt: (&Scope, &[String], bool),
        samples: (u64, u64),
        even_load: bool,
    ) -> Result<String, PickError> {
        let (scope, tried, revisit) = attempt;
        let all: Vec<&Endpoint> = c.snap.endpoints_of("svc").map(|e| e.as_ref()).collect();
        let pool = candidates(&all, scope, tried, revisit);
        if pool.is_empty() {
            return Err(PickError::NoEndpoint);
        }
        let load = |e: &Endpoint| Load {
            healthy: !c.ejected.contains(&e.id),
            ..if even_load {
                Load::default()
            } else {
                c.load[&e.id]
            }
        };
        let here = c.here.for_service(&c.snap, "svc");
        choose(&pool, scope, &load, &here, samples)
            .map(|e| e.id.clone())
            .ok_or(PickError::NoHealthy)
    }

    #[test]
    fn indexed_choice_is_the_linear_one() {
        let mut d = Dice(16);
        let mut outcomes: HashMap<Result<(), PickError>, usize> = HashMap::new();
        let mut second = 0;
        for n in 0..3000 {
            let c = case(&mut d);
            let index = EndpointIndex::build(&c.snap, &c.here);
            let ejected: Vec<&str> = c.ejected.iter().map(String::as_str).collect();
            let load = |e: &Endpoint| c.load[&e.id];
            for _ in 0..20 {
                let scope = Scope {
                    subset: labels_of(d.pick(&SUBSETS)),
                    fallback: d.pick(&[Fallback::Subset, Fallback::Service]),
                };
                let mut tried: Vec<String> = (0..d.below(4))
                    .map(|_| format!("e{}", d.below(45)))
                    .collect();
                if d.below(8) == 0 {
                    tried = (0..45).map(|i| format!("e{i}")).collect();
                }
                let revisit = d.below(2) == 0;
                let samples = (d.next(), d.next());
                let attempt = (&scope, tried.as_slice(), revisit);
                let want = reference(&c, attempt, samples, false);
                let eps = index.service("svc");
                let got = eps
                    .ok_or(PickError::NoEndpoint)
                    .and_then(|s| s.choose(attempt, &ejected, &load, samples))
                    .map(|e| e.id.clone());
                assert_eq!(got, want, "case {n}: {scope:?} tried {tried:?} {revisit}");
                let has = eps.is_some_and(|s| s.has_candidate(&scope, &tried, revisit));
                assert_eq!(has, want != Err(PickError::NoEndpoint), "case {n}");
                // How often the load decided (P2C took its second sample), not only the dice.
                if want.is_ok() {
                    second += usize::from(reference(&c, attempt, samples, true) != want);
                }
                *outcomes.entry(want.map(drop)).or_default() += 1;
            }
        }
        // Every way a pick ends occurs hundreds of times at least: the comparison covers them.
        for outcome in [
            Ok(()),
            Err(PickError::NoEndpoint),
            Err(PickError::NoHealthy),
        ] {
            assert!(
                outcomes.get(&outcome).copied().unwrap_or(0) > 300,
                "{outcomes:?}"
            );
        }
        assert!(second > 1000, "{second}");
    }
}
