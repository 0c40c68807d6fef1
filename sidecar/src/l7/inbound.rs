//! L7 inbound: HTTP/3 requests from verified peers are checked against the service's ports and
//! request-level policy, then sent to the local app over HTTP/1.1 or h2 (gRPC), streaming both
//! bodies and the trailers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halyard_registry::model::Protocol;
use halyard_transport::{HttpRequest, ServerTunnel, Target};
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::body::{to_bytes, BodyError, BodySender, ChannelBody};
use super::headers::{
    strip_hop_by_hop, strip_identity_claims, APP_UNREACHED, PEER_IDENTITY, RATELIMIT_SCOPE,
};
use super::limits;
use super::normalize::{normalize, PathError};
use super::{expect, upgrade};
use crate::decide::admit::{Refusal, Stream};
use crate::decide::policy;
use crate::decide::ratelimit::Limited;
use crate::state::{source_label, Shared};
use crate::telemetry::flow::{End, FlowRecord};
use crate::telemetry::metrics::Direction;
use crate::telemetry::trace::TraceContext;

type SendHalf = halyard_transport::h3::server::RequestStream<
    halyard_transport::h3_quinn::SendStream<Bytes>,
    Bytes,
>;
type RecvHalf =
    halyard_transport::h3::server::RequestStream<halyard_transport::h3_quinn::RecvStream, Bytes>;

/// Pooled clients to the local app: HTTP/1.1, and h2 with prior knowledge for gRPC.
pub(crate) struct AppClients {
    h1: AppClient,
    h2: AppClient,
    /// For the connections of `Expect: 100-continue` requests (see `expect`).
    connect_timeout: Duration,
}

type AppClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ChannelBody,
>;

impl AppClients {
    /// Clients that give up connecting to the app after `connect_timeout` and refuse response
    /// heads past what `max_field_section_size` allows (see `l7::limits`).
    pub(crate) fn new(connect_timeout: Duration, max_field_section_size: u64) -> Self {
        AppClients {
            h1: app_client(false, connect_timeout, max_field_section_size),
            h2: app_client(true, connect_timeout, max_field_section_size),
            connect_timeout,
        }
    }
}

fn app_client(h2: bool, connect_timeout: Duration, max_section: u64) -> AppClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .pool_idle_timeout(Duration::from_secs(30))
        .http1_max_buf_size(limits::h1_buffer(max_section))
        .http2_max_header_list_size(limits::h2_header_list(max_section))
        .build(connector)
}

/// Where an admitted request goes.
struct Admitted {
    app: SocketAddr,
    grpc: bool,
    target: String,
}

/// Serves one HTTP/3 request from a peer sidecar.
pub(crate) async fn serve(shared: &Arc<Shared>, apps: &AppClients, req: HttpRequest) {
    let HttpRequest {
        peer,
        request,
        stream,
    } = req;
    let snap = shared.current();
    let services = shared.peer_services(&snap, &peer.id);
    if let Some(es) = external_target(shared, &snap, &request) {
        return egress(shared, &peer.id, &services, &es, request, stream).await;
    }
    let edge = (source_label(&services), shared.service.as_str());
    let mut rec = shared.request_record(Direction::Inbound, edge, &request);
    rec.set_peer(peer.id.as_str());
    rec.set_version(shared.version());
    // From here on every path answers: `Responder` resets a stream left without a response.
    let (send, recv) = stream.split();
    let mut out = Responder::new(send);
    let (status, received) = match admit(shared, &peer.id, &services, &request) {
        Err(refused) => {
            let (status, why) = (refused.status(), refused.to_string());
            tracing::info!(peer = %peer.id, uri = %request.uri(), %status, reason = %why, "request refused");
            // Recorded before the caller can learn of the refusal.
            if let Refused::Admission(Refusal::RateLimited(_)) = &refused {
                rec.set_flag("RL");
            }
            rec.finish(End::Response {
                status: status.as_u16(),
                received: None,
            });
            // `recv` lives until the answer is out: dropping it first would stop the caller's
            // request body, and the caller could fail before it reads the answer.
            match &refused {
                Refused::Admission(Refusal::RateLimited(limited)) => {
                    out.rate_limited(limited, is_grpc(request.headers())).await;
                }
                _ => out.local(status, &why).await,
            }
            drop(recv);
            return;
        }
        Ok(admitted) => {
            rec.set_endpoint(admitted.app);
            let work = forward(
                shared, apps, &peer.id, request, recv, &mut out, admitted, &mut rec,
            );
            match shared.until_hard_stop(work).await {
                Some(answered) => answered,
                // The drain deadline passed: a response under way is reset when `out` drops.
                None => (out.status.unwrap_or(503), None),
            }
        }
    };
    drop(out);
    rec.finish(End::Response { status, received });
}

