//! The sidecar's configuration file (TOML, DESIGN §8), checked in full before anything binds.
//!
//! Loading goes TOML → `toml::Value` → typed structs through `serde_path_to_error`, so a bad value
//! is reported with its field path (`inbound.listen: invalid socket address syntax`); then the
//! rules serde cannot express (names, URLs, ranges) are checked with the same kind of message.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use halyard_registry::model::Name;
use halyard_transport::{RawTransportConfig, TransportConfig};
use serde::{Deserialize, Serialize};

pub use crate::bounds::{HeaderReadTimeout, LimitsConfig};
use crate::decide::budget::BudgetConfig;
use crate::decide::outlier::OutlierConfig;

/// A configuration problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A field has a bad value.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// Dotted field path.
        field: String,
        /// What is wrong and what would be valid.
        message: String,
    },
}

/// The whole sidecar configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Mesh name: the registry key prefix is `/halyard/<mesh>/`.
    #[serde(default = "default_mesh")]
    pub mesh: String,
    /// `etcd://host:port[,host:port...]` or `file:///path`.
    pub registry: String,
    /// Where the last good registry snapshot is kept (static stability).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// A file holding `user:password` of the etcd user this sidecar authenticates as (etcd
    /// RBAC; the user needs read and write on `/halyard/<mesh>/`); none connects without
    /// authentication. Relative paths are anchored at the config file's folder. Read at start.
    #[serde(default)]
    pub registry_credentials: Option<PathBuf>,
    /// A folder of credentials files for linked clusters' registries: a `ClusterLink` with
    /// `credentials: NAME` is read as the user in `<folder>/NAME` (`user:password`; read-only
    /// on the linked mesh's prefix is enough). Read at each attempt to open the link, so a
    /// file put there later or a changed password is picked up. Relative paths are anchored at
    /// the config file's folder.
    #[serde(default)]
    pub link_credentials: Option<PathBuf>,
    /// TLS towards an `etcds://` registry (required by it, refused with `etcd://`).
    #[serde(default)]
    pub registry_tls: Option<RegistryTlsConfig>,
    /// TTL of this endpoint's registry lease (etcd): a dead sidecar disappears after it.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This sidecar's id in the registry (endpoint and status keys); default `<service>-<advertise>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Threads running the data plane: 1 (default) a single-threaded runtime, N > 1 a runtime
    /// of N worker threads that flows, connections and listeners are spread over, 0 one per
    /// core the process may use. At most [`MAX_WORKERS`].
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Workload certificate files.
    pub identity: IdentityConfig,
    /// The service this sidecar fronts.
    pub service: ServiceConfig,
    /// Inbound QUIC.
    #[serde(default)]
    pub inbound: InboundConfig,
    /// Outbound capture.
    #[serde(default)]
    pub outbound: OutboundConfig,
    /// Egress gateway mode.
    #[serde(default)]
    pub egress: EgressConfig,
    /// Admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// QUIC transport tuning.
    #[serde(default)]
    pub transport: RawTransportConfig,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Timeouts, retries, drain.
    #[serde(default)]
    pub failure: FailureConfig,
    /// Metrics refresh.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// One JSON line per flow or request.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// Span export over OTLP.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Bounds on what local apps may make the sidecar hold (see `bounds`).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The SPIFFE Workload API for the local app; off when absent.
    #[serde(default)]
    pub workload_api: Option<WorkloadApiConfig>,
    /// The QUIC-LB configuration of this sidecar's connection IDs (what its cluster's east-west
    /// gateways route by); absent: config id 0, unencrypted.
    #[serde(default)]
    pub quic_lb: Option<QuicLbConfig>,
}

/// `[quic_lb]` of a sidecar, or one `[[quic_lb]]` entry of a gateway: a QUIC-LB configuration
/// (draft-ietf-quic-load-balancers-21 §3) of this cluster. Every sidecar of the cluster and
/// every east-west gateway in front of it must agree on it: a gateway routes a connection's
/// packets after the first by the sidecar's connection IDs, read with the gateway's
/// configuration of the same id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicLbConfig {
    /// The config rotation code point in the first octet of every connection ID, 0 to 6
    /// (default 0). A new key gets a new id: gateways hold old and new, sidecars move.
    #[serde(default)]
    pub config_id: u8,
    /// A file holding the 16-byte AES-128 key as 32 hex digits (`openssl rand -hex 16`); with
    /// it, connection IDs are encrypted and an observer cannot link a client's packets before
    /// and after it changes address. Relative paths are anchored at the config file's folder;
    /// read at start. None: unencrypted IDs, which name their server. A value that looks like
    /// a key itself (32 hex digits) is refused without being repeated.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl QuicLbConfig {
    /// Reads the key file and builds the configuration; the error names the file and never
    /// quotes its text.
    pub fn load(&self) -> Result<halyard_transport::quic_lb::LbConfig, String> {
        use halyard_transport::quic_lb::{LbConfig, LbKey};
        let key = match &self.key_file {
            None => None,
            Some(path) if looks_like_a_key(path) => {
                return Err("key_file names a file; this value looks like a key itself (32 hex digits): put the key in a file and name the file".into());
            }
            Some(path) => {
                let mut text =
                    read_small(path, 1024).map_err(|e| format!("key {}: {e}", path.display()))?;
                let key = LbKey::parse(&text);
                zeroize::Zeroize::zeroize(&mut text);
                Some(key.map_err(|e| format!("key {}: {e}", path.display()))?)
            }
        };
        LbConfig::new(self.config_id, key.as_ref()).map_err(|e| e.to_string())
    }
}

