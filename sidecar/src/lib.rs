//! The Halyard data plane and the library behind the `halyard` binary.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balance;
pub mod ca_cmd;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod http;
pub mod inbound;
pub mod iptables;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod outlier;
pub mod promtext;
pub mod proxy;
pub mod run;
pub mod sample_app;
pub mod telemetry;
pub mod top;
