//! Transport bench: one-stream throughput and 1 B / 1 KiB round trips through an HTTP/3 CONNECT
//! tunnel, beside raw quinn streams (same mTLS endpoints) and direct TCP, in one run, under two
//! runtime layouts:
//!
//! - `current_thread`: each side (client sidecar, server sidecar) on its own current_thread
//!   runtime and OS thread, like two single-threaded sidecar processes;
//! - `multi_thread`: each side on its own 2-worker multi-thread runtime.
//!
//! Everything runs on loopback in one process. Figures are medians of a few runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use halyard_certs::test_util::TestPki;
use halyard_certs::{CertResolver, SpiffeId, TrustBundle};
use halyard_transport::{
    serve, Handler, MeshEndpoint, Pool, Target, TransportConfig, TunnelRequest,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BULK: usize = 256 << 20;
const CHUNK: usize = 1 << 20;
const RUNS: usize = 3;
const RTT_WARMUP: usize = 100;
const RTT_ITERS: usize = 3000;
const RTT_ROUNDS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Layout {
    CurrentThread,
    MultiThread,
}

impl Layout {
    fn runtime(self) -> std::io::Result<tokio::runtime::Runtime> {
        match self {
            Layout::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Layout::MultiThread => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layout::CurrentThread => "current_thread",
            Layout::MultiThread => "multi_thread",
        }
    }
}

#[derive(Clone, Debug)]
struct Addrs {
    tunnel: SocketAddr,
    raw: SocketAddr,
    tcp: SocketAddr,
}

#[derive(Debug, Default, Serialize)]
struct Rtt {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

#[derive(Debug, Default, Serialize)]
struct Path {
    name: &'static str,
    throughput_mib_s: f64,
    rtt_1b: Rtt,
    rtt_1kib: Rtt,
}

#[derive(Debug, Serialize)]
struct LayoutResult {
    layout: Layout,
    paths: Vec<Path>,
}

/// The server sidecar's handler: `sink` counts bytes until FIN and answers the count, `echo`
/// copies back, `splice` forwards to the TCP app as the sidecar will.
struct BenchHandler {
    app: SocketAddr,
}

impl Handler for BenchHandler {
    async fn tunnel(&self, req: TunnelRequest) {
        let service = req.target().service().to_owned();
        let Ok(mut tunnel) = req.accept().await else {
            return;
        };
        let _ = match service.as_str() {
            "sink" => {
                let (r, w) = tokio::io::split(tunnel);
                count_then_reply(r, w).await
            }
            "splice" => match TcpStream::connect(self.app).await {
                Ok(mut app) => {
                    let _ = app.set_nodelay(true);
                    let (r, w) = app.split();
                    tunnel.splice(r, w).await.map(|_| ())
                }
                Err(_) => {
                    tunnel.abort();
                    Ok(())
                }
            },
            _ => {
                let (r, w) = tokio::io::split(tunnel);
                echo(r, w).await
            }
        };
    }
}

async fn count_then_reply<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    w.write_all(&total.to_be_bytes()).await?;
    w.shutdown().await
}

async fn echo<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await? {
            0 => return w.shutdown().await,
            n => {
                w.write_all(&buf[..n]).await?;
                w.flush().await?;
            }
        }
    }
}

/// Serves one raw quinn or TCP stream: the first byte picks sink (`s`) or echo (`e`).
async fn serve_raw<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    w: W,
) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    r.read_exact(&mut mode).await?;
    if mode[0] == b's' {
        count_then_reply(r, w).await
    } else {
        echo(r, w).await
    }
}

async fn start_servers(
    resolver: Arc<CertResolver>,
    bundle: Arc<TrustBundle>,
) -> anyhow::Result<Addrs> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let config = TransportConfig::default();
    let mesh = MeshEndpoint::new(resolver.clone(), bundle.clone(), config.clone(), any)?;
    let raw = MeshEndpoint::new(resolver, bundle, config, any)?;
    let tcp = TcpListener::bind(any).await?;
    let addrs = Addrs {
        tunnel: mesh.local_addr()?,
        raw: raw.local_addr()?,
        tcp: tcp.local_addr()?,
    };
    let handler = BenchHandler { app: addrs.tcp };
    tokio::spawn(serve(mesh, Arc::new(handler)));
    tokio::spawn(accept_raw(raw));
    tokio::spawn(accept_tcp(tcp));
    Ok(addrs)
}

