//! `halyard gateway --config FILE`: an east-west gateway that routes QUIC between clusters
//! without decrypting it.
//!
//! It listens on one UDP socket (default `0.0.0.0:15444`). A datagram from a caller in another
//! cluster goes to one endpoint of an exported service of this cluster, chosen by:
//! - the server name in the ClientHello of a client's first Initial packet, which the caller's
//!   sidecar sets to `<server-id>.lb.halyard.internal` (`halyard_transport::gateway_server_name`)
//!   and the gateway reads with the version's public Initial keys (RFC 9001 §5.2,
//!   `halyard_transport::initial`), the only kind of packet it ever opens (a ClientHello that
//!   spans Initials is gathered first: [`HelloAssembler`]);
//! - for every other packet, the server ID in its destination connection ID, which sidecars
//!   issue as in QUIC-LB (`halyard_transport::quic_lb`).
//!
//! The datagram reaches the endpoint's sidecar behind a PROXY protocol v2 header naming the
//! caller (`halyard_transport::proxy_v2`); the sidecar answers through the gateway with a
//! header naming the caller, and the gateway sends the payload on. The gateway keeps no table
//! of connections (only, for a second at most, the first Initials of a connection whose
//! ClientHello spans them): it can restart, run as replicas, and follow a caller whose address
//! changes.
//! It holds no workload key; mTLS stays between the two sidecars.
//!
//! The routing table is built from this cluster's registry: every endpoint of a Service with
//! `exported: true` that is reached directly (not itself behind a gateway), by
//! `ServerId::of(address)`. Anything else is dropped and counted
//! (`halyard_gateway_datagrams_total{decision}`). Admin: `/metrics`, `/healthz`, `/readyz`
//! (ready once a snapshot is in force), `/config_dump`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use halyard_registry::Snapshot;
use halyard_transport::initial::{initial_server_name, long_header_dcid};
use halyard_transport::proxy_v2::{self, ProxyHeader};
use halyard_transport::quic_lb::{self, LbConfigs, ServerId};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

mod xdp;
pub use xdp::XdpConfig;

/// The gateway's default UDP port (next to the sidecars' 15443).
pub const DEFAULT_GATEWAY_PORT: u16 = 15444;

/// `halyard gateway --config FILE` (TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address to listen on; default `0.0.0.0:15444`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// This cluster's registry: `etcd://...` or `file:///...`.
    pub registry: String,
    /// Mesh name.
    #[serde(default = "default_mesh")]
    pub mesh: String,
    /// Where the last good snapshot is kept, so a restarted gateway routes before the registry
    /// answers (static stability). None: not kept.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// A file holding `user:password` of the etcd user the gateway reads the registry as (etcd
    /// RBAC; read on `/halyard/<mesh>/` is enough: it writes nothing); none connects without
    /// authentication. Relative paths are anchored at the config file's folder.
    #[serde(default)]
    pub registry_credentials: Option<PathBuf>,
    /// TLS towards an `etcds://` registry, as in the sidecar's config.
    #[serde(default)]
    pub registry_tls: Option<crate::config::RegistryTlsConfig>,
    /// Plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`, `/config_dump`); none
    /// when absent. The deploy examples use `0.0.0.0:15020`.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// SO_RCVBUF and SO_SNDBUF of the UDP socket in bytes (the kernel may clamp them to
    /// `net.core.{r,w}mem_max`); 64 KiB to 256 MiB, default 4 MiB.
    #[serde(default = "default_buffer")]
    pub udp_buffer: usize,
    /// `[[quic_lb]]`: every QUIC-LB configuration this cluster's sidecars may be issuing
    /// connection IDs under (during a key rotation, the old and the new), at most 7, ids
    /// distinct. None: config id 0, unencrypted (the sidecars' default).
    #[serde(default)]
    pub quic_lb: Vec<crate::config::QuicLbConfig>,
    /// The configurations of `quic_lb`, keys read (built by [`GatewayConfig::parse`]).
    #[serde(skip)]
    pub lb: LbConfigs,
    /// `[xdp]`: forward established connections' packets in the kernel with an XDP program
    /// attached to these interfaces ([`xdp`]); none: every datagram passes through user space.
    #[serde(default)]
    pub xdp: Option<XdpConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_GATEWAY_PORT))
}
fn default_mesh() -> String {
    "default".into()
}
fn default_buffer() -> usize {
    4 << 20
}

impl GatewayConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&crate::config::read_file(path)?, path)
    }

    /// Checks `text` as the file at `path` (a relative `state_dir` is anchored at its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let field = |field: &str, message: String| ConfigError::Field {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        let mut config: GatewayConfig = crate::config::parse_toml(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        crate::config::anchor(
            base,
            [
                config.state_dir.as_mut(),
                config.registry_credentials.as_mut(),
            ],
        );
        if let Some(tls) = config.registry_tls.as_mut() {
            tls.anchor(base);
        }
        crate::config::anchor(base, config.quic_lb.iter_mut().map(|q| q.key_file.as_mut()));
        if !config.quic_lb.is_empty() {
            let configs = config
                .quic_lb
                .iter()
                .enumerate()
                .map(|(i, q)| q.load().map_err(|m| field(&format!("quic_lb[{i}]"), m)))
                .collect::<Result<Vec<_>, _>>()?;
            config.lb = LbConfigs::new(configs).map_err(|e| field("quic_lb", e.to_string()))?;
        }
        if let Some(xdp) = &config.xdp {
            xdp.check().map_err(|m| field("xdp", m))?;
        }
        if !(64 << 10..=256 << 20).contains(&config.udp_buffer) {
            return Err(field(
                "udp_buffer",
                format!(
                    "{} is out of range; use 65536..=268435456",
                    config.udp_buffer
                ),
            ));
        }
        halyard_registry::RegistryUrl::parse(&config.registry)
            .map_err(|e| field("registry", e.to_string()))?;
        crate::config::check_registry_tls(&config.registry, config.registry_tls.as_ref())
            .map_err(|m| field("registry_tls", m))?;
        Ok(config)
    }
}

