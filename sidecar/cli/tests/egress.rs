//! Egress for real: three network namespaces made by the test — the app's (transparent capture
//! by `halyard iptables install`), the egress gateway's, and an "outside" one holding an HTTP
//! server, a TLS server with its own CA and a raw TCP server, reachable only from the gateway's.
//! Needs root (CI runs as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halyard_sidecar::test_util::{metric, Mesh, Sidecar, Spec};

mod common;
use common::{run, NetNs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OUTSIDE: &str = "10.99.0.2";

fn can_run() -> bool {
    common::can_run(&["ip", "iptables"], "egress namespaces")
}

/// Links namespace `a` (address `a_ip`) and `b` (`b_ip`) by a veth pair on a /24.
fn link(a: &NetNs, a_ip: &str, b: &NetNs, b_ip: &str) {
    // Interface names are per namespace; the pair is named after both ends.
    let (va, vb) = (format!("to-{}", &b.0[4..7]), format!("to-{}", &a.0[4..7]));
    run(&[
        "ip", "link", "add", &va, "netns", &a.0, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ]);
    a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &va]);
    b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
}

/// The outside world's CA and a server certificate for `*.outside.test` names it signs.
struct OutsidePki {
    ca_pem: String,
    other_ca_pem: String,
    server: rustls::ServerConfig,
}

fn outside_pki() -> OutsidePki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "outside test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = ca_params.self_signed(&other_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec![
        "api.outside.test".to_owned(),
        "secure.outside.test".to_owned(),
    ])
    .unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    OutsidePki {
        ca_pem: ca.pem(),
        other_ca_pem: other.pem(),
        server,
    }
}

/// Who connected to the outside servers.
type Seen = Arc<Mutex<Vec<SocketAddr>>>;

/// The outside servers: plain HTTP on :80, TLS on :443 (answering HTTP inside, with the SNI it
/// saw), a raw echo on :7000.
async fn outside_servers(
    server: rustls::ServerConfig,
    seen: Seen,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = TcpListener::bind((OUTSIDE, 80)).await.unwrap();
    let tls = TcpListener::bind((OUTSIDE, 443)).await.unwrap();
    let echo = TcpListener::bind((OUTSIDE, 7000)).await.unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let s1 = seen.clone();
    let plain = tokio::spawn(async move {
        while let Ok((mut tcp, from)) = http.accept().await {
            s1.lock().unwrap().push(from);
            tokio::spawn(async move {
                let head = read_head(&mut tcp).await;
                let host = header(&head, "host");
                let body = format!("plain hello {host}");
                let _ = tcp.write_all(answer(&body).as_bytes()).await;
            });
        }
    });
    let s2 = seen.clone();
    let secure = tokio::spawn(async move {
        while let Ok((tcp, from)) = tls.accept().await {
            s2.lock().unwrap().push(from);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let head = read_head(&mut tls).await;
                if head.starts_with("GET") {
                    let body = format!("tls hello {sni} {}", header(&head, "host"));
                    let _ = tls.write_all(answer(&body).as_bytes()).await;
                } else {
                    let _ = tls.write_all(format!("tls raw {sni}").as_bytes()).await;
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    let s3 = seen;
    let raw = tokio::spawn(async move {
        while let Ok((mut tcp, from)) = echo.accept().await {
            s3.lock().unwrap().push(from);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if tcp.read_to_end(&mut buf).await.is_ok() {
                    let _ = tcp.write_all(b"outside:").await;
                    let _ = tcp.write_all(&buf).await;
                }
            });
        }
    });
    vec![plain, secure, raw]
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

fn answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// An HTTP/1.1 GET to `addr` with `Host: host`; the whole answer.
async fn get(addr: &str, host: &str) -> String {
    get_path(addr, host, "/").await
}

async fn get_path(addr: &str, host: &str, path: &str) -> String {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return "connect failed".into();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let _ = tcp.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS ClientHello for `sni` to `addr` (any certificate accepted: the check is where the flow
/// went); the server's first words.
async fn tls_hello(addr: &str, sni: &str) -> String {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return "connect failed".into();
    };
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return "handshake failed".into();
    };
    let _ = tls.write_all(b"hello").await;
    // close_notify and FIN: the server reads to the end, then answers.
    let _ = tls.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn raw(addr: &str, msg: &[u8]) -> String {
    match halyard_sidecar::test_util::call(addr.parse().unwrap(), msg).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("error: {}", e.kind()),
    }
}

/// Runs `f` on a thread inside `ns`, with a runtime of its own, until it returns.
fn in_ns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let name = ns.0.clone();
    std::thread::spawn(move || {
        NetNs(name).enter_and_forget();
        f()
    })
}

fn objects(pki: &OutsidePki) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    };
    format!(
        "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: mesh.local\noutboundTrafficPolicy: registry-only\negressGateway: egress\n---\n\
kind: Service\nname: egress\nports: [{{ name: tcp, port: 15001, protocol: tcp }}]\n---\n\
kind: ExternalService\nname: outside-web\nhosts: [web.outside.test]\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports: [{{ port: 80, protocol: http }}]\n---\n\
kind: Route\nservice: outside-web\nrules:\n  - match: {{ path: {{ prefix: /teapot }} }}\n    backends: [{{ weight: 100 }}]\n    fault: {{ abort: {{ percent: 100, status: 418 }} }}\n  - backends: [{{ weight: 100 }}]\n    timeout: 5s\n    retries: {{ attempts: 2, on: [connect-failure, reset] }}\n---\n\
kind: Policy\nservice: outside-web\nrules: [{{ action: deny, to: {{ paths: [/admin, /admin/*] }} }}]\n---\n\
kind: ExternalService\nname: outside-api\nhosts: ['*.outside.test']\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports: [{{ port: 443, protocol: tls }}]\n---\n\
kind: ExternalService\nname: outside-db\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports: [{{ port: 7000, protocol: tcp }}]\n---\n\
kind: Policy\nservice: outside-db\nrules: [{{ action: deny, from: {{ services: [productpage] }} }}]\n---\n\
kind: ExternalService\nname: outside-secure\nhosts: [secure.outside.test]\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports:\n  - port: 8080\n    protocol: http\n    originateTls:\n      targetPort: 443\n      caBundle: |\n{}---\n\
kind: ExternalService\nname: outside-wrong-ca\nhosts: [api.outside.test]\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports:\n  - port: 8081\n    protocol: http\n    originateTls:\n      targetPort: 443\n      caBundle: |\n{}---\n\
kind: ExternalService\nname: outside-wrong-name\nhosts: [wrong.outside.test]\naddresses: [{OUTSIDE}]\nresolution: static\nvia: egress\nports:\n  - port: 8082\n    protocol: http\n    originateTls:\n      targetPort: 443\n      caBundle: |\n{}",
        indent(&pki.ca_pem),
        indent(&pki.other_ca_pem),
        indent(&pki.ca_pem),
    )
}

