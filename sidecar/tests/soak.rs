//! Soak: mixed L4/L7 traffic at a steady rate through two calling sidecars to two versions of
//! a service, while every workload certificate is renewed (files rotated), an endpoint is
//! re-registered, and the route's weights change. No request or flow may fail; the process's
//! RSS and open descriptors, and the sidecars' flow tasks and QUIC connections (read from
//! their admin ports), are sampled into a curve.
//!
//! `cargo test` runs a few seconds of it. `make soak` runs it for `HALYARD_SOAK_SECS` (1,800)
//! at `HALYARD_SOAK_RPS` (1,000) with certificates renewed every 60 s, the endpoint every 1 s
//! and the weights every 10 s, and writes the figures and the curve to `$HALYARD_SOAK_REPORT`.
//! Everything runs in this one process (etcd aside), so RSS and descriptors are the whole
//! mesh's: four sidecars, the apps and the load generator. Each sample also holds the bytes
//! the process holds on the heap (a counting global allocator) and what glibc's malloc holds
//! besides (`mallinfo2`), so that a rising RSS can be told apart: a leak raises the live heap,
//! fragmentation raises malloc's free bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod counting;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::test_util::{
    call, get, http_client, metric, weighted_route, Mesh, TwoVersions,
};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: counting::Counting = counting::Counting;

fn knob(name: &str, short: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}

/// Resident set size of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[derive(Default)]
struct Tally {
    http_ok: AtomicU64,
    http_failed: AtomicU64,
    tcp_ok: AtomicU64,
    tcp_failed: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_under_churn() {
    let secs = knob("HALYARD_SOAK_SECS", 8);
    let rps = knob("HALYARD_SOAK_RPS", 200);
    let cert_every = Duration::from_secs(knob("HALYARD_SOAK_CERT_EVERY_SECS", 2));
    let rereg_every = Duration::from_millis(knob("HALYARD_SOAK_REREG_EVERY_MS", 1000));
    let route_every = Duration::from_secs(knob("HALYARD_SOAK_ROUTE_EVERY_SECS", 2));
    let sample_every = Duration::from_secs(knob("HALYARD_SOAK_SAMPLE_SECS", 1));
    let etcd = Arc::new(
        tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .unwrap(),
    );
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    let extra =
        "[telemetry]\nrefresh_interval = \"500ms\"\n[outlier]\nconsecutive_failures = 1000\n";
    let TwoVersions {
        servers,
        callers,
        apps: _apps,
    } = TwoVersions::start(&mesh, 2, extra).await;

    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    // One request or flow per tick, alternating L7 and L4, spread over the callers.
    let workers = 16u64;
    let every = Duration::from_secs_f64(workers as f64 / rps as f64);
    for w in 0..workers {
        let caller = &callers[(w % 2) as usize];
        let (http, tcp) = (caller.upstream(0), caller.upstream(1));
        let (tally, stop) = (tally.clone(), stop.clone());
        load.spawn(async move {
            let client = http_client();
            let mut tick = tokio::time::interval(every);
            let mut n = w;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                n += 1;
                if n % 2 == 0 {
                    let req = http::Request::get(format!("http://{http}/soak"))
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap();
                    let ok = matches!(client.request(req).await, Ok(r) if r.status() == 200);
                    let c = if ok {
                        &tally.http_ok
                    } else {
                        &tally.http_failed
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                } else {
                    let msg = format!("{n}");
                    let ok =
                        call(tcp, msg.as_bytes()).await.ok() == Some(format!("r:{n}").into_bytes());
                    let c = if ok { &tally.tcp_ok } else { &tally.tcp_failed };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    // Samples come every SOAK_SAMPLE_SECS (10 s in `make soak`), as long as the admin port keeps
    // an idle connection: a connection each.
    let admin_client = halyard_sidecar::test_util::http_client_fresh();
    let start = Instant::now();
    let (mut next_cert, mut next_rereg, mut next_route, mut next_sample) =
        (cert_every, rereg_every, route_every, Duration::ZERO);
    let (mut renewals, mut reregs, mut route_changes) = (0u64, 0u64, 0u64);
    let mut curve = Vec::new();
    let v2_key = format!(
        "/halyard/default/endpoints/reviews/{}",
        servers[1].started.id
    );
    while start.elapsed() < Duration::from_secs(secs) {
        let now = start.elapsed();
        if now >= next_cert {
            for s in &servers {
                mesh.renew(s, "reviews");
            }
            for c in &callers {
                mesh.renew(c, "productpage");
            }
            renewals += 1;
            next_cert += cert_every;
        }
        if now >= next_rereg {
            let (e, key) = (etcd.clone(), v2_key.clone());
            tokio::task::spawn_blocking(move || {
                e.etcdctl_ok(&["put", &key, "--ignore-value", "--ignore-lease"])
            })
            .await
            .unwrap();
            reregs += 1;
            next_rereg += rereg_every;
        }
        if now >= next_route {
            route_changes += 1;
            mesh.apply(&weighted_route(if route_changes % 2 == 0 {
                50
            } else {
                80
            }))
            .await;
            next_route += route_every;
        }
        if now >= next_sample {
            let mut flow_tasks = 0.0;
            let mut quic = 0.0;
            for s in servers.iter().chain(&callers) {
                let (_, m) = get(&admin_client, s.started.admin, "/metrics").await;
                flow_tasks += metric(&m, "halyard_flow_tasks", &[]);
                quic += metric(&m, "halyard_quic_connections", &[]);
            }
            curve.push(serde_json::json!({
                "t_s": now.as_secs(), "rss_kib": rss_kib(), "fds": open_fds(),
                "heap_kib": counting::live_bytes() / 1024, "malloc_kib": counting::malloc_kib(),
                "flow_tasks": flow_tasks, "quic_connections": quic,
                "http_ok": tally.http_ok.load(Ordering::Relaxed), "tcp_ok": tally.tcp_ok.load(Ordering::Relaxed),
            }));
            next_sample += sample_every;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    let reloads: u64 = servers
        .iter()
        .chain(&callers)
        .map(|s| *s.started.reloads.borrow())
        .sum();
    let figures = serde_json::json!({
        "secs": secs, "rps_target": rps, "renewals": renewals, "identity_reloads_seen": reloads,
        "reregistrations": reregs, "route_changes": route_changes,
        "http_ok": tally.http_ok.load(Ordering::SeqCst), "http_failed": tally.http_failed.load(Ordering::SeqCst),
        "tcp_ok": tally.tcp_ok.load(Ordering::SeqCst), "tcp_failed": tally.tcp_failed.load(Ordering::SeqCst),
        "curve": curve,
    });
    eprintln!("{figures}");
    if let Ok(path) = std::env::var("HALYARD_SOAK_REPORT") {
        std::fs::write(path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    assert_eq!(tally.http_failed.load(Ordering::SeqCst), 0);
    assert_eq!(tally.tcp_failed.load(Ordering::SeqCst), 0);
    assert!(reloads > 0, "no certificate renewal was picked up");
    for s in callers.into_iter().chain(servers) {
        s.shutdown().await.unwrap();
    }
    drop(etcd);
}
