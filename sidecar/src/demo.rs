//! `halyard demo`: the mesh on one machine.
//!
//! For now it shows the identity layer end to end: a CA, two workload identities issued through
//! the CSR flow, and a mutually authenticated TLS 1.3 handshake between them on loopback, each
//! side printing the SPIFFE id its verifier accepted.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use halyard_certs::{client_config, peer_id, server_config, ExpectedServer};
use halyard_certs::{CertResolver, MeshCa, SpiffeId, TrustDomain, WorkloadIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Arguments of `halyard demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Trust domain of the demo mesh.
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: String,
}

/// Runs `halyard demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(identity_demo(&args.trust_domain))
}

async fn identity_demo(trust_domain: &str) -> anyhow::Result<()> {
    let td = TrustDomain::new(trust_domain).context("--trust-domain")?;
    println!("== mesh CA for trust domain {td}");
    let ca = MeshCa::create(&td)?;
    let bundle = Arc::new(ca.bundle()?);
    let issue = |account: &str| -> anyhow::Result<Arc<CertResolver>> {
        let id = SpiffeId::workload(&td, "default", account)?;
        let leaf = ca.issue(&id, Duration::from_secs(3600))?;
        println!("   issued {id} (key and CSR made locally)");
        Ok(CertResolver::new(WorkloadIdentity::from_pem(
            &leaf.cert_pem,
            &leaf.key_pem,
        )?))
    };
    let server_id = issue("reviews")?;
    let client_id = issue("productpage")?;
    let expected = ExpectedServer::Id(server_id.current().id().clone());
    let server_cfg = server_config(server_id, bundle.clone())?;
    let client_cfg = client_config(client_id, bundle, expected)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = peer_id(tls.get_ref().1.peer_certificates())?;
        tls.write_all(b"hello from reviews").await?;
        tls.shutdown().await?;
        anyhow::Ok(peer)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let name = rustls::pki_types::ServerName::try_from("reviews.mesh")?;
    let mut tls = connector.connect(name, tcp).await?;
    let server_peer = peer_id(tls.get_ref().1.peer_certificates())?;
    let mut reply = String::new();
    tls.read_to_string(&mut reply).await?;
    let client_peer = server.await??;
    println!("== mutual TLS 1.3 handshake on {addr}");
    println!("   client verified server as {server_peer}");
    println!("   server verified client as {client_peer}");
    println!("   server said: {reply:?}");
    Ok(())
}
