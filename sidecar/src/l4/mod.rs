//! L4: opaque TCP flows, one HTTP/3 CONNECT tunnel (RFC 9114 §4.4) each.
//!
//! `capture` accepts the app's connections and finds their destination service, `outbound`
//! opens the tunnel to the endpoint `decide` picks (retrying before any byte came back), and
//! `inbound` admits a peer's tunnel and pipes it to the local app. `egress` carries captured
//! flows to destinations outside the mesh (ExternalServices, directly or through an egress
//! gateway) and serves a gateway's side.

pub(crate) mod capture;
pub(crate) mod egress;
pub(crate) mod inbound;
pub(crate) mod outbound;
