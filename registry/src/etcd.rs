//! The etcd backend: list, then watch from the next revision, with quarantine per key.
//!
//! - The snapshot is loaded with Get(prefix), then a Watch starts at its revision + 1.
//! - A watch canceled for compaction re-lists (Get again, watch from the new revision + 1); it
//!   never retries the compacted start revision.
//! - An event at or below the last applied revision is dropped, so revisions only move forward.
//! - A broken stream (etcd restarted, network gone) is re-created from the last applied
//!   revision + 1 after a jittered backoff; HTTP/2 keepalives detect a dead peer, and every
//!   request carries `hasleader` so a member without quorum cancels rather than hangs.
//! - Endpoints live on a lease kept alive every TTL/3; when the lease is lost the endpoint is
//!   registered again on a new lease.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::credentials::{Access, Credentials, EtcdTls};
use crate::error::RegistryError;
use crate::key::mesh_prefix;
use crate::model::{Endpoint, Object, Status};
use crate::registry::{
    spawn_sink, Backoff, BoxFuture, Options, Registration, Registry, Shared, StatusWriter,
};
use crate::snapshot::Snapshot;
use crate::store::Store;

/// A connection to etcd with the timeouts Halyard uses.
#[derive(Clone)]
pub(crate) struct Etcd {
    pub client: Client,
    pub endpoints: String,
    pub timeout: Duration,
    /// The etcd user, quoted, and the file it came from, if any (for error messages).
    pub user: Option<String>,
    /// The credentials to log in with (again) when etcd refuses a request for want of a valid
    /// token: at start while etcd was away, after a restart or an expired token.
    credentials: Option<Credentials>,
}

