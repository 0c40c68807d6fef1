//! The sidecar's lifecycle: check the config, load the identity, bind every listener, open the
//! registry, register, serve, and on SIGTERM drain: deregister, stop accepting, let open flows
//! finish up to the deadline, then close them and exit 0.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use halyard_certs::{CertResolver, TrustBundle, WorkloadIdentity};
use halyard_registry::model::{Endpoint, Name};
use halyard_registry::{Options, Registration, Registry};
use halyard_transport::{MeshEndpoint, Pool};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin, Readiness};
use crate::config::Config;
use crate::identity::InForce;
use crate::l4::inbound::Inbound;
use crate::l4::outbound::Destination;
use crate::l7::inbound::AppClients;
use crate::state::Shared;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Sinks;

/// How long finished flows' last bytes get to be acknowledged before connections close.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

/// Listeners bound before anything is served, so a bind conflict fails the start cleanly.
struct Bound {
    endpoint: MeshEndpoint,
    upstreams: Vec<(TcpListener, Destination)>,
    transparent: Option<TcpListener>,
}

/// Connections the kernel completes and queues per app-facing listener before the sidecar
/// accepts them (the `listen(2)` backlog; capped by `net.core.somaxconn`). Envoy's default
/// `tcp_backlog_size`; std's and tokio's 128 overflows in a burst of new app connections, or
/// while the process is out of file descriptors, and the app's connect then waits out SYN
/// retransmissions.
pub const LISTEN_BACKLOG: u32 = 1024;

fn bind_tcp(addr: std::net::SocketAddr, field: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std and tokio do for a listener: a restarted sidecar rebinds at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().with_context(|| format!("{field} = {addr}: cannot listen"))
}

async fn bind_all(
    config: &Config,
    resolver: Arc<CertResolver>,
    bundle: Arc<TrustBundle>,
) -> anyhow::Result<Bound> {
    let file = &config.file;
    let endpoint = MeshEndpoint::new_advertised(
        resolver,
        bundle,
        config.transport.clone(),
        file.inbound.listen,
        file.inbound.advertise,
        config.quic_lb.clone(),
        &reset_key(config),
    )
    .with_context(|| format!("inbound.listen = {}: cannot listen", file.inbound.listen))?;
    let mut upstreams = Vec::new();
    for (i, up) in file.outbound.upstreams.iter().enumerate() {
        let l = bind_tcp(up.listen, &format!("outbound.upstreams[{i}].listen"))?;
        upstreams.push((l, Destination::service(&up.service, up.port)));
    }
    let transparent = match &file.outbound.transparent {
        Some(t) => Some(bind_tcp(t.listen, "outbound.transparent.listen")?),
        None => None,
    };
    Ok(Bound {
        endpoint,
        upstreams,
        transparent,
    })
}

/// The file under `state_dir` that keeps the key of the sidecar's QUIC stateless resets.
pub const RESET_KEY_FILE: &str = "quic-reset-key";

/// The key of this sidecar's stateless reset tokens: kept in `<state_dir>/quic-reset-key`
/// (made on the first start), so that after a restart at the same address the callers still
/// holding a connection to the previous process recognise its resets and reconnect at once
/// (`halyard_transport::ResetKey`). Without `state_dir`, or when the file cannot be read or
/// made (warned, naming it, as a snapshot that cannot be persisted is), one for this process
/// only: callers then hold their connection to a killed predecessor until their idle timeout.
fn reset_key(config: &Config) -> halyard_transport::ResetKey {
    let Some(dir) = &config.file.state_dir else {
        return halyard_transport::ResetKey::random();
    };
    halyard_transport::ResetKey::load_or_create(&dir.join(RESET_KEY_FILE)).unwrap_or_else(|e| {
        tracing::warn!(
            error = %e,
            "cannot keep the QUIC stateless reset key under state_dir: using one for this \
             process only (after a restart here, peers reconnect only at their idle timeout)"
        );
        halyard_transport::ResetKey::random()
    })
}

/// The sidecar's id: configured, else `<service>-<advertised port>`.
fn sidecar_id(config: &Config, advertise: std::net::SocketAddr) -> String {
    config
        .file
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", config.service, advertise.port()))
}

