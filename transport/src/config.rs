//! Transport settings: a plain, serde-friendly [`RawTransportConfig`] as read from a file, and
//! the validated [`TransportConfig`] that the rest of the crate accepts. A `TransportConfig`
//! cannot hold an invalid combination (parse, don't validate).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::congestion::Congestion;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Largest value a QUIC variable-length integer carries (RFC 9000 §16).
const VARINT_MAX: u64 = (1 << 62) - 1;
/// The bound of `connections_per_peer` and `max_connections_per_peer`.
pub(crate) const MAX_CONNECTIONS_PER_PEER: u64 = 64;
/// The smallest UDP payload every QUIC path must carry (RFC 9000 §14), bytes.
pub const MIN_MTU: u16 = 1200;
/// The largest `initial_mtu`: the UDP payload of a 1500-byte IPv4 packet (1500 − 20 − 8), which
/// is also the most the endpoint accepts (quinn's `max_udp_payload_size`), bytes.
pub const MAX_MTU: u16 = 1472;

/// A rejected transport setting: names the field and says what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A numeric setting is outside its valid range.
    #[error("transport.{field} = {value} is out of range; use {min}..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value given.
        value: u64,
        /// Smallest valid value.
        min: u64,
        /// Largest valid value.
        max: u64,
    },
    /// Two settings contradict each other.
    #[error("transport.{field}: {reason}")]
    Inconsistent {
        /// The field to change.
        field: &'static str,
        /// Why the combination is refused.
        reason: &'static str,
    },
    /// A value that does not parse.
    #[error("transport.{field}: {value:?} is not {expected}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What the field takes.
        expected: &'static str,
    },
}

/// Transport settings as written in a config file. Durations are in milliseconds, sizes in
/// bytes. Convert with `TransportConfig::try_from`; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTransportConfig {
    /// Flow-control window of one stream: how far a sender may run ahead of the reader.
    pub stream_receive_window: u64,
    /// Flow-control window of a whole connection. This is the ceiling of receive-buffer memory
    /// per peer connection, whatever the number of streams.
    pub receive_window: u64,
    /// Bytes a connection may have in flight or buffered unsent, over all its streams.
    pub send_window: u64,
    /// Concurrent bidirectional streams (tunnels plus HTTP requests) a peer may open.
    pub max_concurrent_bidi_streams: u64,
    /// Close a connection after this long without any packet.
    pub idle_timeout_ms: u64,
    /// Send a keep-alive ping this often; must be below `idle_timeout_ms`. 0 turns it off.
    pub keep_alive_interval_ms: u64,
    /// Give up on a QUIC handshake after this long.
    pub connect_timeout_ms: u64,
    /// SO_RCVBUF of the UDP socket.
    pub udp_recv_buffer: u64,
    /// SO_SNDBUF of the UDP socket.
    pub udp_send_buffer: u64,
    /// QUIC connections kept per peer (more than one spreads work over cores).
    pub connections_per_peer: u64,
    /// Most QUIC connections opened to one peer: beyond `connections_per_peer`, another one is
    /// opened only when every open one is out of stream credit (more flows at once than
    /// `max_concurrent_bidi_streams`). `connections_per_peer` to 64.
    pub max_connections_per_peer: u64,
    /// How long a new flow or request waits for stream credit on a connection before the pool
    /// opens another one (or, with `max_connections_per_peer` open, fails it with the local
    /// error `StreamLimit`, which is never charged to the peer). 1 to 60,000 ms; keep it well
    /// below `failure.connect_timeout`.
    pub stream_credit_wait_ms: u64,
    /// First reconnect delay after a failed connect; doubled on each further failure.
    pub backoff_initial_ms: u64,
    /// Longest reconnect delay.
    pub backoff_max_ms: u64,
    /// Largest header section, in bytes as RFC 9114 §4.2.2 counts them (name + value + 32 per
    /// field, pseudo-header fields included), accepted from a peer and advertised to it as
    /// SETTINGS_MAX_FIELD_SECTION_SIZE. A request over it is refused before it is sent (431);
    /// a response over the peer's advertised value is replaced by a 502. 1 KiB to 1 MiB.
    pub max_field_section_size: u64,
    /// Congestion controller of every connection: `"bbr"` (default) or `"cubic"`.
    pub congestion: Congestion,
    /// UDP payload size, in bytes, of every packet from the first one on (quinn's
    /// `initial_mtu`). 1200 (the default) is what every QUIC path must carry (RFC 9000 §14);
    /// path MTU discovery (DPLPMTUD, RFC 8899 / RFC 9000 §14.3) then probes up to 1452 while
    /// the connection's first flows run. On a network known to carry more (1472 is a 1500-byte
    /// IPv4 path), starting there skips the probes: a too-large value is caught by black-hole
    /// detection, which falls back to 1200 after losses (and searches again after 60 s).
    /// Connections through an east-west gateway start lower by the PROXY header it adds, on
    /// both sides (the dialler's, and the accepting endpoint's with `proxy_protocol_from`).
    /// 1200 to 1472.
    pub initial_mtu: u64,
    /// Requests and tunnels one verified peer may have in progress at once on this endpoint,
    /// over all its connections; past it a new one is reset with H3_REQUEST_REJECTED. 1 to
    /// 16,777,216; the default, 16,384, is twice what a pool opens at most by default
    /// (8 connections × 1,024 streams).
    pub max_streams_per_peer: u64,
    /// Sources (IP addresses or CIDR prefixes, `"10.1.0.0/16"`, `"fd00::/8"`, `"10.1.0.9"`)
    /// trusted to hand over QUIC datagrams of clients in other clusters, each behind a PROXY
    /// protocol v2 header naming the client: this cluster's east-west gateways. Empty (the
    /// default): such datagrams are dropped. At most 64 entries.
    pub proxy_protocol_from: Vec<String>,
}

