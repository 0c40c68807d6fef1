//! Inbound: tunnels from verified peers are checked against the service's ports and access
//! policy, then piped to the local app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use halyard_transport::{Handler, ServerTunnel, TunnelRequest};
use http::StatusCode;
use tokio::net::TcpStream;

use crate::decide::admit::{Refusal, Stream};
use crate::decide::policy::Target;
use crate::l4::outbound::Flags;
use crate::state::{source_label, Shared};
use crate::telemetry::metrics::{Direction, Edge};
use crate::telemetry::{Outcome, Record};

/// The inbound tunnel handler.
pub(crate) struct Inbound {
    /// Shared state.
    pub(crate) shared: Arc<Shared>,
}

/// The outcome of admitting a tunnel: where to forward, or the status to refuse with.
struct Admitted {
    app: SocketAddr,
    peer: halyard_certs::SpiffeId,
    source: String,
    target: halyard_transport::Target,
}

/// The caller's service and SPIFFE id, and the local app address, for metrics and the log.
type Who<'a> = (&'a str, &'a halyard_certs::SpiffeId, Option<SocketAddr>);

impl Admitted {
    fn who(&self) -> Who<'_> {
        (&self.source, &self.peer, Some(self.app))
    }
}

impl Inbound {
    fn admit(&self, req: &TunnelRequest) -> Result<Admitted, Refusal> {
        let shared = &self.shared;
        let snap = shared.current();
        let target = req.target();
        let peer = &req.peer().id;
        let services = shared.peer_services(&snap, peer);
        let on = Target::port(target.port());
        let port = shared.admit(&snap, target, Stream::Tunnel, peer, &services, on)?;
        Ok(Admitted {
            app: SocketAddr::new(shared.config.file.inbound.app_host, port.target_port),
            peer: peer.clone(),
            source: source_label(&services).to_owned(),
            target: target.clone(),
        })
    }

    fn record(&self, who: Who<'_>, flags: Flags, sent: u64, received: u64, started: Instant) {
        let source = who.0;
        let version = self.shared.version();
        let edge = Edge {
            direction: Direction::Inbound,
            source,
            destination: &self.shared.service,
            version,
        };
        let secs = started.elapsed().as_secs_f64();
        self.shared
            .metrics
            .tcp_flow(edge, flags.as_str(), sent, received, secs);
        let rec = Record::new(
            Direction::Inbound,
            (source, &self.shared.service, version),
            Outcome::Flags(flags.as_str()),
            started,
        );
        self.shared.metrics.sinks().record(Record {
            peer_id: Some(who.1.as_str()),
            endpoint: who.2,
            sent: Some(sent),
            received: Some(received),
            ..rec
        });
    }
}

impl Handler for Inbound {
    async fn tunnel(&self, req: TunnelRequest) {
        // Tracked so drain waits for inbound flows as well.
        self.shared.flows.track_future(self.serve(req)).await
    }

    async fn http(&self, req: halyard_transport::HttpRequest) {
        let shared = self.shared.clone();
        shared
            .flows
            .track_future(crate::l7::inbound::serve(&self.shared, req))
            .await
    }
}

impl Inbound {
    async fn serve(&self, req: TunnelRequest) {
        let started = Instant::now();
        let admitted = match self.admit(&req) {
            Ok(a) => a,
            Err(refusal) => {
                let (status, flags) = (refusal.status(), Flags::from(refusal.flag()));
                tracing::info!(peer = %req.peer().id, target = %req.target(), %status, reason = %refusal, "tunnel refused");
                let services = (self.shared).peer_services(&self.shared.current(), &req.peer().id);
                let source = source_label(&services).to_owned();
                let peer = req.peer().id.clone();
                req.reject(status).await;
                self.record((&source, &peer, None), flags, 0, 0, started);
                return;
            }
        };
        let timeout = self.shared.config.file.failure.connect_timeout;
        let app = match tokio::time::timeout(timeout, TcpStream::connect(admitted.app)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                tracing::info!(app = %admitted.app, error = %e, "local app refused");
                req.reject(StatusCode::BAD_GATEWAY).await;
                return self.record(admitted.who(), Flags::UpstreamFailure, 0, 0, started);
            }
            Err(_) => {
                req.reject(StatusCode::GATEWAY_TIMEOUT).await;
                return self.record(admitted.who(), Flags::UpstreamFailure, 0, 0, started);
            }
        };
        let _ = app.set_nodelay(true);
        let _active = self.shared.metrics.active(Direction::Inbound);
        let Ok(tunnel) = req.accept().await else {
            return self.record(admitted.who(), Flags::Reset, 0, 0, started);
        };
        let (flags, sent, received) = self.pipe(app, tunnel, &admitted).await;
        tracing::debug!(source = %admitted.source, flags = flags.as_str(), sent, received, "inbound flow ended");
        // From the source's view: what it sent is what the app received here.
        self.record(admitted.who(), flags, received, sent, started);
    }

    /// Pipes until both sides finish; closes early on the drain deadline or, when configured,
    /// when policy turns to deny for this peer.
    async fn pipe(
        &self,
        mut app: TcpStream,
        mut tunnel: ServerTunnel,
        admitted: &Admitted,
    ) -> (Flags, u64, u64) {
        let shared = &self.shared;
        let mut snap_rx = shared.snapshot.clone();
        let close_on_deny = shared.config.file.failure.close_flows_on_deny;
        {
            let (read, write) = app.split();
            let copy = tunnel.splice(read, write);
            tokio::pin!(copy);
            loop {
                tokio::select! {
                    r = &mut copy => return match r {
                        Ok((to_peer, to_app)) => (Flags::Ok, to_peer, to_app),
                        Err(_) => (Flags::Reset, 0, 0),
                    },
                    _ = shared.hard_stop.cancelled() => break,
                    changed = snap_rx.changed(), if close_on_deny => {
                        if changed.is_err() || !self.still_allowed(admitted) {
                            tracing::info!(source = %admitted.source, "closing flow: policy now denies it");
                            break;
                        }
                    }
                }
            }
        }
        tunnel.abort();
        crate::l4::outbound::reset_on_close(&app);
        (Flags::Reset, 0, 0)
    }

    fn still_allowed(&self, admitted: &Admitted) -> bool {
        let shared = &self.shared;
        let snap = shared.current();
        let services = shared.peer_services(&snap, &admitted.peer);
        let on = Target::port(admitted.target.port());
        let target = &admitted.target;
        (shared.admit(&snap, target, Stream::Tunnel, &admitted.peer, &services, on)).is_ok()
    }
}
