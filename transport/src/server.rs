//! The inbound side: accept QUIC connections from other sidecars, run HTTP/3 on them, and hand
//! each request to a [`Handler`] together with the peer's verified SPIFFE id.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halyard_certs::SpiffeId;
use http::{HeaderMap, Method, StatusCode};
use tokio::task::JoinSet;

use crate::admission::{Admit, HandshakePass, PeerPass};
use crate::endpoint::{peer_identity, MeshEndpoint};
use crate::error::TunnelError;
use crate::reset::ResetBudget;
use crate::target::Target;
use crate::tunnel::ServerTunnel;

/// The server half of an HTTP/3 request stream, for L7 handlers.
pub type ServerRequestStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Receives the requests of verified peers. `tunnel` gets each CONNECT whose target parsed;
/// `http` gets every other request and answers 405 unless overridden (a tunnel-only service).
pub trait Handler: Send + Sync + 'static {
    /// A CONNECT request: call [`TunnelRequest::accept`] to answer 200 and pipe bytes, or
    /// [`TunnelRequest::reject`] with a status (DESIGN §2: 403, 404, 502, 503, 504).
    fn tunnel(&self, request: TunnelRequest) -> impl Future<Output = ()> + Send;

    /// Any other request (L7). The default answers 405 Method Not Allowed.
    fn http(&self, request: HttpRequest) -> impl Future<Output = ()> + Send {
        async move {
            request.respond(StatusCode::METHOD_NOT_ALLOWED).await;
        }
    }

    /// Completes when `peer` must no longer be served (its identity was revoked): the
    /// connection is then closed with every request on it. The default never completes.
    fn peer_revoked(&self, peer: &Peer) -> impl Future<Output = ()> + Send + 'static {
        let _ = peer;
        std::future::pending()
    }
}

/// Who sent a request: the verified id and the address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE id proven by the peer's certificate.
    pub id: SpiffeId,
    /// The peer's UDP address.
    pub addr: SocketAddr,
    /// The serial of the peer's leaf, big-endian bytes as in the certificate.
    pub serial: Vec<u8>,
}

/// A CONNECT request from a verified peer (RFC 9114 §4.4).
pub struct TunnelRequest {
    peer: Peer,
    target: Target,
    headers: HeaderMap,
    /// `None` once answered; see the `Drop` impl.
    stream: Option<ServerRequestStream>,
}

/// Resets an unanswered request with H3_REQUEST_REJECTED (RFC 9114 §8.1: not processed, safe
/// to retry). Left alone, the dropped stream would end without response headers, which the h3
/// client treats as a connection error (H3_FRAME_UNEXPECTED) for every flow on the connection:
/// a handler that forgets to answer, or panics, must not take down its neighbours.
fn reject_unanswered(stream: Option<ServerRequestStream>) {
    if let Some(mut stream) = stream {
        stream.stop_stream(h3::error::Code::H3_REQUEST_REJECTED);
    }
}

impl Drop for TunnelRequest {
    fn drop(&mut self) {
        reject_unanswered(self.stream.take());
    }
}

impl std::fmt::Debug for TunnelRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelRequest")
            .field("peer", &self.peer)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TunnelRequest {
    /// The verified peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The requested `<service>:<port>`.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The request headers (no pseudo-headers).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Answers 200 and returns the byte stream.
    pub async fn accept(self) -> Result<ServerTunnel, TunnelError> {
        self.accept_with(HeaderMap::new()).await
    }

    /// Answers 200 with `headers` and returns the byte stream.
    pub async fn accept_with(mut self, headers: HeaderMap) -> Result<ServerTunnel, TunnelError> {
        let mut stream = self.stream.take().ok_or(TunnelError::Closed)?;
        let mut response = http::Response::new(());
        *response.headers_mut() = headers;
        stream
            .send_response(response)
            .await
            .map_err(|e| TunnelError::from_h3(&e, false))?;
        let (send, recv) = stream.split();
        Ok(ServerTunnel::new(send, recv))
    }

    /// Refuses the tunnel with `status` and ends the stream.
    pub async fn reject(mut self, status: StatusCode) {
        if let Some(stream) = self.stream.take() {
            respond(stream, status).await;
        }
    }
}

