//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/config_dump`. It runs on its own
//! listener and never touches the data plane's hot path: it reads the metrics registry and the
//! snapshot in force.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;

/// What still blocks readiness. Each startup step holds a [`ReadyGuard`]; dropping it clears
/// the step, so `/readyz` can say exactly what is missing.
#[derive(Debug, Default)]
pub struct Readiness {
    blockers: Mutex<BTreeSet<&'static str>>,
}

/// Clears its step from [`Readiness`] when dropped.
pub struct ReadyGuard {
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
    pub fn block(self: &Arc<Self>, step: &'static str) -> ReadyGuard {
        self.set().insert(step);
        ReadyGuard {
            readiness: self.clone(),
            step,
        }
    }

    /// The steps still pending.
    pub fn pending(&self) -> Vec<&'static str> {
        self.set().iter().copied().collect()
    }
}

/// What the admin server reads.
pub struct Admin {
    /// Data-plane state (metrics, snapshot, config).
    pub shared: Arc<Shared>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
}

/// Serves admin requests until `stop`.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

impl Admin {
    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET only\n".into(),
                "text/plain",
            );
        }
        match req.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                self.shared.metrics.render(),
                "text/plain; version=0.0.4",
            ),
            "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
            "/readyz" => self.readyz(),
            "/config_dump" => text(StatusCode::OK, self.config_dump(), "application/json"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics /healthz /readyz /config_dump\n".into(),
                "text/plain",
            ),
        }
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let pending = self.readiness.pending();
        if pending.is_empty() {
            text(StatusCode::OK, "ready\n".into(), "text/plain")
        } else {
            let body = format!("not ready: waiting for {}\n", pending.join(", "));
            text(StatusCode::SERVICE_UNAVAILABLE, body, "text/plain")
        }
    }

    fn config_dump(&self) -> String {
        let snap = self.shared.current();
        let dump = serde_json::json!({
            "config": &self.shared.config.file,
            "registry": {
                "revision": snap.revision,
                "services": &snap.services,
                "routes": &snap.routes,
                "policies": &snap.policies,
                "endpoints": &snap.endpoints,
                "meshconfig": &snap.meshconfig,
                "rejected": &snap.rejected,
            },
        });
        serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
