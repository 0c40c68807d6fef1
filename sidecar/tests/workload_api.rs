//! The SPIFFE Workload API (X.509-SVID profile) as an app sees it: PyPI's `spiffe` client
//! (`clients/workload_api.py`, from the virtual environment `make deps` makes) on the socket of a
//! sidecar whose leaf the mesh CA renews every few seconds, or that uses certificate files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use halyard_certs::{MeshCa, TrustDomain};
use halyard_sidecar::test_util::{metric, Mesh, Sidecar, Spec, TD};
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/workload_api.py");

/// The interpreter of the tests' virtual environment: `HALYARD_TEST_VENV`, else `.venv` at the
/// workspace root (`make deps`).
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HALYARD_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let exe = venv.join("bin/python3");
    assert!(
        exe.exists(),
        "{} missing: run `make deps` (it makes the virtual environment with PyPI's spiffe)",
        exe.display()
    );
    exe
}

fn client(socket: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(CLIENT)
        .args(args)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .kill_on_drop(true);
    cmd
}

/// Runs a client command to its end: (exit ok, stdout and stderr).
async fn run_client(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), client(socket, args).output())
        .await
        .expect("the client hung")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

fn with_socket(spec: Spec, socket: &Path, mode: Option<&str>) -> Spec {
    let mut spec = spec;
    spec.extra += &format!("[workload_api]\nsocket = {socket:?}\n");
    if let Some(m) = mode {
        spec.extra += &format!("mode = {m:?}\n");
    }
    spec
}

fn socket_in(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("workload.sock")
}

fn workload_id(account: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{account}")
}

async fn file_sidecar(mesh: &Mesh) -> (Sidecar, PathBuf) {
    let socket = socket_in(mesh);
    let sidecar = mesh
        .start(&with_socket(Spec::new("ratings", "v1"), &socket, None))
        .await;
    (sidecar, socket)
}

/// The client gets the SVID (its id, a key matching the certificate, a chain that verifies
/// against the bundle), then the renewed SVID (another serial) on the same stream, as the CA
/// renews the sidecar's 4 s leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_api_client_receives_the_svid_and_then_its_renewal() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh.ca_server("").await;
    let token = mesh.token("ratings", Duration::from_secs(60), 1).await;
    let socket = socket_in(&mesh);
    let spec = with_socket(
        Spec::new("ratings", "v1").enroll(ca.addr, &token, "4s"),
        &socket,
        None,
    );
    let sidecar = mesh.start(&spec).await;
    let id = workload_id("ratings");
    let (ok, out) = run_client(&socket, &["svid-renewal", &id]).await;
    assert!(ok, "{out}");
    let serials: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("svid {id} serial ")))
        .collect();
    assert_eq!(serials.len(), 2, "{out}");
    assert_ne!(serials[0], serials[1]);
    assert!(out.ends_with("renewed on the same stream"), "{out}");
    let m = sidecar.started.render_metrics();
    let sent = metric(
        &m,
        "halyard_workload_api_responses_total",
        &[("method", "FetchX509SVID")],
    );
    assert!(sent >= 2.0, "{sent}");
    sidecar.shutdown().await.unwrap();
    ca.shutdown().await;
}

/// FetchX509Bundles answers the trust domain's roots, those of the sidecar's bundle file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_x509_bundles_answers_the_trust_domains_roots() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let roots = sidecar.config.file.identity.bundle.display().to_string();
    let (ok, out) = run_client(&socket, &["bundles", TD, &roots]).await;
    assert!(ok, "{out}");
    assert_eq!(out, format!("bundle {TD} roots 1"));
    sidecar.shutdown().await.unwrap();
}

/// A new trust bundle in the registry reaches an open FetchX509Bundles stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_change_reaches_an_open_bundles_stream() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let mut child = client(&socket, &["bundles-stream", TD])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("roots 1"));
    let next_root = MeshCa::create(&TrustDomain::new(TD).unwrap()).unwrap();
    let roots = [mesh.ca.root_pem(), next_root.root_pem()].concat();
    let trust = serde_json::json!({ "kind": "TrustBundle", "roots": roots });
    mesh.apply(&trust.to_string()).await;
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("roots 2"));
    sidecar.shutdown().await.unwrap();
}

