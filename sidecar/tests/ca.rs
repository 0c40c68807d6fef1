//! Mesh identity as a service, end to end: a CA server on loopback with its token records in a
//! real etcd (or a directory), sidecars that enroll with a bootstrap token, renew their leaves
//! from the CA under load, and a table of requests the CA must refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use halyard_certs::enroll::BootstrapToken;
use halyard_certs::{CertResolver, SpiffeId, WorkloadIdentity};
use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::ca::client::{CaClient, CaClientError};
use halyard_sidecar::ca::SignRequest;
use halyard_sidecar::test_util::{call, metric, tagged_echo, Mesh, Spec, TD};
use http::StatusCode;

fn service_yaml(name: &str, target: u16) -> String {
    format!("kind: Service\nname: {name}\nports:\n  - {{ name: tcp, port: 9080, protocol: tcp, targetPort: {target} }}\n")
}

fn id(account: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/ns/default/sa/{account}")).unwrap()
}

fn client(addr: std::net::SocketAddr) -> CaClient {
    let ca_id = SpiffeId::parse(&format!("spiffe://{TD}/halyard/ca")).unwrap();
    CaClient::new(&addr.to_string(), ca_id, Duration::from_secs(5))
}

fn folder(config: &halyard_sidecar::config::Config) -> &Path {
    config.file.identity.cert.parent().unwrap()
}

async fn etcd_mesh() -> (EtcdServer, Mesh) {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap();
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    (etcd, mesh)
}

/// Twenty sidecars start with nothing but the mesh root and a token each, enroll (keys made
/// locally, 0600), and then talk to each other over mTLS with their new leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sidecars_enroll_from_tokens() {
    let (_etcd, mesh) = etcd_mesh().await;
    let ca = mesh.ca_server("").await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "svc0").await;
    mesh.apply(&service_yaml("svc0", app.addr.port())).await;
    let mut sidecars = Vec::new();
    for i in 0..20 {
        let name = format!("svc{i}");
        let token = mesh.token(&name, Duration::from_secs(3600), 1).await;
        let mut spec = Spec::new(&name, "v1").enroll(ca.addr, &token, "24h");
        if i > 0 {
            spec = spec.upstream("svc0", 9080);
        }
        sidecars.push(mesh.start(&spec).await);
    }
    for (i, s) in sidecars.iter().enumerate() {
        assert_eq!(s.started.identity.current().id(), &id(&format!("svc{i}")));
        let key = folder(&s.config).join("key.pem");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        let leaf = WorkloadIdentity::load(&folder(&s.config).join("cert.pem"), &key).unwrap();
        let lifetime = leaf.not_after().duration_since(leaf.not_before()).unwrap();
        assert!(lifetime >= Duration::from_secs(24 * 3600), "{lifetime:?}");
        assert_eq!(
            metric(
                &s.started.render_metrics(),
                "halyard_cert_renewals_total",
                &[]
            ),
            0.0
        );
    }
    for s in &sidecars[1..] {
        s.wait_endpoints("svc0", 1).await;
        assert_eq!(call(s.upstream(0), b"hi").await.unwrap(), b"svc0:hi");
    }
    for s in sidecars {
        s.shutdown().await.unwrap();
    }
    ca.shutdown().await;
}

/// With no bundle file yet, enrollment trusts `ca_root` (a read-only file, as a Kubernetes
/// ConfigMap); the answer writes `bundle`, which the sidecar keeps current from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_enrollment_trusts_ca_root_and_writes_bundle() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh.ca_server("").await;
    let token = mesh.token("reviews", Duration::from_secs(60), 1).await;
    let spec = Spec::new("reviews", "v1").enroll(ca.addr, &token, "1h");
    let text = mesh.config_text(&spec);
    let config =
        halyard_sidecar::config::Config::parse(&text, &mesh.dir.path().join("x.toml")).unwrap();
    let bundle = config.file.identity.bundle.clone();
    let root = mesh.dir.path().join("root.pem");
    std::fs::rename(&bundle, &root).unwrap();
    let text = text.replacen(
        "[identity]\n",
        &format!("[identity]\nca_root = {root:?}\n"),
        1,
    );
    let path = mesh.dir.path().join("ca-root.toml");
    std::fs::write(&path, text).unwrap();
    let s = mesh.start_from(&path).await;
    assert_eq!(s.started.identity.current().id(), &id("reviews"));
    let written = std::fs::read_to_string(&bundle).unwrap();
    assert_eq!(written, std::fs::read_to_string(&root).unwrap());
    s.shutdown().await.unwrap();
    ca.shutdown().await;
}

