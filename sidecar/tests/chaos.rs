//! etcd failing under a fleet of sidecars carrying load: etcd killed and restarted, etcd
//! answering slowly, one sidecar cut off from etcd, and a compaction storm during writes. The
//! data plane must not notice (no failed request to a healthy endpoint, no slower requests),
//! staleness must be reported while etcd is away, and every sidecar must converge to exactly
//! etcd's state once it is back.
//!
//! `cargo test` runs short versions. `make chaos` runs the long ones (20 sidecars, 30 s and
//! 60 s outages, 1,000 writes with 100 compactions) through the same code, sized by
//! environment variables, and appends each run's figures as a JSON line to
//! `$HALYARD_CHAOS_REPORT`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_registry::admin::Admin;
use halyard_registry::model::parse_documents;
use halyard_registry::test_util::{EtcdCluster, EtcdServer};
use halyard_sidecar::config::Config;
use halyard_sidecar::test_util::{
    http_app, http_client, loopback_ip, metric, AppBehavior, HttpApp, Mesh, Sidecar, Spec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A size from the environment (`make chaos`), or the short default.
fn knob(name: &str, short: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}

/// Appends one run's figures to `$HALYARD_CHAOS_REPORT` (and prints them).
fn report(scenario: &str, figures: serde_json::Value) {
    let line = serde_json::json!({ "scenario": scenario, "figures": figures }).to_string();
    eprintln!("{line}");
    if let Ok(path) = std::env::var("HALYARD_CHAOS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

// ---- A TCP proxy in front of etcd: pass, delay, or black-hole ----

/// Forwards TCP to `target`; every chunk can be held back by a delay, or dropped (a black
/// hole: connections stay open and nothing arrives, as behind an iptables DROP).
struct Proxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    blackhole: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let blackhole = Arc::new(AtomicBool::new(false));
        let (d, b) = (delay_ms.clone(), blackhole.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, d.clone(), b.clone()));
                tokio::spawn(pipe(sr, cw, d.clone(), b.clone()));
            }
        });
        Proxy {
            addr,
            delay_ms,
            blackhole,
            _task: task,
        }
    }

    fn url(&self) -> String {
        format!("etcd://{}", self.addr)
    }

    fn set_delay(&self, d: Duration) {
        self.delay_ms
            .store(u64::try_from(d.as_millis()).unwrap(), Ordering::SeqCst);
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

/// One direction: each chunk is due `delay` after it was read and written in order.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
    blackhole: Arc<AtomicBool>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if blackhole.load(Ordering::SeqCst) {
            continue;
        }
        let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

// ---- The fleet: one `reviews` sidecar and many `productpage` callers ----

struct Fleet {
    mesh: Mesh,
    _app: HttpApp,
    server: Sidecar,
    clients: Vec<Sidecar>,
}

const EXTRA: &str = "[telemetry]\nrefresh_interval = \"200ms\"\n";

/// `reviews` (HTTP) and `callers` sidecars of `productpage` calling it, all on `registry`
/// (one entry per sidecar: a caller whose entry differs from the first uses its own URL).
async fn fleet(mesh_url: String, registries: &[String], callers: usize) -> Fleet {
    fleet_with(mesh_url, registries, callers, "").await
}

/// [`fleet`] with `prefix` (top-level TOML) in every sidecar's config.
async fn fleet_with(
    mesh_url: String,
    registries: &[String],
    callers: usize,
    prefix: &str,
) -> Fleet {
    let host = loopback_ip();
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), mesh_url).await;
    let app = http_app(SocketAddr::new(host, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {} }}\n",
        app.addr.port()
    ))
    .await;
    let mut spec = Spec::new("reviews", "v1").app_host(host);
    spec.extra = EXTRA.into();
    spec.prefix = prefix.into();
    let server = start_on(&mesh, &spec, &registries[0]).await;
    let mut clients = Vec::new();
    for i in 0..callers {
        let mut spec = Spec::new("productpage", "v1").upstream("reviews", 9080);
        spec.extra = EXTRA.into();
        spec.prefix = prefix.into();
        let url = registries.get(i + 1).unwrap_or(&registries[0]);
        clients.push(start_on(&mesh, &spec, url).await);
    }
    for c in &clients {
        c.wait_endpoints("reviews", 1).await;
    }
    Fleet {
        mesh,
        _app: app,
        server,
        clients,
    }
}