impl Etcd {
    /// Creates the client. Connections are made lazily; the first request finds out whether
    /// etcd is there, bounded by `timeout`. With `access.credentials` the client logs in
    /// (etcd `Authenticate`) at once when etcd answers — refused credentials are an error
    /// here — and otherwise when etcd first refuses a request for want of a token, so an etcd
    /// that is away at start is no different with credentials than without (the registry then
    /// serves its persisted snapshot). The token goes with every request and is renewed when
    /// etcd says it expired (simple tokens live `--auth-token-ttl`, 5 minutes by default, and
    /// none survives an etcd restart). `https://` endpoints (an `etcds://` URL)
    /// need `access.tls` (the CA of etcd's certificate, and a client certificate for etcd's
    /// `--client-cert-auth`); `http://` ones refuse it, so TLS settings never silently go
    /// unused.
    pub async fn connect(
        endpoints: &[String],
        timeout: Duration,
        access: &Access,
    ) -> Result<Self, RegistryError> {
        let joined = endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_require_leader(true);
        let secure = endpoints.iter().any(|e| e.starts_with("https://"));
        match (&access.tls, secure) {
            (Some(tls), true) => opts = opts.with_tls(tls_options(tls)),
            (None, true) => {
                return Err(RegistryError::BadUrl {
                    url: joined,
                    reason: "an etcds:// registry needs TLS settings: the CA file of etcd's \
                             certificate (and a client certificate if etcd asks for one)"
                        .into(),
                })
            }
            (Some(_), false) => {
                return Err(RegistryError::BadUrl {
                    url: joined,
                    reason: "TLS settings were given for a plain etcd:// registry: \
                             use etcds:// (or drop the TLS settings)"
                        .into(),
                })
            }
            (None, false) => {}
        }
        // No user in the options: etcd-client would log in inside `connect`, which then fails
        // while etcd is away. The credentials are given below, or when etcd is back.
        opts = opts.with_auto_token_refresh(true);
        let credentials = access.credentials.clone();
        let user = credentials.as_ref().map(Credentials::describe);
        // The client spreads requests over every endpoint given, dead members included, and a
        // request sent to a dead one fails: with one member of three down, half of them did.
        // Start with the members that answer (all of them if none does).
        let alive = answering(endpoints, &opts, timeout).await;
        let endpoints = if alive.is_empty() { endpoints } else { &alive };
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| unreachable(&joined, format!("no answer within {timeout:?}")))?
            .map_err(|e| match &e {
                etcd_client::Error::GRpcStatus(s) => {
                    auth_error(&joined, user.as_deref(), s.code() as i32, s.message())
                        .unwrap_or_else(|| unreachable(&joined, e.to_string()))
                }
                _ => unreachable(&joined, e.to_string()),
            })?;
        let etcd = Etcd {
            client,
            endpoints: joined,
            timeout,
            user,
            credentials,
        };
        match etcd.log_in().await {
            Err(
                e
                @ (RegistryError::Unauthenticated { .. } | RegistryError::PermissionDenied { .. }),
            ) => Err(e),
            // Away or slow: log in when it answers.
            _ => Ok(etcd),
        }
    }

    /// Logs in with the credentials (if any), storing them in the client so that an expired
    /// token is renewed by itself. Nothing without credentials.
    async fn log_in(&self) -> Result<(), RegistryError> {
        let Some(c) = &self.credentials else {
            return Ok(());
        };
        let mut client = self.client.clone();
        let user = Some((c.user().to_owned(), c.password().to_owned()));
        self.call(client.update_user(user)).await
    }

    /// Runs one request with the timeout; a transport failure or timeout is `Unreachable`.
    pub async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.timeout, fut).await {
            // A member without a leader may sit on a write until the deadline instead of
            // refusing it: ask it whether it has a leader, so the error says why.
            Err(_) if self.leaderless().await => {
                Err(RegistryError::NoLeader(self.endpoints.clone()))
            }
            Err(_) => Err(unreachable(
                &self.endpoints,
                format!("no answer within {:?}", self.timeout),
            )),
            Ok(Err(etcd_client::Error::TransportError(e))) => {
                Err(unreachable(&self.endpoints, e.to_string()))
            }
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if s.code() as i32 == GRPC_UNAVAILABLE && s.message().contains("no leader") =>
            {
                Err(RegistryError::NoLeader(self.endpoints.clone()))
            }
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() as i32 == GRPC_UNAVAILABLE => {
                Err(unreachable(&self.endpoints, s.message().to_owned()))
            }
            Ok(Err(etcd_client::Error::GRpcStatus(s))) => {
                let code = s.code() as i32;
                let auth = auth_error(&self.endpoints, self.user.as_deref(), code, s.message());
                Err(match auth {
                    Some(e) => e,
                    None if code == GRPC_UNIMPLEMENTED => unreachable(
                        &self.endpoints,
                        format!("{} (is this an etcd v3 endpoint?)", s.message()),
                    ),
                    None => RegistryError::Etcd(etcd_client::Error::GRpcStatus(s)),
                })
            }
            Ok(r) => r.map_err(RegistryError::Etcd),
        }
    }
}

impl Etcd {
    /// After an authentication error, asks for a new token (a request made through the client
    /// does so by itself; a watch that etcd cancels for an expired token does not). Does
    /// nothing without credentials; a failure shows in the next request's error.
    async fn reauthenticate(&self, after: &RegistryError) {
        if matches!(after, RegistryError::Unauthenticated { .. }) {
            if let Err(e) = self.log_in().await {
                tracing::debug!(error = %e, "etcd log-in failed; retried after the next refusal");
            }
        }
    }

    /// Whether the member this client talks to answers, within a second, that it has no
    /// leader (status `leader` 0, or the "no leader" error `hasleader` requests get).
    async fn leaderless(&self) -> bool {
        let mut m = self.client.maintenance_client();
        match tokio::time::timeout(Duration::from_secs(1), m.status()).await {
            Ok(Ok(status)) => status.leader() == 0,
            Ok(Err(etcd_client::Error::GRpcStatus(s))) => s.message().contains("no leader"),
            _ => false,
        }
    }
}