/// A token is spent by its use: a second sidecar with the same token is refused, says why,
/// and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_token_is_refused() {
    let (_etcd, mesh) = etcd_mesh().await;
    let ca = mesh.ca_server("").await;
    let token = mesh.token("reviews", Duration::from_secs(3600), 1).await;
    let spec = Spec::new("reviews", "v1").enroll(ca.addr, &token, "1h");
    let first = mesh.start(&spec).await;
    let path = mesh.write_config(&spec);
    let config = Arc::new(halyard_sidecar::config::Config::load(&path).unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let err = halyard_sidecar::run::run_until(config.clone(), stop, None)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("used up"), "{text}");
    assert!(!folder(&config).join("cert.pem").exists());
    assert!(!folder(&config).join("key.pem").exists());
    first.shutdown().await.unwrap();
    ca.shutdown().await;
}

async fn refused(r: Result<halyard_sidecar::ca::Signed, CaClientError>) -> (StatusCode, String) {
    match r {
        Err(CaClientError::Refused { status, error, .. }) => (status, error),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn csr_with(f: impl FnOnce(&mut rcgen::CertificateParams)) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        id("reviews").as_str().try_into().unwrap(),
    )];
    f(&mut p);
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// The CA's admin port counts answers by endpoint and status and reports the signing
/// certificate's time left; on shutdown a connected client that never started its handshake
/// does not hold the server up, and the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_counts_its_answers_and_drains_on_shutdown() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh.ca_server("admin = \"127.0.0.1:0\"\n").await;
    let admin = ca.admin.unwrap();
    let bundle = Arc::new(mesh.ca.bundle().unwrap());
    let path = mesh.token("reviews", Duration::from_secs(60), 1).await;
    let token = BootstrapToken::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (_k, csr) = halyard_certs::workload::generate_csr(&id("reviews")).unwrap();
    let req = SignRequest {
        csr,
        ttl_seconds: None,
    };
    client(ca.addr)
        .enroll(bundle.clone(), &token, &req)
        .await
        .unwrap();
    let again = client(ca.addr).enroll(bundle.clone(), &token, &req).await;
    assert_eq!(refused(again).await.0, StatusCode::UNAUTHORIZED);
    let http = halyard_sidecar::test_util::http_client();
    let metrics =
        halyard_sidecar::test_util::wait_admin(&http, admin, "/metrics", "metrics", |c, _| {
            c == 200
        })
        .await;
    let count = |code: &str| {
        metric(
            &metrics,
            "halyard_ca_requests_total",
            &[("endpoint", "enroll"), ("code", code)],
        )
    };
    assert_eq!((count("200"), count("401")), (1.0, 1.0), "{metrics}");
    assert!(metric(&metrics, "halyard_ca_signing_cert_expiry_seconds", &[]) > 0.0);
    halyard_sidecar::test_util::wait_admin(&http, admin, "/readyz", "ready", |c, _| c == 200).await;

    let addr = ca.addr;
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), ca.shutdown())
        .await
        .expect("an idle client held the shutdown up");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting"
    );
}

