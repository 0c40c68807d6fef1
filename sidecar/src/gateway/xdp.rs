//! The gateway's forwarding path in the kernel (`[xdp]` in its config): the XDP program
//! `sidecar/bpf/gateway_xdp.c`, attached to the interfaces the config names, forwards the
//! short-header packets of established connections and their answers without a copy to user
//! space; everything else (Initials and Handshake packets, encrypted QUIC-LB connection IDs,
//! IPv6, endpoints on the gateway's own host, an unresolved next hop) reaches the user-space
//! relay as before. The program routes by the same table: this module writes the table's
//! routes and backends into the program's maps at every snapshot, and adds the program's
//! per-CPU counters to the gateway's metrics once a second.
//!
//! Requirements, from the kernel: native XDP on each interface (Linux ≥ 6.7 for the route
//! lookup's source address, `BPF_FIB_LOOKUP_SRC`); IPv4 forwarding on each interface
//! (`net.ipv4.conf.<name>.forwarding = 1`, which the route lookup insists on; checked at start;
//! a `DROP` policy on the FORWARD chain keeps the host from routing anything else, since XDP's
//! redirects do not pass through netfilter); and for a veth, the peer able to take
//! redirected frames (an XDP program attached to it, or GRO enabled:
//! `ethtool -K <peer> gro on`), since the kernel drops a frame redirected to a veth whose peer
//! has neither. Attaching native XDP to a veth turns off segmentation offload (GSO) on its
//! peer, so the program sees one datagram per frame.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::xdp::XdpMode;
use aya::programs::Xdp;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{GatewayMetrics, State, Table};

/// The program, compiled by `sidecar/build.rs` (clang, BPF target).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway_xdp.o"));

/// `[xdp]` in the gateway's config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// Interfaces to attach the program to (Linux names, at most 15 bytes): those callers'
    /// packets arrive on and those endpoints' answers arrive on, often the same one.
    pub interfaces: Vec<String>,
    /// Turn on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`, Linux 5.8+) while
    /// the gateway runs, so `halyard_gateway_xdp_run_seconds_total` counts the program's CPU
    /// time. They are host-wide: every BPF program on the host pays two clock reads per run.
    /// Off (the default), the metric counts only while something else has them on
    /// (`sysctl kernel.bpf_stats_enabled=1`).
    #[serde(default)]
    pub run_time_stats: bool,
}

impl XdpConfig {
    /// Checks the interface names (the kernel's rules for a name: 1 to 15 bytes, no `/`, no
    /// whitespace, not `.` or `..`), each named once.
    ///
    /// # Errors
    /// A message naming the offending entry.
    pub fn check(&self) -> Result<(), String> {
        if self.interfaces.is_empty() {
            return Err("interfaces is empty; name at least one interface".into());
        }
        for (i, name) in self.interfaces.iter().enumerate() {
            let bad = name.is_empty()
                || name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
            if bad {
                return Err(format!(
                    "interfaces[{i}] = {name:?} is not an interface name (1 to 15 bytes, no '/', ':' or whitespace)"
                ));
            }
            if self.interfaces[..i].contains(name) {
                return Err(format!("interfaces[{i}] = {name:?} is named twice"));
            }
        }
        Ok(())
    }
}

/// Counters of the program, by index in its `STATS` map.
const STAT_FORWARDED: usize = 0;
const STAT_FORWARDED_BYTES: usize = 1;
const STAT_RETURNED: usize = 2;
const STAT_RETURNED_BYTES: usize = 3;
const STAT_UNROUTED: usize = 4;
const STAT_COUNT: u32 = 5;

/// A route key: the first 7 octets of a connection ID (first octet, server ID) and a zero.
type RouteKey = [u8; 8];
/// An endpoint: IPv4 address and UDP port in network byte order, two zeros.
type Endpoint = [u8; 8];

fn endpoint(addr: SocketAddr) -> Option<Endpoint> {
    let IpAddr::V4(ip) = addr.ip() else {
        return None;
    };
    let mut e = [0u8; 8];
    e[..4].copy_from_slice(&ip.octets());
    e[4..6].copy_from_slice(&addr.port().to_be_bytes());
    Some(e)
}

