//! The SPIFFE Workload API, X.509-SVID profile, served to the local app on a Unix socket
//! (`[workload_api] socket`), so an app that does its own TLS gets the mesh identity: its SVID
//! (this sidecar's leaf, intermediates and key) and the trust bundle, again on every renewal.
//!
//! Implements the SPIFFE Workload Endpoint and Workload API specifications
//! (github.com/spiffe/spiffe, `standards/SPIFFE_Workload_Endpoint.md`,
//! `standards/SPIFFE_Workload_API.md`) over the official `workload.proto`
//! (`sidecar/proto/spiffe/workload/`):
//!
//! - `FetchX509SVID` streams an `X509SVIDResponse` at once and again whenever the leaf or the
//!   bundle changes: one `X509SVID` with `spiffe_id`, `x509_svid` (DER chain, leaf first,
//!   concatenated), `x509_svid_key` (PKCS#8 DER) and `bundle` (DER roots concatenated).
//! - `FetchX509Bundles` streams an `X509BundlesResponse` (`spiffe://<trust domain>` → DER roots
//!   concatenated) at once and again whenever the bundle changes.
//! - The JWT-SVID and WIT-SVID profiles are not implemented: `FetchJWTSVID`, `FetchJWTBundles`,
//!   `ValidateJWTSVID`, `FetchWITSVID` and `FetchWITBundles` answer `Unimplemented`.
//! - Every call must carry the metadata `workload.spiffe.io: true` (Workload Endpoint §4,
//!   "Transport Security"); without it the call is refused with `InvalidArgument`.
//! - Streams end with `Unavailable` when the sidecar shuts down, so clients reconnect.
//!
//! gRPC's C core and grpc-java send the socket path as `:authority`, which the HTTP/2 server
//! refuses; [`authority::AuthorityFix`] rewrites it on the way in (see there).
//!
//! There is no workload attestation: the socket's file mode is the access control (see
//! `config::WorkloadApiConfig`). The socket is bound in a private folder (0700), given its mode and
//! renamed into place, so it is never connectable with looser permissions; a stale socket left
//! by a dead sidecar is replaced, a live one or any other file refuses the start; the file is
//! removed when the server ends.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::config::WorkloadApiConfig;
use crate::identity::Svid;
use crate::telemetry::metrics::Metrics;

pub(crate) mod authority;

/// The code generated from `workload.proto` (no proto package, hence `_`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod proto {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

use proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use proto::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest,
    WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};

/// The metadata key every Workload API call must carry, with the value `true`.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long open connections get to close after the streams have ended at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The socket file this process created; removed on drop if it is still that file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.dev_ino)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "workload API socket not removed");
            }
        }
    }
}

/// The bound Workload API socket, ready to serve.
#[derive(Debug)]
pub(crate) struct Socket {
    listener: UnixListener,
    file: SocketFile,
}

/// Binds `[workload_api] socket` with its mode. Errors name the field: the folder is missing,
/// another process serves the socket, or the path is taken by something that is not a socket.
///
/// The socket is bound inside a fresh folder of mode 0700 beside its final path, given its
/// mode there, then renamed into place: nobody else can connect to it before it has its mode
/// (binding it in place and then `chmod`ing would leave a moment in which the umask decides).
pub(crate) fn bind(config: &WorkloadApiConfig) -> anyhow::Result<Socket> {
    let path = config.socket.path();
    let at = || format!("workload_api.socket = {}", path.display());
    clear_stale(path).with_context(at)?;
    let private = private_dir(path).with_context(at)?;
    let tmp = private.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(config.mode.bits()))?;
        std::fs::rename(&tmp, path)?;
        Ok((l, std::fs::symlink_metadata(path)?))
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let (std_listener, meta) = bound.with_context(|| format!("{}: cannot listen", at()))?;
    let file = SocketFile {
        path: path.to_owned(),
        dev_ino: (meta.dev(), meta.ino()),
    };
    std_listener.set_nonblocking(true).with_context(at)?;
    let listener = UnixListener::from_std(std_listener).with_context(at)?;
    Ok(Socket { listener, file })
}

