//! `halyard ca serve`: the mesh CA as a TLS 1.3 server that signs CSRs for enrollment (with a
//! bootstrap token) and renewal (with the current leaf as client certificate). Replicas share
//! token records through the registry ([`halyard_registry::ca_store`]); each replica signs with
//! its own intermediate (or the root, for a one-machine mesh).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use halyard_certs::enroll::{check_csr, grant_ttl, BootstrapToken, CsrError, TokenError};
use halyard_certs::revocation::DenyList;
use halyard_certs::rotation::RenewalPolicy;
use halyard_certs::{CertResolver, MeshCa, SpiffeId, WorkloadIdentity};
use halyard_registry::ca_store::CaStore;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Refusal, SignRequest, Signed, DEFAULT_CA_PORT};
use crate::config::ConfigError;

/// Largest request body read, bytes: a CSR is well under 2 KiB.
const MAX_BODY: usize = 64 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a whole request head by then is dropped (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, requests in progress get this long to finish; idle connections close at once.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Attempts at spending a token when other replicas spend it at the same time.
const SPEND_ATTEMPTS: usize = 5;

/// `halyard ca serve --config FILE` (TOML). Relative paths are anchored at the file's folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaServerConfig {
    /// TCP address to listen on; default `0.0.0.0:15012`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Folder holding `ca.crt` (signing certificate, then its parents) and `ca.key` (0600).
    pub dir: PathBuf,
    /// The registry holding the token records: `etcd://...` or `file:///...`.
    pub registry: String,
    /// Mesh name.
    #[serde(default = "default_mesh")]
    pub mesh: String,
    /// Lifetime of a leaf when the request names none; default 24 h.
    #[serde(default = "default_leaf_ttl", with = "humantime_serde")]
    pub leaf_ttl: Duration,
    /// Longest lifetime granted; a longer request is refused. Default 24 h.
    #[serde(default = "default_leaf_ttl", with = "humantime_serde")]
    pub max_leaf_ttl: Duration,
    /// How long to wait for the registry per request.
    #[serde(default = "default_registry_timeout", with = "humantime_serde")]
    pub registry_timeout: Duration,
    /// A file holding `user:password` of the etcd user the CA acts as (etcd RBAC: read and
    /// write on `/halyard-ca/<mesh>/`, read on `/halyard/<mesh>/`); none connects without
    /// authentication. Read at start.
    #[serde(default)]
    pub registry_credentials: Option<PathBuf>,
    /// TLS towards an `etcds://` registry, as in the sidecar's config.
    #[serde(default)]
    pub registry_tls: Option<crate::config::RegistryTlsConfig>,
    /// Plain-HTTP admin listener (`/metrics`, `/healthz`, `/readyz`); none when absent. The
    /// deploy examples use `0.0.0.0:15014`.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_CA_PORT))
}
fn default_mesh() -> String {
    "default".into()
}
fn default_leaf_ttl() -> Duration {
    halyard_certs::ca::DEFAULT_LEAF_TTL
}
fn default_registry_timeout() -> Duration {
    Duration::from_secs(3)
}

impl CaServerConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&crate::config::read_file(path)?, path)
    }

    /// Checks `text` as the file at `path` (relative paths are anchored at its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let field = |field: String, message: String| ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        };
        let mut config: CaServerConfig = crate::config::parse_toml(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        crate::config::anchor(
            base,
            [Some(&mut config.dir), config.registry_credentials.as_mut()],
        );
        if let Some(tls) = config.registry_tls.as_mut() {
            tls.anchor(base);
        }
        crate::config::check_registry_tls(&config.registry, config.registry_tls.as_ref())
            .map_err(|m| field("registry_tls".into(), m))?;
        if config.leaf_ttl.is_zero() || config.leaf_ttl > config.max_leaf_ttl {
            return Err(field(
                "leaf_ttl".into(),
                "must be positive and at most max_leaf_ttl".into(),
            ));
        }
        Ok(config)
    }
}

/// The CA server's Prometheus metrics.
struct CaMetrics {
    registry: prometheus::Registry,
    /// `halyard_ca_requests_total{endpoint, code}`.
    requests: prometheus::IntCounterVec,
    /// `halyard_ca_request_duration_seconds{endpoint}`.
    duration: prometheus::HistogramVec,
    /// `halyard_ca_signing_cert_expiry_seconds`.
    signing_expiry: prometheus::Gauge,
}