/// The endpoints among several whose etcd answers a status request within `timeout` (with or
/// without a leader); a single endpoint is returned as is.
async fn answering(endpoints: &[String], opts: &ConnectOptions, timeout: Duration) -> Vec<String> {
    if endpoints.len() < 2 {
        return endpoints.to_vec();
    }
    let probes = endpoints.iter().map(|ep| async move {
        let probe = async {
            let mut client = Client::connect([ep.as_str()], Some(opts.clone())).await?;
            client.status().await
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(_)) => true,
            Ok(Err(etcd_client::Error::GRpcStatus(s))) => s.message().contains("no leader"),
            _ => false,
        }
    });
    let answers = futures::future::join_all(probes).await;
    endpoints
        .iter()
        .zip(answers)
        .filter(|(_, ok)| *ok)
        .map(|(ep, _)| ep.clone())
        .collect()
}

/// The error an etcd answer about authentication stands for, naming what to change; `None` for
/// any other answer. etcd's answers (etcdserver/api/v3rpc/rpctypes): "authentication failed,
/// invalid user ID or password", "authentication is not enabled", "user name is empty" (no
/// token sent to an etcd with authentication on), "invalid auth token" (expired, or issued
/// before a restart), "permission denied".
fn auth_error(
    endpoints: &str,
    user: Option<&str>,
    code: i32,
    message: &str,
) -> Option<RegistryError> {
    let unauthenticated = |reason: String| {
        Some(RegistryError::Unauthenticated {
            endpoints: endpoints.to_owned(),
            reason,
        })
    };
    if message.contains("invalid user ID or password") {
        return unauthenticated(format!(
            "wrong user name or password for user {}",
            user.unwrap_or("\"\"")
        ));
    }
    if message.contains("authentication is not enabled") {
        return unauthenticated(
            "credentials were given but this etcd has authentication disabled \
             (remove the credentials, or run `etcdctl auth enable`)"
                .into(),
        );
    }
    if message.contains("user name is empty") {
        return unauthenticated(
            "this etcd requires authentication and no credentials were given \
             (set a credentials file with user:password)"
                .into(),
        );
    }
    if message.contains("invalid auth token") {
        return unauthenticated(format!("{message} (the token is requested again)"));
    }
    if code == GRPC_PERMISSION_DENIED || message.contains("permission denied") {
        return Some(RegistryError::PermissionDenied {
            endpoints: endpoints.to_owned(),
            user: user.map_or_else(
                || "a caller without credentials".to_owned(),
                |u| format!("user {u}"),
            ),
            reason: message.to_owned(),
        });
    }
    None
}

/// etcd-client's TLS options for `tls`: its CA as the only root, its client identity if any.
fn tls_options(tls: &EtcdTls) -> etcd_client::TlsOptions {
    let mut options =
        etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(etcd_client::Identity::from_pem(cert, key));
    }
    options
}

/// gRPC status code PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: i32 = 7;
/// gRPC status code UNAVAILABLE: the server is not there (or has no leader).
const GRPC_UNAVAILABLE: i32 = 14;
/// gRPC status code UNIMPLEMENTED: something answered, but not etcd's API.
const GRPC_UNIMPLEMENTED: i32 = 12;

fn unreachable(endpoints: &str, reason: String) -> RegistryError {
    RegistryError::Unreachable {
        endpoints: endpoints.to_owned(),
        reason,
    }
}

/// The etcd-backed registry.
pub(crate) struct EtcdRegistry {
    shared: Arc<Shared>,
    etcd: Etcd,
    tasks: Vec<JoinHandle<()>>,
}

