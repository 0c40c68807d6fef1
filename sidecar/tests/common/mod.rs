//! Real clients and servers for the integration tests: Debian's curl, and the Python gRPC and
//! WebSocket programs of `clients/traffic.py`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/traffic.py");

/// Debian's interpreter, where python3-grpcio and python3-websockets install.
pub fn python() -> tokio::process::Command {
    let exe = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(CLIENTS).kill_on_drop(true);
    cmd
}

/// A Python server from `clients/traffic.py`, killed when dropped.
pub struct PyServer {
    _child: tokio::process::Child,
    pub port: u16,
}

pub async fn py_server(args: &[&str]) -> PyServer {
    py_server_at(args, 0).await
}

/// A Python server on `port` (0: any).
pub async fn py_server_at(args: &[&str], port: u16) -> PyServer {
    let mut child = python()
        .args(args)
        .env("TRAFFIC_PORT", port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (make deps installs it)");
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(out).read_line(&mut line),
    )
    .await
    .expect("the server printed no port")
    .unwrap();
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a port: {line:?}"));
    PyServer {
        _child: child,
        port,
    }
}

/// Runs a Python client to its end: (exit ok, its output line).
pub async fn py_client(args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), python().args(args).output())
        .await
        .expect("the client hung")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (
        out.status.success(),
        format!("{text} {err}").trim().to_owned(),
    )
}

/// Runs curl to its end and returns its stdout.
pub async fn curl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs (make deps installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
