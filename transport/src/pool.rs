//! The outbound side: a pool of QUIC connections keyed by (peer address, expected SPIFFE id),
//! carrying CONNECT tunnels and HTTP/3 requests.
//!
//! - Connections are opened on demand; concurrent callers during a connect share the attempt.
//! - Up to `connections_per_peer` connections per peer (default 1); with more allowed, flows
//!   are spread over them, then a new stream goes to the least loaded.
//! - When a connection is out of stream credit (the pool's own count reached the stream limit,
//!   or an open found no MAX_STREAMS credit within `stream_credit_wait_ms`), another connection
//!   is opened, up to `max_connections_per_peer`. With that many open and none with credit, a
//!   new stream waits `stream_credit_wait_ms` on the least loaded, then fails with the local
//!   error [`TunnelError::StreamLimit`] (never a connect failure: the peer is fine).
//! - Closed connections (idle timeout, peer restart) are dropped and replaced on next use; a
//!   request that races with a closing connection is retried once on a fresh one. A stateless
//!   reset (a restarted peer) drops every connection to that peer from the pool.
//! - A failed connect puts the peer in jittered exponential backoff; callers then get
//!   [`TunnelError::Backoff`] at once and can choose another endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_certs::SpiffeId;
use http::{HeaderMap, Method};

use crate::congestion::CongestionStats;
use crate::credit::{NoCredit, SendRequest};
use crate::endpoint::MeshEndpoint;
use crate::error::TunnelError;
use crate::target::Target;
use crate::tunnel::{StreamGuard, Tunnel};

/// The client half of an HTTP/3 request stream, for L7.
pub type ClientRequestStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Identifies a peer in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The peer's QUIC address.
    pub addr: SocketAddr,
    /// The identity the peer must prove.
    pub id: SpiffeId,
}

/// A pooled HTTP/3 connection.
#[derive(Clone)]
struct Pooled {
    quic: quinn::Connection,
    send: SendRequest,
    open: Arc<AtomicUsize>,
    /// The open count when an open last found no stream credit in time; `usize::MAX` once one
    /// found credit again (or never starved).
    starved_at: Arc<AtomicUsize>,
}

impl Pooled {
    fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn load(&self) -> ConnLoad {
        let at = self.starved_at.load(Ordering::Relaxed);
        ConnLoad {
            open: self.open_streams(),
            starved_at: (at != usize::MAX).then_some(at),
        }
    }

    fn starved(&self) {
        self.starved_at
            .store(self.open_streams(), Ordering::Relaxed);
    }

    fn credited(&self) {
        self.starved_at.store(usize::MAX, Ordering::Relaxed);
    }
}

/// Reconnect state of a peer, guarded by the async lock callers queue on while connecting.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last: String,
}

#[derive(Default)]
struct Peer {
    conns: Mutex<Vec<Pooled>>,
    connecting: tokio::sync::Mutex<Backoff>,
    /// The smoothed RTT of the last connection that left the pool, µs (0: none yet): where
    /// the next handshake to this peer starts (`MeshEndpoint::connect_after`).
    last_rtt_us: AtomicU64,
}

impl Peer {
    /// Notes the RTT of a connection leaving the pool.
    fn note_rtt(&self, quic: &quinn::Connection) {
        let us = u64::try_from(quic.rtt().as_micros()).unwrap_or(u64::MAX);
        self.last_rtt_us.store(us.max(1), Ordering::Relaxed);
    }

