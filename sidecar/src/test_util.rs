//! A mesh on loopback for integration tests: a CA, a registry (directory or a real etcd),
//! echo apps and sidecars, in-process or as `halyard sidecar` processes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::run::{run_until, Started};
use halyard_certs::ca::write_identity;
use halyard_certs::{MeshCa, SpiffeId, TrustDomain};
use halyard_registry::admin::Admin;
use halyard_registry::model::parse_documents;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const TD: &str = "mesh.local";

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ca: MeshCa,
    pub registry: String,
    admin: Admin,
    /// More roots (PEM) written into every bundle.pem from now on (another cluster's, for
    /// federation).
    extra_roots: std::sync::Mutex<String>,
}

/// What one sidecar serves and calls.
#[derive(Clone, Default)]
pub struct Spec {
    pub service: String,
    pub version: String,
    pub app_host: Option<IpAddr>,
    pub upstreams: Vec<(String, u16)>,
    pub transparent: bool,
    /// The inbound QUIC listener (default `127.0.0.1:0`).
    pub listen: Option<SocketAddr>,
    /// Extra TOML appended to the config.
    pub extra: String,
    /// Top-level TOML put before the first table.
    pub prefix: String,
    /// More keys of the `[inbound]` table (`path_parameters = "keep"\n`).
    pub inbound: String,
    /// More keys of the `[identity]` table.
    pub identity: String,
    /// Start with the mesh root only (no leaf): the sidecar enrolls with the CA.
    pub enroll: bool,
    /// The bundle an enrolling sidecar starts with; default the mesh CA's root.
    pub bundle: Option<String>,
    /// `failure.connect_timeout` (default `1s`, so failure tests end fast).
    pub connect_timeout: Option<String>,
}

impl Spec {
    pub fn new(service: &str, version: &str) -> Spec {
        Spec {
            service: service.into(),
            version: version.into(),
            ..Spec::default()
        }
    }
    pub fn app_host(mut self, ip: IpAddr) -> Spec {
        self.app_host = Some(ip);
        self
    }
    pub fn upstream(mut self, service: &str, port: u16) -> Spec {
        self.upstreams.push((service.into(), port));
        self
    }
    /// Enrolls with the CA at `ca` using the token file `token`, as `spiffe://mesh.local/ns/default/sa/<service>`,
    /// asking for leaves of `leaf_ttl`.
    pub fn enroll(mut self, ca: SocketAddr, token: &std::path::Path, leaf_ttl: &str) -> Spec {
        self.enroll = true;
        self.identity += &format!(
            "ca = \"{ca}\"\ntoken = {token:?}\nid = \"spiffe://{TD}/ns/default/sa/{}\"\nleaf_ttl = {leaf_ttl:?}\n",
            self.service
        );
        self
    }
    /// Sets `failure.connect_timeout`: a test that counts every flow's outcome gives a cold
    /// handshake on a loaded machine more than the default second.
    pub fn connect_timeout(mut self, timeout: &str) -> Spec {
        self.connect_timeout = Some(timeout.into());
        self
    }
    /// Adds `key = value` lines to the `[inbound]` table.
    pub fn inbound(mut self, toml: &str) -> Spec {
        self.inbound += toml;
        self
    }
}

/// An in-process sidecar.
pub struct Sidecar {
    pub config: Arc<Config>,
    pub started: Started,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sidecar {
    pub fn upstream(&self, i: usize) -> SocketAddr {
        self.started.upstreams[i]
    }

    /// Waits until this sidecar's snapshot satisfies `f`.
    pub async fn wait_snapshot(&self, what: &str, f: impl Fn(&halyard_registry::Snapshot) -> bool) {
        let mut rx = self.started.snapshot.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("snapshot never showed {what}"))
            .unwrap();
    }

    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        self.wait_snapshot(&format!("{n} endpoints of {service}"), |s| {
            s.endpoints_of(service).count() == n
        })
        .await;
    }

    /// Waits until this sidecar has recorded `n` finished flows.
    pub async fn wait_flows(&self, n: u64) {
        let mut rx = self.started.finished_flows();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&done| done >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} flows recorded"))
            .unwrap();
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

