//! Admission of inbound QUIC connections. A handshake is work done for a peer not yet
//! authenticated (key exchange, a signature, a chain verification), so a source without a
//! valid certificate can make the server spend CPU just by opening handshakes. Bounds:
//!
//! - at most [`MAX_HANDSHAKES`] handshakes at once; past it new ones are refused at once
//!   (CONNECTION_REFUSED, so a real peer tries another endpoint);
//! - past [`RETRY_ABOVE`] handshakes at once, a source that has not proved its address gets a
//!   stateless Retry first (RFC 9000 §8.1.2): spoofed sources never come back, and the server
//!   keeps no state for them;
//! - at most [`MAX_PER_SOURCE`] handshakes at once from one source; more are dropped
//!   without an answer;
//! - at most [`SOURCE_HANDSHAKE_BURST`] handshakes started at once and [`SOURCE_HANDSHAKE_RATE`]
//!   per second after that from one source (a token bucket): a handshake that ends with a
//!   verified peer gives its token back, so a real peer is never slowed down, while a source
//!   whose handshakes fail spends its tokens. Past the rate an unvalidated source gets a Retry,
//!   a validated one is dropped, and so is an unvalidated one once the validated bucket of its
//!   source is empty too (it answered Retries and kept flooding). Attempts with and without a validated address have separate
//!   buckets, so a spoofer sending Initials in a victim's name spends only the unvalidated one
//!   and the victim, once it answers the Retry, still gets its handshakes. The caps on handshakes *at once* do not bound the CPU a single
//!   fast source costs (each failed handshake is a key exchange and a signature); this does.
//! - at most [`SOURCE_RETRY_BURST`] stateless Retries at once and [`SOURCE_RETRY_RATE`] per
//!   second after that to one source: a flooder replaying Initials never answers them, and each
//!   costs the server a decryption and a sealed token; past it the source is dropped, and while
//!   its Retry bucket (or both handshake buckets) is empty the endpoint's socket drops its
//!   Initial packets as they are read, before quinn decrypts them (`initial_filter`). The price:
//!   a spoofer sending Initials in a victim's name at that rate shuts the victim's new
//!   handshakes out while it lasts (not its established connections); an address-spoofing
//!   flooder is for the network's ingress filtering (BCP 38) to stop.
//!
//!   At most [`MAX_TRACKED_SOURCES`] buckets are kept: a source without a bucket has a full one,
//!   buckets refilled to full are swept when the table is full, and while it stays full a new
//!   source is treated as over its rate;
//! - at most [`MAX_CONNECTIONS_PER_PEER`] established connections per verified peer identity;
//!   past it the new connection is closed with H3_EXCESSIVE_LOAD. The pool opens at most
//!   `max_connections_per_peer` (≤ 64) per peer, so a well-behaved peer never meets it.
//!
//! A source is an IPv4 address or an IPv6 /64 (the prefix one host or one subscriber gets, RFC
//! 6177), IPv4-mapped IPv6 addresses counting as IPv4.
//!
//! The decision is pure ([`admit`]); [`Gate`] holds the counts and its passes release them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halyard_certs::SpiffeId;

