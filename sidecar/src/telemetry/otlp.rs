//! Span export over OTLP/HTTP with protobuf bodies. The few OTLP messages needed are written out
//! here as prost structs (field numbers from opentelemetry-proto `trace/v1/trace.proto`,
//! `common/v1/common.proto`, `resource/v1/resource.proto`), which keeps the generated-code crate
//! out of the tree. Spans are batched by one task and POSTed with a timeout; a failed or slow
//! export drops its batch (counted) instead of holding anything up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Outcome, Record, Trace};
use crate::config::{ServiceConfig, TracingConfig};
use crate::telemetry::metrics::{Direction, Metrics};

/// `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    /// Spans grouped by the resource that produced them.
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `opentelemetry.proto.trace.v1.ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    /// The producer.
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// Spans by instrumentation scope.
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `opentelemetry.proto.resource.v1.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// `service.name` and friends.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `opentelemetry.proto.trace.v1.ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    /// Who made the spans.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// The spans.
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `opentelemetry.proto.common.v1.InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    /// Scope name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Scope version.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `opentelemetry.proto.trace.v1.Span` (the fields Halyard sets).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    /// 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    /// 8 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// 8 bytes, or empty for a root span.
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    /// Span name.
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind`: 2 server, 3 client.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    /// Start, nanoseconds since the Unix epoch.
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    /// End, nanoseconds since the Unix epoch.
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    /// Attributes.
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    /// Status.
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

/// `opentelemetry.proto.trace.v1.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// Description.
    #[prost(string, tag = "2")]
    pub message: String,
    /// 0 unset, 1 ok, 2 error.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `opentelemetry.proto.common.v1.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `opentelemetry.proto.common.v1.AnyValue` (string and int only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// The value.
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

/// The `value` oneof of `AnyValue`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// `string_value`.
    #[prost(string, tag = "1")]
    StringValue(String),
    /// `int_value`.
    #[prost(int64, tag = "3")]
    IntValue(i64),
}

/// OTLP `SpanKind` server.
pub(crate) const KIND_SERVER: i32 = 2;
/// OTLP `SpanKind` client.
pub(crate) const KIND_CLIENT: i32 = 3;

/// A string attribute.
pub(crate) fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.to_owned())),
        }),
    }
}

fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
    }
}

/// A finished span waiting for export.
pub(crate) type SpanData = Span;

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

impl Span {
    /// The span of one proxied request that started at `start`.
    pub(crate) fn new(rec: &Record<'_>, trace: Trace, start: SystemTime) -> Self {
        let end = start + rec.duration;
        let code = match rec.outcome {
            Outcome::Status(s) => i64::from(s),
            Outcome::Flags(_) => 0,
        };
        let (kind, side) = match rec.direction {
            Direction::Outbound => (KIND_CLIENT, "outbound"),
            Direction::Inbound => (KIND_SERVER, "inbound"),
        };
        Span {
            trace_id: trace.trace_id.to_vec(),
            span_id: trace.span_id.to_vec(),
            parent_span_id: trace.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: format!("{} {}", rec.method.unwrap_or("request"), rec.destination),
            kind,
            start_time_unix_nano: nanos(start),
            end_time_unix_nano: nanos(end),
            attributes: vec![
                attr("halyard.direction", side),
                attr("halyard.source_service", rec.source),
                attr("halyard.destination_service", rec.destination),
                attr("halyard.destination_version", rec.version),
                int_attr("http.response.status_code", code),
            ],
            status: Some(Status {
                message: String::new(),
                code: if code >= 500 { 2 } else { 0 },
            }),
        }
    }
}

/// Batches spans and POSTs them to the collector.
pub(crate) struct Exporter {
    url: http::Uri,
    resource: Resource,
    batch: usize,
    flush: Duration,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Metrics,
}

impl Exporter {
    /// An exporter for `url` (checked by the config) with `service` as its resource.
    pub(crate) fn new(
        url: &str,
        cfg: &TracingConfig,
        service: &ServiceConfig,
        metrics: &Metrics,
    ) -> Self {
        let mut resource = vec![
            attr("service.name", &service.name),
            attr("service.namespace", &service.namespace),
        ];
        if let Some(v) = &service.version {
            resource.push(attr("service.version", v));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.timeout));
        Exporter {
            url: url.parse().unwrap_or_default(),
            resource: Resource {
                attributes: resource,
            },
            batch: cfg.batch_size,
            flush: cfg.flush_interval,
            timeout: cfg.timeout,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            metrics: metrics.clone(),
        }
    }

    /// Exports until `stop`, then sends what is queued once more and returns.
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<SpanData>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let (batch, open) = self.collect(&mut rx, &stop).await;
            if !batch.is_empty() {
                let n = batch.len() as u64;
                match self.send(batch).await {
                    Ok(()) => {
                        self.metrics.spans_exported.inc_by(n);
                        if failing {
                            tracing::info!(url = %self.url, "span export works again");
                        }
                        failing = false;
                    }
                    Err(e) => {
                        self.metrics.spans_dropped.inc_by(n);
                        if !failing {
                            tracing::warn!(url = %self.url, error = %e, "span export failed; spans are dropped until it works");
                        }
                        failing = true;
                        if stop.is_cancelled() {
                            // Shutting down with the collector away: do not wait a timeout per batch.
                            rx.close();
                            self.metrics.spans_dropped.inc_by(rx.len() as u64);
                            return;
                        }
                    }
                }
            }
            if !open {
                return;
            }
        }
    }

    /// Up to a batch of spans, waiting at most the flush interval after the first. `false` once
    /// the queue is closed and empty.
    async fn collect(
        &self,
        rx: &mut mpsc::Receiver<SpanData>,
        stop: &CancellationToken,
    ) -> (Vec<SpanData>, bool) {
        let mut batch = Vec::new();
        let first = tokio::select! {
            s = rx.recv() => s,
            _ = stop.cancelled() => { rx.close(); rx.recv().await }
        };
        let Some(first) = first else {
            return (batch, false);
        };
        batch.push(first);
        let deadline = tokio::time::sleep(self.flush);
        tokio::pin!(deadline);
        while batch.len() < self.batch {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => return (batch, false),
                },
                _ = &mut deadline => break,
                _ = stop.cancelled(), if !rx.is_closed() => rx.close(),
            }
        }
        (batch, true)
    }

    async fn send(&self, spans: Vec<SpanData>) -> Result<(), String> {
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "halyard".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        }
        .encode_to_vec();
        let req = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {}", resp.status()))
        }
    }
}
