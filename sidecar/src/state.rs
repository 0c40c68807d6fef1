//! State shared by the sidecar's listeners: the registry snapshot in force, the connection pool,
//! load-balancing and outlier state, metrics, and the drain signal.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use halyard_certs::SpiffeId;
use halyard_registry::model::{Endpoint, RouteRule, ServicePort};
use halyard_registry::Snapshot;
use halyard_transport::{PeerKey, PeerStats, Pool, Target};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::decide::admit::{self, Refusal};
use crate::decide::breaker::{Breakers, Slot, Threshold};
use crate::decide::budget::RetryBudget;
use crate::decide::outlier::{Failure, Outliers};
use crate::decide::pick::{BackendPickers, EndpointIndex, Load, Locality, Scope};
use crate::decide::policy::{self, Peer};
use crate::decide::ratelimit::{endpoint_share, FlowSlot, Limited, Limiter, Unit};
use crate::decide::retry::{self, RetryPolicy, Step};
use crate::decide::route::{self, RequestView};
use crate::telemetry::flow::FlowRecord;
use crate::telemetry::metrics::{Direction, Metrics};
use crate::telemetry::Sinks;

/// Everything the data plane's tasks share.
pub(crate) struct Shared {
    /// The checked configuration.
    pub(crate) config: Arc<Config>,
    /// This sidecar's service name.
    pub(crate) service: String,
    /// The registry snapshot in force; a new value applies to new flows at once.
    pub(crate) snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Pooled QUIC connections to peer sidecars.
    pub(crate) pool: Pool,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// The access log and span export of finished flows and requests.
    sinks: Sinks,
    /// Where this sidecar runs.
    pub(crate) locality: Locality,
    /// Every flow task, so drain can wait for them.
    pub(crate) flows: TaskTracker,
    /// Cancelled when the drain starts: app HTTP connections finish the request in flight and
    /// close instead of waiting for the next one.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain deadline passes: open flows close.
    pub(crate) hard_stop: CancellationToken,
    lb: Mutex<LbState>,
    budgets: Mutex<HashMap<String, RetryBudget>>,
    peer_index: Mutex<PeerIndex>,
    endpoint_index: Mutex<Indexed>,
    /// This sidecar's endpoint id in the registry (its share of service-wide rate limits).
    endpoint_id: String,
    /// Rate-limit buckets of callers of this sidecar's service.
    limiter: Mutex<Limiter>,
    /// Circuit-breaker counts per destination service.
    pub(crate) breakers: Breakers,
}

/// What inbound admission grants: the Service port to forward to, and the slots that count a
/// flow as open under rate limits (hold them while it lasts).
pub(crate) struct Admitted<'s> {
    /// The Service port.
    pub(crate) port: &'s ServicePort,
    /// Open-flow slots; dropping them closes the flow for the limits.
    pub(crate) slots: Vec<FlowSlot>,
}

#[derive(Default)]
struct LbState {
    pickers: BackendPickers,
    outliers: HashMap<String, Outliers>,
    /// Attempts in flight by service, then endpoint id (looked up by `&str`: no allocation per
    /// candidate on the pick path).
    outstanding: HashMap<String, HashMap<String, u32>>,
    rtt: HashMap<SocketAddr, Duration>,
}

/// The `source_service` label of a caller serving `services` (see [`Shared::peer_services`]).
pub(crate) fn source_label(services: &[String]) -> &str {
    services.first().map_or("unknown", String::as_str)
}

/// The services each registered identity serves, in service-name order, for one snapshot
/// (kept alive so that its address cannot be reused by another).
#[derive(Default)]
struct PeerIndex {
    snapshot: Option<Arc<Snapshot>>,
    services: HashMap<SpiffeId, Arc<[String]>>,
}

impl PeerIndex {
    fn of(snap: &Arc<Snapshot>) -> Self {
        let mut by_id: HashMap<&SpiffeId, Vec<String>> = HashMap::new();
        for (service, eps) in &snap.endpoints {
            for e in eps.values() {
                let services = by_id.entry(&e.identity).or_default();
                if services.last() != Some(service) {
                    services.push(service.clone());
                }
            }
        }
        PeerIndex {
            snapshot: Some(snap.clone()),
            services: by_id
                .into_iter()
                .map(|(id, s)| (id.clone(), s.into()))
                .collect(),
        }
    }
}