/// Two CA replicas (each on its own intermediate) share the token records in etcd: ten
/// enrollments at once, split across them, with a three-use token: exactly three are signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ca_replicas_never_spend_a_token_use_twice() {
    let (_etcd, mesh) = etcd_mesh().await;
    let (ttl, ca_ttl) = (Duration::from_secs(3600), Duration::from_secs(48 * 3600));
    let ca1 = mesh
        .ca_server_with(&mesh.ca.intermediate("ca1", ca_ttl).unwrap(), "")
        .await;
    let ca2 = mesh
        .ca_server_with(&mesh.ca.intermediate("ca2", ca_ttl).unwrap(), "")
        .await;
    let path = mesh.token("reviews", ttl, 3).await;
    let token = BootstrapToken::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let bundle = Arc::new(mesh.ca.bundle().unwrap());
    let tries = (0..10).map(|i| {
        let c = client(if i % 2 == 0 { ca1.addr } else { ca2.addr });
        let (bundle, token) = (bundle.clone(), token.clone());
        async move {
            let (_k, csr) = halyard_certs::workload::generate_csr(&id("reviews")).unwrap();
            let req = SignRequest {
                csr,
                ttl_seconds: None,
            };
            c.enroll(bundle, &token, &req).await
        }
    });
    let results = futures::future::join_all(tries).await;
    let signed = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(signed, 3, "{results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        let (code, text) = refused(r).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{text}");
        assert!(text.contains("used up"), "{text}");
    }
    ca1.shutdown().await;
    ca2.shutdown().await;
}