fn endpoint_record(
    config: &Config,
    id: &str,
    advertise: std::net::SocketAddr,
    identity: &WorkloadIdentity,
) -> anyhow::Result<Endpoint> {
    let svc = &config.file.service;
    let mut labels = svc.labels.clone();
    if let Some(v) = &svc.version {
        labels.insert("version".into(), v.clone());
    }
    Ok(Endpoint {
        id: id.to_owned(),
        service: Name::new(&svc.name)?,
        address: advertise,
        identity: identity.id().clone(),
        labels,
        cluster: svc.cluster.clone(),
        zone: svc.zone.clone(),
        weight: svc.weight,
        gateway: None,
    })
}

/// Runs a sidecar from a config file until SIGTERM or SIGINT, on the runtime its `workers`
/// setting asks for: one current-thread runtime for 1, a multi-thread runtime of N workers
/// otherwise (ARCHITECTURE.md, "More than one core"). Errors: the config's, a runtime that
/// cannot start, and whatever stops [`run_until`].
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(config_path)?);
    let rt = runtime(config.worker_threads()).with_context(|| {
        format!(
            "workers = {}: cannot start the runtime",
            config.file.workers
        )
    })?;
    rt.block_on(async move {
        let stop = CancellationToken::new();
        crate::signal::cancel_on_signal(&stop);
        run_until(config, stop, None).await
    })
}

/// The data-plane runtime for `threads` worker threads (1: current-thread).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("halyard-worker")
            .enable_all()
            .build()
    }
}

/// Addresses a started sidecar bound, reported to tests and the demo.
#[derive(Debug, Clone)]
pub struct Started {
    /// Inbound QUIC.
    pub inbound: std::net::SocketAddr,
    /// Explicit upstream listeners, in config order.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Transparent capture listener.
    pub transparent: Option<std::net::SocketAddr>,
    /// Admin listener.
    pub admin: std::net::SocketAddr,
    /// The sidecar's id in the registry.
    pub id: String,
    /// The registry snapshots the sidecar applies.
    pub snapshot: tokio::sync::watch::Receiver<Arc<halyard_registry::Snapshot>>,
    metrics: Metrics,
    /// The workload identity in use; it changes when the certificate files are renewed.
    pub identity: Arc<CertResolver>,
    /// Counts certificate reloads.
    pub reloads: tokio::sync::watch::Receiver<u64>,
    /// The QUIC endpoint (tests move it to another socket: a client changing address).
    pub endpoint: halyard_transport::MeshEndpoint,
    pool: Pool,
}

impl Started {
    /// The sidecar's metrics in Prometheus text format, as `/metrics` serves them.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// How many flows and requests have finished (and been recorded) so far; changes with each.
    pub fn finished_flows(&self) -> tokio::sync::watch::Receiver<u64> {
        self.metrics.finished()
    }

    /// QUIC statistics of the connections this sidecar opened to its peers, one entry per
    /// peer (see [`Pool::stats`]).
    pub fn peer_stats(&self) -> Vec<halyard_transport::PeerStats> {
        self.pool.stats()
    }
}