pub(crate) use crate::decide::pick::PickError;

/// The endpoint indexes of the two latest snapshots seen, newest first (each snapshot kept
/// alive so that its address cannot be reused by another). Two, because a request that began
/// under the previous snapshot retries under it: one entry would rebuild the index back and
/// forth while such requests and new flows interleave.
#[derive(Default)]
struct Indexed {
    entries: Vec<(Arc<Snapshot>, Arc<EndpointIndex>)>,
}

/// How many snapshots' endpoint indexes are kept.
const INDEXED_SNAPSHOTS: usize = 2;

/// An endpoint chosen for one attempt; counts as outstanding until dropped.
pub(crate) struct Picked {
    /// The endpoint.
    pub(crate) endpoint: Arc<Endpoint>,
    /// The index of the route rule the flow took (L4 picks; L7 requests select theirs first).
    pub(crate) route: Option<usize>,
    shared: Arc<Shared>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        let service = self.endpoint.service.as_str();
        let mut lb = self.shared.lb();
        let Some(by_id) = lb.outstanding.get_mut(service) else {
            return;
        };
        if let Some(n) = by_id.get_mut(&self.endpoint.id) {
            *n = n.saturating_sub(1);
            // Only endpoints with attempts in flight keep an entry: ids come and go.
            if *n == 0 {
                by_id.remove(&self.endpoint.id);
            }
        }
        if by_id.is_empty() {
            lb.outstanding.remove(service);
        }
    }
}

impl Shared {
    /// Builds the shared state.
    pub(crate) fn new(
        config: Arc<Config>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        pool: Pool,
        metrics: Metrics,
        sinks: Sinks,
        endpoint_id: String,
    ) -> Arc<Self> {
        let locality = Locality {
            cluster: config.file.service.cluster.clone(),
            zone: config.file.service.zone.clone(),
            failover: Vec::new(),
        };
        Arc::new(Shared {
            service: config.service.to_string(),
            config,
            snapshot,
            pool,
            metrics,
            sinks,
            locality,
            flows: TaskTracker::new(),
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            lb: Mutex::new(LbState::default()),
            budgets: Mutex::new(HashMap::new()),
            peer_index: Mutex::new(PeerIndex::default()),
            endpoint_index: Mutex::new(Indexed::default()),
            endpoint_id,
            limiter: Mutex::new(Limiter::default()),
            breakers: Breakers::default(),
        })
    }

    /// Starts the record of an L4 flow on the edge `source → destination`.
    pub(crate) fn flow_record(
        &self,
        direction: Direction,
        source: &str,
        destination: &str,
    ) -> FlowRecord {
        FlowRecord::flow(&self.metrics, &self.sinks, direction, source, destination)
    }

    /// Starts the record of an L7 request on the edge `(source, destination)`.
    pub(crate) fn request_record<B>(
        &self,
        direction: Direction,
        edge: (&str, &str),
        req: &http::Request<B>,
    ) -> FlowRecord {
        FlowRecord::request(&self.metrics, &self.sinks, direction, edge, req)
    }

    /// Runs `work` unless the drain deadline passes first (`None`): every task on `flows` that
    /// waits on a peer or the app goes through here or watches `hard_stop` itself, so the drain
    /// ends.
    pub(crate) async fn until_hard_stop<F: std::future::Future>(
        &self,
        work: F,
    ) -> Option<F::Output> {
        tokio::select! {
            out = work => Some(out),
            _ = self.hard_stop.cancelled() => None,
        }
    }

    fn lb(&self) -> MutexGuard<'_, LbState> {
        // The state is counters and caches: after a panic elsewhere it is still usable.
        self.lb.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn budgets(&self) -> MutexGuard<'_, HashMap<String, RetryBudget>> {
        self.budgets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a first attempt to `service` in its retry budget.
    pub(crate) fn budget_request(&self, service: &str) {
        let cfg = &self.config.file.failure.retry_budget;
        self.budgets()
            .entry(service.to_owned())
            .or_default()
            .request(cfg, Instant::now());
    }

