//! L7 outbound: the app's HTTP/1.1 or h2 requests are routed one by one and sent as HTTP/3
//! requests on the pooled QUIC connection to the chosen endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{Endpoint, Fault, HeaderMods, Mirror, Retries, RouteRule};
use halyard_transport::{PooledRequest, TunnelError};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::{buffer_small, to_bytes, BodySender, Buffered, ChannelBody};
use super::headers::{check_framing, strip_hop_by_hop, strip_identity_claims};
use super::normalize::{normalize, NormalPath, OUTBOUND_PARAMETERS};
use crate::decide::capture::Destination;
use crate::decide::outlier::Failure;
use crate::decide::pick::Scope;
use crate::decide::retry::{self, answer_charge, AttemptError, Failed, RetryPolicy, Step};
use crate::decide::route::{idempotent, select, HttpView, RequestView};
use crate::state::{Picked, Shared};
use crate::telemetry::flow::End;
use crate::telemetry::metrics::Direction;
use crate::telemetry::trace::TraceContext;
use crate::telemetry::{content_length, trace_context};

/// Largest request body kept in memory so it can be sent again (retries, mirroring).
const REPLAY_LIMIT: u64 = 1024 * 1024;

/// How long a mirrored request may take when its rule sets no timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one app connection (HTTP/1.1, or h2 with prior knowledge) until it closes. When the
/// drain starts, the request in flight finishes and the connection closes (an idle keep-alive
/// connection at once, h2 with GOAWAY); at the drain deadline it is dropped.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, dest: Destination) {
    let drain = shared.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (shared, dest) = (shared.clone(), dest.clone());
        async move { Ok::<_, Infallible>(handle(shared, dest, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(64 * 1024);
    builder.http2().max_header_list_size(64 * 1024);
    let io = TokioIo::new(super::guard::FramingGuard::new(tcp));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = drain.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            drain.until_hard_stop(conn.as_mut()).await
        }
    };
    if let Some(Err(e)) = ended {
        tracing::debug!(error = %e, "app connection ended");
    }
}

/// A response made by this sidecar.
pub(crate) fn local(status: StatusCode, why: &str) -> Response<ChannelBody> {
    let mut resp = Response::new(ChannelBody::full(format!("{why}\n")));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
    resp
}

/// What one request needs across attempts.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    dest: &'a Destination,
    parts: Parts,
    target: String,
    rule: Option<(usize, &'a RouteRule)>,
}

/// The response for the app, and the endpoint that gave it (none when no endpoint did).
type Answer = (Response<ChannelBody>, Option<Arc<Endpoint>>);

async fn handle(
    shared: Arc<Shared>,
    dest: Destination,
    req: Request<Incoming>,
) -> Response<ChannelBody> {
    let edge = (shared.service.as_str(), dest.service.as_str());
    let mut rec = shared.request_record(Direction::Outbound, edge, &req);
    let snap = shared.current();
    let (resp, served) = match prepare(&shared, req) {
        Err(resp) => (resp, None),
        Ok((parts, body, norm)) => {
            rec.set_trace(trace_context(&parts.headers));
            let route = snap.route(&dest.service);
            let http = HttpView {
                path: &norm.path,
                method: parts.method.as_str(),
                headers: &parts.headers,
            };
            let view = RequestView::request(&shared.service, http);
            let rule = route.and_then(|r| select(r, view));
            rec.set_route(rule.map(|(i, _)| i));
            let call = Call {
                shared: &shared,
                dest: &dest,
                parts,
                target: norm.target(),
                rule,
            };
            call.run(body).await
        }
    };
    if let Some(endpoint) = &served {
        rec.picked(endpoint);
    }
    rec.finish(End::Response {
        status: resp.status().as_u16(),
        received: content_length(resp.headers()),
    });
    resp
}

