//! The Halyard data plane: one sidecar, from its config file to the drain.
//!
//! The path of a flow through the modules (ARCHITECTURE.md draws it):
//!
//! - [`run`] checks the config, loads the identity, binds every listener, follows the registry
//!   and serves until SIGTERM, then drains.
//! - `l4` carries opaque TCP: `l4::capture` accepts the app's connections (explicit upstream
//!   ports, or transparent iptables capture), `l4::outbound` opens one HTTP/3 CONNECT tunnel per
//!   flow, `l4::inbound` admits peers' tunnels and pipes them to the local app.
//! - `l7` terminates the app's HTTP/1.1 or h2 and carries each request as HTTP/3: `l7::outbound`
//!   routes and retries per request, `l7::inbound` admits and forwards to the app.
//! - [`decide`] is every decision on that path as pure functions (no clock, no randomness, no
//!   I/O): route rule and backend, endpoint pick, capture resolution, inbound admission, access
//!   policy, outlier ejection, the retry budget and the one retry/failure policy of L4 and L7.
//! - `state` holds what the tasks share (snapshot in force, pool, balancing state) and calls
//!   into `decide` with `now` and random samples.
//! - `telemetry` turns each finished flow or request into metrics, an access-log line and a span.
//! - `identity` holds the leaf and trust bundle in force and publishes their changes;
//!   `workload_api` hands them to the local app over the SPIFFE Workload API.
//!
//! Public API: [`run`] (start a sidecar), [`config`] (its checked configuration), [`decide`] (the
//! pure decision core), [`signal`] (shutdown on SIGTERM/SIGINT), [`serve_http1`] (the small HTTP/1.1
//! server of the admin port, for tools), [`logging`] (the reloadable log filter) and [`otlp`] (the
//! span export's wire messages). `test_util` (feature `test-util`) starts meshes in tests.
#![forbid(unsafe_code)]

mod admin;
mod bounds;
pub mod ca;
pub mod config;
pub mod decide;
pub mod gateway;
mod identity;
mod l4;
mod l7;
mod links;
mod net;
mod outside;
pub mod run;
pub mod signal;
mod state;
mod telemetry;
#[cfg(feature = "test-util")]
pub mod test_util;
mod workload_api;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the data path's parsers of
/// bytes from apps and peers, without sockets.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// Runs `chunks` (reads from an app, in order) through the HTTP/1 framing guard; returns how
    /// many bytes it passed on to the HTTP server.
    pub fn framing_guard<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> usize {
        let mut guard = crate::l7::guard::FramingGuard::new(());
        let mut passed = 0;
        for chunk in chunks {
            passed = guard.feed_bytes(chunk).len();
        }
        passed
    }

    /// Runs `chunks` (reads from a Workload API client, in order) through the `:authority`
    /// rewrite; returns the bytes the HTTP/2 server would get.
    pub fn authority_rewrite<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        crate::workload_api::authority::rewrite_all(chunks)
    }

    /// Normalizes a request target (path and query) as routing, policy and forwarding see it
    /// under the default `inbound.path_parameters`; the normalized target, or why it is refused.
    pub fn normalize_target(target: &str) -> Result<String, String> {
        normalize_target_with(target, crate::config::PathParameters::default()).map(|(_, t)| t)
    }

    /// Normalizes a request target under `params`: the path routing and policy match (without
    /// path parameters) and the target forwarded, or why it is refused.
    pub fn normalize_target_with(
        target: &str,
        params: crate::config::PathParameters,
    ) -> Result<(String, String), String> {
        crate::l7::normalize::normalize(target, params)
            .map(|n| (n.path.clone(), n.target()))
            .map_err(|e| e.to_string())
    }
}

pub use net::serve_http1;
pub use telemetry::logging;

/// The OTLP/HTTP protobuf messages spans are exported as (opentelemetry-proto
/// `collector/trace/v1`), for receivers and tests that decode them.
pub mod otlp {
    pub use crate::telemetry::otlp::{
        AnyValue, ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource,
        ResourceSpans, ScopeSpans, Span, Status, Value,
    };
}