/// Handshakes in progress at once, all sources.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress past which unvalidated sources must answer a Retry first.
pub const RETRY_ABOVE: usize = 32;
/// Handshakes in progress at once from one source (IPv4 address or IPv6 /64).
pub const MAX_PER_SOURCE: usize = 16;
/// Handshakes one source may start back to back (the token bucket's depth).
pub const SOURCE_HANDSHAKE_BURST: f64 = 32.0;
/// Handshakes per second one source may start once its burst is spent; a handshake that ends
/// with a verified peer does not count.
pub const SOURCE_HANDSHAKE_RATE: f64 = 10.0;
/// Stateless Retries one source may be sent back to back once its unvalidated handshakes are
/// past their rate (a Retry costs the server the Initial's decryption and a sealed token).
pub const SOURCE_RETRY_BURST: f64 = 64.0;
/// Stateless Retries per second one source may be sent after its burst; past it the source's
/// Initials are dropped as they are read, before decryption.
pub const SOURCE_RETRY_RATE: f64 = 64.0;
/// Sources whose token bucket is kept at most.
pub const MAX_TRACKED_SOURCES: usize = 4096;
/// Least time between two sweeps of the bucket table when it is full.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Established connections per verified peer identity.
pub const MAX_CONNECTIONS_PER_PEER: usize = 128;
/// Default of `[transport] max_streams_per_peer`: requests and tunnels in progress at once per
/// verified peer identity, over all its connections; twice what the pool opens at most with
/// its default settings (8 connections × 1,024 streams), far below what the per-connection
/// stream limit alone allows (128 × 1,024). Past it a new request is reset with
/// H3_REQUEST_REJECTED (RFC 9114 §8.1: not processed, safe to retry elsewhere).
pub const MAX_STREAMS_PER_PEER: usize = 16_384;
/// Least time between two flood warnings.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Admit {
    /// Run the handshake.
    Accept,
    /// Send a stateless Retry (address validation).
    Retry,
    /// Refuse at once with CONNECTION_REFUSED.
    Refuse,
    /// Drop without an answer.
    Ignore,
    /// Drop without an answer: the source has spent its handshake rate.
    Throttle,
}

/// Where a source stands against its handshake rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rate {
    /// A token is left in the attempt's bucket.
    Within,
    /// The attempt's bucket is empty.
    Spent,
    /// An unvalidated attempt whose source has also spent its validated bucket: the address
    /// has answered Retries and flooded anyway, so a Retry would only cost the server more.
    SpentValidated,
}

/// The decision for an attempt, given the handshakes in progress in all and from its source,
/// whether its source address is validated (it answered a Retry) and where the source stands
/// against its handshake rate.
pub(crate) fn admit(in_flight: usize, from_source: usize, validated: bool, rate: Rate) -> Admit {
    if from_source >= MAX_PER_SOURCE {
        Admit::Ignore
    } else if in_flight >= MAX_HANDSHAKES {
        Admit::Refuse
    } else if rate == Rate::SpentValidated || (validated && rate == Rate::Spent) {
        Admit::Throttle
    } else if !validated && (in_flight >= RETRY_ABOVE || rate == Rate::Spent) {
        Admit::Retry
    } else {
        Admit::Accept
    }
}

/// Where an attempt comes from, for the per-source bounds: an IPv4 address, or an IPv6 address
/// cut to its /64 (one subscriber's allocation, RFC 6177), IPv4-mapped addresses as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` counts as.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => Self(v4),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// What a bucket of a source counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Handshakes started for attempts without a validated address.
    Unvalidated,
    /// Handshakes started for attempts with a validated address (they answered a Retry).
    Validated,
    /// Stateless Retries sent.
    Retry,
}

impl Kind {
    fn handshakes(validated: bool) -> Self {
        if validated {
            Kind::Validated
        } else {
            Kind::Unvalidated
        }
    }

    /// Depth and refill per second.
    fn limits(self) -> (f64, f64) {
        match self {
            Kind::Unvalidated | Kind::Validated => (SOURCE_HANDSHAKE_BURST, SOURCE_HANDSHAKE_RATE),
            Kind::Retry => (SOURCE_RETRY_BURST, SOURCE_RETRY_RATE),
        }
    }
}

/// A token bucket of one source and [`Kind`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    kind: Kind,
}

impl Bucket {
    fn full(kind: Kind, now: Instant) -> Self {
        Self {
            tokens: kind.limits().0,
            at: now,
            kind,
        }
    }

    /// The tokens at `now` (a clock that went back adds nothing).
    fn refill(&mut self, now: Instant) -> f64 {
        let (burst, rate) = self.kind.limits();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        self.tokens
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now) >= self.kind.limits().0
    }
}

#[derive(Debug, Default)]
struct Counts {
    in_flight: usize,
    by_source: HashMap<Source, usize>,
    buckets: HashMap<(Source, Kind), Bucket>,
    last_sweep: Option<Instant>,
    by_peer: HashMap<SpiffeId, (usize, Arc<AtomicUsize>)>,
    last_warning: Option<Instant>,
    last_stream_warning: Option<Instant>,
}

