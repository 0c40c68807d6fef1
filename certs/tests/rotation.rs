//! Leaf rotation: swapping the resolver's leaf affects new handshakes only; an open connection
//! keeps carrying data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use halyard_certs::test_util::TestPki;
use halyard_certs::{client_config, server_config, ExpectedServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use x509_parser::prelude::{FromDer, X509Certificate};

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Echo server: every accepted connection echoes until EOF.
async fn echo_server(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                if tls.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn round_trip(tls: &mut ClientTls, msg: &[u8]) -> Vec<u8> {
    tls.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tls.read_exact(&mut got).await.unwrap();
    got
}

fn peer_serial(tls: &ClientTls) -> Vec<u8> {
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
    cert.raw_serial().to_vec()
}

/// A server whose leaf can be swapped, and a client that connects to it.
struct Rotating {
    pki: TestPki,
    first: halyard_certs::WorkloadIdentity,
    resolver: Arc<halyard_certs::CertResolver>,
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
    server: tokio::task::JoinHandle<()>,
}

impl Rotating {
    async fn start() -> Self {
        let pki = TestPki::new("mesh.local");
        let first = pki.identity("reviews");
        let resolver = halyard_certs::CertResolver::new(first.clone());
        let server_cfg = server_config(resolver.clone(), pki.bundle.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(echo_server(listener, Arc::new(server_cfg).into()));

        let client_cfg = client_config(
            pki.resolver("productpage"),
            pki.bundle.clone(),
            ExpectedServer::Id(pki.id("reviews")),
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        Rotating {
            pki,
            first,
            resolver,
            addr,
            connector,
            server,
        }
    }

    async fn connect(&self) -> ClientTls {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("reviews").unwrap();
        self.connector.connect(name, tcp).await.unwrap()
    }

    /// Swaps in a second leaf for the same workload and returns it.
    fn swap(&self) -> halyard_certs::WorkloadIdentity {
        let second = self.pki.identity("reviews");
        assert_ne!(second.serial(), self.first.serial());
        self.resolver.swap(second.clone()).unwrap();
        assert_eq!(self.resolver.current().serial(), second.serial());
        second
    }
}

impl Drop for Rotating {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test]
async fn a_swapped_leaf_serves_new_handshakes() {
    let r = Rotating::start().await;
    let mut old_conn = r.connect().await;
    assert_eq!(round_trip(&mut old_conn, b"before").await, b"before");
    assert_eq!(peer_serial(&old_conn), r.first.serial());

    let second = r.swap();
    let mut new_conn = r.connect().await;
    assert_eq!(peer_serial(&new_conn), second.serial());
    assert_eq!(round_trip(&mut new_conn, b"new").await, b"new");
}

#[tokio::test]
async fn an_open_connection_keeps_working_after_a_swap() {
    let r = Rotating::start().await;
    let mut old_conn = r.connect().await;
    assert_eq!(round_trip(&mut old_conn, b"before").await, b"before");
    assert_eq!(peer_serial(&old_conn), r.first.serial());

    r.swap();
    let mut new_conn = r.connect().await;
    assert_eq!(round_trip(&mut new_conn, b"new").await, b"new");
    assert_eq!(
        round_trip(&mut old_conn, b"still alive").await,
        b"still alive"
    );
}

#[tokio::test]
async fn a_leaf_for_another_workload_is_refused() {
    let r = Rotating::start().await;
    let second = r.swap();
    // Refused: the current leaf stays.
    let err = r.resolver.swap(r.pki.identity("ratings")).unwrap_err();
    assert!(err.to_string().contains("ratings"), "{err}");
    assert_eq!(r.resolver.current().serial(), second.serial());
}