/// The program's routes and backends for `table`: every IPv4 endpoint under every unencrypted
/// QUIC-LB configuration the gateway holds (encrypted connection IDs need AES, which the
/// program does not do; their packets go to user space).
pub(super) fn maps_of(table: &Table) -> (HashMap<RouteKey, Endpoint>, HashSet<Endpoint>) {
    let mut routes = HashMap::new();
    let mut backends = HashSet::new();
    for (sid, target) in &table.by_server {
        let Some(to) = endpoint(target.address) else {
            continue;
        };
        backends.insert(to);
        for config in table.lb.iter().filter(|c| !c.encrypted()) {
            let cid = config.connection_id(*sid, [0; halyard_transport::quic_lb::NONCE_LEN]);
            let mut key = [0u8; 8];
            key[..7].copy_from_slice(&cid[..7]);
            routes.insert(key, to);
        }
    }
    (routes, backends)
}

/// Fails unless `release` (`/proc/sys/kernel/osrelease`) is Linux 6.7 or later: the route
/// lookup's source address (`BPF_FIB_LOOKUP_SRC`) is refused by older kernels, and every
/// packet would silently take the user-space path.
fn check_kernel(release: &str) -> anyhow::Result<()> {
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < (6, 7) {
        anyhow::bail!(
            "xdp: needs Linux 6.7 or later (the route lookup's source address); this kernel is {:?}",
            release.trim()
        );
    }
    Ok(())
}

/// The index of interface `name` (`/sys/class/net/<name>/ifindex`).
fn interface_index(name: &str) -> anyhow::Result<u32> {
    let path = format!("/sys/class/net/{name}/ifindex");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| format!("xdp: no interface named {name:?} here ({path})"))
}

/// Fails unless interface `name` exists and forwards IPv4: the kernel's route lookup for XDP
/// (`bpf_fib_lookup`) answers nothing on an interface that does not, so every packet would
/// silently take the user-space path.
fn check_forwarding(name: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    let value = std::fs::read_to_string(&path)
        .with_context(|| format!("xdp: no IPv4 interface named {name:?} here ({path})"))?;
    if value.trim() != "1" {
        anyhow::bail!(
            "xdp: interface {name:?} does not forward IPv4 (net.ipv4.conf.{name}.forwarding = {}); the kernel's route lookup for XDP needs it: set it to 1 (and drop routed traffic with the FORWARD chain's policy, which XDP's forwarding does not pass through)",
            value.trim()
        );
    }
    Ok(())
}

/// The attached program and its maps. Dropping it detaches the program.
pub(super) struct XdpPath {
    /// Keeps the program loaded and attached.
    ebpf: aya::Ebpf,
    /// Keeps the kernel's run-time statistics on (`run_time_stats`).
    _stats_on: Option<std::os::fd::OwnedFd>,
    /// Program run time already added to the metrics.
    run_time_counted: Duration,
    routes: BpfHashMap<MapData, RouteKey, Endpoint>,
    backends: BpfHashMap<MapData, Endpoint, u8>,
    stats: PerCpuArray<MapData, u64>,
    /// What the maps hold.
    held_routes: HashMap<RouteKey, Endpoint>,
    held_backends: HashSet<Endpoint>,
    /// Counters already added to the metrics.
    counted: [u64; STAT_COUNT as usize],
}