impl Counts {
    /// Whether `source` (with a validated address or not) has a token at `now`, making room for
    /// its bucket if it has none (a source without a bucket has a full one).
    fn within_rate(&mut self, source: (Source, Kind), now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.refill(now) >= 1.0;
        }
        if self.buckets.len() < MAX_TRACKED_SOURCES {
            return true;
        }
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return false;
        }
        self.last_sweep = Some(now);
        self.buckets.retain(|_, b| !b.is_full(now));
        self.buckets.len() < MAX_TRACKED_SOURCES
    }

    /// Whether `source` has a token at `now`, without making a bucket (none: a full one).
    fn has_token(&mut self, source: (Source, Kind), now: Instant) -> bool {
        self.buckets
            .get_mut(&source)
            .is_none_or(|b| b.refill(now) >= 1.0)
    }

    /// Takes one token of `source` (its bucket made if it had none).
    fn spend(&mut self, source: (Source, Kind), now: Instant) {
        let b = self
            .buckets
            .entry(source)
            .or_insert_with(|| Bucket::full(source.1, now));
        b.refill(now);
        b.tokens -= 1.0;
    }
}

/// Decisions so far, by kind.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Handshakes started (each a key exchange and a signature for the server).
    pub accepted: AtomicU64,
    /// Stateless Retries sent.
    pub retried: AtomicU64,
    /// Attempts refused at the handshake cap.
    pub refused: AtomicU64,
    /// Attempts dropped at the per-source cap.
    pub ignored: AtomicU64,
    /// Attempts dropped at the per-source handshake rate.
    pub rate_limited: AtomicU64,
    /// Connections closed at the per-peer cap.
    pub peer_capped: AtomicU64,
    /// Requests reset at the per-peer cap of requests in progress.
    pub streams_rejected: AtomicU64,
    /// Datagrams received from a trusted east-west gateway (PROXY protocol v2 header removed).
    pub proxied: AtomicU64,
    /// PROXY-wrapped datagrams dropped: from a source not in `proxy_protocol_from`, or with a
    /// header that does not parse.
    pub proxy_refused: AtomicU64,
}

/// The counts behind [`admit`], shared by the accept loop and the connection tasks.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    counts: Arc<Mutex<Counts>>,
    pub(crate) stats: Arc<AdmissionStats>,
    /// Requests in progress at once per peer.
    max_streams: usize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(MAX_STREAMS_PER_PEER)
    }
}

/// A handshake in progress; dropping it frees its place.
pub(crate) struct HandshakePass {
    gate: Gate,
    source: Source,
    validated: bool,
}

/// An established connection of a verified peer; dropping it frees its place.
pub(crate) struct PeerPass {
    gate: Gate,
    peer: SpiffeId,
    /// Requests in progress of this peer, all its connections.
    streams: Arc<AtomicUsize>,
}

/// A request of a verified peer in progress; dropping it frees its place.
pub(crate) struct StreamPass(Arc<AtomicUsize>);

impl Drop for StreamPass {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PeerPass {
    /// A place for one more request of this peer, or `None` at its cap (`max_streams_per_peer`;
    /// counted, and warned once per 10 s).
    pub(crate) fn stream(&self) -> Option<StreamPass> {
        let max = self.gate.max_streams;
        if self.streams.fetch_add(1, Ordering::Relaxed) >= max {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            let rejected = self
                .gate
                .stats
                .streams_rejected
                .fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if let Ok(mut c) = self.gate.counts.lock() {
                if c.last_stream_warning
                    .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
                {
                    c.last_stream_warning = Some(now);
                    tracing::warn!(peer = %self.peer, max, rejected = rejected + 1,
                        "peer at its cap of requests in progress; rejecting new ones (H3_REQUEST_REJECTED)");
                }
            }
            return None;
        }
        Some(StreamPass(self.streams.clone()))
    }
}

impl Gate {
    /// A gate allowing `max_streams` requests in progress per peer.
    pub(crate) fn new(max_streams: usize) -> Self {
        Gate {
            counts: Default::default(),
            stats: Default::default(),
            max_streams,
        }
    }

    /// Decides on an attempt from `ip`; on `Accept` the pass holds its place and has spent one
    /// of the source's handshake tokens.
    pub(crate) fn attempt(&self, ip: IpAddr, validated: bool) -> (Admit, Option<HandshakePass>) {
        self.attempt_at(ip, validated, Instant::now())
    }

