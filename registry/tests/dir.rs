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
async fn watch_sees_every_change_in_order_and_nothing_twice() {
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

#[tokio::test]
async fn invalid_files_are_quarantined_and_reported() {
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
    assert!(s.policy("ratings").is_some(), "last good value kept");
    let why = &s.rejected["/halyard/default/policies/ratings"];
    assert!(
        why.contains("policies/ratings.json: rules[0].action: "),
        "{why}"
    );
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

#[tokio::test]
async fn register_writes_a_file_and_deregister_removes_it() {
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
    reg.deregister(h).await.unwrap();
    until(&mut rx, "no endpoint", |s| {
        s.endpoints_of("reviews").count() == 0
    })
    .await;
}