/// One routable endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Where its sidecar's QUIC endpoint listens (its registered address).
    pub address: SocketAddr,
    /// Its service.
    pub service: String,
    /// Its endpoint id.
    pub id: String,
}

/// The routing table of one snapshot: server ID → endpoint, for exported services only.
#[derive(Debug, Default)]
pub struct Table {
    /// The snapshot's revision.
    pub revision: i64,
    by_server: HashMap<ServerId, Target>,
    /// Addresses allowed to send answers for callers (the targets).
    backends: HashSet<SocketAddr>,
    /// Server IDs claimed by two addresses: routed to neither.
    pub collisions: Vec<(ServerId, SocketAddr, SocketAddr)>,
    /// The QUIC-LB configurations connection IDs are read with.
    lb: LbConfigs,
}

impl Table {
    /// Builds the table of `snap`: endpoints of services with `exported: true` that are
    /// reached directly (an endpoint behind another cluster's gateway is not routed on); its
    /// connection IDs read with the default QUIC-LB configuration.
    pub fn of(snap: &Snapshot) -> Table {
        Table::with_lb(snap, LbConfigs::default())
    }

    /// [`Table::of`], reading connection IDs with the configurations `lb`.
    pub fn with_lb(snap: &Snapshot, lb: LbConfigs) -> Table {
        let mut by_server: HashMap<ServerId, Target> = HashMap::new();
        let mut collided: HashSet<ServerId> = HashSet::new();
        let mut collisions = Vec::new();
        for (name, service) in &snap.services {
            if !service.exported {
                continue;
            }
            for ep in snap.endpoints_of(name).filter(|ep| ep.gateway.is_none()) {
                let sid = ServerId::of(ep.address);
                let target = Target {
                    address: ep.address,
                    service: name.clone(),
                    id: ep.id.clone(),
                };
                match by_server.get(&sid) {
                    Some(old) if old.address != ep.address => {
                        collisions.push((sid, old.address, ep.address));
                        collided.insert(sid);
                    }
                    Some(_) => {}
                    None => {
                        by_server.insert(sid, target);
                    }
                }
            }
        }
        for sid in &collided {
            by_server.remove(sid);
        }
        let backends = by_server.values().map(|t| t.address).collect();
        Table {
            revision: snap.revision,
            by_server,
            backends,
            collisions,
            lb,
        }
    }

    /// The endpoint with `sid`, if routable.
    pub fn target(&self, sid: &ServerId) -> Option<&Target> {
        self.by_server.get(sid)
    }

    /// Routable endpoints.
    pub fn len(&self) -> usize {
        self.by_server.len()
    }

    /// No routable endpoint.
    pub fn is_empty(&self) -> bool {
        self.by_server.is_empty()
    }
}

/// Initials a source may have opened per second to read their server name (each costs a key
/// derivation and an AEAD decryption), after a burst; past it they are dropped.
pub const INITIAL_RATE: f64 = 128.0;
/// The burst of [`INITIAL_RATE`].
pub const INITIAL_BURST: f64 = 256.0;
/// Sources whose Initial budget is tracked; past it, full buckets are swept (at most once a
/// second) and a new source is treated as over its rate until room is made.
pub const MAX_INITIAL_SOURCES: usize = 4096;

/// Per-source budget of Initials opened for their server name (a token bucket per IPv4
/// address or IPv6 /64). Legitimate callers open one or two per new connection.
#[derive(Debug, Default)]
pub struct InitialBudget {
    buckets: HashMap<halyard_transport::admission::Source, (f64, std::time::Instant)>,
    last_sweep: Option<std::time::Instant>,
}

impl InitialBudget {
    /// Takes one token for `ip` at `now`; false when its bucket is empty.
    pub fn take(&mut self, ip: std::net::IpAddr, now: std::time::Instant) -> bool {
        let source = halyard_transport::admission::Source::of(ip);
        let refill = |(tokens, at): (f64, std::time::Instant)| {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            (tokens + elapsed * INITIAL_RATE).min(INITIAL_BURST)
        };
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_INITIAL_SOURCES {
            let swept_recently = self
                .last_sweep
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
            if swept_recently {
                return false;
            }
            self.last_sweep = Some(now);
            self.buckets.retain(|_, b| refill(*b) < INITIAL_BURST);
            if self.buckets.len() >= MAX_INITIAL_SOURCES {
                return false;
            }
        }
        let bucket = self.buckets.entry(source).or_insert((INITIAL_BURST, now));
        let tokens = refill(*bucket);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return false;
        }
        *bucket = (tokens - 1.0, now);
        true
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// No server name and no Halyard connection ID to route by.
    Unroutable,
    /// Names an endpoint that is not in the table (unknown, or of a service not exported).
    NotExported,
    /// A PROXY-wrapped answer from an address that is not a routable endpoint.
    UnknownSource,
    /// Not a QUIC v1 packet, or a PROXY header that does not parse.
    Malformed,
    /// An Initial from a source past its [`INITIAL_RATE`].
    RateLimited,
    /// An Initial whose ClientHello continues in a later packet, when no more can be held
    /// ([`HelloAssembler`]'s bounds) or the held ClientHello grew past them.
    HelloLimit,
}