impl Mesh {
    pub async fn with_dir() -> Mesh {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default")).unwrap();
        let url = format!("file://{}", reg.display());
        Self::with_url(dir, url).await
    }

    /// A mesh on its own directory registry whose CA is a copy of `other`'s (two clusters
    /// sharing one root).
    pub async fn with_dir_sharing_ca(other: &Mesh) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default")).unwrap();
        let copy = dir.path().join("ca-copy");
        other.ca.write(&copy, false).unwrap();
        let ca = MeshCa::load(&copy).unwrap();
        let url = format!("file://{}", reg.display());
        Self::with_ca(dir, url, ca).await
    }

    /// A mesh on the registry at `url` whose CA is a copy of `other`'s.
    pub async fn with_url_sharing_ca(url: String, other: &Mesh) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("ca-copy");
        other.ca.write(&copy, false).unwrap();
        let ca = MeshCa::load(&copy).unwrap();
        Self::with_ca(dir, url, ca).await
    }

    /// A mesh on its own directory registry with its own CA for `trust_domain`.
    pub async fn with_dir_in(trust_domain: &str) -> Mesh {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry");
        std::fs::create_dir_all(reg.join("default")).unwrap();
        let url = format!("file://{}", reg.display());
        let ca = MeshCa::create(&TrustDomain::new(trust_domain).unwrap()).unwrap();
        Self::with_ca(dir, url, ca).await
    }

    /// Trusts `root_pem` too in the bundles of sidecars started from now on.
    pub fn trust(&self, root_pem: &str) {
        self.extra_roots.lock().unwrap().push_str(root_pem);
    }

    pub async fn with_url(dir: tempfile::TempDir, url: String) -> Mesh {
        let ca = MeshCa::create(&TrustDomain::new(TD).unwrap()).unwrap();
        Self::with_ca(dir, url, ca).await
    }

    /// A mesh on `url` reached with `access` (an etcd user, TLS), sharing `other`'s CA.
    pub async fn with_access_sharing_ca(
        url: String,
        access: &halyard_registry::Access,
        other: &Mesh,
    ) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("ca-copy");
        other.ca.write(&copy, false).unwrap();
        let ca = MeshCa::load(&copy).unwrap();
        Self::with_ca_access(dir, url, ca, access).await
    }

    async fn with_ca(dir: tempfile::TempDir, url: String, ca: MeshCa) -> Mesh {
        Self::with_ca_access(dir, url, ca, &halyard_registry::Access::default()).await
    }

    async fn with_ca_access(
        dir: tempfile::TempDir,
        url: String,
        ca: MeshCa,
        access: &halyard_registry::Access,
    ) -> Mesh {
        let admin = Admin::connect_as(&url, "default", Duration::from_secs(3), access)
            .await
            .unwrap();
        Mesh {
            dir,
            ca,
            registry: url,
            admin,
            extra_roots: std::sync::Mutex::new(String::new()),
        }
    }

    pub async fn apply(&self, yaml: &str) {
        let objects = parse_documents("test", yaml).unwrap();
        self.admin.apply(&objects).await.unwrap();
    }

    /// Writes cert.pem, key.pem and bundle.pem for `account` into a fresh folder.
    pub fn identity(&self, account: &str) -> PathBuf {
        let out = self
            .dir
            .path()
            .join(format!("id-{account}-{}", rand_suffix()));
        let id = SpiffeId::workload(self.ca.trust_domain(), "default", account).unwrap();
        let leaf = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let bundle = format!("{}{}", self.ca.cert_pem(), self.extra_roots.lock().unwrap());
        write_identity(&out, &leaf, &bundle).unwrap();
        out
    }

    /// A fresh folder holding only `bundle.pem` (the mesh root).
    pub fn bundle_only(&self) -> PathBuf {
        let out = self.dir.path().join(format!("id-new-{}", rand_suffix()));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("bundle.pem"), self.ca.root_pem()).unwrap();
        out
    }

    /// Starts a CA server for this mesh's CA on a fresh loopback address ([`loopback_ip`], port 0) with `extra` config lines.
    pub async fn ca_server(&self, extra: &str) -> CaServer {
        self.ca_server_with(&self.ca, extra).await
    }

    /// Starts a CA server signing with `ca` (another root, or an intermediate).
    pub async fn ca_server_with(&self, ca: &MeshCa, extra: &str) -> CaServer {
        let dir = self.dir.path().join(format!("ca-{}", rand_suffix()));
        ca.write(&dir, false).unwrap();
        // An address of its own: a test that stops the CA and starts it again there finds it
        // free (no other test's socket takes a port on it meanwhile).
        let listen = if extra.contains("listen") {
            String::new()
        } else {
            format!("listen = \"{}:0\"\n", loopback_ip())
        };
        let text = format!(
            "{listen}dir = {dir:?}\nregistry = {:?}\n{extra}",
            self.registry
        );
        let path = dir.join("ca.toml");
        std::fs::write(&path, text).unwrap();
        let config = crate::ca::server::CaServerConfig::load(&path).unwrap();
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::ca::server::serve(config, stop.clone(), Some(tx)));
        let started = match rx.await {
            Ok(s) => s,
            Err(_) => panic!("CA failed to start: {:?}", task.await),
        };
        CaServer {
            addr: started.addr,
            admin: started.admin,
            stop,
            task,
        }
    }

    /// Creates a token for `spiffe://mesh.local/ns/default/sa/<account>` and writes it to a file.
    pub async fn token(&self, account: &str, ttl: Duration, uses: u32) -> PathBuf {
        use halyard_certs::enroll::{BootstrapToken, TokenRecord};
        let store = halyard_registry::ca_store::CaStore::connect(
            &self.registry,
            "default",
            Duration::from_secs(3),
            &halyard_registry::Access::default(),
        )
        .await
        .unwrap();
        let id = SpiffeId::workload(self.ca.trust_domain(), "default", account).unwrap();
        let token = BootstrapToken::generate();
        let record = TokenRecord::new(id, std::time::SystemTime::now(), ttl, uses);
        store.create_token(&token.hash(), &record).await.unwrap();
        let path = self
            .dir
            .path()
            .join(format!("token-{account}-{}", rand_suffix()));
        std::fs::write(&path, format!("{}\n", token.secret())).unwrap();
        path
    }

    pub fn config_text(&self, spec: &Spec) -> String {
        let id = if spec.enroll {
            let out = self.bundle_only();
            if let Some(pem) = &spec.bundle {
                std::fs::write(out.join("bundle.pem"), pem).unwrap();
            }
            out
        } else {
            self.identity(&spec.service)
        };
        let mut t = spec.prefix.clone();
        t += &format!(
            "registry = {:?}\nstate_dir = {:?}\n[identity]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\nreload_interval = \"200ms\"\n{}\
             [service]\nname = {:?}\nversion = {:?}\n[inbound]\nlisten = \"{}\"\napp_host = \"{}\"\n{}\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            self.registry,
            self.dir.path().join(format!("state-{}", rand_suffix())),
            id.join("cert.pem"),
            id.join("key.pem"),
            id.join("bundle.pem"),
            spec.identity,
            spec.service,
            spec.version,
            spec.listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            spec.app_host.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            spec.inbound,
        );
        for (svc, port) in &spec.upstreams {
            t += &format!("[[outbound.upstreams]]\nservice = {svc:?}\nport = {port}\nlisten = \"127.0.0.1:0\"\n");
        }
        if spec.transparent {
            t += "[outbound.transparent]\nlisten = \"127.0.0.1:0\"\n";
        }
        let connect_timeout = spec.connect_timeout.as_deref().unwrap_or("1s");
        t += &format!("[failure]\nconnect_timeout = {connect_timeout:?}\ndrain_timeout = \"5s\"\n");
        t += &spec.extra;
        t
    }

    pub fn write_config(&self, spec: &Spec) -> PathBuf {
        let path = self.dir.path().join(format!(
            "{}-{}-{}.toml",
            spec.service,
            spec.version,
            rand_suffix()
        ));
        std::fs::write(&path, self.config_text(spec)).unwrap();
        path
    }

    pub async fn start(&self, spec: &Spec) -> Sidecar {
        self.start_from(&self.write_config(spec)).await
    }

    /// Starts a sidecar from a config file written by the test.
    pub async fn start_from(&self, path: &std::path::Path) -> Sidecar {
        let config = Arc::new(Config::load(path).unwrap());
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_until(config.clone(), stop.clone(), Some(tx)));
        let started = match rx.await {
            Ok(s) => s,
            Err(_) => panic!("sidecar failed to start: {:?}", task.await),
        };
        Sidecar {
            config,
            started,
            stop,
            task,
        }
    }
}