/// A non-CONNECT request from a verified peer, with the stream to read its body from and to
/// send the response, body and trailers on. The handler must send a response before dropping
/// the stream: a stream that ends without response headers is a connection error for the h3
/// client (H3_FRAME_UNEXPECTED), which would end every flow on the connection.
pub struct HttpRequest {
    /// The verified peer.
    pub peer: Peer,
    /// Method, URI and headers.
    pub request: http::Request<()>,
    /// The request stream.
    pub stream: ServerRequestStream,
}

impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("peer", &self.peer)
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl HttpRequest {
    /// Answers with an empty body and `status`.
    pub async fn respond(self, status: StatusCode) {
        respond(self.stream, status).await;
    }
}

async fn respond(mut stream: ServerRequestStream, status: StatusCode) {
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    if let Err(e) = stream.send_response(response).await {
        tracing::debug!(error = %e, "could not send response");
        return;
    }
    if let Err(e) = stream.finish().await {
        tracing::debug!(error = %e, "could not finish response");
    }
}

/// Accepts connections on `endpoint` and serves requests with `handler` until the endpoint is
/// closed. Every connection and request task is owned here and ends with it.
pub async fn serve<H: Handler>(endpoint: MeshEndpoint, handler: Arc<H>) {
    serve_until(endpoint, handler, std::future::pending()).await;
}

/// [`serve`], with a graceful drain once `drain` completes: new connections are refused, every
/// connection gets a GOAWAY (RFC 9114 §5.2) so peers send new requests elsewhere, and this
/// returns when the requests in flight have ended (each connection is then closed with
/// H3_NO_ERROR). Bound it with a deadline, then [`MeshEndpoint::close`] forces the rest.
pub async fn serve_until<H, F>(endpoint: MeshEndpoint, handler: Arc<H>, drain: F)
where
    H: Handler,
    F: Future<Output = ()>,
{
    let (draining, watch) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(drain);
    let drained = loop {
        tokio::select! {
            incoming = endpoint.quinn().accept() => match incoming {
                Some(incoming) => {
                    let Some(pass) = admit(&endpoint, incoming) else { continue };
                    let task = serve_connection(pass, endpoint.clone(), handler.clone(), watch.clone());
                    connections.spawn(task);
                }
                None => break false,
            },
            () = &mut drain => break true,
        }
        while connections.try_join_next().is_some() {}
    };
    if !drained {
        return connections.shutdown().await;
    }
    draining.send_replace(true);
    loop {
        tokio::select! {
            incoming = endpoint.quinn().accept() => match incoming {
                // CONNECTION_REFUSED at once, so the peer tries elsewhere without a timeout.
                Some(incoming) => incoming.refuse(),
                None => break,
            },
            done = connections.join_next() => if done.is_none() { return },
        }
    }
    connections.shutdown().await;
}

/// Applies the handshake bounds (`admission`) to a new attempt: the attempt with its place, or
/// `None` when it was retried, refused or dropped.
fn admit(
    endpoint: &MeshEndpoint,
    incoming: quinn::Incoming,
) -> Option<(quinn::Incoming, HandshakePass)> {
    let source = incoming.remote_address().ip();
    match endpoint
        .gate()
        .attempt(source, incoming.remote_address_validated())
    {
        (Admit::Accept, Some(pass)) => return Some((incoming, pass)),
        (Admit::Retry, _) if incoming.may_retry() => {
            let _ = incoming.retry();
        }
        (Admit::Ignore, _) => incoming.ignore(),
        _ => incoming.refuse(),
    }
    None
}