/// Whether a request is a gRPC call (its content type, gRPC over HTTP/2 protocol).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// On an egress gateway, the ExternalService a request's `:authority` names (another host than
/// this sidecar's service).
fn external_target(
    shared: &Shared,
    snap: &halyard_registry::Snapshot,
    request: &http::Request<()>,
) -> Option<Arc<halyard_registry::model::ExternalService>> {
    if !shared.config.file.egress.gateway {
        return None;
    }
    let target = Target::from_uri(request.uri()).ok()?;
    if target.service() == shared.service {
        return None;
    }
    let ip = target.service().parse().ok();
    snap.external_service(Some(target.service()), ip, target.port())
        .cloned()
}

/// An HTTP request for an ExternalService on an egress gateway: its Policy (key: the
/// ExternalService's name) on the verified caller and the request, then HTTP/1.1 to the
/// outside (TLS originated when the port says so), the answer streamed back.
async fn egress(
    shared: &Arc<Shared>,
    peer: &halyard_certs::SpiffeId,
    services: &[String],
    es: &halyard_registry::model::ExternalService,
    request: http::Request<()>,
    stream: halyard_transport::ServerRequestStream,
) {
    let edge = (source_label(services), es.name.as_str());
    let mut rec = shared.request_record(Direction::Inbound, edge, &request);
    rec.set_peer(peer.as_str());
    let (send, recv) = stream.split();
    let mut out = Responder::new(send);
    let work = ask_outside(
        shared, peer, services, es, request, recv, &mut out, &mut rec,
    );
    let (status, received) = match shared.until_hard_stop(work).await {
        Some(answered) => answered,
        None => (out.status.unwrap_or(503), None),
    };
    drop(out);
    rec.finish(End::Response { status, received });
}