/// Runs a sidecar until `stop` is cancelled, then drains. `started` receives the bound
/// addresses once everything listens.
pub async fn run_until(
    config: Arc<Config>,
    stop: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<Started>>,
) -> anyhow::Result<()> {
    let readiness = Arc::new(Readiness::default());
    let waiting_identity = readiness.block("identity");
    let waiting_listeners = readiness.block("listeners");
    let waiting_snapshot = readiness.block("registry snapshot");
    let file = &config.file;
    let listeners = CancellationToken::new();
    let sinks_stop = CancellationToken::new();
    // On an early error return, the admin server and the sinks end with this function.
    let _stop_guards = (
        listeners.clone().drop_guard(),
        sinks_stop.clone().drop_guard(),
    );
    let tasks = tokio_util::task::TaskTracker::new();
    let metrics = Metrics::new().context("metrics")?;
    let admin_listener = bind_tcp(file.admin.listen, "admin.listen")?;
    let admin_addr = admin_listener.local_addr()?;
    let admin = Arc::new(Admin::new(metrics.clone(), readiness.clone()));
    tasks.spawn(admin::serve(
        admin.clone(),
        admin_listener,
        listeners.clone(),
        file.limits.header_read_timeout.get(),
    ));
    let Some((identity, enroller)) =
        crate::ca::renew::startup_identity(&file.identity, &stop).await?
    else {
        return Ok(());
    };
    let deny = Arc::new(halyard_certs::revocation::DenyList::default());
    let bundle = Arc::new(
        TrustBundle::load(&file.identity.bundle)
            .context("identity.bundle")?
            .with_deny_list(deny.clone()),
    );
    let resolver = CertResolver::new(identity.clone());
    drop(waiting_identity);
    let bound = bind_all(&config, resolver.clone(), bundle.clone()).await?;
    let in_force = InForce::new(resolver.clone(), bound.endpoint.clone(), bundle);
    let workload_api = match &file.workload_api {
        Some(api) => Some(crate::workload_api::bind(api)?),
        None => None,
    };
    let inbound_addr = bound.endpoint.local_addr()?;
    let advertise = file.inbound.advertise.unwrap_or(inbound_addr);
    let id = sidecar_id(&config, advertise);

    let mut opts = Options::new(&file.mesh);
    opts.state_dir = file.state_dir.clone();
    opts.sidecar_id = Some(id.clone());
    opts.lease_ttl = file.lease_ttl;
    opts.access = crate::config::registry_access(
        file.registry_credentials.as_deref(),
        file.registry_tls.as_ref(),
    )
    .context("registry_credentials / registry_tls")?;
    let registry = halyard_registry::open_with(&file.registry, opts)
        .await
        .with_context(|| format!("registry = {:?}", file.registry))?;
    let sinks = Sinks::start(file, identity.id().as_str(), &metrics, &tasks, &sinks_stop);
    // The data plane sees this cluster's snapshot plus the endpoints of linked clusters.
    let snapshots = crate::links::follow(
        registry.watch(),
        file.state_dir.clone(),
        file.link_credentials.clone(),
        metrics.clone(),
        listeners.clone(),
        &tasks,
    );
    let shared = Shared::new(
        config.clone(),
        snapshots,
        Pool::new(bound.endpoint.clone()),
        metrics.clone(),
        sinks,
        id.clone(),
    );
    admin.attach(shared.clone());

    let info = Started {
        endpoint: bound.endpoint.clone(),
        inbound: inbound_addr,
        upstreams: bound
            .upstreams
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect(),
        transparent: bound.transparent.as_ref().and_then(|l| l.local_addr().ok()),
        admin: admin_addr,
        id: id.clone(),
        snapshot: shared.snapshot.clone(),
        metrics: shared.metrics.clone(),
        identity: resolver.clone(),
        reloads: in_force.reloads(),
        pool: shared.pool.clone(),
    };
    spawn_listeners(&tasks, &shared, bound, &listeners);
    drop(waiting_listeners);
    tasks.spawn(watch_snapshot(
        shared.clone(),
        waiting_snapshot,
        listeners.clone(),
    ));
    tasks.spawn(index_snapshots(shared.clone(), listeners.clone()));
    tasks.spawn(refresh(
        shared.clone(),
        registry.clone(),
        resolver.clone(),
        listeners.clone(),
    ));
    let pool = shared.pool.clone();
    tasks.spawn(crate::ca::revoke::follow(
        shared.snapshot.clone(),
        deny.clone(),
        move |revoked| pool.close_refused(|id, serial| revoked.refuses(id, serial)),
    ));
    if let Some(socket) = workload_api {
        tasks.spawn(crate::workload_api::serve(
            socket,
            in_force.watch(),
            shared.metrics.clone(),
            listeners.clone(),
        ));
    }
    let (trusted, bundle_file) = (in_force.clone(), file.identity.bundle.clone());
    tasks.spawn(crate::ca::trust::follow(
        shared.snapshot.clone(),
        deny.clone(),
        move |pem, bundle| {
            if let Err(e) = trusted.set_bundle(bundle) {
                tracing::warn!(error = %e, "trust bundle from the registry not used");
            }
            // The file follows, so the CA is authenticated with it and a restart starts with it.
            if let Err(e) = halyard_certs::pem::write_atomic(&bundle_file, pem, 0o644) {
                tracing::warn!(error = %e, "trust bundle file not written");
            }
        },
    ));
    tasks.spawn(watch_expiry(
        resolver.clone(),
        in_force.reloads(),
        readiness.clone(),
        listeners.clone(),
    ));
    match enroller {
        Some(enroller) => tasks.spawn(crate::ca::renew::renew_loop(
            enroller,
            in_force.clone(),
            renewal_hooks(&shared, &readiness, &in_force, deny),
            listeners.clone(),
        )),
        None => tasks.spawn(reload_identity(
            config.clone(),
            in_force.clone(),
            listeners.clone(),
        )),
    };

    let record = endpoint_record(&config, &id, advertise, &identity)?;
    let registration = registry
        .register(record)
        .await
        .context("registering this endpoint")?;
    tracing::info!(sidecar = %id, inbound = %inbound_addr, %advertise, "sidecar serving");
    if let Some(tx) = started {
        let _ = tx.send(info);
    }
    stop.cancelled().await;
    let _draining = readiness.block("drain (shutting down)");
    drain(&shared, registry, registration, &listeners).await;
    sinks_stop.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after the drain; closing the endpoint");
    }
    shared.pool.endpoint().close();
    tasks.wait().await;
    Ok(())
}