impl EtcdRegistry {
    pub async fn open(endpoints: Vec<String>, opts: Options) -> Result<Self, RegistryError> {
        let etcd = Etcd::connect(&endpoints, opts.timeout, &opts.access).await?;
        let prefix = mesh_prefix(&opts.mesh);
        let mesh = opts.mesh.clone();
        let (shared, persisted) = Shared::new(opts);
        // Seed with the persisted objects so that a key found invalid at the first listing keeps
        // its last good value across a restart; the revision starts over (it may be another
        // cluster's).
        let mut store = persisted.unwrap_or_else(|| Store::new(&mesh));
        store.revision = 0;
        let listed = list(&etcd, &prefix, &shared, &mut store).await;
        // Refused credentials are a configuration error, not an outage: say so at once rather
        // than serve a stale snapshot. (A running registry whose user loses its permission
        // keeps its snapshot and retries, like any other failure.)
        if let Err(
            e @ (RegistryError::Unauthenticated { .. } | RegistryError::PermissionDenied { .. }),
        ) = listed
        {
            return Err(e);
        }
        if let Err(e) = &listed {
            tracing::warn!(error = %e, "registry unreachable at start; serving the last known snapshot");
            shared.contact_lost();
        }
        let writer = status_writer(etcd.clone(), shared.opts.mesh.clone());
        let tasks = vec![
            tokio::spawn(follow(
                etcd.clone(),
                prefix,
                shared.clone(),
                store,
                listed.is_err(),
            )),
            spawn_sink(shared.clone(), writer),
        ];
        Ok(EtcdRegistry {
            shared,
            etcd,
            tasks,
        })
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn status_writer(etcd: Etcd, mesh: String) -> StatusWriter {
    Arc::new(move |st: Status| {
        let etcd = etcd.clone();
        let mesh = mesh.clone();
        Box::pin(async move { put_status(&etcd, &mesh, st).await })
    })
}

async fn put_status(etcd: &Etcd, mesh: &str, st: Status) -> Result<(), RegistryError> {
    let obj = Object::Status(st);
    let mut kv = etcd.client.kv_client();
    etcd.call(kv.put(obj.key().full(mesh), obj.to_json(), None))
        .await?;
    Ok(())
}

impl Registry for EtcdRegistry {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.tx.subscribe()
    }

    fn register(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(self.register_endpoint(endpoint))
    }

    fn deregister(&self, registration: Registration) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(self.deregister_endpoint(registration))
    }

    fn write_status(&self, status: Status) -> BoxFuture<'_, Result<(), RegistryError>> {
        Box::pin(put_status(&self.etcd, &self.shared.opts.mesh, status))
    }

    fn staleness(&self) -> Duration {
        self.shared.staleness()
    }

    fn rejected_total(&self) -> u64 {
        self.shared.rejected_total()
    }
}

impl EtcdRegistry {
    /// Starts the keepalive task and waits (up to the timeout) for the first registration. If
    /// etcd does not answer in time the handle is still returned and the task keeps trying.
    async fn register_endpoint(&self, endpoint: Endpoint) -> Result<Registration, RegistryError> {
        let obj = Object::Endpoint(endpoint);
        let key = obj.key().full(&self.shared.opts.mesh);
        let lease = Arc::new(AtomicI64::new(0));
        let (ready_tx, ready_rx) = oneshot::channel();
        let holder = LeaseHolder {
            etcd: self.etcd.clone(),
            key: key.clone(),
            value: obj.to_json(),
            // etcd's smallest lease is about 2 s; whole seconds, at least 2.
            ttl: Duration::from_secs(self.shared.opts.lease_ttl.as_secs().max(2)),
            lease: lease.clone(),
        };
        let task = tokio::spawn(holder.run(ready_tx));
        match tokio::time::timeout(self.etcd.timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            // Refused by etcd's access control: a configuration error, said at once.
            Ok(Ok(Err(e))) => {
                task.abort();
                return Err(e);
            }
            _ => {
                tracing::warn!(%key, "etcd did not answer; the endpoint will be registered when it does")
            }
        }
        Ok(Registration {
            key,
            lease: Some(lease),
            task: Some(task),
            file: None,
        })
    }