async fn accept_raw(endpoint: MeshEndpoint) {
    while let Some(incoming) = endpoint.quinn().accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_raw(recv, send));
            }
        });
    }
}

async fn accept_tcp(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        tokio::spawn(serve_raw(r, w));
    }
}

/// The client side of every measurement.
struct Client {
    pool: Pool,
    raw: quinn::Connection,
    server_id: SpiffeId,
    addrs: Addrs,
    /// The client sidecar's outbound listener: app TCP → splice → tunnel `splice`.
    outbound: SocketAddr,
    _outbound_task: tokio::task::JoinHandle<()>,
}

/// The client sidecar: every accepted app connection becomes a tunnel, spliced.
async fn outbound_sidecar(listener: TcpListener, pool: Pool, peer: SocketAddr, id: SpiffeId) {
    let Ok(target) = Target::new("splice", 9000) else {
        return;
    };
    while let Ok((mut app, _)) = listener.accept().await {
        let _ = app.set_nodelay(true);
        let (pool, id, target) = (pool.clone(), id.clone(), target.clone());
        tokio::spawn(async move {
            if let Ok(mut tunnel) = pool
                .open_tcp(peer, &id, &target, http::HeaderMap::new())
                .await
            {
                let (r, w) = app.split();
                let _ = tunnel.splice(r, w).await;
            }
        });
    }
}

impl Client {
    async fn new(pki: &TestPki, server_id: SpiffeId, addrs: Addrs) -> anyhow::Result<Client> {
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let ep = MeshEndpoint::new(
            pki.resolver("client"),
            pki.bundle.clone(),
            TransportConfig::default(),
            any,
        )?;
        let raw = ep.connect(addrs.raw, &server_id).await?;
        let pool = Pool::new(ep);
        let listener = TcpListener::bind(any).await?;
        let outbound = listener.local_addr()?;
        let task = tokio::spawn(outbound_sidecar(
            listener,
            pool.clone(),
            addrs.tunnel,
            server_id.clone(),
        ));
        Ok(Client {
            pool,
            raw,
            server_id,
            addrs,
            outbound,
            _outbound_task: task,
        })
    }

    async fn tunnel(&self, service: &str) -> anyhow::Result<halyard_transport::Tunnel> {
        let target = Target::new(service, 9000)?;
        Ok(self
            .pool
            .open_tcp(
                self.addrs.tunnel,
                &self.server_id,
                &target,
                http::HeaderMap::new(),
            )
            .await?)
    }

    async fn quic(&self, mode: u8) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, recv) = self.raw.open_bi().await?;
        send.write_all(&[mode]).await?;
        Ok((send, recv))
    }

    /// A TCP connection to the app, through both sidecars when `via_sidecars`.
    async fn tcp_to(&self, mode: u8, via_sidecars: bool) -> anyhow::Result<TcpStream> {
        let addr = if via_sidecars {
            self.outbound
        } else {
            self.addrs.tcp
        };
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&[mode]).await?;
        Ok(s)
    }

    async fn tcp(&self, mode: u8) -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect(self.addrs.tcp).await?;
        s.set_nodelay(true)?;
        s.write_all(&[mode]).await?;
        Ok(s)
    }
}

async fn bulk_slices<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> anyhow::Result<Duration> {
    let data = vec![0x5au8; CHUNK];
    let (mut r, mut w) = tokio::io::split(stream);
    let start = Instant::now();
    for _ in 0..BULK / CHUNK {
        w.write_all(&data).await?;
    }
    w.shutdown().await?;
    let mut count = [0u8; 8];
    r.read_exact(&mut count).await?;
    anyhow::ensure!(
        u64::from_be_bytes(count) == BULK as u64,
        "sink counted {count:?}"
    );
    Ok(start.elapsed())
}