/// Every bad request is refused with a status and a reason, and costs the token no use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_refuses_bad_tokens_and_bad_csrs() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh
        .ca_server("max_leaf_ttl = \"1h\"\nleaf_ttl = \"1h\"\n")
        .await;
    let c = client(ca.addr);
    let bundle = Arc::new(mesh.ca.bundle().unwrap());
    let read = |p: &Path| BootstrapToken::parse(&std::fs::read_to_string(p).unwrap()).unwrap();
    let good = read(&mesh.token("reviews", Duration::from_secs(3600), 1).await);
    let req = |csr: String, ttl: Option<u64>| SignRequest {
        csr,
        ttl_seconds: ttl,
    };
    let (_k, other_csr) = halyard_certs::workload::generate_csr(&id("ratings")).unwrap();
    let (_k, own_csr) = halyard_certs::workload::generate_csr(&id("reviews")).unwrap();
    let cases: Vec<(&str, SignRequest, StatusCode, &str)> = vec![
        (
            "other id",
            req(other_csr.clone(), None),
            StatusCode::FORBIDDEN,
            "credential is for",
        ),
        (
            "extra SAN",
            req(
                csr_with(|p| {
                    p.subject_alt_names
                        .push(rcgen::SanType::DnsName("x.example".try_into().unwrap()))
                }),
                None,
            ),
            StatusCode::BAD_REQUEST,
            "DNS SAN",
        ),
        (
            "CA bit",
            req(
                csr_with(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
                None,
            ),
            StatusCode::BAD_REQUEST,
            "CA certificate",
        ),
        (
            "long lifetime",
            req(own_csr.clone(), Some(7200)),
            StatusCode::BAD_REQUEST,
            "maximum",
        ),
        (
            "not a CSR",
            req("junk".into(), None),
            StatusCode::BAD_REQUEST,
            "CSR",
        ),
    ];
    for (what, r, status, text) in cases {
        let (s, e) = refused(c.enroll(bundle.clone(), &good, &r).await).await;
        assert_eq!(s, status, "{what}: {e}");
        assert!(e.contains(text), "{what}: {e}");
    }
    // Unknown and expired tokens.
    let (s, e) = refused(
        c.enroll(
            bundle.clone(),
            &BootstrapToken::generate(),
            &req(own_csr.clone(), None),
        )
        .await,
    )
    .await;
    assert_eq!(
        (s, e.as_str()),
        (StatusCode::UNAUTHORIZED, "unknown bootstrap token")
    );
    let expired = read(&mesh.token("reviews", Duration::ZERO, 1).await);
    let (s, e) = refused(
        c.enroll(bundle.clone(), &expired, &req(own_csr.clone(), None))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(e.contains("expired"), "{e}");
    // None of that spent the good token: it enrolls once, then is used up.
    let signed = c
        .enroll(bundle.clone(), &good, &req(own_csr.clone(), None))
        .await
        .unwrap();
    assert_eq!(halyard_certs::pem::certs(&signed.chain).unwrap().len(), 1);
    let (s, e) = refused(c.enroll(bundle.clone(), &good, &req(own_csr, None)).await).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(e.contains("used up"), "{e}");
    // Renewal: the client certificate is the credential, and binds the id.
    let leaf = mesh
        .ca
        .issue(&id("reviews"), Duration::from_secs(3600))
        .unwrap();
    let current =
        CertResolver::new(WorkloadIdentity::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap());
    let (s, e) = refused(
        c.renew(bundle.clone(), current.clone(), &req(other_csr, None))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (_k, csr) = halyard_certs::workload::generate_csr(&id("reviews")).unwrap();
    c.renew(bundle, current, &req(csr, None)).await.unwrap();
    ca.shutdown().await;
}

/// Leaves of 10 s renewed from the CA ten times on each side (about 40 s) while four callers
/// keep a flow busy each: not one request fails across the swaps on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_leaves_renew_ten_times_under_load_with_no_failed_requests() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh.ca_server("").await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", app.addr.port())).await;
    let t1 = mesh.token("ratings", Duration::from_secs(60), 1).await;
    let t2 = mesh.token("productpage", Duration::from_secs(60), 1).await;
    let ratings = mesh
        .start(&Spec::new("ratings", "v1").enroll(ca.addr, &t1, "10s"))
        .await;
    let pp = mesh
        .start(
            &Spec::new("productpage", "v1")
                .enroll(ca.addr, &t2, "10s")
                .upstream("ratings", 9080),
        )
        .await;
    pp.wait_endpoints("ratings", 1).await;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, failed, stop, addr) = (ok.clone(), failed.clone(), stop.clone(), pp.upstream(0));
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match tokio::time::timeout(Duration::from_secs(5), call(addr, b"x")).await {
                    Ok(Ok(v)) if v == b"ratings:x" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Traffic goes on until each side has swapped its leaf ten times.
    let (mut r1, mut r2) = (ratings.started.reloads.clone(), pp.started.reloads.clone());
    let renewed = tokio::time::timeout(Duration::from_secs(180), async {
        r1.wait_for(|n| *n >= 10).await.is_ok() && r2.wait_for(|n| *n >= 10).await.is_ok()
    })
    .await;
    stop.cancel();
    let (n1, n2) = (*r1.borrow(), *r2.borrow());
    assert_eq!(renewed, Ok(true), "renewals in 3 minutes: {n1} and {n2}");
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 50);
    let m = pp.started.render_metrics();
    assert!(metric(&m, "halyard_cert_renewals_total", &[]) >= 10.0);
    assert_eq!(metric(&m, "halyard_cert_renewal_failures_total", &[]), 0.0);
    assert!(metric(&m, "halyard_cert_expiry_seconds", &[]) > 0.0);
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
    ca.shutdown().await;
}

/// A `reviews` sidecar enrolled from a fresh CA with `uses` token uses and `ttl` leaves; the CA
/// is then shut down. Returns the sidecar and the CA's address (to start it again there).
async fn enrolled_then_ca_gone(
    mesh: &Mesh,
    ttl: &str,
    uses: u32,
) -> (halyard_sidecar::test_util::Sidecar, std::net::SocketAddr) {
    let ca = mesh.ca_server("").await;
    let addr = ca.addr;
    let token = mesh.token("reviews", Duration::from_secs(60), uses).await;
    let s = mesh
        .start(&Spec::new("reviews", "v1").enroll(addr, &token, ttl))
        .await;
    ca.shutdown().await;
    (s, addr)
}

