//! The QUIC endpoint of a sidecar: one UDP socket that accepts connections from other sidecars
//! (client certificate required) and opens connections to them, both sides verified with the
//! SPIFFE verifiers of `halyard-certs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halyard_certs::{CertResolver, ExpectedServer, SpiffeId, TrustBundle};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::TransportConfig;
use crate::error::{EndpointError, TunnelError};

/// ALPN of HTTP/3 (RFC 9114 §3.1).
pub const ALPN_H3: &[u8] = b"h3";
/// Name put in the handshake; the verifiers check SPIFFE ids, not DNS names, and SNI is off.
const SERVER_NAME: &str = "halyard.mesh";
/// Unidirectional streams a peer may open: HTTP/3 needs control and two QPACK streams
/// (RFC 9114 §6.2); a little headroom for grease.
const MAX_UNI_STREAMS: u32 = 16;

/// A sidecar's QUIC endpoint. Cheap to clone; all clones share the socket.
#[derive(Clone, Debug)]
pub struct MeshEndpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    quic: quinn::Endpoint,
    resolver: Arc<CertResolver>,
    /// Replaced as a whole on CA rotation; read once per handshake.
    bundle: std::sync::RwLock<Arc<TrustBundle>>,
    config: TransportConfig,
    /// Settings of the connections this endpoint accepts directly.
    transport: Arc<quinn::TransportConfig>,
    /// `transport` for the connections an east-west gateway brings (`proxy_protocol_from`
    /// set): the gateway takes a PROXY v2 header off every datagram the server sends back
    /// through it, so they start [`gateway_initial_mtu`]. `None` when no gateway is trusted.
    proxied_transport: Option<Arc<quinn::TransportConfig>>,
    /// The server configurations an attempt is accepted with: for direct clients (also the
    /// quinn endpoint's own), and with `proxied_transport` for clients behind a gateway.
    /// Replaced together on [`MeshEndpoint::set_trust_bundle`].
    servers: std::sync::RwLock<ServerConfigs>,
    /// The key of this endpoint's Retry tokens (RFC 9000 §8.1.2), kept across trust bundles.
    /// A configuration made with a new key cannot read the token of a client that was sent a
    /// Retry just before the bundle changed: its attempt counts as unvalidated, and under the
    /// load that made the endpoint send Retry it gets a second one, which a client ignores
    /// (§17.2.5.2), so its handshake times out.
    token_key: TokenKey,
    /// `transport` for the connections this endpoint opens: the server of an HTTP/3 connection
    /// never opens a bidirectional stream (RFC 9114 §6.1), so none is allowed. quinn sets up a
    /// slot per stream a peer may open when a connection starts (`quinn_proto`'s
    /// `StreamsState::new`): this is half a cold connection's slots, and memory per connection.
    client_transport: Arc<quinn::TransportConfig>,
    /// `client_transport` for connections dialled through an east-west gateway
    /// ([`gateway_initial_mtu`]).
    gateway_transport: Arc<quinn::TransportConfig>,
    /// Bounds on inbound handshakes and connections per peer (`admission`).
    gate: crate::admission::Gate,
    /// Clients reached through east-west gateways (`proxy_protocol_from`), kept across rebind.
    proxied: Option<Arc<crate::initial_filter::Proxied>>,
    /// Endpoints of other clusters, dialled through their cluster's east-west gateway.
    gateways: std::sync::RwLock<Arc<GatewayRoutes>>,
    /// The server ID in every connection ID this endpoint issues.
    server_id: crate::quic_lb::ServerId,
}