/// Starts a sidecar of `mesh` whose registry is `url`.
async fn start_on(mesh: &Mesh, spec: &Spec, url: &str) -> Sidecar {
    let text = mesh.config_text(spec).replace(
        &format!("registry = {:?}", mesh.registry),
        &format!("registry = {url:?}"),
    );
    let path = mesh.dir.path().join(format!(
        "chaos-{}.toml",
        halyard_sidecar::test_util::rand_suffix()
    ));
    std::fs::write(&path, text).unwrap();
    let config = Arc::new(Config::load(&path).unwrap());
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(halyard_sidecar::run::run_until(
        config.clone(),
        stop.clone(),
        Some(tx),
    ));
    let started = rx.await.expect("sidecar failed to start");
    Sidecar {
        config,
        started,
        stop,
        task,
    }
}

impl Fleet {
    fn all(&self) -> impl Iterator<Item = &Sidecar> {
        std::iter::once(&self.server).chain(&self.clients)
    }

    /// Waits until every sidecar's `halyard_registry_stale_seconds` satisfies `f`; how long.
    async fn wait_staleness(&self, what: &str, f: impl Fn(f64) -> bool) -> Duration {
        let start = Instant::now();
        for s in self.all() {
            while !f(metric(
                &s.started.render_metrics(),
                "halyard_registry_stale_seconds",
                &[],
            )) {
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "staleness never {what}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        start.elapsed()
    }

    /// Waits until every sidecar's snapshot has the Service `name`; how long.
    async fn wait_service(&self, name: &str, within: Duration) -> Duration {
        let start = Instant::now();
        for s in self.all() {
            let mut rx = s.started.snapshot.clone();
            tokio::time::timeout(within, rx.wait_for(|snap| snap.service(name).is_some()))
                .await
                .unwrap_or_else(|_| panic!("{name} never reached {}", s.started.id))
                .unwrap();
        }
        start.elapsed()
    }

    async fn shutdown(self) {
        for c in self.clients {
            c.shutdown().await.unwrap();
        }
        self.server.shutdown().await.unwrap();
        drop(self.mesh);
    }
}

/// A Service named `name` (a marker written to watch it spread).
fn marker(name: &str, port: u16) -> String {
    format!(
        "kind: Service\nname: {name}\nports:\n  - {{ name: tcp, port: {port}, protocol: tcp }}\n"
    )
}

async fn apply(admin: &Admin, yaml: &str) {
    let objects = parse_documents("chaos", yaml).unwrap();
    admin.apply(&objects).await.unwrap();
}

// ---- Load: every caller sends requests at a steady rate ----

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Request latencies, microseconds.
    latencies: std::sync::Mutex<Vec<u64>>,
}

impl Tally {
    fn p(&self, q: f64) -> f64 {
        let mut l = self.latencies.lock().unwrap().clone();
        if l.is_empty() {
            return 0.0;
        }
        l.sort_unstable();
        let i = ((l.len() as f64 - 1.0) * q).round() as usize;
        l[i] as f64 / 1000.0
    }
}

/// Requests from every caller, one each `every`, until the returned token is cancelled.
fn load(
    fleet: &Fleet,
    every: Duration,
) -> (
    Arc<Tally>,
    CancellationToken,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let tally = Arc::new(Tally::default());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for c in &fleet.clients {
        let (addr, tally, stop) = (c.upstream(0), tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let start = Instant::now();
                let req = http::Request::get(format!("http://{addr}/load"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let ok = match client.request(req).await {
                    Ok(resp) => resp.status() == 200,
                    Err(_) => false,
                };
                let counter = if ok { &tally.ok } else { &tally.failed };
                counter.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(start.elapsed().as_micros()).unwrap();
                tally.latencies.lock().unwrap().push(us);
            }
        }));
    }
    (tally, stop, tasks)
}

async fn stop_load(stop: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
}

// ---- Scenarios ----

