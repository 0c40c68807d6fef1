//! Outbound capture: app TCP connections become HTTP/3 CONNECT tunnels to a chosen endpoint.
//!
//! A flow may be retried on another endpoint while nothing has come back to the app yet: the
//! bytes the app sent first are kept and replayed. Once the peer answered 200, the flow is
//! committed to that endpoint.
//!
//! What the app sends while the tunnel opens goes out at once, behind the CONNECT, instead of
//! after the peer's 200 (up to [`FIRST_BYTES`], kept for a replay): a client-speaks-first
//! protocol's first request reaches the server one round trip earlier than in a tunnel that
//! waits for the answer (HBONE's CONNECT, RFC 9110 §9.3.6). The peer reads it only once its
//! app connection is up and policy allowed the flow.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use halyard_registry::model::RetryOn;
use halyard_transport::{Target, Tunnel, TunnelError};
use tokio::net::TcpStream;

use crate::decide::breaker::Threshold;
use crate::decide::retry::{self, AttemptError, Failed, Flag, RetryPolicy, Step};
use crate::state::{Picked, Shared};
use crate::telemetry::flow::End;
use crate::telemetry::metrics::Direction;

/// How many bytes the app may send before the tunnel is answered: they go out at once and are
/// kept for a replay on another endpoint; past them the app waits for the answer.
const FIRST_BYTES: usize = 16 * 1024;

pub(crate) use crate::decide::capture::Destination;

/// How a flow ended, as the `response_flags` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flags {
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
    /// Reset after the tunnel was up, or the app reset its connection before the peer
    /// answered.
    Reset,
    /// Refused by a rate limit at the destination.
    RateLimited,
    /// This sidecar's own limit was reached: its stream limit to the endpoint, or its circuit
    /// breaker for the destination (upstream overflow).
    Overflow,
}

impl Flags {
    /// Label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Flags::Ok => "-",
            Flags::UpstreamFailure => "UF",
            Flags::NoHealthy => "UH",
            Flags::Denied => "DENY",
            Flags::NoRoute => "NR",
            Flags::Reset => "RESET",
            Flags::RateLimited => "RL",
            Flags::Overflow => "UO",
        }
    }
}

/// Carries one app connection to `dest`.
pub(crate) async fn flow(shared: Arc<Shared>, mut app: TcpStream, dest: Destination) {
    let _ = app.set_nodelay(true);
    if is_http(&shared, &dest) {
        return crate::l7::outbound::serve(shared, app, dest).await;
    }
    let mut rec = shared.flow_record(Direction::Outbound, &shared.service, &dest.service);
    let Ok(_open) = shared.breaker(&dest.service, Threshold::Flows) else {
        rec.finish(End::Flow {
            flags: Flags::Overflow.as_str(),
            sent: 0,
            received: 0,
        });
        return reset(app);
    };
    let mut first = Early::default();
    first.read_ready(&app);
    let (flags, sent, received) = match connect(&shared, &dest, &app, &mut first).await {
        Ok((picked, mut tunnel)) => {
            // Only a retry needs the early bytes: an idle flow does not hold them.
            let early = first.len;
            drop(first);
            rec.picked(&picked.endpoint);
            rec.set_route(picked.route);
            let (flags, up, down) = pipe(&shared, &mut app, &mut tunnel).await;
            shared.outcome(&picked, None);
            (flags, up + early, down)
        }
        Err(flags) => {
            reset_on_close(&app);
            (flags, 0, 0)
        }
    };
    tracing::debug!(destination = %dest.service, flags = flags.as_str(), sent, received, "outbound flow ended");
    rec.finish(End::Flow {
        flags: flags.as_str(),
        sent,
        received,
    });
    // The app sees the end only now: whoever reads the metrics or the access log once their
    // connection closed finds this flow recorded.
    drop(app);
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

/// What the app sent before its tunnel was answered: sent on every attempt, in order.
#[derive(Debug, Default)]
struct Early {
    /// The chunks as read (each one `Bytes`, so a replay copies nothing), all views of `buf`'s
    /// one allocation.
    chunks: Vec<Bytes>,
    /// Where the next chunk is read: [`FIRST_BYTES`] allocated at the first read, split off
    /// as chunks are read, so the chunks together never hold more.
    buf: BytesMut,
    /// Their total length in bytes, at most [`FIRST_BYTES`].
    len: u64,
    /// How the app's read side ended, if it did before the answer.
    ended: Option<AppEnd>,
}

/// How an app's read side ended while its tunnel opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppEnd {
    /// EOF: the splice that follows reads it again and passes it on as a half-close.
    Eof,
    /// A reset or another error: a read reports it once, so it is kept here, and the flow ends
    /// as a reset (the peer must not see a truncated stream end cleanly).
    Reset,
}

