//! `deploy/lab/lab.sh` as a user runs it: up, one page through the mesh across network
//! namespaces with transparent capture, down, and no namespace left behind. Needs root, `ip`
//! and `iptables` (CI runs as root); prints SKIPPED otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/lab/lab.sh")
}

struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Lab {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("HALYARD", env!("CARGO_BIN_EXE_halyard"))
            .env("LAB_PREFIX", &self.prefix)
            .env("LAB_DIR", self.dir.path().join("lab"))
            .output()
            .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

fn can_run() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let tools = ["ip", "iptables", "bash"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    root && tools
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// Also checks the teardown leaves nothing behind: one lab (netns, iptables) is too costly to redo.
#[test]
fn the_lab_serves_a_page_across_namespaces() {
    if !can_run() {
        println!("SKIPPED: the lab needs root, ip and iptables (make deps; CI runs as root)");
        return;
    }
    let lab = Lab {
        prefix: format!("hlt{}", std::process::id() % 100_000),
        dir: tempfile::tempdir().unwrap(),
    };
    let up = lab.run(&["up"]);
    assert!(up.status.success(), "up failed:\n{}", text(&up));
    assert_eq!(
        namespaces(&lab.prefix).len(),
        8,
        "{:?}",
        namespaces(&lab.prefix)
    );
    let page = lab.run(&["curl", "tester"]);
    let body = text(&page);
    assert!(page.status.success(), "curl failed:\n{body}");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for part in [
        "\"service\":\"productpage\"",
        "\"service\":\"reviews\"",
        "\"service\":\"details\"",
        "\"user\":\"tester\"",
    ] {
        assert!(body.contains(part), "no {part} in {body}");
    }
    // Every sidecar made its key in its own folder and enrolled with its one-use token.
    let ids = lab.dir.path().join("lab").join("id");
    for w in [
        "client",
        "productpage",
        "details",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "ratings",
    ] {
        for f in ["key.pem", "cert.pem", "bundle.pem"] {
            assert!(ids.join(w).join(f).exists(), "{w}: no {f}");
        }
    }
    let status = lab.run(&["status"]);
    assert!(
        // Seven sidecars, six apps, the CA server.
        text(&status).contains("14 processes running"),
        "{}",
        text(&status)
    );
    let down = lab.run(&["down"]);
    assert!(down.status.success(), "down failed:\n{}", text(&down));
    assert!(
        namespaces(&lab.prefix).is_empty(),
        "left behind: {:?}",
        namespaces(&lab.prefix)
    );
    assert!(
        !lab.dir.path().join("lab").exists(),
        "state dir left behind"
    );
}
