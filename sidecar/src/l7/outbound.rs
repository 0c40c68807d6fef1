//! L7 outbound: the app's HTTP/1.1 or h2 requests are routed one by one and sent as HTTP/3
//! requests on the pooled QUIC connection to the chosen endpoint.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halyard_registry::model::{Endpoint, Fault, HeaderMods, Mirror, Retries, RouteRule};
use halyard_transport::{upgraded_tunnel, PooledRecv, PooledRequest, TunnelError};
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::body::{buffer_small, to_bytes, BodySender, Buffered, ChannelBody};
use super::headers::{
    check_framing, strip_hop_by_hop, strip_identity_claims, APP_UNREACHED, RATELIMIT_SCOPE,
};
use super::limits;
use super::normalize::{normalize, NormalPath, OUTBOUND_PARAMETERS};
use super::upgrade;
use super::upload::{Payload, Start, Upload, EXPECT_TIMEOUT};
use crate::decide::breaker::Threshold;
use crate::decide::capture::Destination;
use crate::decide::pick::Scope;
use crate::decide::retry::{self, answer_charge, AttemptError, Failed, Step};
use crate::decide::route::{idempotent, select, HttpView, RequestView};
use crate::state::{Picked, Shared};
use crate::telemetry::flow::End;
use crate::telemetry::metrics::Direction;
use crate::telemetry::trace::TraceContext;
use crate::telemetry::{content_length, trace_context};

/// Largest request body kept in memory so it can be sent again (retries, mirroring).
const REPLAY_LIMIT: u64 = 1024 * 1024;

/// Largest body kept when no rule asks for retries, so that a request that reached no app
/// (see `decide::retry::for_request`) can still go to another endpoint: the size of a JSON
/// call, not of an upload.
const UNREACHED_REPLAY_LIMIT: u64 = 64 * 1024;

/// Set on a local reply when a circuit breaker failed the request fast (flag `UO`).
const OVERLOADED: &str = "x-halyard-overloaded";

