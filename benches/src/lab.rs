//! The two-namespace lab of scenarios 1, 2 and 4: the client app and its proxy in namespace `a`,
//! the server apps and their proxy in namespace `b`, joined by a veth pair (MTU 1500) as across
//! two hosts. Every path runs at once, on its own ports:
//!
//! - direct: the app connects to `b:9000+t`;
//! - stunnel: two stunnel4 processes, TLS 1.3 mTLS, the mesh's certificates;
//! - h2-tunnel: two `halyard-benches h2-tunnel-*` processes (HTTP/2 CONNECT, one TCP connection);
//! - Halyard: two `halyard sidecar` processes on a directory registry, L4 (protocol tcp) and L7
//!   (protocol http) ports of the same Service.
//!
//! Server apps (namespace `b`, all addresses): 9000 sink (reads to EOF), 9001 echo, 9002 a small
//! HTTP/1.1 server (keep-alive, 100-byte body).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::netns::{in_ns, spawn_rt, wait_for, Pair, Proc};

/// What a flow talks to on the server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Sink = 0,
    Echo = 1,
    Http = 2,
}

/// One way from the client app to a server app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    Direct,
    Stunnel,
    H2Tunnel,
    HalyardL4,
    HalyardL7,
}

/// The paths named in `HALYARD_BENCH_ROUTES` (comma-separated `Route::name`s) among `all`, in
/// `all`'s order; `None` when unset (every path). An unknown name is refused with the valid ones.
pub fn routes_asked(all: &[Route]) -> anyhow::Result<Option<Vec<Route>>> {
    let Ok(names) = std::env::var("HALYARD_BENCH_ROUTES") else {
        return Ok(None);
    };
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    if let Some(bad) = names.iter().find(|n| !all.iter().any(|r| r.name() == **n)) {
        let valid: Vec<_> = all.iter().map(|r| r.name()).collect();
        anyhow::bail!(
            "HALYARD_BENCH_ROUTES: unknown path {bad:?}; valid: {}",
            valid.join(", ")
        );
    }
    Ok(Some(
        all.iter()
            .copied()
            .filter(|r| names.contains(&r.name()))
            .collect(),
    ))
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Stunnel => "stunnel",
            Route::H2Tunnel => "h2-tunnel",
            Route::HalyardL4 => "halyard-l4",
            Route::HalyardL7 => "halyard-l7",
        }
    }

    /// The L4 paths (every target); L7 serves only HTTP.
    pub const L4: [Route; 4] = [
        Route::Direct,
        Route::Stunnel,
        Route::H2Tunnel,
        Route::HalyardL4,
    ];
}

/// `max_concurrent_bidi_streams` of the lab's sidecars unless a scenario asks for more: the
/// product's default.
const DEFAULT_MAX_STREAMS: u64 = 1024;

/// HTTP response the server app sends: 100-byte body.
pub const HTTP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ncontent-type: text/plain\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789";

/// How the client sidecar reaches the server sidecar: directly, or through an east-west
/// gateway (its own registry names the server's endpoint with `gateway`, as a ClusterLink
/// would, so every packet crosses the gateway, as from another cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    Direct,
    /// Directly, with UDP segmentation offload off on the a–b veth pair: the sidecars send
    /// as they do into an XDP gateway on a veth (see `GatewayOwnNs`).
    DirectNoGso,
    /// `halyard gateway` in namespace b, beside the server.
    GatewayInB,
    /// `halyard gateway` in namespace g, joined to a and b by veth pairs of its own
    /// (10.78.<net>.0/24 and 10.79.<net>.0/24), with its `[xdp]` forwarding when `xdp`.
    GatewayOwnNs {
        xdp: bool,
    },
}

impl Reach {
    /// Whether the client reaches the server through a gateway.
    pub fn via_gateway(self) -> bool {
        !matches!(self, Reach::Direct | Reach::DirectNoGso)
    }

    pub fn name(self) -> &'static str {
        match self {
            Reach::Direct => "direct",
            Reach::DirectNoGso => "direct, no GSO",
            Reach::GatewayInB => "gateway in b",
            Reach::GatewayOwnNs { xdp: false } => "gateway, user space",
            Reach::GatewayOwnNs { xdp: true } => "gateway, XDP",
        }
    }
}

