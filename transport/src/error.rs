//! Errors of the transport: setting up an endpoint ([`EndpointError`]) and opening or using a
//! tunnel or request ([`TunnelError`]).

use std::time::Duration;

use http::StatusCode;

/// An endpoint could not be created or rebound.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The UDP socket could not be created, tuned or bound.
    #[error("udp socket {addr}: {source}")]
    Socket {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built from the identity and bundle.
    #[error("tls setup failed: {0}")]
    Tls(#[from] halyard_certs::CertError),
    /// quinn refused the TLS configuration (no TLS 1.3 suite usable for QUIC).
    #[error("quic crypto setup failed: {0}")]
    Crypto(String),
}

/// Whether h3's connection error is quinn's stateless reset (RFC 9000 §10.3), which h3-quinn
/// passes up as an `Undefined` remote error holding the `quinn::ConnectionError`.
fn stateless_reset(e: &h3::error::ConnectionError) -> bool {
    use h3::quic::ConnectionErrorIncoming as Incoming;
    match e {
        h3::error::ConnectionError::Remote {
            0: Incoming::Undefined(inner),
            ..
        } => matches!(
            inner.downcast_ref::<quinn::ConnectionError>(),
            Some(quinn::ConnectionError::Reset)
        ),
        _ => false,
    }
}

/// Why a tunnel or an HTTP/3 request failed. [`TunnelError::before_any_byte`] tells whether no
/// byte can have reached the target application, so that trying another endpoint is safe, and
/// [`TunnelError::status`] gives the peer's HTTP status when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// The QUIC handshake with the peer failed: unreachable, refused our certificate, or
    /// presented a certificate we refuse (wrong CA or wrong SPIFFE id).
    #[error("connect to {peer} failed: {reason}")]
    Connect {
        /// The peer address.
        peer: std::net::SocketAddr,
        /// What failed, from quinn or the verifier.
        reason: String,
    },
    /// The QUIC handshake did not finish in time; the peer may be down or UDP blocked.
    #[error("connect to {peer} timed out after {after:?}; is UDP to the peer blocked?")]
    ConnectTimeout {
        /// The peer address.
        peer: std::net::SocketAddr,
        /// The deadline that passed.
        after: Duration,
    },
    /// A recent connect to this peer failed and the pool is backing off; try another endpoint.
    #[error("peer {peer} is in reconnect backoff for {remaining:?} after: {last}")]
    Backoff {
        /// The peer address.
        peer: std::net::SocketAddr,
        /// Time left before the next attempt.
        remaining: Duration,
        /// The last connect error.
        last: String,
    },
    /// The peer answered with a non-2xx status (DESIGN §2: 403 denied, 404 unknown service,
    /// 502 app refused, 503 no endpoint, 504 timeout).
    #[error("peer answered {status}")]
    Status {
        /// The status.
        status: StatusCode,
    },
    /// The peer reset or stopped the stream; `established` says whether the tunnel had been
    /// accepted (2xx) first.
    #[error("stream reset by peer with code {code:#x}")]
    Reset {
        /// The HTTP/3 error code.
        code: u64,
        /// Whether a 2xx response had been received before.
        established: bool,
    },
    /// The QUIC connection closed under the stream.
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// Why, from quinn or h3.
        reason: String,
        /// Whether a 2xx response had been received before.
        established: bool,
        /// The peer's endpoint ended the connection with a stateless reset (RFC 9000 §10.3): it
        /// had no state for it, usually because it restarted at the same address. A new
        /// connection reaches the new process.
        peer_restarted: bool,
    },
    /// The request header section exceeds the peer's limit (RFC 9114 §4.2.2).
    #[error("header section of {size} bytes exceeds the limit of {max}")]
    HeaderTooBig {
        /// The encoded size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Every connection the pool may open to the peer (`max_connections_per_peer`) is out of
    /// stream credit (the peer's MAX_STREAMS, RFC 9000 §4.6) and none came within
    /// `stream_credit_wait_ms`. This side's limit: nothing was sent, and the peer is not at
    /// fault.
    #[error("no stream credit at {peer}: {connections} connections at the peer's stream limit for {waited:?}; raise transport.max_connections_per_peer or max_concurrent_bidi_streams")]
    StreamLimit {
        /// The peer address.
        peer: std::net::SocketAddr,
        /// Connections open to the peer.
        connections: usize,
        /// How long the last open waited for credit.
        waited: Duration,
    },
    /// The tunnel was already shut down or aborted locally.
    #[error("tunnel already closed")]
    Closed,
    /// The peer broke the HTTP/3 protocol, or h3 failed in a way not listed above.
    #[error("http/3 error: {0}")]
    Protocol(String),
}