/// How long a mirrored request may take when its rule sets no timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one app connection (HTTP/1.1, or h2 with prior knowledge) until it closes. When the
/// drain starts, the request in flight finishes and the connection closes (an idle keep-alive
/// connection at once, h2 with GOAWAY); at the drain deadline it is dropped.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, dest: Destination) {
    let max = shared.config.transport.max_field_section_size();
    let drain = shared.clone();
    let head_timeout = shared.config.file.limits.header_read_timeout.get();
    let guard = super::guard::FramingGuard::new(tcp)
        .with_max_head(limits::guard_head(max))
        .with_head_timeout(head_timeout);
    let switched = guard.switch_flag();
    let svc = hyper::service::service_fn(move |req| {
        let (shared, dest, switched) = (shared.clone(), dest.clone(), switched.clone());
        async move { Ok::<_, Infallible>(handle(shared, dest, req, switched).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(limits::h1_buffer(max));
    let mut h2 = builder.http2();
    limits::h2_bounds(&mut h2).max_header_list_size(limits::h2_header_list(max));
    let io = TokioIo::new(guard);
    // Upgrades are served: a WebSocket request switches the connection (see `upgrade`).
    let conn = builder.serve_connection_with_upgrades(io, svc);
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
    /// The app's side of a WebSocket upgrade, once the peer accepts it.
    upgrade: Option<OnUpgrade>,
    /// Tells the connection's framing guard that it switched protocols.
    switched: Arc<AtomicBool>,
    /// An HTTP/1.0 client asked to keep its connection (RFC 9112 §9.3 and Appendix C.2.2).
    keep_alive_10: bool,
}

/// The response for the app, and the endpoint that gave it (none when no endpoint did).
type Answer = (Response<ChannelBody>, Option<Arc<Endpoint>>);

async fn handle(
    shared: Arc<Shared>,
    dest: Destination,
    req: Request<Incoming>,
    switched: Arc<AtomicBool>,
) -> Response<ChannelBody> {
    let edge = (shared.service.as_str(), dest.service.as_str());
    let mut rec = shared.request_record(Direction::Outbound, edge, &req);
    let snap = shared.current();
    let (resp, served) = match prepare(&shared, req) {
        Err(resp) => (resp, None),
        Ok(Prepared {
            parts,
            body,
            norm,
            upgrade,
            keep_alive_10,
        }) => {
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
            // A request in flight holds a place under `maxConcurrentRequests`.
            let Ok(_in_flight) = shared.breaker(&dest.service, Threshold::Requests) else {
                let resp = AttemptFailure::overflow(Threshold::Requests).local_reply();
                rec.set_flag("UO");
                rec.finish(End::Response {
                    status: resp.status().as_u16(),
                    received: None,
                });
                return resp;
            };
            let call = Call {
                shared: &shared,
                dest: &dest,
                parts,
                target: norm.target(),
                rule,
                upgrade,
                switched,
                keep_alive_10,
            };
            call.run(body).await
        }
    };
    if let Some(endpoint) = &served {
        rec.picked(endpoint);
    }
    if resp.headers().contains_key(OVERLOADED) {
        rec.set_flag("UO");
    }
    rec.finish(End::Response {
        status: resp.status().as_u16(),
        received: content_length(resp.headers()),
    });
    resp
}

/// A request ready to route.
struct Prepared {
    parts: Parts,
    body: Incoming,
    /// The request path, normalized (see `normalize`).
    norm: NormalPath,
    /// Set for a WebSocket upgrade request.
    upgrade: Option<OnUpgrade>,
    /// An HTTP/1.0 request with `Connection: keep-alive`.
    keep_alive_10: bool,
}

/// Checks framing, normalizes the path, cleans the headers and sets the trace context.
#[allow(clippy::result_large_err)]
fn prepare(_shared: &Shared, req: Request<Incoming>) -> Result<Prepared, Response<ChannelBody>> {
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
    let upgrade = (parts.version == http::Version::HTTP_11
        && upgrade::wants_websocket(&parts.headers))
    .then(|| parts.extensions.remove::<OnUpgrade>())
    .flatten();
    let keep_alive_10 = parts.version == http::Version::HTTP_10
        && parts
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"));
    strip_hop_by_hop(&mut parts.headers);
    strip_identity_claims(&mut parts.headers);
    if upgrade.is_some() {
        upgrade::mark(&mut parts.headers);
    }
    if body.is_end_stream() {
        // Nothing to wait for: the expectation means nothing (RFC 9110 §10.1.1).
        parts.headers.remove(http::header::EXPECT);
    }
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceContext::start);
    parts.headers.insert("traceparent", trace.header_value());
    Ok(Prepared {
        norm,
        parts,
        body,
        upgrade,
        keep_alive_10,
    })
}

/// Whether the app's client waits for `100 Continue` before it sends the body (RFC 9110
/// §10.1.1; HTTP/1.0 has no such expectation).
fn expects_continue(parts: &Parts) -> bool {
    parts.version >= http::Version::HTTP_11
        && parts
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// One attempt that got its final response head; the body may still be flowing.
struct Exchange {
    head: Response<()>,
    recv: PooledRecv,
    upload: Upload,
}

impl Call<'_> {
    async fn run(mut self, body: Incoming) -> Answer {
        let rule = self.rule.map(|(_, r)| r);
        let upgrade = self.upgrade.take();
        let start = if upgrade.is_some() {
            Start::Upgrade
        } else if expects_continue(&self.parts) {
            Start::OnContinue
        } else {
            Start::Now
        };
        if let Some(mods) = rule.and_then(|r| r.request_headers.as_ref()) {
            apply_mods(&mut self.parts.headers, mods);
        }
        if let Some(resp) = self.fault(rule.and_then(|r| r.fault.as_ref())).await {
            return (resp, None);
        }
        // Reading the body of a request that expects `100 Continue` would make hyper send the
        // 100 itself: such a body is streamed, once allowed.
        let rule_replays = rule.is_some_and(|r| {
            r.retries.as_ref().is_some_and(|x| x.attempts > 0) || r.mirror.is_some()
        });
        let limit = match (start, rule_replays) {
            (Start::Now, true) => REPLAY_LIMIT,
            (Start::Now, false) if self.shared.config.file.failure.retries > 0 => {
                UNREACHED_REPLAY_LIMIT
            }
            _ => 0,
        };
        let payload = if body.is_end_stream() {
            // Nothing to read: any attempt can send it.
            Payload::Replayable(Buffered::default())
        } else if limit > 0 {
            match buffer_small(body, limit).await {
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
        let attempts = self.attempts(payload, start, upgrade);
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

    async fn attempts(
        &self,
        mut payload: Payload,
        start: Start,
        mut upgrade: Option<OnUpgrade>,
    ) -> Answer {
        let retries = self.rule.and_then(|(_, r)| r.retries.as_ref());
        let route = retries.map(|r| (r.attempts, r.on.as_slice()));
        let mesh_retries = self.shared.config.file.failure.retries;
        let method_ok = self.method_retryable(retries);
        let subset = self.subset();
        let snap = self.shared.current();
        // The endpoints that carry it: the service's, or an egress gateway's.
        let service = self.dest.carrier();
        let mut tried: Vec<String> = Vec::new();
        // Held (not read) until the next answer: the place a retry takes under the breaker.
        let mut _retry_slot = None;
        self.shared.budget_request(service);
        for retries_done in 0.. {
            let Ok(picked) = self.shared.pick_in(&snap, service, &subset, &tried, true) else {
                let resp = local(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
                return (resp, None);
            };
            tried.push(picked.endpoint.id.clone());
            let served = Some(picked.endpoint.clone());
            let attempt = self
                .once(&picked, &mut payload, retries, start)
                .await
                .and_then(AttemptFailure::unreached);
            let outcome = match &attempt {
                Ok(x) if share_used_up(&x.head) => {
                    // Not processed, and another endpoint's share of the total may have room:
                    // retried as a rejected request; the 429 stays the answer otherwise.
                    retry::Outcome::Failed(Failed {
                        error: AttemptError::Rejected,
                        before_any_byte: true,
                    })
                }
                Ok(x) => {
                    self.shared.outcome(&picked, answer_charge(x.head.status()));
                    retry::Outcome::Answered(x.head.status())
                }
                Err(fail) => {
                    if fail.failed.error.judges_endpoint() {
                        self.shared.outcome(&picked, fail.failed.error.charge());
                    }
                    retry::Outcome::Failed(fail.failed)
                }
            };
            let policy =
                retry::for_request(route, mesh_retries, method_ok, payload.intact(), &outcome);
            let mut step =
                self.shared
                    .next_step(service, &subset, &policy, (retries_done, &tried), outcome);
            if step == Step::Retry {
                // A retry holds a place under `maxRetriesInFlight` until the next answer; with
                // none free the answer in hand stands.
                match self.shared.breaker(service, Threshold::Retries) {
                    Ok(slot) => _retry_slot = slot,
                    Err(_) => step = Step::Answer,
                }
            }
            match (step, attempt) {
                (Step::Retry, _) => {
                    tracing::debug!(%service, endpoint = %picked.endpoint.id, ?outcome, "retrying request");
                    self.shared.metrics.retry(service);
                }
                (_, Ok(x)) => return (self.respond(x, upgrade.take()), served),
                (_, Err(fail)) => return (fail.local_reply(), served),
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

    /// One attempt: the request head, then the body on its own task (at once, after the
    /// peer's `100 Continue`, or never for an upgrade) while the response head is awaited.
    async fn once(
        &self,
        picked: &Picked,
        payload: &mut Payload,
        retries: Option<&Retries>,
        start: Start,
    ) -> Result<Exchange, AttemptFailure> {
        let ep = &picked.endpoint;
        let uri = format!(
            "https://{}:{}{}",
            self.dest.authority_host(),
            self.dest.port,
            self.target
        );
        let mut req = Request::new(());
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = uri
            .parse()
            .map_err(|_| AttemptFailure::local("bad request target"))?;
        *req.headers_mut() = self.parts.headers.clone();
        let work = async {
            // Waiting for a connection or a stream holds a place under `maxPendingRequests`.
            let pending = self
                .shared
                .breaker(&self.dest.service, Threshold::Pending)
                .map_err(AttemptFailure::overflow)?;
            let stream = self
                .shared
                .pool
                .send_request(ep.address, &ep.identity, req)
                .await
                .map_err(AttemptFailure::tunnel)?;
            drop(pending);
            let (send, mut recv) = stream.split();
            let mut upload = Upload::new(self.shared, send, start);
            if start == Start::Now {
                upload.begin(self.shared, payload);
            }
            let head = final_head(self.shared, &mut recv, &mut upload, payload).await?;
            Ok(Exchange { head, recv, upload })
        };
        match retries.and_then(|r| r.per_try_timeout) {
            Some(t) => tokio::time::timeout(t, work)
                .await
                .unwrap_or_else(|_| Err(AttemptFailure::timeout(t))),
            None => work.await,
        }
    }

    /// Hands the response to the app; its body is pumped by a task the drain waits for, while
    /// the request body goes on. An accepted upgrade switches the app's connection instead.
    fn respond(&self, x: Exchange, upgrade: Option<OnUpgrade>) -> Response<ChannelBody> {
        let Exchange {
            head,
            recv,
            mut upload,
        } = x;
        let (mut parts, ()) = head.into_parts();
        if let Some(on_upgrade) = upgrade {
            if parts.status.is_success() && upgrade::marked(&parts.headers) {
                if let Some(send) = upload.take_unstarted() {
                    let tunnel = upgraded_tunnel(send, recv, parts.status);
                    return self.switch(parts, on_upgrade, tunnel);
                }
            }
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(upgrade::UPGRADE);
        // The app speaks HTTP/1.1 or h2; the peer's HTTP/3 version must not leak into hyper.
        parts.version = self.parts.version;
        // hyper keeps an HTTP/1.0 connection only when the response says keep-alive, and only
        // a response of known length can (HTTP/1.0 has no chunked coding).
        if self.keep_alive_10
            && parts.headers.contains_key(http::header::CONTENT_LENGTH)
            && !self.shared.draining.is_cancelled()
        {
            parts.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("keep-alive"),
            );
        }
        if parts.headers.contains_key("grpc-status") {
            // gRPC Trailers-Only (an immediate error, e.g. a rate limit): the status travels in
            // the head and the stream ends with it — END_STREAM on the HEADERS frame, which
            // gRPC clients require; the peer sends no body.
            return Response::from_parts(parts, ChannelBody::full(bytes::Bytes::new()));
        }
        // The body's first DATA frame usually came in the packet that brought the head: taken
        // now, hyper writes it to the app together with the head (one write and one wake-up of
        // the app instead of two); a response of known length is then complete.
        let mut recv = recv;
        let (tx, body, data_ended) = match first_data(&mut recv) {
            Some(Polled::Data(bytes)) => {
                let (tx, body) = ChannelBody::channel_after(bytes);
                (tx, body, None)
            }
            Some(Polled::End) => {
                let (tx, body) = ChannelBody::channel();
                (tx, body, Some(Ok(())))
            }
            Some(Polled::Failed(why)) => {
                let (tx, body) = ChannelBody::channel();
                (tx, body, Some(Err(why)))
            }
            None => {
                let (tx, body) = ChannelBody::channel();
                (tx, body, None)
            }
        };
        let shared = self.shared.clone();
        let request_body = upload.keep_going();
        self.shared.flows.spawn(async move {
            // Ends as soon as the app no longer wants the body, even while the peer is silent;
            // then what is left of the request body stops too.
            let pump = async {
                tokio::select! {
                    // The pump first: when the app's body is already complete (a known length
                    // met by the first chunk), it still reads the stream's end instead of
                    // dropping it unread (a needless STOP_SENDING to the peer).
                    biased;
                    _ = pump_response(recv, &tx, data_ended) => {}
                    _ = tx.closed() => {}
                }
            };
            shared.until_hard_stop(pump).await;
            drop(request_body);
        });
        Response::from_parts(parts, body)
    }

    /// Answers the app 101 and splices its upgraded connection to the tunnel (see `upgrade`).
    fn switch(
        &self,
        mut parts: http::response::Parts,
        on_upgrade: OnUpgrade,
        mut tunnel: halyard_transport::Tunnel,
    ) -> Response<ChannelBody> {
        strip_hop_by_hop(&mut parts.headers);
        upgrade::unmark(&mut parts.headers);
        parts.status = StatusCode::SWITCHING_PROTOCOLS;
        parts.version = http::Version::HTTP_11;
        self.switched.store(true, Ordering::Release);
        let shared = self.shared.clone();
        self.shared.flows.spawn(async move {
            let splice = async {
                let upgraded = match on_upgrade.await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(error = %e, "app connection did not switch protocols");
                        tunnel.abort();
                        return;
                    }
                };
                let (from, to) = tokio::io::split(TokioIo::new(upgraded));
                if let Err(e) = tunnel.splice(from, to).await {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            };
            shared.until_hard_stop(splice).await;
        });
        Response::from_parts(parts, ChannelBody::full(bytes::Bytes::new()))
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
            if send_kept(&mut stream, body).await.is_ok() && stream.recv_response().await.is_ok() {
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

    /// The response head could not be read.
    fn response(e: halyard_transport::h3::error::StreamError) -> Self {
        use halyard_transport::h3::error::{Code, StreamError};
        let rejected = match &e {
            StreamError::RemoteTerminate { code, .. } => *code == Code::H3_REQUEST_REJECTED,
            StreamError::ConnectionError { 0: c, .. } => c.is_h3_no_error(),
            _ => false,
        };
        if rejected {
            let why = format!("upstream did not process the request (draining): {e}");
            return Self::of(AttemptError::Rejected, why);
        }
        if let TunnelError::ConnectionLost {
            peer_restarted: true,
            ..
        } = TunnelError::from_h3(&e, false)
        {
            let why = format!("upstream restarted (stateless reset): {e}");
            return Self::of(AttemptError::PeerRestarted, why);
        }
        Self::reset(&e.to_string())
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

    /// A circuit-breaker threshold of this sidecar is full.
    fn overflow(threshold: Threshold) -> Self {
        let why = format!("circuit breaker open: {} reached", threshold.as_str());
        Self::of(AttemptError::Overflow, why)
    }

    /// The local reply when this failure is the last: its status and why; an overflow says so
    /// in `x-halyard-overloaded` (as Envoy's `x-envoy-overloaded`).
    fn local_reply(&self) -> Response<ChannelBody> {
        let mut resp = local(self.failed.error.status(), &self.why);
        if self.failed.error == AttemptError::Overflow {
            resp.headers_mut()
                .insert(OVERLOADED, HeaderValue::from_static("true"));
        }
        resp
    }

    /// An answer from the peer sidecar that it could not connect to its app is a failure of
    /// the attempt: the request reached no app.
    fn unreached(x: Exchange) -> Result<Exchange, AttemptFailure> {
        if !x.head.headers().contains_key(APP_UNREACHED) {
            return Ok(x);
        }
        let why = "upstream app unreachable: its sidecar could not connect to it".to_owned();
        Err(Self::of(AttemptError::AppUnreached, why))
    }
}

/// Sends a kept request body (and trailers), then finishes the stream.
async fn send_kept(
    stream: &mut PooledRequest,
    body: Buffered,
) -> Result<(), halyard_transport::h3::error::StreamError> {
    if !body.data.is_empty() {
        stream.send_data(body.data).await?;
    }
    if let Some(t) = body.trailers {
        stream.send_trailers(t).await?;
    }
    stream.finish().await
}

/// Whether the peer refused the request because its share of a service-wide rate limit is used
/// up (`decide::ratelimit`: a 429 of the sidecar's own, scope `total`).
fn share_used_up(head: &Response<()>) -> bool {
    head.status() == StatusCode::TOO_MANY_REQUESTS
        && head
            .headers()
            .get(RATELIMIT_SCOPE)
            .is_some_and(|v| v.as_bytes() == b"total")
}

/// Waits for the final response head of an attempt, starting the body when it may go:
/// informational heads (RFC 9110 §15.2) are consumed here, `100 Continue` releases a body that
/// waits for it, and so does [`EXPECT_TIMEOUT`] without an answer.
async fn final_head(
    shared: &Arc<Shared>,
    recv: &mut PooledRecv,
    upload: &mut Upload,
    payload: &mut Payload,
) -> Result<Response<()>, AttemptFailure> {
    let expect = tokio::time::sleep(EXPECT_TIMEOUT);
    tokio::pin!(expect);
    let mut waiting = upload.start() == Start::OnContinue;
    loop {
        let head = tokio::select! {
            head = recv.recv_response() => head.map_err(AttemptFailure::response)?,
            why = upload.app_failure() => return Err(AttemptFailure::local(&why)),
            () = &mut expect, if waiting => {
                waiting = false;
                upload.begin(shared, payload);
                continue;
            }
        };
        if head.status() == StatusCode::CONTINUE && waiting {
            waiting = false;
            upload.begin(shared, payload);
        } else if !head.status().is_informational() {
            return Ok(head);
        }
        // Other 1xx heads (103 Early Hints) have no way to the app through hyper: dropped.
    }
}

/// What a response stream's first poll for DATA gave, when it was ready at once.
enum Polled {
    /// A DATA frame's content (handed to the body before the pump starts).
    Data(bytes::Bytes),
    /// No more DATA: trailers or the end come next.
    End,
    /// The stream failed.
    Failed(String),
}

/// Polls `stream` once for DATA without waiting (the pump's task, spawned next, waits).
fn first_data(stream: &mut PooledRecv) -> Option<Polled> {
    match super::poll_now(|cx| stream.poll_recv_data(cx)) {
        std::task::Poll::Ready(Ok(Some(buf))) => Some(Polled::Data(to_bytes(buf))),
        std::task::Poll::Ready(Ok(None)) => Some(Polled::End),
        std::task::Poll::Ready(Err(e)) => Some(Polled::Failed(e.to_string())),
        std::task::Poll::Pending => None,
    }
}

/// Moves the response body and trailers from h3 to the app, a few frames at a time.
/// `data_ended` is set when [`first_data`] already met the end of the DATA frames: `Ok` at the
/// end (trailers or the stream's end come next), `Err` with why the stream failed.
async fn pump_response(
    mut stream: PooledRecv,
    tx: &BodySender,
    data_ended: Option<Result<(), String>>,
) {
    use super::body::BodyError;
    use hyper::body::Frame;
    let data_done = match data_ended {
        Some(Err(why)) => {
            let _ = tx.send(Err(BodyError(why))).await;
            return;
        }
        Some(Ok(())) => true,
        None => false,
    };
    if !data_done {
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
