//! `halyard ctl top`: the mesh's edges as a live table, from the sidecars' `/metrics`.
//!
//! Each refresh scrapes every admin address, sums the golden-signal families per edge (source,
//! destination, version, protocol) and compares with the previous scrape: rates are deltas over
//! the time between the two. An edge seen by both its sidecars is shown from the caller's side
//! (outbound); one seen only by the callee, from the inbound side. Parsing, aggregation and
//! rendering are pure functions; only the scrape and the loop do I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

use crate::promtext::{self, parse, Sample};

/// Arguments of `halyard ctl top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Admin addresses of the sidecars to read (host:port, comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub admin: Vec<String>,
    /// Print one table and exit: two scrapes `--interval` apart, rates over that interval.
    #[arg(long)]
    pub once: bool,
    /// Time between scrapes (the refresh period).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

/// An edge as a row: who calls whom, which version served, over which protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    /// Calling service.
    pub source: String,
    /// Called service.
    pub destination: String,
    /// Version that served.
    pub version: String,
    /// `http` or `tcp`.
    pub proto: &'static str,
}

/// Cumulative figures of one edge from one side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeTotals {
    /// Requests (http) or flows (tcp).
    pub total: f64,
    /// Of which succeeded: not 5xx (http), or ended without flags (tcp).
    pub ok: f64,
    /// Bytes both ways (tcp).
    pub bytes: f64,
    /// Refused by a limit: 429 (http), flags `RL` or `UO` (tcp).
    pub limited: f64,
    /// Duration histogram: upper bound → cumulative count.
    pub buckets: BTreeMap<OrdF64, f64>,
}

/// An `f64` bucket bound usable as a map key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrdF64(pub f64);

impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Every edge's totals, from both sides, summed over the scraped sidecars.
pub type Totals = BTreeMap<(EdgeKey, bool), EdgeTotals>;

fn edge_of(s: &Sample, proto: &'static str) -> Option<(EdgeKey, bool)> {
    let key = EdgeKey {
        source: s.label("source_service")?.to_owned(),
        destination: s.label("destination_service")?.to_owned(),
        version: s.label("destination_version")?.to_owned(),
        proto,
    };
    Some((key, s.label("direction")? == "outbound"))
}

/// Adds one scrape's samples to `totals`.
pub fn add(totals: &mut Totals, samples: &[Sample]) {
    for s in samples {
        let (proto, field) = match s.name.as_str() {
            "halyard_requests_total" => ("http", Field::Count),
            "halyard_request_duration_seconds_bucket" => ("http", Field::Bucket),
            "halyard_tcp_connections_total" => ("tcp", Field::Count),
            "halyard_tcp_connection_duration_seconds_bucket" => ("tcp", Field::Bucket),
            "halyard_tcp_bytes_total" => ("tcp", Field::Bytes),
            _ => continue,
        };
        let Some(key) = edge_of(s, proto) else {
            continue;
        };
        let t = totals.entry(key).or_default();
        match field {
            Field::Count => {
                t.total += s.value;
                if succeeded(s) {
                    t.ok += s.value;
                }
                if limited(s) {
                    t.limited += s.value;
                }
            }
            Field::Bytes => t.bytes += s.value,
            Field::Bucket => {
                let le = s.label("le").and_then(|v| v.parse::<f64>().ok());
                if let Some(le) = le {
                    *t.buckets.entry(OrdF64(le)).or_default() += s.value;
                }
            }
        }
    }
}

enum Field {
    Count,
    Bytes,
    Bucket,
}

/// Refused by a rate limit (429, `RL`) or a circuit breaker (`UO`).
fn limited(s: &Sample) -> bool {
    s.label("response_code") == Some("429")
        || matches!(s.label("response_flags"), Some("RL" | "UO"))
}

fn succeeded(s: &Sample) -> bool {
    promtext::succeeded(s.label("response_code"), s.label("response_flags"))
}

/// One table row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The edge.
    pub key: EdgeKey,
    /// Cumulative requests or flows.
    pub total: f64,
    /// Per second over the interval.
    pub rate: f64,
    /// Success share over the interval (over all time when the interval saw nothing).
    pub success: Option<f64>,
    /// Median duration, seconds.
    pub p50: Option<f64>,
    /// 99th percentile duration, seconds.
    pub p99: Option<f64>,
    /// Bytes per second over the interval (tcp).
    pub bytes_rate: f64,
    /// Requests or flows refused by a limit, per second over the interval.
    pub limited_rate: f64,
}

/// Rows from two scrapes `secs` apart (`before` empty: totals since start, rates 0). Each edge
/// is taken from its outbound side when any sidecar reported one.
pub fn rows(before: &Totals, after: &Totals, secs: f64) -> Vec<Row> {
    let mut out = Vec::new();
    for ((key, outbound), now) in after {
        if !outbound && after.contains_key(&(key.clone(), true)) {
            continue;
        }
        let prev = before.get(&(key.clone(), *outbound));
        out.push(row(key, now, prev, secs));
    }
    out
}

