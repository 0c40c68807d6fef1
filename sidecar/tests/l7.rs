//! L7 end to end: real HTTP servers behind real sidecars, HTTP/3 between the sidecars, Route and
//! Policy objects written to the registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use halyard_sidecar::test_util::{
    http_app, http_call, http_client, loopback_ip, metric, AppBehavior, Mesh, Sidecar, Spec,
};

fn http_service(name: &str, target: u16) -> String {
    format!("kind: Service\nname: {name}\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {target} }}\n")
}

/// Starts one sidecar per (version, app ip) for `reviews`, and a caller sidecar `productpage`.
async fn reviews(mesh: &Mesh, versions: &[(&str, IpAddr)]) -> (Vec<Sidecar>, Sidecar) {
    let mut servers = Vec::new();
    for (v, ip) in versions {
        servers.push(mesh.start(&Spec::new("reviews", v).app_host(*ip)).await);
    }
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", versions.len()).await;
    (servers, pp)
}

fn tag(body: &str) -> String {
    body.split(' ').next().unwrap_or("").to_owned()
}

/// reviews v1, v2 and v3 behind a route that sends `x-user: tester` to v2 and splits everyone
/// else 90/10 between v1 and v3, with productpage calling it.
struct HeaderRouted {
    _mesh: Mesh,
    _apps: Vec<halyard_sidecar::test_util::HttpApp>,
    _servers: Vec<Sidecar>,
    pp: Sidecar,
}

async fn header_routed() -> HeaderRouted {
    let ip1 = loopback_ip();
    let ip2 = loopback_ip();
    let ip3 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let a1 = http_app(SocketAddr::new(ip1, 0), "v1", AppBehavior::default()).await;
    let port = a1.addr.port();
    let a2 = http_app(SocketAddr::new(ip2, port), "v2", AppBehavior::default()).await;
    let a3 = http_app(SocketAddr::new(ip3, port), "v3", AppBehavior::default()).await;
    let route = "kind: Route\nservice: reviews\nrules:\n  - match: { headers: { x-user: { exact: tester } } }\n    backends: [{ subset: { version: v2 }, weight: 100 }]\n  - backends:\n      - { subset: { version: v1 }, weight: 90 }\n      - { subset: { version: v3 }, weight: 10 }\n";
    mesh.apply(&format!("{}---\n{route}", http_service("reviews", port)))
        .await;
    let (servers, pp) = reviews(&mesh, &[("v1", ip1), ("v2", ip2), ("v3", ip3)]).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    HeaderRouted {
        _mesh: mesh,
        _apps: vec![a1, a2, a3],
        _servers: servers,
        pp,
    }
}

