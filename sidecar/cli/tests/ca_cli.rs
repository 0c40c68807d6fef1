//! `halyard ca` driven as a user would: the binary, real files, and openssl to read the result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn halyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(args)
        .output()
        .expect("run halyard")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `halyard ca init` for `trust_domain` into `ca`, which must succeed.
fn init_ca(ca: &Path, trust_domain: &str) {
    let init = halyard(&[
        "ca",
        "init",
        "--dir",
        path(ca),
        "--trust-domain",
        trust_domain,
    ]);
    assert!(init.status.success(), "{}", stderr(&init));
}

#[test]
fn init_writes_a_private_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca, "prod.example");
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
}

#[test]
fn issue_writes_a_strict_svid() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = tmp.path().join("reviews");
    init_ca(&ca, "prod.example");

    let id = "spiffe://prod.example/ns/shop/sa/reviews";
    let issue = halyard(&[
        "ca",
        "issue",
        "--dir",
        path(&ca),
        "--id",
        id,
        "--out",
        path(&out),
        "--ttl",
        "2h",
    ]);
    assert!(issue.status.success(), "{}", stderr(&issue));
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    assert!(out.join("bundle.pem").exists());

    let text = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-text",
            "-in",
            path(&out.join("cert.pem")),
        ])
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains(&format!("URI:{id}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("X509v3 Key Usage: critical"), "{text}");

    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            path(&out.join("bundle.pem")),
            path(&out.join("cert.pem")),
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn init_refuses_to_replace_a_ca_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = path(tmp.path());
    assert!(
        halyard(&["ca", "init", "--dir", dir, "--trust-domain", "a.test"])
            .status
            .success()
    );
    let before = std::fs::read(tmp.path().join("ca.crt")).unwrap();
    let again = halyard(&["ca", "init", "--dir", dir, "--trust-domain", "a.test"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(std::fs::read(tmp.path().join("ca.crt")).unwrap(), before);
    let forced = halyard(&[
        "ca",
        "init",
        "--dir",
        dir,
        "--trust-domain",
        "a.test",
        "--force",
    ]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read(tmp.path().join("ca.crt")).unwrap(), before);
}

/// One refused `halyard ca issue`: the extra arguments, what its error must contain, its output,
/// and whether the out directory existed afterwards.
struct Refusal {
    extra: Vec<&'static str>,
    want: &'static str,
    output: Output,
    wrote: bool,
}

/// Runs `halyard ca issue` with each kind of bad input against a fresh CA, then against a
/// directory without one (that last case names `halyard ca init`).
fn refused_issues() -> Vec<Refusal> {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    init_ca(&ca, "mesh.local");
    let out = tmp.path().join("out");
    let good = "spiffe://mesh.local/ns/default/sa/x";
    let cases: &[(&[&str], &str)] = &[
        (
            &["--id", "spiffe://mesh.local/ns/default/sa/x?q=1"],
            "query",
        ),
        (&["--id", "spiffe://Mesh.local/ns/a/sa/b"], "trust domain"),
        (&["--id", "spiffe://mesh.local"], "empty path"),
        (
            &["--id", "spiffe://other.domain/ns/a/sa/b"],
            "outside the CA's trust domain",
        ),
        (&["--id", good, "--ttl", "forever"], "--ttl"),
        (&["--id", good, "--ttl", "0s"], "--ttl"),
        (&["--id", good, "--ttl", "100000h"], "lifetime"),
    ];
    let mut refusals = Vec::new();
    for (extra, want) in cases {
        let mut args = vec!["ca", "issue", "--dir", path(&ca), "--out", path(&out)];
        args.extend_from_slice(extra);
        let output = halyard(&args);
        refusals.push(Refusal {
            extra: extra.to_vec(),
            want,
            output,
            wrote: out.exists(),
        });
    }
    let none = tmp.path().join("none");
    let output = halyard(&[
        "ca",
        "issue",
        "--dir",
        path(&none),
        "--id",
        good,
        "--out",
        path(&out),
    ]);
    refusals.push(Refusal {
        extra: vec!["--dir", "<no CA>"],
        want: "halyard ca init",
        output,
        wrote: out.exists(),
    });
    refusals
}

#[test]
fn bad_input_is_named_in_one_line() {
    let refusals = refused_issues();
    let (missing, bad) = refusals.split_last().unwrap();
    for Refusal {
        extra,
        want,
        output,
        ..
    } in bad
    {
        let err = stderr(output);
        assert!(!output.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{extra:?}: not one line: {err}"
        );
    }
    assert!(
        stderr(&missing.output).contains(missing.want),
        "{}",
        stderr(&missing.output)
    );
}

#[test]
fn bad_input_writes_nothing() {
    for Refusal { extra, wrote, .. } in refused_issues() {
        assert!(!wrote, "{extra:?} wrote the out directory");
    }
}

/// The recommended layout as a user builds it: an offline root, an intermediate for the CA
/// server, `ca serve`, a token from `ca token create`, and an enrollment whose leaf chains to
/// the root through the intermediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_an_intermediate_and_enroll_with_a_created_token() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let (root, inter, reg) = (
        tmp.path().join("root"),
        tmp.path().join("ca1"),
        tmp.path().join("registry"),
    );
    std::fs::create_dir_all(&reg).unwrap();
    init_ca(&root, "mesh.local");
    let made = halyard(&[
        "ca",
        "intermediate",
        "--root",
        path(&root),
        "--out",
        path(&inter),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert_eq!(mode(&inter.join("ca.key")), 0o600);
    let url = format!("file://{}", reg.display());
    let config = tmp.path().join("ca.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\ndir = \"ca1\"\nregistry = {url:?}\nleaf_ttl = \"1h\"\n"),
    )
    .unwrap();

    // A CA key others can read is refused before anything listens.
    std::fs::set_permissions(inter.join("ca.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let refused = halyard(&["ca", "serve", "--config", path(&config)]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("chmod 600"),
        "{}",
        stderr(&refused)
    );
    std::fs::set_permissions(inter.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut server = Command::new(env!("CARGO_BIN_EXE_halyard"))
        .args(["ca", "serve", "--config", path(&config)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr: std::net::SocketAddr = first
        .trim()
        .strip_prefix("CA listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();

    let token_file = tmp.path().join("token");
    let id = "spiffe://mesh.local/ns/default/sa/reviews";
    let created = halyard(&[
        "ca",
        "token",
        "create",
        "--id",
        id,
        "--ttl",
        "10m",
        "--uses",
        "1",
        "--registry",
        &url,
        "--out",
        path(&token_file),
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    assert_eq!(mode(&token_file), 0o600);
    let token = halyard_certs::enroll::BootstrapToken::parse(
        &std::fs::read_to_string(&token_file).unwrap(),
    )
    .unwrap();
    // Only the hash is stored.
    let stored = std::fs::read_dir(reg.join(".halyard-ca/default/tokens"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(stored, vec![format!("{}.json", token.hash())]);

    let bundle =
        std::sync::Arc::new(halyard_certs::TrustBundle::load(&root.join("ca.crt")).unwrap());
    let ca_id = halyard_certs::SpiffeId::parse("spiffe://mesh.local/halyard/ca").unwrap();
    let client = halyard_sidecar::ca::client::CaClient::new(
        &addr.to_string(),
        ca_id,
        std::time::Duration::from_secs(5),
    );
    let (key, csr) =
        halyard_certs::workload::generate_csr(&halyard_certs::SpiffeId::parse(id).unwrap())
            .unwrap();
    let req = halyard_sidecar::ca::SignRequest {
        csr,
        ttl_seconds: None,
    };
    let signed = client.enroll(bundle, &token, &req).await.unwrap();
    assert_eq!(halyard_certs::pem::certs(&signed.chain).unwrap().len(), 2);
    let ident =
        halyard_certs::WorkloadIdentity::from_pem(&signed.chain, &key.serialize_pem()).unwrap();
    assert_eq!(ident.id().as_str(), id);
    let _ = server.kill();
    let _ = server.wait();
}

/// `halyard ca rotate` walks the trust bundle through a root rotation in the registry: add the
/// new root beside the old, show both, remove the old; and refuses what would break the mesh.
#[test]
fn ca_rotate_adds_shows_and_removes_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new, reg) = (
        tmp.path().join("root1"),
        tmp.path().join("root2"),
        tmp.path().join("registry"),
    );
    std::fs::create_dir_all(reg.join("default")).unwrap();
    init_ca(&old, "mesh.local");
    init_ca(&new, "mesh.local");
    let url = format!("file://{}", reg.display());
    let (old_pem, new_pem) = (old.join("ca.crt"), new.join("ca.crt"));
    let rotate = |args: &[&str]| {
        let mut all = vec!["ca", "rotate", "--registry", &url];
        all.extend_from_slice(args);
        halyard(&all)
    };
    let show = || String::from_utf8_lossy(&rotate(&["show"]).stdout).into_owned();
    assert!(show().contains("no TrustBundle"), "{}", show());

    let first = rotate(&["add", "--root", path(&new_pem)]);
    assert!(!first.status.success());
    assert!(stderr(&first).contains("--current"), "{}", stderr(&first));
    let added = rotate(&["add", "--root", path(&new_pem), "--current", path(&old_pem)]);
    assert!(added.status.success(), "{}", stderr(&added));
    assert_eq!(show().lines().count(), 2, "{}", show());
    let again = rotate(&["add", "--root", path(&new_pem)]);
    assert!(
        stderr(&again).contains("already trusted"),
        "{}",
        stderr(&again)
    );
    let not_pem = rotate(&["add", "--root", path(&reg)]);
    assert!(!not_pem.status.success());

    let removed = rotate(&["remove", "--root", path(&old_pem)]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    let left = show();
    assert_eq!(left.lines().count(), 1, "{left}");
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&new_pem)
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout)
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    assert!(left.contains(&fp), "{left} lacks {fp}");
    let last = rotate(&["remove", "--root", path(&new_pem)]);
    assert!(
        stderr(&last).contains("no root would be left"),
        "{}",
        stderr(&last)
    );
    assert_eq!(show().lines().count(), 1);
}
