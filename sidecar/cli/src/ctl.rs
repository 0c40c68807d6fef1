//! `halyard ctl`: registry objects from the command line.
//!
//! Every write is validated in full before anything is written and is all or nothing (one etcd
//! Txn comparing `mod_revision`s). Bad input exits non-zero with one line naming the file,
//! document, field path and reason; an unreachable registry fails within `--timeout`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use halyard_registry::admin::{render, render_status_table, Admin, Format, Stored};
use halyard_registry::model::parse_documents;
use halyard_registry::{Key, Kind, Object};

/// Arguments of `halyard ctl`.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Registry URL: etcd://host:port[,host:port...] or file:///dir (not needed by `validate`).
    #[arg(long, global = true)]
    pub registry: Option<String>,
    /// Mesh name: keys live under /halyard/<mesh>/.
    #[arg(long, global = true, default_value = "default")]
    pub mesh: String,
    /// How long to wait for the registry before giving up.
    #[arg(long, global = true, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How to reach an etcd registry: user and TLS files.
    #[command(flatten)]
    pub access: AccessArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `halyard ctl` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Validate a file of objects (YAML or JSON, several per file) and write them all, or none.
    Apply {
        /// The file; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print objects: services, routes, policies, endpoints, status, meshconfig.
    Get {
        /// The kind.
        kind: String,
        /// One object (for endpoints: SERVICE or SERVICE/ID).
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, default_value = "yaml", value_parser = ["yaml", "json"])]
        output: String,
    },
    /// Delete one object.
    Delete {
        /// The kind.
        kind: String,
        /// The name (for endpoints: SERVICE/ID; for meshconfig: anything).
        name: String,
    },
    /// Validate a file of objects without a registry.
    Validate {
        /// The file; `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// A live table of the mesh's edges (rps, success, p50/p99, bytes/s) from sidecars' /metrics.
    Top(crate::top::TopArgs),
    /// Every sidecar's applied revision and rejected keys.
    Status {
        /// Output format: a table, or the status objects.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
    },
}

/// Runs `halyard ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(dispatch(args))
}

async fn dispatch(args: CtlArgs) -> anyhow::Result<()> {
    match &args.command {
        CtlCommand::Validate { file } => validate(file),
        CtlCommand::Apply { file } => apply(&args, file).await,
        CtlCommand::Get { kind, name, output } => get(&args, kind, name.as_deref(), output).await,
        CtlCommand::Delete { kind, name } => delete(&args, kind, name).await,
        CtlCommand::Status { output } => status(&args, output).await,
        CtlCommand::Top(top) => crate::top::run(top).await,
    }
}

/// Reads and validates a file; every problem on one line.
fn load(file: &Path) -> anyhow::Result<Vec<Object>> {
    let (name, text) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        ("<stdin>".to_owned(), s)
    } else {
        let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
        (file.display().to_string(), text)
    };
    parse_documents(&name, &text).map_err(|errs| {
        let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow!("{}", all.join("; "))
    })
}

fn validate(file: &Path) -> anyhow::Result<()> {
    let objects = load(file)?;
    println!("{}: {} objects valid", file.display(), objects.len());
    Ok(())
}

async fn connect(args: &CtlArgs) -> anyhow::Result<Admin> {
    let url = args
        .registry
        .as_deref()
        .ok_or_else(|| anyhow!("--registry URL is required (etcd://host:port or file:///dir)"))?;
    let access = args.access.read()?;
    Ok(Admin::connect_as(url, &args.mesh, args.timeout, &access).await?)
}