impl Default for RawTransportConfig {
    fn default() -> Self {
        RawTransportConfig {
            stream_receive_window: 2 * MIB,
            receive_window: 16 * MIB,
            send_window: 16 * MIB,
            max_concurrent_bidi_streams: 1024,
            idle_timeout_ms: 30_000,
            keep_alive_interval_ms: 10_000,
            connect_timeout_ms: 5_000,
            udp_recv_buffer: 4 * MIB,
            udp_send_buffer: 4 * MIB,
            connections_per_peer: 1,
            max_connections_per_peer: 8,
            stream_credit_wait_ms: 100,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            max_field_section_size: 96 * KIB,
            congestion: Congestion::default(),
            initial_mtu: u64::from(MIN_MTU),
            max_streams_per_peer: 16_384,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// Validated transport settings. Build with `TransportConfig::default()` or
/// `TransportConfig::try_from(RawTransportConfig)`; serializes back to the raw form.
///
/// Defaults, sized for a proxy on a small machine:
///
/// | setting | default | why |
/// |---|---|---|
/// | stream receive window | 2 MiB | ~160 Mbit/s per stream at 100 ms RTT, far more on a LAN |
/// | connection receive window | 16 MiB | **memory ceiling per peer connection** for receive buffers, whatever the stream count (1024 × 2 MiB would be 2 GiB) |
/// | send window | 16 MiB | matches the receive window |
/// | concurrent bidi streams | 1024 | one per tunnelled flow or request; quinn's default of 100 would queue flows |
/// | idle timeout / keep-alive | 30 s / 10 s | pooled connections stay up while idle peers still get detected |
/// | connect timeout | 5 s | |
/// | UDP socket buffers | 4 MiB each | bursts are not dropped by the kernel before quinn reads them |
/// | connections per peer | 1 | one connection carries all flows to a peer |
/// | max connections per peer | 8 | overflow when a peer's streams run out: 8 × 1024 flows and requests at once per peer, with a receive-memory ceiling of 8 × 16 MiB |
/// | stream credit wait | 100 ms | a round of MAX_STREAMS credit on a LAN takes far less; short beside the connect timeout (2 s), so a flow out of credit moves on, or fails as a local limit, before its connect attempt would time out |
/// | reconnect backoff | 100 ms doubling to 5 s, jittered | |
/// | max field section size | 96 KiB | bounds decoded header memory per request; real cookies reach 60 KiB (nginx and Envoy users meet such headers), so 16 KiB refused real traffic |
/// | congestion | `bbr` | keeps near full rate through random loss without filling queues; on a clean, CPU-bound link the `bulk` and `latency` benches find it no worse than `cubic` (ARCHITECTURE.md, "Congestion control") |
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTransportConfig", into = "RawTransportConfig")]
pub struct TransportConfig {
    raw: RawTransportConfig,
    proxy_from: Vec<IpPrefix>,
}

/// An IP prefix (CIDR, RFC 4632 §3.1; RFC 4291 §2.3): an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    addr: std::net::IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Whether `ip` is inside the prefix (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = ();

    /// `ADDR` or `ADDR/LEN` with LEN ≤ 32 (IPv4) or ≤ 128 (IPv6).
    fn from_str(text: &str) -> Result<Self, ()> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse::<u8>().map_err(|_| ())?
            }
            Some(_) => return Err(()),
            None => max,
        };
        if len > max {
            return Err(());
        }
        Ok(IpPrefix { addr, len })
    }
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