fn row(key: &EdgeKey, now: &EdgeTotals, prev: Option<&EdgeTotals>, secs: f64) -> Row {
    let zero = EdgeTotals::default();
    let prev = prev.unwrap_or(&zero);
    let window = diff(now, prev);
    // A quiet interval shows the figures since start rather than nothing.
    let basis = if window.total > 0.0 { &window } else { now };
    let per_sec = |d: f64| if secs > 0.0 { d / secs } else { 0.0 };
    Row {
        key: key.clone(),
        total: now.total,
        rate: per_sec(window.total),
        success: (basis.total > 0.0).then(|| basis.ok / basis.total),
        p50: quantile(&basis.buckets, 0.5),
        p99: quantile(&basis.buckets, 0.99),
        bytes_rate: per_sec(window.bytes),
        limited_rate: per_sec(window.limited),
    }
}

fn diff(now: &EdgeTotals, prev: &EdgeTotals) -> EdgeTotals {
    let sub = |a: f64, b: f64| (a - b).max(0.0);
    EdgeTotals {
        total: sub(now.total, prev.total),
        ok: sub(now.ok, prev.ok),
        bytes: sub(now.bytes, prev.bytes),
        limited: sub(now.limited, prev.limited),
        buckets: now
            .buckets
            .iter()
            .map(|(le, n)| (*le, sub(*n, prev.buckets.get(le).copied().unwrap_or(0.0))))
            .collect(),
    }
}

/// The `q` quantile of a histogram keyed by bucket bound (see [`promtext::quantile`]).
fn quantile(buckets: &BTreeMap<OrdF64, f64>, q: f64) -> Option<f64> {
    promtext::quantile(buckets.iter().map(|(le, n)| (le.0, *n)), q)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |s| format!("{:.1}ms", s * 1000.0))
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.1}GB/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1}MB/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1}kB/s", b / 1e3),
        b => format!("{b:.0}B/s"),
    }
}

/// The table: a header, then one line per edge, columns separated by spaces.
pub fn render(rows: &[Row]) -> String {
    let mut cells = vec![[
        "SOURCE",
        "DESTINATION",
        "VERSION",
        "PROTO",
        "TOTAL",
        "RPS",
        "SUCCESS",
        "P50",
        "P99",
        "BYTES/S",
        "LIMITED/S",
    ]
    .map(str::to_owned)];
    for r in rows {
        let success = r
            .success
            .map_or_else(|| "-".to_owned(), |s| format!("{:.1}%", s * 100.0));
        cells.push([
            r.key.source.clone(),
            r.key.destination.clone(),
            r.key.version.clone(),
            r.key.proto.to_owned(),
            format!("{:.0}", r.total),
            format!("{:.1}", r.rate),
            success,
            ms(r.p50),
            ms(r.p99),
            human_bytes(r.bytes_rate),
            format!("{:.1}", r.limited_rate),
        ]);
    }
    let widths: Vec<usize> = (0..11)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for c in &cells {
        for (i, cell) in c.iter().enumerate() {
            let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
        }
        out = out.trim_end().to_owned();
        out.push('\n');
    }
    out
}

type Http = Client<HttpConnector, Empty<Bytes>>;

