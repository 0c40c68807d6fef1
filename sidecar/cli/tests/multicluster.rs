//! Two clusters as two network namespaces joined by a veth pair, each with its own etcd, every
//! part a real process (`halyard sidecar`, `halyard gateway`, `halyard sample-app`, `halyard
//! ctl`, `etcd`): a caller in A reaches a service that exists only in B through B's east-west
//! gateway, having learned it through a ClusterLink to B's etcd. Root only (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_run, NetNs};
use halyard_certs::{MeshCa, SpiffeId, TrustDomain};
use halyard_registry::test_util::EtcdServer;

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `halyard ARGS` inside `ns`, its output in `dir/<name>.log`.
fn halyard_in(ns: &NetNs, dir: &Path, name: &str, args: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_halyard")])
        .args(args)
        .env("HALYARD_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Proc(child)
}

/// etcd serving clients on `ip` inside `ns` (started from a thread that entered it).
fn etcd_in(ns: &NetNs, ip: IpAddr) -> EtcdServer {
    let name = ns.0.clone();
    std::thread::spawn(move || {
        NetNs(name).enter_and_forget();
        EtcdServer::start_on(ip)
    })
    .join()
    .unwrap()
}

/// `halyard ctl --registry URL apply -f FILE` inside `ns`.
fn apply_in(ns: &NetNs, url: &str, file: &Path, yaml: &str) {
    std::fs::write(file, yaml).unwrap();
    ns.exec(&[
        env!("CARGO_BIN_EXE_halyard"),
        "ctl",
        "--registry",
        url,
        "apply",
        "-f",
        file.to_str().unwrap(),
    ]);
}

/// Writes cert.pem, key.pem and bundle.pem for `account` under `dir/<account>`.
fn identity(ca: &MeshCa, dir: &Path, account: &str) -> std::path::PathBuf {
    let out = dir.join(format!("id-{account}"));
    let id = SpiffeId::workload(ca.trust_domain(), "default", account).unwrap();
    let leaf = ca.issue(&id, Duration::from_secs(3600)).unwrap();
    halyard_certs::ca::write_identity(&out, &leaf, ca.cert_pem()).unwrap();
    out
}

/// `curl` inside `ns`; the body on success.
fn curl_in(ns: &NetNs, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "curl",
            "-sf",
            "--max-time",
            "3",
            url,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Cluster B's side: the exported reviews Service in `registry`, its sample app and its sidecar
/// on `ip_b:15443`, taking PROXY-wrapped datagrams from `gateway_from`. Both processes.
fn reviews_in_b(
    (b, d, ca): (&NetNs, &Path, &MeshCa),
    registry: &str,
    ip_b: &str,
    gateway_from: &str,
) -> (Proc, Proc) {
    apply_in(
        b,
        registry,
        &d.join("b.yaml"),
        "kind: Service\nname: reviews\nexported: true\nports:\n  - { name: http, port: 9082, protocol: http, targetPort: 19082 }\n",
    );
    let app = halyard_in(
        b,
        d,
        "reviews-app",
        &[
            "sample-app",
            "--service",
            "reviews",
            "--version",
            "v9",
            "--listen",
            "127.0.0.1:19082",
        ],
    );
    let id_b = identity(ca, d, "reviews");
    let reviews_toml = d.join("reviews.toml");
    std::fs::write(
        &reviews_toml,
        format!(
            "registry = \"{registry}\"\nstate_dir = {:?}\n[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\
             [service]\nname = \"reviews\"\nversion = \"v9\"\ncluster = \"b\"\n\
             [inbound]\nlisten = \"{ip_b}:15443\"\napp_host = \"127.0.0.1\"\n\
             [admin]\nlisten = \"127.0.0.1:15000\"\n\
             [transport]\nproxy_protocol_from = [\"{gateway_from}\"]\n",
            d.join("state-b"),
            id_b.join("cert.pem"),
            id_b.join("key.pem"),
            id_b.join("bundle.pem"),
        ),
    )
    .unwrap();
    let sidecar = halyard_in(
        b,
        d,
        "reviews-sidecar",
        &["sidecar", "--config", reviews_toml.to_str().unwrap()],
    );
    (app, sidecar)
}

/// Cluster A's productpage sidecar on `ip_a:15443` reading `registry`, with reviews:9082 as
/// an upstream on 127.0.0.1:19080.
fn productpage_in_a((a, d, ca): (&NetNs, &Path, &MeshCa), registry: &str, ip_a: &str) -> Proc {
    let id_a = identity(ca, d, "productpage");
    let pp_toml = d.join("productpage.toml");
    std::fs::write(
        &pp_toml,
        format!(
            "registry = \"{registry}\"\nstate_dir = {:?}\n[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\
             [service]\nname = \"productpage\"\ncluster = \"a\"\n\
             [inbound]\nlisten = \"{ip_a}:15443\"\napp_host = \"127.0.0.1\"\n\
             [[outbound.upstreams]]\nservice = \"reviews\"\nport = 9082\nlisten = \"127.0.0.1:19080\"\n\
             [admin]\nlisten = \"127.0.0.1:15000\"\n",
            d.join("state-a"),
            id_a.join("cert.pem"),
            id_a.join("key.pem"),
            id_a.join("bundle.pem"),
        ),
    )
    .unwrap();
    halyard_in(
        a,
        d,
        "productpage-sidecar",
        &["sidecar", "--config", pp_toml.to_str().unwrap()],
    )
}

/// The first answer to `url` from inside `a`, polled for 30 s (processes in other namespaces:
/// there is no event to await across them); `None` when none comes.
fn first_answer(a: &NetNs, url: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(body) = curl_in(a, url) {
            return Some(body);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_service_only_in_cluster_b_is_reached_from_cluster_a_through_bs_gateway() {
    if !can_run(
        &["ip", "etcd", "curl"],
        "the two-namespace multi-cluster test",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (NetNs::named("hmca"), NetNs::named("hmcb"));
    let net = 1 + halyard_sidecar::test_util::rand_suffix() % 250;
    let (ip_a, ip_b) = (format!("10.234.{net}.1"), format!("10.234.{net}.2"));
    veth(
        &a,
        &format!("va{net}"),
        &ip_a,
        &b,
        &format!("vb{net}"),
        &ip_b,
    );
    let etcd_a = etcd_in(&a, ip_a.parse().unwrap());
    let etcd_b = etcd_in(&b, ip_b.parse().unwrap());
    let ca = MeshCa::create(&TrustDomain::new("mesh.local").unwrap()).unwrap();

    // Cluster B: reviews (exported), its sidecar behind the gateway, the gateway.
    let _reviews = reviews_in_b((&b, d, &ca), &etcd_b.url(), &ip_b, &ip_b);
    let gw_toml = d.join("gateway.toml");
    std::fs::write(
        &gw_toml,
        format!(
            "registry = \"{}\"\nlisten = \"{ip_b}:15444\"\nadmin = \"127.0.0.1:15020\"\n",
            etcd_b.url()
        ),
    )
    .unwrap();
    let _gateway = halyard_in(
        &b,
        d,
        "gateway",
        &["gateway", "--config", gw_toml.to_str().unwrap()],
    );

    // Cluster A: no reviews of its own; a ClusterLink to B; productpage's sidecar.
    apply_in(
        &a,
        &etcd_a.url(),
        &d.join("a.yaml"),
        &format!(
            "kind: ClusterLink\ncluster: b\nregistry: {}\ngateway: \"{ip_b}:15444\"\n",
            etcd_b.url()
        ),
    );
    let _pp = productpage_in_a((&a, d, &ca), &etcd_a.url(), &ip_a);

    let Some(body) = first_answer(&a, "http://127.0.0.1:19080/reviews/1") else {
        panic!(
            "no answer through the gateway in 30 s; logs in {}",
            dir.keep().display()
        )
    };
    assert!(body.contains("v9"), "not B's reviews: {body}");
    for _ in 0..10 {
        let body = curl_in(&a, "http://127.0.0.1:19080/reviews/2").expect("a later call failed");
        assert!(body.contains("v9"), "{body}");
    }
    // A learned B's endpoint through the link, as cluster b, to be dialled at B's gateway.
    let links = curl_in(&a, "http://127.0.0.1:15000/metrics").unwrap();
    assert!(
        links.contains("halyard_cluster_link_endpoints{cluster=\"b\"} 1"),
        "{}",
        links
            .lines()
            .filter(|l| l.contains("cluster_link"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let gw = curl_in(&b, "http://127.0.0.1:15020/metrics").unwrap();
    let forwarded = gw
        .lines()
        .find(|l| l.starts_with("halyard_gateway_datagrams_total{decision=\"forwarded\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(forwarded > 10.0, "gateway forwarded {forwarded}:\n{gw}");
}

/// A veth pair `x`–`y` with `x` (address `ip_x`) in `nx` and `y` (`ip_y`) in `ny`, up, /24.
fn veth(nx: &NetNs, x: &str, ip_x: &str, ny: &NetNs, y: &str, ip_y: &str) {
    common::run(&["ip", "link", "add", x, "type", "veth", "peer", "name", y]);
    for (ns, dev, ip) in [(nx, x, ip_x), (ny, y, ip_y)] {
        common::run(&["ip", "link", "set", dev, "netns", &ns.0]);
        ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
    }
}

/// `name{labels} value` read from a Prometheus text page; 0 when absent.
fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The gateway in a namespace of its own (G) between the caller's (A) and the endpoint's (B),
/// with `[xdp]` on both of its interfaces: established connections' packets cross it in the
/// kernel, both ways, and only the handshake reaches its user-space relay.
#[test]
fn established_connections_cross_the_gateway_in_the_kernel_with_xdp() {
    if !can_run(
        &["ip", "curl", "ethtool", "iptables"],
        "the XDP gateway test",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, g, b) = (
        NetNs::named("hxa"),
        NetNs::named("hxg"),
        NetNs::named("hxb"),
    );
    let net = 1 + halyard_sidecar::test_util::rand_suffix() % 250;
    let (ip_a, ip_ga) = (format!("10.235.{net}.1"), format!("10.235.{net}.2"));
    let (ip_gb, ip_b) = (format!("10.236.{net}.1"), format!("10.236.{net}.2"));
    let (va, ga, gb, vb) = (
        format!("xa{net}"),
        format!("xga{net}"),
        format!("xgb{net}"),
        format!("xb{net}"),
    );
    veth(&a, &va, &ip_a, &g, &ga, &ip_ga);
    veth(&g, &gb, &ip_gb, &b, &vb, &ip_b);
    // A frame the program redirects to a veth is taken by its peer only when the peer runs
    // NAPI (GRO on, or an XDP program of its own).
    a.exec(&["ethtool", "-K", &va, "gro", "on"]);
    b.exec(&["ethtool", "-K", &vb, "gro", "on"]);
    let gw_toml = d.join("gateway.toml");
    let (reg_a, reg_b) = (d.join("registry-a"), d.join("registry-b"));
    std::fs::create_dir(&reg_a).unwrap();
    std::fs::create_dir(&reg_b).unwrap();
    let (url_a, url_b) = (
        format!("file://{}", reg_a.display()),
        format!("file://{}", reg_b.display()),
    );
    std::fs::write(
        &gw_toml,
        format!(
            "registry = \"{url_b}\"\nadmin = \"127.0.0.1:15020\"\n[xdp]\ninterfaces = [\"{ga}\", \"{gb}\"]\n"
        ),
    )
    .unwrap();
    // The kernel's route lookup for XDP (bpf_fib_lookup) answers only on interfaces that
    // forward: a gateway started without it refuses to start, naming the interface.
    let refused = Command::new("ip")
        .args(["netns", "exec", &g.0, env!("CARGO_BIN_EXE_halyard")])
        .args(["gateway", "--config", gw_toml.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains(&format!("{ga:?} does not forward IPv4")),
        "{refused:?}"
    );
    // G forwards nothing else (its FORWARD chain drops).
    for dev in [&ga, &gb] {
        g.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv4/conf/{dev}/forwarding"),
        ]);
    }
    g.exec(&["iptables", "-P", "FORWARD", "DROP"]);
    let ca = MeshCa::create(&TrustDomain::new("mesh.local").unwrap()).unwrap();

    // Cluster B: reviews (exported) and its sidecar, trusting the gateway's address.
    let _reviews = reviews_in_b((&b, d, &ca), &url_b, &ip_b, &ip_gb);
    let _gateway = halyard_in(
        &g,
        d,
        "gateway",
        &["gateway", "--config", gw_toml.to_str().unwrap()],
    );

    // Cluster A: reviews known as B's endpoint behind B's gateway; productpage's sidecar.
    apply_in(
        &a,
        &url_a,
        &d.join("a.yaml"),
        &format!(
            "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9082, protocol: http }}\n---\n\
             kind: Endpoint\nid: b-reviews\nservice: reviews\naddress: \"{ip_b}:15443\"\n\
             identity: spiffe://mesh.local/ns/default/sa/reviews\ncluster: b\ngateway: \"{ip_ga}:15444\"\n"
        ),
    );
    let _pp = productpage_in_a((&a, d, &ca), &url_a, &ip_a);

    if first_answer(&a, "http://127.0.0.1:19080/reviews/1").is_none() {
        panic!(
            "no answer through the gateway in 30 s; logs in {}",
            dir.keep().display()
        );
    }
    for i in 0..20 {
        let body = curl_in(&a, &format!("http://127.0.0.1:19080/reviews/{i}"))
            .expect("a call through the gateway failed");
        assert!(body.contains("v9"), "not B's reviews: {body}");
    }
    // The program's counters reach the metrics once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (page, kernel_fwd, kernel_ret) = loop {
        let page = curl_in(&g, "http://127.0.0.1:15020/metrics").unwrap();
        let fwd = sample(
            &page,
            "halyard_gateway_xdp_datagrams_total{decision=\"forwarded\"}",
        );
        let ret = sample(
            &page,
            "halyard_gateway_xdp_datagrams_total{decision=\"returned\"}",
        );
        if fwd >= 20.0 && ret >= 20.0 || Instant::now() > deadline {
            break (page, fwd, ret);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let all_fwd = sample(
        &page,
        "halyard_gateway_datagrams_total{decision=\"forwarded\"}",
    );
    let all_ret = sample(
        &page,
        "halyard_gateway_datagrams_total{decision=\"returned\"}",
    );
    let xdp: Vec<&str> = page.lines().filter(|l| l.contains("gateway")).collect();
    // 21 requests each way crossed in the kernel; the user-space relay saw the handshake.
    assert!(
        kernel_fwd >= 20.0 && kernel_ret >= 20.0,
        "the kernel path forwarded {kernel_fwd} and returned {kernel_ret}:\n{}",
        xdp.join("\n")
    );
    assert!(
        all_fwd - kernel_fwd <= 10.0 && all_ret - kernel_ret <= 10.0,
        "user space relayed {} forwarded and {} returned datagrams, more than a handshake's:\n{}",
        all_fwd - kernel_fwd,
        all_ret - kernel_ret,
        xdp.join("\n")
    );
    // The program rewrites the UDP checksum: no receiver found one wrong.
    for ns in [&a, &b] {
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
        let errors = names
            .zip(values)
            .find(|(n, _)| *n == "InCsumErrors")
            .map(|(_, v)| v.to_owned());
        assert_eq!(
            errors.as_deref(),
            Some("0"),
            "UDP checksum errors in {}",
            ns.0
        );
    }
    // A datagram to another host's port 15444 that crosses G is not the gateway's, even with a
    // routable connection ID: the program leaves it to the stack, whose FORWARD chain drops it.
    let dump: serde_json::Value =
        serde_json::from_str(&curl_in(&g, "http://127.0.0.1:15020/config_dump").unwrap()).unwrap();
    let sid = dump["routes"]
        .as_object()
        .and_then(|r| r.keys().next().cloned())
        .expect("a route by server ID");
    let mut packet = vec![0x40, 0x0e];
    for i in 0..6 {
        packet.push(u8::from_str_radix(&sid[2 * i..2 * i + 2], 16).unwrap());
    }
    packet.resize(100, 0xab);
    a.exec(&[
        "ip",
        "route",
        "add",
        &format!("10.236.{net}.0/24"),
        "via",
        &ip_ga,
    ]);
    let before = sample(
        &page,
        "halyard_gateway_xdp_datagrams_total{decision=\"forwarded\"}",
    );
    let packet_hex: String = packet.iter().map(|b| format!("{b:02x}")).collect();
    a.exec(&[
        "python3",
        "-c",
        &format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             for _ in range(50): s.sendto(bytes.fromhex('{packet_hex}'), ('{ip_b}', 15444))\n"
        ),
    ]);
    // The program's counters reach the metrics within a second.
    std::thread::sleep(Duration::from_millis(1500));
    let after = sample(
        &curl_in(&g, "http://127.0.0.1:15020/metrics").unwrap(),
        "halyard_gateway_xdp_datagrams_total{decision=\"forwarded\"}",
    );
    assert!(
        after - before < 50.0,
        "the program forwarded {} datagrams addressed to another host",
        after - before
    );
    assert_eq!(
        sample(&page, "halyard_gateway_xdp_routes "),
        1.0,
        "{}",
        xdp.join("\n")
    );
}