#[allow(clippy::too_many_arguments)]
async fn ask_outside(
    shared: &Arc<Shared>,
    peer: &halyard_certs::SpiffeId,
    services: &[String],
    es: &halyard_registry::model::ExternalService,
    request: http::Request<()>,
    recv: RecvHalf,
    out: &mut Responder,
    rec: &mut FlowRecord,
) -> (u16, Option<u64>) {
    let Ok(target) = Target::from_uri(request.uri()) else {
        return refuse(out, rec, StatusCode::BAD_REQUEST, "bad authority").await;
    };
    let raw = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let norm = match normalize(raw, shared.config.file.inbound.path_parameters) {
        Ok(n) => n,
        Err(e) => {
            let why = format!("refused path: {e}");
            return refuse(out, rec, StatusCode::BAD_REQUEST, &why).await;
        }
    };
    let snap = shared.current();
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let caller = policy::Peer {
        id: peer,
        services: &names,
    };
    let on = policy::Target {
        port: target.port(),
        method: Some(request.method().as_str()),
        path: Some(&norm.path),
        headers: Some(request.headers()),
    };
    let decided = policy::evaluate(
        snap.policy(es.name.as_str()).map(|p| &**p),
        snap.default_policy(),
        caller,
        on,
    );
    if let policy::Decision::Deny(reason) = decided {
        shared
            .metrics
            .denial(source_label(services), es.name.as_str(), reason.as_str());
        let why = format!("denied by policy ({})", reason.as_str());
        return refuse(out, rec, StatusCode::FORBIDDEN, &why).await;
    }
    let host = target.service().to_owned();
    let ip = host.parse().ok();
    let named = ip.is_none().then_some(host.as_str());
    let timeout = shared.config.file.failure.connect_timeout;
    let dialled = crate::outside::dial_out(es, named, ip, target.port(), timeout).await;
    let (io, addr) = match dialled {
        Ok(o) => o.into_parts(),
        Err(e) => {
            let why = e.to_string();
            tracing::info!(external = %es.name, error = %why, "egress request failed");
            return refuse(out, rec, StatusCode::BAD_GATEWAY, &why).await;
        }
    };
    rec.set_endpoint(addr);
    let (mut parts, ()) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_identity_claims(&mut parts.headers);
    // `Host` names the origin dialled (RFC 9110 §7.2): the TLS target port when the mesh
    // originates TLS, the port otherwise, left out when it is the scheme's default.
    let tls_port = es
        .port(target.port())
        .and_then(|p| p.originate_tls.as_ref())
        .map(|t| t.target_port);
    let host_header = match tls_port {
        Some(443) => host.clone(),
        Some(p) => format!("{host}:{p}"),
        None if target.port() == 80 => host.clone(),
        None => format!("{host}:{}", target.port()),
    };
    if let Ok(v) = HeaderValue::from_str(&host_header) {
        parts.headers.insert(http::header::HOST, v);
    }
    let Ok(uri) = norm.target().parse::<http::Uri>() else {
        return refuse(out, rec, StatusCode::BAD_REQUEST, "bad request target").await;
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let (tx, body) = ChannelBody::channel();
    let pumping = shared.clone();
    shared.flows.spawn(async move {
        let pump = async {
            tokio::select! {
                _ = pump_request(recv, None, &tx) => {}
                _ = tx.closed() => {}
            }
        };
        pumping.until_hard_stop(pump).await;
    });
    let handshake = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await;
    let Ok((mut sender, conn)) = handshake else {
        return refuse(
            out,
            rec,
            StatusCode::BAD_GATEWAY,
            "outside connection failed",
        )
        .await;
    };
    shared.flows.spawn(async move {
        let _ = conn.await;
    });
    match sender
        .send_request(http::Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            rec.response_head();
            let received = crate::telemetry::content_length(resp.headers());
            (respond(out, resp).await, received)
        }
        Err(e) => {
            let why = format!("outside reset the request: {e}");
            refuse(out, rec, StatusCode::BAD_GATEWAY, &why).await
        }
    }
}

/// A local reply in place of an answer: recorded first, then sent (whoever reads the metrics
/// once the caller has it finds it counted). Returns the status and no length, as the
/// request's outcome.
async fn refuse(
    out: &mut Responder,
    rec: &mut FlowRecord,
    status: StatusCode,
    why: &str,
) -> (u16, Option<u64>) {
    rec.finish_early(End::Response {
        status: status.as_u16(),
        received: None,
    });
    out.local(status, why).await;
    (status.as_u16(), None)
}