/// The gateway's own namespace: `g`, with `a_side` (10.78.<net>.2, facing a) and `b_side`
/// (10.79.<net>.1, facing b) interfaces; the sidecars' addresses (10.77.<net>.1 and .2)
/// routed through a and b.
pub struct GatewayNs {
    pub ns: crate::netns::Netns,
    pub a_side_ip: String,
    pub b_side_ip: String,
    pub interfaces: [String; 2],
}

impl GatewayNs {
    fn create(pair: &Pair) -> anyhow::Result<GatewayNs> {
        let prefix = pair.a.name.trim_end_matches("-a").to_owned();
        let net = pair.b_ip.split('.').nth(2).unwrap_or("0").to_owned();
        let ns = crate::netns::Netns::create(&format!("{prefix}-g"))?;
        let (ga, gb) = (format!("{prefix}ga"), format!("{prefix}gb"));
        let (ag, bg) = (format!("{prefix}ag"), format!("{prefix}bg"));
        let a_side_ip = format!("10.78.{net}.2");
        let b_side_ip = format!("10.79.{net}.1");
        for (peer_ns, peer, peer_ip, own, own_ip) in [
            (&pair.a, &ag, format!("10.78.{net}.1"), &ga, &a_side_ip),
            (&pair.b, &bg, format!("10.79.{net}.2"), &gb, &b_side_ip),
        ] {
            ns.exec(&[
                "ip", "link", "add", own, "type", "veth", "peer", "name", peer,
            ])?;
            ns.exec(&["ip", "link", "set", peer, "netns", &peer_ns.name])?;
            for (n, dev, ip) in [(&ns, own, own_ip), (peer_ns, peer, &peer_ip)] {
                n.exec(&["ip", "link", "set", dev, "mtu", "1500"])?;
                n.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev])?;
                n.exec(&["ip", "link", "set", dev, "up"])?;
            }
            // The peers take frames an XDP program redirects to them only with NAPI (GRO on).
            peer_ns.exec(&["ethtool", "-K", peer, "gro", "on"])?;
            // bpf_fib_lookup answers only on forwarding interfaces; nothing else is routed.
            ns.exec(&[
                "sh",
                "-c",
                &format!("echo 1 > /proc/sys/net/ipv4/conf/{own}/forwarding"),
            ])?;
        }
        ns.exec(&["iptables", "-P", "FORWARD", "DROP"])?;
        // The sidecars' QUIC sockets are bound to their a–b addresses: g reaches each of them
        // through its own veth.
        for (ip, via) in [
            (&pair.b_ip, format!("10.79.{net}.2")),
            (&pair.a_ip, format!("10.78.{net}.1")),
        ] {
            ns.exec(&["ip", "route", "add", &format!("{ip}/32"), "via", &via])?;
        }
        Ok(GatewayNs {
            ns,
            a_side_ip,
            b_side_ip,
            interfaces: [ga, gb],
        })
    }
}

pub struct Lab {
    pub pair: Pair,
    pub dir: tempfile::TempDir,
    pub halyard: PathBuf,
    procs: Vec<(Route, Proc)>,
    /// `[transport] congestion` of both Halyard sidecars.
    congestion: String,
    /// `workers` of both Halyard sidecars.
    workers: usize,
    /// `[transport] max_concurrent_bidi_streams` of both Halyard sidecars: the product's
    /// default, except where a scenario holds more flows on one connection (scale).
    max_streams: u64,
    /// How the client sidecar reaches the server sidecar.
    reach: Reach,
    /// Namespace `g` between `a` and `b`, made on first use ([`Reach::GatewayOwnNs`]).
    gateway_ns: Option<GatewayNs>,
    stop: CancellationToken,
    _apps: std::thread::JoinHandle<()>,
}

impl Lab {
    /// Namespaces, certificates, registry, server apps and every proxy, ready to serve.
    pub fn up(prefix: &str, net: u8) -> anyhow::Result<Lab> {
        crate::setup::check_stunnel()?;
        Lab::up_on(Pair::veth(prefix, net)?)
    }

