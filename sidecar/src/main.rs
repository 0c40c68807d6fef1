//! `halyard`: parse the command line, set up logging, run the library, map errors to an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = halyard_sidecar::cli::Cli::parse();
    halyard_sidecar::cli::init_tracing(&cli);
    match halyard_sidecar::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halyard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