impl TunnelError {
    /// True when no byte of this flow can have reached the target application, so the caller
    /// may retry on another endpoint.
    pub fn before_any_byte(&self) -> bool {
        match self {
            TunnelError::Connect { .. }
            | TunnelError::ConnectTimeout { .. }
            | TunnelError::Backoff { .. }
            | TunnelError::Status { .. }
            | TunnelError::HeaderTooBig { .. }
            | TunnelError::StreamLimit { .. } => true,
            TunnelError::Reset { established, .. }
            | TunnelError::ConnectionLost { established, .. } => !established,
            TunnelError::Closed | TunnelError::Protocol(_) => false,
        }
    }

    /// The peer's HTTP status, when it answered with one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            TunnelError::Status { status } => Some(*status),
            _ => None,
        }
    }

    /// Classifies an h3 stream error (RFC 9114 §8: a stream reset, a lost connection — with
    /// whether it ended in the peer's stateless reset, RFC 9000 §10.3 — a header section over
    /// the limit, else a protocol error); `established` tells whether a 2xx was seen.
    pub fn from_h3(e: &h3::error::StreamError, established: bool) -> TunnelError {
        use h3::error::StreamError as S;
        match e {
            S::RemoteTerminate { code, .. } => TunnelError::Reset {
                code: code.value(),
                established,
            },
            S::ConnectionError { 0: c, .. } => TunnelError::ConnectionLost {
                reason: format!("{c}"),
                established,
                peer_restarted: stateless_reset(c),
            },
            S::RemoteClosing { .. } => TunnelError::ConnectionLost {
                reason: "peer is going away".into(),
                established,
                peer_restarted: false,
            },
            S::HeaderTooBig {
                actual_size,
                max_size,
                ..
            } => TunnelError::HeaderTooBig {
                size: *actual_size,
                max: *max_size,
            },
            other => TunnelError::Protocol(format!("{other}")),
        }
    }

    /// True when the QUIC connection under the stream is gone (a fresh one may succeed).
    pub(crate) fn connection_gone(&self) -> bool {
        matches!(self, TunnelError::ConnectionLost { .. })
    }

    /// Wraps into an `io::Error` of a kind a TCP proxy understands; the `TunnelError` stays
    /// reachable through `io::Error::get_ref` and `downcast`.
    pub fn into_io(self) -> std::io::Error {
        use std::io::ErrorKind as K;
        let kind = match &self {
            TunnelError::Status { .. }
            | TunnelError::Connect { .. }
            | TunnelError::Backoff { .. } => K::ConnectionRefused,
            TunnelError::ConnectTimeout { .. } => K::TimedOut,
            TunnelError::Reset { .. } => K::ConnectionReset,
            TunnelError::ConnectionLost { .. } => K::ConnectionAborted,
            TunnelError::Closed => K::BrokenPipe,
            TunnelError::HeaderTooBig { .. } => K::InvalidInput,
            TunnelError::StreamLimit { .. } => K::ResourceBusy,
            TunnelError::Protocol(_) => K::InvalidData,
        };
        std::io::Error::new(kind, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_safety_follows_whether_the_tunnel_was_established() {
        let early = TunnelError::Reset {
            code: 0x10c,
            established: false,
        };
        let late = TunnelError::Reset {
            code: 0x10c,
            established: true,
        };
        assert!(early.before_any_byte());
        assert!(!late.before_any_byte());
        let denied = TunnelError::Status {
            status: StatusCode::FORBIDDEN,
        };
        assert!(denied.before_any_byte());
        assert_eq!(denied.status(), Some(StatusCode::FORBIDDEN));
        assert_eq!(late.status(), None);
    }

    #[test]
    fn io_errors_keep_the_tunnel_error() {
        let io = TunnelError::Status {
            status: StatusCode::BAD_GATEWAY,
        }
        .into_io();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        let inner = io.get_ref().unwrap().downcast_ref::<TunnelError>().unwrap();
        assert_eq!(inner.status(), Some(StatusCode::BAD_GATEWAY));
    }
}
