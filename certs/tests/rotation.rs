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

#[tokio::test]
async fn swapped_leaf_serves_new_handshakes_and_open_connections_keep_working() {
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
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("reviews").unwrap();
        connector.connect(name, tcp).await.unwrap()
    };

    let mut old_conn = connect().await;
    assert_eq!(round_trip(&mut old_conn, b"before").await, b"before");
    assert_eq!(peer_serial(&old_conn), first.serial());

    let second = pki.identity("reviews");
    assert_ne!(second.serial(), first.serial());
    resolver.swap(second.clone()).unwrap();
    assert_eq!(resolver.current().serial(), second.serial());

    let mut new_conn = connect().await;
    assert_eq!(peer_serial(&new_conn), second.serial());
    assert_eq!(round_trip(&mut new_conn, b"new").await, b"new");
    assert_eq!(
        round_trip(&mut old_conn, b"still alive").await,
        b"still alive"
    );

    // A leaf for another workload is refused and the current one stays.
    let err = resolver.swap(pki.identity("ratings")).unwrap_err();
    assert!(err.to_string().contains("ratings"), "{err}");
    assert_eq!(resolver.current().serial(), second.serial());
    server.abort();
}
