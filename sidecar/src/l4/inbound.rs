//! Inbound: tunnels from verified peers are checked against the service's ports and access
//! policy, then piped to the local app.

use std::net::SocketAddr;
use std::sync::Arc;

use halyard_transport::{Handler, ServerTunnel, TunnelRequest};
use http::StatusCode;
use tokio::net::TcpStream;

use crate::decide::admit::{Refusal, Stream};
use crate::decide::policy::Target;
use crate::l4::outbound::Flags;
use crate::l7::inbound::AppClients;
use crate::state::{source_label, Shared};
use crate::telemetry::flow::{End, FlowRecord};
use crate::telemetry::metrics::Direction;

/// The inbound tunnel handler.
pub(crate) struct Inbound {
    /// Shared state.
    pub(crate) shared: Arc<Shared>,
    /// Pooled clients to the local app, for requests on HTTP ports.
    pub(crate) apps: AppClients,
}

/// An admitted tunnel: where to forward, and what the policy re-check needs.
struct Admitted {
    app: SocketAddr,
    peer: halyard_certs::SpiffeId,
    target: halyard_transport::Target,
    /// Counts the flow as open under rate limits while it lasts.
    _slots: Vec<crate::decide::ratelimit::FlowSlot>,
}

/// A flow that ended before any byte was piped.
fn refused(flags: Flags) -> End {
    End::Flow {
        flags: flags.as_str(),
        sent: 0,
        received: 0,
    }
}

impl Inbound {
    fn admit(&self, req: &TunnelRequest, services: &[String]) -> Result<Admitted, Refusal> {
        let shared = &self.shared;
        let snap = shared.current();
        let target = req.target();
        let peer = &req.peer().id;
        let on = Target::port(target.port());
        let admitted = shared.admit(&snap, target, Stream::Tunnel, peer, services, on)?;
        Ok(Admitted {
            app: SocketAddr::new(
                shared.config.file.inbound.app_host,
                admitted.port.target_port,
            ),
            peer: peer.clone(),
            target: target.clone(),
            _slots: admitted.slots,
        })
    }

    /// Starts the record of a tunnel from a verified peer serving `services`.
    fn record(&self, req: &TunnelRequest, services: &[String]) -> FlowRecord {
        let shared = &self.shared;
        let source = source_label(services);
        let mut rec = shared.flow_record(Direction::Inbound, source, &shared.service);
        rec.set_peer(req.peer().id.as_str());
        rec.set_version(shared.version());
        rec
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
            .track_future(crate::l7::inbound::serve(&self.shared, &self.apps, req))
            .await
    }

    fn peer_revoked(
        &self,
        peer: &halyard_transport::Peer,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::ca::revoke::until_revoked(
            self.shared.snapshot.clone(),
            peer.id.clone(),
            peer.serial.clone(),
        )
    }
}

impl Inbound {
    async fn serve(&self, req: TunnelRequest) {
        if self.shared.config.file.egress.gateway && req.target().service() != self.shared.service {
            return crate::l4::egress::serve_gateway(&self.shared, req).await;
        }
        let services = (self.shared).peer_services(&self.shared.current(), &req.peer().id);
        let mut rec = self.record(&req, &services);
        let admitted = match self.admit(&req, &services) {
            Ok(a) => a,
            Err(refusal) => {
                let (status, flags) = (refusal.status(), Flags::from(refusal.flag()));
                tracing::info!(peer = %req.peer().id, target = %req.target(), %status, reason = %refusal, "tunnel refused");
                rec.finish(refused(flags));
                return req.reject(status).await;
            }
        };
        rec.set_endpoint(admitted.app);
        let timeout = self.shared.config.file.failure.connect_timeout;
        let mut app = match tokio::time::timeout(timeout, TcpStream::connect(admitted.app)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                tracing::info!(app = %admitted.app, error = %e, "local app refused");
                rec.finish(refused(Flags::UpstreamFailure));
                return req.reject(StatusCode::BAD_GATEWAY).await;
            }
            Err(_) => {
                rec.finish(refused(Flags::UpstreamFailure));
                return req.reject(StatusCode::GATEWAY_TIMEOUT).await;
            }
        };
        let _ = app.set_nodelay(true);
        let Ok(mut tunnel) = req.accept().await else {
            return rec.finish(refused(Flags::Reset));
        };
        let (flags, sent, received, cut) = self.pipe(&mut app, &mut tunnel, &admitted).await;
        tracing::debug!(peer = %admitted.peer, flags = flags.as_str(), sent, received, "inbound flow ended");
        // From the source's view: what it sent is what the app received here.
        rec.finish(End::Flow {
            flags: flags.as_str(),
            sent: received,
            received: sent,
        });
        // A flow cut here (drain deadline, policy) is reset on both sides once it is recorded.
        if cut {
            tunnel.abort();
        }
        drop((app, tunnel));
    }

    /// Pipes until both sides finish: the flags and the bytes each way. Stops early on the
    /// drain deadline or, when configured, when policy turns to deny for this peer: then the
    /// last value is true, the app connection is set to reset when it closes, and the caller
    /// aborts the tunnel once the flow is recorded.
    async fn pipe(
        &self,
        app: &mut TcpStream,
        tunnel: &mut ServerTunnel,
        admitted: &Admitted,
    ) -> (Flags, u64, u64, bool) {
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
                        Ok((to_peer, to_app)) => (Flags::Ok, to_peer, to_app, false),
                        Err(_) => (Flags::Reset, 0, 0, false),
                    },
                    _ = shared.hard_stop.cancelled() => break,
                    changed = snap_rx.changed(), if close_on_deny => {
                        if changed.is_err() || !self.still_allowed(admitted) {
                            tracing::info!(peer = %admitted.peer, "closing flow: policy now denies it");
                            break;
                        }
                    }
                }
            }
        }
        crate::l4::outbound::reset_on_close(app);
        (Flags::Reset, 0, 0, true)
    }

    fn still_allowed(&self, admitted: &Admitted) -> bool {
        let shared = &self.shared;
        let snap = shared.current();
        let services = shared.peer_services(&snap, &admitted.peer);
        let on = Target::port(admitted.target.port());
        let target = &admitted.target;
        shared.still_admits(&snap, target, Stream::Tunnel, &admitted.peer, &services, on)
    }
}