/// With the CA gone the sidecar keeps its leaf, counts failures and says so on `/readyz`; once
/// the CA is back, the next retry renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_keeps_the_old_leaf_and_retries() {
    let mesh = Mesh::with_dir().await;
    let (s, addr) = enrolled_then_ca_gone(&mesh, "6s", 1).await;
    let first = s.started.identity.current();
    let admin = s.started.admin;
    let client = halyard_sidecar::test_util::http_client();
    halyard_sidecar::test_util::wait_admin(
        &client,
        admin,
        "/readyz",
        "renewal failing",
        |code, body| code == 200 && body.contains("certificate renewal failing"),
    )
    .await;
    assert!(
        metric(
            &s.started.render_metrics(),
            "halyard_cert_renewal_failures_total",
            &[]
        ) >= 1.0
    );
    assert_eq!(s.started.identity.current().serial(), first.serial());
    let ca = mesh.ca_server(&format!("listen = \"{addr}\"\n")).await;
    let mut reloads = s.started.reloads.clone();
    tokio::time::timeout(Duration::from_secs(10), reloads.wait_for(|n| *n >= 1))
        .await
        .expect("renewed once the CA is back")
        .unwrap();
    assert_ne!(s.started.identity.current().serial(), first.serial());
    halyard_sidecar::test_util::wait_admin(
        &client,
        admin,
        "/readyz",
        "no warning",
        |code, body| code == 200 && !body.contains("warning"),
    )
    .await;
    s.shutdown().await.unwrap();
    ca.shutdown().await;
}

/// A leaf that expires while the CA is away turns the sidecar unready (peers would refuse it);
/// when the CA is back the sidecar enrolls again with its token and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_leaf_turns_the_sidecar_unready_until_renewed() {
    let mesh = Mesh::with_dir().await;
    let (s, addr) = enrolled_then_ca_gone(&mesh, "3s", 2).await;
    let admin = s.started.admin;
    let client = halyard_sidecar::test_util::http_client();
    halyard_sidecar::test_util::wait_admin(&client, admin, "/readyz", "unready", |code, body| {
        code == 503 && body.contains("certificate expired")
    })
    .await;
    let ca = mesh.ca_server(&format!("listen = \"{addr}\"\n")).await;
    halyard_sidecar::test_util::wait_admin(&client, admin, "/readyz", "ready", |code, _| {
        code == 200
    })
    .await;
    assert!(s.started.identity.current().not_after() > SystemTime::now());
    s.shutdown().await.unwrap();
    ca.shutdown().await;
}

/// A sidecar restarted after its leaf expired enrolls again with its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_an_expired_leaf_re_enrolls() {
    let mesh = Mesh::with_dir().await;
    let ca = mesh.ca_server("").await;
    let token = mesh.token("reviews", Duration::from_secs(60), 2).await;
    let spec = Spec::new("reviews", "v1").enroll(ca.addr, &token, "2s");
    let path = mesh.write_config(&spec);
    let config = Arc::new(halyard_sidecar::config::Config::load(&path).unwrap());
    let run = |config| async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(halyard_sidecar::run::run_until(
            config,
            stop.clone(),
            Some(tx),
        ));
        let started = rx.await.unwrap();
        let ident = started.identity.current();
        stop.cancel();
        task.await.unwrap().unwrap();
        ident
    };
    let first = run(config.clone()).await;
    // Let the leaf on disk expire: time has to pass, there is no event to wait for.
    let left = first
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    let second = run(config).await;
    assert_ne!(first.serial(), second.serial());
    assert!(second.not_after() > SystemTime::now());
    ca.shutdown().await;
}