    async fn deregister_endpoint(&self, mut reg: Registration) -> Result<(), RegistryError> {
        if let Some(t) = reg.task.take() {
            t.abort();
        }
        if let Some(id) = reg.lease_id() {
            let mut lc = self.etcd.client.lease_client();
            let _ = self.etcd.call(lc.revoke(id)).await;
        }
        let mut kv = self.etcd.client.kv_client();
        self.etcd.call(kv.delete(reg.key.clone(), None)).await?;
        Ok(())
    }
}

/// Keeps one endpoint key alive on a lease.
struct LeaseHolder {
    etcd: Etcd,
    key: String,
    value: String,
    ttl: Duration,
    lease: Arc<AtomicI64>,
}

impl LeaseHolder {
    async fn run(self, ready: oneshot::Sender<Result<(), RegistryError>>) {
        let mut ready = Some(ready);
        let mut backoff = Backoff::new(Duration::from_millis(100), self.ttl / 3);
        loop {
            let err = self.hold(&mut ready, &mut backoff).await;
            // A user whose roles may not write the key is refused for good: the registering
            // caller hears it (once registered, a revoked permission is retried like any loss).
            if matches!(err, RegistryError::PermissionDenied { .. }) {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(err));
                    return;
                }
            }
            tracing::warn!(key = %self.key, error = %err, "endpoint lease lost; registering again");
            self.etcd.reauthenticate(&err).await;
            tokio::time::sleep(backoff.delay()).await;
        }
    }

    /// Grants a lease, puts the key on it, and keeps it alive until something fails.
    async fn hold(
        &self,
        ready: &mut Option<oneshot::Sender<Result<(), RegistryError>>>,
        backoff: &mut Backoff,
    ) -> RegistryError {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(10);
        let mut lc = self.etcd.client.lease_client();
        let lease = match self.etcd.call(lc.grant(ttl, None)).await {
            Ok(r) => r.id(),
            Err(e) => return e,
        };
        self.lease.store(lease, Ordering::Relaxed);
        let mut kv = self.etcd.client.kv_client();
        let put = kv.put(
            self.key.clone(),
            self.value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        if let Err(e) = self.etcd.call(put).await {
            // The lease would hold nothing: give it back rather than leave it to expire.
            let _ = self.etcd.call(lc.revoke(lease)).await;
            return e;
        }
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
        backoff.reset();
        let (mut keeper, mut stream) = match self.etcd.call(lc.keep_alive(lease)).await {
            Ok(pair) => pair,
            Err(e) => return e,
        };
        let mut tick = tokio::time::interval(self.ttl / 3);
        // The lease lives `ttl` past the last renewal etcd received, so a renewal is waited for
        // that long, not for the per-request timeout: with etcd answering in 4 s, a 3 s timeout
        // gave up on a live lease, and the re-grant never finished either, so the endpoint
        // expired from every sidecar while its sidecar was up.
        let mut alive_until = tokio::time::Instant::now() + self.ttl;
        loop {
            tick.tick().await;
            let sent = tokio::time::Instant::now();
            let renewal = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            let left = alive_until.saturating_duration_since(sent);
            match tokio::time::timeout(left, renewal).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    alive_until = sent + Duration::from_secs(r.ttl().unsigned_abs());
                }
                Ok(Ok(Some(_))) | Err(_) => return RegistryError::LeaseLost(lease),
                Ok(Ok(None)) => {
                    return unreachable(&self.etcd.endpoints, "keepalive stream closed".into())
                }
                Ok(Err(e)) => return RegistryError::Etcd(e),
            }
        }
    }
}

/// Lists the prefix and replaces the store's content; refuses a listing older than what was
/// already applied.
async fn list(
    etcd: &Etcd,
    prefix: &str,
    shared: &Shared,
    store: &mut Store,
) -> Result<(), RegistryError> {
    let mut kv = etcd.client.kv_client();
    let resp = etcd
        .call(kv.get(
            prefix,
            Some(GetOptions::new().with_range(watch_end(prefix))),
        ))
        .await?;
    let rev = resp.header().map_or(0, |h| h.revision());
    if rev < store.revision {
        return Err(RegistryError::Behind {
            seen: rev,
            applied: store.revision,
        });
    }
    let entries: Vec<_> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            let rel = full.strip_prefix(prefix)?.to_owned();
            Some((rel, full, kv.value().to_vec()))
        })
        .collect();
    let newly = store.relist(entries, rev);
    shared.note_rejected(newly);
    shared.contact_ok();
    shared.publish(store);
    Ok(())
}

