//! The etcd backend against a real etcd (one per test, started by the test-util harness).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use halyard_registry::model::{parse_documents, Endpoint};
use halyard_registry::test_util::EtcdServer;
use halyard_registry::{open_with, Object, Options, Origin, Registry, Snapshot};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

const WAIT: Duration = Duration::from_secs(15);

fn opts() -> Options {
    let mut o = Options::new("default");
    o.lease_ttl = Duration::from_secs(2);
    o
}

async fn open(url: &str, opts: Options) -> Arc<dyn Registry> {
    open_with(url, opts).await.unwrap()
}

/// Waits for a snapshot satisfying `cond`, returning it.
async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    cond: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let res = tokio::time::timeout(WAIT, rx.wait_for(|s| cond(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match res {
        Ok(Ok(s)) => s,
        _ => panic!(
            "timed out waiting for {what}; last snapshot: {:?}",
            rx.borrow().content()
        ),
    }
}

/// Polls `cond` every 20 ms until it holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service(name: &str, port: u16) -> String {
    format!(
        r#"{{"kind":"Service","name":"{name}","ports":[{{"name":"http","port":{port},"protocol":"http"}}]}}"#
    )
}

fn put(etcd: &EtcdServer, key: &str, value: &str) {
    etcd.etcdctl_ok(&["put", &format!("/halyard/default/{key}"), value]);
}

fn endpoint(id: &str) -> Endpoint {
    let text = format!(
        "kind: Endpoint\nid: {id}\nservice: reviews\naddress: 127.0.0.1:15443\nidentity: spiffe://mesh.local/ns/default/sa/reviews\nlabels: {{version: v1}}"
    );
    match parse_documents("ep", &text).unwrap().remove(0) {
        Object::Endpoint(e) => e,
        _ => unreachable!(),
    }
}

/// The content a fresh registry lists now: Get(prefix) at the current revision.
async fn fresh_listing(url: &str) -> Arc<Snapshot> {
    let reg = open(url, opts()).await;
    let snap = reg.snapshot();
    assert_eq!(snap.origin, Origin::Live);
    snap
}

// One test for single changes and a burst: both watch the same key on one etcd, started once.
#[tokio::test]
async fn the_watch_sees_each_change_once_in_order() {
    let etcd = EtcdServer::start();
    let reg = open(&etcd.url(), opts()).await;
    let mut rx = reg.watch();
    // One change at a time: each is seen, with a strictly higher revision.
    let mut last_rev = reg.snapshot().revision;
    for port in 1..=10u16 {
        put(&etcd, "services/seq", &service("seq", port));
        let s = until(&mut rx, "the next port", |s| {
            s.service("seq")
                .is_some_and(|svc| svc.ports[0].port == port)
        })
        .await;
        assert!(
            s.revision > last_rev,
            "revision went from {last_rev} to {}",
            s.revision
        );
        last_rev = s.revision;
    }
    // A burst: every snapshot seen moves forward, ports never go back, the last one wins.
    let writer = {
        let ep = etcd.endpoint();
        std::thread::spawn(move || {
            let mut client = std::process::Command::new("sh");
            let script: String = (11..=60)
                .map(|p| format!("etcdctl --endpoints={ep} put /halyard/default/services/seq '{}' >/dev/null\n", service("seq", p)))
                .collect();
            client
                .env("ETCDCTL_API", "3")
                .args(["-c", &script])
                .status()
                .unwrap()
        })
    };
    let mut seen_port = 10;
    loop {
        tokio::time::timeout(WAIT, rx.changed())
            .await
            .unwrap()
            .unwrap();
        let s = rx.borrow_and_update().clone();
        let port = s.service("seq").unwrap().ports[0].port;
        assert!(s.revision > last_rev, "revision repeated or went back");
        assert!(
            port > seen_port,
            "port went from {seen_port} to {port}: a change was applied twice or out of order"
        );
        last_rev = s.revision;
        seen_port = port;
        if port == 60 {
            break;
        }
    }
    assert!(writer.join().unwrap().success());
    // Deletes are seen too, and the result equals a fresh Get(prefix).
    etcd.etcdctl_ok(&["del", "/halyard/default/services/seq"]);
    let s = until(&mut rx, "the delete", |s| s.service("seq").is_none()).await;
    let fresh = fresh_listing(&etcd.url()).await;
    assert_eq!(s.content(), fresh.content());
    assert_eq!(s.revision, fresh.revision);
}

/// A TCP proxy that can cut every connection and refuse new ones.
struct Proxy {
    port: u16,
    blocked: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (blocked, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut rx = rx;
            loop {
                tokio::select! {
                    Ok((down, _)) = listener.accept() => {
                        if *rx.borrow() { continue; }
                        let up = upstream.clone();
                        conns.spawn(async move {
                            if let Ok(mut up) = TcpStream::connect(up).await {
                                let mut down = down;
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                    Ok(()) = rx.changed() => if *rx.borrow() { conns.abort_all(); },
                }
            }
        });
        Proxy {
            port,
            blocked,
            task,
        }
    }

    fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    fn set_blocked(&self, b: bool) {
        self.blocked.send_replace(b);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Relisting is how the watcher converges after a compaction it missed: one behaviour, one etcd.
#[tokio::test]
async fn a_compaction_missed_while_disconnected_is_caught_up_by_a_relist() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::start(etcd.endpoint()).await;
    put(&etcd, "services/keep", &service("keep", 80));
    put(&etcd, "services/gone", &service("gone", 81));
    let reg = open(&proxy.url(), opts()).await;
    let mut rx = reg.watch();
    until(&mut rx, "the first listing", |s| s.services.len() == 2).await;
    proxy.set_blocked(true);
    eventually("the watcher to notice", || reg.staleness() > Duration::ZERO).await;
    // While it is away: change, delete, add, and compact everything it has not seen.
    put(&etcd, "services/keep", &service("keep", 90));
    etcd.etcdctl_ok(&["del", "/halyard/default/services/gone"]);
    for i in 0..5 {
        put(
            &etcd,
            &format!("services/new{i}"),
            &service(&format!("new{i}"), 100 + i),
        );
    }
    let rev = fresh_listing(&etcd.url()).await.revision;
    etcd.etcdctl_ok(&["compact", &rev.to_string()]);
    proxy.set_blocked(false);
    let s = until(&mut rx, "convergence after compaction", |s| {
        s.revision >= rev
    })
    .await;
    let fresh = fresh_listing(&etcd.url()).await;
    assert_eq!(s.revision, fresh.revision);
    assert_eq!(s.content(), fresh.content());
    assert!(
        s.service("gone").is_none(),
        "a delete lost to compaction must still be seen"
    );
    assert_eq!(s.service("keep").unwrap().ports[0].port, 90);
    assert_eq!(reg.staleness(), Duration::ZERO);
}

// Stale snapshot served while etcd is down, convergence when it is back: one outage, one etcd.
#[tokio::test]
async fn the_watcher_rides_out_an_etcd_restart() {
    let mut etcd = EtcdServer::start();
    put(&etcd, "services/a", &service("a", 80));
    let reg = open(&etcd.url(), opts()).await;
    let mut rx = reg.watch();
    until(&mut rx, "a", |s| s.service("a").is_some()).await;
    etcd.stop();
    eventually("staleness to show", || reg.staleness() > Duration::ZERO).await;
    assert!(
        reg.snapshot().service("a").is_some(),
        "the last snapshot keeps serving"
    );
    etcd.restart();
    put(&etcd, "services/b", &service("b", 81));
    etcd.etcdctl_ok(&["del", "/halyard/default/services/a"]);
    let s = until(&mut rx, "b and not a", |s| {
        s.service("b").is_some() && s.service("a").is_none()
    })
    .await;
    let fresh = fresh_listing(&etcd.url()).await;
    assert_eq!(s.content(), fresh.content());
    assert_eq!(s.revision, fresh.revision);
    eventually("staleness back to zero", || {
        reg.staleness() == Duration::ZERO
    })
    .await;
}

#[tokio::test]
async fn endpoint_of_a_dead_process_disappears_soon_after_its_ttl() {
    let etcd = EtcdServer::start();
    let observer = open(&etcd.url(), opts()).await;
    let mut rx = observer.watch();
    // The "process": its own runtime on its own thread, holding the lease.
    let url = etcd.url();
    let (dead_tx, dead_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let proc = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (reg, handle) = rt.block_on(async {
            let reg = open(&url, opts()).await;
            let handle = reg.register(endpoint("ep-1")).await.unwrap();
            (reg, handle)
        });
        up_tx.send(()).unwrap();
        dead_rx.recv().unwrap();
        // Dies without deregistering: keepalives stop and connections drop with the runtime.
        std::mem::forget(handle);
        std::mem::forget(reg);
        rt.shutdown_background();
    });
    up_rx.await.unwrap();
    until(&mut rx, "the endpoint", |s| {
        s.endpoints_of("reviews").count() == 1
    })
    .await;
    let died = Instant::now();
    dead_tx.send(()).unwrap();
    proc.join().unwrap();
    until(&mut rx, "the endpoint to expire", |s| {
        s.endpoints_of("reviews").count() == 0
    })
    .await;
    // The TTL plus 1.5 s: by the lease, with room for etcd's expiry sweep (every 500 ms) and a
    // loaded machine.
    let took = died.elapsed();
    assert!(
        took <= Duration::from_millis(3500),
        "endpoint took {took:?} to disappear (TTL 2 s)"
    );
    eprintln!("endpoint disappeared {took:?} after its process died");
}

// Re-registration after a lost lease, then deregistration: one registration's life, one etcd.
#[tokio::test]
async fn a_registration_outlives_a_lost_lease_until_deregistered() {
    let etcd = EtcdServer::start();
    let reg = open(&etcd.url(), opts()).await;
    let mut rx = reg.watch();
    let handle = reg.register(endpoint("ep-2")).await.unwrap();
    let first = until(&mut rx, "the endpoint", |s| {
        s.endpoints_of("reviews").count() == 1
    })
    .await;
    let lease = handle.lease_id().unwrap();
    etcd.etcdctl_ok(&["lease", "revoke", &format!("{lease:x}")]);
    until(&mut rx, "the endpoint to be re-registered", |s| {
        s.revision > first.revision + 1 && s.endpoints_of("reviews").count() == 1
    })
    .await;
    eventually("a new lease", || {
        handle.lease_id().is_some_and(|l| l != lease)
    })
    .await;
    reg.deregister(handle).await.unwrap();
    until(&mut rx, "the endpoint to go", |s| {
        s.endpoints_of("reviews").count() == 0
    })
    .await;
}

const GOOD_POLICY: &str = r#"{"kind":"Policy","service":"ratings","rules":[{"action":"deny","from":{"services":["evil"]}}]}"#;

// Quarantine and its report in the status key follow the same bad writes to one etcd: one test.
#[tokio::test]
async fn an_invalid_value_is_quarantined_until_a_good_one_arrives() {
    let etcd = EtcdServer::start();
    let mut o = opts();
    o.sidecar_id = Some("sidecar-1".into());
    let reg = open(&etcd.url(), o).await;
    let mut rx = reg.watch();
    put(&etcd, "policies/ratings", GOOD_POLICY);
    until(&mut rx, "the good policy", |s| {
        s.policy("ratings").is_some()
    })
    .await;
    let key = "/halyard/default/policies/ratings";
    let cases = [
        ("{\"kind\": \"Policy\", \"service\": ", "not valid JSON"),
        (
            r#"{"kind":"Policy","service":"ratings","rules":[{"action":"permit"}]}"#,
            "rules[0].action",
        ),
    ];
    for (i, (bad, reason)) in cases.iter().enumerate() {
        put(&etcd, "policies/ratings", bad);
        // Another key written afterwards still flows.
        let other = format!("other{i}");
        put(&etcd, &format!("services/{other}"), &service(&other, 80));
        let s = until(&mut rx, "the other key", |s| s.service(&other).is_some()).await;
        let kept = s.policy("ratings").expect("last good value kept");
        assert_eq!(
            kept.rules[0].from.as_ref().unwrap().services[0].as_str(),
            "evil"
        );
        let why = s.rejected.get(key).expect("key quarantined");
        assert!(why.contains(reason) && why.starts_with(key), "{why}");
        assert_eq!(reg.rejected_total(), i as u64 + 1);
        // The status key names the key and the reason.
        let mut status = String::new();
        eventually("the status key", || {
            status = etcd.etcdctl_ok(&[
                "get",
                "--print-value-only",
                "/halyard/default/status/sidecar-1",
            ]);
            status.contains(&reason.replace('"', "\\\""))
        })
        .await;
        let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
        assert_eq!(v["rejected"][0]["key"], key);
        assert!(v["rejected"][0]["error"].as_str().unwrap().contains(reason));
        assert!(v["revision"].as_i64().unwrap() >= s.revision);
    }
    // A good value lifts the quarantine.
    put(&etcd, "policies/ratings", GOOD_POLICY);
    until(&mut rx, "the quarantine to lift", |s| s.rejected.is_empty()).await;
}

#[tokio::test]
async fn persisted_snapshot_serves_while_etcd_is_down() {
    persisted_snapshot_served(false).await;
}

/// The same with an etcd user: the log-in waits for etcd, it does not stop the start.
#[tokio::test]
async fn persisted_snapshot_serves_while_etcd_is_down_with_credentials() {
    persisted_snapshot_served(true).await;
}

async fn persisted_snapshot_served(with_credentials: bool) {
    let mut etcd = EtcdServer::start();
    let state = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.state_dir = Some(state.path().to_owned());
    if with_credentials {
        etcd.enable_auth("rootpw");
        etcd.add_user("rw", "pw", "readwrite", "/halyard/default/");
        o.access.credentials = Some(halyard_registry::Credentials::new("rw", "pw").unwrap());
    }
    put(&etcd, "services/a", &service("a", 80));
    put(&etcd, "policies/ratings", GOOD_POLICY);
    {
        let reg = open(&etcd.url(), o.clone()).await;
        assert_eq!(reg.snapshot().services.len(), 1);
        let file = state.path().join("registry-default.json");
        eventually("the snapshot on disk", || {
            std::fs::read_to_string(&file)
                .is_ok_and(|t| t.contains("ratings") && t.contains("\"a\""))
        })
        .await;
    }
    etcd.stop();
    let t0 = Instant::now();
    let reg = open(&etcd.url(), o.clone()).await;
    let opened = t0.elapsed();
    assert!(opened < Duration::from_secs(5), "open took {opened:?}");
    let s = reg.snapshot();
    assert!(
        s.loaded_from_disk() && s.stale_since().is_some(),
        "{:?}",
        s.origin
    );
    assert!(s.service("a").is_some() && s.policy("ratings").is_some());
    assert!(reg.staleness() > Duration::ZERO);
    // When etcd comes back, the live registry takes over.
    etcd.restart();
    let mut rx = reg.watch();
    let s = until(&mut rx, "the live snapshot", |s| s.origin == Origin::Live).await;
    assert!(s.service("a").is_some());
}

#[tokio::test]
async fn last_good_value_survives_a_restart_while_the_key_is_bad() {
    let etcd = EtcdServer::start();
    let state = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.state_dir = Some(state.path().to_owned());
    put(&etcd, "policies/ratings", GOOD_POLICY);
    {
        let reg = open(&etcd.url(), o.clone()).await;
        assert!(reg.snapshot().policy("ratings").is_some());
        let file = state.path().join("registry-default.json");
        eventually("the snapshot on disk", || {
            std::fs::read_to_string(&file).is_ok_and(|t| t.contains("ratings"))
        })
        .await;
    }
    put(&etcd, "policies/ratings", "{broken");
    let reg = open(&etcd.url(), o).await;
    let s = reg.snapshot();
    assert_eq!(s.origin, Origin::Live);
    assert!(
        s.policy("ratings").is_some(),
        "last good value from disk kept"
    );
    assert!(s.rejected.contains_key("/halyard/default/policies/ratings"));
}

/// An etcd with authentication on (tokens live 2 s) and a user `reader` that may only read the
/// mesh's keys: a registry opened as `reader` lists and watches, keeps following once its token
/// has expired and after an etcd restart (which forgets every token), and says clearly what is
/// wrong with a wrong password, no credentials, or a user without permission.
#[tokio::test]
async fn an_etcd_user_with_read_permission_follows_the_mesh_through_token_expiry() {
    use halyard_registry::{Credentials, RegistryError};
    let mut etcd = EtcdServer::start_with([127, 0, 0, 1].into(), &["--auth-token-ttl=2"]);
    etcd.enable_auth("rootpw");
    etcd.add_user("reader", "r3ad:er", "read", "/halyard/default/");
    etcd.add_user("elsewhere", "pw", "read", "/other/");
    put(&etcd, "services/a", &service("a", 80));

    let mut o = opts();
    o.access.credentials = Some(Credentials::new("reader", "r3ad:er").unwrap());
    let reg = open(&etcd.url(), o).await;
    let mut rx = reg.watch();
    until(&mut rx, "the listing as reader", |s| {
        s.services.contains_key("a")
    })
    .await;
    assert_eq!(reg.staleness(), Duration::ZERO);

    // Past the token's TTL: the watch created with it keeps delivering. etcd sweeps expired
    // simple tokens once a second (`simpleTokenTTLResolution`) and renews a token's TTL on
    // each use, so a token is gone at most 3 s after its last use: 4 s leaves a second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    put(&etcd, "services/b", &service("b", 81));
    until(&mut rx, "a put after the token expired", |s| {
        s.services.contains_key("b")
    })
    .await;

    // A restart forgets every token: the watch is re-created with a new one.
    etcd.restart();
    put(&etcd, "services/c", &service("c", 82));
    until(&mut rx, "a put after etcd restarted", |s| {
        s.services.contains_key("c")
    })
    .await;
    eventually("contact after the restart", || {
        reg.staleness() == Duration::ZERO
    })
    .await;

    // Each refusal names what to change, and nothing is served from a refused listing.
    let refused = |creds: Option<Credentials>| {
        let url = etcd.url();
        async move {
            let mut o = opts();
            o.access.credentials = creds;
            o.timeout = Duration::from_secs(2);
            match open_with(&url, o).await {
                Err(e) => e,
                Ok(_) => panic!("opened although refused"),
            }
        }
    };
    let wrong = refused(Some(Credentials::new("reader", "nope").unwrap())).await;
    assert!(
        matches!(&wrong, RegistryError::Unauthenticated { .. })
            && wrong.to_string().contains("wrong user name or password"),
        "{wrong}"
    );
    let anonymous = refused(None).await;
    assert!(
        matches!(&anonymous, RegistryError::Unauthenticated { .. })
            && anonymous.to_string().contains("requires authentication"),
        "{anonymous}"
    );
    let elsewhere = refused(Some(Credentials::new("elsewhere", "pw").unwrap())).await;
    assert!(
        matches!(&elsewhere, RegistryError::PermissionDenied { .. })
            && elsewhere.to_string().contains("\"elsewhere\""),
        "{elsewhere}"
    );
}

/// An etcd serving over TLS that requires client certificates (`etcds://`): with its CA and a
/// client certificate the registry lists and watches; the wrong CA, no client certificate, or
/// TLS settings that do not fit the URL are each refused with a message naming the cause.
#[tokio::test]
async fn an_etcds_registry_is_reached_over_tls_with_a_client_certificate() {
    use halyard_registry::{Access, EtcdTls};
    let etcd = tokio::task::spawn_blocking(EtcdServer::start_tls)
        .await
        .unwrap();
    let files = etcd.tls().unwrap().clone();
    assert!(etcd.url().starts_with("etcds://"), "{}", etcd.url());
    put(&etcd, "services/a", &service("a", 80));

    let mut o = opts();
    o.access = Access {
        credentials: None,
        tls: Some(
            EtcdTls::from_files(&files.ca, Some((&files.client_cert, &files.client_key))).unwrap(),
        ),
    };
    let reg = open(&etcd.url(), o).await;
    let mut rx = reg.watch();
    until(&mut rx, "the listing over TLS", |s| {
        s.services.contains_key("a")
    })
    .await;
    put(&etcd, "services/b", &service("b", 81));
    until(&mut rx, "a watched put over TLS", |s| {
        s.services.contains_key("b")
    })
    .await;

    let attempt = |tls: Option<EtcdTls>, url: String| async move {
        let mut o = opts();
        o.timeout = Duration::from_secs(2);
        o.access = Access {
            credentials: None,
            tls,
        };
        match open_with(&url, o).await {
            Err(e) => e.to_string(),
            Ok(r) => {
                // A TLS failure at the first listing is served as stale: it must be reported.
                assert!(r.snapshot().services.is_empty(), "read without trust");
                assert!(r.staleness() > Duration::ZERO, "not reported stale");
                "stale".into()
            }
        }
    };
    let plain = etcd.url().replacen("etcds://", "etcd://", 1);
    let ca_only = EtcdTls::from_files(&files.ca, None).unwrap();
    let msg = attempt(None, etcd.url()).await;
    assert!(msg.contains("needs TLS settings"), "{msg}");
    let msg = attempt(Some(ca_only.clone()), plain).await;
    assert!(msg.contains("use etcds://"), "{msg}");
    // A registry whose first listing fails serves as stale; `ctl` (Admin) shows the cause.
    let admin = |tls: EtcdTls| {
        let url = etcd.url();
        async move {
            let access = Access {
                credentials: None,
                tls: Some(tls),
            };
            halyard_registry::admin::Admin::connect_as(
                &url,
                "default",
                Duration::from_secs(2),
                &access,
            )
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        }
    };
    let wrong_ca = EtcdTls::from_files(
        &files.other_ca,
        Some((&files.client_cert, &files.client_key)),
    )
    .unwrap();
    assert_eq!(attempt(Some(wrong_ca.clone()), etcd.url()).await, "stale");
    let msg = admin(wrong_ca).await;
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    let msg = admin(ca_only).await;
    assert!(!msg.is_empty(), "no client certificate, yet accepted");
}

/// A sidecar whose etcd user may only read: registering its endpoint is refused at once with
/// a message naming the user, and no lease is left behind.
#[tokio::test]
async fn registering_as_a_read_only_user_is_refused_and_leaves_no_lease() {
    let mut etcd = EtcdServer::start();
    etcd.enable_auth("rootpw");
    etcd.add_user("ro", "pw", "read", "/halyard/default/");
    let mut o = opts();
    o.access.credentials = Some(halyard_registry::Credentials::new("ro", "pw").unwrap());
    o.sidecar_id = Some("reviews-1".into());
    let reg = open(&etcd.url(), o).await;
    let err = match reg.register(endpoint("reviews-1")).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a read-only user registered an endpoint"),
    };
    assert!(err.contains("denied user \"ro\""), "{err}");
    let leases = etcd.etcdctl_ok(&["lease", "list"]);
    assert!(leases.contains("found 0 leases"), "{leases}");
}