impl XdpPath {
    /// Loads the program for a gateway whose socket is bound to `bound` and attaches it to
    /// every interface of `config` (native mode).
    ///
    /// # Errors
    /// The kernel's refusal, naming the step and the interface: no BPF permission
    /// (root, or `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_PERFMON`; `CAP_SYS_ADMIN` for
    /// `run_time_stats`), an unknown interface, a driver without
    /// native XDP, a program already attached there.
    pub(super) fn attach(config: &XdpConfig, bound: SocketAddr) -> anyhow::Result<XdpPath> {
        check_kernel(&std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default())?;
        let ip = match bound.ip() {
            IpAddr::V4(ip) => ip.octets(),
            IpAddr::V6(ip) if ip.is_unspecified() => [0; 4],
            IpAddr::V6(ip) => anyhow::bail!(
                "xdp: the kernel path forwards IPv4 only, and listen = {ip} takes IPv6 alone; listen on an IPv4 address, 0.0.0.0 or [::]"
            ),
        };
        let mut egress_indexes = Vec::new();
        for name in &config.interfaces {
            check_forwarding(name)?;
            egress_indexes.push(interface_index(name)?);
        }
        let mut ebpf = aya::Ebpf::load(PROGRAM)
            .context("xdp: cannot load the gateway's XDP program (BPF permission: root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")?;
        let mut settings: Array<MapData, [u8; 8]> = Array::try_from(
            ebpf.take_map("SETTINGS")
                .context("xdp: the program has no SETTINGS map")?,
        )?;
        let p = bound.port().to_be_bytes();
        settings.set(0, [p[0], p[1], 0, 0, ip[0], ip[1], ip[2], ip[3]], 0)?;
        let mut egress: BpfHashMap<MapData, u32, u8> = BpfHashMap::try_from(
            ebpf.take_map("EGRESS")
                .context("xdp: the program has no EGRESS map")?,
        )?;
        for index in &egress_indexes {
            egress.insert(index, 1, 0)?;
        }
        let routes = BpfHashMap::try_from(
            ebpf.take_map("ROUTES")
                .context("xdp: the program has no ROUTES map")?,
        )?;
        let backends = BpfHashMap::try_from(
            ebpf.take_map("BACKENDS")
                .context("xdp: the program has no BACKENDS map")?,
        )?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map("STATS")
                .context("xdp: the program has no STATS map")?,
        )?;
        let program: &mut Xdp = ebpf
            .program_mut("halyard_gateway")
            .context("xdp: the object has no halyard_gateway program")?
            .try_into()?;
        program
            .load()
            .context("xdp: the kernel refused the gateway's XDP program (without CAP_PERFMON its verifier refuses the packet-pointer arithmetic)")?;
        for name in &config.interfaces {
            program.attach(name, XdpMode::Driver).with_context(|| {
                format!("xdp: cannot attach to interface {name:?} in native mode (does it exist, does its driver support XDP, is another program attached?)")
            })?;
        }
        let stats_on = if config.run_time_stats {
            Some(aya::sys::enable_stats(aya::sys::Stats::RunTime).context(
                "xdp: cannot turn on BPF run-time statistics (run_time_stats needs CAP_SYS_ADMIN)",
            )?)
        } else {
            None
        };
        tracing::info!(interfaces = ?config.interfaces, %bound, "XDP forwarding attached");
        Ok(XdpPath {
            ebpf,
            _stats_on: stats_on,
            run_time_counted: Duration::ZERO,
            routes,
            backends,
            stats,
            held_routes: HashMap::new(),
            held_backends: HashSet::new(),
            counted: [0; STAT_COUNT as usize],
        })
    }

    /// Makes the maps hold `table`'s routes and backends: stale entries removed first (room
    /// for the new ones), then new and changed entries written; what the maps hold is tracked
    /// entry by entry, so a refused write is tried again at the next sync and nothing written
    /// is forgotten. Returns the number of routes.
    ///
    /// # Errors
    /// The first map update the kernel refused (the maps hold 65,536 entries each); the other
    /// updates are still made.
    pub(super) fn sync(&mut self, table: &Table) -> anyhow::Result<usize> {
        let (routes, backends) = maps_of(table);
        let mut first_error = None;
        let mut note = |e: aya::maps::MapError, what: &str| {
            if first_error.is_none() {
                first_error = Some(anyhow::Error::new(e).context(format!("xdp: {what} update")));
            }
        };
        let stale: Vec<RouteKey> = self
            .held_routes
            .keys()
            .filter(|k| !routes.contains_key(*k))
            .copied()
            .collect();
        for k in stale {
            match self.routes.remove(&k) {
                Ok(()) => {
                    self.held_routes.remove(&k);
                }
                Err(e) => note(e, "ROUTES"),
            }
        }
        let stale: Vec<Endpoint> = self.held_backends.difference(&backends).copied().collect();
        for b in stale {
            match self.backends.remove(&b) {
                Ok(()) => {
                    self.held_backends.remove(&b);
                }
                Err(e) => note(e, "BACKENDS"),
            }
        }
        for b in &backends {
            if !self.held_backends.contains(b) {
                match self.backends.insert(b, 1, 0) {
                    Ok(()) => {
                        self.held_backends.insert(*b);
                    }
                    Err(e) => note(e, "BACKENDS"),
                }
            }
        }
        for (k, v) in &routes {
            if self.held_routes.get(k) != Some(v) {
                match self.routes.insert(k, v, 0) {
                    Ok(()) => {
                        self.held_routes.insert(*k, *v);
                    }
                    Err(e) => note(e, "ROUTES"),
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.held_routes.len()),
        }
    }

    /// The program's counters, summed over CPUs: forwarded, forwarded bytes, returned,
    /// returned bytes, passed to user space for want of a usable next hop.
    fn totals(&self) -> [u64; STAT_COUNT as usize] {
        // A counter that cannot be read keeps its last value (not 0, which would count it
        // all again at the next read).
        let mut t = self.counted;
        for (i, slot) in t.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
            }
        }
        t
    }

    /// Adds what the program counted since the last call to `m`.
    fn count_into(&mut self, m: &GatewayMetrics) {
        let now = self.totals();
        let d = |i: usize| now[i].saturating_sub(self.counted[i]);
        m.forwarded.inc_by(d(STAT_FORWARDED));
        m.xdp_forwarded.inc_by(d(STAT_FORWARDED));
        m.bytes_forwarded.inc_by(d(STAT_FORWARDED_BYTES));
        m.returned.inc_by(d(STAT_RETURNED));
        m.xdp_returned.inc_by(d(STAT_RETURNED));
        m.bytes_returned.inc_by(d(STAT_RETURNED_BYTES));
        m.xdp_unrouted.inc_by(d(STAT_UNROUTED));
        self.counted = now;
        let run_time = self
            .ebpf
            .program("halyard_gateway")
            .and_then(|p| p.info().ok())
            .map(|info| info.run_time());
        if let Some(t) = run_time {
            m.xdp_run_seconds
                .inc_by(t.saturating_sub(self.run_time_counted).as_secs_f64());
            self.run_time_counted = self.run_time_counted.max(t);
        }
    }
}