/// Checks framing, normalizes the path, cleans the headers and sets the trace context.
#[allow(clippy::result_large_err)]
fn prepare(
    _shared: &Shared,
    req: Request<Incoming>,
) -> Result<(Parts, Incoming, NormalPath), Response<ChannelBody>> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        // Sent on, it would reach the peer as a tunnel (RFC 9114 §4.4), not as a request, and
        // a 2xx would make hyper hand the app's connection to an upgrade nobody serves.
        return Err(local(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not proxied on an HTTP port; use a tcp port",
        ));
    }
    if let Err(e) = check_framing(&parts.headers) {
        return Err(local(StatusCode::BAD_REQUEST, &format!("refused: {e}")));
    }
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let norm = normalize(raw, OUTBOUND_PARAMETERS)
        .map_err(|e| local(StatusCode::BAD_REQUEST, &format!("refused path: {e}")))?;
    strip_hop_by_hop(&mut parts.headers);
    strip_identity_claims(&mut parts.headers);
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceContext::start);
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        parts.headers.insert("traceparent", v);
    }
    Ok((parts, body, norm))
}

/// The request body as attempts see it.
enum Payload {
    /// Kept in memory: may be sent more than once.
    Replayable(Buffered),
    /// Streamed: one attempt only.
    Stream(Incoming),
    /// Already sent by an attempt that failed.
    Gone,
}