impl Early {
    /// Whether more of the app's bytes may be read before the answer.
    fn open(&self) -> bool {
        self.ended.is_none() && (self.len as usize) < FIRST_BYTES
    }

    /// Whether the app reset its connection before the answer.
    fn app_reset(&self) -> bool {
        self.ended == Some(AppEnd::Reset)
    }

    /// Reads what the app has already sent, without waiting (a server-speaks-first app sends
    /// nothing); returns the new chunk, if any.
    fn read_ready(&mut self, app: &TcpStream) -> Option<Bytes> {
        if !self.open() {
            return None;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve(FIRST_BYTES - self.len as usize);
        }
        match app.try_read_buf(&mut self.buf) {
            Ok(0) => {
                self.ended = Some(AppEnd::Eof);
                None
            }
            Ok(n) => {
                let chunk = self.buf.split().freeze();
                self.chunks.push(chunk.clone());
                self.len += n as u64;
                Some(chunk)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(_) => {
                self.ended = Some(AppEnd::Reset);
                None
            }
        }
    }
}

/// How long a failed send of early bytes waits for the peer's answer, the better reason: a
/// refusal (403, 502) is an answer followed by STOP_SENDING, which can fail the send first.
const ANSWER_AFTER_SEND_FAILURE: std::time::Duration = std::time::Duration::from_millis(50);

/// Sends one chunk of early bytes; when that fails, the peer's answer if it comes within
/// [`ANSWER_AFTER_SEND_FAILURE`], else the send's error.
async fn send_early(tunnel: &mut Tunnel, chunk: Bytes) -> Result<(), TunnelError> {
    let Err(e) = tunnel.write_bytes(chunk).await else {
        return Ok(());
    };
    match tokio::time::timeout(ANSWER_AFTER_SEND_FAILURE, tunnel.status()).await {
        Ok(Err(answer)) => Err(answer),
        _ => Err(tunnel_error(e)),
    }
}

/// Opens a tunnel, trying further endpoints as the retry policy allows: every failure before
/// any byte came back, up to `failure.retries` more attempts, within the retry budget. The
/// route rule and its backend are chosen once: every attempt stays inside that scope.
async fn connect(
    shared: &Arc<Shared>,
    dest: &Destination,
    app: &TcpStream,
    first: &mut Early,
) -> Result<(Picked, Tunnel), Flags> {
    let policy = RetryPolicy {
        max_retries: shared.config.file.failure.retries,
        on: &L4_RETRY_ON,
        replayable: true,
        revisit: false,
    };
    shared.budget_request(&dest.service);
    let (route, scope) = shared.l4_route(&dest.service);
    let mut tried = Vec::new();
    let mut revisited = false;
    let mut last = Flags::NoHealthy;
    for retries_done in 0.. {
        // After a failure, no endpoint left to try ends the flow with that failure.
        let snap = shared.current();
        let mut picked = shared
            .pick_in(&snap, &dest.service, &scope, &tried, policy.revisit)
            .map_err(|_| last)?;
        picked.route = route;
        tried.push(picked.endpoint.id.clone());
        if first.app_reset() {
            // The app is gone: nothing to retry for, and no endpoint to blame.
            return Err(Flags::Reset);
        }
        let failed = match attempt_once(shared, &picked, dest, app, first).await {
            Ok(tunnel) => return Ok((picked, tunnel)),
            Err(_) if first.app_reset() => return Err(Flags::Reset),
            Err(failed) => failed,
        };
        let endpoint = &picked.endpoint.id;
        tracing::debug!(service = %dest.service, endpoint, error = ?failed.error, "tunnel attempt failed");
        if failed.error == AttemptError::PeerRestarted && !revisited {
            // The endpoint answered from a new process (its stateless reset ended the old
            // connection): a fresh connection reaches it, so it may be tried once more.
            revisited = true;
            tried.retain(|id| id != endpoint);
        }
        if failed.error.judges_endpoint() {
            shared.outcome(&picked, failed.error.charge());
        }
        last = failed.error.flag().into();
        let outcome = retry::Outcome::Failed(failed);
        let step = shared.next_step(
            &dest.service,
            &scope,
            &policy,
            (retries_done, &tried),
            outcome,
        );
        if step != Step::Retry {
            return Err(last);
        }
        shared.metrics.retry(&dest.service);
    }
    Err(Flags::UpstreamFailure)
}

/// What L4 flows are retried on: every failure before any byte came back but a refusal.
const L4_RETRY_ON: [RetryOn; 4] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Reset,
    RetryOn::GatewayError,
];

