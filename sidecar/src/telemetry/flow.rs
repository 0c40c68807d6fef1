//! One record per L4 flow and per L7 request (in the manner of ztunnel's `ConnectionResult`):
//! created when the flow or request starts, filled in as it goes (the rule and the endpoint
//! chosen at pick time, the caller's identity, the trace), and finished exactly once — by
//! [`FlowRecord::finish`], or on drop when the task ends without finishing it (a cancelled
//! request, the drain deadline). Finishing alone feeds the metrics, the access log and the span,
//! so no path records twice and none forgets to. While it lives, it counts as open in
//! `halyard_active_flows`.
//!
//! A flow that does not complete is recorded before the other side learns of it: a refused,
//! failed or cut L4 flow is reset (its app connection, and a cut flow's tunnel) after its
//! record, and every local reply (a refusal, the sidecar's own 4xx/5xx) is recorded before it
//! is sent ([`FlowRecord::finish_early`] where the reply is sent by a callee). Whoever reads
//! the metrics once their connection was reset or their refusal arrived finds it counted. A
//! flow that completes is recorded once both directions ended, just after its last FIN was
//! passed on; an L7 request outbound when its response head is ready, before the app gets it;
//! inbound, when the response is out.

use std::net::SocketAddr;
use std::time::Instant;

use halyard_registry::model::Endpoint;

use super::metrics::{ActiveFlow, Direction, Edge, Metrics};
use super::{content_length, trace_context, Outcome, Record, Sinks, Trace};
use crate::telemetry::trace::TraceContext;

/// How a flow or request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// An L4 flow: its `response_flags` word and the bytes each way, from the source's view.
    Flow {
        /// `-` when completed, else an Envoy-style flag (`UF`, `DENY`, ...).
        flags: &'static str,
        /// Bytes from the source towards the destination.
        sent: u64,
        /// Bytes from the destination back to the source.
        received: u64,
    },
    /// An L7 request: the status sent to the caller, and the response's declared length.
    Response {
        /// HTTP status; 0 when the request ended without one (cancelled).
        status: u16,
        /// The response's `content-length`, when declared.
        received: Option<u64>,
    },
}

/// What an L7 record knows of its request.
#[derive(Debug)]
struct RequestInfo {
    method: http::Method,
    /// The trace context the request came with.
    before: Option<TraceContext>,
    /// The trace context sent on: this hop's span.
    after: Option<TraceContext>,
    /// The request's declared body length.
    sent: Option<u64>,
}

/// One flow or request in progress. See the module documentation.
pub(crate) struct FlowRecord {
    metrics: Metrics,
    sinks: Sinks,
    direction: Direction,
    source: String,
    destination: String,
    version: String,
    peer_id: Option<String>,
    route: Option<usize>,
    endpoint: Option<SocketAddr>,
    started: Instant,
    /// When the response head arrived (L7 inbound: from the app); the duration ends there.
    head: Option<Instant>,
    request: Option<RequestInfo>,
    /// L7: a flag for the access log (`RL`, `UO`).
    flag: Option<&'static str>,
    _active: ActiveFlow,
    done: bool,
}

impl FlowRecord {
    /// Starts the record of an L4 flow on the edge `source → destination`.
    pub(crate) fn flow(
        metrics: &Metrics,
        sinks: &Sinks,
        direction: Direction,
        source: &str,
        destination: &str,
    ) -> Self {
        FlowRecord {
            metrics: metrics.clone(),
            sinks: sinks.clone(),
            direction,
            source: source.to_owned(),
            destination: destination.to_owned(),
            version: "unknown".to_owned(),
            peer_id: None,
            route: None,
            endpoint: None,
            started: Instant::now(),
            head: None,
            request: None,
            flag: None,
            _active: metrics.active(direction),
            done: false,
        }
    }

    /// Starts the record of an L7 request on the edge `source → destination`.
    pub(crate) fn request<B>(
        metrics: &Metrics,
        sinks: &Sinks,
        direction: Direction,
        edge: (&str, &str),
        req: &http::Request<B>,
    ) -> Self {
        let mut rec = Self::flow(metrics, sinks, direction, edge.0, edge.1);
        rec.request = Some(RequestInfo {
            method: req.method().clone(),
            before: trace_context(req.headers()),
            after: None,
            sent: content_length(req.headers()),
        });
        rec
    }

    /// The `destination_version` label (inbound: this sidecar's own version).
    pub(crate) fn set_version(&mut self, version: &str) {
        version.clone_into(&mut self.version);
    }

    /// The caller's verified SPIFFE id (inbound).
    pub(crate) fn set_peer(&mut self, id: &str) {
        self.peer_id = Some(id.to_owned());
    }

