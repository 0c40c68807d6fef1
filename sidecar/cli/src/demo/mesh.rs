//! The demo mesh: an offline root, a CA server (`halyard ca serve`) on its own intermediate, the
//! registry, and per workload a sample app and a sidecar as separate processes on loopback, on
//! ports picked at runtime. Each sidecar makes its own key and enrolls with a one-use bootstrap
//! token, as in deploy/: no workload key is made anywhere else.
//!
//! Layout (bookinfo): `ingress` (a sidecar without app, where the load generator enters) →
//! productpage → details, reviews (v1, v2, v3); reviews v2 and v3 → ratings. Every reviews
//! sidecar is reached through a [`Link`] (its advertised address), which the lossy-link step
//! degrades.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use halyard_certs::enroll::{BootstrapToken, TokenRecord};
use halyard_certs::{MeshCa, SpiffeId, TrustDomain};
use halyard_registry::admin::Admin;
use halyard_registry::ca_store::CaStore;
use halyard_registry::model::parse_documents;
use halyard_registry::ports::{self, Proto};
use halyard_registry::Key;

use super::child::Children;
use super::link::Link;
use crate::sample_app;

/// One workload: name, service, version, the services it calls.
type Spec = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// The sample application. The first entry has no app: it is where traffic enters.
const LAYOUT: &[Spec] = &[
    ("ingress", "ingress", "v1", &["productpage"]),
    ("productpage", "productpage", "v1", &["details", "reviews"]),
    ("details", "details", "v1", &[]),
    ("reviews-v1", "reviews", "v1", &[]),
    ("reviews-v2", "reviews", "v2", &["ratings"]),
    ("reviews-v3", "reviews", "v3", &["ratings"]),
    ("ratings", "ratings", "v1", &[]),
];

/// Service ports in the registry (one per service, as in deploy/).
const SERVICES: &[(&str, u16)] = &[
    ("productpage", 9080),
    ("details", 9081),
    ("reviews", 9082),
    ("ratings", 9083),
];

/// The workload whose sidecar has no app behind it.
pub const INGRESS: &str = "ingress";

/// One running workload.
#[derive(Debug)]
pub struct Workload {
    /// Unique name (also the sidecar's registry id).
    pub name: &'static str,
    /// Service.
    pub service: &'static str,
    /// Version label.
    pub version: &'static str,
    /// The app's HTTP address (none for the ingress).
    pub app: Option<SocketAddr>,
    /// The sidecar's admin listener.
    pub admin: SocketAddr,
    /// The sidecar's upstream listeners, by service.
    pub upstreams: Vec<(&'static str, SocketAddr)>,
    /// The simulated link in front of this sidecar, if any.
    pub link: Option<Link>,
    /// Killed by the story.
    pub killed: bool,
}

/// What the demo was asked to build.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// `etcd://...`, or none for a directory registry in the work dir.
    pub registry: Option<String>,
    /// Mesh name.
    pub mesh: String,
    /// Trust domain.
    pub trust_domain: String,
    /// Service port protocol: `http` or `tcp`.
    pub protocol: String,
    /// 2: a second cluster, B, with its own registry, a ratings instance and an east-west
    /// gateway, linked from this one.
    pub clusters: u8,
}

/// The second cluster of `--clusters 2`.
#[derive(Debug)]
pub struct ClusterB {
    /// Its registry (a directory beside the first one's).
    pub registry: String,
    /// Its east-west gateway's UDP address.
    pub gateway: SocketAddr,
    /// The gateway's admin listener.
    pub gateway_admin: SocketAddr,
}

/// The running mesh.
pub struct Mesh {
    /// Work dir (identities, configs, registry, logs).
    pub dir: PathBuf,
    /// Registry URL.
    pub registry: String,
    /// Registry writes go through the same admin API as `halyard ctl`.
    pub admin: Admin,
    /// Every workload.
    pub workloads: Vec<Workload>,
    /// The child processes.
    pub children: Children,
    /// The CA server's address.
    pub ca: SocketAddr,
    /// The second cluster, with `--clusters 2`.
    pub cluster_b: Option<ClusterB>,
}

