//! What a flow or request leaves behind. Each L4 flow and L7 request has one [`flow::FlowRecord`],
//! finished once, which feeds `metrics` (Prometheus), the access log (one JSON line each) and
//! trace export (one span per proxied request, OTLP/HTTP). The last two are fed through bounded
//! channels with `try_send`: the data path never waits for a writer or a collector, and what
//! does not fit is dropped and counted. `metrics` depends on nothing else here.

pub(crate) mod access_log;
pub(crate) mod flow;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod otlp;
pub(crate) mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SidecarConfig;
use crate::telemetry::metrics::{Direction, Metrics};
use crate::telemetry::trace::TraceContext;
use access_log::AccessEntry;
use otlp::SpanData;

/// How a flow or request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome<'a> {
    /// L7: the response status sent to the caller.
    Status(u16),
    /// L4: the `response_flags` word (`-` when completed).
    Flags(&'a str),
}

/// The trace position of a proxied request: the span this sidecar records and its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trace {
    /// 16-byte trace id.
    pub(crate) trace_id: [u8; 16],
    /// This sidecar's span.
    pub(crate) span_id: [u8; 8],
    /// The span that called it, if the caller was traced.
    pub(crate) parent: Option<[u8; 8]>,
    /// The W3C sampled flag: only sampled spans are exported.
    pub(crate) sampled: bool,
}

impl Trace {
    /// The span a sidecar records for a hop: `before` is the trace context the request came
    /// with (if any), `after` the one it forwards (a child of `before`, or a new trace).
    pub(crate) fn of_hop(
        before: Option<TraceContext>,
        after: Option<TraceContext>,
    ) -> Option<Trace> {
        let after = after?;
        Some(Trace {
            trace_id: after.trace_id,
            span_id: after.span_id,
            parent: before
                .filter(|b| b.trace_id == after.trace_id)
                .map(|b| b.span_id),
            sampled: after.flags & 1 == 1,
        })
    }
}

/// The `traceparent` of a header map, if valid.
pub(crate) fn trace_context(headers: &HeaderMap) -> Option<TraceContext> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
}

/// What is known about a flow or request when it ends. Label-like fields come from the registry
/// and the config; `peer_id` is a verified SPIFFE id.
#[derive(Debug, Clone)]
pub(crate) struct Record<'a> {
    /// inbound / outbound.
    pub(crate) direction: Direction,
    /// The caller's SPIFFE id (inbound); `None` means this sidecar's own id (outbound).
    pub(crate) peer_id: Option<&'a str>,
    /// Calling service.
    pub(crate) source: &'a str,
    /// Called service.
    pub(crate) destination: &'a str,
    /// Version of the endpoint that served.
    pub(crate) version: &'a str,
    /// Index of the route rule that matched.
    pub(crate) route: Option<usize>,
    /// The endpoint (outbound) or local app address (inbound) that served.
    pub(crate) endpoint: Option<SocketAddr>,
    /// Status or flags.
    pub(crate) outcome: Outcome<'a>,
    /// L7: an Envoy-style flag on the request (`RL` rate limited, `UO` overflow), if any.
    pub(crate) flag: Option<&'a str>,
    /// Bytes from the source towards the destination, when known.
    pub(crate) sent: Option<u64>,
    /// Bytes from the destination back to the source, when known.
    pub(crate) received: Option<u64>,
    /// When the flow or request began.
    pub(crate) started: Instant,
    /// How long it took: to the end of a flow, to the response head of a request.
    pub(crate) duration: Duration,
    /// L7: the request method (span name).
    pub(crate) method: Option<&'a str>,
    /// L7: the span of this hop.
    pub(crate) trace: Option<Trace>,
}

/// A declared `content-length`.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The access log and span export of one sidecar. Cheap to clone; off when default.
#[derive(Clone, Default)]
pub(crate) struct Sinks {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    own_id: String,
    access: Option<mpsc::Sender<AccessEntry>>,
    spans: Option<mpsc::Sender<SpanData>>,
    /// `halyard_access_log_dropped_total`.
    access_dropped: prometheus::IntCounter,
    /// `halyard_trace_spans_dropped_total`.
    spans_dropped: prometheus::IntCounter,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks").finish_non_exhaustive()
    }
}

impl Sinks {
    /// Starts the access log writer and the span exporter that `config` asks for, as tasks on
    /// `tasks` that end when `stop` is cancelled (after writing what they hold).
    pub(crate) fn start(
        config: &SidecarConfig,
        own_id: &str,
        metrics: &Metrics,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Sinks {
        let access = config.access_log.enabled.then(|| {
            let (tx, rx) = mpsc::channel(config.access_log.buffer);
            let path = config.access_log.path.clone();
            tasks.spawn(access_log::write(path, rx, stop.clone()));
            tx
        });
        let spans = config.tracing.collector.as_ref().map(|url| {
            let (tx, rx) = mpsc::channel(config.tracing.queue);
            let exporter = otlp::Exporter::new(url, &config.tracing, &config.service, metrics);
            tasks.spawn(exporter.run(rx, stop.clone()));
            tx
        });
        if access.is_none() && spans.is_none() {
            return Sinks::default();
        }
        Sinks {
            inner: Some(Arc::new(Inner {
                own_id: own_id.to_owned(),
                access,
                spans,
                access_dropped: metrics.access_log_dropped.clone(),
                spans_dropped: metrics.spans_dropped.clone(),
            })),
        }
    }

    /// Whether anything is written at all.
    pub(crate) fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Hands a finished flow or request to the access log and, when it has a span, to the
    /// exporter. Never waits: a full queue drops the entry and counts it.
    pub(crate) fn record(&self, rec: Record<'_>) {
        let Some(inner) = &self.inner else { return };
        if let Some(tx) = &inner.access {
            let entry = AccessEntry::new(&rec, &inner.own_id, rec.duration);
            if tx.try_send(entry).is_err() {
                inner.access_dropped.inc();
            }
        }
        if let (Some(tx), Some(trace)) = (&inner.spans, rec.trace.filter(|t| t.sampled)) {
            let span = SpanData::new(&rec, trace, end_minus(rec.started.elapsed()));
            if tx.try_send(span).is_err() {
                inner.spans_dropped.inc();
            }
        }
    }
}

/// The wall-clock time `elapsed` ago.
fn end_minus(elapsed: Duration) -> SystemTime {
    SystemTime::now()
        .checked_sub(elapsed)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Lowercase hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_span_continues_the_trace_in_the_hops_own_span() {
        let before = TraceContext::start();
        let after = before.child();
        let t = Trace::of_hop(Some(before), Some(after)).unwrap();
        assert_eq!(t.trace_id, before.trace_id);
        assert_eq!(t.span_id, after.span_id);
        assert!(t.sampled);
        let unsampled = TraceContext { flags: 0, ..after };
        assert!(
            !Trace::of_hop(Some(before), Some(unsampled))
                .unwrap()
                .sampled
        );
        assert!(Trace::of_hop(Some(before), None).is_none());
    }

    #[test]
    fn a_hop_span_links_the_caller_as_its_parent() {
        let before = TraceContext::start();
        let after = before.child();
        let t = Trace::of_hop(Some(before), Some(after)).unwrap();
        assert_eq!(t.parent, Some(before.span_id));
        let fresh = TraceContext::start();
        assert_eq!(
            Trace::of_hop(Some(before), Some(fresh)).unwrap().parent,
            None
        );
        assert_eq!(Trace::of_hop(None, Some(fresh)).unwrap().parent, None);
    }
}