    /// The RTT to start a new connection from: a pooled connection's, else the last one's.
    fn previous_rtt(&self, conns: &[Pooled]) -> Option<Duration> {
        if let Some(live) = conns.first() {
            return Some(live.quic.rtt());
        }
        match self.last_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// Statistics of one pooled connection, from quinn.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Packets declared lost since the connection opened.
    pub lost_packets: u64,
    /// Packets sent since the connection opened.
    pub sent_packets: u64,
    /// Congestion events since the connection opened.
    pub congestion_events: u64,
    /// STREAM frames sent since the connection opened (RFC 9000 §19.8), retransmissions
    /// included: a request whose head and end leave together costs one.
    pub stream_frames_sent: u64,
    /// Largest UDP payload the connection sends now, bytes: `initial_mtu`, then what path MTU
    /// discovery confirmed (RFC 9000 §14.3).
    pub current_mtu: u16,
    /// Path MTU probes sent since the connection opened (padded PING packets, RFC 9000 §14.4).
    pub mtu_probes_sent: u64,
    /// Times the connection judged its packets too large for the path and fell back to 1,200
    /// bytes (quinn's black-hole detection).
    pub mtu_black_holes: u64,
    /// Tunnels and requests open on it now.
    pub open_streams: usize,
}

/// Statistics of one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// The peer.
    pub peer: PeerKey,
    /// Its open connections.
    pub connections: Vec<ConnectionStats>,
}

/// The congestion controllers of one peer's connections.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCongestion {
    /// The peer.
    pub peer: PeerKey,
    /// One entry per open connection, in the order of [`PeerStats::connections`].
    pub connections: Vec<CongestionStats>,
}

/// A pool of connections to peer sidecars. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    endpoint: MeshEndpoint,
    peers: Arc<Mutex<HashMap<PeerKey, Arc<Peer>>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A jittered exponential backoff: `initial × 2^(failures-1)` capped at `max`, then scaled
/// into `[½, 1]` by `jitter ∈ [0, 1)` so that peers do not retry in lockstep.
pub fn backoff_delay(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1 << exp).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// The most connections the pool keeps to one peer: `max_connections_per_peer`'s bound.
const MAX_POOLED: usize = crate::config::MAX_CONNECTIONS_PER_PEER as usize;

/// What the pool knows of one connection when it chooses where a new stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLoad {
    /// Streams open or opening on it, as the pool counts them.
    pub open: usize,
    /// `open` when a stream last found no credit on it in time, unless one found credit since.
    pub starved_at: Option<usize>,
}

impl ConnLoad {
    /// Whether a new stream may find credit here: below the stream limit by the pool's count,
    /// and, after starving, once enough of its streams have ended for the peer to grant more.
    /// quinn grants MAX_STREAMS credit in steps of an eighth of the limit (RFC 9000 §4.6 leaves
    /// the pace to the peer), so a starved connection is tried again after that many closed.
    fn may_have_credit(&self, limit: usize) -> bool {
        let step = (limit / 8).max(1);
        self.open < limit
            && self
                .starved_at
                .is_none_or(|at| self.open.saturating_add(step) <= at)
    }
}

/// The limits [`choose_connection`] works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Concurrent streams per connection (`max_concurrent_bidi_streams`).
    pub streams: usize,
    /// Connections to spread streams over while they are busy (`connections_per_peer`).
    pub spread: usize,
    /// Connections that may be opened when streams run out (`max_connections_per_peer`, at
    /// least `spread`).
    pub max: usize,
}

/// Where a new stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// This connection may have credit.
    Use(usize),
    /// Open another connection.
    Open,
    /// None may have credit and no more may be opened: try the least loaded one; without credit
    /// in time, the stream fails with [`TunnelError::StreamLimit`].
    Last(usize),
}

/// Drops the closed connections of one peer. When one was ended by a stateless reset (RFC 9000
/// §10.3), the peer holds no state for it. Usually its process restarted, and then that is true
/// of every connection to that address: all of them leave the pool, so that the next stream
/// opens a new connection rather than meeting the same reset on another dead one (with
/// several connections per peer). A live peer that forgot one connection costs the others a
/// new handshake; streams already open on them go on until they end.
fn prune(conns: &mut Vec<Pooled>, peer: &Peer) {
    if conns.iter().any(|c| stateless_reset(&c.quic)) {
        if let Some(c) = conns.first() {
            peer.note_rtt(&c.quic);
        }
        conns.clear();
    } else {
        conns.retain(|c| {
            let open = c.quic.close_reason().is_none();
            if !open {
                peer.note_rtt(&c.quic);
            }
            open
        });
    }
}

/// Whether `quic` was ended by the peer's stateless reset.
fn stateless_reset(quic: &quinn::Connection) -> bool {
    matches!(quic.close_reason(), Some(quinn::ConnectionError::Reset))
}

