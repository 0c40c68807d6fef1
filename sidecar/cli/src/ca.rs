//! `halyard ca`: create the mesh CA, issue workload identities from it, make intermediates for
//! CA servers, run a CA server, and create bootstrap tokens for enrollment.

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
    /// Make an intermediate CA for one CA server, signed by the (offline) root in --root:
    /// writes OUT/ca.crt (intermediate, then root) and OUT/ca.key (0600).
    Intermediate {
        /// Folder of the root CA.
        #[arg(long)]
        root: PathBuf,
        /// Folder for the intermediate.
        #[arg(long)]
        out: PathBuf,
        /// A name for this CA server, put in the certificate's common name.
        #[arg(long, default_value = "Halyard CA server")]
        name: String,
        /// Lifetime of the intermediate.
        #[arg(long, default_value = "8784h")]
        ttl: String,
        /// Replace an existing CA in OUT.
        #[arg(long)]
        force: bool,
    },
    /// Run the CA server (TLS 1.3, default port 15012) from a config file.
    Serve {
        /// The CA server config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Bootstrap tokens for enrollment.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The trust-bundle steps of a root rotation (README: "Trust bundle and CA rotation"),
    /// written to the registry's TrustBundle (key `trust`), which every sidecar and CA server
    /// applies hot.
    Rotate {
        #[command(subcommand)]
        step: RotateStep,
        /// Registry URL (etcd://host:port,... or file:///dir).
        #[arg(long, global = true)]
        registry: Option<String>,
        /// Mesh name.
        #[arg(long, global = true, default_value = "default")]
        mesh: String,
        /// How to reach an etcd registry: user and TLS files.
        #[command(flatten)]
        access: crate::ctl::AccessArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
enum RotateStep {
    /// Step 2: trust ROOT beside the roots in force (the registry's bundle; when it has none,
    /// --current, the root the mesh's bundle files hold now).
    Add {
        /// PEM file of the new root.
        #[arg(long)]
        root: PathBuf,
        /// PEM file of the roots in force, when the registry has no TrustBundle yet.
        #[arg(long)]
        current: Option<PathBuf>,
    },
    /// Step 5: stop trusting ROOT (every leaf renewed onto the new chain first). Refused when
    /// no root would be left.
    Remove {
        /// PEM file of the root to drop.
        #[arg(long)]
        root: PathBuf,
    },
    /// The roots in force: subject, expiry, SHA-256.
    Show,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Create a token bound to one SPIFFE id and print it (or write it to --out, mode 0600).
    /// Only its SHA-256 is stored, in the registry, with its expiry and remaining uses.
    Create {
        /// The one SPIFFE id the token may enroll.
        #[arg(long)]
        id: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many enrollments it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Registry URL (etcd://host:port,... or file:///dir).
        #[arg(long)]
        registry: String,
        /// Mesh name.
        #[arg(long, default_value = "default")]
        mesh: String,
        /// Write the token to this file (0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How to reach an etcd registry: user and TLS files.
        #[command(flatten)]
        access: crate::ctl::AccessArgs,
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
        CaCommand::Intermediate {
            root,
            out,
            name,
            ttl,
            force,
        } => intermediate(&root, &out, &name, &ttl, force),
        CaCommand::Serve { config } => serve(&config),
        CaCommand::Token {
            command:
                TokenCommand::Create {
                    id,
                    ttl,
                    uses,
                    registry,
                    mesh,
                    out,
                    access,
                },
        } => {
            let access = access.read()?;
            let at = Registry {
                url: &registry,
                mesh: &mesh,
                access: &access,
            };
            token_create(&id, &ttl, uses, &at, out.as_deref())
        }
        CaCommand::Rotate {
            step,
            registry,
            mesh,
            access,
        } => {
            let registry = registry.context("--registry is required")?;
            let access = access.read()?;
            let at = Registry {
                url: &registry,
                mesh: &mesh,
                access: &access,
            };
            runtime()?.block_on(rotate(step, &at))
        }
    }
}

/// The registry a `halyard ca` command works on.
struct Registry<'a> {
    url: &'a str,
    mesh: &'a str,
    access: &'a halyard_registry::Access,
}

/// Reads the registry's TrustBundle (if any), applies `step`, writes it back.
async fn rotate(step: RotateStep, at: &Registry<'_>) -> anyhow::Result<()> {
    use halyard_certs::TrustBundle;
    use halyard_registry::model::{Kind, Object};
    let registry = at.url;
    let admin = halyard_registry::admin::Admin::connect_as(
        registry,
        at.mesh,
        Duration::from_secs(5),
        at.access,
    )
    .await
    .with_context(|| format!("--registry {registry:?}"))?;
    let stored = admin.list(Kind::TrustBundle).await?;
    let in_force = match stored.into_iter().next().map(|s| s.object) {
        Some(Ok(Object::TrustBundle(t))) => Some(TrustBundle::from_pem(&t.roots)?),
        Some(Ok(_)) | None => None,
        Some(Err(e)) => anyhow::bail!("the registry's TrustBundle is invalid ({e}); fix it first"),
    };
    let read = |p: &std::path::Path| {
        TrustBundle::load(p).with_context(|| format!("{}: not a PEM root", p.display()))
    };
    let next = match step {
        RotateStep::Show => {
            let Some(b) = in_force else {
                println!("no TrustBundle in the registry: sidecars trust their bundle files");
                return Ok(());
            };
            b.describe().iter().for_each(|l| println!("{l}"));
            return Ok(());
        }
        RotateStep::Add { root, current } => {
            let base = match (in_force, current) {
                (Some(b), _) => b,
                (None, Some(c)) => read(&c)?,
                (None, None) => anyhow::bail!(
                    "the registry has no TrustBundle yet: name the roots in force with --current"
                ),
            };
            let new = read(&root)?;
            let fresh: Vec<_> = new
                .roots()
                .iter()
                .filter(|r| !base.roots().contains(r))
                .cloned()
                .collect();
            anyhow::ensure!(!fresh.is_empty(), "{}: already trusted", root.display());
            let mut roots = base.roots().to_vec();
            roots.extend(fresh);
            TrustBundle::new(roots)?
        }
        RotateStep::Remove { root } => {
            let base = in_force.context("the registry has no TrustBundle: nothing to remove")?;
            let gone = read(&root)?;
            let kept: Vec<_> = base
                .roots()
                .iter()
                .filter(|r| !gone.roots().contains(r))
                .cloned()
                .collect();
            anyhow::ensure!(
                kept.len() < base.roots().len(),
                "{}: not in the registry's TrustBundle",
                root.display()
            );
            anyhow::ensure!(!kept.is_empty(), "refused: no root would be left");
            TrustBundle::new(kept)?
        }
    };
    let text = format!(
        "kind: TrustBundle\nroots: |\n{}",
        next.to_pem()
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    );
    let objects = halyard_registry::model::parse_documents("ca rotate", &text).map_err(|errs| {
        anyhow::anyhow!(
            "{}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    admin.apply(&objects).await?;
    println!("TrustBundle in the registry now holds:");
    next.describe().iter().for_each(|l| println!("  {l}"));
    Ok(())
}

fn intermediate(
    root: &std::path::Path,
    out: &std::path::Path,
    name: &str,
    ttl: &str,
    force: bool,
) -> anyhow::Result<()> {
    let ttl = parse_ttl(ttl)?;
    let root_ca = MeshCa::load(root)?;
    let inter = root_ca.intermediate(name, ttl)?;
    inter.write(out, force)?;
    println!(
        "created intermediate CA for {} in {}, valid until {}",
        inter.trust_domain(),
        out.display(),
        inter.not_after()
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    let config = halyard_sidecar::ca::server::CaServerConfig::load(config)?;
    let stop = tokio_util::sync::CancellationToken::new();
    runtime()?.block_on(async {
        halyard_sidecar::signal::cancel_on_signal(&stop);
        let (tx, rx) = tokio::sync::oneshot::channel::<halyard_sidecar::ca::server::StartedCa>();
        let announce = tokio::spawn(async move {
            // Scripts and tests read the bound address (listen may say port 0) from stdout.
            if let Ok(started) = rx.await {
                println!("CA listening on {}", started.addr);
            }
        });
        let result = halyard_sidecar::ca::server::serve(config, stop, Some(tx)).await;
        announce.abort();
        result
    })
}

fn token_create(
    id: &str,
    ttl: &str,
    uses: u32,
    at: &Registry<'_>,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let registry = at.url;
    use halyard_certs::enroll::{BootstrapToken, TokenRecord};
    let id = SpiffeId::parse(id).with_context(|| format!("--id {id:?}"))?;
    let ttl = parse_ttl(ttl)?;
    anyhow::ensure!(uses > 0, "--uses {uses}: must be at least 1");
    let token = BootstrapToken::generate();
    let record = TokenRecord::new(id.clone(), std::time::SystemTime::now(), ttl, uses);
    runtime()?.block_on(async {
        let store = halyard_registry::ca_store::CaStore::connect(
            registry,
            at.mesh,
            Duration::from_secs(5),
            at.access,
        )
        .await
        .with_context(|| format!("--registry {registry:?}"))?;
        store.create_token(&token.hash(), &record).await?;
        anyhow::Ok(())
    })?;
    let secret = format!("{}\n", token.secret());
    match out {
        Some(path) => {
            halyard_certs::pem::write_atomic(path, &secret, 0o600)?;
            eprintln!(
                "token for {id} ({uses} use(s), valid {}) written to {}",
                humantime::format_duration(ttl),
                path.display()
            );
        }
        None => print!("{secret}"),
    }
    Ok(())
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
