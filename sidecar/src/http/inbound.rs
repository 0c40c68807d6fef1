//! L7 inbound: HTTP/3 requests from verified peers are checked against the service's ports and
//! request-level policy, then sent to the local app over HTTP/1.1 or h2 (gRPC), streaming both
//! bodies and the trailers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use halyard_registry::model::Protocol;
use halyard_transport::{HttpRequest, ServerRequestStream, Target};
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::body::{to_bytes, BodyError, BodySender, ChannelBody};
use super::headers::{strip_hop_by_hop, strip_identity_claims, PEER_IDENTITY};
use super::normalize::normalize;
use super::trace::TraceContext;
use crate::authz::{self, Decision};
use crate::metrics::{Direction, Edge};
use crate::proxy::Shared;
use crate::telemetry::Seen;

type SendHalf = halyard_transport::h3::server::RequestStream<
    halyard_transport::h3_quinn::SendStream<Bytes>,
    Bytes,
>;
type RecvHalf =
    halyard_transport::h3::server::RequestStream<halyard_transport::h3_quinn::RecvStream, Bytes>;

/// Where an admitted request goes.
struct Admitted {
    app: SocketAddr,
    grpc: bool,
    target: String,
}

/// Serves one HTTP/3 request from a peer sidecar.
pub async fn serve(shared: &Arc<Shared>, req: HttpRequest) {
    let started = Instant::now();
    let HttpRequest {
        peer,
        request,
        stream,
    } = req;
    let mut seen = Seen::request(&request);
    let snap = shared.current();
    let services = shared.peer_services(&snap, &peer.id);
    let source = services
        .first()
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let code = match admit(shared, &peer.id, &services, &request) {
        Err((status, why)) => {
            tracing::info!(peer = %peer.id, uri = %request.uri(), %status, reason = %why, "request refused");
            reply(stream, status, &why).await;
            status.as_u16()
        }
        Ok(admitted) => {
            seen.served(admitted.app);
            forward(shared, &peer.id, request, stream, admitted, &mut seen).await
        }
    };
    let version = shared
        .config
        .file
        .service
        .version
        .as_deref()
        .unwrap_or("unknown");
    let edge = Edge {
        direction: Direction::Inbound,
        source: &source,
        destination: &shared.service,
        version,
    };
    shared
        .metrics
        .request(edge, code, started.elapsed().as_secs_f64());
    let edge = (source.as_str(), shared.service.as_str(), version);
    let sinks = shared.metrics.sinks();
    seen.finish(
        sinks,
        Direction::Inbound,
        edge,
        Some(peer.id.as_str()),
        (code, seen.received),
    );
}

fn admit(
    shared: &Shared,
    peer: &halyard_certs::SpiffeId,
    services: &[String],
    req: &http::Request<()>,
) -> Result<Admitted, (StatusCode, String)> {
    let snap = shared.current();
    let target = Target::from_uri(req.uri())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad authority: {e}")))?;
    let not_found = |why: String| (StatusCode::NOT_FOUND, why);
    let port = shared.local_port(&snap, &target).map_err(not_found)?;
    if port.protocol == Protocol::Tcp {
        return Err(not_found(format!(
            "port {} of {} is tcp, not http",
            target.port(),
            target.service()
        )));
    }
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let norm =
        normalize(raw).map_err(|e| (StatusCode::BAD_REQUEST, format!("refused path: {e}")))?;
    let on = authz::Target {
        port: target.port(),
        method: Some(req.method().as_str()),
        path: Some(&norm.path),
        headers: Some(req.headers()),
    };
    if let Decision::Deny(reason) = shared.authorize(&snap, peer, services, on) {
        let source = services.first().map_or("unknown", String::as_str);
        shared
            .metrics
            .denial(source, &shared.service, reason.as_str());
        return Err((
            StatusCode::FORBIDDEN,
            format!("denied by policy ({})", reason.as_str()),
        ));
    }
    Ok(Admitted {
        app: SocketAddr::new(shared.config.file.inbound.app_host, port.target_port),
        grpc: port.protocol == Protocol::Grpc,
        target: norm.target(),
    })
}

async fn reply(stream: ServerRequestStream, status: StatusCode, why: &str) {
    // The receive half lives until the answer is out: dropping it first would stop the
    // caller's request body, and the caller could fail before it reads the answer.
    let (send, _recv) = stream.split();
    reply_half(send, status, why).await;
}

/// Sends the request to the app and its response back; returns the status sent.
async fn forward(
    shared: &Arc<Shared>,
    peer: &halyard_certs::SpiffeId,
    req: http::Request<()>,
    stream: ServerRequestStream,
    admitted: Admitted,
    seen: &mut Seen,
) -> u16 {
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
    seen.after = trace.map(|t| t.child());
    if let Some(v) = seen
        .after
        .and_then(|t| HeaderValue::from_str(&t.to_string()).ok())
    {
        parts.headers.insert("traceparent", v);
    }
    let scheme = "http";
    let Ok(uri) = format!("{scheme}://{}{}", admitted.app, admitted.target).parse() else {
        reply(stream, StatusCode::BAD_REQUEST, "bad request target").await;
        return 400;
    };
    parts.uri = uri;
    parts.version = if admitted.grpc {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let (send, recv) = stream.split();
    let (tx, body) = ChannelBody::channel();
    shared.flows.spawn(pump_request(recv, tx));
    let client = if admitted.grpc {
        &shared.app_h2
    } else {
        &shared.app_h1
    };
    match client.request(http::Request::from_parts(parts, body)).await {
        Ok(resp) => {
            seen.received = crate::telemetry::content_length(resp.headers());
            respond(send, resp).await
        }
        Err(e) => {
            tracing::info!(app = %admitted.app, error = %e, "local app request failed");
            // DESIGN §2: 502 when the local app refused or reset.
            let why = if e.is_connect() {
                "local app refused the connection"
            } else {
                "local app reset the request"
            };
            reply_half(send, StatusCode::BAD_GATEWAY, why).await;
            502
        }
    }
}

async fn reply_half(mut send: SendHalf, status: StatusCode, why: &str) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("x-halyard-local-reply", HeaderValue::from_static("1"));
    if send.send_response(resp).await.is_ok() {
        let _ = send.send_data(Bytes::from(format!("{why}\n"))).await;
        let _ = send.finish().await;
    }
}

/// Streams the app's response (head, body, trailers) to the peer.
async fn respond(mut send: SendHalf, resp: Response<hyper::body::Incoming>) -> u16 {
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status.as_u16();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_3;
    if send
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return status;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The app broke off mid-body: reset so the caller does not take it as complete.
            send.stop_stream(halyard_transport::h3::error::Code::H3_INTERNAL_ERROR);
            return status;
        };
        let sent = match frame.into_data() {
            Ok(data) => send.send_data(data).await,
            Err(frame) => match frame.into_trailers() {
                Ok(t) => send.send_trailers(t).await,
                Err(_) => Ok(()),
            },
        };
        if sent.is_err() {
            return status;
        }
    }
    let _ = send.finish().await;
    status
}

/// Moves the request body from h3 to the app.
async fn pump_request(mut recv: RecvHalf, tx: BodySender) {
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