fn spawn_listeners(
    tasks: &tokio_util::task::TaskTracker,
    shared: &Arc<Shared>,
    bound: Bound,
    stop: &CancellationToken,
) {
    let inbound = Arc::new(Inbound {
        shared: shared.clone(),
        apps: AppClients::new(
            shared.config.file.failure.connect_timeout,
            shared.config.transport.max_field_section_size(),
        ),
    });
    let endpoint = bound.endpoint.clone();
    // Cancelling `stop` starts the transport's graceful drain: new connections refused, a
    // GOAWAY on each, in-flight requests finished, then each connection closed cleanly.
    let drain = stop.clone().cancelled_owned();
    tasks.spawn(halyard_transport::serve_until(endpoint, inbound, drain));
    for (listener, dest) in bound.upstreams {
        tasks.spawn(crate::l4::capture::serve_upstream(
            shared.clone(),
            listener,
            dest,
            stop.clone(),
        ));
    }
    if let Some(l) = bound.transparent {
        tasks.spawn(crate::l4::capture::serve_transparent(
            shared.clone(),
            l,
            stop.clone(),
        ));
    }
}

/// Builds the endpoint index of each snapshot as it arrives, so that flows find it ready (a
/// flow that sees a snapshot first builds it itself).
async fn index_snapshots(shared: Arc<Shared>, stop: CancellationToken) {
    let mut rx = shared.snapshot.clone();
    loop {
        let snap = rx.borrow_and_update().clone();
        drop(shared.endpoint_index(&snap));
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Clears the snapshot readiness step once a live or persisted snapshot is in force.
async fn watch_snapshot(shared: Arc<Shared>, guard: admin::ReadyGuard, stop: CancellationToken) {
    let mut rx = shared.snapshot.clone();
    loop {
        if !matches!(
            rx.borrow_and_update().origin,
            halyard_registry::Origin::Empty
        ) {
            drop(guard);
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Once a second: registry and certificate gauges, per-peer QUIC figures.
async fn refresh(
    shared: Arc<Shared>,
    registry: Arc<dyn Registry>,
    resolver: Arc<CertResolver>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config.file.telemetry.refresh_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = shared.pool.stats();
        shared.metrics.pool_stats(&stats);
        let snap = shared.current();
        let m = &shared.metrics;
        m.registry_revision.set(snap.revision);
        m.registry_rejected.set(snap.rejected.len() as i64);
        m.registry_stale.set(registry.staleness().as_secs_f64());
        m.cert_expiry
            .set(resolver.current().seconds_to_expiry(SystemTime::now()));
        shared.refresh_peer_stats(&stats);
        shared.metrics.quic_congestion(&shared.pool.congestion());
        shared
            .metrics
            .quic_admission(shared.pool.endpoint().admission_stats());
        shared.forget_departed();
        m.flow_tasks.set(shared.flows.len() as i64);
        let runtime = tokio::runtime::Handle::current().metrics();
        m.runtime_tasks.set(runtime.num_alive_tasks() as i64);
        m.runtime_workers.set(runtime.num_workers() as i64);
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            m.open_fds.set(fds.count() as i64);
        }
    }
}

/// What the CA renewal loop reports: new trust bundles to the identity in force, renewals and
/// failure streaks to the metrics and `/readyz`.
fn renewal_hooks(
    shared: &Arc<Shared>,
    readiness: &Arc<Readiness>,
    in_force: &Arc<InForce>,
    deny: Arc<halyard_certs::revocation::DenyList>,
) -> crate::ca::renew::Hooks {
    let in_force = in_force.clone();
    let snapshot = shared.snapshot.clone();
    let (m1, m2) = (shared.metrics.clone(), shared.metrics.clone());
    let readiness = readiness.clone();
    crate::ca::renew::Hooks {
        on_bundle: Box::new(move |pem| {
            if snapshot.borrow().trust.is_some() {
                // The registry's bundle is the authority when there is one.
                return;
            }
            let set = TrustBundle::from_pem(pem)
                .map_err(anyhow::Error::from)
                .and_then(|b| {
                    let b = Arc::new(b.with_deny_list(deny.clone()));
                    Ok(in_force.set_bundle(b)?)
                });
            match set {
                Ok(()) => tracing::info!("trust bundle from the CA in force"),
                Err(e) => tracing::warn!(error = %e, "trust bundle from the CA not used"),
            }
        }),
        on_renewed: Box::new(move || m1.cert_renewals.inc()),
        on_failing: Box::new(move |text| {
            if text.is_some() {
                m2.cert_renewal_failures.inc();
            }
            readiness.warn("identity", text);
        }),
    }
}

/// Turns the sidecar unready while its leaf has expired (renewal kept failing, or nobody replaced
/// the files): peers refuse an expired certificate, so it can serve no mesh traffic. Ready again
/// with the next leaf.
async fn watch_expiry(
    resolver: Arc<CertResolver>,
    mut reloads: tokio::sync::watch::Receiver<u64>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut expired: Option<crate::admin::ReadyGuard> = None;
    loop {
        let not_after = resolver.current().not_after();
        let left = not_after.duration_since(SystemTime::now()).ok();
        match left {
            None if expired.is_none() => {
                tracing::error!("workload certificate expired; not ready until a new leaf arrives");
                expired = Some(readiness.block("identity (certificate expired)"));
            }
            Some(_) if expired.take().is_some() => {
                tracing::info!("new workload certificate in force; ready again");
            }
            _ => {}
        }
        // Expired: only a new leaf changes anything (the day is a bound, not a deadline).
        let wait = left.unwrap_or(Duration::from_secs(86_400));
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Watches the certificate files; a renewed leaf is swapped in for new handshakes. A bad or
/// half-written file keeps the current leaf and is retried on the next change.
async fn reload_identity(config: Arc<Config>, in_force: Arc<InForce>, stop: CancellationToken) {
    let files = &config.file.identity;
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = (stamp(&files.cert), stamp(&files.key));
    let mut tick = tokio::time::interval(files.reload_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = (stamp(&files.cert), stamp(&files.key));
        if now == last {
            continue;
        }
        match WorkloadIdentity::load(&files.cert, &files.key).and_then(|i| in_force.swap_leaf(i)) {
            Ok(()) => {
                tracing::info!(cert = %files.cert.display(), "workload certificate reloaded");
                last = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewed certificate not loaded; keeping the current one")
            }
        }
    }
}

async fn drain(
    shared: &Arc<Shared>,
    registry: Arc<dyn Registry>,
    registration: Registration,
    listeners: &CancellationToken,
) {
    tracing::info!("draining: deregistering and refusing new flows");
    if let Err(e) = registry.deregister(registration).await {
        tracing::warn!(error = %e, "deregistration failed; the lease will expire instead");
    }
    // Stops the TCP listeners and starts the QUIC drain (refuse new connections, GOAWAY):
    // peers send new flows elsewhere; what they already opened is served.
    listeners.cancel();
    shared.draining.cancel();
    shared.flows.close();
    let deadline = shared.config.file.failure.drain_timeout;
    if tokio::time::timeout(deadline, shared.flows.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.flows.len(),
            "drain deadline passed; closing open flows"
        );
        shared.hard_stop.cancel();
        shared.flows.wait().await;
    }
    // CONNECTION_CLOSE makes QUIC drop stream data not yet acknowledged, and quinn has no "all
    // acknowledged" event: give the last bytes of finished outbound flows time to be acked (a
    // peer may delay its ACK by up to 25 ms) before the pool closes its connections. Inbound
    // connections linger inside the transport's drain.
    tokio::time::sleep(CLOSE_LINGER).await;
    tracing::debug!("open flows done; closing connections");
    shared.pool.close();
}