/// Chooses the connection for a new stream. Among the connections that may have stream credit,
/// the least loaded; while fewer than `spread` are open, a busy one is a reason to open another
/// (multi-core throughput); when none may have credit, another is opened up to `max`; at `max`,
/// the least loaded is the last resort.
pub fn choose_connection(conns: &[ConnLoad], limits: ConnLimits) -> Choice {
    let usable = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.may_have_credit(limits.streams))
        .min_by_key(|(_, c)| c.open);
    let room = conns.len() < limits.max;
    let spread = conns.len() < limits.spread && usable.is_none_or(|(_, c)| c.open > 0);
    match usable {
        Some((i, _)) if !(spread && room) => Choice::Use(i),
        _ if room => Choice::Open,
        _ => conns
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.open)
            .map_or(Choice::Open, |(i, _)| Choice::Last(i)),
    }
}

/// A pooled HTTP/3 request stream; derefs to the h3 stream. Keep it alive while the request
/// is in use: it counts toward the connection's load.
pub struct PooledRequest {
    stream: ClientRequestStream,
    _guard: StreamGuard,
}

impl std::ops::Deref for PooledRequest {
    type Target = ClientRequestStream;
    fn deref(&self) -> &ClientRequestStream {
        &self.stream
    }
}

impl std::ops::DerefMut for PooledRequest {
    fn deref_mut(&mut self) -> &mut ClientRequestStream {
        &mut self.stream
    }
}

impl PooledRequest {
    /// Splits the request into its send half (request body and trailers) and its receive half
    /// (response head, body and trailers), so the two directions can run at once: a streaming
    /// call (gRPC bidirectional streaming, an HTTP/1.1 chunked exchange) sends message *n+1*
    /// only after it has read reply *n*. Both halves keep the stream counted in the pool.
    pub fn split(self) -> (PooledSend, PooledRecv) {
        let (send, recv) = self.stream.split();
        let guard = Arc::new(self._guard);
        (
            PooledSend {
                stream: send,
                _guard: guard.clone(),
            },
            PooledRecv {
                stream: recv,
                _guard: guard,
            },
        )
    }
}

/// The send half of a [`PooledRequest`]: `send_data`, `send_trailers`, `finish`, and
/// `stop_stream` to abort (a dropped half is finished by QUIC, which would make a cut body look
/// complete).
pub struct PooledSend {
    stream: RequestSend,
    _guard: Arc<StreamGuard>,
}

/// The receive half of a [`PooledRequest`]: `recv_response` (repeatedly while it yields 1xx
/// heads, RFC 9114 §4.1), then `recv_data` and `recv_trailers`.
pub struct PooledRecv {
    stream: RequestRecv,
    _guard: Arc<StreamGuard>,
}

/// The send half of a client's HTTP/3 request stream.
pub type RequestSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// The receive half of a client's HTTP/3 request stream.
pub type RequestRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

macro_rules! deref_stream {
    ($outer:ty, $inner:ty) => {
        impl std::ops::Deref for $outer {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.stream
            }
        }
        impl std::ops::DerefMut for $outer {
            fn deref_mut(&mut self) -> &mut $inner {
                &mut self.stream
            }
        }
    };
}
deref_stream!(PooledSend, RequestSend);
deref_stream!(PooledRecv, RequestRecv);

/// Joins the halves of an upgraded request into a byte tunnel once the peer has answered the
/// upgrade with a 2xx head (read with `recv_response` on `recv`): from then on each side's
/// DATA frames carry the upgraded protocol's bytes, as on a CONNECT tunnel (RFC 9220 §3 does
/// the same for `:protocol websocket`).
pub fn upgraded_tunnel(send: PooledSend, recv: PooledRecv, status: http::StatusCode) -> Tunnel {
    // Both halves hold the same guard; one copy is enough to keep the stream counted.
    let PooledSend { stream, _guard } = send;
    drop(_guard);
    let guard = Arc::try_unwrap(recv._guard).ok();
    Tunnel::opened(stream, recv.stream, status, guard)
}

