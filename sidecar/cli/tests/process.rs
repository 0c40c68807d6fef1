//! Sidecars as the processes operators run (`halyard sidecar --config FILE`) against a real
//! etcd: killed with SIGKILL, drained with SIGTERM, started with a bad config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::test_util::{
    call, http_app, http_call, http_client, loopback_ip, metric, tagged_echo, AppBehavior, Mesh,
    Spec,
};

fn spawn_sidecar(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["sidecar", "--config", config.to_str().unwrap()])
        .env("HALYARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A sidecar process killed when dropped, so a failed assertion does not leave it behind
/// (holding the test harness's stderr open).
/// The Python clients of the sidecar's traffic tests; `tcp-hold` holds a flood of connections.
const HOLD_CONNECTIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/clients/traffic.py");

struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sidecar process from `spec` with its admin listener on a port chosen here.
fn spawn_with_admin(mesh: &Mesh, spec: &Spec) -> (Proc, SocketAddr) {
    let admin = free_port();
    let text = mesh.config_text(spec).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let path = mesh
        .dir
        .path()
        .join(format!("{}-{}.toml", spec.service, admin.port()));
    std::fs::write(&path, text).unwrap();
    (Proc(spawn_sidecar(&path)), admin)
}

/// A mesh on etcd with two `reviews` instances as processes (tags a and b) and an in-process
/// `productpage` calling reviews.
struct Setup {
    _etcd: EtcdServer,
    mesh: Mesh,
    a: Proc,
    b: Proc,
    a_admin: SocketAddr,
    b_admin: SocketAddr,
    pp: halyard_sidecar::test_util::Sidecar,
    _apps: (
        halyard_sidecar::test_util::Echo,
        halyard_sidecar::test_util::Echo,
    ),
}

async fn setup() -> Setup {
    let (host_a, host_b) = (loopback_ip(), loopback_ip());
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    halyard_sidecar::test_util::init_logs();
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    let app_a = tagged_echo(SocketAddr::new(host_a, 0), "a").await;
    let port = app_a.addr.port();
    let app_b = tagged_echo(SocketAddr::new(host_b, port), "b").await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {port} }}\n"
    ))
    .await;
    let mut spec_a = Spec::new("reviews", "v1").app_host(host_a);
    let mut spec_b = Spec::new("reviews", "v1").app_host(host_b);
    // Top-level keys go before the first table. The two processes run the data plane on one
    // runtime thread per core (a) and on two worker threads (b).
    spec_a.prefix = "lease_ttl = \"3s\"\nworkers = 0\n".into();
    spec_b.prefix = "lease_ttl = \"3s\"\nworkers = 2\n".into();
    let (a, a_admin) = spawn_with_admin(&mesh, &spec_a);
    let (b, b_admin) = spawn_with_admin(&mesh, &spec_b);
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 2).await;
    Setup {
        _etcd: etcd,
        mesh,
        a,
        b,
        a_admin,
        b_admin,
        pp,
        _apps: (app_a, app_b),
    }
}

async fn tags(addr: SocketAddr, n: usize) -> (usize, usize, usize) {
    let (mut a, mut b, mut failed) = (0, 0, 0);
    for i in 0..n {
        match call(addr, format!("{i}").as_bytes()).await {
            Ok(out) if out.starts_with(b"a:") => a += 1,
            Ok(out) if out.starts_with(b"b:") => b += 1,
            _ => failed += 1,
        }
    }
    (a, b, failed)
}