async fn bulk_chunks(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<Duration> {
    let data = Bytes::from(vec![0x5au8; CHUNK]);
    let start = Instant::now();
    for _ in 0..BULK / CHUNK {
        send.write_chunk(data.clone()).await?;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    anyhow::ensure!(
        u64::from_be_bytes(count) == BULK as u64,
        "sink counted {count:?}"
    );
    Ok(start.elapsed())
}

/// Times `iters` round trips of `size` bytes after `warmup` untimed ones.
async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    size: usize,
    iters: usize,
    samples: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    for i in 0..RTT_WARMUP + iters {
        let t = Instant::now();
        stream.write_all(&msg).await?;
        stream.flush().await?;
        stream.read_exact(&mut back).await?;
        if i >= RTT_WARMUP {
            samples.push(t.elapsed());
        }
    }
    Ok(())
}

fn summarize(mut samples: Vec<Duration>) -> Rtt {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len().max(1) as f64;
    let at = |q: usize| samples.get(samples.len() * q / 100).map_or(0.0, |d| us(*d));
    Rtt {
        p50_us: at(50),
        p99_us: at(99),
        mean_us: mean,
    }
}

/// Round trips on one open stream per path, interleaved in rounds so that drift of the
/// machine (other load, frequency) hits every path alike.
async fn measure_rtts(c: &Client, paths: &mut [Path]) -> anyhow::Result<()> {
    let mut tunnel = c.tunnel("echo").await?;
    let (s, r) = c.quic(b'e').await?;
    let mut quic = tokio::io::join(r, s);
    let mut tcp = c.tcp(b'e').await?;
    let mut piped = c.tcp_to(b'e', true).await?;
    let mut samples: Vec<[Vec<Duration>; 2]> = (0..4).map(|_| [Vec::new(), Vec::new()]).collect();
    let per_round = RTT_ITERS / RTT_ROUNDS;
    for _ in 0..RTT_ROUNDS {
        for (k, size) in [1usize, 1024].into_iter().enumerate() {
            ping_pong(&mut tunnel, size, per_round, &mut samples[0][k]).await?;
            ping_pong(&mut quic, size, per_round, &mut samples[1][k]).await?;
            ping_pong(&mut tcp, size, per_round, &mut samples[2][k]).await?;
            ping_pong(&mut piped, size, per_round, &mut samples[3][k]).await?;
        }
    }
    // The write_chunk row carries raw quinn's round trips; write_bytes and write_all have none.
    let names = [
        "h3_tunnel",
        "quinn_raw_write_chunk",
        "direct_tcp",
        "tcp_via_two_sidecars",
    ];
    for (name, [one, kib]) in names.into_iter().zip(samples) {
        if let Some(p) = paths.iter_mut().find(|p| p.name == name) {
            p.rtt_1b = summarize(one);
            p.rtt_1kib = summarize(kib);
        }
    }
    Ok(())
}

/// Median throughput, leaving out the first run: it warms the connection (congestion window,
/// path MTU discovery from 1200 bytes) and the allocator.
fn mib_s(times: &mut [Duration]) -> f64 {
    let times = &mut times[1..];
    times.sort();
    (BULK as f64 / (1 << 20) as f64) / times[times.len() / 2].as_secs_f64()
}

fn path(name: &'static str, times: &mut [Duration]) -> Path {
    Path {
        name,
        throughput_mib_s: mib_s(times),
        ..Path::default()
    }
}

async fn measure_tunnel(c: &Client) -> anyhow::Result<Path> {
    let mut times = Vec::new();
    for _ in 0..=RUNS {
        times.push(bulk_slices(c.tunnel("sink").await?).await?);
    }
    Ok(path("h3_tunnel", &mut times))
}

async fn measure_tunnel_bytes(c: &Client) -> anyhow::Result<Path> {
    let data = Bytes::from(vec![0x5au8; CHUNK]);
    let mut times = Vec::new();
    for _ in 0..=RUNS {
        let mut tunnel = c.tunnel("sink").await?;
        let start = Instant::now();
        for _ in 0..BULK / CHUNK {
            tunnel.write_bytes(data.clone()).await?;
        }
        tunnel.shutdown().await?;
        let mut count = [0u8; 8];
        tunnel.read_exact(&mut count).await?;
        anyhow::ensure!(
            u64::from_be_bytes(count) == BULK as u64,
            "sink counted {count:?}"
        );
        times.push(start.elapsed());
    }
    Ok(path("h3_tunnel_write_bytes", &mut times))
}

async fn measure_quic(c: &Client) -> anyhow::Result<(Path, Path)> {
    let (mut chunks, mut slices) = (Vec::new(), Vec::new());
    for _ in 0..=RUNS {
        let (s, r) = c.quic(b's').await?;
        chunks.push(bulk_chunks(s, r).await?);
        let (s, r) = c.quic(b's').await?;
        slices.push(bulk_slices(tokio::io::join(r, s)).await?);
    }
    Ok((
        path("quinn_raw_write_chunk", &mut chunks),
        path("quinn_raw_write_all", &mut slices),
    ))
}

async fn measure_tcp(c: &Client) -> anyhow::Result<(Path, Path)> {
    let mut times = Vec::new();
    for _ in 0..=RUNS {
        times.push(bulk_slices(c.tcp(b's').await?).await?);
    }
    let direct = path("direct_tcp", &mut times);
    let mut times = Vec::new();
    for _ in 0..=RUNS {
        times.push(bulk_slices(c.tcp_to(b's', true).await?).await?);
    }
    Ok((direct, path("tcp_via_two_sidecars", &mut times)))
}

fn run_layout(layout: Layout) -> anyhow::Result<LayoutResult> {
    let pki = TestPki::new("mesh.local");
    let server_id = pki.id("server");
    let (resolver, bundle) = (pki.resolver("server"), pki.bundle.clone());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        layout.runtime()?.block_on(async move {
            addr_tx.send(start_servers(resolver, bundle).await?)?;
            let _ = stop_rx.await;
            Ok(())
        })
    });
    let addrs = addr_rx.recv().context("server side failed to start")?;
    let paths = layout.runtime()?.block_on(async {
        let client = Client::new(&pki, server_id, addrs).await?;
        let tunnel = measure_tunnel(&client).await?;
        let (chunked, sliced) = measure_quic(&client).await?;
        let bytes = measure_tunnel_bytes(&client).await?;
        let (tcp, piped) = measure_tcp(&client).await?;
        let mut paths = vec![tunnel, bytes, chunked, sliced, tcp, piped];
        measure_rtts(&client, &mut paths).await?;
        anyhow::Ok(paths)
    })?;
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(LayoutResult { layout, paths })
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "n/a".to_owned()
    }
}