impl Pool {
    /// A pool opening its connections from `endpoint`.
    pub fn new(endpoint: MeshEndpoint) -> Self {
        Pool {
            endpoint,
            peers: Arc::default(),
        }
    }

    /// The endpoint connections are opened from.
    pub fn endpoint(&self) -> &MeshEndpoint {
        &self.endpoint
    }

    fn peer(&self, key: &PeerKey) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(key.clone()).or_default().clone()
    }

    /// Opens a tunnel to `target` through the peer at `addr`, which must prove `expected`.
    /// Returns once the CONNECT headers are handed to QUIC: write the first bytes at once;
    /// the response is awaited on the first read or by [`Tunnel::status`].
    pub async fn open_tcp(
        &self,
        addr: SocketAddr,
        expected: &SpiffeId,
        target: &Target,
        headers: HeaderMap,
    ) -> Result<Tunnel, TunnelError> {
        let uri = http::Uri::try_from(target.to_string())
            .map_err(|e| TunnelError::Protocol(format!("target {target}: {e}")))?;
        let mut request = http::Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let (stream, guard) = self.send(addr, expected, request).await?;
        let (send, recv) = stream.split();
        Ok(Tunnel::new(send, recv, Some(guard)))
    }

    /// Sends an HTTP/3 request's headers to the peer at `addr`, which must prove `expected`.
    /// Then send the body and trailers, `finish()`, and `recv_response()` before `recv_data()`.
    pub async fn send_request(
        &self,
        addr: SocketAddr,
        expected: &SpiffeId,
        request: http::Request<()>,
    ) -> Result<PooledRequest, TunnelError> {
        let (stream, guard) = self.send(addr, expected, request).await?;
        Ok(PooledRequest {
            stream,
            _guard: guard,
        })
    }

    async fn send(
        &self,
        addr: SocketAddr,
        expected: &SpiffeId,
        request: http::Request<()>,
    ) -> Result<(ClientRequestStream, StreamGuard), TunnelError> {
        check_section_size(&request, self.endpoint.config().max_field_section_size())?;
        let key = PeerKey {
            addr,
            id: expected.clone(),
        };
        let mut last = TunnelError::Closed;
        // Each connection the peer may get can run out of credit once; one more try covers a
        // connection that closed (idle timeout) between choosing and using it.
        for _ in 0..=self.endpoint.config().max_connections_per_peer() {
            let (conn, last_resort) = self.connection(&key).await?;
            let guard = StreamGuard::new(&conn.open, conn.send.clone());
            let sent = conn
                .send
                .clone()
                .send_request(clone_request(&request))
                .await;
            match sent {
                Ok(stream) => {
                    conn.credited();
                    return Ok((stream, guard));
                }
                Err(e) if NoCredit::in_h3(&e) => {
                    drop(guard);
                    conn.starved();
                    last = self.stream_limit(&key);
                    if last_resort {
                        return Err(last);
                    }
                }
                Err(e) => {
                    last = TunnelError::from_h3(&e, false);
                    if !last.connection_gone() && conn.quic.close_reason().is_none() {
                        return Err(last);
                    }
                    self.forget(&key, &conn.quic);
                }
            }
        }
        Err(last)
    }

    fn stream_limit(&self, key: &PeerKey) -> TunnelError {
        TunnelError::StreamLimit {
            peer: key.addr,
            connections: self.connections(key.addr, &key.id).len(),
            waited: self.endpoint.config().stream_credit_wait(),
        }
    }

    fn forget(&self, key: &PeerKey, quic: &quinn::Connection) {
        let peer = self.peer(key);
        let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
        let held = conns.len();
        conns.retain(|c| c.quic.stable_id() != quic.stable_id());
        if conns.len() < held {
            peer.note_rtt(quic);
        }
        // Only while the reset connection was still pooled: once it is gone, the others were
        // cleared with it and what is pooled now was opened since.
        if conns.len() < held && stateless_reset(quic) {
            conns.clear();
        }
    }

    /// A live connection to the peer, opened if needed, and whether it is the last resort
    /// (see [`Choice::Last`]).
    async fn connection(&self, key: &PeerKey) -> Result<(Pooled, bool), TunnelError> {
        let peer = self.peer(key);
        if let Some(picked) = self.pick(&peer) {
            return Ok(picked);
        }
        let mut backoff = peer.connecting.lock().await;
        // Another caller may have connected while this one queued: share its connection.
        if let Some(picked) = self.pick(&peer) {
            return Ok(picked);
        }
        let now = Instant::now();
        if let Some(at) = backoff.retry_at.filter(|at| *at > now) {
            return Err(TunnelError::Backoff {
                peer: key.addr,
                remaining: at - now,
                last: backoff.last.clone(),
            });
        }
        let previous_rtt = {
            let conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
            peer.previous_rtt(&conns)
        };
        match self.open(key, previous_rtt).await {
            Ok(conn) => {
                *backoff = Backoff::default();
                let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns.push(conn.clone());
                Ok((conn, false))
            }
            Err(e) => {
                backoff.failures = backoff.failures.saturating_add(1);
                let config = self.endpoint.config();
                let delay = backoff_delay(
                    backoff.failures,
                    config.backoff_initial(),
                    config.backoff_max(),
                    rand::random(),
                );
                backoff.retry_at = Some(Instant::now() + delay);
                backoff.last = e.to_string();
                Err(e)
            }
        }
    }

    /// Drops closed connections and chooses one for a new stream (`None`: open another), with
    /// whether it is the last resort.
    fn pick(&self, peer: &Peer) -> Option<(Pooled, bool)> {
        let config = self.endpoint.config();
        let limits = ConnLimits {
            streams: usize::try_from(config.max_concurrent_bidi_streams()).unwrap_or(usize::MAX),
            spread: config.connections_per_peer(),
            max: config.max_connections_per_peer(),
        };
        let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut conns, peer);
        // On the stack: this runs for every stream. The configuration allows at most
        // `MAX_POOLED` connections per peer.
        let mut loads = [ConnLoad {
            open: 0,
            starved_at: None,
        }; MAX_POOLED];
        for (slot, conn) in loads.iter_mut().zip(conns.iter()) {
            *slot = conn.load();
        }
        let loads = &loads[..conns.len().min(MAX_POOLED)];
        let (index, last) = match choose_connection(loads, limits) {
            Choice::Use(i) => (i, false),
            Choice::Last(i) => (i, true),
            Choice::Open => return None,
        };
        Some((conns.get(index)?.clone(), last))
    }

    /// Opens a QUIC connection (its handshake starting from `previous_rtt` when a connection to
    /// the peer measured one) and starts HTTP/3 on it.
    async fn open(
        &self,
        key: &PeerKey,
        previous_rtt: Option<Duration>,
    ) -> Result<Pooled, TunnelError> {
        let quic = self
            .endpoint
            .connect_after(key.addr, &key.id, previous_rtt)
            .await?;
        let config = self.endpoint.config();
        let conn = crate::credit::Connection::new(quic.clone(), config.stream_credit_wait());
        let built = h3::client::builder()
            .max_field_section_size(config.max_field_section_size())
            .send_grease(false)
            .build::<_, _, Bytes>(conn)
            .await;
        let (mut driver, send) = built.map_err(|e| TunnelError::Connect {
            peer: key.addr,
            reason: format!("http/3 setup: {e}"),
        })?;
        let peer = key.addr;
        // The driver serves the control and QPACK streams; it ends when the connection closes,
        // so the connection owns it.
        tokio::spawn(async move {
            let e = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            tracing::debug!(%peer, reason = %e, "connection closed");
        });
        Ok(Pooled {
            quic,
            send,
            open: Arc::default(),
            starved_at: Arc::new(AtomicUsize::new(usize::MAX)),
        })
    }

    /// The open QUIC connections to a peer (for metrics and tests).
    pub fn connections(&self, addr: SocketAddr, expected: &SpiffeId) -> Vec<quinn::Connection> {
        let peer = self.peer(&PeerKey {
            addr,
            id: expected.clone(),
        });
        let conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.iter().map(|c| c.quic.clone()).collect()
    }

    /// RTT, loss, congestion window and open streams of every pooled connection.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.per_connection(stats_of)
            .into_iter()
            .map(|(peer, connections)| PeerStats { peer, connections })
            .collect()
    }

    /// Window, pacing rate and delivery-rate estimate of every pooled connection's congestion
    /// controller, per peer (for `halyard_quic_cwnd_bytes`, `halyard_quic_pacing_rate_bytes`,
    /// `halyard_quic_delivery_rate_bytes`).
    pub fn congestion(&self) -> Vec<PeerCongestion> {
        self.per_connection(|c| CongestionStats::of(&c.quic))
            .into_iter()
            .map(|(peer, connections)| PeerCongestion { peer, connections })
            .collect()
    }

    /// `read` of every pooled connection, per peer. The peer map is locked only to copy it, so
    /// new connects do not wait on the walk.
    fn per_connection<T>(&self, read: impl Fn(&Pooled) -> T) -> Vec<(PeerKey, Vec<T>)> {
        let peers: Vec<(PeerKey, Arc<Peer>)> = {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.iter().map(|(k, p)| (k.clone(), p.clone())).collect()
        };
        peers
            .into_iter()
            .map(|(key, peer)| {
                let conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
                (key, conns.iter().map(&read).collect())
            })
            .collect()
    }

    /// Forgets the peers `keep` rejects (say, endpoints gone from the registry) and closes
    /// their connections; open tunnels on them end.
    pub fn retain_peers(&self, keep: impl Fn(&PeerKey) -> bool) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|key, peer| {
            let kept = keep(key);
            if !kept {
                close_all(peer);
            }
            kept
        });
    }

    /// Closes every pooled connection whose peer leaf `refuses` (id, serial bytes), with
    /// H3_NO_ERROR; the peers stay known, so the next request dials afresh (and meets the
    /// handshake's own deny-list check).
    pub fn close_refused(&self, refuses: impl Fn(&SpiffeId, &[u8]) -> bool) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for peer in peers.values() {
            let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|conn| {
                let refused = crate::endpoint::peer_leaf(&conn.quic)
                    .is_some_and(|(id, serial)| refuses(&id, &serial));
                if refused {
                    peer.note_rtt(&conn.quic);
                    // RFC 9114 §8.1: H3_NO_ERROR (0x100) for a deliberate close.
                    conn.quic
                        .close(quinn::VarInt::from_u32(0x100), b"peer certificate revoked");
                }
                !refused
            });
        }
    }

    /// Closes every pooled connection (H3_NO_ERROR) and forgets all peers.
    pub fn close(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for peer in peers.values() {
            let conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
            for conn in conns.iter() {
                conn.quic
                    .close(quinn::VarInt::from_u32(0x100), b"pool closed");
            }
        }
        peers.clear();
    }
}