// A SIGKILL's cost (one attempt at most) and the lease expiry after it: one kill of one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_routed_around() {
    let mut s = setup().await;
    let (a, b, failed) = tags(s.pp.upstream(0), 40).await;
    assert_eq!(failed, 0);
    assert!(
        a > 0 && b > 0,
        "both instances serve before the kill: a={a} b={b}"
    );

    s.b.kill().unwrap(); // SIGKILL: no deregistration, no goodbye.
    s.b.wait().unwrap();
    let killed = Instant::now();
    let (_, b_after, failed) = tags(s.pp.upstream(0), 100).await;
    assert_eq!(failed, 0, "the app saw failed connections after the kill");
    assert_eq!(b_after, 0);
    let m = s.pp.started.render_metrics();
    let retries = metric(
        &m,
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert!(
        retries <= 1.0,
        "{retries} retries: more than one failed attempt"
    );
    assert_eq!(
        metric(
            &m,
            "halyard_outlier_ejections_total",
            &[("destination_service", "reviews")]
        ),
        retries
    );

    // The lease (3 s) runs out and the endpoint leaves the registry: within the TTL plus 1.5 s,
    // room for etcd's expiry sweep (every 500 ms) and a loaded machine.
    s.pp.wait_endpoints("reviews", 1).await;
    let gone = killed.elapsed();
    assert!(
        gone <= Duration::from_millis(4500),
        "endpoint left after {gone:?}, lease TTL is 3 s"
    );
    s.a.kill().unwrap();
    s.a.wait().unwrap();
    s.pp.shutdown().await.unwrap();
    drop(s.mesh);
}

