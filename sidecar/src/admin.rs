//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/config_dump`, `/logging`. It runs on
//! its own listener and never touches the data plane's hot path: it reads the metrics registry
//! and the snapshot in force.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::telemetry::logging;
use crate::telemetry::metrics::Metrics;

/// What still blocks readiness. Each startup step holds a [`ReadyGuard`]; dropping it clears
/// the step, so `/readyz` can say exactly what is missing.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    blockers: Mutex<BTreeSet<&'static str>>,
    /// Conditions that do not block readiness but that `/readyz` reports (a failing certificate
    /// renewal while the current leaf is still valid).
    warnings: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

/// Clears its step from [`Readiness`] when dropped.
pub(crate) struct ReadyGuard {
    readiness: Arc<Readiness>,
    step: &'static str,
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness.set().remove(self.step);
    }
}

impl Readiness {
    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        self.blockers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a step that blocks readiness until the guard drops.
    pub(crate) fn block(self: &Arc<Self>, step: &'static str) -> ReadyGuard {
        self.set().insert(step);
        ReadyGuard {
            readiness: self.clone(),
            step,
        }
    }

    /// The steps still pending.
    pub(crate) fn pending(&self) -> Vec<&'static str> {
        self.set().iter().copied().collect()
    }

    /// Reports `text` under `topic` on `/readyz` without blocking readiness; `None` clears it.
    pub(crate) fn warn(&self, topic: &'static str, text: Option<String>) {
        let mut w = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        match text {
            Some(t) => w.insert(topic, t),
            None => w.remove(topic),
        };
    }

    fn warnings(&self) -> String {
        let w = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        w.iter()
            .map(|(k, v)| format!("warning: {k}: {v}\n"))
            .collect()
    }
}

/// What the admin server reads. The server starts before the data plane exists, so `/healthz`
/// and `/readyz` answer during startup; the data-plane state is attached once built.
pub(crate) struct Admin {
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shared: OnceLock<Arc<Shared>>,
}

type Reply = Response<Full<Bytes>>;

/// Largest `/logging` request body read.
const MAX_FILTER: usize = 4096;

/// Serves admin requests until `stop`.
pub(crate) async fn serve(
    admin: Arc<Admin>,
    listener: TcpListener,
    stop: CancellationToken,
    header_timeout: std::time::Duration,
) {
    // Scrapes in progress get a moment; idle keep-alive connections close at once.
    let grace = std::time::Duration::from_secs(1);
    crate::net::serve_http1_within(
        listener,
        stop,
        "admin",
        (grace, header_timeout),
        admin,
        |admin, req| async move { admin.handle(req).await },
    )
    .await;
}

fn text(status: StatusCode, body: String, content_type: &str) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn plain(status: StatusCode, body: impl Into<String>) -> Reply {
    text(status, body.into(), "text/plain")
}

impl Admin {
    /// An admin server reading `metrics` and `readiness`; see [`Admin::attach`].
    pub(crate) fn new(metrics: Metrics, readiness: Arc<Readiness>) -> Self {
        Admin {
            metrics,
            readiness,
            shared: OnceLock::new(),
        }
    }

    /// Attaches the data plane once it exists (`/config_dump` needs it).
    pub(crate) fn attach(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/metrics") => text(
                StatusCode::OK,
                self.metrics.render(),
                "text/plain; version=0.0.4",
            ),
            (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/config_dump") => self.config_dump(),
            (&Method::GET, "/logging") => logging_get(),
            (&Method::POST | &Method::PUT, "/logging") => logging_set(req).await,
            (_, "/metrics" | "/healthz" | "/readyz" | "/config_dump") => {
                plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
            }
            (_, "/logging") => plain(StatusCode::METHOD_NOT_ALLOWED, "GET, POST or PUT\n"),
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found: try /metrics /healthz /readyz /config_dump /logging\n",
            ),
        }
    }

    fn readyz(&self) -> Reply {
        let pending = self.readiness.pending();
        let warnings = self.readiness.warnings();
        if pending.is_empty() {
            plain(StatusCode::OK, format!("ready\n{warnings}"))
        } else {
            let body = format!("not ready: waiting for {}\n{warnings}", pending.join(", "));
            plain(StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }

    fn config_dump(&self) -> Reply {
        let Some(shared) = self.shared.get() else {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: no data plane yet\n",
            );
        };
        let snap = shared.current();
        let quarantined: Vec<_> = snap
            .rejected
            .iter()
            .map(|(key, reason)| serde_json::json!({ "key": key, "reason": reason }))
            .collect();
        let dump = serde_json::json!({
            "config": &shared.config.file,
            "registry": {
                "revision": snap.revision,
                "origin": origin(snap.origin),
                "quarantined": quarantined,
                "services": &snap.services,
                "routes": &snap.routes,
                "policies": &snap.policies,
                "endpoints": &snap.endpoints,
                "meshconfig": &snap.meshconfig,
                "rejected": &snap.rejected,
            },
        });
        let body = serde_json::to_string_pretty(&dump)
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        text(StatusCode::OK, body, "application/json")
    }
}

fn origin(o: halyard_registry::Origin) -> &'static str {
    match o {
        halyard_registry::Origin::Live => "live",
        halyard_registry::Origin::Persisted { .. } => "persisted",
        halyard_registry::Origin::Empty => "empty",
    }
}

fn logging_get() -> Reply {
    match logging::current() {
        Some(f) => plain(StatusCode::OK, format!("{f}\n")),
        None => plain(
            StatusCode::NOT_IMPLEMENTED,
            format!("{}\n", logging::LogError::NotReloadable),
        ),
    }
}

/// Sets the filter from the request body (`info,halyard_sidecar=debug`) or a `?filter=` query.
async fn logging_set(req: Request<Incoming>) -> Reply {
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("filter="))
            .map(|v| {
                v.replace("%2C", ",")
                    .replace("%3D", "=")
                    .replace("%3d", "=")
            })
    });
    let body = http_body_util::Limited::new(req.into_body(), MAX_FILTER);
    let filter = match (query, body.collect().await) {
        (Some(q), _) => q,
        (None, Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        (None, Err(e)) => return plain(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
    };
    match logging::set(&filter) {
        Ok(f) => plain(StatusCode::OK, format!("{f}\n")),
        Err(e @ logging::LogError::Invalid(..)) => plain(StatusCode::BAD_REQUEST, format!("{e}\n")),
        Err(e) => plain(StatusCode::NOT_IMPLEMENTED, format!("{e}\n")),
    }
}