/// The end of the range sidecars list and watch: `<prefix>status/`. Status keys sort after
/// every other kind (`endpoints`, `meshconfig`, `policies`, `routes`, `services`), so excluding
/// them keeps N sidecars' status writes from fanning out to N watchers each.
fn watch_end(prefix: &str) -> String {
    format!("{prefix}status/")
}

/// Why a watch ended.
enum End {
    /// The start revision was compacted: re-list.
    Compacted(i64),
    /// The stream failed: back off and resume from the last applied revision + 1.
    Failed(RegistryError),
}

async fn follow(
    etcd: Etcd,
    prefix: String,
    shared: Arc<Shared>,
    mut store: Store,
    mut need_list: bool,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        if need_list {
            if let Err(e) = list(&etcd, &prefix, &shared, &mut store).await {
                shared.contact_lost();
                tracing::warn!(error = %e, "registry list failed; retrying");
                etcd.reauthenticate(&e).await;
                tokio::time::sleep(backoff.delay()).await;
                continue;
            }
            need_list = false;
        }
        match watch_from(&etcd, &prefix, &shared, &mut store, &mut backoff).await {
            End::Compacted(rev) => {
                tracing::info!(
                    compacted = rev,
                    applied = store.revision,
                    "registry watch compacted; re-listing"
                );
                need_list = true;
            }
            End::Failed(e) => {
                shared.contact_lost();
                tracing::warn!(error = %e, applied = store.revision, "registry watch broken; resuming");
                etcd.reauthenticate(&e).await;
                tokio::time::sleep(backoff.delay()).await;
            }
        }
    }
}

/// How often an idle watch asks etcd for a progress report; a stream silent for
/// [`STALL_AFTER`] is treated as broken (etcd has had bugs where a watch starves silently).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Silence after which a watch stream is abandoned and re-created.
const STALL_AFTER: Duration = Duration::from_secs(15);

async fn watch_from(
    etcd: &Etcd,
    prefix: &str,
    shared: &Shared,
    store: &mut Store,
    backoff: &mut Backoff,
) -> End {
    let opts = WatchOptions::new()
        .with_range(watch_end(prefix))
        .with_start_revision(store.revision + 1)
        .with_progress_notify();
    let mut wc = etcd.client.watch_client();
    let (mut requests, mut responses) = match etcd.call(wc.watch(prefix, Some(opts))).await {
        Ok(s) => s.split(),
        Err(e) => return End::Failed(e),
    };
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            m = responses.message() => m,
            _ = tick.tick() => {
                if last_heard.elapsed() > STALL_AFTER {
                    return End::Failed(unreachable(&etcd.endpoints, "watch stalled: no progress".into()));
                }
                if let Err(e) = requests.request_progress().await {
                    return End::Failed(RegistryError::Etcd(e));
                }
                continue;
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => {
                return End::Failed(unreachable(&etcd.endpoints, "watch stream closed".into()))
            }
            Err(e) => return End::Failed(RegistryError::Etcd(e)),
        };
        last_heard = tokio::time::Instant::now();
        if let Some(end) = handle(&etcd.endpoints, etcd.user.as_deref(), &resp) {
            return end;
        }
        shared.contact_ok();
        backoff.reset();
        let changes = resp
            .events()
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| Change {
                key: kv.key(),
                value: kv.value(),
                mod_revision: kv.mod_revision(),
                version: kv.version(),
            });
        apply_changes(prefix, shared, store, changes);
    }
}