async fn serve_connection<H: Handler>(
    (incoming, pass): (quinn::Incoming, HandshakePass),
    endpoint: MeshEndpoint,
    handler: Arc<H>,
    draining: tokio::sync::watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let connecting = match endpoint.accept(incoming) {
        Ok(connecting) => connecting,
        Err(e) => return tracing::debug!(%remote, error = %e, "connection refused"),
    };
    let conn = match tokio::time::timeout(endpoint.config().connect_timeout(), connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "handshake failed"),
        Err(_) => return tracing::debug!(%remote, "handshake timed out"),
    };
    // The client's chain was verified (the server requires it): the source gets its handshake
    // token back (`admission`).
    pass.authenticated();
    // The verifier has accepted the chain; no request is read before this point, so no
    // decision is made on unauthenticated data.
    let Some(id) = peer_identity(&conn) else {
        // RFC 9114 §8.1: H3_INTERNAL_ERROR (0x102).
        conn.close(quinn::VarInt::from_u32(0x102), b"peer identity unavailable");
        return;
    };
    let Some(place) = endpoint.gate().peer(&id) else {
        // RFC 9114 §8.1: H3_EXCESSIVE_LOAD (0x107).
        conn.close(
            quinn::VarInt::from_u32(0x107),
            b"too many connections from this peer",
        );
        return;
    };
    let h3 = h3::server::builder()
        .max_field_section_size(endpoint.config().max_field_section_size())
        .send_grease(false)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await;
    let mut h3 = match h3 {
        Ok(h3) => h3,
        Err(e) => return tracing::debug!(%remote, error = %e, "http/3 setup failed"),
    };
    let serial = crate::endpoint::peer_leaf(&conn)
        .map(|(_, s)| s)
        .unwrap_or_default();
    let peer = Peer {
        id,
        addr: remote,
        serial,
    };
    let revoked = handler.peer_revoked(&peer);
    let closer = conn.clone();
    let watcher = tokio::spawn(async move {
        revoked.await;
        // RFC 9114 §8.1: H3_REQUEST_REJECTED is for streams; a revoked peer loses the whole
        // connection, with H3_INTERNAL_ERROR (0x102) and a reason it can log.
        closer.close(quinn::VarInt::from_u32(0x102), b"peer identity revoked");
    });
    let mut requests = Requests::new(conn, peer, handler, place);
    if requests.run(&mut h3, draining).await {
        requests.drain(&mut h3).await;
    }
    watcher.abort();
}

type H3Server = h3::server::Connection<h3_quinn::Connection, Bytes>;

/// Bounds of the wait between a drained connection's last request and its close.
const DRAIN_LINGER_MIN: Duration = Duration::from_millis(50);
const DRAIN_LINGER_MAX: Duration = Duration::from_secs(1);

/// The requests of one connection and the tasks serving them.
struct Requests<H> {
    conn: quinn::Connection,
    peer: Peer,
    handler: Arc<H>,
    tasks: JoinSet<bool>,
    budget: ResetBudget,
    /// This connection's place among its peer's, and the peer's requests in progress.
    place: PeerPass,
}

impl<H: Handler> Requests<H> {
    fn new(conn: quinn::Connection, peer: Peer, handler: Arc<H>, place: PeerPass) -> Self {
        Requests {
            conn,
            peer,
            handler,
            tasks: JoinSet::new(),
            budget: ResetBudget::default(),
            place,
        }
    }

    /// Serves requests until the connection ends (false) or a drain begins (true).
    async fn run(
        &mut self,
        h3: &mut H3Server,
        mut draining: tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        loop {
            let accepted = tokio::select! {
                accepted = h3.accept() => accepted,
                _ = draining.wait_for(|d| *d) => return true,
            };
            match accepted {
                Ok(Some(resolver)) => self.spawn(resolver),
                Ok(None) => return false,
                Err(e) => {
                    tracing::debug!(peer = %self.peer.id, error = %e, "connection ended");
                    return false;
                }
            }
            if !self.reap() {
                return false;
            }
        }
    }

    fn spawn(&mut self, resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>) {
        let Some(slot) = self.place.stream() else {
            self.tasks.spawn(reject_request(resolver));
            return;
        };
        let (peer, handler) = (self.peer.clone(), self.handler.clone());
        // The request's future is made inside the task: made outside and moved in, it would be
        // held twice in the task's state (once captured, once being awaited), which doubled
        // every request's task (28 KiB instead of 14 for an L4 flow). It is boxed: the task
        // moves its future by value when it is spawned, and its state as a whole when it ends
        // and when its output is read, so an unboxed 12 KiB future cost several 12 KiB copies
        // per request (a tenth of an L7 server sidecar's CPU in `perf`, the largest item).
        self.tasks.spawn(Box::pin(async move {
            let answered = handle_request(resolver, peer, handler).await;
            drop(slot);
            answered
        }));
    }