/// Revoking an id in the registry closes the flows already open from it within a second, and
/// refuses its new ones at the handshake; revoking the server side refuses it from the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_id_closes_its_flows_and_refuses_new_ones() {
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", app.addr.port())).await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    assert_eq!(call(pp.upstream(0), b"x").await.unwrap(), b"ratings:x");
    let open = open_flow(pp.upstream(0)).await;
    let revoke = format!("kind: Revocations\nids: [\"{}\"]\n", id("productpage"));
    mesh.apply(&revoke).await;
    closed_soon(open, "revoked caller").await;
    ratings
        .wait_snapshot("revocations", |s| s.revocations.is_some())
        .await;
    pp.wait_snapshot("revocations", |s| s.revocations.is_some())
        .await;
    let refused = call(pp.upstream(0), b"y").await;
    assert!(
        refused.as_ref().map_or(true, |v| v.is_empty()),
        "a revoked caller was served: {refused:?}"
    );

    // Lifting the revocation lets it call again; revoking the callee refuses it from the caller.
    mesh.apply("kind: Revocations\nids: []\n").await;
    pp.wait_snapshot("no revocations", |s| {
        s.revocations.as_ref().is_some_and(|r| r.ids.is_empty())
    })
    .await;
    ratings
        .wait_snapshot("no revocations", |s| {
            s.revocations.as_ref().is_some_and(|r| r.ids.is_empty())
        })
        .await;
    assert_eq!(call(pp.upstream(0), b"z").await.unwrap(), b"ratings:z");
    mesh.apply(&format!(
        "kind: Revocations\nids: [\"{}\"]\n",
        id("ratings")
    ))
    .await;
    pp.wait_snapshot("ratings revoked", |s| {
        s.revocations.as_ref().is_some_and(|r| !r.ids.is_empty())
    })
    .await;
    let refused = call(pp.upstream(0), b"w").await;
    assert!(
        refused.as_ref().map_or(true, |v| v.is_empty()),
        "a revoked callee was used: {refused:?}"
    );
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

/// An open flow, left waiting for its answer: the app answers only once the client half-closes.
async fn open_flow(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
    open.write_all(b"pending").await.unwrap();
    open
}

/// The flow ends within 2 s, unserved.
async fn closed_soon(mut open: tokio::net::TcpStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "{what}: the open flow was not closed");
    assert!(!buf.starts_with(b"ratings:"), "{what}: served: {buf:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{what}: closed after {:?}",
        t0.elapsed()
    );
}

/// Revoking one leaf by serial closes the connections that leaf authenticated, on the callee's
/// side (the caller's leaf) and on the caller's (the callee's leaf), within a second or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_serial_closes_the_connections_of_that_leaf() {
    let mesh = Mesh::with_dir().await;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", app.addr.port())).await;
    let ratings = mesh.start(&Spec::new("ratings", "v1")).await;
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("ratings", 9080))
        .await;
    pp.wait_endpoints("ratings", 1).await;
    let serial = |s: &halyard_sidecar::test_util::Sidecar| {
        halyard_certs::revocation::serial_hex(s.started.identity.current().serial())
    };
    for (revoked, what) in [
        (serial(&pp), "caller's leaf"),
        (serial(&ratings), "callee's leaf"),
    ] {
        assert_eq!(call(pp.upstream(0), b"x").await.unwrap(), b"ratings:x");
        let open = open_flow(pp.upstream(0)).await;
        mesh.apply(&format!("kind: Revocations\nserials: [\"{revoked}\"]\n"))
            .await;
        closed_soon(open, what).await;
        for s in [&pp, &ratings] {
            s.wait_snapshot("serial revoked", |s| {
                s.revocations
                    .as_ref()
                    .is_some_and(|r| !r.serials.is_empty())
            })
            .await;
        }
        let refused = call(pp.upstream(0), b"y").await;
        assert!(
            refused.map_or(true, |v| v.is_empty()),
            "{what}: served after revocation"
        );
        mesh.apply("kind: Revocations\nserials: []\n").await;
        for s in [&pp, &ratings] {
            s.wait_snapshot("lifted", |s| {
                s.revocations.as_ref().is_some_and(|r| r.serials.is_empty())
            })
            .await;
        }
    }
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
}