/// etcd is killed (SIGKILL) for a while, then restarted on the same data: no request to the
/// healthy endpoint fails, every sidecar reports staleness while etcd is away and none after,
/// and a write made after the restart reaches every sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_then_restarted() {
    let sidecars = knob("HALYARD_CHAOS_SIDECARS", 4) as usize;
    let outage = Duration::from_secs(knob("HALYARD_CHAOS_OUTAGE_SECS", 2));
    let mut etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let f = fleet(etcd.url(), &[etcd.url()], sidecars - 1).await;
    let (tally, stop, tasks) = load(&f, Duration::from_millis(20));
    etcd = tokio::task::spawn_blocking(move || {
        etcd.stop();
        etcd
    })
    .await
    .unwrap();
    let killed = Instant::now();
    let noticed = f.wait_staleness("rose", |s| s > 0.0).await;
    tokio::time::sleep(outage.saturating_sub(killed.elapsed())).await;
    let stale_max = f
        .all()
        .map(|s| {
            metric(
                &s.started.render_metrics(),
                "halyard_registry_stale_seconds",
                &[],
            )
        })
        .fold(0.0, f64::max);
    etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .unwrap();
    let back = f.wait_staleness("fell", |s| s == 0.0).await;
    let admin = Admin::connect(&etcd.url(), "default", Duration::from_secs(3))
        .await
        .unwrap();
    apply(&admin, &marker("after-restart", 7000)).await;
    let spread = f
        .wait_service("after-restart", Duration::from_secs(20))
        .await;
    stop_load(stop, tasks).await;
    let (ok, failed) = (
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
    );
    report(
        "etcd_killed_then_restarted",
        serde_json::json!({
            "sidecars": sidecars, "outage_s": outage.as_secs_f64(), "requests_ok": ok,
            "requests_failed": failed, "staleness_noticed_by_all_s": noticed.as_secs_f64(),
            "staleness_max_s": stale_max, "staleness_zero_after_restart_s": back.as_secs_f64(),
            "write_after_restart_reached_all_s": spread.as_secs_f64(),
            "p50_ms": tally.p(0.5), "p99_ms": tally.p(0.99),
        }),
    );
    assert_eq!(failed, 0, "{ok} ok");
    assert!(ok > 0);
    f.shutdown().await;
    drop(etcd);
}

/// etcd answers only after a delay each way (1.6 s; 2 s in `make chaos`), for longer than the
/// endpoints' lease TTL:
/// requests through the mesh are no slower (the data path never waits for the registry), none
/// fails, and no endpoint expires (a renewal is waited for as long as its lease lives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_answering_slowly_does_not_slow_the_data_plane() {
    let sidecars = knob("HALYARD_CHAOS_SIDECARS", 4) as usize;
    let slow_for = Duration::from_secs(knob("HALYARD_CHAOS_SLOW_SECS", 12));
    // Each way; past 1.5 s a round trip outlasts the registry's 3 s request timeout.
    let delay = Duration::from_millis(knob("HALYARD_CHAOS_SLOW_DELAY_MS", 1600));
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let proxy = Proxy::start(etcd.endpoint().parse().unwrap()).await;
    // Leases far shorter than the slow period, but longer than a renewal's round trip: each
    // endpoint must stay registered throughout.
    let lease_secs = (2 * delay).as_secs_f64().ceil() as u64 + 1;
    let lease_secs = knob("HALYARD_CHAOS_SLOW_LEASE_SECS", lease_secs);
    let lease = format!("lease_ttl = \"{lease_secs}s\"\n");
    halyard_sidecar::test_util::init_logs();
    let f = fleet_with(etcd.url(), &[proxy.url()], sidecars - 1, &lease).await;
    let (quiet, stop, tasks) = load(&f, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_load(stop, tasks).await;
    proxy.set_delay(delay);
    let (slow, stop, tasks) = load(&f, Duration::from_millis(20));
    let admin = Admin::connect(&etcd.url(), "default", Duration::from_secs(3))
        .await
        .unwrap();
    let slow_since = Instant::now();
    apply(&admin, &marker("while-slow", 7001)).await;
    let spread = f.wait_service("while-slow", Duration::from_secs(30)).await;
    tokio::time::sleep(slow_for.saturating_sub(slow_since.elapsed())).await;
    stop_load(stop, tasks).await;
    proxy.set_delay(Duration::ZERO);
    report(
        "etcd_slow",
        serde_json::json!({
            "sidecars": sidecars, "slow_s": slow_for.as_secs_f64(), "delay_each_way_ms": delay.as_millis(), "lease_ttl_s": lease_secs,
            "quiet_p50_ms": quiet.p(0.5), "quiet_p99_ms": quiet.p(0.99),
            "slow_p50_ms": slow.p(0.5), "slow_p99_ms": slow.p(0.99),
            "slow_requests_ok": slow.ok.load(Ordering::SeqCst),
            "slow_requests_failed": slow.failed.load(Ordering::SeqCst),
            "write_while_slow_reached_all_s": spread.as_secs_f64(),
        }),
    );
    assert_eq!(slow.failed.load(Ordering::SeqCst), 0);
    assert_eq!(quiet.failed.load(Ordering::SeqCst), 0);
    // Generous: far below the etcd delay that waiting on the registry would add.
    assert!(
        slow.p(0.99) < 1000.0,
        "p99 {} ms with etcd slow",
        slow.p(0.99)
    );
    f.shutdown().await;
    drop(etcd);
}

