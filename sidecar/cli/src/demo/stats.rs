//! Edge figures from the sidecars' `/metrics` (parsed by [`crate::promtext`]): the window
//! arithmetic (counter deltas, histogram quantiles), all pure.
//!
//! An edge `source → destination` is read from the outbound side of every sidecar of `source`:
//! L7 requests (`halyard_requests_total`, `halyard_request_duration_seconds`) when the edge has
//! any, else L4 flows (`halyard_tcp_connections_total`,
//! `halyard_tcp_connection_duration_seconds`).

use std::collections::BTreeMap;

pub use crate::promtext::{parse, Sample};

/// Every sidecar's samples at one moment, keyed by sidecar name, with the service it fronts.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Sidecar name → (service, samples).
    pub sidecars: BTreeMap<String, (String, Vec<Sample>)>,
}

/// What one edge did in a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeStats {
    /// Requests (L7) or flows (L4) that ended.
    pub total: f64,
    /// Those that succeeded (status below 400, or a clean L4 close).
    pub ok: f64,
    /// Median duration, seconds.
    pub p50: Option<f64>,
    /// 99th percentile duration, seconds.
    pub p99: Option<f64>,
    /// Count per destination version.
    pub versions: BTreeMap<String, f64>,
    /// Whether the figures are L7 requests.
    pub l7: bool,
}

impl EdgeStats {
    /// Success share, 0.0 to 1.0 (1.0 when nothing happened).
    pub fn success(&self) -> f64 {
        if self.total > 0.0 {
            self.ok / self.total
        } else {
            1.0
        }
    }

    /// `v1 90% v2 10%`.
    pub fn split(&self) -> String {
        let all: f64 = self.versions.values().sum();
        if all <= 0.0 {
            return "-".into();
        }
        let parts: Vec<String> = self
            .versions
            .iter()
            .filter(|(_, n)| **n > 0.0)
            .map(|(v, n)| format!("{v} {:.0}%", 100.0 * n / all))
            .collect();
        parts.join(" ")
    }
}

/// Sum of `name` over the outbound samples of `source`'s sidecars toward `dest`, grouped by
/// `by` (or one group `""`).
fn grouped(scrape: &Scrape, source: &str, dest: &str, name: &str, by: &str) -> Labels2 {
    let mut out = Labels2::new();
    for (service, samples) in scrape.sidecars.values() {
        if service != source {
            continue;
        }
        for s in samples.iter().filter(|s| s.name == name) {
            let outbound = s.label("direction") == Some("outbound");
            if outbound && s.label("destination_service") == Some(dest) {
                let key = s.label(by).unwrap_or_default().to_owned();
                *out.entry(key).or_insert(0.0) += s.value;
            }
        }
    }
    out
}

type Labels2 = BTreeMap<String, f64>;

/// `after - before` per key, counting only sidecars present in both scrapes.
fn delta(before: &Scrape, after: &Scrape, f: impl Fn(&Scrape) -> Labels2) -> BTreeMap<String, f64> {
    let common = |s: &Scrape| Scrape {
        sidecars: s
            .sidecars
            .iter()
            .filter(|(k, _)| before.sidecars.contains_key(*k) && after.sidecars.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let (b, a) = (f(&common(before)), f(&common(after)));
    a.into_iter()
        .map(|(k, v)| {
            let d = (v - b.get(&k).copied().unwrap_or(0.0)).max(0.0);
            (k, d)
        })
        .collect()
}

/// The families an edge is read from.
struct Families {
    count: &'static str,
    outcome: &'static str,
    histogram: &'static str,
}

const L7: Families = Families {
    count: "halyard_requests_total",
    outcome: "response_code",
    histogram: "halyard_request_duration_seconds_bucket",
};
const L4: Families = Families {
    count: "halyard_tcp_connections_total",
    outcome: "response_flags",
    histogram: "halyard_tcp_connection_duration_seconds_bucket",
};

/// What the edge `source → dest` did between two scrapes.
pub fn edge(before: &Scrape, after: &Scrape, source: &str, dest: &str) -> EdgeStats {
    let l7_seen = !grouped(after, source, dest, L7.count, "").is_empty();
    let fam = if l7_seen { L7 } else { L4 };
    let outcomes = delta(before, after, |s| {
        grouped(s, source, dest, fam.count, fam.outcome)
    });
    let ok_outcome = |o: &str| {
        let (code, flags) = if l7_seen {
            (Some(o), None)
        } else {
            (None, Some(o))
        };
        crate::promtext::succeeded(code, flags)
    };
    let versions = delta(before, after, |s| {
        grouped(s, source, dest, fam.count, "destination_version")
    });
    let buckets = delta(before, after, |s| {
        grouped(s, source, dest, fam.histogram, "le")
    });
    EdgeStats {
        // `+ 0.0`: an empty f64 sum is -0.0, printed as such.
        total: outcomes.values().sum::<f64>() + 0.0,
        ok: outcomes
            .iter()
            .filter(|(o, _)| ok_outcome(o))
            .map(|(_, n)| n)
            .sum(),
        p50: quantile(&buckets, 0.50),
        p99: quantile(&buckets, 0.99),
        versions: versions
            .into_iter()
            .filter(|(v, n)| *n > 0.0 && v != "unknown")
            .collect(),
        l7: l7_seen,
    }
}

/// The `q` quantile of a histogram whose buckets are keyed by their `le` text (see
/// [`crate::promtext::quantile`]); unparsable bounds are skipped.
fn quantile(buckets: &BTreeMap<String, f64>, q: f64) -> Option<f64> {
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, n)| Some((le.parse::<f64>().ok()?, *n)))
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    crate::promtext::quantile(bounds, q)
}