/// Leaf lifetime the sidecars ask the demo's CA for, as in deploy/.
const LEAF_TTL: &str = "24h";
/// The CA server's intermediate lives this long.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a sidecar needs to enroll: the CA's address, its token file, its id, the root.
struct Enrollment {
    ca: SocketAddr,
    /// `<dir>/id/<workload>`: the token now; the sidecar writes its leaf, key and bundle here.
    folder: PathBuf,
    id: SpiffeId,
}

impl Mesh {
    /// Builds and starts everything, and waits until every sidecar is ready.
    pub async fn start(opts: &MeshOptions, dir: &Path) -> anyhow::Result<Mesh> {
        let registry = prepare_registry(opts, dir)?;
        let admin = Admin::connect(&registry, &opts.mesh, Duration::from_secs(3))
            .await
            .with_context(|| format!("registry {registry}"))?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut children = Children::new(&logs);
        let (root, ca) = start_ca(opts, dir, &registry, &mut children).await?;
        let mut mesh = Mesh {
            dir: dir.to_owned(),
            registry,
            admin,
            workloads: Vec::new(),
            children,
            ca,
            cluster_b: None,
        };
        let targets = pick_target_ports()?;
        mesh.bootstrap_registry(opts, &targets).await?;
        let store = CaStore::connect(
            &mesh.registry,
            &opts.mesh,
            Duration::from_secs(3),
            &halyard_registry::Access::default(),
        )
        .await?;
        for (i, spec) in LAYOUT.iter().enumerate() {
            let enrollment = mesh.token_for(&store, &root, spec.0, spec.1).await?;
            let w = mesh.launch(opts, spec, i, &enrollment, &targets).await?;
            mesh.workloads.push(w);
        }
        if opts.clusters > 1 {
            mesh.start_cluster_b(opts, &store, &root, &targets).await?;
        }
        mesh.wait_ready(Duration::from_secs(30)).await?;
        Ok(mesh)
    }