fn find<'a>(r: &'a LayoutResult, name: &str) -> &'a Path {
    static EMPTY: Path = Path {
        name: "",
        throughput_mib_s: 0.0,
        rtt_1b: Rtt {
            p50_us: 0.0,
            p99_us: 0.0,
            mean_us: 0.0,
        },
        rtt_1kib: Rtt {
            p50_us: 0.0,
            p99_us: 0.0,
            mean_us: 0.0,
        },
    };
    r.paths.iter().find(|p| p.name == name).unwrap_or(&EMPTY)
}

fn table(r: &LayoutResult) -> String {
    let mut md = format!(
        "\n## {}\n\n| path | MiB/s | 1 B p50 µs | 1 B p99 µs | 1 KiB p50 µs | 1 KiB p99 µs |\n|---|---|---|---|---|---|\n",
        r.layout.name()
    );
    for p in &r.paths {
        md.push_str(&format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            p.name,
            p.throughput_mib_s,
            p.rtt_1b.p50_us,
            p.rtt_1b.p99_us,
            p.rtt_1kib.p50_us,
            p.rtt_1kib.p99_us
        ));
    }
    md
}

fn ratios(r: &LayoutResult) -> String {
    let (t, z) = (find(r, "h3_tunnel"), find(r, "h3_tunnel_write_bytes"));
    let (q, s) = (
        find(r, "quinn_raw_write_chunk"),
        find(r, "quinn_raw_write_all"),
    );
    let (tcp, piped) = (find(r, "direct_tcp"), find(r, "tcp_via_two_sidecars"));
    let tp = |a: &Path, b: &Path| ratio(a.throughput_mib_s, b.throughput_mib_s);
    let p50 = |a: &Path, b: &Path| ratio(a.rtt_1b.p50_us, b.rtt_1b.p50_us);
    let k50 = |a: &Path, b: &Path| ratio(a.rtt_1kib.p50_us, b.rtt_1kib.p50_us);
    format!(
        "\nThroughput: tunnel (AsyncWrite) / quinn write_chunk {}, / quinn write_all {}; \
         tunnel write_bytes / quinn write_chunk {}; tunnel / direct TCP {}; \
         TCP via two sidecars / direct TCP {}.\n\
         Round trip p50: tunnel / quinn {} (1 B), {} (1 KiB); tunnel / direct TCP {} (1 B), {} (1 KiB); \
         TCP via two sidecars / direct TCP {} (1 B), {} (1 KiB).\n",
        tp(t, q), tp(t, s), tp(z, q), tp(t, tcp), tp(piped, tcp),
        p50(t, q), k50(t, q), p50(t, tcp), k50(t, tcp), p50(piped, tcp), k50(piped, tcp),
    )
}

