//! The directory backend: the same watch and quarantine behaviour as etcd, on files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{parse_documents, Endpoint};
use halyard_registry::{open_with, Object, Options, Origin, Registry, Snapshot};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);

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
            "timed out waiting for {what}; last: {}",
            rx.borrow().content()
        ),
    }
}

fn service(name: &str, port: u16) -> String {
    format!(r#"{{"kind":"Service","name":"{name}","ports":[{{"port":{port},"protocol":"tcp"}}]}}"#)
}

/// Writes like an operator's editor would: temp file, then rename.
fn write(root: &Path, rel: &str, text: &str) {
    let file = root.join("default").join(format!("{rel}.json"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, file).unwrap();
}

async fn open(dir: &Path, sidecar: Option<&str>) -> Arc<dyn Registry> {
    let mut o = Options::new("default");
    o.sidecar_id = sidecar.map(str::to_owned);
    open_with(&format!("file://{}", dir.display()), o)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_watch_sees_each_change_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "services/a", &service("a", 1));
    let reg = open(dir.path(), None).await;
    assert_eq!(reg.snapshot().origin, Origin::Live);
    assert_eq!(reg.snapshot().service("a").unwrap().ports[0].port, 1);
    let mut rx = reg.watch();
    let mut last = reg.snapshot().revision;
    for port in 2..=10 {
        write(dir.path(), "services/a", &service("a", port));
        let s = until(&mut rx, "the next port", |s| {
            s.service("a").unwrap().ports[0].port == port
        })
        .await;
        assert!(s.revision > last);
        last = s.revision;
    }
    std::fs::remove_file(dir.path().join("default/services/a.json")).unwrap();
    until(&mut rx, "the delete", |s| s.service("a").is_none()).await;
}

/// A registry (sidecar `s1`) whose good `ratings` policy file was replaced by an invalid one,
/// and the first snapshot that shows the rejection.
async fn with_an_invalid_file() -> (tempfile::TempDir, Arc<dyn Registry>, Arc<Snapshot>) {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"kind":"Policy","service":"ratings","rules":[{"action":"deny"}]}"#;
    write(dir.path(), "policies/ratings", good);
    let reg = open(dir.path(), Some("s1")).await;
    let mut rx = reg.watch();
    write(
        dir.path(),
        "policies/ratings",
        r#"{"service":"ratings","rules":[{"action":"maybe"}]}"#,
    );
    write(dir.path(), "services/b", &service("b", 80));
    let s = until(&mut rx, "b and the rejection", |s| {
        s.service("b").is_some() && !s.rejected.is_empty()
    })
    .await;
    (dir, reg, s)
}

#[tokio::test]
async fn an_invalid_file_is_quarantined_with_its_last_good_value_kept() {
    let (_dir, _reg, s) = with_an_invalid_file().await;
    assert!(s.policy("ratings").is_some(), "last good value kept");
    let why = &s.rejected["/halyard/default/policies/ratings"];
    assert!(
        why.contains("policies/ratings.json: rules[0].action: "),
        "{why}"
    );
}

#[tokio::test]
async fn an_invalid_file_is_reported_in_the_sidecar_status() {
    let (dir, reg, _) = with_an_invalid_file().await;
    let status = dir.path().join("default/status/s1.json");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        if text.contains("rules[0].action") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no status: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reg.rejected_total(), 1);
}

/// A registry with the endpoint `e1` of `reviews` registered and seen by the watch.
async fn with_a_registered_endpoint() -> (
    tempfile::TempDir,
    Arc<dyn Registry>,
    watch::Receiver<Arc<Snapshot>>,
    halyard_registry::Registration,
) {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path(), None).await;
    let mut rx = reg.watch();
    let text =
        "kind: Endpoint\nid: e1\nservice: reviews\naddress: 127.0.0.1:1\nidentity: spiffe://td/x";
    let Object::Endpoint(ep) = parse_documents("x", text).unwrap().remove(0) else {
        panic!()
    };
    let ep: Endpoint = ep;
    let h = reg.register(ep).await.unwrap();
    until(&mut rx, "the endpoint", |s| {
        s.endpoints_of("reviews").count() == 1
    })
    .await;
    (dir, reg, rx, h)
}

#[tokio::test]
async fn a_registered_endpoint_is_seen_by_the_watch() {
    let (_dir, reg, _, _) = with_a_registered_endpoint().await;
    assert_eq!(reg.snapshot().endpoints_of("reviews").count(), 1);
}

#[tokio::test]
async fn a_deregistered_endpoint_leaves_the_watch() {
    let (_dir, reg, mut rx, h) = with_a_registered_endpoint().await;
    reg.deregister(h).await.unwrap();
    until(&mut rx, "no endpoint", |s| {
        s.endpoints_of("reviews").count() == 0
    })
    .await;
}

/// The registry reacts to changes, not to its own reading: a rescan opens every file, and the
/// inotify backend reports opens, so a watcher that took every event for a change rescanned
/// every 20 ms for as long as it ran (and each sidecar sharing a directory on the others'
/// reads). Counted from outside with a watch of our own: after a change has been applied, an
/// idle registry opens its files only on the 2 s safety-net rescan.
#[tokio::test]
async fn an_idle_registry_does_not_reread_its_files() {
    use notify::event::{AccessKind, EventKind};
    use notify::Watcher as _;

    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "services/a", &service("a", 1));
    let file = dir.path().join("default/services/a.json");
    let reg = open(dir.path(), None).await;
    let mut rx = reg.watch();
    write(dir.path(), "services/b", &service("b", 2));
    until(&mut rx, "b", |s| s.service("b").is_some()).await;

    let opens = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = opens.clone();
    let watched = file.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
                && ev.paths.iter().any(|p| p == &watched)
            {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
    .unwrap();
    watcher
        .watch(
            &dir.path().join("default/services"),
            notify::RecursiveMode::NonRecursive,
        )
        .unwrap();
    // Our own open, so the count is known to work on this machine.
    drop(std::fs::read(&file).unwrap());
    // No event marks "nothing happened": a window shorter than the safety-net rescan (2 s)
    // and ten times the rescan loop's period.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let n = opens.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n >= 1, "the test's own open was not seen");
    assert!(
        n <= 2,
        "{n} opens of {} in 250 ms by an idle registry",
        file.display()
    );
}