    /// The index of the route rule taken, as chosen when the flow was routed.
    pub(crate) fn set_route(&mut self, index: Option<usize>) {
        self.route = index;
    }

    /// The address that served: the endpoint's (outbound) or the local app's (inbound).
    pub(crate) fn set_endpoint(&mut self, addr: SocketAddr) {
        self.endpoint = Some(addr);
    }

    /// The endpoint an attempt went to: its address and `version` label.
    pub(crate) fn picked(&mut self, endpoint: &Endpoint) {
        self.endpoint = Some(endpoint.address);
        let version = endpoint
            .labels
            .get("version")
            .map_or("unknown", String::as_str);
        self.set_version(version);
    }

    /// Flags the request (`RL` rate limited, `UO` circuit-breaker overflow) in the access log.
    pub(crate) fn set_flag(&mut self, flag: &'static str) {
        self.flag = Some(flag);
    }

    /// The trace context this hop forwards (its span).
    pub(crate) fn set_trace(&mut self, after: Option<TraceContext>) {
        if let Some(r) = &mut self.request {
            r.after = after;
        }
    }

    /// Notes that the response head arrived now: a request's duration ends here, not when its
    /// body has been relayed (`halyard_request_duration_seconds` is time to the response head).
    pub(crate) fn response_head(&mut self) {
        self.head.get_or_insert_with(Instant::now);
    }

    /// Finishes the record with how it ended.
    pub(crate) fn finish(mut self, end: End) {
        self.record(end);
    }

    /// Finishes the record while the caller still holds it, so a local reply sent next is
    /// counted before the other side sees it; a later `finish` (or the drop) does nothing.
    pub(crate) fn finish_early(&mut self, end: End) {
        self.record(end);
    }

    /// Records once: metrics, then the access log and span export.
    fn record(&mut self, end: End) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let duration = self
            .head
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.started);
        let elapsed = duration.as_secs_f64();
        let edge = Edge {
            direction: self.direction,
            source: &self.source,
            destination: &self.destination,
            version: &self.version,
        };
        let (outcome, sent, received) = match end {
            End::Flow {
                flags,
                sent,
                received,
            } => {
                self.metrics.tcp_flow(edge, flags, sent, received, elapsed);
                (Outcome::Flags(flags), Some(sent), Some(received))
            }
            End::Response { status, received } => {
                self.metrics.request(edge, status, elapsed);
                let sent = self.request.as_ref().and_then(|r| r.sent);
                (Outcome::Status(status), sent, received)
            }
        };
        if !self.sinks.enabled() {
            return;
        }
        let request = self.request.as_ref();
        self.sinks.record(Record {
            direction: self.direction,
            peer_id: self.peer_id.as_deref(),
            source: &self.source,
            destination: &self.destination,
            version: &self.version,
            route: self.route,
            endpoint: self.endpoint,
            outcome,
            flag: self.flag,
            sent,
            received,
            started: self.started,
            duration,
            method: request.map(|r| r.method.as_str()),
            trace: request.and_then(|r| Trace::of_hop(r.before, r.after)),
        });
    }
}

impl Drop for FlowRecord {
    fn drop(&mut self) {
        // A task that ends without finishing (cancelled, cut by the drain deadline) still counts.
        let end = match self.request {
            Some(_) => End::Response {
                status: 0,
                received: None,
            },
            None => End::Flow {
                flags: "RESET",
                sent: 0,
                received: 0,
            },
        };
        self.record(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(m: &Metrics, flags: &str) -> f64 {
        let text = m.render();
        let needle = format!("response_flags=\"{flags}\"");
        text.lines()
            .filter(|l| l.starts_with("halyard_tcp_connections_total") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[test]
    fn a_finished_flow_is_counted_once() {
        let m = Metrics::new().unwrap();
        let rec = FlowRecord::flow(&m, &Sinks::default(), Direction::Outbound, "a", "b");
        rec.finish(End::Flow {
            flags: "-",
            sent: 1,
            received: 2,
        });
        assert_eq!(flows(&m, "-"), 1.0);
        assert_eq!(flows(&m, "RESET"), 0.0);
    }

    #[test]
    fn a_dropped_flow_is_counted_as_reset() {
        let m = Metrics::new().unwrap();
        drop(FlowRecord::flow(
            &m,
            &Sinks::default(),
            Direction::Inbound,
            "a",
            "b",
        ));
        assert_eq!(flows(&m, "RESET"), 1.0);
    }

    #[test]
    fn an_open_record_counts_as_active() {
        let m = Metrics::new().unwrap();
        let active = || m.active_flows.with_label_values(&["outbound"]).get();
        let rec = FlowRecord::flow(&m, &Sinks::default(), Direction::Outbound, "a", "b");
        assert_eq!(active(), 1);
        drop(rec);
        assert_eq!(active(), 0);
    }
}