    /// The step after an attempt to `service` inside `scope` that has `tried` these endpoints
    /// (see [`retry::next`]); a retry it allows is paid from the service's budget, and none is
    /// allowed when no endpoint is left to go to.
    pub(crate) fn next_step(
        &self,
        service: &str,
        scope: &Scope,
        policy: &RetryPolicy<'_>,
        (retries_done, tried): (u32, &[String]),
        outcome: retry::Outcome,
    ) -> Step {
        let index = self.endpoint_index(&self.current());
        let alternative = index
            .service(service)
            .is_some_and(|eps| eps.has_candidate(scope, tried, policy.revisit));
        let cfg = &self.config.file.failure.retry_budget;
        let mut budgets = self.budgets();
        let budget = budgets.entry(service.to_owned()).or_default();
        retry::next(
            policy,
            retries_done,
            outcome,
            alternative,
            budget,
            cfg,
            Instant::now(),
        )
    }

    /// The snapshot in force now.
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The scope of rule number `index` of `service`'s route for one flow or request: the next
    /// weighted backend subset, and the rule's fallback. Called once per flow or request, so
    /// its retries stay with the backend it was given.
    pub(crate) fn backend(&self, service: &str, index: usize, rule: &RouteRule) -> Scope {
        let subset = self
            .lb()
            .pickers
            .pick(service, index, rule)
            .map(|b| b.subset.clone())
            .unwrap_or_default();
        Scope {
            subset,
            fallback: rule.fallback,
        }
    }

    /// The endpoint index of `snap` (see [`EndpointIndex`]): built once per snapshot, by the
    /// first caller that sees it (normally `run`'s snapshot follower, before any flow does).
    pub(crate) fn endpoint_index(&self, snap: &Arc<Snapshot>) -> Arc<EndpointIndex> {
        let mut indexed = self
            .endpoint_index
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((_, index)) = indexed.entries.iter().find(|(s, _)| Arc::ptr_eq(s, snap)) {
            return index.clone();
        }
        let index = Arc::new(EndpointIndex::build(snap, &self.locality));
        let newest = indexed
            .entries
            .first()
            .is_none_or(|(s, _)| s.revision <= snap.revision);
        if newest {
            // Endpoints of other clusters are dialled at their cluster's east-west gateway.
            let routes = snap
                .endpoints
                .values()
                .flat_map(|eps| eps.values())
                .filter_map(|ep| Some((ep.address, ep.gateway?)))
                .collect();
            self.pool.endpoint().set_gateway_routes(routes);
        }
        indexed.entries.insert(0, (snap.clone(), index.clone()));
        indexed.entries.truncate(INDEXED_SNAPSHOTS);
        index
    }

    /// Chooses an endpoint of `service` inside `scope`, skipping `tried` (see
    /// [`pick::ServiceEndpoints::choose`](crate::decide::pick::ServiceEndpoints::choose)): the
    /// snapshot's endpoint index, the ejections in force now, the two sampled endpoints' load.
    pub(crate) fn pick_in(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        service: &str,
        scope: &Scope,
        tried: &[String],
        revisit: bool,
    ) -> Result<Picked, PickError> {
        let index = self.endpoint_index(snap);
        let eps = index.service(service).ok_or(PickError::NoEndpoint)?;
        let now = Instant::now();
        let mut lb = self.lb();
        let ejected: Vec<&str> = lb
            .outliers
            .get(service)
            .map(|o| o.ejected(now).collect())
            .unwrap_or_default();
        let in_flight = lb.outstanding.get(service);
        let load = |e: &Endpoint| Load {
            outstanding: in_flight.and_then(|m| m.get(&e.id)).copied().unwrap_or(0),
            rtt: lb.rtt.get(&e.address).copied(),
            healthy: true,
        };
        let samples = (rand::random::<u64>(), rand::random::<u64>());
        let endpoint = eps
            .choose((scope, tried, revisit), &ejected, &load, samples)?
            .clone();
        drop(ejected);
        *lb.outstanding
            .entry(service.to_owned())
            .or_default()
            .entry(endpoint.id.clone())
            .or_default() += 1;
        drop(lb);
        Ok(Picked {
            endpoint,
            route: None,
            shared: self.clone(),
        })
    }

