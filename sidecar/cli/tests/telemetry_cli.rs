//! The `halyard` binary's telemetry tools against real sidecars: `halyard ctl top`, and a
//! `halyard sidecar` process's `/logging` and access log on stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use halyard_sidecar::test_util::{
    call, edges, get, http_call, http_client, loopback_ip, tagged_echo, wait_admin, Mesh, Spec,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_top_once_prints_each_edge_with_its_request_count() {
    let e = edges("").await;
    let client = http_client();
    for _ in 0..7 {
        let (status, ..) = http_call(&client, e.pp.upstream(0), "GET", "/ok", &[]).await;
        assert_eq!(status, 200);
    }
    for _ in 0..3 {
        assert_eq!(call(e.pp.upstream(1), b"hello").await.unwrap(), b"r:hello");
    }
    e.pp.wait_flows(10).await;
    e.reviews.wait_flows(7).await;
    let admins = format!("{},{}", e.pp.started.admin, e.reviews.started.admin);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_halyard"))
            .args([
                "ctl",
                "top",
                "--admin",
                &admins,
                "--once",
                "--interval",
                "200ms",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |src: &str, dst: &str| -> Vec<String> {
        text.lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[0] == src && f[1] == dst
            })
            .unwrap_or_else(|| panic!("no {src} -> {dst} row:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let reviews = row("productpage", "reviews");
    assert_eq!(reviews[col("PROTO")], "http");
    assert_eq!(reviews[col("TOTAL")], "7", "{text}");
    assert_eq!(reviews[col("SUCCESS")], "100.0%", "{text}");
    let ratings = row("productpage", "ratings");
    assert_eq!(ratings[col("PROTO")], "tcp");
    assert_eq!(ratings[col("TOTAL")], "3", "{text}");
}

/// The `halyard sidecar` process: its log filter changes through `/logging`, its access log goes
/// to stdout (logs stay on stderr), and SIGTERM flushes it.
// One test for the three: they are checked on one sidecar process, too costly to start thrice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_process_keeps_its_access_log_apart_from_its_logs() {
    let ip51 = loopback_ip();
    use std::io::BufRead;
    let mesh = Mesh::with_dir().await;
    let echo = tagged_echo(SocketAddr::new(ip51, 0), "r").await;
    mesh.apply(&format!(
        "kind: Service\nname: ratings\nports:\n  - {{ name: tcp, port: 9090, protocol: tcp, targetPort: {} }}\n",
        echo.addr.port()
    ))
    .await;
    // A port the kernel will not hand to another socket before the process binds it.
    let admin = halyard_registry::ports::free(halyard_registry::ports::Proto::Tcp).unwrap();
    let mut spec = Spec::new("ratings", "v1").app_host(ip51);
    spec.extra = "[access_log]\nenabled = true\n".into();
    let text = mesh.config_text(&spec).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let path = mesh.dir.path().join("ratings-process.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["sidecar", "--config", path.to_str().unwrap()])
        .env("HALYARD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = http_client();
    wait_admin(&client, admin, "/readyz", "process ready", |s, _| s == 200).await;
    assert_eq!(
        get(&client, admin, "/logging").await,
        (200, "warn\n".into())
    );
    let (status, body, _) = http_call(&client, admin, "PUT", "/logging?filter=info", &[]).await;
    assert_eq!((status, body.as_str()), (200, "info\n"));

    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9090))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    for _ in 0..3 {
        assert_eq!(call(pp.upstream(0), b"hi").await.unwrap(), b"r:hi");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (status, lines) = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = std::io::BufReader::new(stdout)
            .lines()
            .map(Result::unwrap)
            .collect();
        (child.wait().unwrap(), lines)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["direction"], "inbound");
        assert_eq!(
            v["source_id"],
            "spiffe://mesh.local/ns/default/sa/productpage"
        );
        assert_eq!(v["flags"], "-");
        assert_eq!(
            (v["bytes_sent"].as_u64(), v["bytes_received"].as_u64()),
            (Some(2), Some(4))
        );
        assert_eq!(
            v["endpoint"],
            SocketAddr::new(ip51, echo.addr.port()).to_string()
        );
    }
    pp.shutdown().await.unwrap();
}