// Drain, immediate deregistration and exit status 0 are the stages of one SIGTERM to one process
// (b, on two data-plane worker threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_sidecar_cleanly() {
    let mut s = setup().await;
    assert_eq!(tags(s.pp.upstream(0), 10).await.2, 0);
    // `workers = 2`: a runtime of two worker threads; `workers = 0`: one per core.
    let client = halyard_sidecar::test_util::http_client();
    let workers = |admin| {
        let client = client.clone();
        async move {
            // The gauge is refreshed every second: wait for its first value.
            loop {
                let (_, text) = halyard_sidecar::test_util::get(&client, admin, "/metrics").await;
                let n = metric(&text, "halyard_runtime_workers", &[]);
                if n > 0.0 {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(workers(s.b_admin).await, 2.0);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(workers(s.a_admin).await, cores as f64);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(s.b.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Deregistration is immediate, not a lease expiry.
    s.pp.wait_endpoints("reviews", 1).await;
    let status = tokio::task::spawn_blocking(move || s.b.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "drained sidecar exit status {status:?}"
    );
    let (a, b, failed) = tags(s.pp.upstream(0), 20).await;
    assert_eq!((a, b, failed), (20, 0, 0));
    s.a.kill().unwrap();
    s.a.wait().unwrap();
    s.pp.shutdown().await.unwrap();
}

// The one-line error naming the field and the unbound address are two sides of one refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_before_anything_is_bound() {
    let mesh = Mesh::with_dir().await;
    let admin = free_port();
    let spec = Spec::new("reviews", "v1").upstream("ratings", 9080);
    let text = mesh
        .config_text(&spec)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        )
        .replace("port = 9080", "port = 99999");
    let path = mesh.dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["sidecar", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("outbound.upstreams[0].port"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // An unknown key is named too, on one line.
    std::fs::write(
        &path,
        mesh.config_text(&spec)
            .replace("[failure]\n", "[failure]\nretrys = 3\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["sidecar", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("failure.retrys") && err.contains("unknown field"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Nothing was bound: the admin address is still free.
    std::net::TcpListener::bind(admin).expect("admin address left free");
}

/// A port free on 127.0.0.1 a moment ago.
/// `spec`'s config for a sidecar process, its admin listener on `admin` and its upstream on
/// port 9080 on `upstream`, written into the mesh's folder.
fn config_listening(
    mesh: &Mesh,
    spec: &Spec,
    upstream: SocketAddr,
    admin: SocketAddr,
) -> std::path::PathBuf {
    let text = mesh
        .config_text(spec)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        )
        .replace(
            "port = 9080\nlisten = \"127.0.0.1:0\"",
            &format!("port = 9080\nlisten = \"{upstream}\""),
        );
    let path = mesh.dir.path().join(format!("{}.toml", spec.service));
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until the sidecar process with admin listener `admin` says it is ready (20 s at most).
async fn wait_ready(admin: SocketAddr) {
    let client = halyard_sidecar::test_util::http_client_fresh();
    let ready = Instant::now();
    while halyard_sidecar::test_util::try_get(&client, admin, "/readyz")
        .await
        .is_none_or(|(status, _)| status != 200)
    {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "sidecar not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port for the sidecar process to listen on, one the kernel will not hand to another socket
/// before the process binds it.
fn free_port() -> SocketAddr {
    halyard_registry::ports::free(halyard_registry::ports::Proto::Tcp).unwrap()
}

/// Out of file descriptors: a sidecar process under `RLIMIT_NOFILE` 128 whose app opens 300
/// connections to its upstream listener at once (`make chaos`: 20,000 against 512), with the listener cap raised past the limit so the
/// kernel's limit, not the cap, is met. The sidecar warns once, naming the listener and the
/// error; flows opened before carry on; the connections past the limit wait in the kernel's
/// backlog; once the app closes the flood, new flows work again. (Another listener cannot
/// accept either while no descriptor is free: descriptors are per process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_survived() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `make chaos` runs 20,000 connections against 512 descriptors.
    let knob = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let connections = knob("HALYARD_FD_FLOOD_CONNECTIONS", 300);
    let nofile = knob("HALYARD_FD_FLOOD_NOFILE", 128);
    halyard_sidecar::test_util::init_logs();
    let mesh = Mesh::with_dir().await;
    let mut app = tagged_echo("127.0.0.1:0".parse().unwrap(), "r").await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {} }}\n",
        app.addr.port()
    ))
    .await;
    let reviews = mesh.start(&Spec::new("reviews", "v1")).await;
    let (upstream, admin) = (free_port(), free_port());
    let mut spec = Spec::new("productpage", "v1").upstream("reviews", 9080);
    spec.extra = "[limits]\nmax_connections_per_listener = 100000\n".into();
    let path = config_listening(&mesh, &spec, upstream, admin);
    let mut pp = Proc(
        Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_halyard"))
            .args(["sidecar", "--config", path.to_str().unwrap()])
            .env("HALYARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The sidecar's log, line by line as it writes them, and all of it so far for failures.
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = pp.stderr.take().unwrap();
    let all = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            all.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = lines_tx.send(line);
        }
    });
    let log_text = || log.lock().unwrap().clone();
    wait_ready(admin).await;
    // Flows opened before the flood, their first half sent.
    let mut held = Vec::new();
    for i in 0..5 {
        let mut tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
        tcp.write_all(format!("before-{i}|").as_bytes())
            .await
            .unwrap();
        held.push(tcp);
    }
    // Each of them reached the app: established end to end before the flood.
    for _ in 0..held.len() {
        app.accepted.recv().await.unwrap();
    }
    // The flood: more connections than the sidecar has descriptors, opened at once. Past the
    // sidecar's descriptors and the listener's backlog the kernel drops SYNs and the app's
    // connects wait; those are counted, not failed. Held by child processes of at most 10,000
    // connections each, so that no process (this one holds the in-process peer) meets its
    // descriptor limit before the sidecar does.
    const PER_HOLDER: usize = 10_000;
    let mut holders: Vec<Proc> = (0..connections.div_ceil(PER_HOLDER))
        .map(|i| {
            let n = PER_HOLDER.min(connections - i * PER_HOLDER);
            Proc(
                Command::new("prlimit")
                    .arg(format!("--nofile={0}:{0}", n + 64))
                    .args(["--", "python3", HOLD_CONNECTIONS, "tcp-hold"])
                    .args([upstream.to_string(), n.to_string(), "5".into()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let (mut connected, mut waiting, mut refused) = (0usize, 0usize, 0usize);
    for mut holder in holders.iter_mut().map(|h| h.stdout.take().unwrap()) {
        let line = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(&mut holder)
                .read_line(&mut line)
                .map(|_| line)
        })
        .await
        .unwrap()
        .unwrap();
        let figures: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("holder said {line:?}: {e}"));
        let count = |k: &str| figures[k].as_u64().unwrap() as usize;
        connected += count("connected");
        waiting += count("waiting");
        refused += count("refused");
    }
    eprintln!(
        "{{\"scenario\":\"fd_exhaustion\",\"figures\":{{\"connections\":{connections},\"nofile\":{nofile},\"holders\":{},\"connected\":{connected},\"still_waiting_after_5s\":{waiting},\"refused\":{refused}}}}}",
        holders.len()
    );
    assert_eq!(refused, 0, "connections refused");
    if connections <= nofile + 900 {
        // Within the sidecar's descriptors plus the backlog: every connect completes.
        assert_eq!(waiting, 0, "connects waited although the backlog had room");
    }
    let warning = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.recv().await {
            if line.contains("accept failed (out of file descriptors?)") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("no warning about the descriptors:\n{}", log_text()));
    assert!(warning.contains("Too many open files"), "{warning}");
    assert!(warning.contains(&upstream.to_string()), "{warning}");
    // The flows opened before carry on through the exhaustion.
    for (i, mut tcp) in held.into_iter().enumerate() {
        let mut reply = Vec::new();
        let done = async {
            tcp.write_all(b"after").await?;
            tcp.shutdown().await?;
            tcp.read_to_end(&mut reply).await
        }
        .await;
        if let Err(e) = done {
            panic!(
                "flow {i} opened before the flood: {e}; sidecar log:\n{}",
                log_text()
            );
        }
        assert_eq!(reply, format!("r:before-{i}|after").as_bytes());
    }
    // The app closes the flood; the sidecar gets its descriptors back and serves new flows.
    for mut holder in holders {
        drop(holder.stdin.take());
        holder.wait().unwrap();
    }
    let recovering = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), call(upstream, b"again")).await {
            Ok(Ok(reply)) if reply == b"r:again" => break,
            other => assert!(
                recovering.elapsed() < Duration::from_secs(30),
                "no recovery: {other:?}"
            ),
        }
    }
    reviews.shutdown().await.unwrap();
}

/// The resident set and CPU time of a process, from `/proc/<pid>/status` and `/proc/<pid>/stat`.
fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of `pid` so far.
fn cpu_secs_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // In USER_HZ, which is 100 on Linux for every architecture Debian ships.
    ticks as f64 / 100.0
}