    /// The rule an L4 flow from this sidecar to `service` takes, and its scope (no route or no
    /// matching rule: the whole service).
    pub(crate) fn l4_route(&self, service: &str) -> (Option<usize>, Scope) {
        let snap = self.current();
        let Some(route) = snap.route(service) else {
            return (None, Scope::default());
        };
        let Some((index, rule)) = route::select(route, RequestView::flow(&self.service)) else {
            return (None, Scope::default());
        };
        (Some(index), self.backend(service, index, rule))
    }

    /// Records the outcome of an attempt for outlier detection.
    pub(crate) fn outcome(&self, picked: &Picked, failure: Option<Failure>) {
        let service = picked.endpoint.service.as_str();
        let total = self.current().endpoints.get(service).map_or(0, |e| e.len());
        let mut lb = self.lb();
        let outliers = lb.outliers.entry(service.to_owned()).or_default();
        match failure {
            None => outliers.success(&picked.endpoint.id),
            Some(kind) => {
                let cfg = &self.config.file.outlier;
                if outliers.failure(cfg, &picked.endpoint.id, kind, total, Instant::now()) {
                    tracing::warn!(service, endpoint = %picked.endpoint.id, "endpoint ejected");
                    self.metrics.ejection(service);
                }
            }
        }
    }

    /// Forgets the balancing state of what left the registry: outlier state of endpoints,
    /// backend pickers of route rules, retry budgets of services. Registry churn must not
    /// accumulate.
    pub(crate) fn forget_departed(&self) {
        let snap = self.current();
        let mut lb = self.lb();
        lb.outliers.retain(|service, o| {
            o.retain(|id| {
                snap.endpoints
                    .get(service)
                    .is_some_and(|e| e.contains_key(id))
            });
            snap.endpoints.contains_key(service)
        });
        lb.pickers
            .retain(|service, index| snap.route(service).is_some_and(|r| index < r.rules.len()));
        drop(lb);
        self.budgets()
            .retain(|service, _| snap.services.contains_key(service));
    }

    /// Updates the RTT the balancer uses and the per-peer QUIC metrics from the pool's
    /// statistics, then forgets what belongs to peers that left the registry: their RTT, and
    /// their pooled connections once no stream is open on them (a peer that deregistered to
    /// drain still finishes what it serves).
    pub(crate) fn refresh_peer_stats(&self, stats: &[PeerStats]) {
        let snap = self.current();
        let registered: HashSet<(SocketAddr, &SpiffeId)> = snap
            .endpoints
            .values()
            .flat_map(|eps| eps.values())
            .map(|e| (e.address, &e.identity))
            .collect();
        let mut connections = 0i64;
        let mut lb = self.lb();
        for peer in stats {
            if let Some(best) = peer.connections.iter().min_by_key(|c| c.rtt) {
                lb.rtt.insert(peer.peer.addr, best.rtt);
            }
            connections += peer.connections.len() as i64;
        }
        let known: HashSet<SocketAddr> = (stats.iter().map(|p| p.peer.addr))
            .chain(registered.iter().map(|(a, _)| *a))
            .collect();
        lb.rtt.retain(|a, _| known.contains(a));
        drop(lb);
        let busy: HashSet<&PeerKey> = stats
            .iter()
            .filter(|p| p.connections.iter().any(|c| c.open_streams > 0))
            .map(|p| &p.peer)
            .collect();
        self.pool
            .retain_peers(|k| busy.contains(k) || registered.contains(&(k.addr, &k.id)));
        self.metrics.quic_peers(stats);
        self.metrics.quic_connections.set(connections);
    }