/// Why a peer's request is refused before it reaches the app.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// `:authority` is not `<service>:<port>`.
    #[error("bad authority: {0}")]
    Authority(#[from] halyard_transport::TargetError),
    /// The path cannot be normalized safely (e.g. `%2F`).
    #[error("refused path: {0}")]
    Path(#[from] PathError),
    /// Not a port served here, or the policy denies the caller.
    #[error(transparent)]
    Admission(#[from] Refusal),
}

impl Refused {
    /// The status the caller gets.
    fn status(&self) -> StatusCode {
        match self {
            Refused::Authority(_) | Refused::Path(_) => StatusCode::BAD_REQUEST,
            Refused::Admission(r) => r.status(),
        }
    }
}

fn admit(
    shared: &Shared,
    peer: &halyard_certs::SpiffeId,
    services: &[String],
    req: &http::Request<()>,
) -> Result<Admitted, Refused> {
    let snap = shared.current();
    let target = Target::from_uri(req.uri())?;
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let norm = normalize(raw, shared.config.file.inbound.path_parameters)?;
    let on = policy::Target {
        port: target.port(),
        method: Some(req.method().as_str()),
        path: Some(&norm.path),
        headers: Some(req.headers()),
    };
    let port = shared
        .admit(&snap, &target, Stream::Request, peer, services, on)?
        .port;
    Ok(Admitted {
        app: SocketAddr::new(shared.config.file.inbound.app_host, port.target_port),
        grpc: port.protocol == Protocol::Grpc,
        target: norm.target(),
    })
}

/// The response side of a request stream. The transport leaves answering an `HttpRequest` to
/// the handler, and a stream that ends without a response is a connection error for the h3
/// client: every request on that connection would fail. quinn finishes a dropped send stream,
/// so whatever path `serve` takes (an early return, an error, a panic, the drain deadline), a
/// response not sent in full is reset instead (RFC 9114 §4.1.1: H3_REQUEST_CANCELLED, the
/// request may have been partly processed), and a cut body never looks complete.
struct Responder {
    /// `None` once handed to a tunnel.
    send: Option<SendHalf>,
    /// The status sent, once the head is out.
    status: Option<u16>,
    /// Whether the stream was finished (or found broken): nothing to reset.
    done: bool,
}

impl Responder {
    fn new(send: SendHalf) -> Self {
        Responder {
            send: Some(send),
            status: None,
            done: false,
        }
    }

    /// Sends the final response head; `false` when the stream is gone, or when the head was
    /// over the caller's header-section limit and a 502 went in its place.
    async fn head(&mut self, resp: Response<()>) -> bool {
        let status = resp.status().as_u16();
        let Some(send) = self.send.as_mut() else {
            return false;
        };
        let sent = match send.send_response(resp).await {
            Err(e) if limits::too_big(&e) => {
                self.status = Some(502);
                self.done = limits::bad_gateway(send, &e).await;
                return false;
            }
            sent => sent.is_ok(),
        };
        self.done = !sent;
        if sent {
            self.status = Some(status);
        }
        sent
    }

    /// Sends a head without taking it as the final status (a 1xx); `false` when the stream is
    /// gone.
    async fn interim(&mut self, resp: Response<()>) -> bool {
        let sent = match self.send.as_mut() {
            Some(send) => send.send_response(resp).await.is_ok(),
            None => false,
        };
        self.done = !sent;
        sent
    }

    /// Sends a body frame (data or trailers); `false` when the stream is gone.
    async fn frame(&mut self, frame: Frame<Bytes>) -> bool {
        let Some(send) = self.send.as_mut() else {
            return false;
        };
        let sent = match frame.into_data() {
            // An empty DATA frame reads as the end of the data on h3's receiving side.
            Ok(data) if data.is_empty() => Ok(()),
            Ok(data) => send.send_data(data).await,
            Err(frame) => match frame.into_trailers() {
                Ok(t) => send.send_trailers(t).await,
                Err(_) => Ok(()),
            },
        };
        // Trailers over the caller's limit were not sent: reset rather than finish, so the body
        // does not look complete without them.
        self.done = sent.as_ref().is_err_and(|e| !limits::too_big(e));
        sent.is_ok()
    }

    /// Ends the response.
    async fn finish(&mut self) {
        if let Some(send) = self.send.as_mut() {
            let _ = send.finish().await;
        }
        self.done = true;
    }

    /// The send half, for a tunnel once the accepting head is out.
    fn tunnel(&mut self, recv: RecvHalf) -> Option<ServerTunnel> {
        self.done = true;
        let send = self.send.take()?;
        Some(ServerTunnel::new(send, recv))
    }

    /// A response made by this sidecar: `status`, `x-halyard-local-reply` and `why`.
    async fn local(&mut self, status: StatusCode, why: &str) {
        self.reply(status, why, false).await;
    }

    /// The answer to a request over a rate limit: 429 with `retry-after` (RFC 6585 §4, RFC 9110
    /// §10.2.3), or for gRPC a Trailers-Only response with `RESOURCE_EXHAUSTED` (gRPC over
    /// HTTP/2 protocol: status 8; a gRPC client reads the status from the headers).
    async fn rate_limited(&mut self, limited: &Limited, grpc: bool) {
        let why = format!(
            "rate limited by {} ({})",
            limited.limit,
            limited.scope.as_str()
        );
        let retry_after = HeaderValue::from(limited.retry_after_secs());
        let mut resp = Response::new(());
        resp.headers_mut()
            .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, retry_after);
        resp.headers_mut().insert(
            RATELIMIT_SCOPE,
            HeaderValue::from_static(limited.scope.as_str()),
        );
        if grpc {
            let h = resp.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static("8"));
            if let Ok(v) = HeaderValue::from_str(&why) {
                h.insert("grpc-message", v);
            }
            if self.head(resp).await {
                self.finish().await;
            }
            return;
        }
        *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        if self.head(resp).await
            && self
                .frame(Frame::data(Bytes::from(format!("{why}\n"))))
                .await
        {
            self.finish().await;
        }
    }

    /// The answer when the app could not be asked: marked so the caller's sidecar knows the
    /// request reached no app (see `decide::retry::for_request`).
    async fn app_failure(&mut self, failure: &AppFailure) {
        self.reply(failure.status, &failure.why, failure.unreached)
            .await;
    }

    async fn reply(&mut self, status: StatusCode, why: &str, unreached: bool) {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
        if unreached {
            resp.headers_mut()
                .insert(APP_UNREACHED, HeaderValue::from_static("1"));
        }
        if self.head(resp).await
            && self
                .frame(Frame::data(Bytes::from(format!("{why}\n"))))
                .await
        {
            self.finish().await;
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let (false, Some(send)) = (self.done, self.send.as_mut()) {
            send.stop_stream(halyard_transport::h3::error::Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// Sends the request to the app and its response back; returns the status sent and the
/// response's declared length.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Arc<Shared>,
    apps: &AppClients,
    peer: &halyard_certs::SpiffeId,
    req: http::Request<()>,
    mut recv: RecvHalf,
    out: &mut Responder,
    admitted: Admitted,
    rec: &mut FlowRecord,
) -> (u16, Option<u64>) {
    let (mut parts, ()) = req.into_parts();
    let websocket = !admitted.grpc && upgrade::marked(&parts.headers);
    let expect = !admitted.grpc
        && parts
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    app_headers(peer, &mut parts, rec);
    let Ok(uri) = format!("http://{}{}", admitted.app, admitted.target).parse() else {
        return refuse(out, rec, StatusCode::BAD_REQUEST, "bad request target").await;
    };
    parts.uri = uri;
    parts.version = if admitted.grpc {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    if websocket {
        upgrade::unmark(&mut parts.headers);
        let req = http::Request::from_parts(parts, ChannelBody::full(Bytes::new()));
        return switch(shared, apps, req, recv, out, rec).await;
    }
    let peeked = match body_of_any_method(&mut parts, &mut recv).await {
        Ok(peeked) => peeked,
        Err(e) => {
            tracing::debug!(error = %e, "caller reset the request before its body");
            return (out.status.unwrap_or(499), None);
        }
    };
    let answer = if let Peeked::Empty = peeked {
        // Nothing left to read from the caller: the request can be sent twice.
        let client = if admitted.grpc { &apps.h2 } else { &apps.h1 };
        ask_bodiless(client, parts).await
    } else {
        let first = match peeked {
            Peeked::First(b) => Some(b),
            _ => None,
        };
        let (tx, body) = ChannelBody::channel();
        let pumping = shared.clone();
        shared.flows.spawn(async move {
            // Ends once the app no longer reads the body, even while the caller is silent.
            let pump = async {
                tokio::select! {
                    _ = pump_request(recv, first, &tx) => {}
                    _ = tx.closed() => {}
                }
            };
            pumping.until_hard_stop(pump).await;
        });
        let req = http::Request::from_parts(parts, body);
        if expect {
            ask_expecting(apps, admitted.app, req, out).await
        } else {
            let client = if admitted.grpc { &apps.h2 } else { &apps.h1 };
            client.request(req).await.map_err(|e| AppFailure::of(&e))
        }
    };
    match answer {
        Ok(resp) => {
            rec.response_head();
            let received = crate::telemetry::content_length(resp.headers());
            (respond(out, resp).await, received)
        }
        Err(failure) => {
            tracing::info!(app = %admitted.app, why = %failure.why, "local app request failed");
            out.app_failure(&failure).await;
            (failure.status.as_u16(), None)
        }
    }
}

/// The mesh's and the trace's headers on a request for the app.
fn app_headers(
    peer: &halyard_certs::SpiffeId,
    parts: &mut http::request::Parts,
    rec: &mut FlowRecord,
) {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    strip_hop_by_hop(&mut parts.headers);
    strip_identity_claims(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(peer.as_str()) {
        parts.headers.insert(PEER_IDENTITY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(http::header::HOST, v);
    }
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let after = trace.map(|t| t.child());
    rec.set_trace(after);
    if let Some(t) = after {
        parts.headers.insert("traceparent", t.header_value());
    }
}

/// What is known of a request's body before it is sent to the app.
enum Peeked {
    /// Not looked at: the framing headers or the protocol say what follows.
    Unknown,
    /// The caller finished the request with its headers: no body.
    Empty,
    /// The body's first chunk (taken off the stream).
    First(Bytes),
}

/// A body on any method (RFC 9110 §9.3.1 lets a GET carry one; search APIs use it). hyper's
/// HTTP/1.1 client sends no body for GET, HEAD and OPTIONS-like requests of unknown length, so
/// for a request without Content-Length this waits for the caller's first DATA frame or its
/// end: a body makes the request chunked explicitly. HTTP/3 has no framing headers, and the
/// caller's sidecar finishes a bodiless request with its headers, so this costs no round trip.
async fn body_of_any_method(
    parts: &mut http::request::Parts,
    recv: &mut RecvHalf,
) -> Result<Peeked, halyard_transport::h3::error::StreamError> {
    let implicit_empty = matches!(
        parts.method,
        http::Method::GET | http::Method::HEAD | http::Method::CONNECT
    );
    if parts.version != http::Version::HTTP_11
        || !implicit_empty
        || parts.headers.contains_key(http::header::CONTENT_LENGTH)
    {
        return Ok(Peeked::Unknown);
    }
    let Some(first) = recv.recv_data().await?.map(to_bytes) else {
        return Ok(Peeked::Empty);
    };
    parts.headers.insert(
        http::header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Ok(Peeked::First(first))
}

/// Sends a bodiless GET or HEAD to the app. A pooled keep-alive connection the app closes just
/// as the request goes out (an app shutting down, its idle timeout) fails it without an
/// answer; such a request is idempotent (RFC 9110 §9.2.2) and is sent once more on a fresh
/// connection, as RFC 9112 §9.3.1 allows.
async fn ask_bodiless(
    client: &AppClient,
    parts: http::request::Parts,
) -> Result<Response<hyper::body::Incoming>, AppFailure> {
    let again = || {
        let mut req = http::Request::new(ChannelBody::full(Bytes::new()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        req
    };
    match client.request(again()).await {
        Err(e) if !e.is_connect() => {
            tracing::debug!(error = %e, "app connection closed under the request; sending it again");
            client
                .request(again())
                .await
                .map_err(|e| AppFailure::of(&e))
        }
        answer => answer.map_err(|e| AppFailure::of(&e)),
    }
}

/// Asks the app on a connection of its own, passing its `100 Continue` on to the caller (see
/// `expect`).
async fn ask_expecting(
    apps: &AppClients,
    app: SocketAddr,
    req: http::Request<ChannelBody>,
    out: &mut Responder,
) -> Result<Response<hyper::body::Incoming>, AppFailure> {
    let expect::Expecting {
        mut continued,
        mut response,
    } = expect::send(app, apps.connect_timeout, req);
    let mut waiting = true;
    loop {
        tokio::select! {
            answer = &mut response => {
                return answer.map_err(|e| AppFailure {
                    status: e.status(),
                    why: e.to_string(),
                    unreached: e.unreached(),
                });
            }
            got = &mut continued, if waiting => {
                waiting = false;
                if got.is_ok() {
                    let mut cont = Response::new(());
                    *cont.status_mut() = StatusCode::CONTINUE;
                    out.interim(cont).await;
                }
            }
        }
    }
}

/// A WebSocket upgrade (see `upgrade`): asks the app to switch; if it does, answers the caller
/// 200 with the app's headers and the mesh mark, and splices the stream to the app's upgraded
/// connection. Any other answer is an ordinary response.
async fn switch(
    shared: &Arc<Shared>,
    apps: &AppClients,
    req: http::Request<ChannelBody>,
    recv: RecvHalf,
    out: &mut Responder,
    rec: &mut FlowRecord,
) -> (u16, Option<u64>) {
    let resp = match apps.h1.request(req).await {
        Ok(resp) => resp,
        Err(e) => {
            let failure = AppFailure::of(&e);
            out.app_failure(&failure).await;
            return (failure.status.as_u16(), None);
        }
    };
    rec.response_head();
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let received = crate::telemetry::content_length(resp.headers());
        return (respond(out, resp).await, received);
    }
    let mut head = Response::new(());
    *head.headers_mut() = resp.headers().clone();
    strip_hop_by_hop(head.headers_mut());
    upgrade::mark(head.headers_mut());
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(error = %e, "local app did not switch protocols");
            let why = "local app did not switch protocols";
            return refuse(out, rec, StatusCode::BAD_GATEWAY, why).await;
        }
    };
    if !out.head(head).await {
        return (101, None);
    }
    let Some(mut tunnel) = out.tunnel(recv) else {
        return (101, None);
    };
    let shared = shared.clone();
    shared.clone().flows.spawn(async move {
        let (from, to) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let splice = tunnel.splice(from, to);
        if let Some(Err(e)) = shared.until_hard_stop(splice).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
    (101, None)
}

/// Why the app gave no answer.
struct AppFailure {
    status: StatusCode,
    why: String,
    /// The app never got the request (no connection).
    unreached: bool,
}

impl AppFailure {
    /// DESIGN §2: 504 when the local app did not accept the connection in time, 502 when it
    /// refused or reset.
    fn of(e: &hyper_util::client::legacy::Error) -> AppFailure {
        let mut source = std::error::Error::source(e);
        let mut timed_out = false;
        while let Some(err) = source {
            timed_out |= err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
            source = err.source();
        }
        let (status, why) = match (e.is_connect(), timed_out) {
            (false, _) if limits::app_head_too_big(e) => (
                StatusCode::BAD_GATEWAY,
                "local app's response head is too large",
            ),
            (true, true) => (
                StatusCode::GATEWAY_TIMEOUT,
                "local app did not accept the connection in time",
            ),
            (true, false) => (StatusCode::BAD_GATEWAY, "local app refused the connection"),
            (false, _) => (StatusCode::BAD_GATEWAY, "local app reset the request"),
        };
        AppFailure {
            status,
            why: why.to_owned(),
            unreached: e.is_connect(),
        }
    }
}

/// Streams the app's response (head, body, trailers) to the peer.
async fn respond(out: &mut Responder, resp: Response<hyper::body::Incoming>) -> u16 {
    let (mut parts, mut body) = resp.into_parts();
    if parts.status.is_informational() {
        // hyper hands over a 101 (or another 1xx) as the final response; HTTP/3 has no
        // upgrade (RFC 9114 §4.5) and a 1xx is never final.
        out.local(
            StatusCode::BAD_GATEWAY,
            "local app answered with a 1xx status",
        )
        .await;
        return 502;
    }
    let status = parts.status.as_u16();
    strip_hop_by_hop(&mut parts.headers);
    // Only this sidecar says an upgrade was accepted, or that the app was not reached.
    strip_identity_claims(&mut parts.headers);
    parts.version = http::Version::HTTP_3;
    if !out.head(Response::from_parts(parts, ())).await {
        return out.status.unwrap_or(status);
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The app broke off mid-body: `out` resets the stream when it drops, so the caller
            // does not take the body as complete.
            return status;
        };
        if !out.frame(frame).await {
            return status;
        }
    }
    out.finish().await;
    status
}

/// Moves the request body from h3 to the app, `first` chunk first.
async fn pump_request(mut recv: RecvHalf, first: Option<Bytes>, tx: &BodySender) {
    if let Some(first) = first {
        if tx.send(Ok(Frame::data(first))).await.is_err() {
            return;
        }
    }
    loop {
        match recv.recv_data().await {
            Ok(Some(buf)) => {
                if tx.send(Ok(Frame::data(to_bytes(buf)))).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(BodyError(e.to_string()))).await;
                return;
            }
        }
    }
    if let Ok(Some(t)) = recv.recv_trailers().await {
        let _ = tx.send(Ok(Frame::trailers(t))).await;
    }
}
