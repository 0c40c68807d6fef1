//! The `halyard` command line and the operator tools around the data plane: `ca` (the mesh CA),
//! `ctl` (registry objects, and `ctl top`), `iptables` (transparent capture rules), `demo` and
//! `sample-app`. `main.rs` only parses the command line, sets up logging and maps errors to an
//! exit code; `halyard sidecar` runs `halyard_sidecar::run`.
//!
//! Public API: [`cli`] (the command line: [`cli::Cli`], [`cli::run`], [`cli::init_tracing`]) and
//! [`promtext`] (the Prometheus text parser `top` and the demo read `/metrics` with).
#![forbid(unsafe_code)]

mod ca;
pub mod cli;
mod ctl;
mod demo;
mod iptables;
pub mod promtext;
mod sample_app;
mod top;