impl TryFrom<RawTransportConfig> for TransportConfig {
    type Error = ConfigError;

    fn try_from(raw: RawTransportConfig) -> Result<Self, ConfigError> {
        check_sizes(&raw)?;
        check_times(&raw)?;
        range(
            "max_concurrent_bidi_streams",
            raw.max_concurrent_bidi_streams,
            1,
            1 << 20,
        )?;
        range(
            "connections_per_peer",
            raw.connections_per_peer,
            1,
            MAX_CONNECTIONS_PER_PEER,
        )?;
        range("max_streams_per_peer", raw.max_streams_per_peer, 1, 1 << 24)?;
        range(
            "max_connections_per_peer",
            raw.max_connections_per_peer,
            raw.connections_per_peer,
            MAX_CONNECTIONS_PER_PEER,
        )?;
        if raw.proxy_protocol_from.len() > 64 {
            return Err(ConfigError::OutOfRange {
                field: "proxy_protocol_from",
                value: raw.proxy_protocol_from.len() as u64,
                min: 0,
                max: 64,
            });
        }
        let proxy_from = raw
            .proxy_protocol_from
            .iter()
            .map(|text| {
                text.parse().map_err(|()| ConfigError::Invalid {
                    field: "proxy_protocol_from",
                    value: text.clone(),
                    expected: "an IP address or a prefix such as 10.1.0.0/16",
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(TransportConfig { raw, proxy_from })
    }
}

/// Windows, buffers and header limits (bytes).
fn check_sizes(raw: &RawTransportConfig) -> Result<(), ConfigError> {
    let window = |field, value, min| range(field, value, min, VARINT_MAX);
    window("stream_receive_window", raw.stream_receive_window, 16 * KIB)?;
    // The connection window must admit at least one full stream window.
    window(
        "receive_window",
        raw.receive_window,
        raw.stream_receive_window,
    )?;
    window("send_window", raw.send_window, 16 * KIB)?;
    range("udp_recv_buffer", raw.udp_recv_buffer, 64 * KIB, 256 * MIB)?;
    range("udp_send_buffer", raw.udp_send_buffer, 64 * KIB, 256 * MIB)?;
    range(
        "max_field_section_size",
        raw.max_field_section_size,
        KIB,
        MIB,
    )?;
    range(
        "initial_mtu",
        raw.initial_mtu,
        u64::from(MIN_MTU),
        u64::from(MAX_MTU),
    )?;
    Ok(())
}

/// Timeouts, intervals and backoff (milliseconds).
fn check_times(raw: &RawTransportConfig) -> Result<(), ConfigError> {
    // quinn caps the idle timeout at 2^62 ms; a day is plenty.
    range("idle_timeout_ms", raw.idle_timeout_ms, 100, 86_400_000)?;
    // A keep-alive at or past the idle timeout would let idle pooled connections die.
    range(
        "keep_alive_interval_ms",
        raw.keep_alive_interval_ms,
        0,
        raw.idle_timeout_ms - 1,
    )?;
    range("connect_timeout_ms", raw.connect_timeout_ms, 10, 600_000)?;
    range(
        "stream_credit_wait_ms",
        raw.stream_credit_wait_ms,
        1,
        60_000,
    )?;
    range("backoff_initial_ms", raw.backoff_initial_ms, 1, 600_000)?;
    range(
        "backoff_max_ms",
        raw.backoff_max_ms,
        raw.backoff_initial_ms,
        3_600_000,
    )?;
    Ok(())
}

impl From<TransportConfig> for RawTransportConfig {
    fn from(config: TransportConfig) -> Self {
        config.raw
    }
}

#[allow(clippy::cast_possible_truncation)]
impl TransportConfig {
    /// The settings in their raw form (for `/config_dump` or to derive a variant).
    pub fn raw(&self) -> &RawTransportConfig {
        &self.raw
    }

    /// Per-stream receive window in bytes.
    pub fn stream_receive_window(&self) -> u64 {
        self.raw.stream_receive_window
    }

    /// Per-connection receive window in bytes: the receive-buffer memory ceiling per peer.
    pub fn receive_window(&self) -> u64 {
        self.raw.receive_window
    }

    /// Per-connection send window in bytes.
    pub fn send_window(&self) -> u64 {
        self.raw.send_window
    }

    /// Concurrent bidirectional streams allowed per connection.
    pub fn max_concurrent_bidi_streams(&self) -> u64 {
        self.raw.max_concurrent_bidi_streams
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.raw.idle_timeout_ms)
    }

    /// Keep-alive interval, if any.
    pub fn keep_alive_interval(&self) -> Option<Duration> {
        match self.raw.keep_alive_interval_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Handshake deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.raw.connect_timeout_ms)
    }

    /// UDP receive buffer size in bytes.
    pub fn udp_recv_buffer(&self) -> usize {
        self.raw.udp_recv_buffer as usize
    }

    /// UDP send buffer size in bytes.
    pub fn udp_send_buffer(&self) -> usize {
        self.raw.udp_send_buffer as usize
    }

    /// Connections kept per peer.
    pub fn connections_per_peer(&self) -> usize {
        self.raw.connections_per_peer as usize
    }

    /// Requests in progress at once per verified peer, over all its connections.
    pub fn max_streams_per_peer(&self) -> usize {
        self.raw.max_streams_per_peer as usize
    }

    /// Most connections opened to one peer when its streams run out.
    pub fn max_connections_per_peer(&self) -> usize {
        self.raw.max_connections_per_peer as usize
    }

    /// How long a new stream waits for stream credit on one connection.
    pub fn stream_credit_wait(&self) -> Duration {
        Duration::from_millis(self.raw.stream_credit_wait_ms)
    }

    /// First reconnect delay.
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.raw.backoff_initial_ms)
    }

