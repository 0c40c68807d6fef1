//! Admission of inbound QUIC connections. A handshake is work done for a peer not yet
//! authenticated (key exchange, a signature, a chain verification), so a source without a
//! valid certificate can make the server spend CPU just by opening handshakes. Bounds:
//!
//! - at most [`MAX_HANDSHAKES`] handshakes at once; past it new ones are refused at once
//!   (CONNECTION_REFUSED, so a real peer tries another endpoint);
//! - past [`RETRY_ABOVE`] handshakes at once, a source that has not proved its address gets a
//!   stateless Retry first (RFC 9000 §8.1.2): spoofed sources never come back, and the server
//!   keeps no state for them;
//! - at most [`MAX_PER_SOURCE`] handshakes at once from one IP address; more are dropped
//!   without an answer;
//! - at most [`MAX_CONNECTIONS_PER_PEER`] established connections per verified peer identity;
//!   past it the new connection is closed with H3_EXCESSIVE_LOAD. The pool opens at most
//!   `max_connections_per_peer` (≤ 64) per peer, so a well-behaved peer never meets it.
//!
//! The decision is pure ([`admit`]); [`Gate`] holds the counts and its passes release them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halyard_certs::SpiffeId;

/// Handshakes in progress at once, all sources.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress past which unvalidated sources must answer a Retry first.
pub const RETRY_ABOVE: usize = 32;
/// Handshakes in progress at once from one IP address.
pub const MAX_PER_SOURCE: usize = 16;
/// Established connections per verified peer identity.
pub const MAX_CONNECTIONS_PER_PEER: usize = 128;
/// Least time between two flood warnings.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Run the handshake.
    Accept,
    /// Send a stateless Retry (address validation).
    Retry,
    /// Refuse at once with CONNECTION_REFUSED.
    Refuse,
    /// Drop without an answer.
    Ignore,
}

/// The decision for an attempt, given the handshakes in progress in all and from its source,
/// and whether its source address is validated (it answered a Retry).
pub(crate) fn admit(in_flight: usize, from_source: usize, validated: bool) -> Admit {
    if from_source >= MAX_PER_SOURCE {
        Admit::Ignore
    } else if in_flight >= MAX_HANDSHAKES {
        Admit::Refuse
    } else if in_flight >= RETRY_ABOVE && !validated {
        Admit::Retry
    } else {
        Admit::Accept
    }
}

#[derive(Debug, Default)]
struct Counts {
    in_flight: usize,
    by_source: HashMap<IpAddr, usize>,
    by_peer: HashMap<SpiffeId, usize>,
    last_warning: Option<Instant>,
}

/// Refusals so far, by kind.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Stateless Retries sent.
    pub retried: AtomicU64,
    /// Attempts refused at the handshake cap.
    pub refused: AtomicU64,
    /// Attempts dropped at the per-source cap.
    pub ignored: AtomicU64,
    /// Connections closed at the per-peer cap.
    pub peer_capped: AtomicU64,
}

/// The counts behind [`admit`], shared by the accept loop and the connection tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gate {
    counts: Arc<Mutex<Counts>>,
    pub(crate) stats: Arc<AdmissionStats>,
}

/// A handshake in progress; dropping it frees its place.
pub(crate) struct HandshakePass {
    gate: Gate,
    source: IpAddr,
}

/// An established connection of a verified peer; dropping it frees its place.
pub(crate) struct PeerPass {
    gate: Gate,
    peer: SpiffeId,
}

impl Gate {
    /// Decides on an attempt from `source`; on `Accept` the pass holds its place.
    pub(crate) fn attempt(
        &self,
        source: IpAddr,
        validated: bool,
    ) -> (Admit, Option<HandshakePass>) {
        let Ok(mut c) = self.counts.lock() else {
            return (Admit::Refuse, None);
        };
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        let decision = admit(c.in_flight, from_source, validated);
        let counter = match decision {
            Admit::Accept => {
                c.in_flight += 1;
                *c.by_source.entry(source).or_default() += 1;
                let pass = HandshakePass {
                    gate: self.clone(),
                    source,
                };
                return (decision, Some(pass));
            }
            Admit::Retry => &self.stats.retried,
            Admit::Refuse => &self.stats.refused,
            Admit::Ignore => &self.stats.ignored,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if c.last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            c.last_warning = Some(now);
            tracing::warn!(
                %source, decision = ?decision, in_flight = c.in_flight,
                retried = self.stats.retried.load(Ordering::Relaxed),
                refused = self.stats.refused.load(Ordering::Relaxed),
                dropped = self.stats.ignored.load(Ordering::Relaxed),
                "QUIC handshake flood: new handshakes are retried, refused or dropped"
            );
        }
        (decision, None)
    }

    /// A place for one more connection of `peer`, or `None` at [`MAX_CONNECTIONS_PER_PEER`].
    pub(crate) fn peer(&self, peer: &SpiffeId) -> Option<PeerPass> {
        let mut c = self.counts.lock().ok()?;
        let n = c.by_peer.entry(peer.clone()).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            self.stats.peer_capped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = MAX_CONNECTIONS_PER_PEER, "peer at its connection cap; closing its new connection");
            return None;
        }
        *n += 1;
        Some(PeerPass {
            gate: self.clone(),
            peer: peer.clone(),
        })
    }
}

impl Drop for HandshakePass {
    fn drop(&mut self) {
        if let Ok(mut c) = self.gate.counts.lock() {
            c.in_flight = c.in_flight.saturating_sub(1);
            if let Some(n) = c.by_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    c.by_source.remove(&self.source);
                }
            }
        }
    }
}

impl Drop for PeerPass {
    fn drop(&mut self) {
        if let Ok(mut c) = self.gate.counts.lock() {
            if let Some(n) = c.by_peer.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    c.by_peer.remove(&self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quiet_server_accepts_unvalidated_sources() {
        assert_eq!(admit(0, 0, false), Admit::Accept);
        assert_eq!(admit(RETRY_ABOVE - 1, 3, false), Admit::Accept);
    }

    #[test]
    fn busy_server_retries_unvalidated_sources() {
        assert_eq!(admit(RETRY_ABOVE, 0, false), Admit::Retry);
        assert_eq!(admit(RETRY_ABOVE, 0, true), Admit::Accept);
    }

    #[test]
    fn full_server_refuses() {
        assert_eq!(admit(MAX_HANDSHAKES, 0, true), Admit::Refuse);
        assert_eq!(admit(MAX_HANDSHAKES, 0, false), Admit::Refuse);
    }

    #[test]
    fn one_source_is_capped_before_the_server_is() {
        assert_eq!(admit(0, MAX_PER_SOURCE, true), Admit::Ignore);
    }

    #[test]
    fn passes_release_their_places() {
        let gate = Gate::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let passes: Vec<_> = (0..MAX_PER_SOURCE)
            .map(|_| gate.attempt(ip, true).1.unwrap())
            .collect();
        assert_eq!(gate.attempt(ip, true).0, Admit::Ignore);
        drop(passes);
        assert_eq!(gate.attempt(ip, true).0, Admit::Accept);
        assert_eq!(gate.stats.ignored.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn peer_connections_are_capped() {
        let gate = Gate::default();
        let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/a").unwrap();
        let held: Vec<_> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| gate.peer(&id).unwrap())
            .collect();
        assert!(gate.peer(&id).is_none());
        drop(held);
        assert!(gate.peer(&id).is_some());
    }
}