fn outbound_to_v2(pp: &Sidecar) -> f64 {
    let v2 = [
        ("direction", "outbound"),
        ("destination_version", "v2"),
        ("response_code", "200"),
    ];
    metric(&pp.started.render_metrics(), "halyard_requests_total", &v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_match_routes_one_user_to_its_subset() {
    let r = header_routed().await;
    let client = http_client();
    let up = r.pp.upstream(0);
    for _ in 0..20 {
        let (status, body, _) =
            http_call(&client, up, "GET", "/reviews/1", &[("x-user", "tester")]).await;
        assert_eq!((status, tag(&body)), (200, "v2".into()), "{body}");
    }
    r.pp.wait_flows(20).await;
    assert_eq!(outbound_to_v2(&r.pp), 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_header_split_by_weight() {
    let r = header_routed().await;
    let client = http_client();
    let up = r.pp.upstream(0);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        let (status, body, _) =
            http_call(&client, up, "GET", "/reviews/1", &[("x-user", "someone")]).await;
        assert_eq!(status, 200, "{body}");
        *counts.entry(tag(&body)).or_default() += 1;
    }
    let v1 = counts.get("v1").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((v1 - 0.9).abs() <= 0.05, "v1 share {v1}: {counts:?}");
    assert_eq!(counts.get("v2"), None, "{counts:?}");
    r.pp.wait_flows(2000).await;
    assert_eq!(outbound_to_v2(&r.pp), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_save_gets_but_never_posts() {
    let ip11 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let flaky = AppBehavior {
        fail_every: Some(3),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(ip11, 0), "v1", flaky).await;
    let route = "kind: Route\nservice: reviews\nrules:\n  - backends: [{ weight: 1 }]\n    retries: { attempts: 2, on: [5xx] }\n";
    mesh.apply(&format!(
        "{}---\n{route}",
        http_service("reviews", app.addr.port())
    ))
    .await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip11)]).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    let client = http_client();
    let up = pp.upstream(0);
    for i in 0..60 {
        let (status, body, _) = http_call(&client, up, "GET", "/r", &[]).await;
        assert_eq!(status, 200, "GET {i}: {body}");
    }
    let mut post_failures = 0;
    for _ in 0..60 {
        if http_call(&client, up, "POST", "/r", &[]).await.0 == 503 {
            post_failures += 1;
        }
    }
    assert!(
        (15..=25).contains(&post_failures),
        "{post_failures} of 60 POSTs failed: POSTs must not be retried"
    );
    let m = pp.started.render_metrics();
    let retries = metric(
        &m,
        "halyard_retries_total",
        &[("destination_service", "reviews")],
    );
    assert!(
        (15.0..=40.0).contains(&retries),
        "{retries} retries for 60 GETs with 1 in 3 failing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_every_request_fails() {
    let ip12 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let client = http_client();
    // Every request fails: the budget keeps retries to a share of requests.
    let broken = http_app(
        SocketAddr::new(ip12, 0),
        "v9",
        AppBehavior {
            fail_every: Some(1),
            ..AppBehavior::default()
        },
    )
    .await;
    mesh.apply(&http_service("ratings", broken.addr.port()))
        .await;
    let route = "kind: Route\nservice: ratings\nrules:\n  - backends: [{ weight: 1 }]\n    retries: { attempts: 3, on: [5xx] }\n";
    mesh.apply(route).await;
    let rt = mesh.start(&Spec::new("ratings", "v9").app_host(ip12)).await;
    // The default floor and share over a window that holds the whole run however slow the
    // machine (the default 10 s window would grant its floor again on a slow run).
    let mut spec = Spec::new("details", "v1").upstream("ratings", 9080);
    spec.extra =
        "[failure.retry_budget]\npercent = 20\nmin_per_second = 1\nwindow = \"100s\"\n".into();
    let caller = mesh.start(&spec).await;
    caller.wait_endpoints("ratings", 1).await;
    caller
        .wait_snapshot("the route", |s| s.route("ratings").is_some())
        .await;
    for _ in 0..600 {
        let (status, ..) = http_call(&client, caller.upstream(0), "GET", "/x", &[]).await;
        assert_eq!(status, 503);
    }
    // 3 retries each would be 2,400 hits; the budget allows 20% of 600 plus a floor of 100.
    let hits = broken.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        hits <= 600 + 120 + 100,
        "{hits} upstream hits for 600 requests: the retry budget leaked"
    );
    assert!(
        hits >= 600 + 100,
        "{hits} upstream hits: retries did not happen"
    );
    drop(rt);
}

/// reviews v1, whose app answers 503 to everything, and v2, behind a route that sends `/flaky`
/// to v1 only with two retries on 5xx (`rule_extra` added to that rule) and the rest to v2,
/// with productpage calling it.
struct FlakyV1 {
    _mesh: Mesh,
    v1: halyard_sidecar::test_util::HttpApp,
    v2: halyard_sidecar::test_util::HttpApp,
    _servers: Vec<Sidecar>,
    pp: Sidecar,
}

async fn flaky_v1(rule_extra: &str) -> FlakyV1 {
    let (ip1, ip2) = (loopback_ip(), loopback_ip());
    let mesh = Mesh::with_dir().await;
    let broken = AppBehavior {
        fail_every: Some(1),
        ..AppBehavior::default()
    };
    let v1 = http_app(SocketAddr::new(ip1, 0), "v1", broken).await;
    let port = v1.addr.port();
    let v2 = http_app(SocketAddr::new(ip2, port), "v2", AppBehavior::default()).await;
    let route = format!(
        "kind: Route\nservice: reviews\nrules:\n  - match: {{ path: {{ prefix: /flaky }} }}\n    backends: [{{ subset: {{ version: v1 }}, weight: 100 }}]\n    retries: {{ attempts: 2, on: [5xx] }}\n{rule_extra}  - backends: [{{ subset: {{ version: v2 }}, weight: 100 }}]\n"
    );
    mesh.apply(&format!("{}---\n{route}", http_service("reviews", port)))
        .await;
    let (servers, pp) = reviews(&mesh, &[("v1", ip1), ("v2", ip2)]).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    FlakyV1 {
        _mesh: mesh,
        v1,
        v2,
        _servers: servers,
        pp,
    }
}

fn hits(app: &halyard_sidecar::test_util::HttpApp) -> u64 {
    app.hits.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_inside_the_subset_of_their_rule() {
    let f = flaky_v1("").await;
    for i in 0..10 {
        let (status, body, _) =
            http_call(&http_client(), f.pp.upstream(0), "GET", "/flaky", &[]).await;
        assert_eq!(
            (status, tag(&body)),
            (503, "v1".into()),
            "request {i}: {body}"
        );
    }
    // v1 has one endpoint: each request went to it three times (panic mode once it is ejected).
    assert_eq!((hits(&f.v1), hits(&f.v2)), (30, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_rule_with_fallback_service_may_leave_its_subset() {
    let f = flaky_v1("    fallback: service\n").await;
    for i in 0..10 {
        let (status, body, _) =
            http_call(&http_client(), f.pp.upstream(0), "GET", "/flaky", &[]).await;
        assert_eq!(
            (status, tag(&body)),
            (200, "v2".into()),
            "request {i}: {body}"
        );
    }
    // Three 503s in a row eject v1; from then on v2 is asked first.
    assert_eq!((hits(&f.v1), hits(&f.v2)), (3, 10));
}

/// A route with a 100 ms timeout on `/slow`, a 20 % abort fault (418) on `/faulty`, and a plain
/// rule for the rest.
const FAILURE_ROUTE: &str = "kind: Route\nservice: reviews\nrules:\n  - match: { path: { prefix: /slow } }\n    backends: [{ weight: 1 }]\n    timeout: 100ms\n  - match: { path: { prefix: /faulty } }\n    backends: [{ weight: 1 }]\n    fault: { abort: { percent: 20, status: 418 } }\n  - backends: [{ weight: 1 }]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_gives_504() {
    let ip21 = loopback_ip();
    let route = FAILURE_ROUTE;
    let mesh = Mesh::with_dir().await;
    let slow = AppBehavior {
        delay: Some(Duration::from_millis(400)),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(ip21, 0), "v1", slow).await;
    mesh.apply(&format!(
        "{}---\n{route}",
        http_service("reviews", app.addr.port())
    ))
    .await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip21)]).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    let client = http_client();
    let (status, body, _) = http_call(&client, pp.upstream(0), "GET", "/slow/x", &[]).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        http_call(&client, pp.upstream(0), "GET", "/other", &[])
            .await
            .0,
        200
    );
    let _ = app;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_fault_hits_its_share_of_requests() {
    let ip22 = loopback_ip();
    let route = FAILURE_ROUTE;
    let mesh = Mesh::with_dir().await;
    let client = http_client();
    let fast = http_app(SocketAddr::new(ip22, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&http_service("ratings", fast.addr.port())).await;
    mesh.apply(&route.replace("service: reviews", "service: ratings"))
        .await;
    let _rt = mesh.start(&Spec::new("ratings", "v1").app_host(ip22)).await;
    let caller = mesh
        .start(&Spec::new("details", "v1").upstream("ratings", 9080))
        .await;
    caller.wait_endpoints("ratings", 1).await;
    caller
        .wait_snapshot("the route", |s| s.route("ratings").is_some())
        .await;
    let mut aborted = 0;
    for _ in 0..1000 {
        match http_call(&client, caller.upstream(0), "GET", "/faulty", &[])
            .await
            .0
        {
            418 => aborted += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        (150..=250).contains(&aborted),
        "{aborted} of 1000 aborted, want 20% ± 5%"
    );
}

// The mirror's share and the caller seeing only the primary are two sides of the same requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_receives_its_share_out_of_band() {
    let ip31 = loopback_ip();
    let ip33 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let a1 = http_app(SocketAddr::new(ip31, 0), "v1", AppBehavior::default()).await;
    let a3 = http_app(
        SocketAddr::new(ip33, a1.addr.port()),
        "v3",
        AppBehavior::default(),
    )
    .await;
    let route = "kind: Route\nservice: reviews\nrules:\n  - backends: [{ subset: { version: v1 }, weight: 100 }]\n    mirror: { subset: { version: v3 }, percent: 50 }\n";
    mesh.apply(&format!(
        "{}---\n{route}",
        http_service("reviews", a1.addr.port())
    ))
    .await;
    let (servers, pp) = reviews(&mesh, &[("v1", ip31), ("v3", ip33)]).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    let client = http_client();
    for _ in 0..400 {
        let (status, body, _) = http_call(&client, pp.upstream(0), "GET", "/m", &[]).await;
        assert_eq!((status, tag(&body)), (200, "v1".into()));
    }
    // Mirrored requests are fire and forget: wait until v3's sidecar has recorded them.
    let v3_sidecar = &servers[1];
    let mirrored = a3.hits.load(std::sync::atomic::Ordering::SeqCst);
    v3_sidecar.wait_flows(mirrored).await;
    assert_eq!(a1.hits.load(std::sync::atomic::Ordering::SeqCst), 400);
    assert!(
        (140..=260).contains(&mirrored),
        "mirror got {mirrored} of 400 at 50%"
    );
}

/// reviews v1 and v2, both sidecars stripping path parameters, behind a route that sends the
/// path `/pinned` to v2 and everything else to v1, with productpage calling it.
async fn pinned_routed() -> HeaderRouted {
    let (ip1, ip2) = (loopback_ip(), loopback_ip());
    let mesh = Mesh::with_dir().await;
    let a1 = http_app(SocketAddr::new(ip1, 0), "v1", AppBehavior::default()).await;
    let port = a1.addr.port();
    let a2 = http_app(SocketAddr::new(ip2, port), "v2", AppBehavior::default()).await;
    let route = "kind: Route\nservice: reviews\nrules:\n  - match: { path: { exact: /pinned } }\n    backends: [{ subset: { version: v2 }, weight: 100 }]\n  - backends: [{ subset: { version: v1 }, weight: 100 }]\n";
    mesh.apply(&format!("{}---\n{route}", http_service("reviews", port)))
        .await;
    let strip = "path_parameters = \"strip\"\n";
    let mut servers = Vec::new();
    for (v, ip) in [("v1", ip1), ("v2", ip2)] {
        let spec = Spec::new("reviews", v).app_host(ip).inbound(strip);
        servers.push(mesh.start(&spec).await);
    }
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 2).await;
    pp.wait_snapshot("the route", |s| s.route("reviews").is_some())
        .await;
    HeaderRouted {
        _mesh: mesh,
        _apps: vec![a1, a2],
        _servers: servers,
        pp,
    }
}

/// A policy that denies `/admin` and everything under it.
const DENY_ADMIN: &str =
    "kind: Policy\nservice: reviews\nrules:\n  - action: deny\n    to: { paths: [/admin, /admin/*] }\n";

/// A policy that admits `/public` and everything under it, and nothing else.
const ALLOW_PUBLIC: &str =
    "kind: Policy\nservice: reviews\nrules:\n  - action: allow\n    to: { paths: [/public, /public/*] }\n";

/// reviews v1 behind a path policy, its sidecar with extra `[inbound]` settings, with
/// productpage calling it.
struct Guarded {
    _mesh: Mesh,
    app: halyard_sidecar::test_util::HttpApp,
    servers: Vec<Sidecar>,
    pp: Sidecar,
}

async fn guarded(policy: &str, inbound: &str) -> Guarded {
    let ip41 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(ip41, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&format!(
        "{}---\n{policy}",
        http_service("reviews", app.addr.port())
    ))
    .await;
    let server = Spec::new("reviews", "v1").app_host(ip41).inbound(inbound);
    let servers = vec![mesh.start(&server).await];
    let pp = mesh
        .start(&Spec::new("productpage", "v1").upstream("reviews", 9080))
        .await;
    pp.wait_endpoints("reviews", 1).await;
    servers[0]
        .wait_snapshot("the policy", |s| s.policy("reviews").is_some())
        .await;
    Guarded {
        _mesh: mesh,
        app,
        servers,
        pp,
    }
}

/// reviews v1 behind a policy that denies `/admin` and everything under it, with productpage
/// calling it.
async fn admin_denied() -> Guarded {
    guarded(DENY_ADMIN, "").await
}

/// Sends GET `path` through `g`'s caller; the status and the body.
async fn get_through(g: &Guarded, path: &str) -> (u16, String) {
    let (status, body, _) = http_call(&http_client(), g.pp.upstream(0), "GET", path, &[]).await;
    (status, body)
}

fn denials(g: &Guarded) -> f64 {
    metric(
        &g.servers[0].started.render_metrics(),
        "halyard_policy_denials_total",
        &[("destination_service", "reviews")],
    )
}

fn app_hits(g: &Guarded) -> u64 {
    g.app.hits.load(std::sync::atomic::Ordering::SeqCst)
}

/// Spellings with path parameters that a servlet container resolves to `/admin` or below it.
const ADMIN_WITH_PARAMETERS: [&str; 10] = [
    "/admin;x",
    "/admin;",
    "/admin;jsessionid=1/users",
    "/admin%3Bx",
    "/admin%3bx",
    "/admin/;/x",
    "/;x/admin",
    "/public;x/../admin",
    "/admin;a=1;b=2/",
    "/%61dmin;x",
];

/// Spellings whose parameters make a dot segment look like a name: `/admin` to a servlet
/// container, somewhere under `/public` to a server that takes `;` literally.
const DOT_SEGMENTS_WITH_PARAMETERS: [&str; 4] = [
    "/..;/admin",
    "/public/..;/admin",
    "/public/..%3B/admin",
    "/public/.;/../admin",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_do_not_get_past_a_path_policy() {
    let Guarded {
        _mesh,
        app,
        servers,
        pp,
    } = admin_denied().await;
    let client = http_client();
    let up = pp.upstream(0);
    for path in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/public/../admin",
        "/admin/x",
        "/./admin",
        "/%2561dmin/../admin",
    ] {
        let (status, body, _) = http_call(&client, up, "GET", path, &[]).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, body, _) = http_call(&client, up, "GET", "/a%2Fdmin", &[]).await;
    assert_eq!(status, 400, "escaped slash: {body}");
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let denied = metric(
        &servers[0].started.render_metrics(),
        "halyard_policy_denials_total",
        &[("destination_service", "reviews")],
    );
    assert_eq!(denied, 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_are_refused_with_400_by_default() {
    let g = admin_denied().await;
    let spellings = ADMIN_WITH_PARAMETERS
        .iter()
        .chain(&DOT_SEGMENTS_WITH_PARAMETERS);
    for path in spellings.chain(&["/public;x"]) {
        // The calling sidecar resolves `..`, and the parameter goes with its segment: what
        // arrives is `/admin`, denied.
        let want = if *path == "/public;x/../admin" {
            403
        } else {
            400
        };
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    assert_eq!(app_hits(&g), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripped_path_parameters_do_not_get_past_a_deny_rule() {
    let g = guarded(DENY_ADMIN, "path_parameters = \"strip\"\n").await;
    for path in ADMIN_WITH_PARAMETERS {
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    // Refused by the calling sidecar already: no setting forwards them.
    for path in DOT_SEGMENTS_WITH_PARAMETERS {
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    assert_eq!(app_hits(&g), 0);
    assert_eq!(denials(&g), ADMIN_WITH_PARAMETERS.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripped_path_parameters_do_not_get_past_an_allow_rule() {
    let g = guarded(ALLOW_PUBLIC, "path_parameters = \"strip\"\n").await;
    for (path, refused) in [
        ("/public;x/../admin", 403),
        ("/public%3Bx/../admin", 403),
        ("/;public/admin", 403),
        ("/public;x", 200),
        // Refused by the calling sidecar: the parameter changes which segments there are.
        ("/public/..;/admin", 400),
        ("/public/;/../admin", 400),
    ] {
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, refused, "{path}: {body}");
    }
    assert_eq!(app_hits(&g), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_the_path_without_parameters_when_they_are_stripped() {
    let g = guarded(ALLOW_PUBLIC, "path_parameters = \"strip\"\n").await;
    let (status, body) = get_through(&g, "/public;jsessionid=1/a;v=2?q=;").await;
    assert_eq!((status, body.as_str()), (200, "v1 GET /public/a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_path_parameters_are_matched_without_them() {
    let g = guarded(DENY_ADMIN, "path_parameters = \"keep\"\n").await;
    for path in ADMIN_WITH_PARAMETERS {
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    for path in DOT_SEGMENTS_WITH_PARAMETERS {
        let (status, body) = get_through(&g, path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    assert_eq!(app_hits(&g), 0);
    assert_eq!(denials(&g), ADMIN_WITH_PARAMETERS.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_path_parameters_reach_the_app_as_sent() {
    let g = guarded(ALLOW_PUBLIC, "path_parameters = \"keep\"\n").await;
    let (status, body) = get_through(&g, "/public;v=1/a;jsessionid=2").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "v1 GET /public;v=1/a;jsessionid=2")
    );
    let (status, body) = get_through(&g, "/public;x/../admin").await;
    assert_eq!(status, 403, "{body}");
    let admin = g.servers[0].started.admin;
    let (status, dump) =
        halyard_sidecar::test_util::get(&http_client(), admin, "/config_dump").await;
    assert_eq!(status, 200);
    assert!(dump.contains("\"path_parameters\": \"keep\""), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_matches_the_path_without_its_parameters() {
    let r = pinned_routed().await;
    for path in ["/pinned;x", "/pinned%3Bv=1", "/other;x/../pinned"] {
        let (status, body, _) = http_call(&http_client(), r.pp.upstream(0), "GET", path, &[]).await;
        assert_eq!((status, tag(&body)), (200, "v2".into()), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_from_the_caller_are_not_trusted() {
    let Guarded {
        _mesh,
        app,
        servers: _servers,
        pp,
    } = admin_denied().await;
    let client = http_client();
    let up = pp.upstream(0);
    let claim = [
        (
            "x-halyard-peer-identity",
            "spiffe://mesh.local/ns/default/sa/admin",
        ),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    let (status, body, _) = http_call(&client, up, "GET", "/public", &claim).await;
    assert_eq!(status, 200, "{body}");
    let seen = app.last_headers.lock().unwrap().clone();
    assert_eq!(
        seen["x-halyard-peer-identity"],
        "spiffe://mesh.local/ns/default/sa/productpage"
    );
    let tp = seen["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "trace not continued: {tp}"
    );
    assert!(!tp.contains("00f067aa0ba902b7"), "no new span id: {tp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused_with_400_before_forwarding() {
    let ip51 = loopback_ip();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(ip51, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&http_service("reviews", app.addr.port())).await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip51)]).await;
    let attempts = [
        "POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: r\r\nX-Folded: a\r\n b\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ];
    for raw in attempts {
        let mut tcp = tokio::net::TcpStream::connect(pp.upstream(0))
            .await
            .unwrap();
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 400"), "{raw:?} got {head:?}");
    }
    // A header section over the limit gets 431.
    let mut tcp = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: r\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = tcp.write_all(huge.as_bytes()).await;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(
        head.starts_with("HTTP/1.1 431"),
        "oversized header section got {head:?}"
    );
    assert_eq!(
        app.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a smuggling attempt reached the app"
    );

    // An Upgrade request is answered as HTTP/1.1 and does not turn the checks off: the
    // ambiguous request behind it on the same connection is still refused.
    let mut tcp = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    let pipelined = "GET /up HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
        POST / HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    tcp.write_all(pipelined.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(got.contains("HTTP/1.1 400"), "{got:?}");
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // CONNECT is no HTTP request to route: 405, nothing reaches the peer.
    let mut tcp = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    tcp.write_all(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 405"), "CONNECT got {head:?}");
    assert_eq!(app.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_response_streams_with_bounded_memory() {
    let ip61 = loopback_ip();
    use http_body_util::BodyExt;
    let mesh = Mesh::with_dir().await;
    let total: u64 = 100 * 1024 * 1024;
    let big = AppBehavior {
        stream_bytes: Some(total),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(ip61, 0), "v1", big).await;
    mesh.apply(&http_service("reviews", app.addr.port())).await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip61)]).await;
    let client = http_client();
    let req = http::Request::get(format!("http://{}/big", pp.upstream(0)))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let before = rss_kib();
    let mut body = client.request(req).await.unwrap().into_body();
    let (mut got, mut peak) = (0u64, before);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            got += data.len() as u64;
            if got % (8 * 1024 * 1024) < data.len() as u64 {
                peak = peak.max(rss_kib());
            }
        }
    }
    assert_eq!(got, total);
    let grew = peak.saturating_sub(before);
    // Three sidecar hops' buffers and QUIC windows, not the body: well under 100 MiB.
    assert!(
        grew < 48 * 1024,
        "RSS grew by {grew} KiB while streaming 100 MiB"
    );
}

/// gRPC framing (length-prefixed messages, status in trailers), spoken with hyper's h2 directly.
mod grpc {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use bytes::{BufMut, Bytes, BytesMut};
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    pub fn frame(msg: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + msg.len());
        b.put_u8(0);
        b.put_u32(msg.len() as u32);
        b.put_slice(msg);
        b.freeze()
    }

    pub fn messages(mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while data.len() >= 5 {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            out.push(data[5..5 + len].to_vec());
            data = &data[5 + len..];
        }
        out
    }

    fn trailers(status: u32, message: &str) -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", status.to_string().parse().unwrap());
        t.insert("grpc-message", message.parse().unwrap());
        t
    }

    /// Unary `/demo.Echo/Unary` echoes; `/demo.Echo/Stream` sends five messages; anything else
    /// ends with status 12 (UNIMPLEMENTED) in the trailers.
    pub async fn server(addr: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let input = messages(&body).concat();
                        let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
                        let status = match path.as_str() {
                            "/demo.Echo/Unary" => {
                                frames.push(Ok(Frame::data(frame(&input))));
                                trailers(0, "ok")
                            }
                            "/demo.Echo/Stream" => {
                                for i in 0..5 {
                                    frames.push(Ok(Frame::data(frame(
                                        format!("{}-{i}", String::from_utf8_lossy(&input))
                                            .as_bytes(),
                                    ))));
                                }
                                trailers(0, "streamed")
                            }
                            _ => trailers(12, "no such method"),
                        };
                        frames.push(Ok(Frame::trailers(status)));
                        let mut resp =
                            http::Response::new(StreamBody::new(futures::stream::iter(frames)));
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        local
    }

    /// Calls `method` with one message; returns the messages and the trailers.
    pub async fn call(
        upstream: SocketAddr,
        method: &str,
        msg: &[u8],
    ) -> (Vec<Vec<u8>>, http::HeaderMap) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let req = http::Request::post(format!("http://{upstream}{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(frame(msg)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (messages(&collected.to_bytes()), trailers)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_their_trailers() {
    let ip71 = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = grpc::server(SocketAddr::new(ip71, 0)).await;
    mesh.apply(&format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: grpc, port: 9080, protocol: grpc, targetPort: {} }}\n",
        app.port()
    ))
    .await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip71)]).await;
    let (msgs, trailers) = grpc::call(pp.upstream(0), "/demo.Echo/Unary", b"hello").await;
    assert_eq!(msgs, vec![b"hello".to_vec()]);
    assert_eq!(trailers["grpc-status"], "0");
    let (msgs, trailers) = grpc::call(pp.upstream(0), "/demo.Echo/Stream", b"s").await;
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("s-{i}").into_bytes()).collect();
    assert_eq!(msgs, want);
    assert_eq!(trailers["grpc-message"], "streamed");
    let (msgs, trailers) = grpc::call(pp.upstream(0), "/demo.Echo/Nope", b"x").await;
    assert!(msgs.is_empty());
    assert_eq!(trailers["grpc-status"], "12");
}

/// Drain ends even when an app holds things open: a request stuck at the destination app is
/// cut at the drain deadline (the caller gets an answer, not a hang), and an idle keep-alive
/// connection from the calling app closes when the drain starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_never_waits_forever_on_the_app() {
    let ip81 = loopback_ip();
    use std::sync::atomic::Ordering;
    let mesh = Mesh::with_dir().await;
    let stuck = AppBehavior {
        delay: Some(Duration::from_secs(60)),
        ..AppBehavior::default()
    };
    let app = http_app(SocketAddr::new(ip81, 0), "v1", stuck).await;
    mesh.apply(&http_service("reviews", app.addr.port())).await;
    let (mut servers, pp) = reviews(&mesh, &[("v1", ip81)]).await;
    let client = http_client();
    let (c, up) = (client.clone(), pp.upstream(0));
    let call = tokio::spawn(async move { http_call(&c, up, "GET", "/stuck", &[]).await.0 });
    tokio::time::timeout(Duration::from_secs(5), app.seen.notified())
        .await
        .expect("the request never reached the app");
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);

    // drain_timeout is 5 s: the stuck request is cut then, long before the app would answer.
    let server = servers.remove(0);
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(15), server.shutdown())
        .await
        .expect("the destination sidecar never finished draining")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(15));
    let status = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the caller got no answer")
        .unwrap();
    assert_eq!(status, 502, "a request cut by the drain is a gateway error");

    // The client keeps its connection to the upstream open and idle: the drain closes it at
    // once instead of waiting for the deadline, and then for ever.
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(15), pp.shutdown())
        .await
        .expect("the calling sidecar never finished draining")
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "idle app connection held the drain for {:?}",
        t.elapsed()
    );
    drop(client);
}

/// A request without a body leaves the caller's sidecar with its end in the same STREAM frame as
/// its head (`upload::finish_now`), and a small response whose first DATA frame came with its
/// head reaches the app in one write, head and body together (`outbound::first_data`). Each
/// saves a packet or a segment and a wake-up of the other side per request; the former code
/// sent about two frames and two segments per request.
///
/// One thread, as a sidecar runs by default (`workers = 1`: a current-thread runtime): on a
/// multi-threaded runtime a task spawned by the running one is polled next (tokio's LIFO slot),
/// before the connection's driver, which would hide a FIN sent from a task of its own.
#[tokio::test]
async fn a_bodiless_request_and_a_small_response_each_cross_in_one_piece() {
    const N: u64 = 40;
    let ip = loopback_ip();
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(ip, 0), "v1", AppBehavior::default()).await;
    mesh.apply(&http_service("reviews", app.addr.port())).await;
    let (_servers, pp) = reviews(&mesh, &[("v1", ip)]).await;
    let mut tcp = tokio::net::TcpStream::connect(pp.upstream(0))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    // The first exchange opens the peer connection (its control stream is a STREAM frame too).
    get_over(&mut tcp).await;
    let frames_before = stream_frames_sent(&pp);
    let segments_before = data_segments_in(&tcp);
    for _ in 0..N {
        get_over(&mut tcp).await;
    }
    let frames = stream_frames_sent(&pp) - frames_before;
    let segments = u64::from(data_segments_in(&tcp) - segments_before);
    // A retransmission on a loaded machine may add a frame; a second frame per request would
    // double the count.
    assert!(
        (N..=N + N / 4).contains(&frames),
        "{frames} STREAM frames from the caller's sidecar for {N} requests without a body"
    );
    // A response cut in two writes (head, then body) arrives as two segments.
    assert!(
        (N..=N + N / 4).contains(&segments),
        "{segments} segments with data reached the app for {N} small responses"
    );
}

/// STREAM frames the sidecar has sent on the connections it opened to its peers.
fn stream_frames_sent(sidecar: &Sidecar) -> u64 {
    sidecar
        .started
        .peer_stats()
        .iter()
        .flat_map(|p| &p.connections)
        .map(|c| c.stream_frames_sent)
        .sum()
}

/// `tcpi_data_segs_in` of a TCP socket: segments received that carried data.
#[allow(unsafe_code)]
fn data_segments_in(tcp: &tokio::net::TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a plain-data struct the kernel fills up to `len` bytes; `len` is its
    // size, and the descriptor is a live TCP socket borrowed for the call.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// One GET on a kept-alive connection; reads exactly the response (its head must give its
/// length).
async fn get_over(tcp: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The whole response's length, once its head is in.
    let mut whole: Option<usize> = None;
    while whole.is_none_or(|w| got.len() < w) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
        if whole.is_none() {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .unwrap_or_else(|| panic!("no content-length in {head}"))
                    .trim()
                    .parse()
                    .unwrap();
                whole = Some(end + 4 + length);
            }
        }
    }
    assert_eq!(Some(got.len()), whole, "more than one response");
}