/// How a command reaches an etcd registry: the user (a `user:password` file, the form
/// `etcdctl --user` takes, kept off the command line so the password is not in `ps`) and, for
/// `etcds://`, the TLS files (named as `etcdctl` names them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// A file holding `user:password` of the etcd user to act as (etcd RBAC); default: the
    /// file `HALYARD_REGISTRY_CREDENTIALS` names, when it is set and not empty.
    #[arg(long, global = true)]
    pub credentials: Option<std::path::PathBuf>,
    /// The CA file of an etcds:// registry's certificate.
    #[arg(long, global = true)]
    pub cacert: Option<std::path::PathBuf>,
    /// A client certificate for an etcds:// registry that requires one (with --key).
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's key (with --cert).
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl AccessArgs {
    /// Reads the files named; errors name the file.
    pub(crate) fn read(&self) -> anyhow::Result<halyard_registry::Access> {
        let tls = self
            .cacert
            .as_ref()
            .map(|ca| halyard_sidecar::config::RegistryTlsConfig {
                ca: ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            });
        if tls.is_none() && self.cert.is_some() {
            anyhow::bail!("--cert needs --cacert (the CA of the etcds:// registry's certificate)");
        }
        let from_env = std::env::var_os("HALYARD_REGISTRY_CREDENTIALS")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from);
        let credentials = self.credentials.clone().or(from_env);
        Ok(halyard_sidecar::config::registry_access(
            credentials.as_deref(),
            tls.as_ref(),
        )?)
    }
}

async fn apply(args: &CtlArgs, file: &Path) -> anyhow::Result<()> {
    let objects = load(file)?;
    let admin = connect(args).await?;
    let rev = admin
        .apply(&objects)
        .await
        .with_context(|| format!("applying {}", file.display()))?;
    for o in &objects {
        println!("{} {} configured", o.kind(), o.key());
    }
    if rev > 0 {
        println!("applied {} objects at revision {rev}", objects.len());
    }
    Ok(())
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind).ok_or_else(|| {
        anyhow!("unknown kind {kind:?}: expected services, routes, policies, endpoints, status or meshconfig")
    })
}

/// Whether a stored object is the one `name` asks for.
fn selected(obj: &Object, name: Option<&str>) -> bool {
    let Some(name) = name else { return true };
    match obj {
        Object::Endpoint(e) => {
            name == e.service.as_str() || name == format!("{}/{}", e.service, e.id)
        }
        Object::MeshConfig(_) | Object::Revocations(_) | Object::TrustBundle(_) => true,
        other => other.key().path().rsplit('/').next() == Some(name),
    }
}

/// The valid objects of a listing; invalid ones are reported on stderr.
fn valid(stored: Vec<Stored>) -> Vec<Object> {
    stored
        .into_iter()
        .filter_map(|s| match s.object {
            Ok(o) => Some(o),
            Err(e) => {
                eprintln!("warning: invalid value skipped: {e}");
                None
            }
        })
        .collect()
}

async fn get(args: &CtlArgs, kind: &str, name: Option<&str>, output: &str) -> anyhow::Result<()> {
    let kind = parse_kind(kind)?;
    let admin = connect(args).await?;
    let objects: Vec<Object> = valid(admin.list(kind).await?)
        .into_iter()
        .filter(|o| selected(o, name))
        .collect();
    if let (Some(name), true) = (name, objects.is_empty()) {
        bail!("{kind} {name} not found in mesh {}", admin.mesh());
    }
    let format = if output == "json" {
        Format::Json
    } else {
        Format::Yaml
    };
    let single = name.is_some() && kind != Kind::Endpoint
        || matches!(
            kind,
            Kind::MeshConfig | Kind::Revocations | Kind::TrustBundle
        );
    print!("{}", render(&objects, format, single));
    Ok(())
}

async fn delete(args: &CtlArgs, kind: &str, name: &str) -> anyhow::Result<()> {
    let kind = parse_kind(kind)?;
    let key = Key::of(kind, name).ok_or_else(|| anyhow!("{name:?} is not a valid {kind} name"))?;
    let admin = connect(args).await?;
    if !admin.delete(&key).await? {
        bail!("{kind} {name} not found in mesh {}", admin.mesh());
    }
    println!("{kind} {key} deleted");
    Ok(())
}

async fn status(args: &CtlArgs, output: &str) -> anyhow::Result<()> {
    let admin = connect(args).await?;
    let objects = valid(admin.list(Kind::Status).await?);
    match output {
        "json" => print!("{}", render(&objects, Format::Json, false)),
        "yaml" => print!("{}", render(&objects, Format::Yaml, false)),
        _ => {
            let statuses: Vec<_> = objects
                .into_iter()
                .filter_map(|o| match o {
                    Object::Status(s) => Some(s),
                    _ => None,
                })
                .collect();
            print!("{}", render_status_table(&statuses));
        }
    }
    Ok(())
}
