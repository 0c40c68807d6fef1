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