async fn scrape(client: &Http, admin: &str) -> anyhow::Result<Vec<Sample>> {
    let url = if admin.starts_with("http://") {
        format!("{}/metrics", admin.trim_end_matches('/'))
    } else {
        format!("http://{admin}/metrics")
    };
    let uri: http::Uri = url.parse().with_context(|| format!("--admin {admin}"))?;
    let get = async {
        let resp = client.get(uri).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .map_err(|_| anyhow!("{admin}: no answer within 3s"))?
        .with_context(|| format!("{admin}: cannot read /metrics"))?;
    if !status.is_success() {
        return Err(anyhow!("{admin}: /metrics answered {status}"));
    }
    Ok(parse(&String::from_utf8_lossy(&body)))
}

/// Scrapes every sidecar; unreachable ones are reported on stderr. Fails only if none answers.
async fn scrape_all(client: &Http, admins: &[String]) -> anyhow::Result<Totals> {
    let mut totals = Totals::new();
    let mut answered = 0;
    let mut last_err = None;
    for admin in admins {
        match scrape(client, admin).await {
            Ok(samples) => {
                add(&mut totals, &samples);
                answered += 1;
            }
            Err(e) => {
                eprintln!("warning: {e:#}");
                last_err = Some(e);
            }
        }
    }
    match (answered, last_err) {
        (0, Some(e)) => Err(e),
        _ => Ok(totals),
    }
}

/// Runs `halyard ctl top`.
pub async fn run(args: &TopArgs) -> anyhow::Result<()> {
    let client: Http =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(HttpConnector::new());
    let mut before = scrape_all(&client, &args.admin).await?;
    let mut at = Instant::now();
    loop {
        tokio::time::sleep(args.interval).await;
        let after = match scrape_all(&client, &args.admin).await {
            Ok(t) => t,
            // Live, a sidecar restarting is no reason to quit: show why and try again.
            Err(e) if !args.once => {
                println!("\x1b[2J\x1b[Hno sidecar answered: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let table = render(&rows(&before, &after, (now - at).as_secs_f64()));
        if args.once {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then redraw.
        print!("\x1b[2J\x1b[H{table}");
        (before, at) = (after, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP halyard_requests_total HTTP requests
# TYPE halyard_requests_total counter
halyard_requests_total{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="200"} 90
halyard_requests_total{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="503"} 10
halyard_requests_total{direction="inbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="200"} 90
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="200",le="0.01"} 50
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="200",le="0.1"} 90
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="200",le="+Inf"} 90
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="503",le="0.01"} 0
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="503",le="0.1"} 0
halyard_request_duration_seconds_bucket{direction="outbound",source_service="pp",destination_service="reviews",destination_version="v1",response_code="503",le="+Inf"} 10
halyard_tcp_connections_total{direction="inbound",source_service="a\"b",destination_service="db",destination_version="v2",response_flags="-"} 4
halyard_tcp_bytes_total{direction="inbound",source_service="a\"b",destination_service="db",destination_version="v2",stream="sent"} 400
halyard_quic_connections 1
"#;

    #[test]
    fn parses_every_sample_of_a_scrape() {
        let s = parse(SCRAPE);
        assert_eq!(s.len(), 12);
        assert_eq!(s[9].label("source_service"), Some("a\"b"));
        assert_eq!(s[11].name, "halyard_quic_connections");
        assert_eq!(s[11].value, 1.0);
    }

    /// The rows of one scrape over 2 s from nothing.
    fn rows_of_one_scrape() -> Vec<Row> {
        let mut after = Totals::new();
        add(&mut after, &parse(SCRAPE));
        rows(&Totals::new(), &after, 2.0)
    }

    fn http_row(rows: &[Row]) -> &Row {
        rows.iter().find(|r| r.key.proto == "http").unwrap()
    }

    #[test]
    fn rows_prefer_the_outbound_side_of_an_edge() {
        let rows = rows_of_one_scrape();
        assert_eq!(rows.len(), 2);
        assert_eq!(http_row(&rows).total, 100.0);
    }

    #[test]
    fn rows_compute_rates_over_the_interval() {
        let rows = rows_of_one_scrape();
        assert_eq!(http_row(&rows).rate, 50.0);
        let tcp = rows.iter().find(|r| r.key.proto == "tcp").unwrap();
        assert_eq!((tcp.total, tcp.bytes_rate), (4.0, 200.0));
    }

    #[test]
    fn rows_compute_the_success_ratio() {
        let rows = rows_of_one_scrape();
        assert_eq!(http_row(&rows).success, Some(0.9));
    }

    #[test]
    fn rows_compute_latency_quantiles() {
        let rows = rows_of_one_scrape();
        let http = http_row(&rows);
        let p50 = http.p50.unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        assert_eq!(http.p99, Some(0.1), "rank in +Inf: highest finite bound");
    }

    #[test]
    fn the_table_renders_a_row_per_edge_under_a_header() {
        let table = render(&rows_of_one_scrape());
        assert!(table.starts_with("SOURCE"), "{table}");
        assert!(table.contains("pp      reviews"), "{table}");
    }

    #[test]
    fn a_quiet_interval_shows_a_zero_rate_over_the_same_totals() {
        let mut t = Totals::new();
        add(&mut t, &parse(SCRAPE));
        let rows = rows(&t, &t, 1.0);
        let http = rows.iter().find(|r| r.key.proto == "http").unwrap();
        assert_eq!((http.total, http.rate), (100.0, 0.0));
        assert_eq!(http.success, Some(0.9));
    }

    #[test]
    fn refusals_by_limits_are_counted_per_edge() {
        let text = r#"halyard_requests_total{direction="inbound",source_service="pp",destination_service="ratings",destination_version="v1",response_code="200"} 10
halyard_requests_total{direction="inbound",source_service="pp",destination_service="ratings",destination_version="v1",response_code="429"} 30
halyard_tcp_connections_total{direction="outbound",source_service="pp",destination_service="db",destination_version="v1",response_flags="UO"} 2
halyard_tcp_connections_total{direction="outbound",source_service="pp",destination_service="db",destination_version="v1",response_flags="RL"} 4
"#;
        let mut after = Totals::new();
        add(&mut after, &parse(text));
        let rows = rows(&Totals::new(), &after, 2.0);
        let limited: Vec<f64> = rows.iter().map(|r| r.limited_rate).collect();
        assert_eq!(limited, [3.0, 15.0]);
        assert!(render(&rows).lines().next().unwrap().ends_with("LIMITED/S"));
    }
}