    /// Longest reconnect delay.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.raw.backoff_max_ms)
    }

    /// Largest header section accepted or sent, in bytes as RFC 9114 §4.2.2 counts them (see
    /// [`crate::request_section_size`]).
    pub fn max_field_section_size(&self) -> u64 {
        self.raw.max_field_section_size
    }

    /// UDP payload size of the first packets, bytes (`initial_mtu`), within
    /// [`MIN_MTU`]..=[`MAX_MTU`].
    pub fn initial_mtu(&self) -> u16 {
        u16::try_from(self.raw.initial_mtu).unwrap_or(MIN_MTU)
    }

    /// The congestion controller.
    pub fn congestion(&self) -> Congestion {
        self.raw.congestion
    }

    /// Sources trusted to send PROXY-protocol-wrapped datagrams (east-west gateways).
    pub fn proxy_protocol_from(&self) -> &[IpPrefix] {
        &self.proxy_from
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn proxy_sources_parse_as_prefixes_and_bad_ones_are_named() {
        let raw = RawTransportConfig {
            proxy_protocol_from: vec!["10.1.0.0/16".into(), "fd00::/8".into(), "192.0.2.7".into()],
            ..RawTransportConfig::default()
        };
        let config = TransportConfig::try_from(raw).unwrap();
        let trusted = |ip: &str| {
            let ip = ip.parse().unwrap();
            config.proxy_protocol_from().iter().any(|p| p.contains(ip))
        };
        assert!(trusted("10.1.200.3"));
        assert!(trusted("::ffff:10.1.0.1"));
        assert!(trusted("fd12::1"));
        assert!(trusted("192.0.2.7"));
        assert!(!trusted("192.0.2.8"));
        assert!(!trusted("10.2.0.1"));
        assert!(!trusted("fe80::1"));
        assert!("0.0.0.0/0"
            .parse::<IpPrefix>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.1.0.0/33",
            "10.1.0.0/",
            "10.1.0.0/+8",
            "gateway",
            "fd00::/129",
            "",
        ] {
            let raw = RawTransportConfig {
                proxy_protocol_from: vec![bad.into()],
                ..RawTransportConfig::default()
            };
            let err = TransportConfig::try_from(raw).unwrap_err().to_string();
            assert!(
                err.contains("transport.proxy_protocol_from") && err.contains(bad),
                "{err}"
            );
        }
    }

    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        let config = TransportConfig::default();
        assert_eq!(
            TransportConfig::try_from(config.raw().clone()).unwrap(),
            config
        );
        assert_eq!(config.max_concurrent_bidi_streams(), 1024);
        assert!(config.keep_alive_interval().unwrap() < config.idle_timeout());
    }

    #[test]
    fn a_config_round_trips_through_serde() {
        let config = TransportConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        let back: TransportConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn keep_alive_must_be_below_idle_timeout() {
        let raw = RawTransportConfig {
            idle_timeout_ms: 1000,
            keep_alive_interval_ms: 1000,
            ..Default::default()
        };
        let err = TransportConfig::try_from(raw).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::OutOfRange {
                field: "keep_alive_interval_ms",
                max: 999,
                ..
            }
        ));
    }

    #[test]
    fn connection_window_must_cover_a_stream_window() {
        let raw = RawTransportConfig {
            stream_receive_window: 4 * MIB,
            receive_window: MIB,
            ..Default::default()
        };
        let err = TransportConfig::try_from(raw).unwrap_err();
        assert!(err.to_string().contains("receive_window"), "{err}");
    }

    #[test]
    fn initial_mtu_is_what_every_path_carries_unless_set_within_bounds() {
        assert_eq!(TransportConfig::default().initial_mtu(), MIN_MTU);
        let set: TransportConfig = serde_json::from_str(r#"{"initial_mtu": 1472}"#).unwrap();
        assert_eq!(set.initial_mtu(), 1472);
        for bad in [0, 1199, 1473, 9000, u64::MAX] {
            let raw = RawTransportConfig {
                initial_mtu: bad,
                ..Default::default()
            };
            let err = TransportConfig::try_from(raw).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::OutOfRange {
                        field: "initial_mtu",
                        min: 1200,
                        max: 1472,
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn congestion_defaults_to_bbr() {
        assert_eq!(TransportConfig::default().congestion(), Congestion::Bbr);
    }

    #[test]
    fn congestion_is_named_in_the_config() {
        let bbr: TransportConfig = serde_json::from_str(r#"{"congestion": "bbr"}"#).unwrap();
        assert_eq!(bbr.congestion(), Congestion::Bbr);
        let cubic: TransportConfig = serde_json::from_str(r#"{"congestion": "cubic"}"#).unwrap();
        assert_eq!(cubic.congestion(), Congestion::Cubic);
        let dumped = serde_json::to_value(&cubic).unwrap();
        assert_eq!(dumped["congestion"], "cubic");
    }

    #[test]
    fn unknown_congestion_names_the_valid_values() {
        let err = serde_json::from_str::<TransportConfig>(r#"{"congestion": "reno"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bbr`") && err.contains("`cubic`"), "{err}");
        let err = "BBR".parse::<Congestion>().unwrap_err().to_string();
        assert_eq!(
            err,
            "transport.congestion = \"BBR\" is not a congestion controller; use \"bbr\" or \"cubic\""
        );
    }

    #[test]
    fn deserializing_checks_the_range_of_each_value() {
        let bad = r#"{"connections_per_peer": 0}"#;
        assert!(serde_json::from_str::<TransportConfig>(bad).is_err());
        let partial: TransportConfig =
            serde_json::from_str(r#"{"connections_per_peer": 2}"#).unwrap();
        assert_eq!(partial.connections_per_peer(), 2);
    }

    #[test]
    fn overflow_connections_are_at_least_the_kept_ones() {
        let raw = RawTransportConfig {
            connections_per_peer: 4,
            max_connections_per_peer: 2,
            ..Default::default()
        };
        let err = TransportConfig::try_from(raw).unwrap_err();
        assert_eq!(
            err.to_string(),
            "transport.max_connections_per_peer = 2 is out of range; use 4..=64"
        );
    }

    #[test]
    fn overflow_defaults_to_eight_connections_after_100_ms_without_credit() {
        let config = TransportConfig::default();
        assert_eq!(config.max_connections_per_peer(), 8);
        assert_eq!(config.stream_credit_wait(), Duration::from_millis(100));
    }

    #[test]
    fn deserializing_rejects_unknown_keys() {
        let unknown = r#"{"windw": 5}"#;
        assert!(serde_json::from_str::<TransportConfig>(unknown).is_err());
    }
}
