//! Heap held per operation: every allocation of this test process is counted (a global
//! allocator wrapping the system's), and each kind of churn an operator or the traffic causes
//! is repeated until the live heap should have stopped growing. What a sidecar keeps after an
//! operation that is over is a leak: a long-running mesh would grow without bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod counting;

use std::sync::Arc;
use std::time::Duration;

use counting::{live_bytes, Counting};
use halyard_registry::test_util::EtcdServer;
use halyard_sidecar::test_util::{call, http_call, http_client, weighted_route, Mesh, TwoVersions};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The live heap once transient work has settled: the least of a few samples.
async fn settled() -> isize {
    let mut least = isize::MAX;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        least = least.min(live_bytes());
    }
    least
}

/// Live heap growth in bytes over `n` operations of `op`, after the heap settles.
async fn growth<F, Fut>(n: usize, mut op: F) -> isize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = settled().await;
    for i in 0..n {
        op(i).await;
    }
    settled().await - before
}

/// Live heap growth over `n` operations of `op`, measured twice in a row: the smaller figure.
/// A leak grows the heap in both windows; a buffer that happens to be held when one window
/// ends (see [`NOISE`]) shows in one only.
async fn growth_twice<F, Fut>(n: usize, mut op: F) -> isize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let first = growth(n, &mut op).await;
    let second = growth(n, &mut op).await;
    first.min(second)
}

/// What the live heap may move by over one window whatever happens: read and write buffers of
/// the etcd client, hyper and quinn (8–24 KiB each, seen in heap profiles coming and going
/// between windows; one window of route changes measured +52 KiB).
const NOISE: isize = 64 * 1024;

/// A mesh under each kind of churn in turn, after a warm-up of each: L4 flows, L7 requests,
/// endpoint re-registrations in etcd, route changes and certificate renewals leave the live
/// heap where it was, within [`NOISE`] in the better of two windows. So a leak of 64 bytes or
/// more per flow or request (1,000 of each), 640 per snapshot change (100 each) or 6.4 KiB per
/// renewal (10) fails it; a leaked connection, snapshot or TLS configuration is far larger. The QUIC streams a
/// peer may open are capped at 32 here: quinn keeps the receive state of every stream slot it
/// has used, for reuse, up to that cap per connection (≈ 360 bytes a slot: 370 KiB per peer
/// connection at the default 1,024), which the warm-up fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_no_heap_behind() {
    let etcd = Arc::new(
        tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .unwrap(),
    );
    let mesh = Mesh::with_url(tempfile::tempdir().unwrap(), etcd.url()).await;
    let extra = "[transport]\nmax_concurrent_bidi_streams = 32\n";
    let TwoVersions {
        servers,
        mut callers,
        apps: _apps,
    } = TwoVersions::start(&mesh, 1, extra).await;
    let pp = callers.remove(0);
    let (http, tcp) = (pp.upstream(0), pp.upstream(1));
    let client = http_client();
    let key = format!(
        "/halyard/default/endpoints/reviews/{}",
        servers[1].started.id
    );

    let flow = |i: usize| async move {
        let msg = format!("{i}");
        assert_eq!(
            call(tcp, msg.as_bytes()).await.unwrap(),
            format!("r:{i}").into_bytes()
        );
    };
    let request = |_| {
        let client = client.clone();
        async move {
            let (status, _, _) = http_call(&client, http, "GET", "/x", &[]).await;
            assert_eq!(status, 200);
        }
    };
    let reput = |_| {
        let (e, k) = (etcd.clone(), key.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                e.etcdctl_ok(&["put", &k, "--ignore-value", "--ignore-lease"])
            })
            .await
            .unwrap();
        }
    };
    let (mesh_ref, pp_ref) = (&mesh, &pp);
    let change_route = |i: usize| async move {
        let weight = if i % 2 == 0 { 80 } else { 50 };
        mesh_ref.apply(&weighted_route(weight)).await;
        pp_ref
            .wait_snapshot("the route", |s| {
                s.routes
                    .get("reviews")
                    .is_some_and(|r| r.rules[0].backends[0].weight == weight)
            })
            .await;
    };
    let servers_ref = &servers;
    let renewal = |_| async move {
        let seen = *pp_ref.started.reloads.borrow();
        for s in servers_ref {
            mesh_ref.renew(s, "reviews");
        }
        mesh_ref.renew(pp_ref, "productpage");
        let mut rx = pp_ref.started.reloads.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| *r > seen))
            .await
            .expect("the renewal was picked up")
            .unwrap();
        // A new connection on the new identities.
        assert_eq!(call(tcp, b"x").await.unwrap(), b"r:x");
    };

    // Warm-up: every stream slot used, every map at its working size.
    growth(300, flow).await;
    growth(300, request).await;
    growth(10, reput).await;
    growth(10, change_route).await;
    growth(3, renewal).await;

    let l4 = growth_twice(1000, flow).await;
    let l7 = growth_twice(1000, request).await;
    let reputs = growth_twice(100, reput).await;
    let routes = growth_twice(100, change_route).await;
    let renewals = growth_twice(10, renewal).await;
    eprintln!(
        "live heap growth: 1,000 L4 flows {l4:+} B, 1,000 L7 requests {l7:+} B, 100 endpoint re-puts {reputs:+} B, 100 route changes {routes:+} B, 10 renewals {renewals:+} B"
    );
    for (what, grew) in [
        ("1,000 L4 flows", l4),
        ("1,000 L7 requests", l7),
        ("100 endpoint re-puts", reputs),
        ("100 route changes", routes),
        ("10 certificate renewals", renewals),
    ] {
        assert!(grew < NOISE, "{what} left {grew} bytes of live heap");
    }
    pp.shutdown().await.unwrap();
    for s in servers {
        s.shutdown().await.unwrap();
    }
}