/// One sidecar's etcd traffic is black-holed (connections open, nothing arrives) while
/// Services change: it keeps serving its snapshot, reports staleness, and converges within
/// seconds of the cut ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sidecar_cut_from_etcd() {
    let sidecars = knob("HALYARD_CHAOS_SIDECARS", 4) as usize;
    let cut_for = Duration::from_secs(knob("HALYARD_CHAOS_CUT_SECS", 12));
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let proxy = Proxy::start(etcd.endpoint().parse().unwrap()).await;
    // The first caller alone goes through the proxy.
    let urls = [etcd.url(), proxy.url()];
    let f = fleet(etcd.url(), &urls, sidecars - 1).await;
    let cut = &f.clients[0];
    let (tally, stop, tasks) = load(&f, Duration::from_millis(20));
    proxy.set_blackhole(true);
    let started = Instant::now();
    let admin = Admin::connect(&etcd.url(), "default", Duration::from_secs(3))
        .await
        .unwrap();
    let mut changes = 0;
    while started.elapsed() < cut_for {
        apply(&admin, &marker(&format!("cut-{changes}"), 7100 + changes)).await;
        changes += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stale = metric(
        &cut.started.render_metrics(),
        "halyard_registry_stale_seconds",
        &[],
    );
    let has_last = cut
        .started
        .snapshot
        .borrow()
        .service(&format!("cut-{}", changes - 1))
        .is_some();
    proxy.set_blackhole(false);
    let healed = Instant::now();
    let last = format!("cut-{}", changes - 1);
    let mut rx = cut.started.snapshot.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.service(&last).is_some()),
    )
    .await
    .expect("the cut sidecar never converged")
    .unwrap();
    let converged = healed.elapsed();
    stop_load(stop, tasks).await;
    let failed = tally.failed.load(Ordering::SeqCst);
    report(
        "one_sidecar_cut",
        serde_json::json!({
            "sidecars": sidecars, "cut_s": cut_for.as_secs_f64(), "changes_during_cut": changes,
            "staleness_at_end_of_cut_s": stale, "had_last_change_before_heal": has_last,
            "converged_after_heal_s": converged.as_secs_f64(),
            "requests_ok": tally.ok.load(Ordering::SeqCst), "requests_failed": failed,
        }),
    );
    assert_eq!(failed, 0);
    // Staleness counts from the last message heard (an idle watch hears one every 5 s).
    let least = cut_for.as_secs_f64() - 6.0;
    assert!(
        stale >= least,
        "staleness {stale} s after a {cut_for:?} cut"
    );
    f.shutdown().await;
    drop(etcd);
}

/// Writes flow while etcd is compacted again and again to its latest revision: every sidecar
/// ends with exactly etcd's final content (compared as a digest of every object).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_storm_converges_to_etcds_state() {
    let sidecars = knob("HALYARD_CHAOS_SIDECARS", 4) as usize;
    let writes = knob("HALYARD_CHAOS_WRITES", 200);
    let compactions = knob("HALYARD_CHAOS_COMPACTIONS", 20);
    let etcd = Arc::new(
        tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .unwrap(),
    );
    let f = fleet(etcd.url(), &[etcd.url()], sidecars - 1).await;
    let admin = Admin::connect(&etcd.url(), "default", Duration::from_secs(3))
        .await
        .unwrap();
    let every = (writes / compactions.max(1)).max(1);
    let mut compacted = 0;
    let start = Instant::now();
    for k in 0..writes {
        let port = 1000 + u16::try_from(k).unwrap();
        apply(&admin, &marker(&format!("storm-{}", k % 50), port)).await;
        if k % every == every - 1 && compacted < compactions {
            let e = etcd.clone();
            tokio::task::spawn_blocking(move || compact_now(&e))
                .await
                .unwrap();
            compacted += 1;
        }
    }
    let written = start.elapsed();
    let truth = etcd_content(&etcd.url()).await;
    let converge = Instant::now();
    for s in f.all() {
        let mut rx = s.started.snapshot.clone();
        let same = tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|snap| snap.content() == truth),
        )
        .await;
        assert!(
            same.is_ok(),
            "{} never matched etcd's content",
            s.started.id
        );
    }
    report(
        "compaction_storm",
        serde_json::json!({
            "sidecars": sidecars, "writes": writes, "compactions": compacted,
            "writes_took_s": written.as_secs_f64(), "digest": digest(&truth),
            "all_matched_within_s": converge.elapsed().as_secs_f64(),
        }),
    );
    f.shutdown().await;
}