/// A CA server running in this process.
pub struct CaServer {
    pub addr: SocketAddr,
    /// The admin listener, when the config names one.
    pub admin: Option<SocketAddr>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl CaServer {
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Logs to the test's output when `HALYARD_TEST_LOG` is set (e.g. `debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("HALYARD_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn rand_suffix() -> u64 {
    rand::random::<u64>() % 1_000_000_000
}

/// An app that reads until the client half-closes, then answers `<tag>:<what it read>`.
pub struct Echo {
    pub addr: SocketAddr,
    /// One notice per accepted connection.
    pub accepted: Accepted,
    _task: tokio::task::JoinHandle<()>,
}

/// Notices of accepted connections, each taken once, in constant memory however many are
/// never taken (a soak accepts millions): a count, not a queue.
pub struct Accepted(Arc<tokio::sync::Semaphore>);

impl Accepted {
    /// Waits for a connection not yet taken; `None` never happens (the shape of a channel's
    /// `recv`).
    pub async fn recv(&mut self) -> Option<()> {
        self.0.acquire().await.ok().map(|p| p.forget())
    }

    /// A connection not yet taken, if there is one.
    pub fn try_recv(&mut self) -> Result<(), tokio::sync::TryAcquireError> {
        self.0.try_acquire().map(|p| p.forget())
    }
}

pub async fn tagged_echo(addr: SocketAddr, tag: &str) -> Echo {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let tag = tag.to_owned();
    let count = Arc::new(tokio::sync::Semaphore::new(0));
    let accepted = Accepted(count.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            count.add_permits(1);
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if tcp.read_to_end(&mut buf).await.is_ok() {
                    let mut reply = format!("{tag}:").into_bytes();
                    reply.extend_from_slice(&buf);
                    let _ = tcp.write_all(&reply).await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    Echo {
        addr: local,
        accepted,
        _task: task,
    }
}

/// Sends `msg`, half-closes, and reads the whole answer.
pub async fn call(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(msg).await?;
    tcp.shutdown().await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

/// The value of one Prometheus sample in `text`, matched by name and every label given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How a test HTTP app answers.
#[derive(Clone, Default)]
pub struct AppBehavior {
    /// Answer 503 to every n-th request (1 = always), counting from the first.
    pub fail_every: Option<u64>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Answer with this many bytes of body instead of the usual text (streamed in 64 KiB chunks).
    pub stream_bytes: Option<u64>,
    /// Send the response head at once and the body (the usual text) this much later.
    pub body_delay: Option<Duration>,
}

/// A test HTTP/1.1 app: answers `<tag> <method> <path>` and counts the requests it saw; the
/// headers of the last request are kept. A request carrying `x-reply-cookie-bytes: N` gets a
/// `set-cookie` header whose value is N bytes long.
pub struct HttpApp {
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicU64>,
    /// Notified on every request (a permit is kept, so a later wait still sees an earlier hit).
    pub seen: Arc<tokio::sync::Notify>,
    pub last_headers: Arc<std::sync::Mutex<http::HeaderMap>>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn http_app(addr: SocketAddr, tag: &str, behavior: AppBehavior) -> HttpApp {
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::atomic::Ordering;
    type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last_headers = Arc::new(std::sync::Mutex::new(http::HeaderMap::new()));
    let seen = Arc::new(tokio::sync::Notify::new());
    let h = (hits.clone(), seen.clone());
    let (lh, tag) = (last_headers.clone(), tag.to_owned());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (h, lh, tag, behavior) = (h.clone(), lh.clone(), tag.clone(), behavior.clone());
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (h, lh, tag, behavior) =
                        (h.clone(), lh.clone(), tag.clone(), behavior.clone());
                    async move {
                        let n = h.0.fetch_add(1, Ordering::SeqCst) + 1;
                        h.1.notify_one();
                        *lh.lock().unwrap() = req.headers().clone();
                        let line = format!("{tag} {} {}", req.method(), req.uri().path());
                        let _ = req.into_body().collect().await;
                        if let Some(d) = behavior.delay {
                            tokio::time::sleep(d).await;
                        }
                        let mut resp = if behavior.fail_every.is_some_and(|k| n % k == 0) {
                            let mut r = http::Response::new(
                                Full::new(bytes::Bytes::from(format!("{line} failed"))).boxed(),
                            );
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            r
                        } else if let Some(total) = behavior.stream_bytes {
                            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
                            let count = total.div_ceil(64 * 1024);
                            let frames = futures::stream::iter(
                                (0..count)
                                    .map(move |_| Ok(hyper::body::Frame::data(chunk.clone()))),
                            );
                            http::Response::new(BodyExt::boxed(StreamBody::new(frames)))
                        } else if let Some(d) = behavior.body_delay {
                            let later = futures::stream::once(async move {
                                tokio::time::sleep(d).await;
                                Ok(hyper::body::Frame::data(bytes::Bytes::from(line)))
                            });
                            http::Response::new(BodyExt::boxed(StreamBody::new(later)))
                        } else {
                            http::Response::new(Full::new(bytes::Bytes::from(line)).boxed())
                        };
                        resp.headers_mut()
                            .insert("x-app", http::HeaderValue::from_str(&tag).unwrap());
                        if let Some(n) = reply_cookie_bytes(&lh.lock().unwrap()) {
                            let value = http::HeaderValue::from_str(&cookie(n)).unwrap();
                            resp.headers_mut().insert("set-cookie", value);
                        }
                        Ok::<_, std::convert::Infallible>(resp as http::Response<Body>)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    HttpApp {
        addr: local,
        hits,
        seen,
        last_headers,
        _task: task,
    }
}

fn reply_cookie_bytes(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get("x-reply-cookie-bytes")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A cookie (`c=xxx…`) of `bytes` bytes in all (at least 2).
pub fn cookie(bytes: usize) -> String {
    format!("c={}", "x".repeat(bytes.saturating_sub(2)))
}

/// A pooled HTTP/1.1 client for tests.
pub fn http_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

/// A client that opens a connection per request: for callers that pause longer than the admin
/// port keeps an idle connection (its header read timeout counts idle time), where a reused
/// connection could be closed under a request.
pub fn http_client_fresh() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(hyper_util::client::legacy::connect::HttpConnector::new())
}

/// Sends a request through `upstream` and returns status, the body as text, and the headers.
pub async fn http_call(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    upstream: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, http::HeaderMap) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{upstream}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// A loopback address for one app or sidecar of a test: 127.a.b.c outside 127.0.0.0/16, unique
/// within this process and drawn from a random start per process, so tests that bind a fixed
/// port on it (a Service's targetPort) do not meet other tests of this run, in this binary or in
/// another one running beside it (one chance in about 16,000 for two binaries' ranges to meet).
pub fn loopback_ip() -> IpAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    const SPAN: u32 = 254 * 256 * 254; // 127.1-254 . 0-255 . 1-254
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = *START.get_or_init(|| rand::random::<u32>() % SPAN);
    let n = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
    let (a, rest) = (n / (256 * 254), n % (256 * 254));
    let [a, b, c] = [a + 1, rest / 254, rest % 254 + 1].map(|x| u8::try_from(x).unwrap());
    IpAddr::from([127, a, b, c])
}

// ---- A mesh with HTTP, TCP, failing and denied edges, and admin-port helpers ----

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

pub async fn get(client: &Client, admin: SocketAddr, path: &str) -> (u16, String) {
    let (status, body, _) = http_call(client, admin, "GET", path, &[]).await;
    (status, body)
}

pub async fn try_get(client: &Client, admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{admin}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `path` on the admin port until `f` accepts the answer.
pub async fn wait_admin(
    client: &Client,
    admin: SocketAddr,
    path: &str,
    what: &str,
    f: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A process may not listen yet: a refused connection is one more try.
        let (status, body) = try_get(client, admin, path).await.unwrap_or_default();
        if f(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub const HTTP_PORT: u16 = 9080;

/// `reviews` (HTTP, v1) and `ratings` (TCP, v2, three ports: echo, nothing listening, denied),
/// a Policy on each, and `productpage` calling all four. Extra TOML goes to every sidecar.
pub struct Edges {
    pub mesh: Mesh,
    pub reviews: Sidecar,
    pub ratings: Sidecar,
    pub pp: Sidecar,
    pub app: HttpApp,
    pub _echo: Echo,
}

pub async fn edges(extra: &str) -> Edges {
    edges_with(extra, "").await
}

/// [`edges`] with more TOML for `productpage` alone.
pub async fn edges_with(extra: &str, pp_extra: &str) -> Edges {
    let (host_http, host_tcp) = (loopback_ip(), loopback_ip());
    let mesh = Mesh::with_dir().await;
    let app = http_app(SocketAddr::new(host_http, 0), "v1", AppBehavior::default()).await;
    let echo = tagged_echo(SocketAddr::new(host_tcp, 0), "r").await;
    // A port nobody listens on: bind, note, close.
    let dead = std::net::TcpListener::bind(SocketAddr::new(host_tcp, 0)).unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let objects = format!(
        "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: {HTTP_PORT}, protocol: http, targetPort: {} }}\n---\n\
         kind: Service\nname: ratings\nports:\n  - {{ name: ok, port: 9090, protocol: tcp, targetPort: {} }}\n  - {{ name: dead, port: 9091, protocol: tcp, targetPort: {dead_port} }}\n  - {{ name: denied, port: 9092, protocol: tcp, targetPort: {} }}\n---\n\
         kind: Policy\nservice: reviews\nrules:\n  - action: deny\n    to: {{ paths: [/admin, /admin/*] }}\n---\n\
         kind: Policy\nservice: ratings\nrules:\n  - action: deny\n    from: {{ services: [productpage] }}\n    to: {{ ports: [9092] }}\n",
        app.addr.port(),
        echo.addr.port(),
        echo.addr.port(),
    );
    mesh.apply(&objects).await;
    let extra = format!("[outlier]\nconsecutive_failures = 100\n{extra}");
    let mut spec = Spec::new("reviews", "v1").app_host(host_http);
    spec.extra = extra.clone();
    let reviews = mesh.start(&spec).await;
    let mut spec = Spec::new("ratings", "v2").app_host(host_tcp);
    spec.extra = extra.clone();
    let ratings = mesh.start(&spec).await;
    let mut spec = Spec::new("productpage", "v1")
        .upstream("reviews", HTTP_PORT)
        .upstream("ratings", 9090)
        .upstream("ratings", 9091)
        .upstream("ratings", 9092);
    spec.extra = format!("{extra}{pp_extra}");
    let pp = mesh.start(&spec).await;
    pp.wait_endpoints("reviews", 1).await;
    pp.wait_endpoints("ratings", 1).await;
    for s in [&reviews, &ratings] {
        s.wait_snapshot("the policy", |s| s.policies.len() == 2)
            .await;
    }
    Edges {
        mesh,
        reviews,
        ratings,
        pp,
        app,
        _echo: echo,
    }
}

/// 5 good and 2 denied requests, 4 good, 3 failed and 2 denied flows.
pub async fn traffic(e: &Edges, client: &Client) {
    for _ in 0..5 {
        let (status, body, _) = http_call(client, e.pp.upstream(0), "GET", "/ok", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..2 {
        let (status, ..) = http_call(client, e.pp.upstream(0), "GET", "/admin", &[]).await;
        assert_eq!(status, 403);
    }
    for _ in 0..4 {
        assert_eq!(call(e.pp.upstream(1), b"hello").await.unwrap(), b"r:hello");
    }
    for _ in 0..3 {
        assert!(call(e.pp.upstream(2), b"hello").await.is_err_or_empty());
    }
    for _ in 0..2 {
        assert!(call(e.pp.upstream(3), b"hello").await.is_err_or_empty());
    }
}

pub trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for std::io::Result<Vec<u8>> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |v| v.is_empty())
    }
}

pub fn edge<'a>(
    direction: &'a str,
    destination: &'a str,
    version: &'a str,
    last: (&'a str, &'a str),
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("direction", direction),
        ("source_service", "productpage"),
        ("destination_service", destination),
        ("destination_version", version),
        last,
    ]
}

/// A Route of `reviews` sending `v1` percent to version v1 and the rest to v2.
pub fn weighted_route(v1: u32) -> String {
    format!(
        "kind: Route\nservice: reviews\nrules:\n  - backends:\n      - {{ subset: {{ version: v1 }}, weight: {v1} }}\n      - {{ subset: {{ version: v2 }}, weight: {} }}\n",
        100 - v1
    )
}

impl Mesh {
    /// Renews the certificate files of `sidecar` with a fresh leaf (an hour) for `account`.
    pub fn renew(&self, sidecar: &Sidecar, account: &str) {
        let dir = sidecar.config.file.identity.cert.parent().unwrap();
        let id = SpiffeId::workload(self.ca.trust_domain(), "default", account).unwrap();
        let leaf = self.ca.issue(&id, Duration::from_secs(3600)).unwrap();
        write_identity(dir, &leaf, self.ca.cert_pem()).unwrap();
    }
}

/// `reviews` v1 and v2, each an HTTP app (tag `v1`/`v2`) and a tagged echo (`r`) on its own
/// loopback host with the same ports (a Service has one targetPort), behind a Service with an
/// `http` port 9080 and a `tcp` port 9090 and a 50/50 [`weighted_route`]; their sidecars, and
/// `callers` productpage sidecars calling both ports once they see both endpoints. Every
/// sidecar gets `extra`. The apps live as long as the value.
pub struct TwoVersions {
    pub servers: Vec<Sidecar>,
    pub callers: Vec<Sidecar>,
    /// v1's and v2's HTTP apps and echoes: keep them while the sidecars serve.
    pub apps: (HttpApp, HttpApp, Echo, Echo),
}

impl TwoVersions {
    pub async fn start(mesh: &Mesh, callers: usize, extra: &str) -> TwoVersions {
        let (h1, h2) = (loopback_ip(), loopback_ip());
        let app1 = http_app(SocketAddr::new(h1, 0), "v1", AppBehavior::default()).await;
        let echo1 = tagged_echo(SocketAddr::new(h1, 0), "r").await;
        let app2 = http_app(
            SocketAddr::new(h2, app1.addr.port()),
            "v2",
            AppBehavior::default(),
        )
        .await;
        let echo2 = tagged_echo(SocketAddr::new(h2, echo1.addr.port()), "r").await;
        mesh.apply(&format!(
            "kind: Service\nname: reviews\nports:\n  - {{ name: http, port: 9080, protocol: http, targetPort: {} }}\n  - {{ name: tcp, port: 9090, protocol: tcp, targetPort: {} }}\n",
            app1.addr.port(),
            echo1.addr.port()
        ))
        .await;
        mesh.apply(&weighted_route(50)).await;
        let mut servers = Vec::new();
        for (host, version) in [(h1, "v1"), (h2, "v2")] {
            let mut spec = Spec::new("reviews", version).app_host(host);
            spec.extra = extra.into();
            servers.push(mesh.start(&spec).await);
        }
        let mut pps = Vec::new();
        for _ in 0..callers {
            let mut spec = Spec::new("productpage", "v1")
                .upstream("reviews", 9080)
                .upstream("reviews", 9090);
            spec.extra = extra.into();
            let pp = mesh.start(&spec).await;
            pp.wait_endpoints("reviews", 2).await;
            pps.push(pp);
        }
        TwoVersions {
            servers,
            callers: pps,
            apps: (app1, app2, echo1, echo2),
        }
    }
}

/// A TLS 1.3 client configuration (ring, no trusted roots) offering 48 ALPN names, none of
/// them `h3`: over QUIC its ClientHello spans two Initial packets.
pub fn large_hello_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    crypto.alpn_protocols = (0..48)
        .map(|i| format!("halyard-test-application-protocol-{i:04}").into_bytes())
        .collect();
    crypto
}

/// h2 abuse from an app, as raw frames (RFC 9113): rapid reset (CVE-2023-44487) and
/// CONTINUATION floods, for the flood tests in and out of process.
pub mod h2_abuse {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An h2 frame (RFC 9113 §4.1).
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const CANCEL: u32 = 0x8;
    /// GOAWAY's code for a peer that misbehaves (RFC 9113 §7).
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// The client preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }

    /// HPACK for `GET http://reviews/` (RFC 7541 static table: :method GET, :scheme http,
    /// :path /, then :authority as a literal without indexing).
    pub fn get_block() -> Vec<u8> {
        let mut out = vec![0x82, 0x86, 0x84, 0x01, 7];
        out.extend_from_slice(b"reviews");
        out
    }

    /// Rapid reset: the preface, then `streams` GETs each cancelled right after its HEADERS.
    pub fn rapid_reset(streams: u32) -> Vec<u8> {
        let mut bytes = preface();
        for i in 0..streams {
            let id = 2 * i + 1;
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block()));
            bytes.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        bytes
    }

    /// A CONTINUATION flood: the preface, a HEADERS frame without END_HEADERS, then `frames`
    /// CONTINUATION frames each holding the literal field `a: b`, the block never ended.
    pub fn continuation_flood(frames: usize) -> Vec<u8> {
        let mut bytes = preface();
        bytes.extend(frame(HEADERS, 0, 1, &get_block()));
        let piece = [0x00, 1, b'a', 1, b'b'];
        for _ in 0..frames {
            bytes.extend(frame(CONTINUATION, 0, 1, &piece));
        }
        bytes
    }

    /// Writes `bytes` while reading frames from the sidecar; the GOAWAY error code the sidecar
    /// sent, if any, once it closed the connection (or the writes failed). Panics if the
    /// connection is still open after 15 s.
    pub async fn flood_h2(addr: SocketAddr, bytes: Vec<u8>) -> Option<u32> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = tcp.into_split();
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
            // Hold the connection open: the sidecar is the one to end it.
            std::future::pending::<()>().await;
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let read_all = async {
            while let Ok(n @ 1..) = rd.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(15), read_all)
            .await
            .expect("the flooding connection was never closed");
        writer.abort();
        goaway_code(&got)
    }

    /// The error code of the first GOAWAY among `frames`.
    pub fn goaway_code(mut frames: &[u8]) -> Option<u32> {
        while frames.len() >= 9 {
            let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
            if frames.len() < 9 + len {
                return None;
            }
            if frames[3] == GOAWAY && len >= 8 {
                let p = &frames[9..];
                return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            frames = &frames[9 + len..];
        }
        None
    }
}

/// An address where nothing listens, kept so for as long as the returned socket lives: a TCP
/// socket bound to a port of a fresh loopback address ([`loopback_ip`]) that never listens.
/// A connection to it is refused at once, and no other socket can take the port meanwhile (a
/// port picked by binding and dropping a listener could be handed to another test's listener).
pub fn refused_addr() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(loopback_ip(), 0).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}