    /// Cluster B: its own directory registry holding an exported ratings Service, one ratings
    /// workload whose sidecar takes datagrams from B's gateway, the gateway, and in this
    /// cluster a ClusterLink to B. Both clusters trust the one root (the demo's CA server
    /// enrolls B's sidecar too).
    async fn start_cluster_b(
        &mut self,
        opts: &MeshOptions,
        store: &CaStore,
        root: &MeshCa,
        targets: &BTreeMap<&str, u16>,
    ) -> anyhow::Result<()> {
        let dir = self.dir.join("registry-b");
        std::fs::create_dir_all(dir.join(&opts.mesh))?;
        let registry = format!("file://{}", dir.display());
        let admin = Admin::connect(&registry, &opts.mesh, Duration::from_secs(3)).await?;
        let target = targets.get("ratings").copied().unwrap_or(9083);
        let yaml = format!(
            "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: {}\n---\n\
             kind: Service\nname: ratings\nexported: true\nports:\n  - {{ name: http, port: 9083, protocol: {}, targetPort: {target} }}\n",
            opts.trust_domain, opts.protocol
        );
        let objects = parse_documents("cluster-b", &yaml).map_err(|errs| {
            anyhow::anyhow!(
                "{}",
                errs.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        admin.apply(&objects).await?;
        let spec: Spec = ("ratings-b", "ratings", "v1", &[]);
        let enrollment = self.token_for(store, root, spec.0, spec.1).await?;
        let index = self.workloads.len();
        let w = self
            .launch_in(opts, &spec, index, &enrollment, targets, Some(&registry))
            .await?;
        self.workloads.push(w);
        let gateway = free_udp()?;
        let gateway_admin = free_tcp()?;
        let config = self.dir.join("config").join("gateway-b.toml");
        std::fs::write(
            &config,
            format!(
                "registry = {registry:?}\nmesh = {:?}\nlisten = \"{gateway}\"\nadmin = \"{gateway_admin}\"\n",
                opts.mesh
            ),
        )?;
        self.children.spawn(
            "gateway-b",
            &[
                "gateway".into(),
                "--config".into(),
                config.display().to_string(),
            ],
        )?;
        self.apply(
            "link-b",
            &format!(
                "kind: ClusterLink\ncluster: b\nregistry: {registry:?}\nmesh: {}\ngateway: \"{gateway}\"\nkeepStale: 1m\n",
                opts.mesh
            ),
        )
        .await?;
        self.cluster_b = Some(ClusterB {
            registry,
            gateway,
            gateway_admin,
        });
        Ok(())
    }

    /// Writes registry objects from YAML, as `halyard ctl apply -f` does.
    pub async fn apply(&self, origin: &str, yaml: &str) -> anyhow::Result<()> {
        let objects = parse_documents(origin, yaml).map_err(|errs| {
            let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("{}", all.join("; "))
        })?;
        self.admin.apply(&objects).await?;
        Ok(())
    }

    /// Deletes one object, as `halyard ctl delete` does.
    pub async fn delete(&self, key: Key) -> anyhow::Result<()> {
        self.admin.delete(&key).await?;
        Ok(())
    }

    async fn bootstrap_registry(
        &self,
        opts: &MeshOptions,
        targets: &BTreeMap<&str, u16>,
    ) -> anyhow::Result<()> {
        // A previous run against the same etcd may have left a policy behind.
        for (svc, _) in SERVICES {
            self.delete(Key::Policy((*svc).to_owned())).await?;
            self.delete(Key::Route((*svc).to_owned())).await?;
        }
        self.apply("bootstrap", &bootstrap_yaml(opts, targets))
            .await
    }

    async fn launch(
        &mut self,
        opts: &MeshOptions,
        spec: &Spec,
        index: usize,
        enrollment: &Enrollment,
        targets: &BTreeMap<&str, u16>,
    ) -> anyhow::Result<Workload> {
        self.launch_in(opts, spec, index, enrollment, targets, None)
            .await
    }

    /// [`Mesh::launch`] on `registry` (another cluster's) when given.
    async fn launch_in(
        &mut self,
        opts: &MeshOptions,
        spec: &Spec,
        index: usize,
        enrollment: &Enrollment,
        targets: &BTreeMap<&str, u16>,
        registry: Option<&str>,
    ) -> anyhow::Result<Workload> {
        let (name, service, version, calls) = *spec;
        let app_ip = Ipv4Addr::new(127, 0, 2, 10 + index as u8);
        let inbound = free_udp()?;
        let link = if service == "reviews" {
            Some(Link::start(inbound, 0x5eed + index as u64).await?)
        } else {
            None
        };
        let mut w = Workload {
            name,
            service,
            version,
            app: targets.get(service).map(|p| SocketAddr::from((app_ip, *p))),
            admin: free_tcp()?,
            upstreams: Vec::new(),
            link,
            killed: false,
        };
        for c in calls {
            w.upstreams.push((c, free_tcp()?));
        }
        let config = self.write_config(opts, &w, inbound, app_ip, enrollment, registry)?;
        if let Some(app) = w.app {
            self.children
                .spawn(&format!("{name}-app"), &app_args(&w, app))?;
        }
        let config = config.display().to_string();
        self.children.spawn(
            &format!("{name}-sidecar"),
            &["sidecar".into(), "--config".into(), config],
        )?;
        Ok(w)
    }

    fn write_config(
        &self,
        opts: &MeshOptions,
        w: &Workload,
        inbound: SocketAddr,
        app_ip: Ipv4Addr,
        enrollment: &Enrollment,
        registry: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let advertise = w.link.as_ref().map_or(inbound, Link::addr);
        let mut t = format!(
            "mesh = {mesh:?}\nregistry = {reg:?}\nstate_dir = {state:?}\nid = {name:?}\nlease_ttl = \"4s\"\n\
             [identity]\ncert = {cert:?}\nkey = {key:?}\nbundle = {bundle:?}\n\
             ca = \"{ca}\"\ntoken = {token:?}\nid = \"{id}\"\nleaf_ttl = {ttl:?}\n\
             [service]\nname = {svc:?}\nversion = {ver:?}\n\
             [inbound]\nlisten = \"{inbound}\"\nadvertise = \"{advertise}\"\napp_host = \"{app_ip}\"\n\
             [admin]\nlisten = \"{admin}\"\n\
             [failure]\nconnect_timeout = \"500ms\"\nretries = 2\ndrain_timeout = \"1s\"\n\
             [outlier]\nconsecutive_failures = 2\nbase_ejection = \"5s\"\n",
            mesh = opts.mesh,
            reg = registry.unwrap_or(&self.registry),
            state = self.dir.join("state").join(w.name),
            name = w.name,
            cert = enrollment.folder.join("cert.pem"),
            key = enrollment.folder.join("key.pem"),
            bundle = enrollment.folder.join("bundle.pem"),
            ca = enrollment.ca,
            token = enrollment.folder.join("token"),
            id = enrollment.id,
            ttl = LEAF_TTL,
            svc = w.service,
            ver = w.version,
            admin = w.admin,
        );
        if registry.is_some() {
            // Behind its cluster's east-west gateway (on loopback in the demo).
            t += "[transport]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n";
        }
        for (svc, listen) in &w.upstreams {
            let port = service_port(svc)?;
            t += &format!(
                "[[outbound.upstreams]]\nservice = {svc:?}\nport = {port}\nlisten = \"{listen}\"\n"
            );
        }
        let path = self.dir.join("config").join(format!("{}.toml", w.name));
        std::fs::create_dir_all(self.dir.join("config"))?;
        std::fs::write(&path, t).with_context(|| path.display().to_string())?;
        Ok(path)
    }

    /// Waits until every sidecar answers `/readyz` with 200 and every app accepts connections.
    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let targets: Vec<_> = self
            .workloads
            .iter()
            .map(|w| (w.name, w.admin, w.app))
            .collect();
        for (name, admin, app) in targets {
            let url: http::Uri = format!("http://{admin}/readyz").parse()?;
            loop {
                self.check_children()?;
                let ready = matches!(
                    sample_app::get(&url, &http::HeaderMap::new(), Duration::from_secs(1)).await,
                    Ok((s, _)) if s.is_success()
                );
                let app_up = match app {
                    Some(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
                    None => true,
                };
                if ready && app_up {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} not ready after {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Fails if a child that was not killed on purpose has exited, quoting its log.
    pub fn check_children(&mut self) -> anyhow::Result<()> {
        let killed: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| w.killed)
            .flat_map(|w| [format!("{}-app", w.name), format!("{}-sidecar", w.name)])
            .collect();
        if let Some(dead) = self
            .children
            .exited()
            .into_iter()
            .find(|n| !killed.contains(n))
        {
            let log = self.dir.join("logs").join(format!("{dead}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            bail!(
                "{dead} exited unexpectedly ({}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// The workload called `name`.
    pub fn workload(&self, name: &str) -> anyhow::Result<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .with_context(|| format!("no workload {name}"))
    }

    /// Where the load generator sends pages: the ingress sidecar's upstream to productpage.
    pub fn entry_url(&self) -> anyhow::Result<http::Uri> {
        let ingress = self.workload(INGRESS)?;
        let (_, addr) = ingress.upstreams.first().context("ingress upstream")?;
        Ok(format!("http://{addr}/productpage").parse()?)
    }

    /// SIGKILLs a workload's app and sidecar, as a crash would.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        self.children.kill(&format!("{name}-sidecar"))?;
        self.children.kill(&format!("{name}-app"))?;
        if let Some(w) = self.workloads.iter_mut().find(|w| w.name == name) {
            w.killed = true;
        }
        Ok(())
    }

    /// Sets the loss of every reviews link.
    pub fn set_reviews_loss(&self, share: f64) {
        for l in self.workloads.iter().filter_map(|w| w.link.as_ref()) {
            l.set_loss(share);
        }
    }

    /// Packets dropped by the links so far.
    pub fn link_drops(&self) -> u64 {
        self.workloads
            .iter()
            .filter_map(|w| w.link.as_ref())
            .map(|l| l.counts().1)
            .sum()
    }
}

fn app_args(w: &Workload, listen: SocketAddr) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "sample-app".into(),
        "--service".into(),
        w.service.into(),
        "--version".into(),
        w.version.into(),
        "--listen".into(),
        listen.to_string(),
    ];
    for (svc, addr) in &w.upstreams {
        args.push("--call".into());
        args.push(format!("{svc}=http://{addr}/{svc}"));
    }
    args
}

fn service_port(service: &str) -> anyhow::Result<u16> {
    SERVICES
        .iter()
        .find(|(s, _)| *s == service)
        .map(|(_, p)| *p)
        .with_context(|| format!("unknown service {service}"))
}

fn prepare_registry(opts: &MeshOptions, dir: &Path) -> anyhow::Result<String> {
    if let Some(url) = &opts.registry {
        return Ok(url.clone());
    }
    let reg = dir.join("registry");
    std::fs::create_dir_all(reg.join(&opts.mesh))?;
    Ok(format!("file://{}", reg.display()))
}

/// The offline root (`<dir>/root`), the CA server's intermediate (`<dir>/ca1`) and the CA
/// server itself (`halyard ca serve`, a child like the sidecars), reachable when this returns.
async fn start_ca(
    opts: &MeshOptions,
    dir: &Path,
    registry: &str,
    children: &mut Children,
) -> anyhow::Result<(MeshCa, SocketAddr)> {
    let td = TrustDomain::new(&opts.trust_domain).context("--trust-domain")?;
    let root = MeshCa::create(&td)?;
    root.write(&dir.join("root"), false)?;
    root.intermediate("ca1", INTERMEDIATE_TTL)?
        .write(&dir.join("ca1"), false)?;
    let addr = free_tcp()?;
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\ndir = \"ca1\"\nregistry = {registry:?}\nmesh = {mesh:?}\n\
             leaf_ttl = {LEAF_TTL:?}\nmax_leaf_ttl = {LEAF_TTL:?}\n",
            mesh = opts.mesh
        ),
    )
    .with_context(|| config.display().to_string())?;
    children.spawn(
        "ca",
        &[
            "ca".into(),
            "serve".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(dead) = children.exited().first() {
            bail!(
                "{dead} exited: see {}",
                dir.join("logs").join("ca.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("the CA server did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((root, addr))
}

impl Mesh {
    /// A one-use token bound to the workload's service id, in `<dir>/id/<name>/token` (0600),
    /// beside the root that authenticates the CA; the token's hash goes to the registry.
    async fn token_for(
        &self,
        store: &CaStore,
        root: &MeshCa,
        name: &str,
        service: &str,
    ) -> anyhow::Result<Enrollment> {
        let id = SpiffeId::workload(root.trust_domain(), "default", service)?;
        let token = BootstrapToken::generate();
        let record = TokenRecord::new(id.clone(), SystemTime::now(), Duration::from_secs(600), 1);
        store.create_token(&token.hash(), &record).await?;
        let folder = self.dir.join("id").join(name);
        std::fs::create_dir_all(&folder)?;
        halyard_certs::pem::write_atomic(
            &folder.join("token"),
            &format!("{}\n", token.secret()),
            0o600,
        )?;
        halyard_certs::pem::write_atomic(&folder.join("bundle.pem"), &root.root_pem(), 0o644)?;
        Ok(Enrollment {
            ca: self.ca,
            folder,
            id,
        })
    }
}

/// Each service's app port (its Service `targetPort`), free on loopback now.
fn pick_target_ports() -> anyhow::Result<BTreeMap<&'static str, u16>> {
    SERVICES
        .iter()
        .map(|(s, _)| Ok((*s, free_tcp()?.port())))
        .collect()
}

/// A TCP port for a child to listen on (see [`ports`]).
fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(ports::free(Proto::Tcp)?)
}

/// A UDP port for a child to listen on (see [`ports`]).
fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(ports::free(Proto::Udp)?)
}

fn bootstrap_yaml(opts: &MeshOptions, targets: &BTreeMap<&str, u16>) -> String {
    let mut y = format!(
        "kind: MeshConfig\ndefaultPolicy: allow\ntrustDomain: {}\n",
        opts.trust_domain
    );
    for (svc, port) in SERVICES {
        let target = targets.get(svc).copied().unwrap_or(*port);
        y += &format!(
            "---\nkind: Service\nname: {svc}\nports:\n  - {{ name: http, port: {port}, protocol: {}, targetPort: {target} }}\n",
            opts.protocol
        );
    }
    y + "---\n" + &super::story::route_all_v1()
}