impl CaMetrics {
    fn new() -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "halyard_ca_requests_total",
                "CA requests answered, by endpoint (enroll, renew, bundle, other) and status code",
            ),
            &["endpoint", "code"],
        )?;
        let duration = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "halyard_ca_request_duration_seconds",
                "Time from request head to answer, seconds (registry round trips included)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["endpoint"],
        )?;
        let signing_expiry = prometheus::Gauge::new(
            "halyard_ca_signing_cert_expiry_seconds",
            "Seconds until the certificate this CA signs with expires",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(signing_expiry.clone()))?;
        Ok(CaMetrics {
            registry,
            requests,
            duration,
            signing_expiry,
        })
    }

    fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The state every request reads.
struct Ca {
    metrics: CaMetrics,
    ca: MeshCa,
    store: CaStore,
    config: CaServerConfig,
    /// The registry's deny list: refused at the TLS handshake and for enrollment.
    deny: Arc<DenyList>,
    /// The bundle handed to clients (PEM) and the acceptor that verifies renewals against it;
    /// replaced together when the registry's bundle changes.
    trust: RwLock<(String, tokio_rustls::TlsAcceptor)>,
    /// The server's own leaf.
    resolver: Arc<CertResolver>,
}

impl Ca {
    fn bundle_pem(&self) -> String {
        self.trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.trust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn check_not_revoked(&self, id: &SpiffeId) -> Result<(), Refused> {
        if self.deny.refuses_id(id) {
            return Err(Refused(
                StatusCode::FORBIDDEN,
                format!("{id} is revoked (registry key revocations); nothing is signed for it"),
            ));
        }
        Ok(())
    }
}

/// A refusal: status and one line for the client.
struct Refused(StatusCode, String);

impl From<CsrError> for Refused {
    fn from(e: CsrError) -> Self {
        let status = match e {
            CsrError::WrongId { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        Refused(status, e.to_string())
    }
}

impl From<TokenError> for Refused {
    fn from(e: TokenError) -> Self {
        Refused(StatusCode::UNAUTHORIZED, e.to_string())
    }
}

impl From<halyard_registry::RegistryError> for Refused {
    fn from(e: halyard_registry::RegistryError) -> Self {
        tracing::warn!(error = %e, "registry request failed");
        Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the CA cannot reach its registry ({e}); retry later"),
        )
    }
}

/// Addresses of a started CA server, for tests.
#[derive(Debug, Clone)]
pub struct StartedCa {
    /// The bound address.
    pub addr: SocketAddr,
    /// The bound admin address, when `admin` is set.
    pub admin: Option<SocketAddr>,
}

/// Loads the CA, opens the registry, binds `config.listen` and serves until `stop`.
pub async fn serve(
    config: CaServerConfig,
    stop: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<StartedCa>>,
) -> anyhow::Result<()> {
    let ca = MeshCa::load(&config.dir).with_context(|| format!("dir = {:?}", config.dir))?;
    let access = crate::config::registry_access(
        config.registry_credentials.as_deref(),
        config.registry_tls.as_ref(),
    )?;
    let store = CaStore::connect(
        &config.registry,
        &config.mesh,
        config.registry_timeout,
        &access,
    )
    .await
    .with_context(|| format!("registry = {:?}", config.registry))?;
    // The deny list and the trust bundle come from the mesh's registry, watched like a sidecar
    // watches it.
    let mut opts = halyard_registry::Options::new(&config.mesh);
    opts.access = access;
    let registry = halyard_registry::open_with(&config.registry, opts)
        .await
        .with_context(|| format!("registry = {:?}", config.registry))?;
    let deny = Arc::new(DenyList::default());
    // In force before the first request; the `follow` tasks keep them current.
    deny.set(super::revoke::revoked(&registry.snapshot()));
    let (bundle_pem, bundle) = match super::trust::of(&registry.snapshot(), &deny) {
        Some(b) => b,
        None => {
            let own = ca.bundle()?.with_deny_list(deny.clone());
            (own.to_pem(), own)
        }
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen = {}: cannot listen", config.listen))?;
    let addr = listener.local_addr()?;
    let server_id = super::ca_id(ca.trust_domain())?;
    let resolver = CertResolver::new(server_identity(&ca, &server_id, config.max_leaf_ttl)?);
    let acceptor = acceptor(&resolver, &ca, Arc::new(bundle))?;
    let state = Arc::new(Ca {
        metrics: CaMetrics::new()?,
        trust: RwLock::new((bundle_pem, acceptor)),
        resolver,
        ca,
        store,
        config,
        deny: deny.clone(),
    });
    let tasks = tokio_util::task::TaskTracker::new();
    let admin_addr = spawn_admin(&tasks, &state, &stop).await?;
    tracing::info!(%addr, id = %server_id, "CA serving");
    if let Some(tx) = started {
        let _ = tx.send(StartedCa {
            addr,
            admin: admin_addr,
        });
    }
    tasks.spawn(renew_own_leaf(state.clone(), stop.clone()));
    spawn_follow(&tasks, &stop, &state, registry.watch(), deny);
    while let Some((tcp, peer)) = crate::net::accept(&listener, &stop, "ca").await {
        let (state, stop) = (state.clone(), stop.clone());
        tasks.spawn(connection(state, tcp, peer, stop));
    }
    tracing::info!("CA draining: no new connections, requests in progress finish");
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Binds `admin` when configured and serves it on `tasks`; the bound address.
async fn spawn_admin(
    tasks: &tokio_util::task::TaskTracker,
    state: &Arc<Ca>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = state.config.admin else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin = {addr}: cannot listen"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "CA admin listening");
    tasks.spawn(crate::net::serve_http1_within(
        listener,
        stop.clone(),
        "ca admin",
        (Duration::from_secs(1), HEADER_READ_TIMEOUT),
        state.clone(),
        |state, req| async move { admin(&state, &req) },
    ));
    Ok(Some(bound))
}

/// `/metrics`, `/healthz`, `/readyz` (ready while the signing certificate is valid).
fn admin(state: &Ca, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let left = (state.ca.not_after() - time::OffsetDateTime::now_utc()).as_seconds_f64();
    state.metrics.signing_expiry.set(left);
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, state.metrics.render()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") if left > 0.0 => reply(StatusCode::OK, "ready\n".into()),
        (&Method::GET, "/readyz") => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the signing certificate has expired\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// A TLS acceptor presenting the server's leaf and verifying renewals against `bundle`.
fn acceptor(
    resolver: &Arc<CertResolver>,
    ca: &MeshCa,
    bundle: Arc<halyard_certs::TrustBundle>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let tls =
        halyard_certs::tls::ca_server_config(resolver.clone(), ca.trust_domain().clone(), bundle)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Follows the registry's deny list and trust bundle until `stop`.
fn spawn_follow(
    tasks: &tokio_util::task::TaskTracker,
    stop: &CancellationToken,
    state: &Arc<Ca>,
    snapshots: tokio::sync::watch::Receiver<Arc<halyard_registry::Snapshot>>,
    deny: Arc<DenyList>,
) {
    let revocations = super::revoke::follow(snapshots.clone(), deny.clone(), |_| {});
    let st = state.clone();
    let trust = super::trust::follow(snapshots, deny, move |pem, bundle| {
        match acceptor(&st.resolver, &st.ca, bundle) {
            Ok(a) => *st.trust.write().unwrap_or_else(|p| p.into_inner()) = (pem.to_owned(), a),
            Err(e) => tracing::warn!(error = %e, "trust bundle from the registry not used"),
        }
    });
    let stop = stop.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = async { tokio::join!(revocations, trust) } => {}
        }
    });
}

/// The CA server's own leaf, made and signed here.
fn server_identity(ca: &MeshCa, id: &SpiffeId, ttl: Duration) -> anyhow::Result<WorkloadIdentity> {
    // Never past the signing certificate's own expiry (an intermediate may be short-lived).
    let left = (ca.not_after() - time::OffsetDateTime::now_utc()).unsigned_abs();
    let ttl = ttl.min(
        left.saturating_sub(Duration::from_secs(60))
            .max(Duration::from_secs(1)),
    );
    let leaf = ca.issue(id, ttl)?;
    Ok(WorkloadIdentity::from_pem(&leaf.cert_pem, &leaf.key_pem)?)
}

/// Renews the server's own leaf at half-life.
async fn renew_own_leaf(state: Arc<Ca>, stop: CancellationToken) {
    let resolver = state.resolver.clone();
    let policy = RenewalPolicy::default();
    loop {
        let cur = resolver.current();
        let wait = policy.wait(
            SystemTime::now(),
            cur.not_before(),
            cur.not_after(),
            rand::random(),
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
        }
        match server_identity(&state.ca, cur.id(), state.config.max_leaf_ttl)
            .and_then(|i| Ok(resolver.swap(i)?))
        {
            Ok(()) => tracing::info!("CA server certificate renewed"),
            Err(e) => tracing::warn!(error = %e, "CA server certificate not renewed"),
        }
    }
}

/// One client connection: TLS, then HTTP/1.1 until the client is done. On `stop` an idle
/// connection closes at once and a request in progress gets [`DRAIN_GRACE`] to finish.
async fn connection(
    state: Arc<Ca>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let acceptor = state.acceptor();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        _ = stop.cancelled() => return,
        tls = handshake => match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "CA client handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    // The verifier accepted the chain when one was presented: the leaf's id is the credential.
    let client_id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| halyard_certs::peer_id(Some(c)).ok());
    let svc = hyper::service::service_fn(move |req| {
        let (state, client_id) = (state.clone(), client_id.clone());
        async move { Ok::<_, Infallible>(handle(&state, client_id.as_ref(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(DRAIN_GRACE, conn).await;
}

async fn handle(
    state: &Ca,
    client_id: Option<&SpiffeId>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/enroll") => "enroll",
        (&Method::POST, "/v1/renew") => "renew",
        (&Method::GET, "/v1/bundle") => "bundle",
        _ => "other",
    };
    let answer = answer(state, client_id, req).await;
    let m = &state.metrics;
    m.requests
        .with_label_values(&[endpoint, answer.status().as_str()])
        .inc();
    m.duration
        .with_label_values(&[endpoint])
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn answer(
    state: &Ca,
    client_id: Option<&SpiffeId>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/enroll") => enroll(state, req).await,
        (&Method::POST, "/v1/renew") => renew(state, client_id, req).await,
        (&Method::GET, "/v1/bundle") => return reply(StatusCode::OK, state.bundle_pem()),
        _ => Err(Refused(
            StatusCode::NOT_FOUND,
            "not found: POST /v1/enroll, POST /v1/renew, GET /v1/bundle".into(),
        )),
    };
    match result {
        Ok(signed) => json(StatusCode::OK, &signed),
        Err(Refused(status, error)) => json(status, &Refusal { error }),
    }
}

async fn read_request(req: Request<Incoming>) -> Result<SignRequest, Refused> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Refused(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        Refused(
            StatusCode::BAD_REQUEST,
            format!("request body is not {{\"csr\": PEM, \"ttlSeconds\": N}}: {e}"),
        )
    })
}

fn bearer(req: &Request<Incoming>) -> Result<BootstrapToken, Refused> {
    let unauthorized = |m: &str| Refused(StatusCode::UNAUTHORIZED, m.to_owned());
    let value = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("enrollment needs 'Authorization: Bearer <token>'"))?;
    BootstrapToken::parse(value).map_err(|e| unauthorized(&e.to_string()))
}

/// Enrollment: the token admits the request and binds the id; the token's use is spent only
/// once the leaf is signed, so a refused CSR costs no use.
async fn enroll(state: &Ca, req: Request<Incoming>) -> Result<Signed, Refused> {
    let token = bearer(&req)?;
    let body = read_request(req).await?;
    let hash = token.hash();
    for _ in 0..SPEND_ATTEMPTS {
        let stored = state
            .store
            .get_token(&hash)
            .await?
            .ok_or(TokenError::Unknown)?;
        stored.record.admit(SystemTime::now())?;
        state.check_not_revoked(&stored.record.id)?;
        let signed = sign(state, &body, &stored.record.id)?;
        if state.store.spend_token(&hash, &stored).await? {
            tracing::info!(id = %stored.record.id, "enrolled");
            return Ok(signed);
        }
    }
    Err(Refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "the token is being used by other requests at the same time; retry".into(),
    ))
}

/// Renewal: the client certificate (already verified against the bundle) is the credential.
async fn renew(
    state: &Ca,
    client_id: Option<&SpiffeId>,
    req: Request<Incoming>,
) -> Result<Signed, Refused> {
    let id = client_id.ok_or_else(|| {
        Refused(
            StatusCode::UNAUTHORIZED,
            "renewal needs the current leaf as TLS client certificate".into(),
        )
    })?;
    state.check_not_revoked(id)?;
    let body = read_request(req).await?;
    let signed = sign(state, &body, id)?;
    tracing::debug!(%id, "renewed");
    Ok(signed)
}

fn sign(state: &Ca, req: &SignRequest, allowed: &SpiffeId) -> Result<Signed, Refused> {
    let csr = check_csr(&req.csr, allowed)?;
    let ttl = grant_ttl(
        req.ttl_seconds.map(Duration::from_secs),
        state.config.leaf_ttl,
        state.config.max_leaf_ttl,
    )?;
    let chain = state
        .ca
        .sign_checked(&csr, ttl)
        .map_err(|e| Refused(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Signed {
        chain,
        bundle: state.bundle_pem(),
    })
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    let mut resp = reply(status, body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
