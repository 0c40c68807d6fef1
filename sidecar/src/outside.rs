//! Connections out of the mesh to an ExternalService: its addresses (static, DNS, or the one the
//! app dialled), and TLS originated by the mesh when its port says so — verifying the server
//! against the port's `caBundle` or the system roots and the host name. Used by the caller's
//! sidecar (`via: direct`) and by an egress gateway, at L4 and L7 alike.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{ExternalService, Resolution};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// System roots for TLS origination without a `caBundle` (Debian's ca-certificates).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A byte stream to the outside.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Out {
    /// The stream and the address it went to.
    pub(crate) fn into_parts(self) -> (Box<dyn Io>, SocketAddr) {
        match self {
            Out::Plain(s, a) => (Box::new(s), a),
            Out::Tls(s, a) => (s, a),
        }
    }
}

/// A connection out: plain, or TLS originated by the mesh.
pub(crate) enum Out {
    /// Plain TCP.
    Plain(TcpStream, SocketAddr),
    /// TLS originated by the mesh.
    Tls(Box<dyn Io>, SocketAddr),
}

/// Why no connection out was made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// No address to dial.
    #[error("no address for {0}")]
    NoAddress(String),
    /// Every address refused or timed out.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake or the server's certificate failed.
    #[error("{0}")]
    Tls(String),
}

/// Connects to the ExternalService (its static addresses, the host's DNS answer, or `ip`) on
/// `port`, or on the TLS origination target port with TLS.
pub(crate) async fn dial_out(
    es: &ExternalService,
    host: Option<&str>,
    ip: Option<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Out, DialError> {
    let tls = es.port(port).and_then(|p| p.originate_tls.as_ref());
    let dial_port = tls.map_or(port, |t| t.target_port);
    let addrs: Vec<SocketAddr> = match (es.resolution, host) {
        (Resolution::Static, _) => es
            .addresses
            .iter()
            .filter_map(|a| a.single())
            .map(|a| SocketAddr::new(a, dial_port))
            .collect(),
        (Resolution::Dns, Some(h)) => tokio::net::lookup_host((h, dial_port))
            .await
            .map(Iterator::collect)
            .unwrap_or_default(),
        (Resolution::Dns, None) => ip
            .map(|ip| SocketAddr::new(ip, dial_port))
            .into_iter()
            .collect(),
    };
    let name = host.map_or_else(
        || ip.map(|i| i.to_string()).unwrap_or_default(),
        str::to_owned,
    );
    if addrs.is_empty() {
        return Err(DialError::NoAddress(name));
    }
    let (tcp, addr) = connect(&addrs, timeout).await.map_err(DialError::Connect)?;
    let Some(tls) = tls else {
        return Ok(Out::Plain(tcp, addr));
    };
    let stream = originate(tcp, &name, tls.ca_bundle.as_deref())
        .await
        .map_err(DialError::Tls)?;
    Ok(Out::Tls(Box::new(stream), addr))
}

/// The first of `addrs` that accepts within `timeout` each.
pub(crate) async fn connect(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), std::io::Error> {
    let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, *addr));
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    Err(last)
}

/// TLS to the outside, verifying the server against `ca_bundle` (else the system roots) and
/// `name` (RFC 9525 name checks, by webpki).
async fn originate(
    tcp: TcpStream,
    name: &str,
    ca_bundle: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let pem_text = match ca_bundle {
        Some(p) => p.to_owned(),
        None => std::fs::read_to_string(SYSTEM_ROOTS)
            .map_err(|e| format!("system roots {SYSTEM_ROOTS}: {e}"))?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for block in pem::parse_many(&pem_text).map_err(|e| format!("trust bundle: {e}"))? {
        if block.tag() == "CERTIFICATE" {
            let _ = roots.add(rustls_pki_types::CertificateDer::from(
                block.into_contents(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_owned())
        .map_err(|_| format!("{name:?} is no server name for TLS"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS to {name} failed: {e}"))
}