#[test]
fn egress_goes_through_the_gateway_and_only_there() {
    if !can_run() {
        return;
    }
    let app_ns = NetNs::named("hly-ega");
    let gw_ns = NetNs::named("hly-egg");
    let out_ns = NetNs::named("hly-ego");
    for ns in [&app_ns, &gw_ns, &out_ns] {
        ns.exec(&["ip", "link", "set", "lo", "up"]);
    }
    link(&app_ns, "10.98.0.1", &gw_ns, "10.98.0.2");
    link(&gw_ns, "10.99.0.1", &out_ns, OUTSIDE);
    // The app's routes lead to the outside through the gateway's namespace, which does not
    // forward (a new namespace's default): only the gateway's own connections get there.
    app_ns.exec(&["ip", "route", "add", "10.99.0.0/24", "via", "10.98.0.2"]);
    let pki = outside_pki();
    let seen: Seen = Arc::default();

    // The outside world.
    let (stop_out, out_stopped) = std::sync::mpsc::channel::<()>();
    let (out_ready, ready) = std::sync::mpsc::channel();
    let server = pki.server.clone();
    let seen2 = seen.clone();
    let outside = in_ns(&out_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let _tasks = outside_servers(server, seen2).await;
            out_ready.send(()).unwrap();
            tokio::task::spawn_blocking(move || out_stopped.recv())
                .await
                .unwrap()
                .ok();
        });
    });
    ready.recv().unwrap();

    let mesh = Arc::new(
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(Mesh::with_dir()),
    );
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(mesh.apply(&objects(&pki)));

    // Bad ExternalServices written straight to the registry are quarantined; the others work.
    let dir = mesh.registry.trim_start_matches("file://").to_owned();
    let bad = [
        (
            "bad-wild",
            r#"{"kind":"ExternalService","name":"bad-wild","hosts":["*.*.bad"],"ports":[{"port":443,"protocol":"tls"}]}"#,
        ),
        (
            "bad-port",
            r#"{"kind":"ExternalService","name":"bad-port","hosts":["a.bad"],"ports":[{"port":0,"protocol":"tcp"}]}"#,
        ),
        (
            "bad-tls",
            r#"{"kind":"ExternalService","name":"bad-tls","hosts":["b.bad"],"ports":[{"port":5432,"protocol":"tcp","originateTls":{}}]}"#,
        ),
    ];
    std::fs::create_dir_all(format!("{dir}/default/externalservices")).unwrap();
    for (name, json) in bad {
        std::fs::write(format!("{dir}/default/externalservices/{name}.json"), json).unwrap();
    }

    // The egress gateway.
    let (stop_gw, gw_stopped) = std::sync::mpsc::channel::<()>();
    let (gw_ready, ready) = std::sync::mpsc::channel();
    let m = mesh.clone();
    let gateway = in_ns(&gw_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut spec = Spec::new("egress", "v1");
            spec.listen = Some("10.98.0.2:0".parse().unwrap());
            spec.extra = "[egress]\ngateway = true\n".into();
            let gw = m.start(&spec).await;
            gw_ready.send(gw.started.render_metrics()).unwrap();
            tokio::task::spawn_blocking(move || gw_stopped.recv())
                .await
                .unwrap()
                .ok();
            let text = gw.started.render_metrics();
            gw.shutdown().await.unwrap();
            text
        })
    });
    ready.recv().unwrap();

    // The app, its sidecar capturing everything it dials.
    let m = mesh.clone();
    let halyard = env!("CARGO_BIN_EXE_halyard").to_owned();
    let app_ns_name = app_ns.0.clone();
    let app = in_ns(&app_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut spec = Spec::new("productpage", "v1");
            spec.transparent = true;
            // QUIC leaves from the inbound socket: it must reach the gateway's namespace.
            spec.listen = Some("10.98.0.1:0".parse().unwrap());
            let pp: Sidecar = m.start(&spec).await;
            pp.wait_endpoints("egress", 1).await;
            pp.wait_snapshot("three quarantined", |s| {
                s.rejected
                    .keys()
                    .filter(|k| k.contains("externalservices/bad-"))
                    .count()
                    == 3
            })
            .await;
            let quarantined = pp.started.render_metrics();
            assert!(
                quarantined.contains("halyard_registry_rejected"),
                "{quarantined}"
            );
            let capture = pp.started.transparent.unwrap().port().to_string();
            let install = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &app_ns_name,
                    &halyard,
                    "iptables",
                    "install",
                ])
                .args(["--capture-port", &capture])
                .output()
                .unwrap();
            assert!(
                install.status.success(),
                "{}",
                String::from_utf8_lossy(&install.stderr)
            );
            let web = get(&format!("{OUTSIDE}:80"), "web.outside.test").await;
            let api = tls_hello(&format!("{OUTSIDE}:443"), "api.outside.test").await;
            let db = raw(&format!("{OUTSIDE}:7000"), b"db").await;
            let secure = get(&format!("{OUTSIDE}:8080"), "secure.outside.test").await;
            let wrong_ca = get(&format!("{OUTSIDE}:8081"), "api.outside.test").await;
            let wrong_name = get(&format!("{OUTSIDE}:8082"), "wrong.outside.test").await;
            let unregistered = raw(&format!("{OUTSIDE}:9999"), b"nobody").await;
            let teapot = get_path(&format!("{OUTSIDE}:80"), "web.outside.test", "/teapot").await;
            let admin = get_path(&format!("{OUTSIDE}:80"), "web.outside.test", "/admin/x").await;
            assert!(
                teapot.starts_with("HTTP/1.1 418"),
                "the Route applies: {teapot}"
            );
            assert!(
                admin.starts_with("HTTP/1.1 403"),
                "the Policy applies per request: {admin}"
            );
            let results = (web, api, db, secure, wrong_ca, wrong_name, unregistered);
            let text = pp.started.render_metrics();
            pp.shutdown().await.unwrap();
            (results, text)
        })
    });
    let ((web, api, db, secure, wrong_ca, wrong_name, unregistered), app_metrics) =
        app.join().unwrap();
    stop_gw.send(()).unwrap();
    let gw_metrics = gateway.join().unwrap();
    stop_out.send(()).unwrap();
    outside.join().unwrap();

    assert!(web.ends_with("plain hello web.outside.test"), "{web}");
    assert_eq!(
        api, "tls raw api.outside.test",
        "SNI matched by *.outside.test"
    );
    assert!(
        !db.contains("outside:"),
        "a denied identity reached the outside: {db}"
    );
    assert!(
        secure.ends_with("tls hello secure.outside.test secure.outside.test"),
        "TLS origination: {secure}"
    );
    assert!(wrong_ca.starts_with("HTTP/1.1 502"), "{wrong_ca}");
    assert!(
        wrong_ca.contains("TLS to api.outside.test failed"),
        "{wrong_ca}"
    );
    assert!(wrong_name.starts_with("HTTP/1.1 502"), "{wrong_name}");
    assert!(
        wrong_name.contains("NotValidForName") || wrong_name.contains("name"),
        "{wrong_name}"
    );
    assert!(!unregistered.contains("outside:"), "{unregistered}");
    assert_eq!(
        metric(
            &app_metrics,
            "halyard_egress_refused_total",
            &[("destination", &format!("{OUTSIDE}:9999"))]
        ),
        1.0,
        "{app_metrics}"
    );
    assert_eq!(
        metric(
            &gw_metrics,
            "halyard_policy_denials_total",
            &[("destination_service", "outside-db")]
        ),
        1.0
    );
    // Everything the outside saw came from the gateway's side of the link.
    let from: Vec<SocketAddr> = seen.lock().unwrap().clone();
    assert!(!from.is_empty());
    assert!(
        from.iter().all(|a| a.ip().to_string() == "10.99.0.1"),
        "{from:?}"
    );
    drop((app_ns, gw_ns, out_ns));
}