    fn attempt_at(
        &self,
        ip: IpAddr,
        validated: bool,
        now: Instant,
    ) -> (Admit, Option<HandshakePass>) {
        let Ok(mut c) = self.counts.lock() else {
            return (Admit::Refuse, None);
        };
        let source = Source::of(ip);
        let from_source = c.by_source.get(&source).copied().unwrap_or(0);
        let kind = Kind::handshakes(validated);
        let rate = if c.within_rate((source, kind), now) {
            Rate::Within
        } else if !validated && !c.has_token((source, Kind::Validated), now) {
            Rate::SpentValidated
        } else {
            Rate::Spent
        };
        let mut decision = admit(c.in_flight, from_source, validated, rate);
        // Retries are stateless but not free: past its Retry rate a source is dropped (and the
        // socket drops its Initials before decrypting them, `throttles`).
        if decision == Admit::Retry {
            if c.within_rate((source, Kind::Retry), now) {
                c.spend((source, Kind::Retry), now);
            } else {
                decision = Admit::Throttle;
            }
        }
        let counter = match decision {
            Admit::Accept => {
                c.in_flight += 1;
                *c.by_source.entry(source).or_default() += 1;
                c.spend((source, kind), now);
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let pass = HandshakePass {
                    gate: self.clone(),
                    source,
                    validated,
                };
                return (decision, Some(pass));
            }
            Admit::Retry => &self.stats.retried,
            Admit::Refuse => &self.stats.refused,
            Admit::Ignore => &self.stats.ignored,
            Admit::Throttle => &self.stats.rate_limited,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if c.last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            c.last_warning = Some(now);
            tracing::warn!(
                %source, decision = ?decision, in_flight = c.in_flight,
                retried = self.stats.retried.load(Ordering::Relaxed),
                refused = self.stats.refused.load(Ordering::Relaxed),
                dropped = self.stats.ignored.load(Ordering::Relaxed),
                rate_limited = self.stats.rate_limited.load(Ordering::Relaxed),
                "QUIC handshake flood: new handshakes are retried, refused or dropped"
            );
        }
        (decision, None)
    }

    /// Whether every Initial from `ip` would be dropped at the rate: both its buckets are
    /// spent. Counted as `rate_limited` when it is. The endpoint's socket asks this for each
    /// Initial it reads, before quinn decrypts it (`initial_filter`).
    pub(crate) fn throttles(&self, ip: IpAddr) -> bool {
        self.throttles_at(ip, Instant::now())
    }

    fn throttles_at(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(mut c) = self.counts.lock() else {
            return false;
        };
        let source = Source::of(ip);
        let spent = !c.has_token((source, Kind::Retry), now)
            || (!c.has_token((source, Kind::Validated), now)
                && !c.has_token((source, Kind::Unvalidated), now));
        if spent {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        spent
    }

    /// A place for one more connection of `peer`, or `None` at [`MAX_CONNECTIONS_PER_PEER`].
    pub(crate) fn peer(&self, peer: &SpiffeId) -> Option<PeerPass> {
        let mut c = self.counts.lock().ok()?;
        let (n, streams) = c.by_peer.entry(peer.clone()).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            self.stats.peer_capped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = MAX_CONNECTIONS_PER_PEER, "peer at its connection cap; closing its new connection");
            return None;
        }
        *n += 1;
        Some(PeerPass {
            gate: self.clone(),
            peer: peer.clone(),
            streams: streams.clone(),
        })
    }
}