    /// Collects finished requests; false once the connection was closed for abuse.
    fn reap(&mut self) -> bool {
        while let Some(done) = self.tasks.try_join_next() {
            if matches!(done, Ok(false)) && !self.budget.allow(Instant::now()) {
                // Rapid-reset defence (CVE-2023-44487 class): too many requests abandoned
                // before their headers completed. RFC 9114 §8.1: H3_EXCESSIVE_LOAD (0x107).
                tracing::warn!(peer = %self.peer.id, "too many aborted requests; closing connection");
                self.conn
                    .close(quinn::VarInt::from_u32(0x107), b"too many aborted requests");
                return false;
            }
        }
        true
    }

    /// Sends GOAWAY, serves what is still in flight, then closes with H3_NO_ERROR.
    async fn drain(&mut self, h3: &mut H3Server) {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-5.2
        //# An endpoint can use the GOAWAY frame to initiate a graceful shutdown.
        if let Err(e) = h3.shutdown(1).await {
            tracing::debug!(peer = %self.peer.id, error = %e, "goaway not sent");
        }
        while !self.tasks.is_empty() {
            tokio::select! {
                accepted = h3.accept() => match accepted {
                    // Requests below the GOAWAY id that were already on their way.
                    Ok(Some(resolver)) => self.spawn(resolver),
                    _ => break,
                },
                _ = self.tasks.join_next() => {}
            }
        }
        while self.tasks.join_next().await.is_some() {}
        // Closing discards data not yet acknowledged (the last bytes and FIN of those flows):
        // linger a few round trips unless the peer closes first.
        let linger = (self.conn.rtt() * 3 + DRAIN_LINGER_MIN).min(DRAIN_LINGER_MAX);
        let _ = tokio::time::timeout(linger, self.conn.closed()).await;
        self.conn.close(quinn::VarInt::from_u32(0x100), b"drained");
    }
}

/// Resets a request of a peer at its cap of requests in progress (`admission`) with
/// H3_REQUEST_REJECTED (0x10b, RFC 9114 §8.1: not processed, the client may retry it
/// elsewhere). The headers are read first (h3 gives the stream no other way); bounded by
/// `max_field_section_size` like any request's.
async fn reject_request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
) -> bool {
    match resolver.resolve_request().await {
        Ok((_, mut stream)) => {
            stream.stop_sending(h3::error::Code::H3_REQUEST_REJECTED);
            stream.stop_stream(h3::error::Code::H3_REQUEST_REJECTED);
            true
        }
        Err(e) => matches!(e, h3::error::StreamError::HeaderTooBig { .. }),
    }
}

/// Reads the request headers and dispatches; false when the peer abandoned the request first.
async fn handle_request<H: Handler>(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    peer: Peer,
    handler: Arc<H>,
) -> bool {
    let (request, stream) = match resolver.resolve_request().await {
        Ok(parts) => parts,
        Err(e) => {
            // h3 has already answered 431 to an oversized header section (RFC 9114 §4.2.2):
            // an answered request, not an abandoned one for the reset budget.
            tracing::debug!(peer = %peer.id, error = %e, "request not resolved");
            return matches!(e, h3::error::StreamError::HeaderTooBig { .. });
        }
    };
    if request.method() != Method::CONNECT {
        // Boxed: the HTTP handler's state is several times a tunnel's, and every request task
        // would otherwise be sized for it, idle L4 flows included.
        Box::pin(handler.http(HttpRequest {
            peer,
            request,
            stream,
        }))
        .await;
        return true;
    }
    match Target::from_uri(request.uri()) {
        Ok(target) => {
            let (parts, ()) = request.into_parts();
            let req = TunnelRequest {
                peer,
                target,
                headers: parts.headers,
                stream: Some(stream),
            };
            handler.tunnel(req).await;
        }
        Err(e) => {
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
            //# A CONNECT request MUST be constructed as follows: [...] The
            //# :authority pseudo-header field contains the host and port to connect to
            tracing::debug!(peer = %peer.id, error = %e, "bad CONNECT target");
            respond(stream, StatusCode::BAD_REQUEST).await;
        }
    }
    true
}