/// The highest RSS of `pid` seen by a sampler every 10 ms while it runs.
struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let peak = std::sync::Arc::new(AtomicU64::new(rss_kib_of(pid)));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        PeakRss {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// What a local app's floods cost the sidecar process (not the test process): a sidecar
/// started as `halyard sidecar` with a 1 s header read timeout, flooded on its HTTP upstream
/// listener by slow request heads (slowloris), h2 rapid reset (CVE-2023-44487) and CONTINUATION
/// floods, several connections at once, while a neighbour's GETs on other connections must all
/// succeed. For each phase the sidecar's RSS before, at its peak (sampled every 10 ms) and
/// after, and the CPU seconds it spent, printed as a JSON line (`make chaos` appends them to
/// `benches/results/reliability.jsonl`, with `HALYARD_APP_FLOOD_SLOW` slow heads and
/// `HALYARD_APP_FLOOD_H2` h2 connections per flood; the test runs 200 and 4). Bounded means:
/// the peak grows by at most 64 KiB per slow connection (plus 16 MiB), 64 MiB for the h2
/// floods, and every flooding connection is closed by the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_floods_cost_the_sidecar_process_bounded_memory_and_cpu() {
    use halyard_sidecar::test_util::h2_abuse::{
        continuation_flood, flood_h2, rapid_reset, ENHANCE_YOUR_CALM,
    };
    use halyard_sidecar::test_util::{http_app, http_call, http_client_fresh, AppBehavior};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let knob = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let slow = knob("HALYARD_APP_FLOOD_SLOW", 200);
    let h2_conns = knob("HALYARD_APP_FLOOD_H2", 4);
    halyard_sidecar::test_util::init_logs();
    let mesh = Mesh::with_dir().await;
    let host = loopback_ip();
    let app = http_app(SocketAddr::new(host, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {} }}\n",
        app.addr.port()
    ))
    .await;
    let reviews = mesh.start(&Spec::new("reviews", "v1").app_host(host)).await;
    let (upstream, admin) = (free_port(), free_port());
    let mut spec = Spec::new("productpage", "v1").upstream("reviews", 9080);
    spec.extra = format!(
        "[limits]\nheader_read_timeout = \"1s\"\nmax_connections_per_listener = {}\n",
        slow + h2_conns + 100
    );
    let path = config_listening(&mesh, &spec, upstream, admin);
    let pp = Proc(spawn_sidecar(&path));
    let pid = pp.id();
    wait_ready(admin).await;
    let client = http_client_fresh();
    // Warm: the peer connection up, the listener's first requests served.
    for _ in 0..50 {
        let (status, body, _) = http_call(&client, upstream, "GET", "/warm", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let neighbour = || async {
        let client = http_client_fresh();
        for _ in 0..20 {
            let (status, body, _) = http_call(&client, upstream, "GET", "/n", &[]).await;
            assert_eq!(status, 200, "neighbour: {body}");
        }
    };
    let mut report = Vec::new();
    let mut measure = |name: &str, conns: usize, before: u64, cpu0: f64, peak: u64, t0: Instant| {
        let after = rss_kib_of(pid);
        let line = serde_json::json!({
            "scenario": "app_flood_sidecar_resources",
            "figures": {
                "flood": name, "connections": conns, "secs": t0.elapsed().as_secs_f64(),
                "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_kib": after,
                "cpu_s": cpu_secs_of(pid) - cpu0,
            }
        });
        eprintln!("{line}");
        report.push((name.to_owned(), before, peak));
    };

    // Slowloris: each connection trickles its request head, a byte every 100 ms, until the
    // sidecar closes it at the header read timeout.
    let (before, cpu0, t0, sampler) = (
        rss_kib_of(pid),
        cpu_secs_of(pid),
        Instant::now(),
        PeakRss::start(pid),
    );
    let mut trickling = tokio::task::JoinSet::new();
    for _ in 0..slow {
        trickling.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let start = Instant::now();
            tcp.write_all(b"GET /slow HTTP/1.1\r\n").await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    r = tcp.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return start.elapsed(),
                        Ok(_) => {}
                    },
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if tcp.write_all(b"X").await.is_err() {
                            return start.elapsed();
                        }
                    }
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "a slow head was never closed"
                );
            }
        });
    }
    neighbour().await;
    let mut longest = Duration::ZERO;
    while let Some(took) = trickling.join_next().await {
        longest = longest.max(took.unwrap());
    }
    assert!(
        longest < Duration::from_secs(7),
        "slow heads held {longest:?}"
    );
    measure("slowloris", slow, before, cpu0, sampler.finish(), t0);

    // Rapid reset, then CONTINUATION floods: h2_conns connections at once each.
    for (name, bytes) in [
        ("h2 rapid reset, 10,000 streams each", rapid_reset(10_000)),
        (
            "h2 CONTINUATION flood, 100,000 frames each",
            continuation_flood(100_000),
        ),
    ] {
        let (before, cpu0, t0, sampler) = (
            rss_kib_of(pid),
            cpu_secs_of(pid),
            Instant::now(),
            PeakRss::start(pid),
        );
        let mut floods = tokio::task::JoinSet::new();
        for _ in 0..h2_conns {
            floods.spawn(flood_h2(upstream, bytes.clone()));
        }
        neighbour().await;
        while let Some(code) = floods.join_next().await {
            assert_eq!(code.unwrap(), Some(ENHANCE_YOUR_CALM), "{name}");
        }
        measure(name, h2_conns, before, cpu0, sampler.finish(), t0);
    }
    for (name, before, peak) in &report {
        let bound = if name == "slowloris" {
            16 * 1024 + 64 * slow as u64
        } else {
            64 * 1024
        };
        assert!(
            peak.saturating_sub(*before) <= bound,
            "{name}: RSS grew {} KiB, bound {bound} KiB",
            peak - before
        );
    }
    // Served as before.
    let (status, _, _) = http_call(&client, upstream, "GET", "/after", &[]).await;
    assert_eq!(status, 200);
    drop(pp);
    reviews.shutdown().await.unwrap();
}

