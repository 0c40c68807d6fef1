//! Outbound capture: app TCP connections become HTTP/3 CONNECT tunnels to a chosen endpoint.
//!
//! A flow may be retried on another endpoint while nothing has come back to the app yet: the
//! bytes the app sent first are kept and replayed. Once the peer answered 200, the flow is
//! committed to that endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use halyard_transport::{Target, Tunnel, TunnelError};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Direction, Edge};
use crate::outlier::Failure;
use crate::proxy::{PickError, Picked, Shared};
use crate::telemetry::{Outcome, Record};

/// How many bytes the app may have sent before the tunnel opens that are carried with it.
const FIRST_BYTES: usize = 16 * 1024;

/// Where a captured connection goes.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
}

/// How a flow ended, as the `response_flags` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// Completed.
    Ok,
    /// No endpoint could be reached (after retries).
    UpstreamFailure,
    /// No endpoint, or none healthy.
    NoHealthy,
    /// The destination refused by policy.
    Denied,
    /// The destination is not a known service.
    NoRoute,
    /// Reset after the tunnel was up.
    Reset,
}

impl Flags {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Flags::Ok => "-",
            Flags::UpstreamFailure => "UF",
            Flags::NoHealthy => "UH",
            Flags::Denied => "DENY",
            Flags::NoRoute => "NR",
            Flags::Reset => "RESET",
        }
    }
}

/// Accepts app connections on an explicit upstream listener until `stop`.
pub async fn serve_upstream(
    shared: Arc<Shared>,
    listener: TcpListener,
    dest: Destination,
    stop: CancellationToken,
) {
    while let Some((tcp, _)) = crate::net::accept(&listener, &stop, "outbound").await {
        let shared2 = shared.clone();
        let dest = dest.clone();
        shared
            .flows
            .spawn(async move { flow(shared2, tcp, dest).await });
    }
}

/// Carries one app connection to `dest`.
pub async fn flow(shared: Arc<Shared>, mut app: TcpStream, dest: Destination) {
    let _ = app.set_nodelay(true);
    if is_http(&shared, &dest) {
        return crate::http::outbound::serve(shared, app, dest).await;
    }
    let _active = shared.metrics.active(Direction::Outbound);
    let started = Instant::now();
    let first = first_bytes(&app).freeze();
    let (flags, version, sent, received, endpoint) = match connect(&shared, &dest, &first).await {
        Ok((picked, mut tunnel)) => {
            let version = picked.version().to_owned();
            let endpoint = picked.endpoint.address;
            let (flags, up, down) = pipe(&shared, &mut app, &mut tunnel).await;
            shared.outcome(&picked, None);
            (
                flags,
                version,
                up + first.len() as u64,
                down,
                Some(endpoint),
            )
        }
        Err(flags) => {
            reset(app);
            (flags, "unknown".to_owned(), 0, 0, None)
        }
    };
    tracing::debug!(destination = %dest.service, flags = flags.as_str(), sent, received, "outbound flow ended");
    let edge = Edge {
        direction: Direction::Outbound,
        source: &shared.service,
        destination: &dest.service,
        version: &version,
    };
    shared.metrics.tcp_flow(
        edge,
        flags.as_str(),
        sent,
        received,
        started.elapsed().as_secs_f64(),
    );
    let rec = Record::new(
        Direction::Outbound,
        (&shared.service, &dest.service, &version),
        Outcome::Flags(flags.as_str()),
        started,
    );
    let sinks = shared.metrics.sinks();
    let route = sinks
        .enabled()
        .then(|| crate::telemetry::l4_route(&shared.current(), &shared.service, &dest.service))
        .flatten();
    sinks.record(Record {
        endpoint,
        route,
        sent: Some(sent),
        received: Some(received),
        ..rec
    });
}

/// Whether the destination port speaks HTTP (routed per request) rather than opaque TCP.
fn is_http(shared: &Shared, dest: &Destination) -> bool {
    use halyard_registry::model::Protocol;
    shared
        .current()
        .service(&dest.service)
        .and_then(|s| s.port(dest.port).map(|p| p.protocol != Protocol::Tcp))
        .unwrap_or(false)
}

/// Whatever the app already sent, without waiting (server-speaks-first protocols send nothing).
fn first_bytes(app: &TcpStream) -> BytesMut {
    let mut buf = BytesMut::with_capacity(FIRST_BYTES);
    let _ = app.try_read_buf(&mut buf);
    buf
}