fn markdown(results: &[LayoutResult]) -> String {
    let mut md = format!(
        "# Transport bench\n\nOne process, loopback, mTLS (ring), {} MiB per bulk run (median of {RUNS} after one warm-up run), \
         {RTT_ITERS} round trips per size and path, interleaved over {RTT_ROUNDS} rounds (each after \
         {RTT_WARMUP} warm-up). Raw quinn round trips are in the write_chunk row. \
         `tcp_via_two_sidecars` is app TCP → client sidecar (splice) → tunnel → server sidecar (splice) → app TCP.\n",
        BULK >> 20
    );
    for r in results {
        md.push_str(&table(r));
        md.push_str(&ratios(r));
    }
    if let [ct, mt] = results {
        let (a, b) = (find(ct, "h3_tunnel"), find(mt, "h3_tunnel"));
        let (pa, pb) = (
            find(ct, "tcp_via_two_sidecars"),
            find(mt, "tcp_via_two_sidecars"),
        );
        md.push_str(&format!(
            "\n## Layouts\n\ncurrent_thread / multi_thread: tunnel throughput {}, tunnel 1 B p50 {}, \
             1 KiB p50 {}; via two sidecars throughput {}, 1 B p50 {}.\n",
            ratio(a.throughput_mib_s, b.throughput_mib_s),
            ratio(a.rtt_1b.p50_us, b.rtt_1b.p50_us),
            ratio(a.rtt_1kib.p50_us, b.rtt_1kib.p50_us),
            ratio(pa.throughput_mib_s, pb.throughput_mib_s),
            ratio(pa.rtt_1b.p50_us, pb.rtt_1b.p50_us),
        ));
    }
    md
}

/// Runs both layouts, prints the report and writes it to `benches/results/`.
pub fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut results = Vec::new();
    for layout in [Layout::CurrentThread, Layout::MultiThread] {
        eprintln!("transport bench: {} ...", layout.name());
        results.push(run_layout(layout)?);
    }
    let mut md = markdown(&results);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md.push_str(&format!(
        "\nLoad average at the end (1, 5, 15 min; other work on the machine skews every row): {}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    println!("{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("transport.md"), &md)?;
    std::fs::write(
        dir.join("transport.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    eprintln!("done in {:.1?}; wrote {}", started.elapsed(), dir.display());
    Ok(())
}
