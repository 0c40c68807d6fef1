//! Egress: flows to destinations outside the mesh.
//!
//! A transparently captured connection whose original destination is no mesh Service is looked
//! up among the ExternalServices by the host it names — the TLS ClientHello's SNI, or HTTP's
//! `Host`, read without consuming anything (`sniff`) — else by its address and port:
//! - an ExternalService with `via: direct`: this sidecar dials out (its static addresses, the
//!   host's DNS answer, or the address the app dialled), originating TLS when the port says so;
//! - `via: egress`: the flow is tunnelled to an egress gateway (`MeshConfig.egressGateway`) as a
//!   CONNECT to the external `host:port`, and the gateway dials out (`serve_gateway`), after the
//!   ExternalService's Policy (key: its name) admitted the caller's verified identity;
//! - none: `MeshConfig.outboundTrafficPolicy` decides — `registry-only` (the default, and what a
//!   captured flow to an unknown destination always met before) resets it, counts it in
//!   `halyard_egress_refused_total{destination}` and logs once per destination; `allow-any`
//!   dials the original destination.
//!
//! TLS origination (an `http` port with `originateTls`): the app speaks plain HTTP; the mesh
//! connects with TLS to `targetPort`, verifying the server against the port's `caBundle` or the
//! system roots and the host name the app asked for; a failure is answered to the app as an
//! HTTP 502 naming the reason.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use halyard_registry::model::{ExternalProtocol, ExternalService, OutboundTrafficPolicy, Via};
use halyard_transport::{ServerTunnel, Target, TunnelRequest};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::decide::capture::{Destination, EgressVia};
use crate::decide::pick::Scope;
use crate::decide::policy::{self, Decision, Peer};
use crate::l4::outbound::{reset, reset_on_close, Flags};
use crate::outside::{connect, dial_out, DialError, Io, Out};
use crate::state::{source_label, Shared};
use crate::telemetry::flow::{End, FlowRecord};
use crate::telemetry::metrics::Direction;

/// Bytes of the app's first flight looked at for a host name.
const SNIFF_LIMIT: usize = 16 * 1024;
/// How long the app's first bytes are awaited (a server-first protocol sends none).
const SNIFF_WAIT: Duration = Duration::from_millis(300);

/// What the app's first bytes say about where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A host name (SNI or `Host`, without a port).
    Host(String),
    /// No name in what was sent (another protocol, or a ClientHello without SNI).
    Nothing,
    /// A ClientHello or HTTP head begun but not complete.
    NeedMore,
}

