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
    ns.exec(&["iptables-save", "-t", "nat"])
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

/// `halyard iptables install --no-capture --initial-rate R --initial-burst B`, for real in a
/// namespace the test made, fed by another over a veth: each source address gets at most B
/// (plus R a second) QUIC Initials through to the port, the rest dropped in the kernel and
/// counted by the rule; short-header packets of the same source all pass; `remove` leaves the
/// filter table as it was.
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
    src.exec(&["ip", "addr", "add", "10.243.0.1/24", "dev", "hly0"]);
    src.exec(&["ip", "addr", "add", "10.243.0.3/24", "dev", "hly0"]);
    src.exec(&["ip", "link", "set", "hly0", "up"]);
    dst.exec(&["ip", "addr", "add", "10.243.0.2/24", "dev", "hly1"]);
    dst.exec(&["ip", "link", "set", "hly1", "up"]);
    let filter = |ns: &NetNs| {
        ns.exec(&["iptables-save", "-t", "filter"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = filter(&dst);
    let halyard = env!("CARGO_BIN_EXE_halyard");
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
    // No capture chain with --no-capture.
    assert!(!dst
        .exec(&["iptables-save", "-t", "nat"])
        .contains("HALYARD_OUTPUT"));

    // The receiver, inside `dst`: counts datagrams by source and first byte until 300 ms pass
    // without one.
    let dst_name = dst.0.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        NetNs(dst_name).enter_and_forget();
        let sock = UdpSocket::bind("0.0.0.0:4433").unwrap();
        ready_tx.send(()).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = std::collections::HashMap::<(String, bool), u64>::new();
        let mut buf = [0u8; 2048];
        let first = Duration::from_secs(10);
        sock.set_read_timeout(Some(first)).unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let long = n > 0 && buf[0] & 0x80 != 0;
            *got.entry((from.ip().to_string(), long)).or_default() += 1;
        }
        got
    });
    ready_rx.recv().unwrap();
    // The sender, inside `src`: 300 Initials then 100 short-header packets from one address,
    // 300 Initials from the other, the Initials shaped as QUIC v1 (first byte 0xc3, version 1).
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
    let count = |ip: &str, long: bool| got.get(&(ip.to_owned(), long)).copied().unwrap_or(0);
    let allowed = burst + rate * (initials_took.as_millis() as u64 / 1000 + 1);
    for ip in ["10.243.0.1", "10.243.0.3"] {
        let through = count(ip, true);
        assert!(
            (1..=allowed).contains(&through),
            "{ip}: {through} Initials through, at most {allowed} allowed ({got:?})"
        );
    }
    assert_eq!(count("10.243.0.1", false), 100, "short headers: {got:?}");
    // The rule's own counter: every Initial that did not come through.
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
    let dropped: u64 = listed
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no DROP rule counted:\n{listed}"));
    assert_eq!(
        dropped,
        600 - count("10.243.0.1", true) - count("10.243.0.3", true),
        "{listed}"
    );
    dst.exec(&[halyard, "iptables", "remove"]);
    assert_eq!(
        filter(&dst),
        before,
        "iptables remove left the filter table changed"
    );
}
