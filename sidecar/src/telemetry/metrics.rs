//! Prometheus metrics of one sidecar. Label values come only from the registry and the config
//! (service names, versions, fixed flag words), so cardinality stays bounded whatever peers send.
//! Flows are recorded when they end, off the byte-copying path.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Inbound or outbound, from this sidecar's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Flows this sidecar accepted from peers.
    Inbound,
    /// Flows this sidecar's app opened.
    Outbound,
}

impl Direction {
    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The labels of one edge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Edge<'a> {
    /// inbound / outbound.
    pub(crate) direction: Direction,
    /// Calling service.
    pub(crate) source: &'a str,
    /// Called service.
    pub(crate) destination: &'a str,
    /// Version label of the endpoint that served.
    pub(crate) version: &'a str,
}

/// Every metric family of the sidecar. Cheap to clone (one reference count): every flow and
/// request record holds one.
#[derive(Clone)]
pub(crate) struct Metrics(Arc<Families>);

impl std::ops::Deref for Metrics {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.0
    }
}

/// The families behind [`Metrics`].
pub(crate) struct Families {
    registry: Registry,
    tcp_connections: IntCounterVec,
    tcp_bytes: IntCounterVec,
    tcp_duration: HistogramVec,
    policy_denials: IntCounterVec,
    ratelimited: IntCounterVec,
    overflows: IntCounterVec,
    egress_refused: IntCounterVec,
    outlier_ejections: IntCounterVec,
    retries: IntCounterVec,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    /// `halyard_registry_revision`.
    pub(crate) registry_revision: IntGauge,
    /// `halyard_registry_stale_seconds`.
    pub(crate) registry_stale: Gauge,
    /// `halyard_registry_rejected_keys`.
    pub(crate) registry_rejected: IntGauge,
    /// `halyard_cert_expiry_seconds`.
    pub(crate) cert_expiry: Gauge,
    /// `halyard_cert_renewals_total`: leaves obtained from the CA (enrollments and renewals).
    pub(crate) cert_renewals: IntCounter,
    /// `halyard_cert_renewal_failures_total`: failed requests to the CA.
    pub(crate) cert_renewal_failures: IntCounter,
    /// `halyard_workload_api_streams` by `method`: SPIFFE Workload API streams open now.
    pub(crate) workload_api_streams: IntGaugeVec,
    /// `halyard_workload_api_responses_total` by `method`: messages sent on those streams.
    pub(crate) workload_api_responses: IntCounterVec,
    /// `halyard_workload_api_refused_total` by `method` and `code` (the gRPC status name).
    pub(crate) workload_api_refused: IntCounterVec,
    /// `halyard_cluster_link_stale_seconds` by linked cluster.
    pub(crate) link_stale: GaugeVec,
    /// `halyard_cluster_link_endpoints` by linked cluster: its endpoints in force here.
    pub(crate) link_endpoints: IntGaugeVec,
    /// `halyard_quic_rtt_seconds` by peer.
    pub(crate) quic_rtt: GaugeVec,
    /// `halyard_quic_lost_packets_total` by peer (read from QUIC's own counters).
    pub(crate) quic_lost: GaugeVec,
    /// `halyard_quic_congestion_window_bytes` by peer.
    pub(crate) quic_cwnd: GaugeVec,
    /// `halyard_quic_cwnd_bytes` by peer: the controller's window (see `halyard_transport::CongestionStats`).
    pub(crate) quic_cwnd_bytes: GaugeVec,
    /// `halyard_quic_pacing_rate_bytes` by peer: bytes per second the sender paces at.
    pub(crate) quic_pacing_rate: GaugeVec,
    /// `halyard_quic_delivery_rate_bytes` by peer: the controller's delivery-rate estimate
    /// (bbr only; no sample with cubic).
    pub(crate) quic_delivery_rate: GaugeVec,
    /// `halyard_quic_bbr_competing` by peer: 1 while `bbr` competes with a flow that does
    /// not yield on any of the peer's connections (loss then bounds nothing until its next
    /// ProbeRTT), else 0 (bbr only).
    pub(crate) quic_bbr_competing: GaugeVec,
    /// `halyard_quic_connections`.
    pub(crate) quic_connections: IntGauge,
    /// `halyard_quic_admission_total` by decision: inbound handshakes not simply accepted.
    pub(crate) quic_admission: IntCounterVec,
    /// `halyard_flow_tasks`, `halyard_runtime_tasks`, `halyard_open_fds`: leak detectors.
    pub(crate) flow_tasks: IntGauge,
    pub(crate) runtime_tasks: IntGauge,
    pub(crate) open_fds: IntGauge,
    /// `halyard_runtime_workers`: threads of the data-plane runtime (`workers`).
    pub(crate) runtime_workers: IntGauge,
    /// `halyard_active_flows` by direction.
    pub(crate) active_flows: prometheus::IntGaugeVec,
    /// `halyard_quic_open_streams` by peer: tunnels and requests open on its connections.
    pub(crate) quic_open_streams: IntGaugeVec,
    /// `halyard_pool_connections` by peer: pooled QUIC connections to it.
    pub(crate) pool_connections: IntGaugeVec,
    /// `halyard_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub(crate) access_log_dropped: IntCounter,
    /// `halyard_trace_spans_dropped_total`: spans dropped (queue full, or the collector failed).
    pub(crate) spans_dropped: IntCounter,
    /// `halyard_trace_spans_exported_total`: spans the collector accepted.
    pub(crate) spans_exported: IntCounter,
    /// Flows recorded so far, for anyone who needs to wait for a flow's figures.
    finished: tokio::sync::watch::Sender<u64>,
}