fn close_all(peer: &Peer) {
    let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
    for conn in conns.drain(..) {
        // RFC 9114 §8.1: H3_NO_ERROR (0x100) for a deliberate close.
        conn.quic
            .close(quinn::VarInt::from_u32(0x100), b"pool closed");
    }
}

fn stats_of(conn: &Pooled) -> ConnectionStats {
    let s = conn.quic.stats();
    ConnectionStats {
        rtt: conn.quic.rtt(),
        cwnd: s.path.cwnd,
        lost_packets: s.path.lost_packets,
        sent_packets: s.path.sent_packets,
        congestion_events: s.path.congestion_events,
        stream_frames_sent: s.frame_tx.stream,
        current_mtu: s.path.current_mtu,
        mtu_probes_sent: s.path.sent_plpmtud_probes,
        mtu_black_holes: s.path.black_holes_detected,
        open_streams: conn.open_streams(),
    }
}

/// Refuses a request whose header section is over `max` before any stream is opened.
///
/// h3 checks the section against the peer's SETTINGS_MAX_FIELD_SECTION_SIZE only after it has
/// opened the stream (it then drops the stream, which the peer counts as an abandoned request),
/// and not at all before the peer's SETTINGS have arrived (the peer then answers 431). Checking
/// here against this side's own setting, which the sidecars of a mesh share, refuses the same
/// request the same way on a fresh connection and on a warm one, and spends nothing at the peer.
//= https://www.rfc-editor.org/rfc/rfc9114#section-4.2.2
//# An implementation that has received this parameter SHOULD NOT send an HTTP message
//# header that exceeds the indicated size, as the peer will likely refuse to process it.
fn check_section_size(request: &http::Request<()>, max: u64) -> Result<(), TunnelError> {
    let size = crate::fields::request_section_size(request);
    if size > max {
        return Err(TunnelError::HeaderTooBig { size, max });
    }
    Ok(())
}