/// Makes `.wapi` (mode 0700) beside `path`, after removing one a dead sidecar of this user
/// left; a `.wapi` that is anything else refuses the start. The name is short so that the
/// socket inside (`.wapi/s`) fits `sun_path` whenever `path` does.
fn private_dir(path: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.with_file_name(".wapi");
    if let Ok(meta) = std::fs::symlink_metadata(&dir) {
        let mine = meta.is_dir() && meta.uid() == current_uid()?;
        if !mine {
            anyhow::bail!(
                "{} exists and is not this user's folder; not using it",
                dir.display()
            );
        }
        clear_stale(&dir.join("s"))?;
        std::fs::remove_dir(&dir)
            .with_context(|| format!("removing the stale folder {}", dir.display()))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// This process's effective uid: the owner of `/proc/self`.
fn current_uid() -> anyhow::Result<u32> {
    Ok(std::fs::metadata("/proc/self")
        .context("reading /proc/self for this process's uid")?
        .uid())
}

/// Removes a socket file nobody serves; refuses to touch a served socket or any other file.
fn clear_stale(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "{} is served by another process (another sidecar with the same socket?)",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale socket {}", path.display()))
}

/// Serves the Workload API on `socket` until `stop`; then every stream ends with
/// `Unavailable`, the connections close and the socket file is removed.
pub(crate) async fn serve(
    socket: Socket,
    svid: watch::Receiver<Svid>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let Socket { listener, file } = socket;
    tracing::info!(socket = %file.path.display(), "SPIFFE Workload API serving");
    let streams = TaskTracker::new();
    let api = WorkloadApi {
        svid,
        metrics,
        stop: stop.clone(),
        streams: streams.clone(),
    };
    let server = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|c| c.map(authority::AuthorityFix::new)),
            stop.clone().cancelled_owned(),
        );
    let grace = async {
        stop.cancelled().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        r = server => if let Err(e) = r {
            tracing::warn!(error = %e, "SPIFFE Workload API server failed");
        },
        () = grace => tracing::debug!("Workload API connections still open at shutdown; closing them"),
    }
    streams.close();
    streams.wait().await;
    drop(file);
}