/// A Retry token key (quinn's `HandshakeTokenKey`), never printed.
#[derive(Clone)]
struct TokenKey(Arc<dyn quinn::crypto::HandshakeTokenKey>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// The server configurations of one trust bundle.
#[derive(Debug)]
struct ServerConfigs {
    direct: Arc<quinn::ServerConfig>,
    proxied: Option<Arc<quinn::ServerConfig>>,
}

/// Which peer addresses are reached through an east-west gateway: peer (the workload's
/// registered QUIC address in its own cluster) → the gateway's address.
pub type GatewayRoutes = std::collections::HashMap<SocketAddr, SocketAddr>;

/// The TLS server name that asks an east-west gateway for the endpoint registered at `peer`
/// (the gateway reads it from the client's Initial packet): `<server-id>.lb.halyard.internal`,
/// the server ID ([`crate::quic_lb::ServerId::of`]) in 12 hex digits.
pub fn gateway_server_name(peer: SocketAddr) -> String {
    format!(
        "{}{GATEWAY_NAME_SUFFIX}",
        crate::quic_lb::ServerId::of(peer).to_hex()
    )
}

/// What follows the server ID in a [`gateway_server_name`].
pub const GATEWAY_NAME_SUFFIX: &str = ".lb.halyard.internal";

/// Binds a UDP socket with the configured kernel buffers, ready to hand to quinn (also for
/// [`MeshEndpoint::rebind`]). The buffers are set before quinn owns the socket, as its
/// README advises; the kernel may clamp them to `net.core.{r,w}mem_max`.
pub fn bind_udp(
    addr: SocketAddr,
    config: &TransportConfig,
) -> Result<std::net::UdpSocket, EndpointError> {
    let fail = |source| EndpointError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    if let Err(e) = socket.set_recv_buffer_size(config.udp_recv_buffer()) {
        tracing::warn!(%addr, error = %e, "could not set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(config.udp_send_buffer()) {
        tracing::warn!(%addr, error = %e, "could not set SO_SNDBUF");
    }
    socket.bind(&addr.into()).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    Ok(socket.into())
}

/// The settings of a connection this endpoint dials (`via_gateway`: through an east-west
/// gateway), starting from `initial_rtt` instead of quinn's 333 ms when given.
fn dialling_transport(
    config: &TransportConfig,
    via_gateway: bool,
    initial_rtt: Option<Duration>,
) -> quinn::TransportConfig {
    let mut t = quinn_transport(config);
    let initial_mtu = if via_gateway {
        gateway_initial_mtu(config.initial_mtu())
    } else {
        config.initial_mtu()
    };
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .initial_mtu(initial_mtu);
    if let Some(rtt) = initial_rtt {
        t.initial_rtt(rtt);
    }
    t
}

/// Bounds of the initial RTT a new connection takes from an earlier one to the same peer
/// (RFC 9002 §6.2.2 allows a previous connection's smoothed RTT): at least 10 ms, so a
/// handshake slowed by the server's CPU (a key exchange and a signature, about a millisecond
/// on a busy host) is not answered with a resent Initial; at most 333 ms, the RFC's default, so
/// a slow path seen once never makes recovery slower than without history.
pub(crate) const INITIAL_RTT_FROM_HISTORY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_millis(333);

/// The initial RTT for a new connection to a peer whose last connection measured `previous`
/// (smoothed RTT), clamped to [`INITIAL_RTT_FROM_HISTORY`].
pub(crate) fn initial_rtt_from(previous: Duration) -> Duration {
    previous.clamp(
        *INITIAL_RTT_FROM_HISTORY.start(),
        *INITIAL_RTT_FROM_HISTORY.end(),
    )
}

/// quinn transport settings derived from ours.
fn quinn_transport(config: &TransportConfig) -> quinn::TransportConfig {
    let var = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(var(config.max_concurrent_bidi_streams()))
        .max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .stream_receive_window(var(config.stream_receive_window()))
        .receive_window(var(config.receive_window()))
        .send_window(config.send_window())
        .keep_alive_interval(config.keep_alive_interval())
        // Round-robin between streams: with fairness off, a bulk flow that always has data queued
        // starves every request stream on the same connection once it is congestion-limited
        // (measured: 50 request flows timed out behind one bulk flow on a 100 Mbit/s link).
        .send_fairness(true)
        .congestion_controller_factory(config.congestion().factory());
    // The start (`initial_mtu`) is set per role by the caller: accepted, dialled, dialled
    // through a gateway. Probing goes on above a larger start (quinn's default ceiling is 1452).
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(config.initial_mtu().max(1452));
    t.mtu_discovery_config(Some(mtud));
    // TransportConfig bounds the idle timeout to a day, far inside quinn's limit.
    t.max_idle_timeout(IdleTimeout::try_from(config.idle_timeout()).ok());
    t
}

/// The `initial_mtu` of a connection dialled through an east-west gateway, bytes: the gateway
/// puts a PROXY protocol v2 header (up to [`crate::proxy_v2::MAX_LEN`] bytes) in front of every
/// datagram it forwards, so a packet of the configured size would no longer fit the path the
/// operator sized it for. Never below 1,200 (RFC 9000 §14); discovery still probes upwards.
pub(crate) fn gateway_initial_mtu(initial_mtu: u16) -> u16 {
    let header = u16::try_from(crate::proxy_v2::MAX_LEN).unwrap_or(u16::MAX);
    initial_mtu
        .saturating_sub(header)
        .max(crate::config::MIN_MTU)
}

impl MeshEndpoint {
    /// Binds `bind` and serves the identity of `resolver` (hot-rotated by it), trusting `bundle`.
    /// Must be called inside a tokio runtime.
    pub fn new(
        resolver: Arc<CertResolver>,
        bundle: Arc<TrustBundle>,
        config: TransportConfig,
        bind: SocketAddr,
    ) -> Result<Self, EndpointError> {
        Self::new_advertised(
            resolver,
            bundle,
            config,
            bind,
            None,
            crate::quic_lb::LbConfig::default(),
            &crate::ResetKey::random(),
        )
    }

    /// As [`MeshEndpoint::new`], for an endpoint registered as `advertise` (default: the bound
    /// address): every connection ID it issues carries `ServerId::of(advertise)` under the
    /// QUIC-LB configuration `lb` (encrypted when it has a key; [`crate::quic_lb`]), which is
    /// how an east-west gateway holding the same configuration routes to it. Its stateless
    /// reset tokens (RFC 9000 §10.3) are made with `reset_key`: the same key across restarts
    /// ([`crate::ResetKey::load_or_create`]) lets peers recognise the resets a restarted process
    /// sends for its predecessor's connections.
    pub fn new_advertised(
        resolver: Arc<CertResolver>,
        bundle: Arc<TrustBundle>,
        config: TransportConfig,
        bind: SocketAddr,
        advertise: Option<SocketAddr>,
        lb: crate::quic_lb::LbConfig,
        reset_key: &crate::ResetKey,
    ) -> Result<Self, EndpointError> {
        let accepting = |initial_mtu: u16| {
            let mut t = quinn_transport(&config);
            t.initial_mtu(initial_mtu);
            Arc::new(t)
        };
        let transport = accepting(config.initial_mtu());
        let proxied_transport = (!config.proxy_protocol_from().is_empty())
            .then(|| accepting(gateway_initial_mtu(config.initial_mtu())));
        let client_transport = Arc::new(dialling_transport(&config, false, None));
        let gateway_transport = Arc::new(dialling_transport(&config, true, None));
        let token_key = token_key()?;
        let servers = server_configs(
            (&resolver, &bundle, &token_key),
            &transport,
            proxied_transport.as_ref(),
        )?;
        let server = (*servers.direct).clone();
        let socket = bind_udp(bind, &config)?;
        let bound = socket
            .local_addr()
            .map_err(|source| EndpointError::Socket { addr: bind, source })?;
        let server_id = crate::quic_lb::ServerId::of(advertise.unwrap_or(bound));
        let runtime = Arc::new(quinn::TokioRuntime);
        let gate = crate::admission::Gate::new(config.max_streams_per_peer());
        let proxied = crate::initial_filter::Proxied::new(config.proxy_protocol_from());
        let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)
            .map_err(|source| EndpointError::Socket { addr: bind, source })?;
        let reset_key = reset_key.for_endpoint(advertise.unwrap_or(bound));
        let mut endpoint_config = quinn::EndpointConfig::new(reset_key.hmac());
        endpoint_config
            // quinn sends at most one stateless reset per interval across the endpoint (20 ms by
            // default): after a restart, most callers' first packets would then go unanswered and
            // wait for a retransmission. A reset goes only to a packet whose connection ID
            // carries this endpoint's server ID (`LbConnectionIdGenerator::validate`), so a
            // flood of garbage makes none, and a reset is never larger than what provoked it
            // (RFC 9000 §10.3.3).
            .min_reset_interval(std::time::Duration::from_millis(1))
            .cid_generator(move || {
                Box::new(crate::quic_lb::LbConnectionIdGenerator::new(
                    server_id,
                    lb.clone(),
                ))
            })
            // A greased fixed bit (RFC 9287) would let 1-RTT packets start like a PROXY header.
            .grease_quic_bit(false);
        let quic = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            crate::initial_filter::InitialFilter::new(socket, gate.clone(), proxied.clone()),
            runtime,
        )
        .map_err(|source| EndpointError::Socket { addr: bind, source })?;
        Ok(MeshEndpoint {
            inner: Arc::new(Inner {
                quic,
                resolver,
                bundle: std::sync::RwLock::new(bundle),
                config,
                transport,
                proxied_transport,
                servers: std::sync::RwLock::new(servers),
                token_key,
                client_transport,
                gateway_transport,
                gate,
                proxied,
                gateways: std::sync::RwLock::new(Arc::new(GatewayRoutes::new())),
                server_id,
            }),
        })
    }

    /// The server ID every connection ID of this endpoint carries.
    pub fn server_id(&self) -> crate::quic_lb::ServerId {
        self.inner.server_id
    }

    /// Replaces the table of peers reached through east-west gateways (from the registry's
    /// endpoints of other clusters). New connections follow it; open ones keep their path.
    pub fn set_gateway_routes(&self, routes: GatewayRoutes) {
        *self
            .inner
            .gateways
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
    }

    /// The gateway `peer` is reached through, if any.
    pub fn gateway_for(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let routes = self
            .inner
            .gateways
            .read()
            .unwrap_or_else(|p| p.into_inner());
        routes.get(&peer).copied()
    }

    /// Inbound attempts and connections refused so far (handshake floods, per-peer caps).
    pub fn admission_stats(&self) -> &crate::admission::AdmissionStats {
        &self.inner.gate.stats
    }

    pub(crate) fn gate(&self) -> &crate::admission::Gate {
        &self.inner.gate
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.quic.local_addr()
    }

    /// Moves every connection of this endpoint to `socket` (QUIC connection migration,
    /// RFC 9000 §9): open streams continue; peers validate the new path.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        let socket = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
        let filtered = crate::initial_filter::InitialFilter::new(
            socket,
            self.inner.gate.clone(),
            self.inner.proxied.clone(),
        );
        self.inner.quic.rebind_abstract(filtered)
    }

    /// Closes every connection at once (H3_NO_ERROR) and stops accepting.
    pub fn close(&self) {
        // RFC 9114 §8.1: H3_NO_ERROR (0x100) for a deliberate close.
        self.inner
            .quic
            .close(VarInt::from_u32(0x100), b"endpoint closed");
    }

    /// Waits until every connection has been closed and its packets flushed.
    pub async fn wait_idle(&self) {
        self.inner.quic.wait_idle().await;
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        self.inner
            .bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Trusts `bundle` from now on (CA rotation: pass old and new roots together, then the new
    /// alone once every leaf is reissued). New handshakes on both sides use it; established
    /// connections keep the trust they were verified with.
    pub fn set_trust_bundle(&self, bundle: Arc<TrustBundle>) -> Result<(), EndpointError> {
        let servers = server_configs(
            (&self.inner.resolver, &bundle, &self.inner.token_key),
            &self.inner.transport,
            self.inner.proxied_transport.as_ref(),
        )?;
        let server = (*servers.direct).clone();
        *self.inner.bundle.write().unwrap_or_else(|p| p.into_inner()) = bundle;
        *self
            .inner
            .servers
            .write()
            .unwrap_or_else(|p| p.into_inner()) = servers;
        self.inner.quic.set_server_config(Some(server));
        Ok(())
    }

    /// Accepts an inbound connection attempt (after the admission checks) with the settings
    /// of its kind and the trust bundle in force now (quinn's `Incoming::accept_with`; its
    /// `accept` would use the configuration of when the attempt arrived): a client whose
    /// Initial came through a trusted east-west gateway (`proxy_protocol_from`) gets a
    /// connection that starts at [`gateway_initial_mtu`], so the PROXY header on the way back
    /// fits; a direct client one that starts at `initial_mtu`. Errors as quinn's `accept`: the
    /// attempt was refused by the QUIC layer (for example a full connection table).
    pub fn accept(
        &self,
        incoming: quinn::Incoming,
    ) -> Result<quinn::Connecting, quinn::ConnectionError> {
        let via_gateway = self
            .inner
            .proxied
            .as_ref()
            .is_some_and(|p| p.via(incoming.remote_address()).is_some());
        let server = {
            let servers = self.inner.servers.read().unwrap_or_else(|p| p.into_inner());
            match &servers.proxied {
                Some(proxied) if via_gateway => proxied.clone(),
                _ => servers.direct.clone(),
            }
        };
        incoming.accept_with(server)
    }

    /// The transport settings.
    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// The underlying quinn endpoint (for tests and metrics).
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.inner.quic
    }

    /// Opens a QUIC connection to `peer`, accepting only a server whose certificate names
    /// `expected`. A peer in the gateway table ([`MeshEndpoint::set_gateway_routes`]) is
    /// dialled at its gateway, with [`gateway_server_name`] as the server name: mTLS stays end
    /// to end, the gateway only routes.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        expected: &SpiffeId,
    ) -> Result<quinn::Connection, TunnelError> {
        self.connect_after(peer, expected, None).await
    }

    /// [`MeshEndpoint::connect`] to a peer an earlier connection measured `previous_rtt` to
    /// (its smoothed RTT): the handshake starts from that RTT ([`initial_rtt_from`]) instead of
    /// quinn's 333 ms, so a lost Initial or Handshake packet is resent after about three RTTs
    /// rather than after a second (RFC 9002 §6.2.2, §6.2.1).
    pub async fn connect_after(
        &self,
        peer: SocketAddr,
        expected: &SpiffeId,
        previous_rtt: Option<Duration>,
    ) -> Result<quinn::Connection, TunnelError> {
        let fail = |reason: String| TunnelError::Connect { peer, reason };
        let (dial, name) = match self.gateway_for(peer) {
            Some(gateway) => (gateway, Some(gateway_server_name(peer))),
            None => (peer, None),
        };
        let client = self
            .client_config(expected, name.is_some(), previous_rtt.map(initial_rtt_from))
            .map_err(|e| fail(e.to_string()))?;
        let connecting = self
            .inner
            .quic
            .connect_with(client, dial, name.as_deref().unwrap_or(SERVER_NAME))
            .map_err(|e| fail(e.to_string()))?;
        let after = self.inner.config.connect_timeout();
        match tokio::time::timeout(after, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(TunnelError::ConnectTimeout { peer, after }),
        }
    }

    fn client_config(
        &self,
        expected: &SpiffeId,
        sni: bool,
        initial_rtt: Option<Duration>,
    ) -> Result<quinn::ClientConfig, EndpointError> {
        let mut tls = halyard_certs::client_config(
            self.inner.resolver.clone(),
            self.bundle(),
            ExpectedServer::Id(expected.clone()),
        )?;
        tls.alpn_protocols = vec![ALPN_H3.to_vec()];
        // Only a gateway needs the name; direct handshakes do not show one.
        tls.enable_sni = sni;
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(match (initial_rtt, sni) {
            // Once per connection to a peer seen before: quinn's settings are not `Clone`.
            (Some(rtt), _) => Arc::new(dialling_transport(&self.inner.config, sni, Some(rtt))),
            (None, true) => self.inner.gateway_transport.clone(),
            (None, false) => self.inner.client_transport.clone(),
        });
        Ok(client)
    }
}