/// Compacts etcd to its current revision.
fn compact_now(etcd: &EtcdServer) {
    let status = etcd.etcdctl_ok(&["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let rev = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
    etcd.etcdctl_ok(&["compact", &rev.to_string()]);
}

/// etcd's content as a fresh reader sees it.
async fn etcd_content(url: &str) -> String {
    let reg = halyard_registry::open_with(url, halyard_registry::Options::new("default"))
        .await
        .unwrap();
    let content = reg.watch().borrow().content();
    content
}

fn digest(content: &str) -> String {
    let mut h = DefaultHasher::new();
    content.hash(&mut h);
    format!("{:016x}", h.finish())
}

// ---- A 3-member etcd cluster losing quorum ----

/// Two of three etcd members are killed: no write succeeds (and the error says why), the
/// sidecars serve on and report staleness, and once the members are back a write reaches all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_losing_quorum() {
    let sidecars = knob("HALYARD_CHAOS_SIDECARS", 4) as usize;
    let outage = Duration::from_secs(knob("HALYARD_CHAOS_OUTAGE_SECS", 2));
    let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .unwrap();
    let url = cluster.url();
    let f = fleet(url.clone(), std::slice::from_ref(&url), sidecars - 1).await;
    let (tally, stop, tasks) = load(&f, Duration::from_millis(20));
    cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(1);
        cluster.kill(2);
        cluster
    })
    .await
    .unwrap();
    let lost = Instant::now();
    let noticed = f.wait_staleness("rose", |s| s > 0.0).await;
    let admin = Admin::connect(&url, "default", Duration::from_secs(3)).await;
    let refused = match admin {
        Ok(admin) => {
            let objects = parse_documents("chaos", &marker("no-quorum", 7200)).unwrap();
            admin
                .apply(&objects)
                .await
                .expect_err("a write without quorum succeeded")
                .to_string()
        }
        Err(e) => e.to_string(),
    };
    tokio::time::sleep(outage.saturating_sub(lost.elapsed())).await;
    cluster = tokio::task::spawn_blocking(move || {
        cluster.spawn(1);
        cluster.spawn(2);
        for i in 0..3 {
            cluster.wait_healthy(i);
        }
        cluster
    })
    .await
    .unwrap();
    let back = f.wait_staleness("fell", |s| s == 0.0).await;
    let admin = Admin::connect(&url, "default", Duration::from_secs(3))
        .await
        .unwrap();
    apply(&admin, &marker("quorum-back", 7201)).await;
    let spread = f.wait_service("quorum-back", Duration::from_secs(20)).await;
    stop_load(stop, tasks).await;
    let failed = tally.failed.load(Ordering::SeqCst);
    report(
        "etcd_quorum_lost",
        serde_json::json!({
            "sidecars": sidecars, "outage_s": outage.as_secs_f64(),
            "write_refused_with": refused, "staleness_noticed_by_all_s": noticed.as_secs_f64(),
            "staleness_zero_after_quorum_s": back.as_secs_f64(),
            "write_after_quorum_reached_all_s": spread.as_secs_f64(),
            "requests_ok": tally.ok.load(Ordering::SeqCst), "requests_failed": failed,
        }),
    );
    assert_eq!(failed, 0);
    assert!(
        refused.contains("leader")
            || refused.contains("unreachable")
            || refused.contains("timed out"),
        "{refused}"
    );
    f.shutdown().await;
    drop(cluster);
}

/// One member of three down leaves quorum intact: every write through a fresh connection (as
/// `halyard ctl` makes) succeeds, whichever members the client would have picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cluster_one_member_down_takes_writes() {
    let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .unwrap();
    let url = cluster.url();
    cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(2);
        // A new leader, if the killed member led.
        cluster.wait_healthy(0);
        cluster.wait_healthy(1);
        cluster
    })
    .await
    .unwrap();
    for i in 0..8 {
        let admin = Admin::connect(&url, "default", Duration::from_secs(3))
            .await
            .unwrap();
        apply(&admin, &marker(&format!("one-down-{i}"), 7300)).await;
    }
    drop(cluster);
}
