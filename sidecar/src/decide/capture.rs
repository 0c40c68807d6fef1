//! Capture resolution: which Service port a transparently captured connection meant, from its
//! original destination (SO_ORIGINAL_DST): the Service whose `vip` it is, else the one Service
//! that uses the port (DESIGN §2).

use std::net::SocketAddr;

use halyard_registry::Snapshot;

/// Where a captured connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Service name (for an ExternalService, its name).
    pub service: String,
    /// Service port.
    pub port: u16,
    /// For an `http` ExternalService that goes `via: egress`: the gateway to send it through.
    pub egress: Option<EgressVia>,
}

/// An L7 request to an ExternalService, carried through an egress gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressVia {
    /// The mesh Service of the egress gateway (whose endpoints are picked).
    pub gateway: String,
    /// The external host named in the request's `:authority` (`host:port`).
    pub host: String,
}

impl Destination {
    /// A mesh service port.
    pub fn service(service: &str, port: u16) -> Self {
        Destination {
            service: service.to_owned(),
            port,
            egress: None,
        }
    }

    /// The service whose endpoints carry the request: the gateway's for egress.
    pub fn carrier(&self) -> &str {
        self.egress.as_ref().map_or(&self.service, |e| &e.gateway)
    }

    /// The `host` of the request's `:authority`.
    pub fn authority_host(&self) -> &str {
        self.egress.as_ref().map_or(&self.service, |e| &e.host)
    }
}

/// Why a captured destination maps to no service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// The app connected to the capture listener itself (a loop).
    #[error("{0} is the capture port itself")]
    CapturePort(SocketAddr),
    /// The address is a Service's vip, but the Service lacks the port.
    #[error("service {service} has no port {port}")]
    NoSuchPort {
        /// The Service of the vip.
        service: String,
        /// The port dialled.
        port: u16,
    },
    /// No vip matched and several Services use the port.
    #[error("{0}: several services use port {port}; give them a vip", port = .0.port())]
    Ambiguous(SocketAddr),
    /// No vip matched and no Service uses the port.
    #[error("{0} is no known service")]
    Unknown(SocketAddr),
}

/// The Service port `dest` stands for; `own` is the capture listener's address.
pub fn resolve(
    snap: &Snapshot,
    dest: SocketAddr,
    own: Option<SocketAddr>,
) -> Result<Destination, CaptureError> {
    if Some(dest) == own {
        return Err(CaptureError::CapturePort(dest));
    }
    let port = dest.port();
    if let Some(svc) = snap.service_by_vip(dest.ip()) {
        return match svc.port(port) {
            Some(_) => Ok(Destination::service(svc.name.as_str(), port)),
            None => Err(CaptureError::NoSuchPort {
                service: svc.name.to_string(),
                port,
            }),
        };
    }
    let mut by_port = snap.services_by_port(port);
    match (by_port.next(), by_port.next()) {
        (Some(svc), None) => Ok(Destination::service(svc.name.as_str(), port)),
        (Some(_), Some(_)) => Err(CaptureError::Ambiguous(dest)),
        (None, _) => Err(CaptureError::Unknown(dest)),
    }
}