/// A call without the `workload.spiffe.io: true` metadata is refused with InvalidArgument (the
/// next call on the same connection, with it, is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_the_security_header_is_refused() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let (ok, out) = run_client(&socket, &["no-header"]).await;
    assert!(ok, "{out}");
    assert!(out.starts_with("refused INVALID_ARGUMENT"), "{out}");
    assert!(out.contains("workload.spiffe.io"), "{out}");
    assert!(out.ends_with("then answered with the header"), "{out}");
    let m = sidecar.started.render_metrics();
    let refused = &[("method", "FetchX509SVID"), ("code", "InvalidArgument")];
    assert_eq!(
        metric(&m, "halyard_workload_api_refused_total", refused),
        1.0
    );
    sidecar.shutdown().await.unwrap();
}

/// The JWT-SVID profile is not served: Unimplemented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_unimplemented() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let (ok, out) = run_client(&socket, &["jwt"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "refused UNIMPLEMENTED");
    sidecar.shutdown().await.unwrap();
}

/// An open stream ends with Unavailable when the sidecar shuts down, and the socket file goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_and_the_socket_goes_when_the_sidecar_shuts_down() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let mut child = client(&socket, &["until-closed"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut lines).await.as_deref(), Some("update"));
    let streams = |s: &Sidecar| {
        metric(
            &s.started.render_metrics(),
            "halyard_workload_api_streams",
            &[("method", "FetchX509SVID")],
        )
    };
    assert_eq!(streams(&sidecar), 1.0);
    let stop = sidecar.stop.clone();
    stop.cancel();
    assert_eq!(
        next_line(&mut lines).await.as_deref(),
        Some("ended UNAVAILABLE")
    );
    sidecar.task.await.unwrap().unwrap();
    assert!(!socket.exists(), "socket file left behind");
    assert!(child.wait().await.unwrap().success());
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("no line from the client")
        .unwrap()
}

/// A socket file left by a dead sidecar is replaced; the new one has the configured mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_with_the_configured_mode() {
    let mesh = Mesh::with_dir().await;
    let socket = socket_in(&mesh);
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    // And the private folder a sidecar killed while binding leaves, with its socket.
    let private = mesh.dir.path().join(".wapi");
    std::fs::create_dir(&private).unwrap();
    drop(std::os::unix::net::UnixListener::bind(private.join("s")).unwrap());
    let sidecar = mesh
        .start(&with_socket(
            Spec::new("ratings", "v1"),
            &socket,
            Some("0660"),
        ))
        .await;
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert!(!private.exists());
    let (ok, out) = run_client(&socket, &["jwt"]).await;
    assert!(ok, "{out}");
    sidecar.shutdown().await.unwrap();
}

/// The default mode lets only the sidecar's user connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_by_default() {
    let mesh = Mesh::with_dir().await;
    let (sidecar, socket) = file_sidecar(&mesh).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
    sidecar.shutdown().await.unwrap();
}

/// A socket another sidecar serves, or a path that is not a socket, refuses the start and
/// names the field; neither is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_socket_path_refuses_the_start() {
    let mesh = Mesh::with_dir().await;
    let (first, socket) = file_sidecar(&mesh).await;
    let err = start_error(&mesh, &socket).await;
    assert!(err.contains("workload_api.socket"), "{err}");
    assert!(err.contains("served by another process"), "{err}");
    first.shutdown().await.unwrap();
    let file = mesh.dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let err = start_error(&mesh, &file).await;
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // Someone else's `.wapi` (here: a file) is not used either.
    std::fs::write(mesh.dir.path().join(".wapi"), "not a folder").unwrap();
    let err = start_error(&mesh, &socket).await;
    assert!(
        err.contains(".wapi exists and is not this user's folder"),
        "{err}"
    );
}

async fn start_error(mesh: &Mesh, socket: &Path) -> String {
    let path = mesh.write_config(&with_socket(Spec::new("reviews", "v1"), socket, None));
    let config = std::sync::Arc::new(halyard_sidecar::config::Config::load(&path).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let run = halyard_sidecar::run::run_until(config, stop, None);
    let err = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the start neither failed nor served")
        .expect_err("started on a taken socket path");
    format!("{err:#}")
}