/// Sum over every sidecar of `service` of `name` samples whose labels include `filter`.
pub fn counter(scrape: &Scrape, service: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    scrape
        .sidecars
        .values()
        .filter(|(svc, _)| svc == service)
        .flat_map(|(_, samples)| samples.iter())
        .filter(|s| s.name == name)
        .filter(|s| filter.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// `counter` in `after` minus in `before`, never negative.
pub fn counter_delta(
    before: &Scrape,
    after: &Scrape,
    service: &str,
    name: &str,
    filter: &[(&str, &str)],
) -> f64 {
    (counter(after, service, name, filter) - counter(before, service, name, filter)).max(0.0)
}

/// Milliseconds with a sensible precision, or `-`.
pub fn ms(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s * 1000.0 < 10.0 => format!("{:.1}ms", s * 1000.0),
        Some(s) => format!("{:.0}ms", s * 1000.0),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# HELP halyard_requests_total Requests
halyard_requests_total{destination_service="reviews",destination_version="v1",direction="outbound",response_code="200",source_service="productpage"} 10
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v1",direction="outbound",source_service="productpage",le="0.01"} 10
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v1",direction="outbound",source_service="productpage",le="+Inf"} 10
"#;
    const AFTER: &str = r#"
halyard_requests_total{destination_service="reviews",destination_version="v1",direction="outbound",response_code="200",source_service="productpage"} 100
halyard_requests_total{destination_service="reviews",destination_version="v2",direction="outbound",response_code="200",source_service="productpage"} 8
halyard_requests_total{destination_service="reviews",destination_version="v2",direction="outbound",response_code="503",source_service="productpage"} 2
halyard_requests_total{destination_service="reviews",destination_version="v1",direction="inbound",response_code="200",source_service="productpage"} 999
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v1",direction="outbound",source_service="productpage",le="0.01"} 100
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v1",direction="outbound",source_service="productpage",le="+Inf"} 100
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v2",direction="outbound",source_service="productpage",le="0.01"} 0
halyard_request_duration_seconds_bucket{destination_service="reviews",destination_version="v2",direction="outbound",source_service="productpage",le="+Inf"} 10
"#;

    fn scrape(text: &str) -> Scrape {
        let mut s = Scrape::default();
        s.sidecars
            .insert("pp".into(), ("productpage".into(), parse(text)));
        s
    }

    #[test]
    fn edge_window_counts_only_the_delta_of_the_outbound_side() {
        let e = edge(&scrape(BEFORE), &scrape(AFTER), "productpage", "reviews");
        assert!(e.l7);
        assert_eq!(e.total, 100.0);
        assert_eq!(e.ok, 98.0);
        assert_eq!(e.versions["v1"], 90.0);
        assert_eq!(e.versions["v2"], 10.0);
        assert_eq!(e.split(), "v1 90% v2 10%");
        let p50 = e.p50.unwrap();
        assert!(p50 > 0.0 && p50 <= 0.01, "{p50}");
        // 10 of 100 are above the last finite bound: p99 reports that bound.
        assert_eq!(e.p99, Some(0.01));
    }

    #[test]
    fn l4_edges_read_flows() {
        let text = r#"halyard_tcp_connections_total{destination_service="ratings",destination_version="v1",direction="outbound",response_flags="-",source_service="reviews"} 5
halyard_tcp_connections_total{destination_service="ratings",destination_version="unknown",direction="outbound",response_flags="DENY",source_service="reviews"} 5
"#;
        let mut after = Scrape::default();
        after
            .sidecars
            .insert("r".into(), ("reviews".into(), parse(text)));
        let mut before = after.clone();
        before
            .sidecars
            .insert("r".into(), ("reviews".into(), vec![]));
        let e = edge(&before, &after, "reviews", "ratings");
        assert!(!e.l7);
        assert_eq!((e.total, e.ok), (10.0, 5.0));
        assert_eq!(e.split(), "v1 100%");
    }

    #[test]
    fn quantiles_interpolate() {
        let b: BTreeMap<String, f64> = [("0.001", 50.0), ("0.004", 100.0), ("+Inf", 100.0)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        let p75 = quantile(&b, 0.75).unwrap();
        assert!((p75 - 0.0025).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
    }
}
