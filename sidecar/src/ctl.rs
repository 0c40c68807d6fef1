//! `halyard ctl`: registry objects from the command line.

/// Arguments of `halyard ctl`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {}

/// Runs `halyard ctl`.
pub fn run(_args: CtlArgs) -> anyhow::Result<()> {
    anyhow::bail!("'halyard ctl' is not built yet")
}