/// Whether the last part of `path` is 32 hex digits: a key written where its file belongs.
fn looks_like_a_key(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The text of a small file (at most `max` bytes, UTF-8).
fn read_small(path: &Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

/// `[workload_api]`: the SPIFFE Workload API (X.509-SVID profile) served to the local app on a
/// Unix socket, so an app that does its own TLS gets this sidecar's identity and trust bundle.
///
/// There is no workload attestation: whoever can connect to the socket gets the sidecar's
/// certificate and private key. The socket's file mode (and the permissions of its folder) are
/// therefore the access control, and the default mode lets only the sidecar's own user in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// The socket's path: absolute, at most [`SocketPath::MAX_LEN`] bytes. The app finds it in
    /// `SPIFFE_ENDPOINT_SOCKET=unix://<path>`.
    pub socket: SocketPath,
    /// The socket file's permission bits, an octal string of read/write bits only; default
    /// `"0600"`. `"0660"` admits the socket file's group, `"0666"` everyone who can reach the
    /// folder (SPIRE's choice; then the folder's permissions must do the job).
    #[serde(default)]
    pub mode: SocketMode,
}

/// An absolute Unix socket path short enough for `sockaddr_un` with room for the temporary
/// name it is bound under before it is renamed into place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PathBuf", into = "PathBuf")]
pub struct SocketPath(PathBuf);

impl SocketPath {
    /// Longest accepted path, bytes: `sun_path` holds 108 bytes with the terminating NUL, and
    /// the socket is first bound as `.wapi/s` beside its final name (up to 7 bytes more).
    pub const MAX_LEN: usize = 100;

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<PathBuf> for SocketPath {
    type Error = String;

    fn try_from(path: PathBuf) -> Result<Self, String> {
        let len = path.as_os_str().len();
        if !path.is_absolute() {
            return Err(format!("{path:?} must be an absolute path"));
        }
        if len > Self::MAX_LEN {
            return Err(format!(
                "{path:?} is {len} bytes; a Unix socket path may have at most {}",
                Self::MAX_LEN
            ));
        }
        if path.file_name().is_none() || path.ends_with("..") {
            return Err(format!("{path:?} must name a file"));
        }
        Ok(SocketPath(path))
    }
}

impl From<SocketPath> for PathBuf {
    fn from(p: SocketPath) -> PathBuf {
        p.0
    }
}

/// Permission bits of a Unix socket file: read and write bits only (`0600`, `0660`, `0666`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SocketMode(u32);

impl SocketMode {
    /// The bits, for `chmod`.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o600)
    }
}

impl TryFrom<String> for SocketMode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = || {
            format!("{text:?}: want an octal mode of read/write bits such as \"0600\", \"0660\" or \"0666\"")
        };
        let digits = text.strip_prefix("0o").unwrap_or(&text);
        if digits.is_empty() || digits.len() > 4 {
            return Err(bad());
        }
        let bits = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
        if bits & !0o666 != 0 {
            return Err(bad());
        }
        if bits & 0o600 != 0o600 {
            return Err(format!(
                "{text:?}: the owner (the sidecar) needs read and write (0600)"
            ));
        }
        Ok(SocketMode(bits))
    }
}

impl From<SocketMode> for String {
    fn from(m: SocketMode) -> String {
        format!("{:04o}", m.0)
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// How often gauges (registry, certificate, per-peer QUIC and pool figures) are refreshed.
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
}

/// `[access_log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write access log lines at all.
    #[serde(default)]
    pub enabled: bool,
    /// `-` for stdout, else a file appended to (relative to the config file's folder).
    #[serde(default = "default_access_path")]
    pub path: PathBuf,
    /// Lines queued for the writer; when full, further lines are dropped and counted.
    #[serde(default = "default_queue")]
    pub buffer: usize,
}