/// A deny list that does not validate is quarantined: the last good one stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_deny_list_is_quarantined() {
    let mesh = Mesh::with_dir().await;
    mesh.apply(&format!("kind: Revocations\nids: [\"{}\"]\n", id("a")))
        .await;
    let s = mesh.start(&Spec::new("reviews", "v1")).await;
    s.wait_snapshot("revocations", |s| s.revocations.is_some())
        .await;
    let file = Path::new(&mesh.registry["file://".len()..]).join("default/revocations.json");
    std::fs::write(&file, r#"{"kind":"Revocations","ids":["not an id"]}"#).unwrap();
    s.wait_snapshot("rejected", |s| !s.rejected.is_empty())
        .await;
    let snap = s.started.snapshot.borrow().clone();
    assert!(snap.revocations.as_ref().unwrap().ids.contains(&id("a")));
    let why = snap.rejected.values().next().unwrap();
    assert!(why.contains("ids[0]"), "{why}");
    s.shutdown().await.unwrap();
}

/// The CA signs nothing for a revoked id: enrollment is refused with a reason, and a renewal's
/// client certificate is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_nothing_for_a_revoked_id() {
    let mesh = Mesh::with_dir().await;
    mesh.apply(&format!(
        "kind: Revocations\nids: [\"{}\"]\n",
        id("reviews")
    ))
    .await;
    let ca = mesh.ca_server("").await;
    let c = client(ca.addr);
    let bundle = Arc::new(mesh.ca.bundle().unwrap());
    let token = BootstrapToken::parse(
        &std::fs::read_to_string(mesh.token("reviews", Duration::from_secs(60), 1).await).unwrap(),
    )
    .unwrap();
    let (_k, csr) = halyard_certs::workload::generate_csr(&id("reviews")).unwrap();
    let req = SignRequest {
        csr,
        ttl_seconds: None,
    };
    // The CA reads the deny list before it serves.
    let (status, error) = refused(c.enroll(bundle.clone(), &token, &req).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error.contains("revoked"), "{error}");
    let leaf = mesh
        .ca
        .issue(&id("reviews"), Duration::from_secs(3600))
        .unwrap();
    let current =
        CertResolver::new(WorkloadIdentity::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap());
    let renewed = c.renew(bundle, current, &req).await;
    assert!(renewed.is_err(), "{renewed:?}");
    ca.shutdown().await;
}

fn trust_json(roots: &[&str]) -> String {
    serde_json::json!({ "kind": "TrustBundle", "roots": roots.concat() }).to_string()
}

fn root_count(s: &halyard_registry::Snapshot) -> usize {
    s.trust
        .as_ref()
        .map_or(0, |t| halyard_certs::pem::certs(&t.roots).unwrap().len())
}

