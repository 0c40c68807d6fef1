//! `halyard`: parse the command line, set up logging, run the library, map errors to an exit code.
#![forbid(unsafe_code)]

mod ca;
mod cli;
mod ctl;
mod demo;
mod iptables;
mod promtext;
mod sample_app;
mod top;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli);
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halyard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