const EDGE: &[&str] = &[
    "direction",
    "source_service",
    "destination_service",
    "destination_version",
];

/// Registers `metric` in `reg` and returns it.
fn registered<C>(reg: &Registry, metric: C) -> prometheus::Result<C>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    reg.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    registered(reg, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<GaugeVec> {
    registered(reg, GaugeVec::new(Opts::new(name, help), labels)?)
}

fn gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    registered(reg, Gauge::new(name, help)?)
}

fn int_gauge_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    registered(reg, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn int_counter(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    registered(reg, IntCounter::new(name, help)?)
}

fn int_gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(reg, IntGauge::new(name, help)?)
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub(crate) fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let conn_labels = [EDGE, &["response_flags"]].concat();
        let byte_labels = [EDGE, &["stream"]].concat();
        let tcp_duration = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "halyard_tcp_connection_duration_seconds",
                    "TCP flow duration",
                )
                .buckets(prometheus::exponential_buckets(0.001, 4.0, 10)?),
                EDGE,
            )?,
        )?;
        let code_labels = [EDGE, &["response_code"]].concat();
        let request_duration = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "halyard_request_duration_seconds",
                    "HTTP request duration, to the response head",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
                &code_labels,
            )?,
        )?;
        Ok(Metrics(Arc::new(Families {
            tcp_connections: counter(
                &r,
                "halyard_tcp_connections_total",
                "TCP flows ended",
                &conn_labels,
            )?,
            tcp_bytes: counter(
                &r,
                "halyard_tcp_bytes_total",
                "TCP bytes, by stream sent/received from the source's view",
                &byte_labels,
            )?,
            tcp_duration,
            requests: counter(&r, "halyard_requests_total", "HTTP requests", &code_labels)?,
            request_duration,
            policy_denials: counter(
                &r,
                "halyard_policy_denials_total",
                "Flows and requests refused by policy",
                &["source_service", "destination_service", "reason"],
            )?,
            ratelimited: counter(
                &r,
                "halyard_ratelimited_total",
                "Requests and flows refused by a rate limit (429) at the destination's sidecar",
                &["source_service", "destination_service", "limit", "scope"],
            )?,
            egress_refused: counter(
                &r,
                "halyard_egress_refused_total",
                "Captured flows refused because their destination is neither a mesh service nor an ExternalService (registry-only)",
                &["destination"],
            )?,
            overflows: counter(
                &r,
                "halyard_circuit_breaker_overflows_total",
                "Requests and flows failed fast (503, flag UO) by a circuit breaker",
                &["source_service", "destination_service", "threshold"],
            )?,
            outlier_ejections: counter(
                &r,
                "halyard_outlier_ejections_total",
                "Endpoints ejected by outlier detection",
                &["destination_service"],
            )?,
            retries: counter(
                &r,
                "halyard_retries_total",
                "Attempts on another endpoint after a failure",
                &["destination_service"],
            )?,
            registry_revision: int_gauge(
                &r,
                "halyard_registry_revision",
                "Registry revision applied",
            )?,
            registry_stale: gauge(
                &r,
                "halyard_registry_stale_seconds",
                "Seconds since the registry was last heard from",
            )?,
            registry_rejected: int_gauge(
                &r,
                "halyard_registry_rejected_keys",
                "Registry keys quarantined",
            )?,
            cert_expiry: gauge(
                &r,
                "halyard_cert_expiry_seconds",
                "Seconds until the workload certificate expires",
            )?,
            cert_renewals: int_counter(
                &r,
                "halyard_cert_renewals_total",
                "Workload certificates obtained from the mesh CA (enrollments and renewals)",
            )?,
            cert_renewal_failures: int_counter(
                &r,
                "halyard_cert_renewal_failures_total",
                "Failed requests to the mesh CA for a workload certificate",
            )?,
            link_stale: gauge_vec(
                &r,
                "halyard_cluster_link_stale_seconds",
                "Seconds since a linked cluster's registry was last heard from (ClusterLink)",
                &["cluster"],
            )?,
            link_endpoints: int_gauge_vec(
                &r,
                "halyard_cluster_link_endpoints",
                "Endpoints of a linked cluster's exported services in force here; 0 once aged out",
                &["cluster"],
            )?,
            workload_api_streams: int_gauge_vec(
                &r,
                "halyard_workload_api_streams",
                "SPIFFE Workload API response streams open to the local app",
                &["method"],
            )?,
            workload_api_responses: counter(
                &r,
                "halyard_workload_api_responses_total",
                "SPIFFE Workload API messages sent to the local app (first answers and updates)",
                &["method"],
            )?,
            workload_api_refused: counter(
                &r,
                "halyard_workload_api_refused_total",
                "SPIFFE Workload API calls refused, by gRPC status",
                &["method", "code"],
            )?,
            quic_rtt: gauge_vec(
                &r,
                "halyard_quic_rtt_seconds",
                "Smoothed QUIC RTT per peer",
                &["peer"],
            )?,
            quic_lost: gauge_vec(
                &r,
                "halyard_quic_lost_packets_total",
                "QUIC packets lost per peer",
                &["peer"],
            )?,
            quic_cwnd: gauge_vec(
                &r,
                "halyard_quic_congestion_window_bytes",
                "QUIC congestion window per peer",
                &["peer"],
            )?,
            quic_cwnd_bytes: gauge_vec(
                &r,
                "halyard_quic_cwnd_bytes",
                "Congestion controller window per peer, bytes",
                &["peer"],
            )?,
            quic_pacing_rate: gauge_vec(
                &r,
                "halyard_quic_pacing_rate_bytes",
                "Pacing rate per peer, bytes per second",
                &["peer"],
            )?,
            quic_delivery_rate: gauge_vec(
                &r,
                "halyard_quic_delivery_rate_bytes",
                "Delivery-rate estimate of the congestion controller per peer, bytes per second",
                &["peer"],
            )?,
            quic_bbr_competing: gauge_vec(
                &r,
                "halyard_quic_bbr_competing",
                "1 while the bbr controller competes with a flow that does not yield, per peer",
                &["peer"],
            )?,
            quic_connections: int_gauge(&r, "halyard_quic_connections", "Pooled QUIC connections")?,
            quic_admission: counter(
                &r,
                "halyard_quic_admission_total",
                "Inbound QUIC attempts by decision: accepted (handshake started), retry (stateless \
                 Retry sent), refused \
                 (handshake cap), dropped (per-source cap), rate_limited (per-source handshake \
                 rate), peer_capped (connections per peer), streams_rejected (requests in \
                 progress per peer)",
                &["decision"],
            )?,
            flow_tasks: int_gauge(
                &r,
                "halyard_flow_tasks",
                "Flow and app-connection tasks alive",
            )?,
            runtime_tasks: int_gauge(
                &r,
                "halyard_runtime_tasks",
                "Tasks alive in the process's runtime",
            )?,
            runtime_workers: int_gauge(
                &r,
                "halyard_runtime_workers",
                "Worker threads of the data-plane runtime (the workers setting; 1: current-thread)",
            )?,
            open_fds: int_gauge(
                &r,
                "halyard_open_fds",
                "File descriptors open in the process",
            )?,
            active_flows: int_gauge_vec(
                &r,
                "halyard_active_flows",
                "Flows open now",
                &["direction"],
            )?,
            quic_open_streams: int_gauge_vec(
                &r,
                "halyard_quic_open_streams",
                "Tunnels and requests open per peer",
                &["peer"],
            )?,
            pool_connections: int_gauge_vec(
                &r,
                "halyard_pool_connections",
                "Pooled QUIC connections per peer",
                &["peer"],
            )?,
            access_log_dropped: int_counter(
                &r,
                "halyard_access_log_dropped_total",
                "Access log lines dropped because the writer fell behind",
            )?,
            spans_dropped: int_counter(
                &r,
                "halyard_trace_spans_dropped_total",
                "Trace spans dropped: export queue full or collector failed",
            )?,
            spans_exported: int_counter(
                &r,
                "halyard_trace_spans_exported_total",
                "Trace spans accepted by the collector",
            )?,
            registry: r,
            finished: tokio::sync::watch::Sender::new(0),
        })))
    }

    /// Records a finished TCP flow.
    pub(crate) fn tcp_flow(
        &self,
        edge: Edge<'_>,
        flags: &str,
        sent: u64,
        received: u64,
        secs: f64,
    ) {
        let e = [
            edge.direction.as_str(),
            edge.source,
            edge.destination,
            edge.version,
        ];
        self.tcp_connections
            .with_label_values(&[e[0], e[1], e[2], e[3], flags])
            .inc();
        self.tcp_bytes
            .with_label_values(&[e[0], e[1], e[2], e[3], "sent"])
            .inc_by(sent);
        self.tcp_bytes
            .with_label_values(&[e[0], e[1], e[2], e[3], "received"])
            .inc_by(received);
        self.tcp_duration.with_label_values(&e).observe(secs);
        self.finished.send_modify(|n| *n += 1);
    }

    /// Records a finished HTTP request (its response head).
    pub(crate) fn request(&self, edge: Edge<'_>, code: u16, secs: f64) {
        let code = code.to_string();
        let l = [
            edge.direction.as_str(),
            edge.source,
            edge.destination,
            edge.version,
            &code,
        ];
        self.requests.with_label_values(&l).inc();
        self.request_duration.with_label_values(&l).observe(secs);
        self.finished.send_modify(|n| *n += 1);
    }

    /// Sees the number of flows recorded so far (TCP flows and L7 requests).
    pub(crate) fn finished(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finished.subscribe()
    }

    /// Counts a flow as open until the guard drops.
    pub(crate) fn active(&self, direction: Direction) -> ActiveFlow {
        let gauge = self.active_flows.with_label_values(&[direction.as_str()]);
        gauge.inc();
        ActiveFlow(gauge)
    }

    /// Counts a policy denial.
    pub(crate) fn denial(&self, source: &str, destination: &str, reason: &str) {
        self.policy_denials
            .with_label_values(&[source, destination, reason])
            .inc();
    }

    /// Counts a refusal by a rate limit.
    pub(crate) fn ratelimited(&self, source: &str, destination: &str, limit: &str, scope: &str) {
        self.ratelimited
            .with_label_values(&[source, destination, limit, scope])
            .inc();
    }

    /// Counts a captured flow to an unregistered destination refused (`host:port` or
    /// `ip:port`; `other` past the first 1,000 destinations, to bound the family).
    pub(crate) fn egress_refused(&self, destination: &str) {
        self.egress_refused.with_label_values(&[destination]).inc();
    }

    /// Counts a request or flow failed fast by a circuit breaker threshold.
    pub(crate) fn overflow(&self, source: &str, destination: &str, threshold: &str) {
        self.overflows
            .with_label_values(&[source, destination, threshold])
            .inc();
    }

    /// Counts an outlier ejection.
    pub(crate) fn ejection(&self, destination: &str) {
        self.outlier_ejections
            .with_label_values(&[destination])
            .inc();
    }

    /// Counts a retry.
    pub(crate) fn retry(&self, destination: &str) {
        self.retries.with_label_values(&[destination]).inc();
    }

    /// Per-peer open streams and pooled connections from the pool's statistics. Peers that left
    /// the pool leave the families too.
    pub(crate) fn pool_stats(&self, stats: &[halyard_transport::PeerStats]) {
        self.quic_open_streams.reset();
        self.pool_connections.reset();
        for peer in stats {
            let label = peer.peer.addr.to_string();
            let streams: usize = peer.connections.iter().map(|c| c.open_streams).sum();
            self.quic_open_streams
                .with_label_values(&[&label])
                .set(streams as i64);
            self.pool_connections
                .with_label_values(&[&label])
                .set(peer.connections.len() as i64);
        }
    }

    /// Brings `halyard_quic_admission_total` up to the transport's own counts.
    pub(crate) fn quic_admission(&self, stats: &halyard_transport::admission::AdmissionStats) {
        use std::sync::atomic::Ordering::Relaxed;
        for (decision, count) in [
            ("accepted", &stats.accepted),
            ("retry", &stats.retried),
            ("refused", &stats.refused),
            ("dropped", &stats.ignored),
            ("rate_limited", &stats.rate_limited),
            ("peer_capped", &stats.peer_capped),
            ("streams_rejected", &stats.streams_rejected),
        ] {
            let c = self.quic_admission.with_label_values(&[decision]);
            c.inc_by(count.load(Relaxed).saturating_sub(c.get()));
        }
    }

    /// Per-peer QUIC figures from the pool's statistics: the best connection's RTT and
    /// congestion window, packets lost over all connections. A peer without a connection leaves
    /// the families, so endpoints that come and go do not pile up as label values.
    pub(crate) fn quic_peers(&self, stats: &[halyard_transport::PeerStats]) {
        let mut live = std::collections::HashSet::new();
        for peer in stats {
            let Some(best) = peer.connections.iter().min_by_key(|c| c.rtt) else {
                continue;
            };
            let label = peer.peer.addr.to_string();
            self.quic_rtt
                .with_label_values(&[&label])
                .set(best.rtt.as_secs_f64());
            let lost: u64 = peer.connections.iter().map(|c| c.lost_packets).sum();
            self.quic_lost.with_label_values(&[&label]).set(lost as f64);
            self.quic_cwnd
                .with_label_values(&[&label])
                .set(best.cwnd as f64);
            live.insert(label);
        }
        for family in [&self.quic_rtt, &self.quic_lost, &self.quic_cwnd] {
            remove_peers_but(family, &live);
        }
    }

    /// Per-peer congestion-controller figures of the connection with the smallest RTT (the
    /// one `quic_peers` reports): window, pacing rate and, where the controller has one, its
    /// delivery-rate estimate; and with `bbr` whether any of the peer's connections competes
    /// (a competing one sees the larger RTT). Peers without a connection leave the families.
    pub(crate) fn quic_congestion(&self, peers: &[halyard_transport::PeerCongestion]) {
        let mut live = std::collections::HashSet::new();
        let mut with_rate = std::collections::HashSet::new();
        let mut with_bbr = std::collections::HashSet::new();
        for peer in peers {
            let Some(best) = peer.connections.iter().min_by_key(|c| c.rtt) else {
                continue;
            };
            let label = peer.peer.addr.to_string();
            let set = |family: &GaugeVec, v: u64| family.with_label_values(&[&label]).set(v as f64);
            set(&self.quic_cwnd_bytes, best.cwnd);
            set(&self.quic_pacing_rate, best.pacing_rate);
            if let Some(rate) = best.delivery_rate {
                set(&self.quic_delivery_rate, rate);
                with_rate.insert(label.clone());
            }
            let competing = peer.connections.iter().filter_map(|c| c.competing);
            if let Some(competing) = competing.reduce(|a, b| a || b) {
                set(&self.quic_bbr_competing, u64::from(competing));
                with_bbr.insert(label.clone());
            }
            live.insert(label);
        }
        remove_peers_but(&self.quic_cwnd_bytes, &live);
        remove_peers_but(&self.quic_pacing_rate, &live);
        remove_peers_but(&self.quic_delivery_rate, &with_rate);
        remove_peers_but(&self.quic_bbr_competing, &with_bbr);
    }

    /// The Prometheus text exposition of every family.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a family error would only drop that family.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Removes the samples of `family` whose `peer` is not in `keep` (rather than a reset and
