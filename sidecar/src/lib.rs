//! The Halyard data plane and the library behind the `halyard` binary.
#![forbid(unsafe_code)]

pub mod ca_cmd;
pub mod cli;
pub mod ctl;
pub mod demo;