    /// Admits a peer's tunnel or request for `target` (see [`admit::admit`]): the Service port
    /// to forward to, or why not. A policy denial is counted here, once for L4 and L7.
    pub(crate) fn admit<'s>(
        &self,
        snap: &'s Snapshot,
        target: &Target,
        stream: admit::Stream,
        peer: &SpiffeId,
        services: &[String],
        on: policy::Target<'_>,
    ) -> Result<Admitted<'s>, Refusal> {
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let caller = Peer {
            id: peer,
            services: &names,
        };
        let source = source_label(services);
        let port =
            admit::admit(snap, &self.service, target, stream, caller, on).inspect_err(|r| {
                if let Refusal::Denied(reason) = r {
                    self.metrics.denial(source, &self.service, reason.as_str());
                }
            })?;
        let slots = self.rate_limit(snap, caller, on, stream).map_err(|l| {
            let scope = l.scope.as_str();
            self.metrics
                .ratelimited(source, &self.service, &l.limit, scope);
            Refusal::RateLimited(l)
        })?;
        Ok(Admitted { port, slots })
    }

    /// Whether policy still admits an established flow of `peer` to `target` (`admit::admit`
    /// alone): the re-check after a snapshot change takes no rate-limit token, so a flow
    /// admitted under a limit is never closed by that limit. A denial is counted, as for a new
    /// flow.
    pub(crate) fn still_admits(
        &self,
        snap: &Snapshot,
        target: &Target,
        stream: admit::Stream,
        peer: &SpiffeId,
        services: &[String],
        on: policy::Target<'_>,
    ) -> bool {
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let caller = Peer {
            id: peer,
            services: &names,
        };
        match admit::admit(snap, &self.service, target, stream, caller, on) {
            Ok(_) => true,
            Err(refusal) => {
                if let Refusal::Denied(reason) = refusal {
                    let source = source_label(services);
                    self.metrics.denial(source, &self.service, reason.as_str());
                }
                false
            }
        }
    }

    /// Takes a place under a circuit-breaker `threshold` of the destination `service`
    /// (`decide::breaker`); a full threshold is counted and refused.
    pub(crate) fn breaker(
        &self,
        service: &str,
        threshold: Threshold,
    ) -> Result<Option<Slot>, Threshold> {
        let snap = self.current();
        let cb = snap
            .service(service)
            .and_then(|s| s.circuit_breaker.as_ref());
        self.breakers.take(service, cb, threshold).inspect_err(|t| {
            self.metrics.overflow(&self.service, service, t.as_str());
        })
    }

    /// Checks the service's rate limits (`decide::ratelimit`), this endpoint enforcing its
    /// weight's share of service-wide totals.
    fn rate_limit(
        &self,
        snap: &Snapshot,
        caller: Peer<'_>,
        on: policy::Target<'_>,
        stream: admit::Stream,
    ) -> Result<Vec<FlowSlot>, Limited> {
        let Some(policy) = snap.policy(&self.service) else {
            return Ok(Vec::new());
        };
        if policy.rate_limits.is_empty() {
            return Ok(Vec::new());
        }
        let unit = match stream {
            admit::Stream::Request => Unit::Request,
            admit::Stream::Tunnel => Unit::Flow,
        };
        let own = snap
            .endpoints_of(&self.service)
            .find(|e| e.id == self.endpoint_id)
            .map(|e| e.weight);
        let share = endpoint_share(own, snap.endpoints_of(&self.service).map(|e| e.weight));
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        limiter.check(&policy.rate_limits, caller, on, unit, share, Instant::now())
    }

    /// This sidecar's `version` label value, for inbound metrics and logs.
    pub(crate) fn version(&self) -> &str {
        self.config
            .file
            .service
            .version
            .as_deref()
            .unwrap_or("unknown")
    }

    /// The services a verified peer serves: those whose registered endpoints carry its id, or
    /// else its service account (the CA attests it). Looked up in an index of the snapshot
    /// (rebuilt when the snapshot changes) rather than a scan of every endpoint per flow.
    pub(crate) fn peer_services(&self, snap: &Arc<Snapshot>, id: &SpiffeId) -> Arc<[String]> {
        let mut index = self.peer_index.lock().unwrap_or_else(|p| p.into_inner());
        if !index
            .snapshot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, snap))
        {
            *index = PeerIndex::of(snap);
        }
        match index.services.get(id) {
            Some(services) => services.clone(),
            None => id
                .service_account()
                .map(str::to_owned)
                .into_iter()
                .collect(),
        }
    }
}
