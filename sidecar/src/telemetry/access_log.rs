//! The access log: one JSON object per line, per L4 flow or L7 request, written by a task of its
//! own so that the data path only pays for building the entry and a `try_send`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{hex, Outcome, Record};

/// One access log line. Field names are part of the documented format (README).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AccessEntry {
    /// When the flow or request ended; written RFC 3339 UTC (by the writer, off the data path).
    #[serde(serialize_with = "rfc3339")]
    pub(crate) time: SystemTime,
    /// `inbound` or `outbound`.
    pub(crate) direction: &'static str,
    /// `tcp` (a flow) or `http` (a request).
    pub(crate) protocol: &'static str,
    /// The caller's SPIFFE id.
    pub(crate) source_id: String,
    /// The calling service.
    pub(crate) source_service: String,
    /// The called service.
    pub(crate) destination_service: String,
    /// The version of the endpoint that served.
    pub(crate) destination_version: String,
    /// Index of the route rule that matched, or `-`.
    pub(crate) route: String,
    /// The endpoint address (outbound) or local app address (inbound), or `-`.
    pub(crate) endpoint: String,
    /// L7: the status sent to the caller.
    pub(crate) status: Option<u16>,
    /// L4: the response flags (`-` when completed); L7: a flag when one applies (`RL` rate
    /// limited, `UO` circuit-breaker overflow).
    pub(crate) flags: Option<String>,
    /// Bytes from the source towards the destination, when known.
    pub(crate) bytes_sent: Option<u64>,
    /// Bytes from the destination back to the source, when known.
    pub(crate) bytes_received: Option<u64>,
    /// Milliseconds from accept (L4) or request (L7) to the end (L4) or response head (L7).
    pub(crate) duration_ms: f64,
    /// The W3C trace id, or `-`.
    pub(crate) trace_id: String,
}

impl AccessEntry {
    /// The entry for a record; `own_id` is this sidecar's SPIFFE id.
    pub(crate) fn new(rec: &Record<'_>, own_id: &str, elapsed: Duration) -> Self {
        let (protocol, status, flags) = match rec.outcome {
            Outcome::Status(s) => ("http", Some(s), rec.flag.map(str::to_owned)),
            Outcome::Flags(f) => ("tcp", None, Some(f.to_owned())),
        };
        AccessEntry {
            time: SystemTime::now(),
            direction: rec.direction.as_str(),
            protocol,
            source_id: rec.peer_id.unwrap_or(own_id).to_owned(),
            source_service: rec.source.to_owned(),
            destination_service: rec.destination.to_owned(),
            destination_version: rec.version.to_owned(),
            route: rec.route.map_or_else(|| "-".to_owned(), |i| i.to_string()),
            endpoint: rec
                .endpoint
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            status,
            flags,
            bytes_sent: rec.sent,
            bytes_received: rec.received,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            trace_id: rec
                .trace
                .map_or_else(|| "-".to_owned(), |t| hex(&t.trace_id)),
        }
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

type Sink = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

async fn open(path: &PathBuf) -> std::io::Result<Sink> {
    let out: Box<dyn AsyncWrite + Send + Unpin> = if path.as_os_str() == "-" {
        Box::new(tokio::io::stdout())
    } else {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Box::new(file)
    };
    Ok(BufWriter::new(out))
}

/// Writes entries as they come until `stop`, then writes what is queued and returns. Lines are
/// flushed whenever the queue runs empty.
pub(crate) async fn write(
    path: PathBuf,
    mut rx: mpsc::Receiver<AccessEntry>,
    stop: CancellationToken,
) {
    let mut out = match open(&path).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "access log cannot be opened; lines are dropped");
            return;
        }
    };
    loop {
        let entry = tokio::select! {
            e = rx.recv() => e,
            _ = stop.cancelled() => { rx.close(); rx.recv().await },
        };
        let Some(entry) = entry else { break };
        if let Err(e) = line(&mut out, &entry).await {
            tracing::warn!(error = %e, "access log write failed");
        }
        if rx.is_empty() {
            let _ = out.flush().await;
        }
    }
    let _ = out.flush().await;
}

async fn line(out: &mut Sink, entry: &AccessEntry) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes).await
}
