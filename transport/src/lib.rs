//! The wire between Halyard sidecars: mutually authenticated QUIC (SPIFFE mTLS, ALPN `h3`),
//! HTTP/3 CONNECT tunnels for TCP flows (RFC 9114 §4.4), ordinary HTTP/3 requests for L7, a
//! connection pool, and (feature `test-util`) a lossy-link simulator.
//!
//! # Shapes the sidecar builds on
//!
//! ```text
//! TransportConfig::default() / TransportConfig::try_from(RawTransportConfig)  (serde both ways)
//! MeshEndpoint::new(Arc<CertResolver>, Arc<TrustBundle>, TransportConfig, SocketAddr)
//!     -> Result<MeshEndpoint, EndpointError>
//!   .local_addr() .rebind(std::net::UdpSocket) .set_trust_bundle(Arc<TrustBundle>) .close() .wait_idle().await
//!   .accept(quinn::Incoming) -> Result<quinn::Connecting, quinn::ConnectionError>  // what serve() does
//! bind_udp(SocketAddr, &TransportConfig) -> Result<std::net::UdpSocket, EndpointError>
//!
//! // inbound
//! serve(MeshEndpoint, Arc<impl Handler>).await          // until the endpoint closes
//! serve_until(MeshEndpoint, Arc<impl Handler>, drain_signal).await  // then GOAWAY, wait for in-flight
//! trait Handler { async fn tunnel(&self, TunnelRequest); async fn http(&self, HttpRequest) /* default 405 */ }
//! TunnelRequest: .peer() -> &Peer{id: SpiffeId, addr} .target() -> &Target .headers()
//!   .accept().await -> Result<ServerTunnel, TunnelError>   // 200; ServerTunnel: AsyncRead + AsyncWrite
//!   .reject(StatusCode).await                             // 403 / 404 / 502 / 503 / 504
//! HttpRequest { peer, request: http::Request<()>, stream: ServerRequestStream }  .respond(StatusCode).await
//! (a TunnelRequest dropped unanswered is reset with H3_REQUEST_REJECTED; an HttpRequest's
//!  stream must get a response before it is dropped)
//!
//! // outbound
//! Pool::new(MeshEndpoint)
//!   .open_tcp(SocketAddr, &SpiffeId, &Target, HeaderMap).await -> Result<Tunnel, TunnelError>
//!   .send_request(SocketAddr, &SpiffeId, http::Request<()>).await -> Result<PooledRequest, TunnelError>
//!   .stats() -> Vec<PeerStats>   .congestion() -> Vec<PeerCongestion>
//!   .connections(addr, &id)   .retain_peers(|&PeerKey| bool)
//!   .close_refused(|&SpiffeId, serial: &[u8]| bool)   .close()
//! CongestionStats::of(&quinn::Connection) -> CongestionStats { rtt, cwnd, pacing_rate, delivery_rate, phase, competing }
//! Tunnel / ServerTunnel: AsyncRead + AsyncWrite (Tunnel writable at once);
//!   .splice(read_half, write_half).await -> io::Result<(sent, received)>   // the L4 proxy loop
//!   .write_bytes(Bytes).await  .read_chunk().await -> io::Result<Option<Bytes>>  .abort()
//!   Tunnel::status().await -> Result<StatusCode, TunnelError>
//! TunnelError: .before_any_byte() -> bool, .status() -> Option<StatusCode>, .into_io()
//! request_section_size(&Request<()>) / response_section_size(StatusCode, &HeaderMap) -> u64
//!   // RFC 9114 §4.2.2: name + value + 32 per field, against max_field_section_size
//! ```
//!
//! Half-close: `shutdown()` on either tunnel side finishes its direction of the stream; the
//! other direction stays open. `abort()` resets the stream (a TCP reset), and so does dropping a
//! tunnel whose sending side was not shut down. Errors reaching an `io::Error` wrap the
//! [`TunnelError`] (`err.get_ref()` then `downcast_ref::<TunnelError>()`).
//!
//! Pure decisions, unit-tested without sockets: [`choose_connection`], [`backoff_delay`],
//! [`ResetBudget`], [`Target`] parsing, [`TransportConfig`] validation, and the BBRv3
//! congestion controller [`congestion::Bbr`] (`[transport] congestion = "bbr" | "cubic"`).
#![forbid(unsafe_code)]

pub mod admission;
mod config;
pub mod congestion;
mod credit;
mod endpoint;
mod error;
mod fields;
pub mod initial;
mod initial_filter;
mod pool;
pub mod proxy_v2;
pub mod quic_lb;
mod reset;
mod reset_key;
mod server;
#[cfg(any(test, feature = "test-util"))]
pub mod sim;
mod target;
mod tunnel;

pub use config::{ConfigError, IpPrefix, RawTransportConfig, TransportConfig};
pub use congestion::{Congestion, CongestionStats};
pub use endpoint::{
    bind_udp, gateway_server_name, peer_identity, GatewayRoutes, MeshEndpoint, ALPN_H3,
    GATEWAY_NAME_SUFFIX,
};
pub use error::{EndpointError, TunnelError};
pub use fields::{header_fields_size, request_section_size, response_section_size};
pub use pool::{
    backoff_delay, choose_connection, upgraded_tunnel, Choice, ClientRequestStream, ConnLimits,
    ConnLoad, ConnectionStats, PeerCongestion, PeerKey, PeerStats, Pool, PooledRecv, PooledRequest,
    PooledSend, RequestRecv, RequestSend,
};
pub use reset::ResetBudget;
pub use reset_key::{ResetKey, ResetKeyError, RESET_KEY_LEN};
pub use server::{
    serve, serve_until, Handler, HttpRequest, Peer, ServerRequestStream, TunnelRequest,
};
pub use target::{Target, TargetError};
pub use tunnel::{LocalRead, ServerRecv, ServerSend, ServerTunnel, Tunnel};

/// The libraries whose types appear in this API, re-exported so users match versions.
pub use {h3, h3_quinn, http, quinn};