/// Keeps `path`'s maps on the current table and its counters in the metrics until `stop`
/// (then detaches the program by dropping it).
pub(super) async fn run(
    mut path: XdpPath,
    mut tables: tokio::sync::watch::Receiver<Arc<Table>>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    let metrics = &state.metrics;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    loop {
        if dirty {
            let table = tables.borrow_and_update().clone();
            match path.sync(&table) {
                Ok(n) => metrics.xdp_routes.set(n as i64),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "XDP maps not updated; their packets keep the previous routes")
                }
            }
            dirty = false;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            r = tables.changed() => match r {
                Ok(()) => dirty = true,
                Err(_) => break,
            },
            _ = tick.tick() => path.count_into(metrics),
        }
    }
    path.count_into(metrics);
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_transport::quic_lb::{LbConfig, LbConfigs, LbKey, ServerId};

    #[test]
    fn routes_are_keyed_by_the_connection_ids_the_sidecars_issue() {
        let v4: SocketAddr = "10.1.2.3:15443".parse().unwrap();
        let v6: SocketAddr = "[fd00::3]:15443".parse().unwrap();
        let mut table = Table {
            lb: LbConfigs::new(vec![
                LbConfig::new(0, None).unwrap(),
                LbConfig::new(1, Some(&LbKey::new([7; 16]))).unwrap(),
                LbConfig::new(4, None).unwrap(),
            ])
            .unwrap(),
            ..Table::default()
        };
        for addr in [v4, v6] {
            let target = crate::gateway::Target {
                address: addr,
                service: "reviews".into(),
                id: addr.to_string(),
            };
            table.by_server.insert(ServerId::of(addr), target);
        }
        let (routes, backends) = maps_of(&table);
        assert_eq!(
            backends,
            HashSet::from([endpoint(v4).unwrap()]),
            "IPv6 is left to user space"
        );
        assert_eq!(endpoint(v4).unwrap(), [10, 1, 2, 3, 0x3c, 0x53, 0, 0]);
        // One route per unencrypted configuration, keyed as the program reads a packet: the
        // first 7 octets of its destination connection ID (any nonce).
        assert_eq!(routes.len(), 2);
        for config in table.lb.iter() {
            let nonce: [u8; 10] = rand::random();
            let cid = config.connection_id(ServerId::of(v4), nonce);
            let mut key = [0u8; 8];
            key[..7].copy_from_slice(&cid[..7]);
            assert_eq!(
                routes.get(&key).copied(),
                (!config.encrypted()).then(|| endpoint(v4).unwrap()),
                "config {}",
                config.id()
            );
        }
    }

    #[test]
    fn kernels_before_6_7_are_refused() {
        for ok in ["6.7.0", "6.18.44-fc-v1045", "7.0.1\n", "10.1"] {
            assert!(check_kernel(ok).is_ok(), "{ok}");
        }
        for old in ["6.6.12-amd64", "5.15.0", "", "garbage"] {
            let e = check_kernel(old).unwrap_err().to_string();
            assert!(e.contains("6.7"), "{old}: {e}");
        }
    }

    #[test]
    fn interface_names_are_checked() {
        let c = |names: &[&str]| XdpConfig {
            interfaces: names.iter().map(|s| s.to_string()).collect(),
            run_time_stats: false,
        };
        assert!(c(&["eth0", "veth-g1"]).check().is_ok());
        let e = c(&[]).check().unwrap_err();
        assert!(e.contains("empty"), "{e}");
        for bad in ["", "a/b", "sixteen-bytes-xx", "a b", "..", "a\0b", "eth0:1"] {
            let e = c(&["eth0", bad]).check().unwrap_err();
            assert!(e.contains("interfaces[1]"), "{bad:?}: {e}");
        }
        let e = c(&["eth0", "eth0"]).check().unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }
}
