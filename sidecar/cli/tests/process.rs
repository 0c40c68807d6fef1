//! Sidecars as the processes operators run (`halyard sidecar --config FILE`) against a real
//! etcd: killed with SIGKILL, drained with SIGTERM, started with a bad config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::test_util::{call, loopback_ip, metric, tagged_echo, Mesh, Spec};

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
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = spare.local_addr().unwrap();
    drop(spare);
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

    // The lease (3 s) runs out and the endpoint leaves the registry.
    s.pp.wait_endpoints("reviews", 1).await;
    let gone = killed.elapsed();
    assert!(
        gone <= Duration::from_secs(4),
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
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = spare.local_addr().unwrap();
    drop(spare);
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
fn free_port() -> SocketAddr {
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    spare.local_addr().unwrap()
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
    let text = mesh
        .config_text(&spec)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        )
        .replace(
            "port = 9080\nlisten = \"127.0.0.1:0\"",
            &format!("port = 9080\nlisten = \"{upstream}\""),
        );
    let path = mesh.dir.path().join("productpage.toml");
    std::fs::write(&path, text).unwrap();
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