impl HandshakePass {
    /// The handshake ended with a verified peer: its token goes back to the source, so real
    /// peers are bounded only by the caps on handshakes at once.
    pub(crate) fn authenticated(self) {
        if let Ok(mut c) = self.gate.counts.lock() {
            let kind = Kind::handshakes(self.validated);
            if let Some(b) = c.buckets.get_mut(&(self.source, kind)) {
                b.tokens = (b.tokens + 1.0).min(SOURCE_HANDSHAKE_BURST);
            }
        }
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
            if let Some((n, _)) = c.by_peer.get_mut(&self.peer) {
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
        assert_eq!(admit(0, 0, false, Rate::Within), Admit::Accept);
        assert_eq!(
            admit(RETRY_ABOVE - 1, 3, false, Rate::Within),
            Admit::Accept
        );
    }

    #[test]
    fn busy_server_retries_unvalidated_sources() {
        assert_eq!(admit(RETRY_ABOVE, 0, false, Rate::Within), Admit::Retry);
        assert_eq!(admit(RETRY_ABOVE, 0, true, Rate::Within), Admit::Accept);
    }

    #[test]
    fn full_server_refuses() {
        assert_eq!(admit(MAX_HANDSHAKES, 0, true, Rate::Within), Admit::Refuse);
        assert_eq!(admit(MAX_HANDSHAKES, 0, false, Rate::Within), Admit::Refuse);
    }

    #[test]
    fn one_source_is_capped_before_the_server_is() {
        assert_eq!(admit(0, MAX_PER_SOURCE, true, Rate::Within), Admit::Ignore);
    }

    #[test]
    fn a_source_past_its_rate_proves_its_address_then_is_dropped() {
        assert_eq!(admit(0, 0, false, Rate::Spent), Admit::Retry);
        assert_eq!(admit(0, 0, true, Rate::Spent), Admit::Throttle);
        // An address that answered Retries and spent that rate too gets no more Retries.
        assert_eq!(admit(0, 0, false, Rate::SpentValidated), Admit::Throttle);
    }

    /// Starts and fails (drops without `authenticated`) one handshake from `ip` at `now`.
    fn fail_one(gate: &Gate, ip: IpAddr, now: Instant) -> Admit {
        let (decision, pass) = gate.attempt_at(ip, true, now);
        drop(pass);
        decision
    }

    #[test]
    fn failing_handshakes_spend_the_burst_then_the_rate() {
        let gate = Gate::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let burst = SOURCE_HANDSHAKE_BURST as usize;
        for i in 0..burst {
            assert_eq!(fail_one(&gate, ip, t0), Admit::Accept, "attempt {i}");
        }
        assert_eq!(fail_one(&gate, ip, t0), Admit::Throttle);
        // Two seconds later: two seconds' worth of tokens (the rate), not the whole burst again.
        let t2 = t0 + Duration::from_secs(2);
        let mut accepted = 0;
        while fail_one(&gate, ip, t2) == Admit::Accept {
            accepted += 1;
        }
        assert_eq!(accepted, (SOURCE_HANDSHAKE_RATE * 2.0) as usize);
        assert_eq!(gate.stats.rate_limited.load(Ordering::Relaxed), 2);
        // Another source is not charged.
        assert_eq!(
            fail_one(&gate, "10.0.0.2".parse().unwrap(), t0),
            Admit::Accept
        );
    }

    /// Starts and fails a burst of handshakes from `ip` at `now`, each of them accepted.
    fn spend_burst(gate: &Gate, ip: IpAddr, validated: bool, now: Instant) {
        for i in 0..SOURCE_HANDSHAKE_BURST as usize {
            let (decision, pass) = gate.attempt_at(ip, validated, now);
            assert_eq!(decision, Admit::Accept, "attempt {i}");
            drop(pass);
        }
    }

    #[test]
    fn a_spoofer_spends_only_the_unvalidated_bucket_of_its_victim() {
        let gate = Gate::default();
        let victim: IpAddr = "10.0.0.9".parse().unwrap();
        let now = Instant::now();
        // Initials in the victim's name that never complete.
        spend_burst(&gate, victim, false, now);
        assert_eq!(gate.attempt_at(victim, false, now).0, Admit::Retry);
        // The victim answers the Retry: its validated attempts are served.
        assert_eq!(fail_one(&gate, victim, now), Admit::Accept);
    }

    #[test]
    fn a_source_that_spent_both_rates_gets_no_more_retries() {
        let gate = Gate::default();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let now = Instant::now();
        spend_burst(&gate, ip, false, now);
        spend_burst(&gate, ip, true, now);
        assert_eq!(gate.attempt_at(ip, false, now).0, Admit::Throttle);
        assert_eq!(gate.stats.retried.load(Ordering::Relaxed), 0);
        // The socket drops its Initials before they are decrypted; others are not touched.
        assert!(gate.throttles_at(ip, now));
        assert!(!gate.throttles_at("10.0.0.8".parse().unwrap(), now));
        // Half a second later it has tokens again.
        assert!(!gate.throttles_at(ip, now + Duration::from_millis(500)));
    }

    #[test]
    fn a_source_that_never_answers_its_retries_is_dropped_at_the_retry_rate() {
        let gate = Gate::default();
        let ip: IpAddr = "10.0.0.6".parse().unwrap();
        let now = Instant::now();
        spend_burst(&gate, ip, false, now);
        assert!(!gate.throttles_at(ip, now));
        for i in 0..SOURCE_RETRY_BURST as usize {
            assert_eq!(gate.attempt_at(ip, false, now).0, Admit::Retry, "retry {i}");
        }
        assert_eq!(gate.attempt_at(ip, false, now).0, Admit::Throttle);
        assert!(gate.throttles_at(ip, now));
        // A second later: the handshake rate and the Retry rate again, no more.
        let later = now + Duration::from_secs(1);
        assert!(!gate.throttles_at(ip, later));
        let mut decisions = HashMap::new();
        for _ in 0..1000 {
            *decisions
                .entry(gate.attempt_at(ip, false, later).0)
                .or_insert(0usize) += 1;
        }
        assert_eq!(decisions[&Admit::Accept], SOURCE_HANDSHAKE_RATE as usize);
        assert_eq!(decisions[&Admit::Retry], SOURCE_RETRY_RATE as usize);
    }

    #[test]
    fn verified_peers_get_their_token_back() {
        let gate = Gate::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        for i in 0..(SOURCE_HANDSHAKE_BURST as usize * 4) {
            let (decision, pass) = gate.attempt_at(ip, false, now);
            assert_eq!(decision, Admit::Accept, "attempt {i}");
            pass.unwrap().authenticated();
        }
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        let a = Source::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Source::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Source::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            Source::of("::ffff:10.0.0.1".parse().unwrap()),
            Source::of("10.0.0.1".parse().unwrap())
        );
        // One /64 shares one bucket: rotating the low bits buys nothing.
        let gate = Gate::default();
        let now = Instant::now();
        for i in 0..SOURCE_HANDSHAKE_BURST as u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i));
            assert_eq!(fail_one(&gate, ip, now), Admit::Accept);
        }
        let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9));
        assert_eq!(fail_one(&gate, ip, now), Admit::Throttle);
    }

    #[test]
    fn the_bucket_table_is_bounded_and_swept() {
        let gate = Gate::default();
        let t0 = Instant::now();
        let ip = |n: usize| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n as u32));
        for n in 0..MAX_TRACKED_SOURCES {
            assert_eq!(fail_one(&gate, ip(n), t0), Admit::Accept);
        }
        // Full of buckets still refilling: a new source is over its rate (validated: dropped).
        assert_eq!(
            fail_one(&gate, ip(MAX_TRACKED_SOURCES), t0),
            Admit::Throttle
        );
        // Once they refilled, a sweep frees them and the new source is served.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            fail_one(&gate, ip(MAX_TRACKED_SOURCES), later),
            Admit::Accept
        );
        let c = gate.counts.lock().unwrap();
        assert_eq!(c.buckets.len(), 1);
        assert!(c.by_source.is_empty());
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

    #[test]
    fn requests_in_progress_are_capped_per_peer_over_all_its_connections() {
        let gate = Gate::default();
        let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/a").unwrap();
        let (one, two) = (gate.peer(&id).unwrap(), gate.peer(&id).unwrap());
        let mut held = Vec::new();
        for i in 0..MAX_STREAMS_PER_PEER {
            let conn = if i % 2 == 0 { &one } else { &two };
            held.push(conn.stream().unwrap());
        }
        assert!(one.stream().is_none());
        assert!(two.stream().is_none());
        assert_eq!(gate.stats.streams_rejected.load(Ordering::Relaxed), 2);
        // Another peer is not charged.
        let other = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/b").unwrap();
        assert!(gate.peer(&other).unwrap().stream().is_some());
        held.pop();
        assert!(two.stream().is_some());
    }
}
