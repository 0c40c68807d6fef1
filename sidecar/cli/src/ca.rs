//! `halyard ca`: create the mesh CA and issue workload identities from it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use halyard_certs::ca::write_identity;
use halyard_certs::{MeshCa, SpiffeId, TrustDomain};

/// Arguments of `halyard ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CaCommand {
    /// Create a new root: writes DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Folder for the CA files.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain, e.g. mesh.local.
        #[arg(long = "trust-domain")]
        trust_domain: String,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload identity: writes OUT/cert.pem, OUT/key.pem (0600) and OUT/bundle.pem.
    Issue {
        /// Folder of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE id, e.g. spiffe://mesh.local/ns/default/sa/reviews.
        #[arg(long)]
        id: String,
        /// Folder for the identity files.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the leaf, e.g. 24h, 90m.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
}

/// Runs `halyard ca`.
pub fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init {
            dir,
            trust_domain,
            force,
        } => init(dir, &trust_domain, force),
        CaCommand::Issue { dir, id, out, ttl } => issue(dir, &id, out, &ttl),
    }
}

fn init(dir: PathBuf, trust_domain: &str, force: bool) -> anyhow::Result<()> {
    let td = TrustDomain::new(trust_domain)
        .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
    let ca = MeshCa::create(&td)?;
    ca.write(&dir, force)?;
    println!("created CA for trust domain {td} in {}", dir.display());
    Ok(())
}

/// Parses a lifetime such as `24h` or `90m`.
pub fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let ttl = humantime::parse_duration(text)
        .with_context(|| format!("--ttl {text:?}: expected a duration such as 24h or 90m"))?;
    anyhow::ensure!(!ttl.is_zero(), "--ttl {text:?}: must be positive");
    Ok(ttl)
}

fn issue(dir: PathBuf, id: &str, out: PathBuf, ttl: &str) -> anyhow::Result<()> {
    let id = SpiffeId::parse(id).with_context(|| format!("--id {id:?}"))?;
    let ttl = parse_ttl(ttl)?;
    let ca = MeshCa::load(&dir)?;
    let leaf = ca.issue(&id, ttl).with_context(|| format!("--id {id}"))?;
    write_identity(&out, &leaf, ca.cert_pem())?;
    let ttl = humantime::format_duration(ttl);
    println!("issued {id} for {ttl} into {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_certs::ca::DEFAULT_LEAF_TTL;

    #[test]
    fn a_ttl_parses_with_its_unit() {
        assert_eq!(parse_ttl("24h").unwrap(), DEFAULT_LEAF_TTL);
        assert_eq!(parse_ttl("90m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn a_bad_ttl_is_refused_naming_the_flag() {
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").unwrap_err().to_string().contains("--ttl"));
    }
}