/// `[tracing]`: spans of proxied requests, exported over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL (`http://host:4318/v1/traces`); none: no export.
    #[serde(default)]
    pub collector: Option<String>,
    /// Spans queued for export; when full, further spans are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Spans per export request at most.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    /// An export request that takes longer fails; its spans are dropped and counted.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `[identity]`: PEM files, relative to the config file's folder unless absolute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 private key.
    pub key: PathBuf,
    /// Trust bundle: one or more roots.
    pub bundle: PathBuf,
    /// How often the files are checked for a renewed leaf.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// The mesh CA (`host:port`, default port 15012; an `https://` prefix is allowed). When set,
    /// the sidecar enrolls with `token` if it has no valid leaf, and renews its leaf from the
    /// CA before it expires; `cert`, `key` and `bundle` are then written by the sidecar (the
    /// bundle file must hold the mesh root to start with, to authenticate the CA).
    #[serde(default)]
    pub ca: Option<String>,
    /// Bootstrap token file, from `halyard ca token create` (enrollment only).
    #[serde(default)]
    pub token: Option<PathBuf>,
    /// Read-only PEM file with the mesh root(s) that authenticate the CA while `bundle` does not
    /// exist yet (a Kubernetes ConfigMap, a file shipped with the machine image); once enrolled,
    /// the sidecar keeps `bundle` current and uses it instead. Needs `ca`.
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// The SPIFFE id to enroll as; required with `ca`.
    #[serde(default)]
    pub id: Option<halyard_certs::SpiffeId>,
    /// Leaf lifetime to ask the CA for; default: the CA's (24 h).
    #[serde(default, with = "humantime_serde")]
    pub leaf_ttl: Option<Duration>,
    /// How long one request to the CA may take.
    #[serde(default = "default_ca_timeout", with = "humantime_serde")]
    pub ca_timeout: Duration,
}

fn default_ca_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[service]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name (DNS-1123 label).
    pub name: String,
    /// Namespace (DNS-1123 label).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Version; becomes the label `version`.
    #[serde(default)]
    pub version: Option<String>,
    /// More labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Cluster name, for locality-aware balancing.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Zone name, for locality-aware balancing.
    #[serde(default)]
    pub zone: String,
    /// Load-balancing weight of this endpoint.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// `[inbound]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// UDP address for QUIC from other sidecars.
    #[serde(default = "default_inbound")]
    pub listen: SocketAddr,
    /// Address registered as this endpoint; default: `listen` (its bound port when 0).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Host the app listens on, at each Service port's targetPort.
    #[serde(default = "default_app_host")]
    pub app_host: IpAddr,
    /// What requests to the app may do with path parameters (`;` in a path segment).
    #[serde(default)]
    pub path_parameters: PathParameters,
}

/// `inbound.path_parameters`: what happens to a request to this sidecar's app whose path has
/// parameters, a `;` (or `%3B`) in a segment: `/admin;jsessionid=1/users`.
///
/// RFC 3986 §3.3 leaves `;` to the application. Servlet containers (Tomcat, Jetty) and Spring
/// take it as the start of a segment's parameters and match what comes before it, so
/// `/admin;x` *is* `/admin` to them, and `/public/..;/admin` is `/admin`; other servers (Go,
/// Node) see `admin;x` as a name of its own. Whatever the setting, policy and routing match the
/// path with every segment's parameters removed and dot segments resolved after that (what a
/// servlet container resolves), so no spelling with `;` gets past a rule on the path it
/// resolves to; the setting only decides what is refused and what the app gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathParameters {
    /// Refuse any path with `;` or `%3B` in it (400), as Spring Security's `StrictHttpFirewall`
    /// does by default. The default: the same path means different resources to different
    /// servers, and this mesh refuses such paths rather than guess (as `%2F`).
    #[default]
    Reject,
    /// Remove every segment's parameters, then forward that path: the app gets exactly what
    /// policy matched (`/admin;jsessionid=1/users` arrives as `/admin/users`). For apps whose
    /// clients add parameters the app does not need, such as URL-rewritten session ids.
    Strip,
    /// Forward the path with its parameters (matrix parameters, JAX-RS `@MatrixParam`, Spring
    /// `@MatrixVariable`, `/app/;jsessionid=1`), while policy still matches it without them.
    /// Parameters that change which segments the path has (`/a/..;/b`, `/.;/b`, `/a/;/..`)
    /// are refused (400): the app could resolve such a path to another resource than the one
    /// the rules matched. For apps that, like those frameworks, route on the path without its
    /// parameters; a server that takes `;` as part of a name should stay on `reject` or `strip`.
    Keep,
}

/// `[outbound]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Explicit capture: a local TCP listener per entry.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Transparent capture (iptables REDIRECT target).
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
}

/// `[egress]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// This sidecar is an egress gateway: peers' CONNECTs to an ExternalService's `host:port`
    /// are admitted by that ExternalService's Policy and dialled from here.
    #[serde(default)]
    pub gateway: bool,
}

/// `[[outbound.upstreams]]`: local port → service port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Destination service.
    pub service: String,
    /// Destination service port.
    pub port: u16,
    /// Local TCP listener.
    pub listen: SocketAddr,
}

/// `[outbound.transparent]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// The REDIRECT target listener.
    #[serde(default = "default_capture")]
    pub listen: SocketAddr,
}

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin HTTP listener: /metrics, /healthz, /readyz, /config_dump.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