impl Dropped {
    fn label(self) -> &'static str {
        match self {
            Dropped::Unroutable => "unroutable",
            Dropped::NotExported => "not_exported",
            Dropped::UnknownSource => "unknown_source",
            Dropped::Malformed => "malformed",
            Dropped::RateLimited => "rate_limited",
            Dropped::HelloLimit => "hello_limit",
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A caller's packet: wrap it and send it to this endpoint.
    Forward(SocketAddr),
    /// An endpoint's answer: send the bytes from `offset` on to the caller.
    Return {
        /// The caller.
        to: SocketAddr,
        /// Where the QUIC payload starts (after the PROXY header).
        offset: usize,
    },
    /// Dropped, for this reason.
    Drop(Dropped),
    /// A client's Initial whose ClientHello continues in a later packet: hold it
    /// ([`HelloAssembler`]) until the server name can be read.
    Incomplete,
}

/// Connections whose first Initials a gateway holds at once while their ClientHello is
/// incomplete; past it, such Initials are dropped (`hello_limit`). The client sends them again.
pub const MAX_HELD_HELLOS: usize = 256;
/// Of those, per source (IPv4 address or IPv6 /64).
pub const MAX_HELD_HELLOS_PER_SOURCE: usize = 8;
/// Datagrams held per connection, and CRYPTO bytes: a ClientHello larger than this is dropped.
pub const MAX_HELD_DATAGRAMS: usize = 4;
/// See [`MAX_HELD_DATAGRAMS`].
pub const MAX_HELLO_BYTES: usize = 8 * 1024;
/// How long held Initials wait for the rest of their ClientHello (a client's first probe
/// timeout is longer, and it then sends them all again).
pub const HELLO_HOLD: Duration = Duration::from_secs(1);

/// The Initials of connections whose ClientHello spans more than one packet (a post-quantum
/// key share, many ALPN names): kept per (client address, destination connection ID) until
/// the CRYPTO data from offset 0 holds the whole ClientHello, then routed by its server name
/// in the order they came. The only per-connection state of the gateway, bounded by
/// [`MAX_HELD_HELLOS`] × [`MAX_HELD_DATAGRAMS`] datagrams and dropped after [`HELLO_HOLD`].
#[derive(Debug, Default)]
pub struct HelloAssembler {
    held: HashMap<(SocketAddr, Vec<u8>), Held>,
}

#[derive(Debug)]
struct Held {
    datagrams: Vec<Vec<u8>>,
    pieces: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    since: std::time::Instant,
}

/// What became of an Initial offered to the [`HelloAssembler`].
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Held: the ClientHello is still incomplete.
    Held,
    /// The ClientHello is whole: route these datagrams (the held ones, then the one offered)
    /// by `name`.
    Complete {
        /// The ClientHello's server name.
        name: Option<String>,
        /// Every datagram of the connection so far, in the order they came.
        datagrams: Vec<Vec<u8>>,
    },
    /// Dropped (with what was held for the connection), for this reason.
    Drop(Dropped),
}