/// A fresh key for Retry tokens: HKDF-SHA256 extracted from 64 random bytes, as quinn's own
/// `ServerConfig::with_crypto` makes one.
fn token_key() -> Result<TokenKey, EndpointError> {
    use ring::rand::SecureRandom;
    let mut secret = [0u8; 64];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| EndpointError::Crypto("no randomness for the token key".into()))?;
    let key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&secret);
    Ok(TokenKey(Arc::new(key)))
}

/// What every server configuration of an endpoint is made from: its certificate resolver, the
/// trust bundle in force and its Retry token key.
type ServerBasis<'a> = (&'a Arc<CertResolver>, &'a Arc<TrustBundle>, &'a TokenKey);

/// The server configurations for a bundle: direct, and behind a gateway when `proxied` is set.
fn server_configs(
    basis: ServerBasis<'_>,
    direct: &Arc<quinn::TransportConfig>,
    proxied: Option<&Arc<quinn::TransportConfig>>,
) -> Result<ServerConfigs, EndpointError> {
    Ok(ServerConfigs {
        direct: Arc::new(server_config(basis, direct.clone())?),
        proxied: match proxied {
            Some(t) => Some(Arc::new(server_config(basis, t.clone())?)),
            None => None,
        },
    })
}

fn server_config(
    (resolver, bundle, token_key): ServerBasis<'_>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, EndpointError> {
    let mut tls = halyard_certs::server_config(resolver.clone(), bundle.clone())?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::new(Arc::new(crypto), token_key.0.clone());
    server.transport_config(transport);
    Ok(server)
}