/// Opens a tunnel, trying further endpoints while the failure happened before any byte came
/// back.
async fn connect(
    shared: &Arc<Shared>,
    dest: &Destination,
    first: &Bytes,
) -> Result<(Picked, Tunnel), Flags> {
    let retries = shared.config.file.failure.retries;
    let mut tried = Vec::new();
    let mut last = Flags::NoHealthy;
    for attempt in 0..=retries {
        let picked = match shared.pick(&dest.service, &tried) {
            Ok(p) => p,
            Err(PickError::NoEndpoint | PickError::NoHealthy) if attempt > 0 => return Err(last),
            Err(_) => return Err(Flags::NoHealthy),
        };
        if attempt > 0 {
            shared.metrics.retry(&dest.service);
        }
        tried.push(picked.endpoint.id.clone());
        match attempt_once(shared, &picked, dest, first).await {
            Ok(tunnel) => return Ok((picked, tunnel)),
            Err(e) => {
                let endpoint = &picked.endpoint.id;
                tracing::debug!(service = %dest.service, endpoint, error = %e, "tunnel attempt failed");
                last = classify(&e);
                if e.status() == Some(http::StatusCode::FORBIDDEN) {
                    shared.outcome(&picked, None);
                    return Err(Flags::Denied);
                }
                shared.outcome(&picked, Some(failure_kind(&e)));
                if !e.before_any_byte() {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

async fn attempt_once(
    shared: &Shared,
    picked: &Picked,
    dest: &Destination,
    first: &Bytes,
) -> Result<Tunnel, TunnelError> {
    let target =
        Target::new(&dest.service, dest.port).map_err(|e| TunnelError::Protocol(e.to_string()))?;
    let ep = &picked.endpoint;
    let timeout = shared.config.file.failure.connect_timeout;
    let open = async {
        let mut tunnel = shared
            .pool
            .open_tcp(ep.address, &ep.identity, &target, http::HeaderMap::new())
            .await?;
        if !first.is_empty() {
            tunnel
                .write_bytes(first.clone())
                .await
                .map_err(|e| TunnelError::Protocol(e.to_string()))?;
        }
        tunnel.status().await?;
        Ok(tunnel)
    };
    match tokio::time::timeout(timeout, open).await {
        Ok(result) => result,
        Err(_) => Err(TunnelError::ConnectTimeout {
            peer: ep.address,
            after: timeout,
        }),
    }
}

fn classify(e: &TunnelError) -> Flags {
    match e.status() {
        Some(http::StatusCode::FORBIDDEN) => Flags::Denied,
        Some(http::StatusCode::SERVICE_UNAVAILABLE) => Flags::NoHealthy,
        _ => Flags::UpstreamFailure,
    }
}

fn failure_kind(e: &TunnelError) -> Failure {
    match e {
        TunnelError::Connect { .. }
        | TunnelError::ConnectTimeout { .. }
        | TunnelError::Backoff { .. } => Failure::Connect,
        TunnelError::ConnectionLost { .. } => Failure::Connect,
        _ => Failure::Error,
    }
}

/// Copies both ways until both sides finished, or the drain deadline passes.
async fn pipe(shared: &Shared, app: &mut TcpStream, tunnel: &mut Tunnel) -> (Flags, u64, u64) {
    tokio::select! {
        r = splice(app, tunnel) => match r {
            Ok((up, down)) => (Flags::Ok, up, down),
            Err(_) => {
                tunnel.abort();
                reset_on_close(app);
                (Flags::Reset, 0, 0)
            }
        },
        _ = shared.hard_stop.cancelled() => {
            // Both ends see a reset: a flow cut by the drain deadline must not look complete.
            tunnel.abort();
            reset_on_close(app);
            (Flags::Reset, 0, 0)
        }
    }
}

/// Pipes both ways without copying received data (see the transport's notes on copies).
async fn splice(app: &mut TcpStream, tunnel: &mut Tunnel) -> std::io::Result<(u64, u64)> {
    let (read, write) = app.split();
    tunnel.splice(read, write).await
}

/// Closes an app connection with a TCP reset, as a refused connection would.
pub fn reset(app: TcpStream) {
    reset_on_close(&app);
    drop(app);
}

/// Makes the coming close of `tcp` a reset (SO_LINGER 0; on a non-blocking socket this never
/// blocks).
pub fn reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Accepts transparently captured connections, reading the original destination.
pub async fn serve_transparent(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let own = listener.local_addr().ok();
    while let Some((tcp, peer)) = crate::net::accept(&listener, &stop, "transparent").await {
        match original_destination(&tcp).and_then(|d| resolve(&shared, d, own)) {
            Ok(dest) => {
                let s = shared.clone();
                shared.flows.spawn(async move { flow(s, tcp, dest).await });
            }
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "captured connection refused");
                let edge = Edge {
                    direction: Direction::Outbound,
                    source: &shared.service,
                    destination: "unknown",
                    version: "unknown",
                };
                shared
                    .metrics
                    .tcp_flow(edge, Flags::NoRoute.as_str(), 0, 0, 0.0);
                reset(tcp);
            }
        }
    }
}

/// SO_ORIGINAL_DST of a REDIRECTed connection.
fn original_destination(tcp: &TcpStream) -> Result<SocketAddr, String> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr() {
        Ok(SocketAddr::V6(_)) => sock.original_dst_v6(),
        _ => sock.original_dst_v4(),
    };
    addr.map_err(|e| format!("no original destination: {e}"))?
        .as_socket()
        .ok_or_else(|| "original destination is not an IP address".to_owned())
}

/// Maps an original destination to a service: by virtual IP, else by port where one service
/// alone has it.
pub fn resolve(
    shared: &Shared,
    dest: SocketAddr,
    own: Option<SocketAddr>,
) -> Result<Destination, String> {
    if Some(dest) == own {
        return Err(format!("{dest} is the capture port itself"));
    }
    let snap = shared.current();
    let port = dest.port();
    if let Some(svc) = snap.service_by_vip(dest.ip()) {
        return match svc.port(port) {
            Some(_) => Ok(Destination {
                service: svc.name.to_string(),
                port,
            }),
            None => Err(format!("service {} has no port {port}", svc.name)),
        };
    }
    let mut by_port = snap.services_by_port(port);
    match (by_port.next(), by_port.next()) {
        (Some(svc), None) => Ok(Destination {
            service: svc.name.to_string(),
            port,
        }),
        (Some(_), Some(_)) => Err(format!(
            "{dest}: several services use port {port}; give them a vip"
        )),
        (None, _) => Err(format!("{dest} is no known service")),
    }
}
