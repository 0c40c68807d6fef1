//! Real rustls handshakes over loopback TCP: the verifiers accept good X.509-SVIDs and refuse a
//! table of bad certificates and ids, each on the side that checks it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use halyard_certs::test_util::{LeafSpec, TestPki};
use halyard_certs::tls::{client_config_with, server_config_with};
use halyard_certs::{client_config, peer_id, server_config, ExpectedServer, SpiffeId, TrustBundle};
use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
use rustls::client::ResolvesClientCert;
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "mesh.local";

struct Outcome {
    server: Result<SpiffeId, String>,
    client: Result<SpiffeId, String>,
}

/// Runs one handshake; each side reports the peer id it verified or its error.
async fn handshake(server_cfg: ServerConfig, client_cfg: ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("{e:?}"))?;
        let id = peer_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        let _ = tls.write_all(b"ok").await;
        let _ = tls.shutdown().await;
        Ok(id)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("peer.mesh").unwrap();
    let client = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            let id = peer_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string());
            // TLS 1.3: the server judges the client's certificate after the client finished, so
            // the client learns of a refusal on its first read.
            let mut buf = Vec::new();
            match tls.read_to_end(&mut buf).await {
                Ok(_) if buf == b"ok" => id,
                Ok(_) => Err(format!("server closed without reply: {buf:?}")),
                Err(e) => Err(format!("{e:?}")),
            }
        }
        Err(e) => Err(format!("{e:?}")),
    };
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server side finishes")
        .unwrap();
    Outcome { server, client }
}

fn good_server(pki: &TestPki, account: &str) -> ServerConfig {
    server_config(pki.resolver(account), pki.bundle.clone()).unwrap()
}

fn good_client(pki: &TestPki, account: &str, expected: ExpectedServer) -> ClientConfig {
    client_config(pki.resolver(account), pki.bundle.clone(), expected).unwrap()
}

#[tokio::test]
async fn good_handshake_both_directions_yields_peer_ids() {
    let pki = TestPki::new(TD);
    for (server, client) in [("reviews", "productpage"), ("productpage", "reviews")] {
        let out = handshake(
            good_server(&pki, server),
            good_client(&pki, client, ExpectedServer::Id(pki.id(server))),
        )
        .await;
        assert_eq!(out.server.unwrap(), pki.id(client));
        assert_eq!(out.client.unwrap(), pki.id(server));
    }
}

/// Which verifier a bad certificate is shown to.
#[derive(Clone, Copy, Debug)]
enum Checker {
    /// The server verifies the bad certificate as a client certificate.
    Server,
    /// The client verifies the bad certificate as a server certificate.
    Client,
}

struct Case {
    name: &'static str,
    spec: LeafSpec,
    checkers: &'static [Checker],
    /// Text the refusing side's error must contain.
    reason: &'static str,
}

const BOTH: &[Checker] = &[Checker::Server, Checker::Client];

fn uri(path: &str) -> String {
    format!("spiffe://{TD}{path}")
}

fn bad_cases() -> Vec<Case> {
    let good = || LeafSpec::good(&uri("/ns/default/sa/bad"));
    let with = |f: &dyn Fn(&mut LeafSpec)| {
        let mut s = good();
        f(&mut s);
        s
    };
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_secs(86_400);
    vec![
        Case {
            name: "two URI SANs",
            spec: with(&|s| s.uris.push(uri("/ns/default/sa/other"))),
            checkers: BOTH,
            reason: "ManyUriSans(2)",
        },
        Case {
            name: "no URI SAN",
            spec: with(&|s| {
                s.uris.clear();
                s.dns.push("bad.mesh".into())
            }),
            checkers: BOTH,
            reason: "NoUriSan",
        },
        Case {
            name: "CA certificate as leaf",
            spec: with(&|s| s.is_ca = true),
            checkers: BOTH,
            reason: "CaUsedAsEndEntity",
        },
        Case {
            name: "keyCertSign on leaf",
            spec: with(&|s| s.key_usages.push(Ku::KeyCertSign)),
            checkers: BOTH,
            reason: "SigningLeaf",
        },
        Case {
            name: "no digitalSignature",
            spec: with(&|s| s.key_usages = vec![Ku::KeyEncipherment]),
            checkers: BOTH,
            reason: "KeyUsage",
        },
        Case {
            name: "id with empty path",
            spec: with(&|s| s.uris = vec![format!("spiffe://{TD}")]),
            checkers: BOTH,
            reason: "EmptyPath",
        },
        Case {
            name: "another trust domain",
            spec: with(&|s| s.uris = vec!["spiffe://other.td/ns/default/sa/bad".into()]),
            checkers: BOTH,
            reason: "other.td",
        },
        Case {
            name: "expired",
            spec: with(&|s| {
                s.not_before = now - day * 2;
                s.not_after = now - day
            }),
            checkers: BOTH,
            reason: "Expired",
        },
        Case {
            name: "not yet valid",
            spec: with(&|s| {
                s.not_before = now + day;
                s.not_after = now + day * 2
            }),
            checkers: BOTH,
            reason: "NotValidYet",
        },
        Case {
            name: "no clientAuth EKU",
            spec: with(&|s| s.ekus = vec![Eku::ServerAuth]),
            checkers: &[Checker::Server],
            reason: "InvalidPurpose",
        },
        Case {
            name: "no serverAuth EKU",
            spec: with(&|s| s.ekus = vec![Eku::ClientAuth]),
            checkers: &[Checker::Client],
            reason: "InvalidPurpose",
        },
        Case {
            name: "id with query",
            spec: with(&|s| s.uris = vec![uri("/ns/default/sa/bad?x=1")]),
            checkers: BOTH,
            reason: "Query",
        },
        Case {
            name: "id with port",
            spec: with(&|s| s.uris = vec![format!("spiffe://{TD}:8443/ns/default/sa/bad")]),
            checkers: BOTH,
            reason: "Port",
        },
        Case {
            name: "id with userinfo",
            spec: with(&|s| s.uris = vec![format!("spiffe://user@{TD}/ns/default/sa/bad")]),
            checkers: BOTH,
            reason: "UserInfo",
        },
        Case {
            name: "id over 2048 bytes",
            spec: with(&|s| s.uris = vec![uri(&format!("/{}", "a".repeat(2100)))]),
            checkers: BOTH,
            reason: "TooLong",
        },
        Case {
            name: "uppercase trust domain",
            spec: with(&|s| s.uris = vec!["spiffe://Mesh.local/ns/default/sa/bad".into()]),
            checkers: BOTH,
            reason: "TrustDomainChar('M')",
        },
        Case {
            name: "dot segment in path",
            spec: with(&|s| s.uris = vec![uri("/ns/../sa/bad")]),
            checkers: BOTH,
            reason: "DotSegment",
        },
        Case {
            name: "not a spiffe URI",
            spec: with(&|s| s.uris = vec!["https://mesh.local/ns/default/sa/bad".into()]),
            checkers: BOTH,
            reason: "Scheme",
        },
    ]
}