    /// [`Lab::up`] with sidecars allowing `max_streams` requests in progress per connection
    /// (quinn sets up a slot per stream the peer may open when a connection starts, so a large
    /// limit makes every handshake slower: only scenarios that need it raise it).
    pub fn up_with_streams(prefix: &str, net: u8, max_streams: u64) -> anyhow::Result<Lab> {
        crate::setup::check_stunnel()?;
        Lab::up_on_with(Pair::veth(prefix, net)?, max_streams)
    }

    /// [`Lab::up`] on namespaces the caller has already joined.
    pub fn up_on(pair: Pair) -> anyhow::Result<Lab> {
        Lab::up_on_with(pair, DEFAULT_MAX_STREAMS)
    }

    fn up_on_with(pair: Pair, max_streams: u64) -> anyhow::Result<Lab> {
        let halyard = halyard_bin()?;
        crate::setup::check_stunnel()?;
        let mut dir = tempfile::tempdir()?;
        if std::env::var_os("HALYARD_BENCH_LOG").is_some() {
            // Logs asked for are kept for reading after the run.
            dir.disable_cleanup(true);
            eprintln!("bench: lab files and logs kept in {}", dir.path().display());
        }
        issue_identities(&halyard, dir.path())?;
        let stop = CancellationToken::new();
        let apps = start_apps(&pair.b.name, stop.clone());
        let mut lab = Lab {
            pair,
            dir,
            halyard,
            procs: Vec::new(),
            // The product's default unless a run asks for another (HALYARD_BENCH_CONGESTION);
            // the scenarios that compare both restart the sidecars with each.
            congestion: std::env::var("HALYARD_BENCH_CONGESTION").unwrap_or_else(|_| {
                halyard_transport::congestion::Congestion::default()
                    .as_str()
                    .to_owned()
            }),
            workers: 1,
            max_streams,
            reach: Reach::Direct,
            gateway_ns: None,
            stop,
            _apps: apps,
        };
        lab.start_halyard()?;
        lab.start_stunnel()?;
        lab.start_h2()?;
        lab.wait_ready()?;
        Ok(lab)
    }

    /// Where the client app (in namespace `a`) connects for `route` to reach `target`.
    pub fn addr(&self, route: Route, target: Target) -> SocketAddr {
        let t = target as u16;
        let local = |base: u16| SocketAddr::from(([127, 0, 0, 1], base + t));
        match route {
            Route::Direct => SocketAddr::new(self.b_ip(), 9000 + t),
            Route::Stunnel => local(19100),
            Route::H2Tunnel => local(19200),
            Route::HalyardL4 => local(19300),
            Route::HalyardL7 => SocketAddr::from(([127, 0, 0, 1], 19303)),
        }
    }

    fn b_ip(&self) -> std::net::IpAddr {
        self.pair
            .b_ip
            .parse()
            .unwrap_or(std::net::IpAddr::from([10, 77, 0, 2]))
    }

    /// Pids of the two proxy processes of `route` (none for direct).
    pub fn pids(&self, route: Route) -> Vec<u32> {
        let route = if route == Route::HalyardL7 {
            Route::HalyardL4
        } else {
            route
        };
        self.procs
            .iter()
            .filter(|(r, _)| *r == route)
            .map(|(_, p)| p.pid())
            .collect()
    }

    fn id_dir(&self, who: &str) -> PathBuf {
        self.dir.path().join("id").join(who)
    }

    fn log(&self, name: &str) -> anyhow::Result<Stdio> {
        Ok(std::fs::File::create(self.dir.path().join(format!("{name}.log")))?.into())
    }

    fn spawn(
        &mut self,
        route: Route,
        ns_b: bool,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let ns = if ns_b { &self.pair.b } else { &self.pair.a };
        let ns = ns.name.clone();
        self.spawn_in(route, &ns, name, program, args)
    }

    /// [`Lab::spawn`] in the namespace named `ns`.
    fn spawn_in(
        &mut self,
        route: Route,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd.args(args)
            .env("HALYARD_LOG", sidecar_log_filter())
            .stdout(self.log(name)?)
            .stderr(self.log(&format!("{name}.err"))?);
        self.procs.push((route, Proc::spawn(name, cmd)?));
        Ok(())
    }

