//! `halyard`: parse the command line, set up logging, run the library, map errors to an exit code.
#![forbid(unsafe_code)]

use clap::Parser;
use halyard_cli::cli;

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