impl Call<'_> {
    async fn run(mut self, body: Incoming) -> Answer {
        let rule = self.rule.map(|(_, r)| r);
        if let Some(mods) = rule.and_then(|r| r.request_headers.as_ref()) {
            apply_mods(&mut self.parts.headers, mods);
        }
        if let Some(resp) = self.fault(rule.and_then(|r| r.fault.as_ref())).await {
            return (resp, None);
        }
        let wants_replay = rule.is_some_and(|r| {
            r.retries.as_ref().is_some_and(|x| x.attempts > 0) || r.mirror.is_some()
        });
        let payload = if wants_replay {
            match buffer_small(body, REPLAY_LIMIT).await {
                Ok(Ok(b)) => Payload::Replayable(b),
                Ok(Err(e)) => {
                    return (
                        local(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
                        None,
                    )
                }
                Err(body) => Payload::Stream(body),
            }
        } else {
            Payload::Stream(body)
        };
        if let (Some(m), Payload::Replayable(b)) = (rule.and_then(|r| r.mirror.as_ref()), &payload)
        {
            self.mirror(m, b.clone());
        }
        let timeout = rule.and_then(|r| r.timeout);
        let attempts = self.attempts(payload);
        match timeout {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => (local(StatusCode::GATEWAY_TIMEOUT, "route timeout"), None),
            },
            None => attempts.await,
        }
    }

    async fn fault(&self, fault: Option<&Fault>) -> Option<Response<ChannelBody>> {
        let fault = fault?;
        if let Some(abort) = &fault.abort {
            if abort.percent.hits(rand::random::<f64>()) {
                let status =
                    StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Some(local(status, "fault injected"));
            }
        }
        if let Some(delay) = &fault.delay {
            if delay.percent.hits(rand::random::<f64>()) {
                tokio::time::sleep(delay.duration).await;
            }
        }
        None
    }

    fn subset(&self) -> Scope {
        match self.rule {
            Some((i, r)) => self.shared.backend(&self.dest.service, i, r),
            None => Default::default(),
        }
    }

    async fn attempts(&self, mut payload: Payload) -> Answer {
        let retries = self.rule.and_then(|(_, r)| r.retries.as_ref());
        let policy = RetryPolicy {
            max_retries: retries.map_or(0, |r| r.attempts),
            on: retries.map_or(&[], |r| r.on.as_slice()),
            replayable: self.method_retryable(retries) && matches!(payload, Payload::Replayable(_)),
            revisit: true,
        };
        let subset = self.subset();
        let snap = self.shared.current();
        let service = &self.dest.service;
        let mut tried: Vec<String> = Vec::new();
        self.shared.budget_request(service);
        for retries_done in 0.. {
            let Ok(picked) = self
                .shared
                .pick_in(&snap, service, &subset, &tried, policy.revisit)
            else {
                let resp = local(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
                return (resp, None);
            };
            tried.push(picked.endpoint.id.clone());
            let served = Some(picked.endpoint.clone());
            let attempt = self.once(&picked, &mut payload, retries).await;
            let outcome = match &attempt {
                Ok((resp, _)) if resp.status().is_informational() => {
                    // HTTP/3 has no upgrade (RFC 9114 §4.5) and a 1xx is never final: handing it
                    // to hyper would switch the app's connection to a protocol nobody speaks.
                    self.shared.outcome(&picked, Some(Failure::Error));
                    let why = "upstream answered with a 1xx status";
                    return (local(StatusCode::BAD_GATEWAY, why), served);
                }
                Ok((resp, _)) => {
                    self.shared.outcome(&picked, answer_charge(resp.status()));
                    retry::Outcome::Answered(resp.status())
                }
                Err(fail) => {
                    if fail.failed.error != AttemptError::Local {
                        self.shared.outcome(&picked, fail.failed.error.charge());
                    }
                    retry::Outcome::Failed(fail.failed)
                }
            };
            match (
                self.shared
                    .next_step(service, &subset, &policy, (retries_done, &tried), outcome),
                attempt,
            ) {
                (Step::Retry, _) => {
                    tracing::debug!(%service, endpoint = %picked.endpoint.id, ?outcome, "retrying request");
                    self.shared.metrics.retry(service);
                }
                (_, Ok((resp, stream))) => return (self.respond(resp, stream), served),
                (_, Err(fail)) => return (local(fail.failed.error.status(), &fail.why), served),
            }
        }
        let resp = local(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
        (resp, None)
    }

    /// Whether the request's method may be sent twice: idempotent (RFC 9110 §9.2.2) or listed
    /// in the rule's `retries.methods`.
    fn method_retryable(&self, retries: Option<&Retries>) -> bool {
        let method = &self.parts.method;
        idempotent(method)
            || retries.is_some_and(|r| r.methods.iter().any(|m| m == method.as_str()))
    }

    /// One attempt: headers, body, then the response head.
    async fn once(
        &self,
        picked: &Picked,
        payload: &mut Payload,
        retries: Option<&Retries>,
    ) -> Result<(Response<()>, PooledRequest), AttemptFailure> {
        let ep = &picked.endpoint;
        let uri = format!(
            "https://{}:{}{}",
            self.dest.service, self.dest.port, self.target
        );
        let mut req = Request::new(());
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = uri
            .parse()
            .map_err(|_| AttemptFailure::local("bad request target"))?;
        *req.headers_mut() = self.parts.headers.clone();
        let work = async {
            let mut stream = self
                .shared
                .pool
                .send_request(ep.address, &ep.identity, req)
                .await
                .map_err(AttemptFailure::tunnel)?;
            send_payload(&mut stream, payload).await?;
            let resp = stream
                .recv_response()
                .await
                .map_err(|e| AttemptFailure::reset(&e.to_string()))?;
            Ok((resp, stream))
        };
        match retries.and_then(|r| r.per_try_timeout) {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or_else(|_| Err(AttemptFailure::timeout(t))),
            None => work.await,
        }
    }

    /// Hands the response to the app; its body is pumped by a task the drain waits for.
    fn respond(&self, resp: Response<()>, stream: PooledRequest) -> Response<ChannelBody> {
        let (mut parts, ()) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The app speaks HTTP/1.1 or h2; the peer's HTTP/3 version must not leak into hyper.
        parts.version = self.parts.version;
        let (tx, body) = ChannelBody::channel();
        let shared = self.shared.clone();
        self.shared.flows.spawn(async move {
            // Ends as soon as the app no longer wants the body, even while the peer is silent.
            let pump = async {
                tokio::select! {
                    _ = pump_response(stream, &tx) => {}
                    _ = tx.closed() => {}
                }
            };
            shared.until_hard_stop(pump).await;
        });
        Response::from_parts(parts, body)
    }

    fn mirror(&self, m: &Mirror, body: Buffered) {
        if !m.percent.hits(rand::random::<f64>()) {
            return;
        }
        let timeout = self
            .rule
            .and_then(|(_, r)| r.timeout)
            .unwrap_or(MIRROR_TIMEOUT);
        let shared = self.shared.clone();
        let (service, port) = (self.dest.service.clone(), self.dest.port);
        let uri = format!("https://{service}:{port}{}", self.target);
        let (method, headers, subset) = (
            self.parts.method.clone(),
            self.parts.headers.clone(),
            Scope::within(m.subset.clone()),
        );
        let send = async move {
            let snap = shared.current();
            let Ok(picked) = shared.pick_in(&snap, &service, &subset, &[], false) else {
                return;
            };
            let mut req = Request::new(());
            *req.method_mut() = method;
            let Ok(uri) = uri.parse() else { return };
            *req.uri_mut() = uri;
            *req.headers_mut() = headers;
            let ep = &picked.endpoint;
            let Ok(mut stream) = shared
                .pool
                .send_request(ep.address, &ep.identity, req)
                .await
            else {
                return;
            };
            let mut payload = Payload::Replayable(body);
            if send_payload(&mut stream, &mut payload).await.is_ok()
                && stream.recv_response().await.is_ok()
            {
                // The mirror's answer is read and thrown away.
                while let Ok(Some(_)) = stream.recv_data().await {}
            }
        };
        // Bounded: a mirror that never answers must not pile up tasks or hold up the drain.
        let shared = self.shared.clone();
        self.shared.flows.spawn(async move {
            let _ = shared
                .until_hard_stop(tokio::time::timeout(timeout, send))
                .await;
        });
    }
}

fn apply_mods(headers: &mut HeaderMap, mods: &HeaderMods) {
    for name in &mods.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &mods.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
}

/// Why an attempt failed, with the text the app gets if it is the last. An L7 request may be
/// repeated when its method allows (`RetryPolicy::replayable`), so every failure counts as
/// before any byte.
struct AttemptFailure {
    failed: Failed,
    why: String,
}

impl AttemptFailure {
    fn of(error: AttemptError, why: String) -> Self {
        AttemptFailure {
            failed: Failed {
                error,
                before_any_byte: true,
            },
            why,
        }
    }

    fn tunnel(e: TunnelError) -> Self {
        Self::of(Failed::of(&e).error, format!("upstream: {e}"))
    }

    fn reset(why: &str) -> Self {
        Self::of(AttemptError::Reset, format!("upstream reset: {why}"))
    }

    fn timeout(after: Duration) -> Self {
        let why = format!("upstream did not answer within {after:?}");
        Self::of(AttemptError::Timeout, why)
    }

    /// The caller's request could not be sent: never the endpoint's doing.
    fn local(why: &str) -> Self {
        Self::of(AttemptError::Local, why.to_owned())
    }
}

/// Sends the request body (and trailers), then finishes the stream.
async fn send_payload(
    stream: &mut PooledRequest,
    payload: &mut Payload,
) -> Result<(), AttemptFailure> {
    let err = |e: halyard_transport::h3::error::StreamError| AttemptFailure::reset(&e.to_string());
    match std::mem::replace(payload, Payload::Gone) {
        Payload::Replayable(b) => {
            if !b.data.is_empty() {
                stream.send_data(b.data.clone()).await.map_err(err)?;
            }
            if let Some(t) = b.trailers.clone() {
                stream.send_trailers(t).await.map_err(err)?;
            }
            *payload = Payload::Replayable(b);
        }
        Payload::Stream(mut body) => {
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| AttemptFailure::local(&format!("request body: {e}")))?;
                match frame.into_data() {
                    Ok(data) => stream.send_data(data).await.map_err(err)?,
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            stream.send_trailers(t).await.map_err(err)?;
                        }
                    }
                }
            }
        }
        Payload::Gone => return Err(AttemptFailure::local("request body already sent")),
    }
    stream.finish().await.map_err(err)
}

/// Moves the response body and trailers from h3 to the app, a few frames at a time.
async fn pump_response(mut stream: PooledRequest, tx: &BodySender) {
    use super::body::BodyError;
    use hyper::body::Frame;
    loop {
        match stream.recv_data().await {
            Ok(Some(buf)) => {
                if tx.send(Ok(Frame::data(to_bytes(buf)))).await.is_err() {
                    return; // the app went away; dropping the stream resets it
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(BodyError(e.to_string()))).await;
                return;
            }
        }
    }
    match stream.recv_trailers().await {
        Ok(Some(t)) => {
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        }
        Ok(None) => {}
        Err(e) => {
            let _ = tx.send(Err(BodyError(e.to_string()))).await;
        }
    }
}
