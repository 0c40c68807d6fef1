//! L7 inbound: HTTP/3 requests from verified peers are checked against the service's ports and
//! request-level policy, then sent to the local app over HTTP/1.1 or h2 (gRPC), streaming both
//! bodies and the trailers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halyard_registry::model::Protocol;
use halyard_transport::{HttpRequest, Target};
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::body::{to_bytes, BodyError, BodySender, ChannelBody};
use super::headers::{strip_hop_by_hop, strip_identity_claims, PEER_IDENTITY};
use super::normalize::{normalize, PathError};
use crate::decide::admit::{Refusal, Stream};
use crate::decide::policy;
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
}

type AppClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ChannelBody,
>;

impl AppClients {
    /// Clients that give up connecting to the app after `connect_timeout`.
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        AppClients {
            h1: app_client(false, connect_timeout),
            h2: app_client(true, connect_timeout),
        }
    }
}

fn app_client(h2: bool, connect_timeout: Duration) -> AppClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(h2)
        .pool_idle_timeout(Duration::from_secs(30))
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
            // `recv` lives until the answer is out: dropping it first would stop the caller's
            // request body, and the caller could fail before it reads the answer.
            out.local(status, &why).await;
            drop(recv);
            (status.as_u16(), None)
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
    let port = shared.admit(&snap, &target, Stream::Request, peer, services, on)?;
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
    send: SendHalf,
    /// The status sent, once the head is out.
    status: Option<u16>,
    /// Whether the stream was finished (or found broken): nothing to reset.
    done: bool,
}

impl Responder {
    fn new(send: SendHalf) -> Self {
        Responder {
            send,
            status: None,
            done: false,
        }
    }

    /// Sends the response head; `false` when the stream is gone.
    async fn head(&mut self, resp: Response<()>) -> bool {
        let status = resp.status().as_u16();
        let sent = self.send.send_response(resp).await.is_ok();
        if sent {
            self.status = Some(status);
        }
        self.done = !sent;
        sent
    }

    /// Sends a body frame (data or trailers); `false` when the stream is gone.
    async fn frame(&mut self, frame: Frame<Bytes>) -> bool {
        let sent = match frame.into_data() {
            Ok(data) => self.send.send_data(data).await,
            Err(frame) => match frame.into_trailers() {
                Ok(t) => self.send.send_trailers(t).await,
                Err(_) => Ok(()),
            },
        };
        self.done = sent.is_err();
        sent.is_ok()
    }

    /// Ends the response.
    async fn finish(&mut self) {
        let _ = self.send.finish().await;
        self.done = true;
    }

    /// A response made by this sidecar: `status`, `x-halyard-local-reply` and `why`.
    async fn local(&mut self, status: StatusCode, why: &str) {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
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
        if !self.done {
            self.send
                .stop_stream(halyard_transport::h3::error::Code::H3_REQUEST_CANCELLED);
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
    recv: RecvHalf,
    out: &mut Responder,
    admitted: Admitted,
    rec: &mut FlowRecord,
) -> (u16, Option<u64>) {
    let (mut parts, ()) = req.into_parts();
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
    if let Some(v) = after.and_then(|t| HeaderValue::from_str(&t.to_string()).ok()) {
        parts.headers.insert("traceparent", v);
    }
    let scheme = "http";
    let Ok(uri) = format!("{scheme}://{}{}", admitted.app, admitted.target).parse() else {
        out.local(StatusCode::BAD_REQUEST, "bad request target")
            .await;
        return (400, None);
    };
    parts.uri = uri;
    parts.version = if admitted.grpc {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let (tx, body) = ChannelBody::channel();
    let pumping = shared.clone();
    shared.flows.spawn(async move {
        // Ends once the app no longer reads the body, even while the caller is silent.
        let pump = async {
            tokio::select! {
                _ = pump_request(recv, &tx) => {}
                _ = tx.closed() => {}
            }
        };
        pumping.until_hard_stop(pump).await;
    });
    let client = if admitted.grpc { &apps.h2 } else { &apps.h1 };
    match client.request(http::Request::from_parts(parts, body)).await {
        Ok(resp) => {
            rec.response_head();
            let received = crate::telemetry::content_length(resp.headers());
            (respond(out, resp).await, received)
        }
        Err(e) => {
            tracing::info!(app = %admitted.app, error = %e, "local app request failed");
            let (status, why) = app_failure(&e);
            out.local(status, why).await;
            (status.as_u16(), None)
        }
    }
}

/// DESIGN §2: 504 when the local app did not accept the connection in time, 502 when it
/// refused or reset.
fn app_failure(e: &hyper_util::client::legacy::Error) -> (StatusCode, &'static str) {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let timed_out = err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        if timed_out && e.is_connect() {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                "local app did not accept the connection in time",
            );
        }
        source = err.source();
    }
    if e.is_connect() {
        (StatusCode::BAD_GATEWAY, "local app refused the connection")
    } else {
        (StatusCode::BAD_GATEWAY, "local app reset the request")
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
    parts.version = http::Version::HTTP_3;
    if !out.head(Response::from_parts(parts, ())).await {
        return status;
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

/// Moves the request body from h3 to the app.
async fn pump_request(mut recv: RecvHalf, tx: &BodySender) {
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
