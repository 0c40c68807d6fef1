//! The h2-tunnel baseline: HTTP/2 CONNECT over one pooled mTLS TCP connection (the HBONE design),
//! with hyper's HTTP/2 and tokio-rustls, the mesh's certificates and its SPIFFE verifiers (TLS
//! 1.3, ALPN h2). Every tunnelled flow is one HTTP/2 stream on the same TCP connection, so a lost
//! segment stalls them all: the head-of-line blocking Halyard's QUIC avoids.
//!
//! `halyard-benches h2-tunnel-server LISTEN ID_DIR` accepts tunnels and connects each to its
//! CONNECT authority; `halyard-benches h2-tunnel-client PEER ID_DIR LOCAL=TARGET...` listens on
//! each LOCAL and tunnels every accepted connection to TARGET through the one connection to PEER.
//! Each runs on one current-thread runtime, as a Halyard sidecar does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use halyard_certs::{CertResolver, ExpectedServer, TrustBundle, TrustDomain, WorkloadIdentity};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Body = Empty<Bytes>;

fn identity(dir: &Path) -> anyhow::Result<(Arc<CertResolver>, Arc<TrustBundle>)> {
    let id = WorkloadIdentity::load(&dir.join("cert.pem"), &dir.join("key.pem"))?;
    let bundle = TrustBundle::load(&dir.join("bundle.pem"))?;
    Ok((CertResolver::new(id), Arc::new(bundle)))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `h2-tunnel-server LISTEN ID_DIR`.
pub fn server_main(args: &[String]) -> anyhow::Result<()> {
    let [listen, dir] = args else {
        anyhow::bail!("usage: h2-tunnel-server LISTEN ID_DIR");
    };
    let listen: SocketAddr = listen.parse()?;
    let (resolver, bundle) = identity(Path::new(dir))?;
    let mut tls = halyard_certs::server_config(resolver, bundle)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    runtime()?.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(serve_conn(acceptor.clone(), tcp));
        }
    })
}

async fn serve_conn(acceptor: TlsAcceptor, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = hyper::service::service_fn(connect_request);
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(2 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(16384)
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn connect_request(req: Request<hyper::body::Incoming>) -> anyhow::Result<Response<Body>> {
    let status = |s| {
        let mut r = Response::new(Body::new());
        *r.status_mut() = s;
        r
    };
    let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    if req.method() != Method::CONNECT {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Ok(app) = TcpStream::connect(&target).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let _ = app.set_nodelay(true);
    tokio::spawn(async move {
        if let Ok(up) = hyper::upgrade::on(req).await {
            let mut app = app;
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut app).await;
        }
    });
    Ok(status(StatusCode::OK))
}

/// `h2-tunnel-client PEER ID_DIR LOCAL=TARGET...`.
pub fn client_main(args: &[String]) -> anyhow::Result<()> {
    let [peer, dir, maps @ ..] = args else {
        anyhow::bail!("usage: h2-tunnel-client PEER ID_DIR LOCAL=TARGET...");
    };
    let peer: SocketAddr = peer.parse()?;
    let (resolver, bundle) = identity(Path::new(dir))?;
    let td = TrustDomain::new("mesh.local")?;
    let mut tls = halyard_certs::client_config(resolver, bundle, ExpectedServer::TrustDomain(td))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));
    let maps = maps
        .iter()
        .map(|m| m.split_once('=').context("LOCAL=TARGET expected"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    runtime()?.block_on(async move {
        let pool = Pool::new(peer, connector);
        let mut tasks = tokio::task::JoinSet::new();
        for (local, target) in maps {
            let listener = TcpListener::bind(local).await?;
            tasks.spawn(accept_loop(listener, target.to_owned(), pool.clone()));
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    })
}

/// The one pooled HTTP/2 connection to the peer, opened on first use and reopened when closed.
#[derive(Clone)]
struct Pool {
    peer: SocketAddr,
    connector: TlsConnector,
    sender: Arc<tokio::sync::Mutex<Option<SendRequest<Body>>>>,
}

impl Pool {
    fn new(peer: SocketAddr, connector: TlsConnector) -> Pool {
        Pool {
            peer,
            connector,
            sender: Arc::default(),
        }
    }

    async fn get(&self) -> anyhow::Result<SendRequest<Body>> {
        let mut slot = self.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let tcp = TcpStream::connect(self.peer).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("halyard.invalid")?;
        let tls = self.connector.connect(name, tcp).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(2 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(conn);
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

async fn accept_loop(listener: TcpListener, target: String, pool: Pool) -> anyhow::Result<()> {
    loop {
        let (app, _) = listener.accept().await?;
        let _ = app.set_nodelay(true);
        let (pool, target) = (pool.clone(), target.clone());
        tokio::spawn(async move {
            if let Err(e) = tunnel(app, &target, &pool).await {
                eprintln!("h2-tunnel-client: {e:#}");
            }
        });
    }
}

async fn tunnel(mut app: TcpStream, target: &str, pool: &Pool) -> anyhow::Result<()> {
    let mut sender = pool.get().await?;
    sender.ready().await?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .body(Body::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status() == StatusCode::OK, "CONNECT {}", resp.status());
    let up = hyper::upgrade::on(resp).await?;
    tokio::io::copy_bidirectional(&mut app, &mut TokioIo::new(up)).await?;
    Ok(())
}
