//! The load generator: pages of productpage at a steady rate through the ingress sidecar, one
//! user in five being `tester`, every request with a fresh `traceparent`. It records what the
//! user saw: served or failed, degraded (a dependency missing), which reviews version answered,
//! and the latency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::sample_app;

/// How long a page may take before it counts as failed.
const PAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight at most; beyond, ticks are skipped (and counted as failed).
const MAX_IN_FLIGHT: usize = 256;
/// Every n-th user is `tester`.
const TESTER_EVERY: u64 = 5;

/// One page as the user saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Status 200 with a JSON page.
    pub served: bool,
    /// Served without some dependency.
    pub degraded: bool,
    /// Sent as `x-user: tester`.
    pub tester: bool,
    /// Version of reviews in the page.
    pub reviews: Option<String>,
    /// Time to the whole answer.
    pub latency: Duration,
}

/// What a window of pages added up to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Pages asked for.
    pub pages: u64,
    /// Pages not served (error status, timeout, connection failure).
    pub failed: u64,
    /// Pages served without some dependency.
    pub degraded: u64,
    /// Pages asked for by `tester`.
    pub tester: u64,
    /// Of those, answered by reviews v3.
    pub tester_v3: u64,
    /// Reviews version per served page.
    pub versions: BTreeMap<String, u64>,
    /// Median latency.
    pub p50: Option<Duration>,
    /// 99th percentile latency.
    pub p99: Option<Duration>,
}

impl Tally {
    /// Adds up `records`.
    pub fn of(records: &[Record]) -> Tally {
        let mut t = Tally {
            pages: records.len() as u64,
            ..Tally::default()
        };
        let mut lat: Vec<Duration> = Vec::with_capacity(records.len());
        for r in records {
            t.failed += u64::from(!r.served);
            t.degraded += u64::from(r.served && r.degraded);
            t.tester += u64::from(r.tester);
            t.tester_v3 += u64::from(r.tester && r.reviews.as_deref() == Some("v3"));
            if let Some(v) = &r.reviews {
                *t.versions.entry(v.clone()).or_insert(0) += 1;
            }
            lat.push(r.latency);
        }
        lat.sort();
        t.p50 = percentile(&lat, 0.50);
        t.p99 = percentile(&lat, 0.99);
        t
    }

    /// Share of served pages with reviews `version`.
    pub fn share(&self, version: &str) -> f64 {
        let all: u64 = self.versions.values().sum();
        if all == 0 {
            return 0.0;
        }
        self.versions.get(version).copied().unwrap_or(0) as f64 / all as f64
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted.get(i).copied()
}

/// A running load generator; stops when dropped.
pub struct Load {
    records: Arc<Mutex<Vec<Record>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

impl Load {
    /// Starts sending `rps` pages a second to `url`.
    pub fn start(url: Uri, rps: u32) -> Load {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(generate(url, rps.max(1), records.clone(), stop.clone()));
        Load {
            records,
            stop,
            task,
        }
    }

    /// The number of pages recorded so far: a window starts and ends at such marks.
    pub fn mark(&self) -> usize {
        self.lock().len()
    }

    /// The pages recorded between two marks.
    pub fn window(&self, from: usize, to: usize) -> Tally {
        let r = self.lock();
        let to = to.min(r.len());
        Tally::of(&r[from.min(to)..to])
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn generate(url: Uri, rps: u32, records: Arc<Mutex<Vec<Record>>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        while inflight.try_join_next().is_some() {}
        n += 1;
        let tester = n % TESTER_EVERY == 0;
        if inflight.len() >= MAX_IN_FLIGHT {
            push(&records, failed(tester, Duration::ZERO));
            continue;
        }
        let (url, records) = (url.clone(), records.clone());
        inflight.spawn(async move {
            let r = page(&url, tester).await;
            push(&records, r);
        });
    }
}

fn push(records: &Mutex<Vec<Record>>, r: Record) {
    records.lock().unwrap_or_else(|p| p.into_inner()).push(r);
}

fn failed(tester: bool, latency: Duration) -> Record {
    Record {
        served: false,
        degraded: false,
        tester,
        reviews: None,
        latency,
    }
}

/// One page: GET with `x-user` and a new `traceparent`.
async fn page(url: &Uri, tester: bool) -> Record {
    let mut h = HeaderMap::new();
    let user = if tester { "tester" } else { "reader" };
    h.insert("x-user", HeaderValue::from_static(user));
    if let Ok(v) = HeaderValue::from_str(&traceparent()) {
        h.insert("traceparent", v);
    }
    let started = Instant::now();
    let result = sample_app::get(url, &h, PAGE_TIMEOUT).await;
    let latency = started.elapsed();
    let body: Value = match result {
        Ok((StatusCode::OK, body)) => match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return failed(tester, latency),
        },
        _ => return failed(tester, latency),
    };
    Record {
        served: true,
        degraded: body.get("degraded") == Some(&Value::Bool(true)),
        tester,
        reviews: body
            .pointer("/calls/reviews/version")
            .and_then(Value::as_str)
            .map(str::to_owned),
        latency,
    }
}

/// A W3C trace context header for a new sampled trace.
fn traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(served: bool, degraded: bool, tester: bool, v: &str, ms: u64) -> Record {
        Record {
            served,
            degraded,
            tester,
            reviews: (!v.is_empty()).then(|| v.to_owned()),
            latency: Duration::from_millis(ms),
        }
    }

    #[test]
    fn tally_adds_up() {
        let t = Tally::of(&[
            rec(true, false, false, "v1", 1),
            rec(true, true, true, "v3", 2),
            rec(false, false, true, "", 3),
            rec(true, false, false, "v2", 4),
        ]);
        assert_eq!((t.pages, t.failed, t.degraded), (4, 1, 1));
        assert_eq!((t.tester, t.tester_v3), (2, 1));
        assert!((t.share("v1") - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(t.p50, Some(Duration::from_millis(2)));
        assert_eq!(t.p99, Some(Duration::from_millis(4)));
        assert!(traceparent().starts_with("00-") && traceparent().len() == 55);
    }
}