/// The `SpiffeWorkloadAPI` service.
struct WorkloadApi {
    svid: watch::Receiver<Svid>,
    metrics: Metrics,
    stop: CancellationToken,
    streams: TaskTracker,
}

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    /// Refuses a call without `workload.spiffe.io: true` (SPIFFE Workload Endpoint §4: the
    /// header MUST be present, and a request without it MUST be rejected).
    fn admit<T>(&self, method: &str, request: &Request<T>) -> Result<(), Status> {
        let value = request.metadata().get(SECURITY_HEADER);
        if value.and_then(|v| v.to_str().ok()) == Some("true") {
            return Ok(());
        }
        Err(self.refuse(
            method,
            Status::invalid_argument(format!(
                "security header missing from request: the metadata `{SECURITY_HEADER}: true` is required"
            )),
        ))
    }

    fn refuse(&self, method: &str, status: Status) -> Status {
        let code = format!("{:?}", status.code());
        self.metrics
            .workload_api_refused
            .with_label_values(&[method, &code])
            .inc();
        status
    }

    /// Admits the call, then answers that its profile is not served here.
    fn unimplemented<T, R>(&self, method: &str, request: &Request<T>) -> Result<R, Status> {
        self.admit(method, request)?;
        Err(self.refuse(
            method,
            Status::unimplemented(format!(
                "{method}: this Workload API serves the X.509-SVID profile only"
            )),
        ))
    }

    /// A stream of `message(svid)` now and after each change, skipping repeats, ended by the
    /// client, or by shutdown with `Unavailable`.
    fn updates<T>(&self, method: &'static str, message: fn(&Svid) -> T) -> Updates<T>
    where
        T: PartialEq + Clone + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let mut svid = self.svid.clone();
        svid.mark_changed();
        let open = self
            .metrics
            .workload_api_streams
            .with_label_values(&[method]);
        let sent = self
            .metrics
            .workload_api_responses
            .with_label_values(&[method]);
        let stop = self.stop.clone();
        self.streams.spawn(async move {
            open.inc();
            let mut last: Option<T> = None;
            while let Some(next) = next_change(&mut svid, &stop, &tx).await {
                let msg = message(&next);
                if last.as_ref() == Some(&msg) {
                    continue;
                }
                // A slot first, then the count, then the message: a client that has the
                // message finds it counted.
                let permit = tokio::select! {
                    r = tx.reserve() => r.ok(),
                    () = stop.cancelled() => None,
                };
                let Some(permit) = permit else {
                    break;
                };
                sent.inc();
                permit.send(Ok(msg.clone()));
                last = Some(msg);
            }
            if stop.is_cancelled() {
                let _ = tx.try_send(Err(Status::unavailable(
                    "the sidecar is shutting down; reconnect to the Workload API when it is back",
                )));
            }
            open.dec();
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The next identity to send; `None` when the client is gone or the sidecar stops.
async fn next_change<T>(
    svid: &mut watch::Receiver<Svid>,
    stop: &CancellationToken,
    tx: &mpsc::Sender<T>,
) -> Option<Svid> {
    tokio::select! {
        biased;
        () = stop.cancelled() => None,
        () = tx.closed() => None,
        r = svid.changed() => r.ok().map(|()| svid.borrow_and_update().clone()),
    }
}

/// DER certificates one after the other, as the Workload API carries chains and bundles.
fn concat(certs: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The bundle of each trust domain, keyed by the domain's SPIFFE id (`spiffe://<td>`), as
/// the Workload API's maps are: the workload's own domain, and each federated domain whose root
/// the bundle holds (a root naming no domain counts as the workload's own).
fn bundles_by_domain(svid: &Svid) -> (Vec<u8>, std::collections::HashMap<String, Vec<u8>>) {
    let own = svid.identity.id().trust_domain();
    let mut own_roots = Vec::new();
    let mut others = std::collections::HashMap::new();
    for (td, roots) in svid.bundle.roots_by_domain(&own) {
        if td == own {
            own_roots = concat(&roots);
        } else {
            others.insert(format!("spiffe://{td}"), concat(&roots));
        }
    }
    (own_roots, others)
}

fn x509_svid_response(svid: &Svid) -> X509svidResponse {
    let (bundle, federated_bundles) = bundles_by_domain(svid);
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.identity.id().to_string(),
            x509_svid: concat(svid.identity.chain()),
            x509_svid_key: svid.identity.pkcs8_key().to_vec(),
            bundle,
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles,
    }
}

fn x509_bundles_response(svid: &Svid) -> X509BundlesResponse {
    let (own, mut bundles) = bundles_by_domain(svid);
    bundles.insert(
        format!("spiffe://{}", svid.identity.id().trust_domain()),
        own,
    );
    X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Updates<X509svidResponse>;
    type FetchX509BundlesStream = Updates<X509BundlesResponse>;
    type FetchJWTBundlesStream = Updates<JwtBundlesResponse>;
    type FetchWITSVIDStream = Updates<WitsvidResponse>;
    type FetchWITBundlesStream = Updates<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        const METHOD: &str = "FetchX509SVID";
        self.admit(METHOD, &request)?;
        Ok(Response::new(self.updates(METHOD, x509_svid_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        const METHOD: &str = "FetchX509Bundles";
        self.admit(METHOD, &request)?;
        Ok(Response::new(self.updates(METHOD, x509_bundles_response)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.unimplemented("FetchJWTSVID", &request)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.unimplemented("FetchJWTBundles", &request)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.unimplemented("ValidateJWTSVID", &request)
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        self.unimplemented("FetchWITSVID", &request)
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        self.unimplemented("FetchWITBundles", &request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_certs::test_util::TestPki;

    #[test]
    fn federated_roots_are_served_under_their_own_trust_domain() {
        let a = TestPki::new("a.mesh.local");
        let b = TestPki::new("b.mesh.local");
        let both =
            std::sync::Arc::new(halyard_certs::TrustBundle::clone(&a.bundle).merge(&b.bundle));
        let svid = Svid {
            identity: a.identity("reviews"),
            bundle: both,
        };
        let r = x509_svid_response(&svid);
        assert_eq!(r.svids[0].bundle, concat(a.bundle.roots()));
        assert_eq!(
            r.federated_bundles.keys().collect::<Vec<_>>(),
            ["spiffe://b.mesh.local"]
        );
        assert_eq!(
            r.federated_bundles["spiffe://b.mesh.local"],
            concat(b.bundle.roots())
        );
        let all = x509_bundles_response(&svid);
        assert_eq!(all.bundles.len(), 2);
        assert_eq!(
            all.bundles["spiffe://a.mesh.local"],
            concat(a.bundle.roots())
        );
        assert_eq!(
            all.bundles["spiffe://b.mesh.local"],
            concat(b.bundle.roots())
        );
    }
}