    fn start_halyard(&mut self) -> anyhow::Result<()> {
        let reg = self.dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default"))?;
        apply(&self.halyard, &reg, REGISTRY_OBJECTS)?;
        self.spawn_sidecars()
    }

    /// Restarts both Halyard sidecars with `[transport] congestion = congestion` and waits
    /// until every path answers again.
    pub fn restart_halyard(&mut self, congestion: &str) -> anyhow::Result<()> {
        self.restart_halyard_with(congestion, self.workers)
    }

    /// [`Lab::restart_halyard`], also setting the sidecars' `workers`.
    pub fn restart_halyard_with(&mut self, congestion: &str, workers: usize) -> anyhow::Result<()> {
        self.procs.retain(|(route, _)| *route != Route::HalyardL4);
        self.congestion = congestion.to_owned();
        self.workers = workers;
        self.spawn_sidecars()?;
        self.wait_ready()
    }

    /// Restarts the Halyard sidecars (and the gateway) with the client reaching the server as
    /// `reach` says, and waits until every path answers again.
    pub fn restart_halyard_reaching(&mut self, reach: Reach) -> anyhow::Result<()> {
        self.procs.retain(|(route, _)| *route != Route::HalyardL4);
        self.reach = reach;
        let prefix = self.pair.a.name.trim_end_matches("-a").to_owned();
        let gso = if reach == Reach::DirectNoGso {
            "off"
        } else {
            "on"
        };
        for (ns, dev) in [(&self.pair.a, "va"), (&self.pair.b, "vb")] {
            let dev = format!("{prefix}{dev}");
            ns.exec(&["ethtool", "-K", &dev, "tx-udp-segmentation", gso])?;
        }
        let gateway_ns = match reach {
            Reach::Direct | Reach::DirectNoGso => None,
            Reach::GatewayInB => Some(self.pair.b.name.clone()),
            Reach::GatewayOwnNs { .. } => {
                if self.gateway_ns.is_none() {
                    self.gateway_ns = Some(GatewayNs::create(&self.pair)?);
                }
                self.gateway_ns.as_ref().map(|g| g.ns.name.clone())
            }
        };
        if let Some(ns) = gateway_ns {
            // In g the gateway listens on every address: it answers callers from the a side
            // and reaches the server from the b side.
            let (dial, listen, xdp) = match (reach, &self.gateway_ns) {
                (Reach::GatewayOwnNs { xdp }, Some(g)) => (
                    g.a_side_ip.clone(),
                    "0.0.0.0".to_owned(),
                    xdp.then(|| g.interfaces.clone()),
                ),
                _ => (self.pair.b_ip.clone(), self.pair.b_ip.clone(), None),
            };
            let reg = self.dir.path().join("registry-a");
            std::fs::create_dir_all(reg.join("default"))?;
            let endpoint = format!(
                "---\nkind: Endpoint\nid: server-b\nservice: server\naddress: \"{b}:15443\"\n\
                 identity: spiffe://mesh.local/ns/default/sa/server\ncluster: b\ngateway: \"{dial}:15444\"\n",
                b = self.pair.b_ip
            );
            apply(
                &self.halyard,
                &reg,
                &format!("{REGISTRY_OBJECTS}{endpoint}"),
            )?;
            let gw = self.dir.path().join("gateway.toml");
            let mut config = format!(
                "registry = \"file://{}\"\nlisten = \"{listen}:15444\"\nadmin = \"127.0.0.1:15020\"\n",
                self.dir.path().join("registry").display(),
            );
            if let Some([ga, gb]) = xdp {
                config +=
                    &format!("[xdp]\ninterfaces = [\"{ga}\", \"{gb}\"]\nrun_time_stats = true\n");
            }
            std::fs::write(&gw, config)?;
            let halyard = self.halyard.clone();
            let args = [
                "gateway".into(),
                "--config".into(),
                gw.display().to_string(),
            ];
            self.spawn_in(Route::HalyardL4, &ns, "gateway", &halyard, &args)?;
        }
        self.spawn_sidecars()?;
        self.wait_ready()
    }