/// Reads a host name from the start of a flow: a TLS ClientHello's `server_name` (parsed by
/// rustls's `Acceptor`, RFC 8446 §4.1.2, RFC 6066 §3) or an HTTP/1.x request's `Host` (RFC 9110
/// §7.2).
pub(crate) fn sniff(bytes: &[u8]) -> Sniffed {
    if bytes.first() == Some(&0x16) {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = bytes;
        if acceptor.read_tls(&mut rd).is_err() {
            return Sniffed::Nothing;
        }
        return match acceptor.accept() {
            Ok(Some(hello)) => hello
                .client_hello()
                .server_name()
                .map_or(Sniffed::Nothing, |n| Sniffed::Host(n.to_ascii_lowercase())),
            Ok(None) => Sniffed::NeedMore,
            Err(_) => Sniffed::Nothing,
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(host_without_port)
            .map_or(Sniffed::Nothing, Sniffed::Host),
        Ok(httparse::Status::Partial) => Sniffed::NeedMore,
        Err(_) => Sniffed::Nothing,
    }
}

fn host_without_port(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port` (RFC 3986 §3.2.2).
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match host.split_once(':') {
            Some((h, p)) if !p.contains(':') => h,
            _ => host,
        },
    };
    name.to_ascii_lowercase()
}

/// Peeks at the app's first bytes (nothing is consumed) until they name a host, say they
/// never will, fill [`SNIFF_LIMIT`], or [`SNIFF_WAIT`] passes.
async fn peek_host(tcp: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; SNIFF_LIMIT];
    let deadline = tokio::time::Instant::now() + SNIFF_WAIT;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return None,
        };
        match sniff(&buf[..n]) {
            Sniffed::Host(h) => return Some(h),
            Sniffed::Nothing => return None,
            Sniffed::NeedMore if n == 0 || n == buf.len() => return None,
            Sniffed::NeedMore => {}
        }
        if n == seen {
            // The rest of the head may still be on its way: peek returns at once while data is
            // buffered, so wait a little before looking again, and never past the deadline.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep_until(deadline.min(now + Duration::from_millis(2))).await;
        }
        seen = n;
    }
}

/// A captured connection to `dest`, which no mesh Service claims.
pub(crate) async fn captured(shared: Arc<Shared>, mut app: TcpStream, dest: SocketAddr) {
    let host = peek_host(&app).await;
    let snap = shared.current();
    let Some(es) = snap
        .external_service(host.as_deref(), Some(dest.ip()), dest.port())
        .cloned()
    else {
        return unregistered(
            &shared,
            app,
            dest,
            host.as_deref(),
            snap.outbound_traffic_policy(),
        )
        .await;
    };
    if let Some(dest) = l7_via_gateway(&snap, &es, host.as_deref(), dest) {
        // HTTP through the gateway: routed and retried per request like mesh traffic.
        return crate::l7::outbound::serve(shared, app, dest).await;
    }
    let mut rec = shared.flow_record(Direction::Outbound, &shared.service, es.name.as_str());
    let (flags, sent, received, reply) = match es.via {
        Via::Direct => direct(&shared, &mut app, &es, host.as_deref(), dest, &mut rec).await,
        Via::Egress => {
            let (f, s, r) =
                via_gateway(&shared, &mut app, &es, host.as_deref(), dest, &mut rec).await;
            (f, s, r, None)
        }
    };
    rec.finish(End::Flow {
        flags: flags.as_str(),
        sent,
        received,
    });
    // The app sees the end only now, with the flow recorded.
    if let Some(reply) = reply {
        let _ = app.write_all(&reply).await;
        let _ = app.shutdown().await;
    }
    drop(app);
}

/// An `http` port of an ExternalService that goes `via: egress` is served per request (L7):
/// its Route (key: the ExternalService's name) with retries and timeouts applies, and each
/// request goes to the gateway with the external `host:port` as its authority.
fn l7_via_gateway(
    snap: &halyard_registry::Snapshot,
    es: &ExternalService,
    host: Option<&str>,
    dest: SocketAddr,
) -> Option<Destination> {
    let http = es
        .port(dest.port())
        .is_some_and(|p| p.protocol == ExternalProtocol::Http);
    let gateway = snap.meshconfig.as_ref()?.egress_gateway.as_ref()?;
    (es.via == Via::Egress && http).then(|| Destination {
        service: es.name.to_string(),
        port: dest.port(),
        egress: Some(EgressVia {
            gateway: gateway.to_string(),
            host: host.map_or_else(|| dest.ip().to_string(), str::to_owned),
        }),
    })
}

/// Neither a mesh Service nor an ExternalService.
async fn unregistered(
    shared: &Arc<Shared>,
    mut app: TcpStream,
    dest: SocketAddr,
    host: Option<&str>,
    mode: OutboundTrafficPolicy,
) {
    let label = host.map_or_else(|| dest.to_string(), |h| format!("{h}:{}", dest.port()));
    let mut rec = shared.flow_record(Direction::Outbound, &shared.service, "unknown");
    if mode == OutboundTrafficPolicy::RegistryOnly {
        let (first, metric) = note_refused(&label);
        shared.metrics.egress_refused(&metric);
        if first {
            tracing::warn!(destination = %label, "outbound flow to an unregistered destination refused (registry-only); register it as an ExternalService");
        }
        rec.finish(End::Flow {
            flags: Flags::NoRoute.as_str(),
            sent: 0,
            received: 0,
        });
        return reset(app);
    }
    let timeout = shared.config.file.failure.connect_timeout;
    let (flags, sent, received) = match connect(&[dest], timeout).await {
        Ok((out, addr)) => {
            rec.set_endpoint(addr);
            splice_tcp(shared, &mut app, out).await
        }
        Err(_) => {
            reset_on_close(&app);
            (Flags::UpstreamFailure, 0, 0)
        }
    };
    rec.finish(End::Flow {
        flags: flags.as_str(),
        sent,
        received,
    });
    drop(app);
}

/// Notes a refused destination: whether it is refused for the first time (one log line per
/// destination), and the metric label for it (`other` once 1,000 destinations are known, so the
/// family stays bounded).
fn note_refused(destination: &str) -> (bool, String) {
    const MAX: usize = 1000;
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if seen.contains(destination) {
        return (false, destination.to_owned());
    }
    if seen.len() >= MAX {
        return (true, "other".to_owned());
    }
    seen.insert(destination.to_owned());
    (true, destination.to_owned())
}

/// Dials out from this sidecar. The last value is an answer for the app, to be written once
/// the flow is recorded (a 502 naming why TLS origination failed, for an app that speaks
/// plain HTTP on this port).
async fn direct(
    shared: &Arc<Shared>,
    app: &mut TcpStream,
    es: &ExternalService,
    host: Option<&str>,
    dest: SocketAddr,
    rec: &mut FlowRecord,
) -> (Flags, u64, u64, Option<Vec<u8>>) {
    let timeout = shared.config.file.failure.connect_timeout;
    let (flags, sent, received) =
        match dial_out(es, host, Some(dest.ip()), dest.port(), timeout).await {
            Ok(Out::Plain(out, addr)) => {
                rec.set_endpoint(addr);
                splice_tcp(shared, app, out).await
            }
            Ok(Out::Tls(out, addr)) => {
                rec.set_endpoint(addr);
                splice_any(shared, app, out).await
            }
            Err(e) => {
                tracing::info!(external = %es.name, error = %e, "egress dial failed");
                if let DialError::Tls(why) = &e {
                    return (Flags::UpstreamFailure, 0, 0, Some(bad_gateway(why)));
                }
                reset_on_close(app);
                (Flags::UpstreamFailure, 0, 0)
            }
        };
    (flags, sent, received, None)
}

/// Tunnels the flow to an egress gateway as a CONNECT to the external `host:port`.
async fn via_gateway(
    shared: &Arc<Shared>,
    app: &mut TcpStream,
    es: &ExternalService,
    host: Option<&str>,
    dest: SocketAddr,
    rec: &mut FlowRecord,
) -> (Flags, u64, u64) {
    let snap = shared.current();
    let gateway = snap
        .meshconfig
        .as_ref()
        .and_then(|m| m.egress_gateway.as_ref())
        .map(|g| g.to_string());
    let name = host.map_or_else(|| dest.ip().to_string(), str::to_owned);
    let (Some(gateway), Ok(target)) = (gateway, Target::new(&name, dest.port())) else {
        tracing::warn!(external = %es.name, "via egress, but MeshConfig names no egressGateway (or the host is no valid target)");
        reset_on_close(app);
        return (Flags::NoHealthy, 0, 0);
    };
    let Ok(picked) = shared.pick_in(&snap, &gateway, &Scope::default(), &[], false) else {
        reset_on_close(app);
        return (Flags::NoHealthy, 0, 0);
    };
    rec.picked(&picked.endpoint);
    let ep = &picked.endpoint;
    let open = shared
        .pool
        .open_tcp(ep.address, &ep.identity, &target, http::HeaderMap::new());
    let mut tunnel = match open.await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(%gateway, error = %e, "egress gateway unreachable");
            reset_on_close(app);
            return (Flags::UpstreamFailure, 0, 0);
        }
    };
    let (read, write) = app.split();
    let result = tokio::select! {
        r = tunnel.splice(read, write) => r,
        _ = shared.hard_stop.cancelled() => Err(std::io::ErrorKind::ConnectionAborted.into()),
    };
    match result {
        Ok((up, down)) => (Flags::Ok, up, down),
        Err(e) => {
            let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
            tunnel.abort();
            reset_on_close(app);
            (if refused { Flags::Denied } else { Flags::Reset }, 0, 0)
        }
    }
}

/// The gateway side: a peer's CONNECT to an external `host:port`. The ExternalService that
/// covers it and its Policy (key: the ExternalService's name) decide; then this sidecar dials
/// out and splices.
pub(crate) async fn serve_gateway(shared: &Arc<Shared>, req: TunnelRequest) {
    let snap = shared.current();
    let peer = req.peer().id.clone();
    let services = shared.peer_services(&snap, &peer);
    let target = req.target().clone();
    let host = target.service().to_owned();
    let ip = host.parse::<IpAddr>().ok();
    let Some(es) = snap
        .external_service(Some(&host), ip, target.port())
        .cloned()
    else {
        tracing::info!(%peer, %target, "egress refused: no ExternalService covers it");
        req.reject(StatusCode::NOT_FOUND).await;
        return;
    };
    let mut rec = shared.flow_record(
        Direction::Inbound,
        source_label(&services),
        es.name.as_str(),
    );
    rec.set_peer(peer.as_str());
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let caller = Peer {
        id: &peer,
        services: &names,
    };
    let on = policy::Target::port(target.port());
    if let Decision::Deny(reason) = policy::evaluate(
        snap.policy(es.name.as_str()).map(|p| &**p),
        snap.default_policy(),
        caller,
        on,
    ) {
        shared
            .metrics
            .denial(source_label(&services), es.name.as_str(), reason.as_str());
        tracing::info!(%peer, %target, reason = reason.as_str(), "egress denied by policy");
        rec.finish(End::Flow {
            flags: Flags::Denied.as_str(),
            sent: 0,
            received: 0,
        });
        return req.reject(StatusCode::FORBIDDEN).await;
    }
    let timeout = shared.config.file.failure.connect_timeout;
    let named = ip.is_none().then_some(host.as_str());
    let out = match dial_out(&es, named, ip, target.port(), timeout).await {
        Ok(out) => out,
        Err(e) => {
            tracing::info!(external = %es.name, error = %e, "egress dial failed");
            // Recorded before the caller hears of it.
            rec.finish(End::Flow {
                flags: Flags::UpstreamFailure.as_str(),
                sent: 0,
                received: 0,
            });
            if let DialError::Tls(why) = e {
                // The caller speaks HTTP on this port: it gets a 502 that says why.
                if let Ok(mut tunnel) = req.accept().await {
                    let _ = tunnel.write_bytes(Bytes::from(bad_gateway(&why))).await;
                    let _ = tunnel.shutdown().await;
                }
                return;
            }
            return req.reject(StatusCode::BAD_GATEWAY).await;
        }
    };
    let (flags, sent, received) = match req.accept().await {
        Ok(tunnel) => {
            let (addr, stream): (SocketAddr, Box<dyn Io>) = match out {
                Out::Plain(s, a) => (a, Box::new(s)),
                Out::Tls(s, a) => (a, s),
            };
            rec.set_endpoint(addr);
            splice_tunnel(shared, tunnel, stream).await
        }
        Err(_) => (Flags::Reset, 0, 0),
    };
    rec.finish(End::Flow {
        flags: flags.as_str(),
        sent,
        received,
    });
}

/// An HTTP/1.1 502 naming `why`, for an app that spoke plain HTTP.
fn bad_gateway(why: &str) -> Vec<u8> {
    let body = format!("{why}\n");
    format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\nx-halyard-local-reply: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn splice_tcp(shared: &Shared, app: &mut TcpStream, out: TcpStream) -> (Flags, u64, u64) {
    splice_any(shared, app, Box::new(out)).await
}

/// Copies both ways until both sides finished, or the drain deadline passes.
async fn splice_any(
    shared: &Shared,
    app: &mut TcpStream,
    mut out: Box<dyn Io>,
) -> (Flags, u64, u64) {
    tokio::select! {
        r = tokio::io::copy_bidirectional(app, &mut out) => match r {
            Ok((up, down)) => (Flags::Ok, up, down),
            Err(_) => {
                reset_on_close(app);
                (Flags::Reset, 0, 0)
            }
        },
        _ = shared.hard_stop.cancelled() => {
            reset_on_close(app);
            (Flags::Reset, 0, 0)
        }
    }
}

async fn splice_tunnel(
    shared: &Shared,
    mut tunnel: ServerTunnel,
    out: Box<dyn Io>,
) -> (Flags, u64, u64) {
    let (read, write) = tokio::io::split(out);
    tokio::select! {
        r = tunnel.splice(read, write) => match r {
            Ok((up, down)) => (Flags::Ok, down, up),
            Err(_) => (Flags::Reset, 0, 0),
        },
        _ = shared.hard_stop.cancelled() => {
            tunnel.abort();
            (Flags::Reset, 0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_header_names_the_host_without_its_port() {
        let req = b"GET / HTTP/1.1\r\nHost: API.Outside.Test:8080\r\n\r\n";
        assert_eq!(sniff(req), Sniffed::Host("api.outside.test".into()));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHo"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::Nothing);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Nothing);
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }

    #[test]
    fn a_client_hello_names_its_server() {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("api.outside.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert_eq!(sniff(&hello), Sniffed::Host("api.outside.test".into()));
        assert_eq!(sniff(&hello[..20]), Sniffed::NeedMore);
    }
}