fn clone_request(request: &http::Request<()>) -> http::Request<()> {
    let mut copy = http::Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    *copy.version_mut() = request.version();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: ConnLimits = ConnLimits {
        streams: 16,
        spread: 1,
        max: 3,
    };

    fn open(counts: &[usize]) -> Vec<ConnLoad> {
        counts
            .iter()
            .map(|&open| ConnLoad {
                open,
                starved_at: None,
            })
            .collect()
    }

    fn starved(open: usize, at: usize) -> ConnLoad {
        ConnLoad {
            open,
            starved_at: Some(at),
        }
    }

    #[test]
    fn the_first_stream_opens_a_connection() {
        assert_eq!(choose_connection(&[], ONE), Choice::Open);
    }

    #[test]
    fn one_connection_per_peer_is_shared_below_its_stream_limit() {
        assert_eq!(choose_connection(&open(&[15]), ONE), Choice::Use(0));
    }

    #[test]
    fn a_connection_at_its_stream_limit_makes_room_for_another() {
        assert_eq!(choose_connection(&open(&[16]), ONE), Choice::Open);
        assert_eq!(choose_connection(&open(&[16, 3]), ONE), Choice::Use(1));
    }

    #[test]
    fn a_connection_found_without_credit_is_passed_over() {
        // The pool counts 10 open, but the peer granted no credit for the 11th.
        let conns = [starved(10, 10)];
        assert_eq!(choose_connection(&conns, ONE), Choice::Open);
        let conns = [starved(10, 10), open(&[12])[0]];
        assert_eq!(choose_connection(&conns, ONE), Choice::Use(1));
    }

    #[test]
    fn a_starved_connection_is_tried_again_once_an_eighth_of_its_limit_closed() {
        // Limit 16: credit comes back in steps of 2.
        assert_eq!(choose_connection(&[starved(9, 10)], ONE), Choice::Open);
        assert_eq!(choose_connection(&[starved(8, 10)], ONE), Choice::Use(0));
    }

    #[test]
    fn at_the_cap_the_least_loaded_is_the_last_resort() {
        let full = open(&[16, 16, 16]);
        assert_eq!(choose_connection(&full, ONE), Choice::Last(0));
        let conns = [starved(16, 16), starved(9, 9), starved(12, 12)];
        assert_eq!(choose_connection(&conns, ONE), Choice::Last(1));
    }

    #[test]
    fn several_connections_per_peer_spread_streams_before_sharing() {
        let two = ConnLimits {
            streams: 4,
            spread: 2,
            max: 2,
        };
        assert_eq!(choose_connection(&open(&[0]), two), Choice::Use(0));
        assert_eq!(choose_connection(&open(&[1]), two), Choice::Open);
        assert_eq!(choose_connection(&open(&[3, 1]), two), Choice::Use(1));
        assert_eq!(choose_connection(&open(&[4, 4]), two), Choice::Last(0));
    }

    #[test]
    fn backoff_jitters_from_half_the_delay_up_to_all_of_it() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(1, i, m, 0.999_999).as_millis(), 99);
        assert_eq!(backoff_delay(1, i, m, 0.0), Duration::from_millis(50));
    }

    #[test]
    fn backoff_doubles_with_each_failure() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(3, i, m, 0.0), Duration::from_millis(200));
    }

    #[test]
    fn backoff_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(30, i, m, 0.0), Duration::from_millis(2500));
        assert!(backoff_delay(u32::MAX, i, m, 1.0) <= m);
    }
}