    /// The pid of the process named `name` (`sidecar-client`, `sidecar-server`, `gateway`, ...).
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(_, p)| p.name == name)
            .map(|(_, p)| p.pid())
    }

    /// The `workers` setting the Halyard sidecars run with.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The congestion controller the Halyard sidecars run.
    pub fn congestion(&self) -> &str {
        &self.congestion
    }

    fn spawn_sidecars(&mut self) -> anyhow::Result<()> {
        for (who, ns_b) in [("client", false), ("server", true)] {
            let path = self.dir.path().join(format!("{who}.toml"));
            std::fs::write(&path, self.sidecar_config(who, ns_b))?;
            let halyard = self.halyard.clone();
            let args = [
                "sidecar".into(),
                "--config".into(),
                path.display().to_string(),
            ];
            self.spawn(
                Route::HalyardL4,
                ns_b,
                &format!("sidecar-{who}"),
                &halyard,
                &args,
            )?;
        }
        Ok(())
    }

    /// Restarts the client-side proxy of `route` (sidecar or h2-tunnel client) without sending
    /// a flow through it, so its next flow finds no peer connection (a cold start).
    pub fn restart_cold(&mut self, route: Route) -> anyhow::Result<()> {
        let name = match route {
            Route::HalyardL4 | Route::HalyardL7 => "sidecar-client",
            Route::H2Tunnel => "h2-client",
            Route::Direct | Route::Stunnel => return Ok(()),
        };
        let i = self
            .procs
            .iter()
            .position(|(_, p)| p.name == name)
            .context("no such process")?;
        drop(self.procs.remove(i));
        if route == Route::H2Tunnel {
            self.spawn_h2_client()?;
            // A probe would open the peer connection: give the listener time to bind instead.
            std::thread::sleep(Duration::from_millis(200));
        } else {
            let path = self.dir.path().join("client.toml");
            let args = [
                "sidecar".into(),
                "--config".into(),
                path.display().to_string(),
            ];
            let halyard = self.halyard.clone();
            self.spawn(Route::HalyardL4, false, name, &halyard, &args)?;
            let ns = self.pair.a.name.clone();
            wait_for("sidecar /readyz", Duration::from_secs(20), || {
                http_get(&ns, "127.0.0.1:15000", "/readyz").is_ok_and(|r| r.contains(" 200 "))
            })?;
        }
        for (_, p) in &mut self.procs {
            p.check_alive()?;
        }
        Ok(())
    }

    fn sidecar_config(&self, who: &str, ns_b: bool) -> String {
        let id = self.id_dir(who);
        let ip = if ns_b {
            &self.pair.b_ip
        } else {
            &self.pair.a_ip
        };
        let mut t = format!(
            "mesh = \"default\"\nregistry = \"file://{reg}\"\nstate_dir = \"{state}\"\nid = \"{who}\"\nworkers = {workers}\n\
             [identity]\ncert = \"{id}/cert.pem\"\nkey = \"{id}/key.pem\"\nbundle = \"{id}/bundle.pem\"\n\
             [service]\nname = \"{who}\"\nversion = \"v1\"\n\
             [inbound]\nlisten = \"{ip}:15443\"\napp_host = \"127.0.0.1\"\n",
            reg = self
                .dir
                .path()
                .join(if self.reach.via_gateway() && !ns_b {
                    "registry-a"
                } else {
                    "registry"
                })
                .display(),
            state = self.dir.path().join(format!("state-{who}")).display(),
            id = id.display(),
            workers = self.workers,
        );
        if !ns_b {
            for (port, listen) in [(9000, 19300), (9001, 19301), (9002, 19302), (9003, 19303)] {
                t += &format!(
                    "[[outbound.upstreams]]\nservice = \"server\"\nport = {port}\nlisten = \"127.0.0.1:{listen}\"\n"
                );
            }
        }
        t += "[admin]\nlisten = \"127.0.0.1:15000\"\n[failure]\nconnect_timeout = \"2s\"\ndrain_timeout = \"1s\"\n";
        // The scale scenario holds 10,000 flows on one listener; the default cap shares half the
        // fd limit among the four upstream listeners.
        t += "[limits]\nmax_connections_per_listener = 15000\n";
        t += &format!(
            "[transport]\nmax_concurrent_bidi_streams = {}\ncongestion = \"{}\"\n",
            self.max_streams, self.congestion
        );
        // `[transport] initial_mtu` of both sidecars when a run asks for one (the product's
        // default otherwise).
        if let Ok(mtu) = std::env::var("HALYARD_BENCH_INITIAL_MTU") {
            t += &format!("initial_mtu = {}\n", mtu.trim());
        }
        if ns_b {
            // The east-west gateway of `restart_halyard_reaching` runs beside it or in g.
            t += &format!("proxy_protocol_from = [\"{}\"", self.pair.b_ip);
            if let Some(g) = &self.gateway_ns {
                t += &format!(", \"{}\"", g.b_side_ip);
            }
            t += "]\n";
        }
        t
    }

    fn start_stunnel(&mut self) -> anyhow::Result<()> {
        for (who, ns_b) in [("client", false), ("server", true)] {
            let path = self.dir.path().join(format!("stunnel-{who}.conf"));
            std::fs::write(&path, self.stunnel_config(who, ns_b))?;
            let bin = PathBuf::from(crate::setup::stunnel_bin());
            self.spawn(
                Route::Stunnel,
                ns_b,
                &format!("stunnel-{who}"),
                &bin,
                &[path.display().to_string()],
            )?;
        }
        Ok(())
    }

    fn stunnel_config(&self, who: &str, ns_b: bool) -> String {
        let id = self.id_dir(who);
        let mut t = format!(
            "foreground = yes\npid =\ndebug = 3\nsyslog = no\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
             cert = {id}/cert.pem\nkey = {id}/key.pem\nCAfile = {id}/bundle.pem\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\n",
            id = id.display()
        );
        for t_ in 0..3u16 {
            t += &format!("[s{t_}]\n");
            if ns_b {
                t += &format!(
                    "accept = {}:{}\nconnect = 127.0.0.1:{}\n",
                    self.pair.b_ip,
                    19400 + t_,
                    9000 + t_
                );
            } else {
                t += &format!(
                    "client = yes\naccept = 127.0.0.1:{}\nconnect = {}:{}\n",
                    19100 + t_,
                    self.pair.b_ip,
                    19400 + t_
                );
            }
        }
        t
    }

    fn start_h2(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let args = [
            "h2-tunnel-server".into(),
            format!("{}:19500", self.pair.b_ip),
            self.id_dir("server").display().to_string(),
        ];
        self.spawn(Route::H2Tunnel, true, "h2-server", &exe, &args)?;
        self.spawn_h2_client()
    }

    fn spawn_h2_client(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let mut args = vec![
            "h2-tunnel-client".into(),
            format!("{}:19500", self.pair.b_ip),
            self.id_dir("client").display().to_string(),
        ];
        for t in 0..3u16 {
            args.push(format!("127.0.0.1:{}=127.0.0.1:{}", 19200 + t, 9000 + t));
        }
        self.spawn(Route::H2Tunnel, false, "h2-client", &exe, &args)
    }

    /// Waits until every proxy accepts connections and both sidecars are ready and know the
    /// server's endpoint.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        for (_, p) in &mut self.procs {
            p.check_alive()?;
        }
        let a = self.pair.a.name.clone();
        let b = self.pair.b.name.clone();
        for ns in [&a, &b] {
            let ns2 = ns.clone();
            wait_for("sidecar /readyz", Duration::from_secs(20), || {
                http_get(&ns2, "127.0.0.1:15000", "/readyz").is_ok_and(|r| r.contains(" 200 "))
            })?;
        }
        for route in [Route::Stunnel, Route::H2Tunnel, Route::HalyardL4] {
            let addr = self.addr(route, Target::Echo);
            wait_for(route.name(), Duration::from_secs(20), || {
                echo_once(&a, addr).is_ok()
            })
            .with_context(|| {
                format!(
                    "{route:?} never echoed; logs in {}",
                    self.dir.path().display()
                )
            })?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.cancel();
        self.procs.clear();
    }
}