/// Whether a watch response ends the watch: compaction (re-list) or cancellation.
fn handle(endpoints: &str, user: Option<&str>, resp: &etcd_client::WatchResponse) -> Option<End> {
    if resp.compact_revision() != 0 {
        return Some(End::Compacted(resp.compact_revision()));
    }
    if resp.canceled() {
        if let Some(e) = auth_error(endpoints, user, 0, resp.cancel_reason()) {
            return Some(End::Failed(e));
        }
        let reason = format!("watch canceled: {}", resp.cancel_reason());
        return Some(End::Failed(unreachable(endpoints, reason)));
    }
    None
}

/// One key change from a watch event.
struct Change<'a> {
    key: &'a [u8],
    value: &'a [u8],
    mod_revision: i64,
    /// 0 for a delete, at least 1 for a put.
    version: i64,
}

/// Applies one watch response. Changes at or below the last applied revision are dropped; all
/// changes of one response are published as one snapshot. (Every event of one transaction has
/// the same revision, so the floor is the revision before the response, not the last event.)
fn apply_changes<'a>(
    prefix: &str,
    shared: &Shared,
    store: &mut Store,
    changes: impl IntoIterator<Item = Change<'a>>,
) {
    let floor = store.revision;
    let mut top = floor;
    let mut changed = false;
    for c in changes {
        if c.mod_revision <= floor {
            continue;
        }
        top = top.max(c.mod_revision);
        let full = String::from_utf8_lossy(c.key).into_owned();
        let Some(rel) = full.strip_prefix(prefix) else {
            continue;
        };
        // A delete event's kv has version 0; a put's is at least 1. (Reading the event type
        // through the client would panic on an unknown type.)
        let applied = if c.version == 0 {
            store.delete(rel)
        } else {
            store.put(rel, &full, c.value)
        };
        changed |= applied.changed;
        shared.note_rejected(applied.rejected);
    }
    store.revision = top;
    if changed {
        shared.publish(store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(port: u16) -> Vec<u8> {
        format!(r#"{{"name":"a","ports":[{{"port":{port},"protocol":"tcp"}}]}}"#).into_bytes()
    }

    fn change<'a>(key: &'a str, value: &'a [u8], rev: i64, version: i64) -> Change<'a> {
        Change {
            key: key.as_bytes(),
            value,
            mod_revision: rev,
            version,
        }
    }

    #[test]
    fn revisions_only_move_forward() {
        let (shared, _) = Shared::new(Options::new("m"));
        let mut store = Store::new("m");
        let (v1, v2, v3) = (svc(1), svc(2), svc(3));
        let p = "/halyard/m/";
        apply_changes(
            p,
            &shared,
            &mut store,
            [change("/halyard/m/services/a", &v1, 5, 1)],
        );
        assert_eq!(shared.tx.borrow().service("a").unwrap().ports[0].port, 1);
        // A replayed or older event is dropped, even mixed with newer ones.
        apply_changes(
            p,
            &shared,
            &mut store,
            [
                change("/halyard/m/services/a", &v3, 5, 2),
                change("/halyard/m/services/a", &v2, 4, 1),
            ],
        );
        assert_eq!(store.revision, 5);
        assert_eq!(shared.tx.borrow().service("a").unwrap().ports[0].port, 1);
        // Two events of one transaction share a revision: both apply.
        apply_changes(
            p,
            &shared,
            &mut store,
            [
                change("/halyard/m/services/a", &v2, 6, 2),
                change("/halyard/m/services/b", b"{}", 6, 1),
            ],
        );
        let snap = shared.tx.borrow().clone();
        assert_eq!(
            (snap.revision, snap.service("a").unwrap().ports[0].port),
            (6, 2)
        );
        assert!(snap.rejected.contains_key("/halyard/m/services/b"));
        // A delete (version 0).
        apply_changes(
            p,
            &shared,
            &mut store,
            [change("/halyard/m/services/a", b"", 7, 0)],
        );
        assert!(shared.tx.borrow().service("a").is_none());
        assert_eq!(shared.rejected_total(), 1);
    }
}