/// A peer sidecar killed (SIGKILL: no CONNECTION_CLOSE) and started again at the same address,
/// as a systemd restart, a VM or a pod on the host network does. Its callers still hold a QUIC
/// connection to the dead process; the new process answers that connection's packets with a
/// stateless reset (RFC 9000 §10.3), made with the key the first process kept in its
/// `state_dir`. Every L4 flow and every GET after a restart succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_at_the_same_address_is_reached_at_once() {
    let host = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let echo = tagged_echo(SocketAddr::new(host, 0), "a").await;
    let web = http_app(SocketAddr::new(host, 0), "a", AppBehavior::default()).await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {} }}\n  - {{ name: http, port: 9081, protocol: http, targetPort: {} }}\n",
        echo.addr.port(),
        web.addr.port()
    ))
    .await;
    let quic = halyard_registry::ports::free(halyard_registry::ports::Proto::Udp).unwrap();
    let mut spec = Spec::new("reviews", "v1").app_host(host);
    spec.listen = Some(SocketAddr::new(host, quic.port()));
    let (mut server, admin) = spawn_with_admin(&mesh, &spec);
    let config = mesh
        .dir
        .path()
        .join(format!("reviews-{}.toml", admin.port()));
    wait_ready(admin).await;
    // No keep-alive PING reaches a new process before the first call does.
    let mut caller = Spec::new("productpage", "v1")
        .upstream("reviews", 9080)
        .upstream("reviews", 9081);
    caller.extra = "[transport]\nkeep_alive_interval_ms = 60000\nidle_timeout_ms = 120000\n".into();
    let pp = mesh.start(&caller).await;
    pp.wait_endpoints("reviews", 1).await;
    let client = http_client();
    let gets = |n: usize| {
        let client = client.clone();
        let upstream = pp.upstream(1);
        async move {
            let mut ok = 0;
            for _ in 0..n {
                let (status, _, _) = http_call(&client, upstream, "GET", "/", &[]).await;
                ok += usize::from(status == 200);
            }
            ok
        }
    };
    let (a, _, failed) = tags(pp.upstream(0), 5).await;
    assert_eq!((a, failed), (5, 0), "L4 before the restarts");
    assert_eq!(gets(5).await, 5, "GETs before the restarts");

    // The first call after each restart sends the first packet the new process gets on the old
    // connection; its stateless reset ends that connection and the attempt fails as "peer
    // restarted", then goes again on a new connection to the same (only) endpoint. With a key
    // made per process the reset went unrecognised and every call waited out its connect
    // timeout (20 of 20 L4 calls failed) until the caller's idle timeout ended the connection;
    // with the key but no second try at the same endpoint, the first call failed.
    for (round, l7_first) in [(1, true), (2, false)] {
        // Room for the server's delayed ACK (25 ms at most) of the last call's packets: with
        // nothing left in flight, the caller retransmits nothing to the new process.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.kill().unwrap();
        server.wait().unwrap();
        server = Proc(spawn_sidecar(&config));
        wait_ready(admin).await;
        let (ok_gets, (a, _, failed)) = if l7_first {
            let g = gets(20).await;
            (g, tags(pp.upstream(0), 20).await)
        } else {
            let t = tags(pp.upstream(0), 20).await;
            (gets(20).await, t)
        };
        assert_eq!((a, failed), (20, 0), "L4 calls after restart {round}");
        assert_eq!(ok_gets, 20, "GETs answered 200 after restart {round}");
    }
    let retries = metric(
        &pp.started.render_metrics(),
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert!(
        retries <= 2.0,
        "{retries} retries: one at most per restart (the first call's)"
    );
    assert!(
        std::fs::metadata(spec_state_dir(&config).join(halyard_sidecar::run::RESET_KEY_FILE))
            .is_ok(),
        "the key is kept in state_dir"
    );
    pp.shutdown().await.unwrap();
}

/// The `state_dir` a sidecar config file names.
fn spec_state_dir(config: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("state_dir = "))
        .unwrap();
    std::path::PathBuf::from(line.trim_matches('"'))
}
