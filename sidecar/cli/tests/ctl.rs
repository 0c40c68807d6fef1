//! `halyard ctl` end to end: the real binary against a real etcd and a directory registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use halyard_registry::test_util::EtcdServer;

const GOOD: &str = r#"
kind: Service
name: reviews
vip: 240.240.0.10
ports:
  - { name: http, port: 9080, protocol: http, targetPort: 9080 }
---
kind: Route
service: reviews
rules:
  - match: { path: { prefix: /api }, method: GET }
    backends: [ { subset: { version: v2 }, weight: 100 } ]
    timeout: 2s
  - backends: [ { subset: { version: v1 }, weight: 90 }, { subset: { version: v3 }, weight: 10 } ]
---
kind: Policy
service: reviews
rules:
  - action: deny
    from: { identities: ["spiffe://mesh.local/ns/default/sa/*"] }
    to: { paths: ["/admin/*"] }
---
kind: MeshConfig
defaultPolicy: deny
trustDomain: mesh.local
"#;

fn ctl(registry: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halyard"));
    cmd.arg("ctl");
    if let Some(r) = registry {
        cmd.args(["--registry", r]);
    }
    cmd.args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn apply_get_delete_status_against_etcd() {
    let etcd = EtcdServer::start();
    let url = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let f = file(dir.path(), "mesh.yaml", GOOD);
    let out = ok(&ctl(Some(&url), &["apply", "-f", &f]));
    assert!(out.contains("Service services/reviews configured"), "{out}");
    // Stored as JSON under the DESIGN.md layout, with camelCase fields.
    let raw = etcd.etcdctl_ok(&[
        "get",
        "--print-value-only",
        "/halyard/default/services/reviews",
    ]);
    let v: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    assert_eq!(v["ports"][0]["targetPort"], 9080);
    assert_eq!(v["kind"], "Service");
    let json = ok(&ctl(
        Some(&url),
        &["get", "routes", "reviews", "-o", "json"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rules"][0]["timeout"], "2s");
    assert_eq!(v["rules"][1]["backends"][1]["weight"], 10);
    let yaml = ok(&ctl(Some(&url), &["get", "meshconfig"]));
    assert!(yaml.contains("defaultPolicy: deny"), "{yaml}");
    // Applying the same file again is fine (compare-and-swap on the current revisions).
    ok(&ctl(Some(&url), &["apply", "-f", &f]));
    // Status: a sidecar's status key, and a bad value written behind ctl's back.
    etcd.etcdctl_ok(&["put", "/halyard/default/status/sc-1", r#"{"sidecar":"sc-1","revision":7,"appliedAt":"2026-01-01T00:00:00Z","rejected":[{"key":"/halyard/default/policies/x","error":"rules[0].action: unknown action"}]}"#]);
    let table = ok(&ctl(Some(&url), &["status"]));
    assert!(
        table.contains("sc-1") && table.contains("/halyard/default/policies/x: rules[0].action"),
        "{table}"
    );
    etcd.etcdctl_ok(&["put", "/halyard/default/policies/broken", "{nope"]);
    let out = ctl(Some(&url), &["get", "policies"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(ok(&out).contains("service: reviews"));
    assert!(
        stderr.contains("/halyard/default/policies/broken: not valid JSON"),
        "{stderr}"
    );
    ok(&ctl(Some(&url), &["delete", "routes", "reviews"]));
    let e = err(&ctl(Some(&url), &["get", "routes", "reviews"]));
    assert!(e.contains("Route reviews not found"), "{e}");
    let e = err(&ctl(Some(&url), &["delete", "routes", "reviews"]));
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn apply_with_one_bad_object_writes_nothing() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let bad = GOOD.replace("weight: 10 }", "weight: -10 }");
    let f = file(dir.path(), "bad.yaml", &bad);
    let e = err(&ctl(Some(&etcd.url()), &["apply", "-f", &f]));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("bad.yaml: document 2 (Route reviews): rules[1].backends[1].weight: "),
        "{e}"
    );
    let all = etcd.etcdctl_ok(&["get", "--prefix", "--keys-only", "/halyard/"]);
    assert_eq!(all.trim(), "", "something was written: {all}");
}

#[test]
fn validate_locates_every_error_without_a_registry() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(dir.path(), "ok.yaml", GOOD);
    assert!(ok(&ctl(None, &["validate", "-f", &f])).contains("4 objects valid"));
    let cases = [
        (
            "retries: { attempts: 11 }",
            "rules[0].retries.attempts",
            "at most 10",
        ),
        (
            "retries: { attempts: 1, perTryTimeout: 5 }",
            "rules[0].retries.perTryTimeout",
            "expected a string",
        ),
        (
            "fault: { abort: { percent: 150, status: 503 } }",
            "rules[0].fault.abort.percent",
            "percentage",
        ),
        (
            "mirror: { subset: { version: v3 }, percent: 10, extra: 1 }",
            "rules[0].mirror.extra",
            "unknown field",
        ),
    ];
    for (extra, path, reason) in cases {
        let text = GOOD.replace(
            "    timeout: 2s\n",
            &format!("    timeout: 2s\n    {extra}\n"),
        );
        let f = file(dir.path(), "bad.yaml", &text);
        let e = err(&ctl(None, &["validate", "-f", &f]));
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.contains(&format!("bad.yaml: document 2 (Route reviews): {path}: ")),
            "{e}"
        );
        assert!(e.contains(reason), "{e}");
    }
    let e = err(&ctl(None, &["validate", "-f", "/nonexistent.yaml"]));
    assert!(e.contains("/nonexistent.yaml"), "{e}");
}

#[test]
fn unreachable_registry_is_a_quick_clear_error() {
    let (_held, dead) = halyard_sidecar::test_util::refused_addr();
    let t0 = Instant::now();
    let e = err(&ctl(Some(&format!("etcd://{dead}")), &["get", "services"]));
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );
    assert!(e.contains("unreachable"), "{e}");
    let e = err(&ctl(Some("consul://x"), &["get", "services"]));
    assert!(e.contains("bad registry url"), "{e}");
}

#[test]
fn directory_registry_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("reg/default")).unwrap();
    let url = format!("file://{}", dir.path().join("reg").display());
    let f = file(dir.path(), "mesh.yaml", GOOD);
    ok(&ctl(Some(&url), &["apply", "-f", &f]));
    assert!(dir
        .path()
        .join("reg/default/services/reviews.json")
        .is_file());
    assert!(dir.path().join("reg/default/meshconfig.json").is_file());
    let out = ok(&ctl(Some(&url), &["get", "services", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "reviews");
    ok(&ctl(Some(&url), &["delete", "policies", "reviews"]));
    assert!(!dir
        .path()
        .join("reg/default/policies/reviews.json")
        .exists());
}

/// A 3-member etcd cluster that lost quorum (two members killed): `ctl apply` and `ctl get`
/// fail within their request timeout with one line saying why (no leader: quorum lost), and
/// write nothing; once the members are back the same apply succeeds.
#[test]
fn ctl_says_why_when_etcd_lost_quorum() {
    use halyard_registry::test_util::EtcdCluster;
    let mut cluster = EtcdCluster::start();
    let url = cluster.url();
    let dir = tempfile::tempdir().unwrap();
    let f = file(dir.path(), "good.yaml", GOOD);
    cluster.kill(1);
    cluster.kill(2);
    for args in [&["apply", "-f", &f][..], &["get", "services"][..]] {
        let started = Instant::now();
        let e = err(&ctl(Some(&url), args));
        let took = started.elapsed();
        eprintln!("ctl {args:?} without quorum, after {took:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
        assert!(
            e.contains("no leader") && e.contains("quorum lost"),
            "{args:?}: {e}"
        );
        assert!(
            took < Duration::from_secs(30),
            "{args:?} took {took:?}: {e}"
        );
    }
    cluster.spawn(1);
    cluster.spawn(2);
    for i in 0..3 {
        cluster.wait_healthy(i);
    }
    let out = ok(&ctl(Some(&url), &["apply", "-f", &f]));
    assert!(out.contains("reviews"), "{out}");
}

/// An etcd that requires authentication: `ctl` and `ca token create` act as the user in
/// `--credentials FILE` (or `HALYARD_REGISTRY_CREDENTIALS`); a wrong password, none at all, or
/// a read-only user writing each fail with one line that says what to change, writing nothing.
#[test]
fn ctl_and_ca_token_act_as_the_etcd_user_of_a_credentials_file() {
    let mut etcd = EtcdServer::start();
    etcd.enable_auth("rootpw");
    etcd.add_user("operator", "op:pw", "readwrite", "/halyard/default/");
    etcd.add_user("viewer", "v-pw", "read", "/halyard/default/");
    etcd.etcdctl_ok(&[
        "role",
        "grant-permission",
        "operator",
        "readwrite",
        "--prefix=true",
        "/halyard-ca/default/",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let objects = file(tmp.path(), "mesh.yaml", GOOD);
    let operator = file(tmp.path(), "operator", "operator:op:pw\n");
    let viewer = file(tmp.path(), "viewer", "viewer:v-pw\n");
    let wrong = file(tmp.path(), "wrong", "operator:nope\n");
    let url = etcd.url();
    let reg = Some(url.as_str());

    ok(&ctl(
        reg,
        &["--credentials", &operator, "apply", "-f", &objects],
    ));
    let listed = ok(&ctl(reg, &["--credentials", &viewer, "get", "services"]));
    assert!(listed.contains("reviews"), "{listed}");

    let denied = err(&ctl(
        reg,
        &["--credentials", &viewer, "delete", "services", "reviews"],
    ));
    assert!(denied.contains("denied user \"viewer\""), "{denied}");
    let refused = err(&ctl(reg, &["--credentials", &wrong, "get", "services"]));
    assert!(refused.contains("wrong user name or password"), "{refused}");
    let anonymous = err(&ctl(reg, &["get", "services"]));
    assert!(anonymous.contains("requires authentication"), "{anonymous}");
    assert!(
        !format!("{denied}{refused}{anonymous}").contains("op:pw"),
        "a password in an error"
    );
    assert!(etcd
        .etcdctl_ok(&["get", "/halyard/default/services/reviews"])
        .contains("reviews"));

    // The environment variable names the file too; `ca token create` uses it.
    let token = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args([
            "ca",
            "token",
            "create",
            "--id",
            "spiffe://mesh.local/ns/default/sa/reviews",
        ])
        .args(["--registry", &url])
        .env("HALYARD_REGISTRY_CREDENTIALS", &operator)
        .output()
        .unwrap();
    ok(&token);
    let stored = etcd.etcdctl_ok(&[
        "get",
        "--prefix",
        "--keys-only",
        "/halyard-ca/default/tokens/",
    ]);
    assert!(!stored.trim().is_empty(), "no token record written");

    // An empty variable is no variable (a directory registry needs none).
    let dir = tmp.path().join("dirreg");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args([
            "ctl",
            "--registry",
            &format!("file://{}", dir.display()),
            "get",
            "services",
        ])
        .env("HALYARD_REGISTRY_CREDENTIALS", "")
        .output()
        .unwrap();
    ok(&empty);
}

/// `ctl` against an `etcds://` registry: `--cacert`, `--cert` and `--key` as `etcdctl` names
/// them; without them, or with them on a plain URL, one line says what to add or change.
#[test]
fn ctl_reaches_an_etcds_registry_with_the_etcdctl_tls_flags() {
    let etcd = EtcdServer::start_tls();
    let t = etcd.tls().unwrap().clone();
    let tmp = tempfile::tempdir().unwrap();
    let objects = file(tmp.path(), "mesh.yaml", GOOD);
    let url = etcd.url();
    let (ca, cert, key) = (
        t.ca.display().to_string(),
        t.client_cert.display().to_string(),
        t.client_key.display().to_string(),
    );
    let tls = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    ok(&ctl(
        Some(&url),
        &[&tls[..], &["apply", "-f", &objects]].concat(),
    ));
    let listed = ok(&ctl(Some(&url), &[&tls[..], &["get", "services"]].concat()));
    assert!(listed.contains("reviews"), "{listed}");
    let missing = err(&ctl(Some(&url), &["get", "services"]));
    assert!(missing.contains("needs TLS settings"), "{missing}");
    let plain = url.replacen("etcds://", "etcd://", 1);
    let mismatch = err(&ctl(
        Some(&plain),
        &[&tls[..], &["get", "services"]].concat(),
    ));
    assert!(mismatch.contains("use etcds://"), "{mismatch}");
    let half = err(&ctl(
        Some(&url),
        &["--cacert", &ca, "--cert", &cert, "get", "services"],
    ));
    assert!(half.contains("--key"), "{half}");
}
