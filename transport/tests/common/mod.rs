//! Shared fixtures: a server sidecar with a test handler and a client pool, on 127.0.0.1:0.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use halyard_certs::test_util::TestPki;
use halyard_certs::SpiffeId;
use halyard_transport::{
    serve, Handler, HttpRequest, MeshEndpoint, Pool, RawTransportConfig, Target, TransportConfig,
    Tunnel, TunnelRequest,
};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub const LOOPBACK: &str = "127.0.0.1:0";

/// Services of the test handler:
/// - `echo`: copies everything back, then finishes;
/// - `sink`: hashes everything until FIN, answers the 32-byte SHA-256;
/// - `hold`: accepts, then waits for `release` before echoing;
/// - `denied`: 403; anything else 404.
#[derive(Default)]
pub struct TestHandler {
    pub tunnels: AtomicUsize,
    pub open: AtomicUsize,
    pub max_open: AtomicUsize,
    pub release: Notify,
    /// Tunnels of `hold` open now, observable without polling.
    pub held: tokio::sync::watch::Sender<usize>,
    /// Set to true to let every `hold` tunnel answer and finish.
    pub released: tokio::sync::watch::Sender<bool>,
    pub http_requests: AtomicUsize,
    /// A TCP app the `splice` service forwards to, as a sidecar does.
    pub backend: std::sync::OnceLock<SocketAddr>,
    /// How the last `observe` tunnel ended: `eof <bytes>` or `error <io kind>`.
    pub observed: tokio::sync::watch::Sender<Option<String>>,
}

impl TestHandler {
    async fn echo(&self, req: TunnelRequest) {
        let Ok(tunnel) = req.accept().await else {
            return;
        };
        let (mut r, mut w) = tokio::io::split(tunnel);
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    }

    async fn sink(&self, req: TunnelRequest) {
        let Ok(mut tunnel) = req.accept().await else {
            return;
        };
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tunnel.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => hash.update(&buf[..n]),
                Err(_) => return,
            }
        }
        let _ = tunnel.write_all(&hash.finalize()).await;
        let _ = tunnel.shutdown().await;
    }

    async fn splice(&self, req: TunnelRequest) {
        let Some(addr) = self.backend.get() else {
            return req.reject(StatusCode::SERVICE_UNAVAILABLE).await;
        };
        let Ok(mut app) = tokio::net::TcpStream::connect(addr).await else {
            return req.reject(StatusCode::BAD_GATEWAY).await;
        };
        let Ok(mut tunnel) = req.accept().await else {
            return;
        };
        let (r, w) = app.split();
        let _ = tunnel.splice(r, w).await;
    }

    async fn observe(&self, req: TunnelRequest) {
        let Ok(mut tunnel) = req.accept().await else {
            return;
        };
        let mut all = Vec::new();
        let outcome = match tunnel.read_to_end(&mut all).await {
            Ok(n) => format!("eof {n}"),
            Err(e) => format!("error {:?}", e.kind()),
        };
        let _ = tunnel.shutdown().await;
        self.observed.send_replace(Some(outcome));
    }

    async fn hold(&self, req: TunnelRequest) {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_open.fetch_max(open, Ordering::SeqCst);
        let mut released = self.released.subscribe();
        let accepted = req.accept().await;
        self.held.send_modify(|n| *n += 1);
        let _ = released.wait_for(|r| *r).await;
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.held.send_modify(|n| *n -= 1);
        if let Ok(mut t) = accepted {
            let _ = t.write_all(b"released").await;
            let _ = t.shutdown().await;
        }
    }
}

impl Handler for TestHandler {
    async fn tunnel(&self, req: TunnelRequest) {
        self.tunnels.fetch_add(1, Ordering::SeqCst);
        match req.target().service() {
            "echo" => self.echo(req).await,
            "sink" => self.sink(req).await,
            "hold" => self.hold(req).await,
            "denied" => req.reject(StatusCode::FORBIDDEN).await,
            "splice" => self.splice(req).await,
            "observe" => self.observe(req).await,
            "forget" => drop(req),
            "panic" => panic!("handler bug"),
            _ => req.reject(StatusCode::NOT_FOUND).await,
        }
    }

    async fn http(&self, req: HttpRequest) {
        self.http_requests.fetch_add(1, Ordering::SeqCst);
        if req.request.uri().path() != "/echo" {
            return req.respond(StatusCode::METHOD_NOT_ALLOWED).await;
        }
        let HttpRequest {
            peer, mut stream, ..
        } = req;
        let mut body = Vec::new();
        while let Ok(Some(mut chunk)) = stream.recv_data().await {
            use bytes::Buf;
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        let trailers = stream
            .recv_trailers()
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut resp = http::Response::new(());
        resp.headers_mut()
            .insert("x-peer", peer.id.as_str().parse().unwrap());
        let _ = stream.send_response(resp).await;
        let _ = stream.send_data(bytes::Bytes::from(body)).await;
        let _ = stream.send_trailers(trailers).await;
        let _ = stream.finish().await;
    }
}

/// A server sidecar and a client sidecar from one CA.
pub struct Mesh {
    pub pki: TestPki,
    pub server: MeshEndpoint,
    pub server_id: SpiffeId,
    pub handler: Arc<TestHandler>,
    pub pool: Pool,
    pub serve_task: JoinHandle<()>,
}

impl Mesh {
    pub async fn new() -> Mesh {
        Mesh::with_configs(TransportConfig::default(), TransportConfig::default()).await
    }

    pub async fn with_configs(server_cfg: TransportConfig, client_cfg: TransportConfig) -> Mesh {
        let pki = TestPki::new("mesh.local");
        let server = MeshEndpoint::new(
            pki.resolver("reviews"),
            pki.bundle.clone(),
            server_cfg,
            LOOPBACK.parse().unwrap(),
        )
        .unwrap();
        let handler = Arc::new(TestHandler::default());
        let serve_task = tokio::spawn(serve(server.clone(), handler.clone()));
        let client = MeshEndpoint::new(
            pki.resolver("productpage"),
            pki.bundle.clone(),
            client_cfg,
            LOOPBACK.parse().unwrap(),
        )
        .unwrap();
        let server_id = pki.id("reviews");
        Mesh {
            pki,
            server,
            server_id,
            handler,
            pool: Pool::new(client),
            serve_task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr().unwrap()
    }

    pub async fn open(&self, service: &str) -> Tunnel {
        self.open_via(self.addr(), service).await
    }

    pub async fn open_via(&self, addr: SocketAddr, service: &str) -> Tunnel {
        let target = Target::new(service, 9000).unwrap();
        self.pool
            .open_tcp(addr, &self.server_id, &target, HeaderMap::new())
            .await
            .unwrap()
    }
}

pub fn config(f: impl FnOnce(&mut RawTransportConfig)) -> TransportConfig {
    let mut raw = RawTransportConfig::default();
    f(&mut raw);
    TransportConfig::try_from(raw).unwrap()
}

/// Deterministic bytes for flow `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data`, finishes, and reads the reply to the end, concurrently.
pub async fn exchange(tunnel: Tunnel, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(tunnel);
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut reply = Vec::new();
    let read = r.read_to_end(&mut reply);
    let (wr, rr) = tokio::join!(write, read);
    wr?;
    rr?;
    Ok(reply)
}

/// A TCP echo app on 127.0.0.1:0 (echoes until FIN, then finishes).
pub async fn tcp_echo_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}