/// A root rotation through the registry under load: add the new root, so everyone trusts
/// both; the CA signs with an intermediate of the new root; every leaf renews onto it; the old
/// root is removed. Not one request fails, and a sidecar enrolled afterwards talks to the rest
/// with the new root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_load_with_no_failed_requests() {
    let mesh = Mesh::with_dir().await;
    let old_root = mesh.ca.root_pem();
    mesh.apply(&trust_json(&[&old_root])).await;
    let ca1 = mesh.ca_server("").await;
    let ca_addr = ca1.addr;
    let app = tagged_echo("127.0.0.1:0".parse().unwrap(), "ratings").await;
    mesh.apply(&service_yaml("ratings", app.addr.port())).await;
    let t1 = mesh.token("ratings", Duration::from_secs(60), 1).await;
    let t2 = mesh.token("productpage", Duration::from_secs(60), 1).await;
    let ratings = mesh
        .start(&Spec::new("ratings", "v1").enroll(ca_addr, &t1, "4s"))
        .await;
    let pp = mesh
        .start(
            &Spec::new("productpage", "v1")
                .enroll(ca_addr, &t2, "4s")
                .upstream("ratings", 9080),
        )
        .await;
    pp.wait_endpoints("ratings", 1).await;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, failed, stop, addr) = (ok.clone(), failed.clone(), stop.clone(), pp.upstream(0));
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match tokio::time::timeout(Duration::from_secs(5), call(addr, b"x")).await {
                    Ok(Ok(v)) if v == b"ratings:x" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let renewals = |s: &halyard_sidecar::test_util::Sidecar| *s.started.reloads.borrow();
    let wait_renewals = |s: &halyard_sidecar::test_util::Sidecar, n: u64| {
        let mut rx = s.started.reloads.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| *v >= n))
                .await
                .expect("renewed")
                .unwrap();
        }
    };

    // 1. Add the new root: everyone trusts both.
    let new_root = halyard_certs::MeshCa::create(mesh.ca.trust_domain()).unwrap();
    let both = trust_json(&[&old_root, &new_root.root_pem()]);
    mesh.apply(&both).await;
    for s in [&ratings, &pp] {
        s.wait_snapshot("both roots", |s| root_count(s) == 2).await;
    }
    // 2. The CA signs with an intermediate of the new root (same address, as a rolled replica).
    ca1.shutdown().await;
    let inter = new_root
        .intermediate("Halyard CA server 2", Duration::from_secs(3600))
        .unwrap();
    let ca2 = mesh
        .ca_server_with(&inter, &format!("listen = \"{ca_addr}\"\n"))
        .await;
    // 3. Every leaf renews onto the new chain (leaf + new intermediate).
    let (r0, p0) = (renewals(&ratings), renewals(&pp));
    wait_renewals(&ratings, r0 + 2).await;
    wait_renewals(&pp, p0 + 2).await;
    for s in [&ratings, &pp] {
        let chain = std::fs::read_to_string(&s.config.file.identity.cert).unwrap();
        assert_eq!(halyard_certs::pem::certs(&chain).unwrap().len(), 2);
    }
    // 4. Remove the old root.
    mesh.apply(&trust_json(&[&new_root.root_pem()])).await;
    for s in [&ratings, &pp] {
        s.wait_snapshot("new root only", |s| root_count(s) == 1)
            .await;
    }
    let (r1, p1) = (renewals(&ratings), renewals(&pp));
    wait_renewals(&ratings, r1 + 1).await;
    wait_renewals(&pp, p1 + 1).await;
    // A newcomer enrolls under the new root and is served by the rotated sidecars.
    let t3 = mesh.token("details", Duration::from_secs(60), 1).await;
    let mut spec = Spec::new("details", "v1")
        .enroll(ca_addr, &t3, "4s")
        .upstream("ratings", 9080);
    spec.bundle = Some(new_root.root_pem());
    let details = mesh.start(&spec).await;
    details.wait_endpoints("ratings", 1).await;
    assert_eq!(call(details.upstream(0), b"x").await.unwrap(), b"ratings:x");
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "ok: {}",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    details.shutdown().await.unwrap();
    pp.shutdown().await.unwrap();
    ratings.shutdown().await.unwrap();
    ca2.shutdown().await;
}

/// A trust bundle in the registry that is empty or not PEM is quarantined; the last good one
/// stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_trust_bundle_is_quarantined() {
    let mesh = Mesh::with_dir().await;
    mesh.apply(&trust_json(&[&mesh.ca.root_pem()])).await;
    let s = mesh.start(&Spec::new("reviews", "v1")).await;
    s.wait_snapshot("trust", |s| root_count(s) == 1).await;
    let file = Path::new(&mesh.registry["file://".len()..]).join("default/trust.json");
    for bad in [
        r#"{"kind":"TrustBundle","roots":""}"#,
        r#"{"kind":"TrustBundle","roots":"hello"}"#,
    ] {
        std::fs::write(&file, bad).unwrap();
        s.wait_snapshot("rejected", |s| !s.rejected.is_empty())
            .await;
        let snap = s.started.snapshot.borrow().clone();
        assert_eq!(root_count(&snap), 1);
        assert!(
            snap.rejected.values().any(|e| e.contains("roots")),
            "{:?}",
            snap.rejected
        );
        std::fs::write(&file, trust_json(&[&mesh.ca.root_pem()])).unwrap();
        s.wait_snapshot("cleared", |s| s.rejected.is_empty()).await;
    }
    s.shutdown().await.unwrap();
}
