//! Transparent capture for real: a network namespace made by the test, iptables REDIRECT rules
//! installed by `halyard iptables install`, SO_ORIGINAL_DST read by the sidecar, and the rule
//! set restored by `halyard iptables remove`. Needs root (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use halyard_sidecar::test_util::{call, metric, tagged_echo, Mesh, Spec};

mod common;
use common::NetNs;

/// The nat table without counters and comments, to compare rule sets.
fn nat_rules(ns: &NetNs) -> String {
    table_rules(ns, "nat")
}

/// The filter table without counters and comments, to compare rule sets.
fn filter_rules(ns: &NetNs) -> String {
    table_rules(ns, "filter")
}

fn table_rules(ns: &NetNs, table: &str) -> String {
    ns.exec(&["iptables-save", "-t", table])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn can_run() -> bool {
    common::can_run(&["ip", "iptables", "iptables-save"], "transparent capture")
}

#[test]
fn transparent_capture_serves_the_vip_through_the_mesh() {
    if !can_run() {
        return;
    }
    let ns = NetNs::named("hly-test");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    // The virtual IPs route out of a veth (both ends in this namespace), as they would out of a
    // pod's eth0.
    ns.exec(&[
        "ip", "link", "add", "hly0", "type", "veth", "peer", "name", "hly1",
    ]);
    ns.exec(&["ip", "addr", "add", "240.240.0.1/16", "dev", "hly0"]);
    ns.exec(&["ip", "link", "set", "hly0", "up"]);
    let before = nat_rules(&ns);

    let ns_name = ns.0.clone();
    let inside = std::thread::spawn(move || {
        NetNs(ns_name.clone()).enter_and_forget();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(mesh_in_namespace(&ns_name))
    });
    inside.join().unwrap();

    let after = nat_rules(&ns);
    assert_eq!(after, before, "iptables remove left the nat table changed");
}

async fn mesh_in_namespace(ns: &str) {
    let halyard = env!("CARGO_BIN_EXE_halyard");
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&format!(
        "kind: Service\nname: ratings\nvip: 240.240.0.10\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {} }}\n",
        app.addr.port()
    ))
    .await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let mut spec = Spec::new("productpage", "v1");
    spec.transparent = true;
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("ratings", 1).await;
    let capture = pp.started.transparent.unwrap().port().to_string();
    let ns_exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", ns, halyard];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ns_exec(&["iptables", "install", "--capture-port", &capture]);
    let rules = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "iptables",
            "-t",
            "nat",
            "-S",
            "HALYARD_OUTPUT",
        ])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains(&format!("--to-ports {capture}")), "{rules}");

    // The app dials the vip; the kernel redirects it to the sidecar, which tunnels it.
    let out = call("240.240.0.10:9080".parse().unwrap(), b"via vip")
        .await
        .unwrap();
    assert_eq!(out, b"ratings:via vip");
    // An address no service claims is refused, and counted.
    let unknown = call("240.240.0.99:9999".parse().unwrap(), b"x").await;
    assert!(
        unknown.as_ref().map_or(true, |b| b.is_empty()),
        "unknown destination answered: {unknown:?}"
    );
    pp.wait_flows(2).await;
    let m = pp.started.render_metrics();
    assert_eq!(
        metric(
            &m,
            "halyard_tcp_connections_total",
            &[("response_flags", "NR")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "halyard_tcp_connections_total",
            &[("destination_service", "ratings"), ("response_flags", "-")]
        ),
        1.0
    );

    ns_exec(&["iptables", "remove"]);
    // Without the rules the vip leads nowhere.
    let direct = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        call("240.240.0.10:9080".parse().unwrap(), b"x"),
    )
    .await;
    assert!(
        !matches!(direct, Ok(Ok(ref b)) if !b.is_empty()),
        "vip answered without capture: {direct:?}"
    );
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