/// Shows `bad` to the checking side and the good identity `good_account` on the other.
async fn run_case(
    pki: &TestPki,
    bad: Arc<halyard_certs::test_util::RawResolver>,
    checker: Checker,
) -> Outcome {
    match checker {
        Checker::Server => {
            let server = good_server(pki, "server");
            let client = client_config_with(
                bad as Arc<dyn ResolvesClientCert>,
                pki.bundle.clone(),
                ExpectedServer::Id(pki.id("server")),
            )
            .unwrap();
            handshake(server, client).await
        }
        Checker::Client => {
            let server = server_config_with(
                bad as Arc<dyn ResolvesServerCert>,
                halyard_certs::TrustDomain::new(TD).unwrap(),
                pki.bundle.clone(),
            )
            .unwrap();
            let expected =
                ExpectedServer::TrustDomain(halyard_certs::TrustDomain::new(TD).unwrap());
            handshake(server, good_client(pki, "client", expected)).await
        }
    }
}

#[tokio::test]
async fn bad_certificates_are_refused_by_the_checking_side() {
    let pki = TestPki::new(TD);
    let mut checked = 0;
    for case in bad_cases() {
        let bad = pki.raw_leaf(&case.spec);
        for &checker in case.checkers {
            let out = run_case(&pki, bad.clone(), checker).await;
            let refusal = match checker {
                Checker::Server => &out.server,
                Checker::Client => &out.client,
            };
            let err = refusal
                .as_ref()
                .expect_err(&format!("{} accepted by {checker:?}", case.name));
            assert!(
                err.contains(case.reason),
                "{} ({checker:?}): error {err} lacks {}",
                case.name,
                case.reason
            );
            assert!(
                out.server.is_err() && out.client.is_err(),
                "{}: one side went on",
                case.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} refusals checked");
}

#[tokio::test]
async fn leaf_from_another_ca_is_refused_on_both_sides() {
    let pki = TestPki::new(TD);
    let stranger = TestPki::new(TD);
    let out = handshake(
        good_server(&pki, "server"),
        client_config(
            stranger.resolver("client"),
            pki.bundle.clone(),
            ExpectedServer::Id(pki.id("server")),
        )
        .unwrap(),
    )
    .await;
    // Both roots carry the same subject, so webpki finds a candidate anchor and the signature
    // check is what fails.
    let chain_refused = |e: &str| e.contains("UnknownIssuer") || e.contains("BadSignature");
    let err = out.server.unwrap_err();
    assert!(chain_refused(&err), "{err}");
    let out = handshake(
        server_config(stranger.resolver("server"), pki.bundle.clone()).unwrap(),
        good_client(&pki, "client", ExpectedServer::Id(pki.id("server"))),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(chain_refused(&err), "{err}");
}

#[tokio::test]
async fn right_ca_but_wrong_expected_id_is_refused_by_the_client() {
    let pki = TestPki::new(TD);
    let out = handshake(
        good_server(&pki, "ratings"),
        good_client(&pki, "client", ExpectedServer::Id(pki.id("reviews"))),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("WrongId"), "{err}");
    assert!(err.contains("ratings") && err.contains("reviews"), "{err}");
}

#[tokio::test]
async fn a_bundle_with_two_roots_accepts_leaves_from_both() {
    let old = TestPki::new(TD);
    let new = TestPki::new(TD);
    let joined = Arc::new(TrustBundle::clone(&old.bundle).merge(&new.bundle));
    assert_eq!(joined.roots().len(), 2);
    let server = server_config(old.resolver("server"), joined.clone()).unwrap();
    let client = client_config(
        new.resolver("client"),
        joined.clone(),
        ExpectedServer::Id(old.id("server")),
    )
    .unwrap();
    let out = handshake(server, client).await;
    assert_eq!(out.server.unwrap(), new.id("client"));
    assert_eq!(out.client.unwrap(), old.id("server"));
    // And from the bundle as PEM, as a sidecar reads it from bundle.pem.
    let reread = TrustBundle::from_pem(&joined.to_pem()).unwrap();
    assert_eq!(reread.roots(), joined.roots());
}

#[tokio::test]
async fn leaves_of_an_intermediate_chain_to_the_root_on_both_sides() {
    let root = TestPki::new(TD);
    let inter = root
        .ca
        .intermediate("Halyard CA server", Duration::from_secs(3600))
        .unwrap();
    // The intermediate reloads from its ca.crt (itself, then the root) and ca.key.
    let dir = tempfile::tempdir().unwrap();
    inter.write(dir.path(), false).unwrap();
    let inter = halyard_certs::MeshCa::load(dir.path()).unwrap();
    assert_eq!(
        inter.bundle().unwrap().roots(),
        &[root.ca.cert_der().clone()]
    );
    let ident = |sa: &str| {
        let leaf = inter.issue(&root.id(sa), Duration::from_secs(600)).unwrap();
        assert_eq!(halyard_certs::pem::certs(&leaf.cert_pem).unwrap().len(), 2);
        halyard_certs::CertResolver::new(
            halyard_certs::WorkloadIdentity::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap(),
        )
    };
    let bundle = Arc::new(inter.bundle().unwrap());
    let out = handshake(
        server_config(ident("a"), bundle.clone()).unwrap(),
        client_config(ident("b"), bundle, ExpectedServer::Id(root.id("a"))).unwrap(),
    )
    .await;
    assert_eq!(out.server.unwrap(), root.id("b"));
    assert_eq!(out.client.unwrap(), root.id("a"));
}

#[test]
fn a_ca_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::new(TD);
    let dir = tempfile::tempdir().unwrap();
    pki.ca.write(dir.path(), false).unwrap();
    let key = dir.path().join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = halyard_certs::MeshCa::load(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
}

/// Two clusters with a trust domain each, each bundle holding both roots (SPIFFE federation):
/// workloads of either are accepted on both sides, a root vouches only for its own trust
/// domain, and without the other's root nothing of it gets in.
#[tokio::test]
async fn federated_trust_domains_accept_each_other_and_a_root_vouches_only_for_its_own() {
    let a = TestPki::new("a.mesh.local");
    let b = TestPki::new("b.mesh.local");
    let both = Arc::new(TrustBundle::clone(&a.bundle).merge(&b.bundle));
    assert_eq!(
        both.trust_domains()
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect::<Vec<_>>(),
        ["a.mesh.local", "b.mesh.local"]
    );
    // A caller of b reaches a server of a.
    let out = handshake(
        server_config(a.resolver("reviews"), both.clone()).unwrap(),
        client_config(
            b.resolver("productpage"),
            both.clone(),
            ExpectedServer::Id(a.id("reviews")),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(out.server.unwrap(), b.id("productpage"));
    assert_eq!(out.client.unwrap(), a.id("reviews"));

    // a's server without b's root: b's caller is an unknown issuer.
    let out = handshake(
        server_config(a.resolver("reviews"), a.bundle.clone()).unwrap(),
        client_config(
            b.resolver("productpage"),
            both.clone(),
            ExpectedServer::Id(a.id("reviews")),
        )
        .unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );

    // a's CA signs a leaf claiming an id of b: refused by both sides although the chain is good.
    let forged = a.raw_leaf(&LeafSpec::good(
        "spiffe://b.mesh.local/ns/default/sa/productpage",
    ));
    let out = handshake(
        server_config(a.resolver("reviews"), both.clone()).unwrap(),
        client_config_with(
            forged.clone() as Arc<dyn ResolvesClientCert>,
            both.clone(),
            ExpectedServer::Id(a.id("reviews")),
        )
        .unwrap(),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("RootOfOtherDomain"), "{err}");
    let out = handshake(
        server_config_with(
            forged as Arc<dyn ResolvesServerCert>,
            halyard_certs::TrustDomain::new("b.mesh.local").unwrap(),
            both.clone(),
        )
        .unwrap(),
        client_config(
            b.resolver("client"),
            both.clone(),
            ExpectedServer::Id(b.id("productpage")),
        )
        .unwrap(),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("RootOfOtherDomain"), "{err}");
}