/// One tunnel to `picked`: the CONNECT, the app's early bytes replayed, then, until the peer
/// answers, whatever more the app sends (see the module notes).
async fn attempt_once(
    shared: &Shared,
    picked: &Picked,
    dest: &Destination,
    app: &TcpStream,
    first: &mut Early,
) -> Result<Tunnel, Failed> {
    let Ok(target) = Target::new(&dest.service, dest.port) else {
        return Err(Failed::local());
    };
    let ep = &picked.endpoint;
    let timeout = shared.config.file.failure.connect_timeout;
    let open = async {
        let mut tunnel = shared
            .pool
            .open_tcp(ep.address, &ep.identity, &target, http::HeaderMap::new())
            .await?;
        for chunk in &first.chunks {
            send_early(&mut tunnel, chunk.clone()).await?;
        }
        loop {
            tokio::select! {
                biased;
                status = tunnel.status() => {
                    status?;
                    break;
                }
                ready = app.readable(), if first.open() => {
                    if ready.is_err() {
                        first.ended = Some(AppEnd::Reset);
                    } else if let Some(chunk) = first.read_ready(app) {
                        send_early(&mut tunnel, chunk).await?;
                    }
                    if first.app_reset() {
                        tunnel.abort();
                        return Err(TunnelError::Closed);
                    }
                }
            }
        }
        Ok::<_, TunnelError>(tunnel)
    };
    match tokio::time::timeout(timeout, open).await {
        Ok(result) => result.map_err(|e| Failed::of(&e)),
        Err(_) => Err(Failed::of(&TunnelError::ConnectTimeout {
            peer: ep.address,
            after: timeout,
        })),
    }
}

/// The transport error inside an I/O error from a tunnel (see `TunnelError::into_io`).
fn tunnel_error(e: std::io::Error) -> TunnelError {
    let why = e.to_string();
    e.into_inner()
        .and_then(|inner| inner.downcast::<TunnelError>().ok())
        .map_or(TunnelError::Protocol(why), |t| *t)
}

impl From<Flag> for Flags {
    fn from(f: Flag) -> Flags {
        match f {
            Flag::UpstreamFailure => Flags::UpstreamFailure,
            Flag::NoHealthy => Flags::NoHealthy,
            Flag::Denied => Flags::Denied,
            Flag::NoRoute => Flags::NoRoute,
            Flag::RateLimited => Flags::RateLimited,
            Flag::Overflow => Flags::Overflow,
        }
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
pub(crate) fn reset(app: TcpStream) {
    reset_on_close(&app);
    drop(app);
}

/// Makes the coming close of `tcp` a reset (SO_LINGER 0; on a non-blocking socket this never
/// blocks).
pub(crate) fn reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}