impl HelloAssembler {
    /// Offers a client's Initial from `from` whose ClientHello did not fit in it alone.
    pub fn offer(&mut self, from: SocketAddr, datagram: &[u8], now: std::time::Instant) -> Offer {
        use halyard_transport::initial::{initial_crypto, long_header_dcid, server_name_in};
        let Some(dcid) = long_header_dcid(datagram) else {
            return Offer::Drop(Dropped::Malformed);
        };
        let Ok(pieces) = initial_crypto(datagram) else {
            return Offer::Drop(Dropped::Unroutable);
        };
        self.held
            .retain(|_, h| now.saturating_duration_since(h.since) < HELLO_HOLD);
        let key = (from, dcid.to_vec());
        if !self.held.contains_key(&key) {
            let source = halyard_transport::admission::Source::of(from.ip());
            let same_source = self
                .held
                .keys()
                .filter(|(a, _)| halyard_transport::admission::Source::of(a.ip()) == source)
                .count();
            if self.held.len() >= MAX_HELD_HELLOS || same_source >= MAX_HELD_HELLOS_PER_SOURCE {
                return Offer::Drop(Dropped::HelloLimit);
            }
        }
        let held = self.held.entry(key.clone()).or_insert_with(|| Held {
            datagrams: Vec::new(),
            pieces: Vec::new(),
            bytes: 0,
            since: now,
        });
        held.bytes += pieces.iter().map(|(_, d)| d.len()).sum::<usize>();
        if held.datagrams.len() >= MAX_HELD_DATAGRAMS || held.bytes > MAX_HELLO_BYTES {
            self.held.remove(&key);
            return Offer::Drop(Dropped::HelloLimit);
        }
        held.pieces.extend(pieces);
        held.datagrams.push(datagram.to_vec());
        match server_name_in(&held.pieces) {
            Err(halyard_transport::initial::InitialError::Incomplete) => Offer::Held,
            Ok(name) => {
                let datagrams = self
                    .held
                    .remove(&key)
                    .map(|h| h.datagrams)
                    .unwrap_or_default();
                Offer::Complete { name, datagrams }
            }
            Err(_) => {
                self.held.remove(&key);
                Offer::Drop(Dropped::Unroutable)
            }
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Where a ClientHello's server name routes: `<server-id>.lb.halyard.internal` of an endpoint
/// in the table.
pub fn route_by_name(table: &Table, name: Option<&str>) -> Decision {
    match name
        .and_then(|n| n.strip_suffix(halyard_transport::GATEWAY_NAME_SUFFIX))
        .and_then(ServerId::from_hex)
    {
        Some(sid) => match table.target(&sid) {
            Some(t) => Decision::Forward(t.address),
            None => Decision::Drop(Dropped::NotExported),
        },
        None => match name {
            Some(_) => Decision::Drop(Dropped::NotExported),
            None => Decision::Drop(Dropped::Unroutable),
        },
    }
}

/// Decides what to do with `datagram`, received from `from` (pure: the table and the bytes).
pub fn decide(table: &Table, from: SocketAddr, datagram: &[u8]) -> Decision {
    decide_within(table, from, datagram, &mut |_| true)
}

/// [`decide`], asking `budget(from)` before opening an Initial for its server name.
pub fn decide_within(
    table: &Table,
    from: SocketAddr,
    datagram: &[u8],
    budget: &mut dyn FnMut(SocketAddr) -> bool,
) -> Decision {
    if proxy_v2::has_signature(datagram) {
        if !table.backends.contains(&from) {
            return Decision::Drop(Dropped::UnknownSource);
        }
        return match proxy_v2::decode(datagram) {
            Ok((header, offset)) => Decision::Return {
                to: header.destination,
                offset,
            },
            Err(_) => Decision::Drop(Dropped::Malformed),
        };
    }
    let Some(&first) = datagram.first() else {
        return Decision::Drop(Dropped::Malformed);
    };
    // RFC 9000 §17: the fixed bit is set in every QUIC v1 packet (Halyard does not grease it).
    if first & 0x40 == 0 {
        return Decision::Drop(Dropped::Malformed);
    }
    let dcid = if first & 0x80 != 0 {
        long_header_dcid(datagram)
    } else {
        quic_lb::short_header_dcid(datagram)
    };
    // A connection ID of ours routes any packet, Initials after a Retry or the server's first
    // answer included.
    if let Some(sid) = dcid.and_then(|cid| table.lb.server_id(cid)) {
        return match table.target(&sid) {
            Some(t) => Decision::Forward(t.address),
            None => Decision::Drop(Dropped::NotExported),
        };
    }
    if first & 0x80 == 0 {
        return Decision::Drop(Dropped::Unroutable);
    }
    // A client's first Initial: the server name says which endpoint.
    if !budget(from) {
        return Decision::Drop(Dropped::RateLimited);
    }
    match initial_server_name(datagram) {
        Ok(Some(name)) => route_by_name(table, Some(&name)),
        Err(halyard_transport::initial::InitialError::Incomplete) => Decision::Incomplete,
        _ => Decision::Drop(Dropped::Unroutable),
    }
}

/// The gateway's Prometheus metrics; counters resolved once, not per datagram.
struct GatewayMetrics {
    registry: prometheus::Registry,
    forwarded: IntCounter,
    /// Initials held while their ClientHello is incomplete ([`HelloAssembler`]).
    held: IntCounter,
    returned: IntCounter,
    drops: HashMap<Dropped, IntCounter>,
    bytes_forwarded: IntCounter,
    bytes_returned: IntCounter,
    endpoints: IntGauge,
    revision: IntGauge,
    stale: prometheus::Gauge,
    /// Datagrams the XDP program forwarded (also in `forwarded`).
    xdp_forwarded: IntCounter,
    /// Datagrams the XDP program returned (also in `returned`).
    xdp_returned: IntCounter,
    /// Routable datagrams the XDP program passed to user space: the kernel's route lookup did
    /// not give a next hop (neighbour not resolved yet, over the egress MTU, no route).
    xdp_unrouted: IntCounter,
    /// Routes in the XDP program's map.
    xdp_routes: IntGauge,
    /// CPU time the XDP program ran, while the kernel's BPF run-time statistics are on.
    xdp_run_seconds: prometheus::Counter,
}

impl GatewayMetrics {
    fn new() -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let datagrams = IntCounterVec::new(
            Opts::new(
                "halyard_gateway_datagrams_total",
                "Datagrams by decision: forwarded (caller to endpoint), returned (endpoint to caller), or why dropped",
            ),
            &["decision"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "halyard_gateway_bytes_total",
                "QUIC bytes passed on (PROXY headers not counted), by direction",
            ),
            &["direction"],
        )?;
        let endpoints = IntGauge::new(
            "halyard_gateway_endpoints",
            "Endpoints of exported services the gateway routes to",
        )?;
        let revision = IntGauge::new("halyard_registry_revision", "Registry revision applied")?;
        let stale = prometheus::Gauge::new(
            "halyard_registry_stale_seconds",
            "Seconds since the registry was last in contact; 0 while in contact",
        )?;
        let xdp = IntCounterVec::new(
            Opts::new(
                "halyard_gateway_xdp_datagrams_total",
                "Datagrams of the kernel path (XDP) by decision: forwarded and returned (also counted in halyard_gateway_datagrams_total), or unrouted (passed to user space: no next hop from the kernel's route lookup)",
            ),
            &["decision"],
        )?;
        let xdp_routes = IntGauge::new(
            "halyard_gateway_xdp_routes",
            "Routes (server ID under an unencrypted QUIC-LB configuration) in the XDP program's map",
        )?;
        let xdp_run_seconds = prometheus::Counter::new(
            "halyard_gateway_xdp_run_seconds_total",
            "CPU seconds the XDP program ran (counted while the kernel's BPF run-time statistics are on: [xdp] run_time_stats, or sysctl kernel.bpf_stats_enabled=1)",
        )?;
        registry.register(Box::new(xdp_run_seconds.clone()))?;
        registry.register(Box::new(xdp.clone()))?;
        registry.register(Box::new(xdp_routes.clone()))?;
        registry.register(Box::new(datagrams.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(endpoints.clone()))?;
        registry.register(Box::new(revision.clone()))?;
        registry.register(Box::new(stale.clone()))?;
        let drops = [
            Dropped::Unroutable,
            Dropped::NotExported,
            Dropped::UnknownSource,
            Dropped::Malformed,
            Dropped::RateLimited,
            Dropped::HelloLimit,
        ]
        .into_iter()
        .map(|d| (d, datagrams.with_label_values(&[d.label()])))
        .collect();
        Ok(GatewayMetrics {
            forwarded: datagrams.with_label_values(&["forwarded"]),
            held: datagrams.with_label_values(&["held"]),
            returned: datagrams.with_label_values(&["returned"]),
            drops,
            bytes_forwarded: bytes.with_label_values(&["to_endpoint"]),
            bytes_returned: bytes.with_label_values(&["to_caller"]),
            endpoints,
            revision,
            stale,
            xdp_forwarded: xdp.with_label_values(&["forwarded"]),
            xdp_returned: xdp.with_label_values(&["returned"]),
            xdp_unrouted: xdp.with_label_values(&["unrouted"]),
            xdp_routes,
            xdp_run_seconds,
            registry,
        })
    }

    fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// What a started gateway reports.
#[derive(Debug, Clone)]
pub struct StartedGateway {
    /// The bound UDP address.
    pub addr: SocketAddr,
    /// The bound admin address, when `admin` is set.
    pub admin: Option<SocketAddr>,
}

struct State {
    config: GatewayConfig,
    bound: SocketAddr,
    metrics: GatewayMetrics,
    table: tokio::sync::watch::Receiver<Arc<Table>>,
    registry: Arc<dyn halyard_registry::Registry>,
}

/// Opens the registry, binds `config.listen` and routes until `stop`.
pub async fn serve(
    config: GatewayConfig,
    stop: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<StartedGateway>>,
) -> anyhow::Result<()> {
    let socket =
        bind(&config).with_context(|| format!("listen = {}: cannot bind", config.listen))?;
    let bound = socket.local_addr()?;
    let xdp_path = match &config.xdp {
        Some(x) => Some(xdp::XdpPath::attach(x, bound)?),
        None => None,
    };
    let mut opts = halyard_registry::Options::new(&config.mesh);
    opts.state_dir = config.state_dir.clone();
    opts.access = crate::config::registry_access(
        config.registry_credentials.as_deref(),
        config.registry_tls.as_ref(),
    )?;
    let registry = halyard_registry::open_with(&config.registry, opts)
        .await
        .with_context(|| format!("registry = {:?}", config.registry))?;
    let metrics = GatewayMetrics::new()?;
    let (table_tx, table_rx) = tokio::sync::watch::channel(Arc::new(Table::with_lb(
        &registry.snapshot(),
        config.lb.clone(),
    )));
    let state = Arc::new(State {
        config,
        bound,
        metrics,
        table: table_rx,
        registry: registry.clone(),
    });
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(follow(
        registry.watch(),
        table_tx,
        state.clone(),
        stop.clone(),
    ));
    if let Some(path) = xdp_path {
        tasks.spawn(xdp::run(
            path,
            state.table.clone(),
            state.clone(),
            stop.clone(),
        ));
    }
    let admin = match state.config.admin {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin = {addr}: cannot listen"))?;
            let admin = listener.local_addr()?;
            tasks.spawn(crate::net::serve_http1_within(
                listener,
                stop.clone(),
                "gateway admin",
                (Duration::from_secs(1), Duration::from_secs(10)),
                state.clone(),
                |state, req| async move { admin_reply(&state, &req) },
            ));
            Some(admin)
        }
        None => None,
    };
    tracing::info!(addr = %bound, "gateway listening");
    if let Some(tx) = started {
        let _ = tx.send(StartedGateway { addr: bound, admin });
    }
    tokio::select! {
        _ = stop.cancelled() => {}
        r = route(&socket, &state) => r?,
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

fn bind(config: &GatewayConfig) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(config.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if let Err(e) = socket.set_recv_buffer_size(config.udp_buffer) {
        tracing::warn!(error = %e, "could not set SO_RCVBUF");
    }
    if let Err(e) = socket.set_send_buffer_size(config.udp_buffer) {
        tracing::warn!(error = %e, "could not set SO_SNDBUF");
    }
    socket.bind(&config.listen.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// Rebuilds the table on every snapshot.
async fn follow(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    table: tokio::sync::watch::Sender<Arc<Table>>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let next = Table::with_lb(&snap, state.config.lb.clone());
        for (sid, a, b) in &next.collisions {
            tracing::warn!(server_id = %sid, first = %a, second = %b, "two endpoints share a server ID; neither is routed");
        }
        state.metrics.endpoints.set(next.len() as i64);
        state.metrics.revision.set(next.revision);
        table.send_replace(Arc::new(next));
        tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
        }
    }
}

/// Room per datagram in the receive buffers (bytes): QUIC datagrams stay under the path MTU
/// (at most 1,472 bytes: the sidecars' `max_udp_payload_size` and `initial_mtu` ceiling), plus
/// a PROXY header on the way back; a GRO batch
/// is `gro_segments` of them.
const MAX_SEGMENT: usize = 2048;
/// Largest datagram the kernel takes in one GSO send (a UDP length field's worth).
const MAX_GSO_BYTES: usize = 65_000;

/// The data path, batched as quinn batches its own socket (`quinn-udp`): `recvmmsg` with GRO
/// in, one decision per datagram, consecutive datagrams with the same destination and size sent
/// together with GSO. A PROXY header is written in front of each forwarded datagram, and taken
/// off each returned one, while it is copied into the send buffer: one copy per byte.
async fn route(socket: &UdpSocket, state: &State) -> anyhow::Result<()> {
    use halyard_transport::quinn::udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
    use std::io::IoSliceMut;
    let udp = UdpSocketState::new(socket.into())?;
    let segments = udp.gro_segments().max(1);
    let slot = MAX_SEGMENT * segments;
    let mut storage = vec![0u8; slot * BATCH_SIZE];
    let mut meta = vec![RecvMeta::default(); BATCH_SIZE];
    let mut out = Batch::new(udp.max_gso_segments().max(1));
    let mut budget = InitialBudget::default();
    let mut hellos = HelloAssembler::default();
    let mut table_rx = state.table.clone();
    let mut table = table_rx.borrow_and_update().clone();
    loop {
        let n = {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.chunks_mut(slot).map(IoSliceMut::new).collect();
            match socket
                .async_io(tokio::io::Interest::READABLE, || {
                    udp.recv(socket.into(), &mut bufs, &mut meta)
                })
                .await
            {
                Ok(n) => n,
                // ICMP errors from an earlier send surface here (ECONNREFUSED); the socket is fine.
                Err(e) => {
                    tracing::debug!(error = %e, "gateway receive error");
                    continue;
                }
            }
        };
        if table_rx.has_changed().unwrap_or(false) {
            table = table_rx.borrow_and_update().clone();
        }
        for (m, buf) in meta.iter().zip(storage.chunks(slot)).take(n) {
            let len = m.len.min(buf.len());
            let stride = m.stride.clamp(1, len.max(1));
            for segment in buf[..len].chunks(stride) {
                let io = (socket, &udp);
                let limits = (&mut budget, &mut hellos);
                handle(io, state, &table, (m.addr, segment), &mut out, limits).await;
            }
        }
        out.flush(socket, &udp).await;
    }
}

/// One datagram: decided, counted, and added to the outgoing batch.
async fn handle(
    (socket, udp): (&UdpSocket, &halyard_transport::quinn::udp::UdpSocketState),
    state: &State,
    table: &Table,
    (from, datagram): (SocketAddr, &[u8]),
    out: &mut Batch,
    (budget, hellos): (&mut InitialBudget, &mut HelloAssembler),
) {
    let m = &state.metrics;
    let now = std::time::Instant::now();
    let io = (socket, udp);
    match decide_within(table, from, datagram, &mut |from| {
        budget.take(from.ip(), now)
    }) {
        Decision::Forward(to) => forward(io, state, out, (from, to), datagram).await,
        Decision::Incomplete => match hellos.offer(from, datagram, now) {
            Offer::Held => m.held.inc(),
            Offer::Complete { name, datagrams } => match route_by_name(table, name.as_deref()) {
                Decision::Forward(to) => {
                    for d in &datagrams {
                        forward(io, state, out, (from, to), d).await;
                    }
                }
                Decision::Drop(why) => drop_counted(m, from, why),
                _ => drop_counted(m, from, Dropped::Unroutable),
            },
            Offer::Drop(why) => drop_counted(m, from, why),
        },
        Decision::Return { to, offset } => {
            let payload = datagram.get(offset..).unwrap_or_default();
            out.push(socket, udp, to, &[payload]).await;
            m.returned.inc();
            m.bytes_returned.inc_by(payload.len() as u64);
        }
        Decision::Drop(why) => drop_counted(m, from, why),
    }
}

/// Wraps a caller's `datagram` in a PROXY header naming it and adds it to the batch for `to`.
async fn forward(
    (socket, udp): (&UdpSocket, &halyard_transport::quinn::udp::UdpSocketState),
    state: &State,
    out: &mut Batch,
    (from, to): (SocketAddr, SocketAddr),
    datagram: &[u8],
) {
    let header = ProxyHeader {
        source: from,
        destination: state.bound,
    };
    let mut head = [0u8; proxy_v2::MAX_LEN];
    let Some(hlen) = proxy_v2::encode(&header, &mut head) else {
        return;
    };
    out.push(socket, udp, to, &[&head[..hlen], datagram]).await;
    state.metrics.forwarded.inc();
    state.metrics.bytes_forwarded.inc_by(datagram.len() as u64);
}

fn drop_counted(m: &GatewayMetrics, from: SocketAddr, why: Dropped) {
    tracing::debug!(%from, reason = why.label(), "gateway dropped a datagram");
    if let Some(c) = m.drops.get(&why) {
        c.inc();
    }
}

/// Datagrams for one destination, all of one size but the last (what GSO sends at once).
struct Batch {
    to: Option<SocketAddr>,
    bytes: Vec<u8>,
    segment: usize,
    count: usize,
    /// The last segment was shorter: nothing more can join.
    closed: bool,
    max_segments: usize,
}

impl Batch {
    fn new(max_segments: usize) -> Batch {
        Batch {
            to: None,
            bytes: Vec::with_capacity(MAX_GSO_BYTES + MAX_SEGMENT),
            segment: 0,
            count: 0,
            closed: false,
            max_segments,
        }
    }

    /// Adds one datagram made of `parts` for `to`, sending what was batched first when it
    /// cannot join.
    async fn push(
        &mut self,
        socket: &UdpSocket,
        udp: &halyard_transport::quinn::udp::UdpSocketState,
        to: SocketAddr,
        parts: &[&[u8]],
    ) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let joins = self.to == Some(to)
            && !self.closed
            && len <= self.segment
            && self.count < self.max_segments
            && self.bytes.len() + len <= MAX_GSO_BYTES;
        if !joins {
            self.flush(socket, udp).await;
            self.to = Some(to);
            self.segment = len;
        }
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        self.count += 1;
        self.closed = len < self.segment;
    }

    async fn flush(
        &mut self,
        socket: &UdpSocket,
        udp: &halyard_transport::quinn::udp::UdpSocketState,
    ) {
        if let Some(to) = self.to.take() {
            let transmit = halyard_transport::quinn::udp::Transmit {
                destination: to,
                ecn: None,
                contents: &self.bytes,
                segment_size: (self.count > 1).then_some(self.segment),
                src_ip: None,
            };
            let sent = socket
                .async_io(tokio::io::Interest::WRITABLE, || {
                    udp.send(socket.into(), &transmit)
                })
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, %to, "gateway send failed");
            }
        }
        self.bytes.clear();
        self.count = 0;
        self.closed = false;
    }
}

fn admin_reply(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    state
        .metrics
        .stale
        .set(state.registry.staleness().as_secs_f64());
    let reply = |status: StatusCode, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    };
    let snapshot_in_force = !matches!(
        state.registry.snapshot().origin,
        halyard_registry::Origin::Empty
    );
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, state.metrics.render()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") if snapshot_in_force => reply(StatusCode::OK, "ready\n".into()),
        (&Method::GET, "/readyz") => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no registry snapshot yet\n".into(),
        ),
        (&Method::GET, "/config_dump") => {
            let table = state.table.borrow().clone();
            let routes: BTreeMap<String, &Target> = table
                .by_server
                .iter()
                .map(|(sid, t)| (sid.to_hex(), t))
                .collect();
            let collisions: Vec<_> = table
                .collisions
                .iter()
                .map(|(sid, a, b)| serde_json::json!({"serverId": sid.to_hex(), "addresses": [a, b]}))
                .collect();
            let dump = serde_json::json!({
                "config": state.config,
                "listening": state.bound,
                "revision": table.revision,
                "routes": routes,
                "collisions": collisions,
            });
            let mut resp = reply(
                StatusCode::OK,
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            );
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics, /healthz, /readyz, /config_dump\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_registry::model::parse_documents;

    fn snapshot(yaml: &str) -> Snapshot {
        let objects = parse_documents("test", yaml).unwrap();
        Snapshot::of_objects(halyard_registry::Origin::Live, objects)
    }

    const MESH: &str = "
kind: Service
name: reviews
exported: true
ports: [{ port: 9080, protocol: tcp }]
---
kind: Service
name: internal
ports: [{ port: 9080, protocol: tcp }]
---
kind: Endpoint
id: r1
service: reviews
address: 10.2.0.5:15443
identity: spiffe://mesh.local/ns/default/sa/reviews
---
kind: Endpoint
id: r2
service: reviews
address: 10.9.0.5:15443
identity: spiffe://mesh.local/ns/default/sa/reviews
gateway: 192.0.2.9:15444
---
kind: Endpoint
id: i1
service: internal
address: 10.2.0.6:15443
identity: spiffe://mesh.local/ns/default/sa/internal
";

    fn short_packet(sid: ServerId) -> Vec<u8> {
        let cid = quic_lb::LbConfig::default().connection_id(sid, [7; quic_lb::NONCE_LEN]);
        let mut p = vec![0x43];
        p.extend_from_slice(&cid);
        p.extend_from_slice(&[0x5a; 60]);
        p
    }

    #[test]
    fn only_direct_endpoints_of_exported_services_are_routed() {
        let table = Table::of(&snapshot(MESH));
        assert_eq!(table.len(), 1);
        let r1: SocketAddr = "10.2.0.5:15443".parse().unwrap();
        let caller: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        assert_eq!(
            decide(&table, caller, &short_packet(ServerId::of(r1))),
            Decision::Forward(r1)
        );
        for not_routed in ["10.2.0.6:15443", "10.9.0.5:15443", "10.2.0.5:15444"] {
            let sid = ServerId::of(not_routed.parse().unwrap());
            assert_eq!(
                decide(&table, caller, &short_packet(sid)),
                Decision::Drop(Dropped::NotExported),
                "{not_routed}"
            );
        }
    }

    #[test]
    fn answers_are_returned_only_from_routed_endpoints() {
        let table = Table::of(&snapshot(MESH));
        let r1: SocketAddr = "10.2.0.5:15443".parse().unwrap();
        let caller: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        let header = ProxyHeader {
            source: "192.0.2.9:15444".parse().unwrap(),
            destination: caller,
        };
        let mut wrapped = vec![0u8; proxy_v2::MAX_LEN];
        let len = proxy_v2::encode(&header, &mut wrapped).unwrap();
        wrapped.truncate(len);
        wrapped.extend_from_slice(&[0x43, 1, 2, 3]);
        assert_eq!(
            decide(&table, r1, &wrapped),
            Decision::Return {
                to: caller,
                offset: len
            }
        );
        // The same bytes from an internal endpoint, or from anyone else: not a reflector.
        for other in ["10.2.0.6:15443", "203.0.113.1:4000"] {
            assert_eq!(
                decide(&table, other.parse().unwrap(), &wrapped),
                Decision::Drop(Dropped::UnknownSource)
            );
        }
        wrapped[13] = 0x11;
        assert_eq!(
            decide(&table, r1, &wrapped),
            Decision::Drop(Dropped::Malformed)
        );
    }

    #[test]
    fn garbage_is_dropped_by_kind() {
        let table = Table::of(&snapshot(MESH));
        let caller: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        assert_eq!(
            decide(&table, caller, &[]),
            Decision::Drop(Dropped::Malformed)
        );
        assert_eq!(
            decide(&table, caller, &[0x00, 1, 2]),
            Decision::Drop(Dropped::Malformed)
        );
        // A short header without one of our connection IDs; an Initial that does not decrypt.
        assert_eq!(
            decide(&table, caller, &[0x43; 40]),
            Decision::Drop(Dropped::Unroutable)
        );
        let mut initial = vec![
            0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0,
        ];
        initial.resize(1200, 0x77);
        assert_eq!(
            decide(&table, caller, &initial),
            Decision::Drop(Dropped::Unroutable)
        );
    }

    #[test]
    fn one_address_under_two_ids_is_one_route() {
        let mut snap = snapshot(MESH);
        let r1 = snap.endpoints["reviews"]["r1"].clone();
        let mut twin = (*r1).clone();
        twin.id = "r1-twin".into();
        snap.endpoints
            .get_mut("reviews")
            .unwrap()
            .insert(twin.id.clone(), Arc::new(twin));
        let table = Table::of(&snap);
        assert_eq!(table.len(), 1);
        assert!(table.collisions.is_empty());
    }

    #[test]
    fn initials_past_a_sources_budget_are_dropped_and_others_go_on() {
        let mut budget = InitialBudget::default();
        let t0 = std::time::Instant::now();
        let flooder: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let taken = (0..1000).filter(|_| budget.take(flooder, t0)).count();
        assert_eq!(taken, INITIAL_BURST as usize);
        // Another address of the same IPv6 /64 shares a bucket; another source has its own.
        assert!(budget.take("203.0.113.1".parse().unwrap(), t0));
        let v6a: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: std::net::IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!((0..300).filter(|_| budget.take(v6a, t0)).count(), 256);
        assert!(!budget.take(v6b, t0));
        // A second later the flooder has its rate again.
        let later = t0 + Duration::from_secs(1);
        let again = (0..1000).filter(|_| budget.take(flooder, later)).count();
        assert_eq!(again, INITIAL_RATE as usize);
        // The decision: rate limited before any decryption, counted as such.
        let table = Table::of(&snapshot(MESH));
        let mut initial = vec![
            0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xd0,
        ];
        initial.resize(1200, 0x77);
        let from = SocketAddr::new(flooder, 4433);
        assert_eq!(
            decide_within(&table, from, &initial, &mut |_| false),
            Decision::Drop(Dropped::RateLimited)
        );
    }

    #[test]
    fn a_full_table_of_sources_is_swept_of_full_buckets() {
        let mut budget = InitialBudget::default();
        let t0 = std::time::Instant::now();
        for i in 0..MAX_INITIAL_SOURCES {
            let ip = std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            assert!(budget.take(ip, t0));
        }
        let newcomer: std::net::IpAddr = "192.0.2.200".parse().unwrap();
        // Every bucket spent one token: none is full, no room.
        assert!(!budget.take(newcomer, t0));
        // Two seconds later they are full again and are swept: room for the newcomer.
        assert!(budget.take(newcomer, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn configs_are_checked_and_named() {
        let path = Path::new("/etc/halyard/gateway.toml");
        let ok = GatewayConfig::parse("registry = \"file:///var/lib/halyard\"\n", path).unwrap();
        assert_eq!(ok.listen, default_listen());
        assert_eq!(ok.mesh, "default");
        for (text, field) in [
            ("registry = \"ftp://x\"\n", "registry"),
            ("registry = \"file:///r\"\nudp_buffer = 10\n", "udp_buffer"),
            ("registry = \"file:///r\"\nlisten = \"nowhere\"\n", "listen"),
            ("registry = \"file:///r\"\nsurprise = 1\n", "surprise"),
        ] {
            let err = GatewayConfig::parse(text, path).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("gateway.toml"), "{err}");
        }
        let err = GatewayConfig::parse("listen = \"0.0.0.0:1\"\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("registry"), "{err}");
    }

    /// A real QUIC client's first Initials (quinn-proto, in memory) whose ClientHello is made
    /// larger than one packet by 48 ALPN names, addressed to `name`.
    fn split_hello(name: &str) -> Vec<Vec<u8>> {
        use quinn_proto as qp;
        let crypto = crate::test_util::large_hello_client_config();
        let crypto = qp::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
        let config = qp::ClientConfig::new(Arc::new(crypto));
        let mut endpoint =
            qp::Endpoint::new(Arc::new(qp::EndpointConfig::default()), None, false, None);
        let now = std::time::Instant::now();
        let server: SocketAddr = "192.0.2.9:15444".parse().unwrap();
        let (_, mut conn) = endpoint.connect(now, config, server, name).unwrap();
        let mut datagrams = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            datagrams.push(buf[..t.size].to_vec());
            buf.clear();
        }
        datagrams
    }

    /// A ClientHello over two Initials: the first is held, the second completes it and both go
    /// to the endpoint its server name names, in order; a duplicate of the first alone stays
    /// held; bounds drop what they must and count it.
    #[test]
    fn a_client_hello_over_two_initials_is_held_then_routed() {
        let table = Table::of(&snapshot(MESH));
        let r1: SocketAddr = "10.2.0.5:15443".parse().unwrap();
        let name = format!(
            "{}{}",
            ServerId::of(r1).to_hex(),
            halyard_transport::GATEWAY_NAME_SUFFIX
        );
        let datagrams = split_hello(&name);
        assert!(datagrams.len() >= 2, "{} datagrams", datagrams.len());
        let caller: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        for d in &datagrams {
            assert_eq!(decide(&table, caller, d), Decision::Incomplete);
        }
        let now = std::time::Instant::now();
        let mut hellos = HelloAssembler::default();
        assert_eq!(hellos.offer(caller, &datagrams[0], now), Offer::Held);
        assert_eq!(
            hellos.offer(caller, &datagrams[0], now),
            Offer::Held,
            "a resent first"
        );
        match hellos.offer(caller, &datagrams[1], now) {
            Offer::Complete {
                name: got,
                datagrams: held,
            } => {
                assert_eq!(got.as_deref(), Some(name.as_str()));
                assert_eq!(
                    held,
                    [
                        datagrams[0].clone(),
                        datagrams[0].clone(),
                        datagrams[1].clone()
                    ]
                );
                assert_eq!(route_by_name(&table, got.as_deref()), Decision::Forward(r1));
            }
            other => panic!("{other:?}"),
        }
        assert!(hellos.is_empty());

        // Held Initials expire; a source may hold only so many connections.
        assert_eq!(hellos.offer(caller, &datagrams[0], now), Offer::Held);
        let later = now + HELLO_HOLD;
        assert_eq!(hellos.offer(caller, &datagrams[0], later), Offer::Held);
        assert_eq!(hellos.len(), 1, "the expired entry went");
        let mut full = HelloAssembler::default();
        for i in 0..MAX_HELD_HELLOS_PER_SOURCE {
            let d = split_hello(&name);
            let from = SocketAddr::new(caller.ip(), 40000 + i as u16);
            assert_eq!(full.offer(from, &d[0], now), Offer::Held);
        }
        let d = split_hello(&name);
        assert_eq!(
            full.offer(SocketAddr::new(caller.ip(), 39999), &d[0], now),
            Offer::Drop(Dropped::HelloLimit)
        );
        let elsewhere: SocketAddr = "203.0.113.5:4433".parse().unwrap();
        assert_eq!(full.offer(elsewhere, &d[0], now), Offer::Held);
        // Too many datagrams for one connection.
        let mut one = HelloAssembler::default();
        for _ in 0..MAX_HELD_DATAGRAMS {
            assert_eq!(one.offer(caller, &datagrams[0], now), Offer::Held);
        }
        assert_eq!(
            one.offer(caller, &datagrams[0], now),
            Offer::Drop(Dropped::HelloLimit)
        );
        assert!(one.is_empty());
        // Garbage offered is dropped, not held.
        assert_eq!(
            HelloAssembler::default().offer(caller, &[0xc3; 40], now),
            Offer::Drop(Dropped::Malformed)
        );
        let mut undecryptable = datagrams[0].clone();
        let last = undecryptable.len() - 1;
        undecryptable[last] ^= 1;
        assert_eq!(
            HelloAssembler::default().offer(caller, &undecryptable, now),
            Offer::Drop(Dropped::Unroutable)
        );
    }

    /// `[[quic_lb]]`: every configuration's key read at load; ids distinct; at most 7.
    #[test]
    fn quic_lb_configurations_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(dir.path().join("k1"), "8f95f09245765f80256934e50c66207f\n").unwrap();
        let base = "registry = \"file:///r\"\n";
        let none = GatewayConfig::parse(base, &path).unwrap();
        let ids: Vec<u8> = none.lb.iter().map(|c| c.id()).collect();
        assert_eq!(ids, [0], "the sidecars' default");
        let two = GatewayConfig::parse(
            &format!(
                "{base}[[quic_lb]]\nconfig_id = 0\n[[quic_lb]]\nconfig_id = 1\nkey_file = \"k1\"\n"
            ),
            &path,
        )
        .unwrap();
        let held: Vec<(u8, bool)> = two.lb.iter().map(|c| (c.id(), c.encrypted())).collect();
        assert_eq!(held, [(0, false), (1, true)]);
        for (text, says) in [
            (
                "[[quic_lb]]\nconfig_id = 1\n[[quic_lb]]\nconfig_id = 1\n",
                "given twice",
            ),
            ("[[quic_lb]]\nconfig_id = 7\n", "quic_lb[0]"),
            (
                "[[quic_lb]]\nconfig_id = 0\n[[quic_lb]]\nconfig_id = 2\nkey_file = \"nope\"\n",
                "quic_lb[1]",
            ),
        ] {
            let err = GatewayConfig::parse(&format!("{base}{text}"), &path)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