/// Datagrams that reached a UDP socket on port 4433 inside `ns`, by source address and
/// whether the first byte had the long-header bit, counted until 300 ms pass without one
/// (10 s for the first). Returns once the socket is bound.
fn count_datagrams(
    ns: &NetNs,
) -> std::thread::JoinHandle<std::collections::HashMap<(String, bool), u64>> {
    use std::time::Duration;
    let name = ns.0.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        NetNs(name).enter_and_forget();
        let sock = std::net::UdpSocket::bind("0.0.0.0:4433").unwrap();
        ready_tx.send(()).unwrap();
        let mut got = std::collections::HashMap::<(String, bool), u64>::new();
        let mut buf = [0u8; 65536];
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let long = n > 0 && buf[0] & 0x80 != 0;
            *got.entry((from.ip().to_string(), long)).or_default() += 1;
        }
        got
    });
    ready_rx.recv().unwrap();
    receiver
}

/// `halyard iptables install --no-capture --initial-rate R --initial-burst B`, for real in a
/// namespace the test made, fed by another over a veth, behind an operator's own ACCEPT rules
/// for the port (the jump goes first) and beside capture rules installed before (left alone):
/// each source address gets at most B (plus R a second) QUIC Initials through to the port, the
/// rest dropped in the kernel and counted by the rule; short-header packets of the same source
/// all pass; a sender batching its Initials with UDP GSO (one buffer for netfilter) gets no
/// more through; `remove --initial-limit` leaves the capture, `remove` the rest, also a jump an
/// operator added with a comment, and the tables are as they were.
#[test]
fn the_initial_limit_drops_a_sources_initials_past_its_rate_in_the_kernel() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    if !can_run() {
        return;
    }
    let (src, dst) = (NetNs::named("hly-src"), NetNs::named("hly-dst"));
    src.exec(&[
        "ip", "link", "add", "hly0", "type", "veth", "peer", "name", "hly1", "netns", &dst.0,
    ]);
    for ip in ["10.243.0.1/24", "10.243.0.3/24", "10.243.0.4/24"] {
        src.exec(&["ip", "addr", "add", ip, "dev", "hly0"]);
    }
    src.exec(&["ip", "link", "set", "hly0", "up"]);
    dst.exec(&["ip", "addr", "add", "10.243.0.2/24", "dev", "hly1"]);
    dst.exec(&["ip", "link", "set", "hly1", "up"]);
    // The operator's own rules: traffic to the port accepted, and established flows too.
    dst.exec(&[
        "iptables",
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]);
    dst.exec(&[
        "iptables", "-A", "INPUT", "-p", "udp", "--dport", "4433", "-j", "ACCEPT",
    ]);
    let (filter_before, nat_before) = (filter_rules(&dst), nat_rules(&dst));
    let halyard = env!("CARGO_BIN_EXE_halyard");
    let out = dst.exec(&[halyard, "iptables", "install", "--capture-port", "15001"]);
    assert!(out.contains("capture installed"), "{out}");
    let (rate, burst) = (20u64, 10u64);
    let out = dst.exec(&[
        halyard,
        "iptables",
        "install",
        "--no-capture",
        "--initial-rate",
        &rate.to_string(),
        "--initial-burst",
        &burst.to_string(),
        "--quic-port",
        "4433",
    ]);
    assert!(out.contains("Initial limit installed"), "{out}");
    // --no-capture left the capture installed before as it was.
    assert!(nat_rules(&dst).contains("HALYARD_OUTPUT"));

    // 300 Initials from each of two addresses, then 100 short-header packets from the first;
    // the Initials shaped as QUIC v1 (first byte 0xc3, version 1).
    let receiver = count_datagrams(&dst);
    let src_name = src.0.clone();
    let sender = std::thread::spawn(move || {
        NetNs(src_name).enter_and_forget();
        let mut initial = vec![0u8; 64];
        initial[0] = 0xc3;
        initial[1..5].copy_from_slice(&1u32.to_be_bytes());
        let mut short = vec![0u8; 64];
        short[0] = 0x43;
        let to = "10.243.0.2:4433";
        let a = UdpSocket::bind("10.243.0.1:0").unwrap();
        let b = UdpSocket::bind("10.243.0.3:0").unwrap();
        let start = Instant::now();
        for _ in 0..300 {
            a.send_to(&initial, to).unwrap();
            b.send_to(&initial, to).unwrap();
        }
        let initials_took = start.elapsed();
        for i in 0..100 {
            a.send_to(&short, to).unwrap();
            if i % 10 == 9 {
                // Short bursts: the receive buffer, not the rule, must never be the limit.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        initials_took
    });
    let initials_took = sender.join().unwrap();
    let got = receiver.join().unwrap();
    let count = |got: &std::collections::HashMap<(String, bool), u64>, ip: &str, long: bool| {
        got.get(&(ip.to_owned(), long)).copied().unwrap_or(0)
    };
    let allowed = |took: Duration| burst + rate * (took.as_millis() as u64 / 1000 + 1);
    for ip in ["10.243.0.1", "10.243.0.3"] {
        let through = count(&got, ip, true);
        assert!(
            (1..=allowed(initials_took)).contains(&through),
            "{ip}: {through} Initials through, at most {} allowed ({got:?})",
            allowed(initials_took)
        );
    }
    assert_eq!(
        count(&got, "10.243.0.1", false),
        100,
        "short headers: {got:?}"
    );
    // The rules' own counters: every Initial that did not come through (no batches yet).
    let dropped = || -> u64 {
        let listed = dst.exec(&[
            "iptables",
            "-t",
            "filter",
            "-L",
            "HALYARD_INPUT",
            "-v",
            "-x",
            "-n",
        ]);
        listed
            .lines()
            .filter(|l| l.contains("DROP"))
            .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(
        dropped(),
        600 - count(&got, "10.243.0.1", true) - count(&got, "10.243.0.3", true),
    );

    // A third address sends 800 Initials of 1,200 bytes as 20 UDP GSO buffers of 40 (Python:
    // UDP_SEGMENT, which Debian's python3 has by number only), then 10 short-header packets.
    let receiver = count_datagrams(&dst);
    let start = Instant::now();
    src.exec(&[
        "python3",
        "-c",
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('10.243.0.4', 0))\n\
         s.setsockopt(17, 103, 1200)\n\
         initial = bytes([0xc3, 0, 0, 0, 1]) + bytes(1195)\n\
         for _ in range(20):\n    s.sendto(initial * 40, ('10.243.0.2', 4433))\n\
         s.setsockopt(17, 103, 0)\n\
         for _ in range(10):\n    s.sendto(bytes([0x43]) + bytes(63), ('10.243.0.2', 4433))\n",
    ]);
    let batches_took = start.elapsed();
    let got = receiver.join().unwrap();
    let through = count(&got, "10.243.0.4", true);
    assert!(
        through <= allowed(batches_took),
        "{through} of 800 batched Initials through, at most {} allowed ({got:?})",
        allowed(batches_took)
    );
    assert_eq!(
        count(&got, "10.243.0.4", false),
        10,
        "short headers: {got:?}"
    );

    // An operator's extra jump, with a comment of several words, goes with `remove` too.
    dst.exec(&[
        "iptables",
        "-I",
        "INPUT",
        "2",
        "-p",
        "udp",
        "--dport",
        "4433",
        "-m",
        "comment",
        "--comment",
        "halyard limit first",
        "-j",
        "HALYARD_INPUT",
    ]);
    let out = dst.exec(&[halyard, "iptables", "remove", "--initial-limit"]);
    assert_eq!(out.trim(), "Initial limit removed");
    assert_eq!(
        filter_rules(&dst),
        filter_before,
        "the filter table changed"
    );
    assert!(
        nat_rules(&dst).contains("HALYARD_OUTPUT"),
        "capture went too"
    );
    let out = dst.exec(&[halyard, "iptables", "remove"]);
    assert_eq!(out.trim(), "capture removed");
    assert_eq!(nat_rules(&dst), nat_before, "the nat table changed");
    let out = dst.exec(&[halyard, "iptables", "remove"]);
    assert_eq!(out.trim(), "nothing to remove");
}