/// `[failure]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureConfig {
    /// How long a new flow waits for the peer's answer before trying another endpoint.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Further endpoints tried when a flow fails before any byte flowed back.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How long open flows may run on after SIGTERM before they are closed.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Close established inbound flows when policy turns to deny (default: they continue).
    #[serde(default)]
    pub close_flows_on_deny: bool,
    /// The retry budget per destination service, for L4 and L7 retries alike.
    #[serde(default)]
    pub retry_budget: BudgetConfig,
}

fn default_refresh() -> Duration {
    Duration::from_secs(1)
}
fn default_access_path() -> PathBuf {
    PathBuf::from("-")
}
fn default_queue() -> usize {
    4096
}
fn default_batch() -> usize {
    512
}
fn default_flush() -> Duration {
    Duration::from_secs(1)
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_mesh() -> String {
    "default".into()
}
/// The largest `workers` setting.
pub const MAX_WORKERS: usize = 256;

fn default_workers() -> usize {
    1
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_namespace() -> String {
    "default".into()
}
fn default_cluster() -> String {
    "local".into()
}
fn default_weight() -> u32 {
    1
}
fn default_reload() -> Duration {
    Duration::from_secs(5)
}
fn default_inbound() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15443))
}
fn default_app_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_capture() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_retries() -> u32 {
    2
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            listen: default_inbound(),
            advertise: None,
            app_host: default_app_host(),
            path_parameters: PathParameters::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin(),
        }
    }
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            connect_timeout: default_connect_timeout(),
            retries: default_retries(),
            drain_timeout: default_drain(),
            close_flows_on_deny: false,
            retry_budget: BudgetConfig::default(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            refresh_interval: default_refresh(),
        }
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            path: default_access_path(),
            buffer: default_queue(),
        }
    }
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            collector: None,
            queue: default_queue(),
            batch_size: default_batch(),
            flush_interval: default_flush(),
            timeout: default_export_timeout(),
        }
    }
}

/// A configuration that passed every check, with paths resolved and the transport settings
/// validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file as written (paths resolved), served at `/config_dump`.
    pub file: SidecarConfig,
    /// Validated QUIC settings.
    pub transport: TransportConfig,
    /// The service name.
    pub service: Name,
    /// Upstream service names, in `file.outbound.upstreams` order.
    pub upstream_services: Vec<Name>,
    /// The QUIC-LB configuration of this sidecar's connection IDs (`[quic_lb]`, key read).
    pub quic_lb: halyard_transport::quic_lb::LbConfig,
}

/// The text of the config file at `path`; an error names the file.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// TOML text → `T`, through `toml::Value` and `serde_path_to_error`: a syntax error names the
/// file, a bad value the file and the field path (`transport.congestion`). Shared by the
/// sidecar's, the CA server's and the gateway's configs.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Field {
        path: path.to_owned(),
        field: e.path().to_string(),
        message: one_line(&e.into_inner().to_string()),
    })
}

impl Config {
    /// The data-plane threads `workers` asks for: the setting, or with 0 the cores this process
    /// may run on (its CPU affinity and cgroup quota, `std::thread::available_parallelism`).
    pub fn worker_threads(&self) -> usize {
        match self.file.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(&read_file(path)?, path)
    }

    /// Checks configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let field = |field: String, message: String| ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        };
        let mut file: SidecarConfig = parse_toml(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut file.identity.cert,
            &mut file.identity.key,
            &mut file.identity.bundle,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let ident = &mut file.identity;
        for t in [ident.token.as_mut(), ident.ca_root.as_mut()]
            .into_iter()
            .flatten()
        {
            if t.is_relative() {
                *t = base.join(&*t);
            }
        }
        anchor(
            base,
            [
                file.registry_credentials.as_mut(),
                file.link_credentials.as_mut(),
                file.quic_lb.as_mut().and_then(|q| q.key_file.as_mut()),
            ],
        );
        if let Some(tls) = file.registry_tls.as_mut() {
            tls.anchor(base);
        }
        let log = &mut file.access_log.path;
        if log.is_relative() && log.as_os_str() != "-" {
            *log = base.join(&*log);
        }
        check(file, &field)
    }
}

/// `[registry_tls]`: TLS towards an `etcds://` registry (etcd's `--cert-file` setup, and
/// `--client-cert-auth` when `cert` and `key` are given). Relative paths are anchored at the
/// config file's folder; the files are read at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryTlsConfig {
    /// The CA certificate(s) etcd's serving certificate chains to (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM), for an etcd that requires one; with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl RegistryTlsConfig {
    /// Anchors its relative paths at `base`.
    pub(crate) fn anchor(&mut self, base: &Path) {
        anchor(
            base,
            [Some(&mut self.ca), self.cert.as_mut(), self.key.as_mut()],
        );
    }

    /// Checks that `cert` and `key` come together; the message names what is missing.
    pub(crate) fn check(&self) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err("cert is given without key".into()),
            (None, Some(_)) => Err("key is given without cert".into()),
            _ => Ok(()),
        }
    }
}

