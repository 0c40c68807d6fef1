//! The command line: one binary, one subcommand per job.

use clap::{Parser, Subcommand};

use crate::{ca, ctl, demo};

/// Halyard: a service mesh on QUIC and HTTP/3.
#[derive(Debug, Parser)]
#[command(name = "halyard", version, about)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax); `HALYARD_LOG` is read when absent.
    #[arg(long, global = true)]
    pub(crate) log: Option<String>,
    /// The job to run.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Manage the mesh CA: create it, issue workload identities.
    Ca(ca::CaArgs),
    /// Read and write registry objects (services, routes, policies, ...).
    Ctl(ctl::CtlArgs),
    /// Run the whole mesh on this machine and walk through what it does.
    Demo(demo::DemoArgs),
    /// Run the data plane for one service from a config file.
    Sidecar(SidecarArgs),
    /// Run an east-west gateway: route QUIC from other clusters to this cluster's exported
    /// services without decrypting it (UDP, default port 15444).
    Gateway(GatewayArgs),
    /// Install or remove transparent-capture iptables rules in this network namespace.
    Iptables(crate::iptables::IptablesArgs),
    /// Run one of the demo's sample services (bookinfo-like HTTP/1.1 JSON server).
    SampleApp(crate::sample_app::SampleAppArgs),
}

/// Arguments of `halyard sidecar`.
#[derive(Debug, clap::Args)]
pub(crate) struct SidecarArgs {
    /// The sidecar config file (TOML).
    #[arg(long)]
    pub(crate) config: std::path::PathBuf,
}

/// Arguments of `halyard gateway`.
#[derive(Debug, clap::Args)]
pub(crate) struct GatewayArgs {
    /// The gateway config file (TOML).
    #[arg(long)]
    pub(crate) config: std::path::PathBuf,
}

/// Sets up logging to stderr, with a filter the admin server's `/logging` can change.
pub fn init_tracing(cli: &Cli) {
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("HALYARD_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    halyard_sidecar::logging::init(&filter, std::io::stderr);
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ca(args) => ca::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Sidecar(args) => run_sidecar(&args),
        Command::Gateway(args) => run_gateway(&args),
        Command::Iptables(args) => crate::iptables::cli(args),
        Command::SampleApp(args) => crate::sample_app::run(args),
    }
}

fn run_gateway(args: &GatewayArgs) -> anyhow::Result<()> {
    use halyard_sidecar::gateway::{serve, GatewayConfig, StartedGateway};
    let config = GatewayConfig::load(&args.config)?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            halyard_sidecar::signal::cancel_on_signal(&stop);
            let (tx, rx) = tokio::sync::oneshot::channel::<StartedGateway>();
            let announce = tokio::spawn(async move {
                // Scripts and tests read the bound addresses (port 0 allowed) from stdout.
                if let Ok(started) = rx.await {
                    println!("gateway listening on {}", started.addr);
                    if let Some(admin) = started.admin {
                        println!("admin listening on {admin}");
                    }
                }
            });
            let result = serve(config, stop, Some(tx)).await;
            announce.abort();
            result
        })
}

fn run_sidecar(args: &SidecarArgs) -> anyhow::Result<()> {
    // The config's `workers` chooses the runtime (ARCHITECTURE.md, "More than one core").
    halyard_sidecar::run::run(&args.config)
}