/// rewrite, so a scrape never sees a live peer missing).
fn remove_peers_but(family: &GaugeVec, keep: &std::collections::HashSet<String>) {
    use prometheus::core::Collector;
    let stale: Vec<String> = family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .flat_map(|m| m.get_label())
        .filter(|l| l.name() == "peer" && !keep.contains(l.value()))
        .map(|l| l.value().to_owned())
        .collect();
    for peer in stale {
        let _ = family.remove_label_values(&[&peer]);
    }
}

/// An open flow in `halyard_active_flows`; decrements on drop.
pub(crate) struct ActiveFlow(prometheus::IntGauge);

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use halyard_transport::{ConnectionStats, PeerKey, PeerStats};

    use super::*;

    /// Every metric the Grafana dashboard queries is one the sidecar exports.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/halyard.json"
        );
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let m = Metrics::new().unwrap();
        let edge = Edge {
            direction: Direction::Outbound,
            source: "a",
            destination: "b",
            version: "v1",
        };
        m.tcp_flow(edge, "-", 1, 1, 0.1);
        m.request(edge, 200, 0.1);
        m.denial("a", "b", "x");
        m.ejection("b");
        m.retry("b");
        let _active = m.active(Direction::Outbound);
        for g in [&m.quic_rtt, &m.quic_lost, &m.quic_cwnd] {
            g.with_label_values(&["p"]).set(1.0);
        }
        for g in [&m.quic_open_streams, &m.pool_connections] {
            g.with_label_values(&["p"]).set(1);
        }
        let exported = m.render();
        let mut queried = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("halyard_"))
                {
                    assert!(
                        exported.contains(&format!("\n{name}")),
                        "{name} is not exported"
                    );
                    queried += 1;
                }
            }
        }
        assert!(queried >= 20, "{queried} metric references");
    }

    fn peer(port: u16, connections: usize) -> PeerStats {
        let conn = ConnectionStats {
            rtt: Duration::from_millis(2),
            cwnd: 12_000,
            lost_packets: 1,
            sent_packets: 10,
            congestion_events: 0,
            stream_frames_sent: 0,
            current_mtu: 1200,
            mtu_probes_sent: 0,
            mtu_black_holes: 0,
            open_streams: 0,
        };
        PeerStats {
            peer: PeerKey {
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                id: halyard_certs::SpiffeId::parse("spiffe://mesh.local/ns/default/sa/reviews")
                    .unwrap(),
            },
            connections: vec![conn; connections],
        }
    }

    fn congestion(port: u16, delivery_rate: Option<u64>) -> halyard_transport::PeerCongestion {
        let stats = halyard_transport::CongestionStats {
            rtt: Duration::from_millis(2),
            cwnd: 30_000,
            pacing_rate: 12_500_000,
            delivery_rate,
            phase: None,
            competing: delivery_rate.map(|_| false),
        };
        halyard_transport::PeerCongestion {
            peer: peer(port, 0).peer,
            connections: vec![stats],
        }
    }

    #[test]
    fn congestion_gauges_show_window_pacing_delivery_rate_and_competing() {
        let m = Metrics::new().unwrap();
        m.quic_congestion(&[congestion(1, Some(10_000_000))]);
        let text = m.render();
        assert!(
            text.contains("halyard_quic_cwnd_bytes{peer=\"127.0.0.1:1\"} 30000"),
            "{text}"
        );
        assert!(text.contains("halyard_quic_pacing_rate_bytes{peer=\"127.0.0.1:1\"} 12500000"));
        assert!(text.contains("halyard_quic_delivery_rate_bytes{peer=\"127.0.0.1:1\"} 10000000"));
        assert!(text.contains("halyard_quic_bbr_competing{peer=\"127.0.0.1:1\"} 0"));
        // Two connections to the peer; the one competing sees the larger RTT.
        let mut competing = congestion(1, Some(10_000_000));
        let mut other = competing.connections[0].clone();
        other.rtt = Duration::from_millis(9);
        other.competing = Some(true);
        competing.connections.push(other);
        m.quic_congestion(&[competing]);
        let text = m.render();
        assert!(text.contains("halyard_quic_bbr_competing{peer=\"127.0.0.1:1\"} 1"));
    }

    #[test]
    fn a_controller_without_a_rate_estimate_leaves_no_delivery_rate() {
        let m = Metrics::new().unwrap();
        m.quic_congestion(&[congestion(1, Some(1))]);
        m.quic_congestion(&[congestion(1, None)]);
        let text = m.render();
        assert!(
            !text.contains("halyard_quic_delivery_rate_bytes{"),
            "{text}"
        );
        assert!(!text.contains("halyard_quic_bbr_competing{"), "{text}");
        assert!(text.contains("halyard_quic_pacing_rate_bytes{peer=\"127.0.0.1:1\"}"));
    }

    #[test]
    fn peers_without_a_connection_leave_the_congestion_families() {
        let m = Metrics::new().unwrap();
        m.quic_congestion(&[congestion(1, Some(1)), congestion(2, Some(1))]);
        m.quic_congestion(&[congestion(2, Some(1))]);
        let text = m.render();
        assert!(!text.contains("peer=\"127.0.0.1:1\""), "{text}");
        assert!(text.contains("halyard_quic_cwnd_bytes{peer=\"127.0.0.1:2\"}"));
    }

    #[test]
    fn admission_counts_follow_the_transport_without_counting_twice() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = Metrics::new().unwrap();
        let stats = halyard_transport::admission::AdmissionStats::default();
        stats.retried.store(5, Relaxed);
        stats.ignored.store(2, Relaxed);
        m.quic_admission(&stats);
        m.quic_admission(&stats);
        stats.retried.store(7, Relaxed);
        m.quic_admission(&stats);
        let text = m.render();
        assert!(
            text.contains("halyard_quic_admission_total{decision=\"retry\"} 7"),
            "{text}"
        );
        assert!(text.contains("halyard_quic_admission_total{decision=\"dropped\"} 2"));
        assert!(text.contains("halyard_quic_admission_total{decision=\"refused\"} 0"));
    }

    #[test]
    fn peers_without_a_connection_leave_the_quic_families() {
        let m = Metrics::new().unwrap();
        m.quic_peers(&[peer(1, 1), peer(2, 2)]);
        let text = m.render();
        assert!(text.contains("halyard_quic_rtt_seconds{peer=\"127.0.0.1:2\"} 0.002"));
        assert!(text.contains("halyard_quic_lost_packets_total{peer=\"127.0.0.1:2\"} 2"));
        m.quic_peers(&[peer(1, 1), peer(2, 0)]);
        let text = m.render();
        assert!(text.contains("halyard_quic_congestion_window_bytes{peer=\"127.0.0.1:1\"}"));
        assert!(!text.contains("127.0.0.1:2"), "{text}");
    }
}