/// The etcd access of a config's `registry_credentials` (a `user:password` file) and
/// `[registry_tls]`, read from their files. Errors name the file.
pub fn registry_access(
    credentials: Option<&Path>,
    tls: Option<&RegistryTlsConfig>,
) -> Result<halyard_registry::Access, halyard_registry::RegistryError> {
    let credentials = credentials
        .map(halyard_registry::Credentials::from_file)
        .transpose()?;
    let tls = tls
        .map(|t| {
            let client = t.cert.as_deref().zip(t.key.as_deref());
            halyard_registry::EtcdTls::from_files(&t.ca, client)
        })
        .transpose()?;
    Ok(halyard_registry::Access { credentials, tls })
}

/// Joins each relative path among `paths` to `base` (the config file's folder).
pub(crate) fn anchor<'a>(base: &Path, paths: impl IntoIterator<Item = Option<&'a mut PathBuf>>) {
    for p in paths.into_iter().flatten() {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// Error text from serde on one line.
fn one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join(" ")
}

type FieldErr<'a> = &'a dyn Fn(String, String) -> ConfigError;

fn name(value: &str, at: &str, field: FieldErr<'_>) -> Result<Name, ConfigError> {
    Name::new(value).map_err(|e| field(at.into(), e.to_string()))
}

fn check(file: SidecarConfig, field: FieldErr<'_>) -> Result<Config, ConfigError> {
    name(&file.mesh, "mesh", field)?;
    check_registry_url(&file.registry).map_err(|m| field("registry".into(), m))?;
    check_registry_tls(&file.registry, file.registry_tls.as_ref())
        .map_err(|m| field("registry_tls".into(), m))?;
    let service = name(&file.service.name, "service.name", field)?;
    name(&file.service.namespace, "service.namespace", field)?;
    if let Some(id) = &file.id {
        name(id, "id", field)?;
    }
    let mut upstream_services = Vec::new();
    for (i, up) in file.outbound.upstreams.iter().enumerate() {
        upstream_services.push(name(
            &up.service,
            &format!("outbound.upstreams[{i}].service"),
            field,
        )?);
        if up.port == 0 {
            return Err(field(
                format!("outbound.upstreams[{i}].port"),
                "must be 1-65535".into(),
            ));
        }
    }
    check_listeners(&file, field)?;
    check_identity(&file.identity, field)?;
    let transport = TransportConfig::try_from(file.transport.clone())
        .map_err(|e| field("transport".into(), e.to_string()))?;
    if file.failure.connect_timeout.is_zero() {
        return Err(field(
            "failure.connect_timeout".into(),
            "must be positive".into(),
        ));
    }
    // A flow out of stream credit must fail as this side's limit before its connect attempt
    // times out, or the timeout is charged to a healthy endpoint.
    if file.failure.connect_timeout <= transport.stream_credit_wait() * 2 {
        return Err(field(
            "failure.connect_timeout".into(),
            "must exceed twice transport.stream_credit_wait_ms".into(),
        ));
    }
    if file.lease_ttl < Duration::from_secs(2) || file.lease_ttl > Duration::from_secs(300) {
        return Err(field(
            "lease_ttl".into(),
            "must be between 2s and 300s".into(),
        ));
    }
    if file.workers > MAX_WORKERS {
        return Err(field(
            "workers".into(),
            format!(
                "{} is more than {MAX_WORKERS} (0 means one per core)",
                file.workers
            ),
        ));
    }
    check_failure(&file.failure, field)?;
    check_telemetry(&file, field)?;
    let quic_lb = match &file.quic_lb {
        Some(q) => q.load().map_err(|m| field("quic_lb".into(), m))?,
        None => halyard_transport::quic_lb::LbConfig::default(),
    };
    Ok(Config {
        file,
        transport,
        service,
        upstream_services,
        quic_lb,
    })
}

fn check_identity(identity: &IdentityConfig, field: FieldErr<'_>) -> Result<(), ConfigError> {
    if identity.ca.is_some() && identity.id.is_none() {
        return Err(field(
            "identity.id".into(),
            "required with identity.ca: the SPIFFE id to enroll as".into(),
        ));
    }
    if identity.ca.is_none()
        && (identity.token.is_some() || identity.id.is_some() || identity.ca_root.is_some())
    {
        return Err(field(
            "identity.ca".into(),
            "identity.token, identity.id and identity.ca_root need identity.ca, the CA to enroll with"
                .into(),
        ));
    }
    if identity.leaf_ttl.is_some_and(|t| t.is_zero()) {
        return Err(field("identity.leaf_ttl".into(), "must be positive".into()));
    }
    Ok(())
}

fn check_failure(failure: &FailureConfig, field: FieldErr<'_>) -> Result<(), ConfigError> {
    if failure.retries > 10 {
        return Err(field("failure.retries".into(), "at most 10".into()));
    }
    let budget = &failure.retry_budget;
    if budget.percent > 100 {
        let at = "failure.retry_budget.percent";
        return Err(field(at.into(), "must be 0-100".into()));
    }
    if budget.min_per_second > 10_000 {
        let at = "failure.retry_budget.min_per_second";
        return Err(field(at.into(), "must be 0-10000".into()));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&budget.window) {
        let at = "failure.retry_budget.window";
        return Err(field(at.into(), "must be between 1s and 300s".into()));
    }
    Ok(())
}

fn check_telemetry(file: &SidecarConfig, field: FieldErr<'_>) -> Result<(), ConfigError> {
    // Each drives a tokio interval or a timeout; a zero period would panic the task.
    let positive = [
        ("identity.reload_interval", file.identity.reload_interval),
        (
            "telemetry.refresh_interval",
            file.telemetry.refresh_interval,
        ),
        ("tracing.flush_interval", file.tracing.flush_interval),
        ("tracing.timeout", file.tracing.timeout),
    ];
    for (at, d) in positive {
        if d.is_zero() {
            return Err(field(at.into(), "must be positive".into()));
        }
    }
    let sizes = [
        ("access_log.buffer", file.access_log.buffer),
        ("tracing.queue", file.tracing.queue),
        ("tracing.batch_size", file.tracing.batch_size),
    ];
    for (at, n) in sizes {
        if !(1..=1_000_000).contains(&n) {
            return Err(field(at.into(), "must be 1-1000000".into()));
        }
    }
    if let Some(url) = &file.tracing.collector {
        let ok = url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        if !ok {
            return Err(field(
                "tracing.collector".into(),
                format!("{url:?}: expected an http:// URL such as http://127.0.0.1:4318/v1/traces"),
            ));
        }
    }
    Ok(())
}

/// No two TCP listeners on the same address (port 0 excepted: each gets its own port).
fn check_listeners(file: &SidecarConfig, field: FieldErr<'_>) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<SocketAddr, String> = BTreeMap::new();
    let mut tcp = vec![("admin.listen".to_owned(), file.admin.listen)];
    for (i, up) in file.outbound.upstreams.iter().enumerate() {
        tcp.push((format!("outbound.upstreams[{i}].listen"), up.listen));
    }
    if let Some(t) = &file.outbound.transparent {
        tcp.push(("outbound.transparent.listen".into(), t.listen));
    }
    for (at, addr) in tcp {
        if addr.port() == 0 {
            continue;
        }
        if let Some(other) = seen.insert(addr, at.clone()) {
            return Err(field(at, format!("{addr} is already used by {other}")));
        }
    }
    Ok(())
}

/// Whether `[registry_tls]` fits `url`: required by `etcds://`, refused with `etcd://` and
/// `file://`, `cert` and `key` together.
pub fn check_registry_tls(url: &str, tls: Option<&RegistryTlsConfig>) -> Result<(), String> {
    match (url.starts_with("etcds://"), tls) {
        (true, None) => Err(format!(
            "{url:?} is etcds://: add [registry_tls] with `ca` (and `cert`, `key` if etcd requires a client certificate)"
        )),
        (false, Some(_)) => Err(format!(
            "[registry_tls] is given but {url:?} is not etcds://"
        )),
        (_, Some(t)) => t.check(),
        (_, None) => Ok(()),
    }
}

/// `etcd://host:port[,host:port...]`, `etcds://host:port[,...]` or `file:///absolute/path`.
pub fn check_registry_url(url: &str) -> Result<(), String> {
    if url.contains('@') {
        // Not echoed: the part before '@' is likely a password.
        return Err("user information (user:password@) does not go in the registry URL, where it would be shown and logged; use registry_credentials = \"FILE\"".into());
    }
    if let Some(hosts) = url
        .strip_prefix("etcd://")
        .or_else(|| url.strip_prefix("etcds://"))
    {
        for h in hosts.split(',') {
            let ok = h.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(format!("{h:?} in {url:?} is not host:port"));
            }
        }
        Ok(())
    } else if let Some(dir) = url.strip_prefix("file://") {
        if dir.starts_with('/') {
            Ok(())
        } else {
            Err(format!(
                "{url:?}: a directory registry needs an absolute path: file:///path"
            ))
        }
    } else {
        Err(format!(
            "{url:?}: expected etcd://host:port[,host:port...], etcds://host:port[,...] or file:///path"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
registry = "file:///var/lib/halyard/registry"
[identity]
cert = "cert.pem"
key = "key.pem"
bundle = "bundle.pem"
[service]
name = "reviews"
version = "v2"
[inbound]
listen = "127.0.0.1:0"
[[outbound.upstreams]]
service = "ratings"
port = 9080
listen = "127.0.0.1:19080"
"#;

    fn good() -> Config {
        Config::parse(GOOD, Path::new("/etc/halyard/sidecar.toml")).unwrap()
    }

    #[test]
    fn a_good_config_resolves_paths_against_its_file() {
        let c = good();
        assert_eq!(c.file.identity.cert, Path::new("/etc/halyard/cert.pem"));
        assert_eq!(c.upstream_services[0].as_str(), "ratings");
    }

    #[test]
    fn credentials_paths_are_anchored_at_the_file_and_shown_without_secrets() {
        let text = format!(
            "registry_credentials = \"etcd.credentials\"\nlink_credentials = \"/etc/halyard/links\"\n{GOOD}"
        );
        let c = Config::parse(&text, Path::new("/etc/halyard/s.toml")).unwrap();
        assert_eq!(
            c.file.registry_credentials.as_deref(),
            Some(Path::new("/etc/halyard/etcd.credentials"))
        );
        assert_eq!(
            c.file.link_credentials.as_deref(),
            Some(Path::new("/etc/halyard/links"))
        );
        assert!(good().file.registry_credentials.is_none());
    }

    #[test]
    fn registry_tls_must_fit_the_url() {
        let with = |url: &str, tls: &str| {
            let text = GOOD.replace(
                "registry = \"file:///var/lib/halyard/registry\"",
                &format!("registry = \"{url}\"\n{tls}"),
            );
            Config::parse(&text, Path::new("/etc/halyard/s.toml"))
        };
        let tls = "registry_tls = { ca = \"etcd-ca.pem\", cert = \"c.pem\", key = \"c.key\" }";
        let c = with("etcds://10.0.0.1:2379", tls).unwrap();
        let t = c.file.registry_tls.clone().unwrap();
        assert_eq!(t.ca, Path::new("/etc/halyard/etcd-ca.pem"));
        assert_eq!(t.key.as_deref(), Some(Path::new("/etc/halyard/c.key")));
        for (url, tls, want) in [
            ("etcds://10.0.0.1:2379", "", "add [registry_tls]"),
            ("etcd://10.0.0.1:2379", tls, "not etcds://"),
            (
                "etcds://10.0.0.1:2379",
                "registry_tls = { ca = \"a.pem\", cert = \"c.pem\" }",
                "without key",
            ),
        ] {
            let err = with(url, tls).unwrap_err().to_string();
            assert!(err.contains("registry_tls") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_good_config_fills_in_the_defaults() {
        let c = good();
        assert_eq!(c.file.mesh, "default");
        assert_eq!(c.file.admin.listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.file.failure.connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn path_parameters_are_refused_unless_the_config_says_otherwise() {
        assert_eq!(good().file.inbound.path_parameters, PathParameters::Reject);
        let keep = GOOD.replace("listen = \"127.0.0.1:0\"", "path_parameters = \"keep\"");
        let c = Config::parse(&keep, Path::new("s.toml")).unwrap();
        assert_eq!(c.file.inbound.path_parameters, PathParameters::Keep);
        let dump = serde_json::to_value(&c.file).unwrap();
        assert_eq!(dump["inbound"]["path_parameters"], "keep");
    }

    #[test]
    fn the_workload_api_is_off_unless_configured() {
        assert!(good().file.workload_api.is_none());
        let on = format!("{GOOD}\n[workload_api]\nsocket = \"/run/halyard/workload.sock\"\n");
        let c = Config::parse(&on, Path::new("s.toml")).unwrap();
        let api = c.file.workload_api.clone().unwrap();
        assert_eq!(api.socket.path(), Path::new("/run/halyard/workload.sock"));
        assert_eq!(api.mode.bits(), 0o600);
        let dump = serde_json::to_value(&c.file).unwrap();
        assert_eq!(dump["workload_api"]["socket"], "/run/halyard/workload.sock");
        assert_eq!(dump["workload_api"]["mode"], "0600");
        let open = on.replace(".sock\"\n", ".sock\"\nmode = \"0666\"\n");
        let c = Config::parse(&open, Path::new("s.toml")).unwrap();
        assert_eq!(c.file.workload_api.unwrap().mode.bits(), 0o666);
    }

    #[test]
    fn workers_default_to_one_and_zero_means_one_per_core() {
        assert_eq!(good().file.workers, 1);
        assert_eq!(good().worker_threads(), 1);
        let per_core = Config::parse(&format!("workers = 0\n{GOOD}"), Path::new("s.toml")).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(per_core.worker_threads(), cores);
        let dump = serde_json::to_value(&per_core.file).unwrap();
        assert_eq!(dump["workers"], 0);
        let four = Config::parse(&format!("workers = 4\n{GOOD}"), Path::new("s.toml")).unwrap();
        assert_eq!(four.worker_threads(), 4);
    }

    /// `[quic_lb]`: the key file is read at load (anchored at the config's folder); a bad key,
    /// a missing file or an id out of range names the field and the file, never the key.
    #[test]
    fn quic_lb_keys_are_read_at_load_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        let key = "8f95f09245765f80256934e50c66207f";
        std::fs::write(dir.path().join("lb.key"), format!("{key}\n")).unwrap();
        let on = format!("{GOOD}\n[quic_lb]\nconfig_id = 2\nkey_file = \"lb.key\"\n");
        let config = Config::parse(&on, &path).unwrap();
        assert_eq!(config.quic_lb.id(), 2);
        assert!(config.quic_lb.encrypted());
        assert!(!format!("{config:?}").contains(key));
        let off = Config::parse(GOOD, &path).unwrap();
        assert_eq!(off.quic_lb.id(), 0);
        assert!(!off.quic_lb.encrypted());

        std::fs::write(
            dir.path().join("bad.key"),
            "8f95f09245765f80256934e50c66207\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("big.key"), "0".repeat(5000)).unwrap();
        for (text, says) in [
            ("config_id = 7\n", "config id 7"),
            ("key_file = \"bad.key\"\n", "bad.key"),
            ("key_file = \"big.key\"\n", "larger than"),
            ("key_file = \"missing.key\"\n", "missing.key"),
            ("key = \"lb.key\"\n", "key"),
            (
                "key_file = \"8f95f09245765f80256934e50c66207f\"\n",
                "looks like a key",
            ),
        ] {
            let err = Config::parse(&format!("{GOOD}\n[quic_lb]\n{text}"), &path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("quic_lb") && err.contains(says),
                "{text}: {err}"
            );
            assert!(!err.contains("8f95"), "{err}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (GOOD.replace("127.0.0.1:0", "nowhere"), "inbound.listen"),
            (
                GOOD.replace("name = \"reviews\"", "name = \"Reviews!\""),
                "service.name",
            ),
            (GOOD.replace("file:///var", "file://var"), "registry"),
            (
                GOOD.replace("port = 9080", "port = 70000"),
                "outbound.upstreams[0].port",
            ),
            (
                GOOD.replace("port = 9080", "port = 0"),
                "outbound.upstreams[0].port",
            ),
            (
                GOOD.replace("version = \"v2\"", "versoin = \"v2\""),
                "service",
            ),
            (
                format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:19080\"\n"),
                "outbound.upstreams[0].listen",
            ),
            (
                format!("{GOOD}\n[failure]\nconnect_timeout = \"soon\"\n"),
                "failure.connect_timeout",
            ),
            (
                format!("{GOOD}\n[transport]\nmax_concurrent_bidi_streams = 0\n"),
                "transport",
            ),
            (
                format!("{GOOD}\n[transport]\nstream_credit_wait_ms = 1000\n"),
                "failure.connect_timeout",
            ),
            (
                format!("{GOOD}\n[transport]\ninitial_mtu = 1500\n"),
                "transport",
            ),
            (
                format!("{GOOD}\n[tracing]\ncollector = \"https://x:4318\"\n"),
                "tracing.collector",
            ),
            (
                format!("{GOOD}\n[access_log]\nbuffer = 0\n"),
                "access_log.buffer",
            ),
            (
                GOOD.replace("bundle.pem\"", "bundle.pem\"\nreload_interval = \"0s\""),
                "identity.reload_interval",
            ),
            (
                format!("{GOOD}\n[access_log]\nenabeld = true\n"),
                "access_log",
            ),
            (
                GOOD.replace("bundle.pem\"", "bundle.pem\"\nca_root = \"root.pem\""),
                "identity.ca",
            ),
            (
                GOOD.replace("listen = \"127.0.0.1:0\"", "path_parameters = \"drop\""),
                "inbound.path_parameters",
            ),
            (
                format!("{GOOD}\n[workload_api]\nsocket = \"run/w.sock\"\n"),
                "workload_api.socket",
            ),
            (
                format!(
                    "{GOOD}\n[workload_api]\nsocket = \"/{}\"\n",
                    "d".repeat(100)
                ),
                "workload_api.socket",
            ),
            (
                format!("{GOOD}\n[workload_api]\nsocket = \"/w.sock\"\nmode = \"0777\"\n"),
                "workload_api.mode",
            ),
            (
                format!("{GOOD}\n[workload_api]\nsocket = \"/w.sock\"\nmode = \"0066\"\n"),
                "workload_api.mode",
            ),
            (
                format!("{GOOD}\n[workload_api]\nsocket = \"/w.sock\"\nmode = \"rw\"\n"),
                "workload_api.mode",
            ),
            (
                format!("{GOOD}\n[workload_api]\nsocket = \"/w.sock\"\nmod = \"0600\"\n"),
                "workload_api",
            ),
            (format!("workers = 257\n{GOOD}"), "workers"),
            (format!("workers = -1\n{GOOD}"), "workers"),
            (format!("workers = \"two\"\n{GOOD}"), "workers"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, Path::new("s.toml")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("s.toml: field `"), "{msg}");
            assert!(msg.contains(&format!("`{want}`")), "want {want}: {msg}");
        }
        let mtu = format!("{GOOD}\n[transport]\ninitial_mtu = 1500\n");
        let err = Config::parse(&mtu, Path::new("s.toml")).unwrap_err();
        assert!(err.to_string().contains("transport.initial_mtu"), "{err}");
        let syntax = Config::parse("registry = ", Path::new("s.toml")).unwrap_err();
        assert!(syntax.to_string().contains("not valid TOML"));
    }
}