/// The `HALYARD_LOG` filter of the lab's Halyard processes: `HALYARD_BENCH_LOG` (e.g.
/// `debug,quinn_proto=trace`, which also keeps the lab's directory and its `*.err` logs), else
/// `warn`.
fn sidecar_log_filter() -> String {
    std::env::var("HALYARD_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned())
}

const REGISTRY_OBJECTS: &str = "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: mesh.local\n---\n\
kind: Service\nname: server\nexported: true\nports:\n  - { name: sink, port: 9000, protocol: tcp, targetPort: 9000 }\n  \
- { name: echo, port: 9001, protocol: tcp, targetPort: 9001 }\n  - { name: http4, port: 9002, protocol: tcp, targetPort: 9002 }\n  \
- { name: http7, port: 9003, protocol: http, targetPort: 9002 }\n---\n\
kind: Service\nname: client\nports:\n  - { name: tcp, port: 9999, protocol: tcp, targetPort: 9999 }\n";

/// `halyard ctl --registry file://REG apply -f -` with `objects`.
pub fn apply(halyard: &Path, reg: &Path, objects: &str) -> anyhow::Result<()> {
    apply_url(halyard, &format!("file://{}", reg.display()), objects)
}

/// `halyard ctl --registry URL apply -f -` with `objects`.
pub fn apply_url(halyard: &Path, url: &str, objects: &str) -> anyhow::Result<()> {
    let mut child = Command::new(halyard)
        .args(["ctl", "--registry", url, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(objects.as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "halyard ctl apply failed: {status}");
    Ok(())
}

/// The release `halyard` binary next to this one (`cargo build --release --bin halyard`).
pub fn halyard_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("halyard");
    if !path.exists() {
        bail!(
            "{} missing: run `cargo build --release --bin halyard` first",
            path.display()
        );
    }
    Ok(path)
}

/// A CA and identities `client` and `server` under DIR/id/, issued by `halyard ca`.
pub fn issue_identities(halyard: &Path, dir: &Path) -> anyhow::Result<()> {
    let ca = dir.join("ca");
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(halyard).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "halyard {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ca_s = ca.display().to_string();
    run(&[
        "ca",
        "init",
        "--dir",
        &ca_s,
        "--trust-domain",
        "mesh.local",
        "--force",
    ])?;
    for who in ["client", "server"] {
        let out = dir.join("id").join(who).display().to_string();
        let id = format!("spiffe://mesh.local/ns/default/sa/{who}");
        run(&["ca", "issue", "--dir", &ca_s, "--id", &id, "--out", &out])?;
    }
    Ok(())
}

fn start_apps(ns: &str, stop: CancellationToken) -> std::thread::JoinHandle<()> {
    spawn_rt(ns, move || async move {
        let serve = async {
            let sink = TcpListener::bind("0.0.0.0:9000").await?;
            let echo = TcpListener::bind("0.0.0.0:9001").await?;
            let http = TcpListener::bind("0.0.0.0:9002").await?;
            tokio::try_join!(
                accept(sink, sink_conn),
                accept(echo, echo_conn),
                accept(http, http_conn)
            )?;
            anyhow::Ok(())
        };
        tokio::select! {
            r = serve => if let Err(e) = r { eprintln!("bench: server apps: {e:#}") },
            () = stop.cancelled() => {}
        }
    })
}

async fn accept<F, Fut>(l: TcpListener, f: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(f(s));
            }
            // Out of file descriptors, say: the app keeps serving the connections it has.
            Err(e) => {
                eprintln!("bench: server app accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sink_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            // The byte count goes back, so the sender knows what arrived.
            return s.write_all(&total.to_be_bytes()).await;
        }
        total += n as u64;
    }
}

async fn echo_conn(mut s: TcpStream) -> std::io::Result<()> {
    // Small: the scale scenario holds 10,000 of these.
    let mut buf = vec![0u8; 8 << 10];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// Answers every request (read up to the blank line; requests carry no body) with HTTP_RESPONSE.
async fn http_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.drain(..end + 4);
            s.write_all(HTTP_RESPONSE).await?;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One blocking echo round trip from namespace `ns`.
fn echo_once(ns: &str, addr: SocketAddr) -> anyhow::Result<()> {
    in_ns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    })
}

/// A blocking HTTP/1.0 GET from namespace `ns`; the whole response.
pub fn http_get(ns: &str, addr: &str, path: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = addr.parse()?;
    let path = path.to_owned();
    in_ns(ns, move || http_get_local(addr, &path))
}

/// A blocking HTTP/1.0 GET from this thread's namespace; the whole response.
pub fn http_get_local(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