/// The SPIFFE id in the certificate the peer proved during the handshake.
pub fn peer_identity(conn: &quinn::Connection) -> Option<SpiffeId> {
    peer_leaf(conn).map(|(id, _)| id)
}

/// The SPIFFE id and the serial (big-endian bytes, as in the certificate) of the leaf the peer
/// proved during the handshake; `None` before the handshake or for an unreadable leaf.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<(SpiffeId, Vec<u8>)> {
    let any = conn.peer_identity()?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let id = halyard_certs::peer_id(Some(&certs)).ok()?;
    let serial = halyard_certs::svid::serial(certs.first()?).ok()?;
    Some((id, serial))
}

#[cfg(test)]
mod tests {
    use super::gateway_initial_mtu;
    use super::initial_rtt_from;
    use std::time::Duration;

    #[test]
    fn the_initial_rtt_from_history_is_bounded() {
        let ms = Duration::from_millis;
        // A loopback peer's 40 µs does not make a busy server's handshake look lost.
        assert_eq!(initial_rtt_from(Duration::from_micros(40)), ms(10));
        assert_eq!(initial_rtt_from(ms(20)), ms(20));
        // Never slower to recover than quinn's default (RFC 9002 §6.2.2: 333 ms).
        assert_eq!(initial_rtt_from(ms(900)), ms(333));
    }

    #[test]
    fn a_connection_through_a_gateway_starts_below_the_proxy_header() {
        // 1472 fits a 1500-byte IPv4 path; the gateway adds up to 52 bytes (PROXY v2, IPv6).
        assert_eq!(gateway_initial_mtu(1472), 1420);
        assert_eq!(gateway_initial_mtu(1300), 1248);
        // Never below what every QUIC path carries.
        assert_eq!(gateway_initial_mtu(1230), 1200);
        assert_eq!(gateway_initial_mtu(1200), 1200);
    }
}
