//! `halyard sample-app`: the demo's services, in the spirit of Istio's bookinfo.
//!
//! One small HTTP/1.1 server per service (productpage → details, reviews; reviews v2/v3 →
//! ratings). Each answer is JSON with the service's name, version and its dependencies' answers.
//! Dependencies are called through the local sidecar's upstream listeners (`--call
//! SERVICE=URL`), one fresh connection per call, so every call is its own flow on an L4 (`tcp`)
//! service port as well as its own request on an L7 (`http`) one. `x-user` and `traceparent` are
//! passed on. A dependency that fails leaves the page degraded (`"error"` in its place), not
//! failed, as bookinfo's productpage does when reviews or ratings are away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Headers passed on to dependencies.
pub const PROPAGATED: [&str; 2] = ["x-user", "traceparent"];

/// How long a dependency call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `halyard sample-app`.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleAppArgs {
    /// Service name reported in answers.
    #[arg(long)]
    pub service: String,
    /// Version reported in answers.
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// TCP address to serve HTTP/1.1 on.
    #[arg(long, default_value = "127.0.0.1:9080")]
    pub listen: SocketAddr,
    /// A dependency, called on every request: SERVICE=URL (the local sidecar's upstream).
    #[arg(long = "call", value_parser = parse_call)]
    pub calls: Vec<Dependency>,
    /// Share of requests answered 503, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Delay added before every answer (e.g. 20ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
}

/// One `--call SERVICE=URL`.
#[derive(Debug, Clone)]
pub struct Dependency {
    /// The dependency's name, the key of its answer.
    pub service: String,
    /// Where to call it: `http://host:port/path`.
    pub url: Uri,
}

fn parse_call(s: &str) -> Result<Dependency, String> {
    let (service, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SERVICE=URL"))?;
    let url: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if url.scheme_str() != Some("http") || url.authority().is_none() {
        return Err(format!("{url}: expected http://host:port/path"));
    }
    Ok(Dependency {
        service: service.to_owned(),
        url,
    })
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?}: expected a share between 0.0 and 1.0")),
    }
}

/// Runs `halyard sample-app` until SIGTERM or SIGINT.
pub fn run(args: SampleAppArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
        let stop = CancellationToken::new();
        halyard_sidecar::signal::cancel_on_signal(&stop);
        tracing::info!(service = %args.service, version = %args.version, listen = %args.listen, "sample app serving");
        serve(Arc::new(args), listener, stop).await;
        Ok(())
    })
}

/// Serves HTTP/1.1 on `listener` until `stop`.
pub async fn serve(app: Arc<SampleAppArgs>, listener: TcpListener, stop: CancellationToken) {
    let grace = Duration::from_secs(2);
    halyard_sidecar::serve_http1(
        listener,
        stop,
        "sample-app",
        grace,
        app,
        |app, req| async move { handle(&app, req).await },
    )
    .await;
}

async fn handle(app: &SampleAppArgs, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !app.latency.is_zero() {
        tokio::time::sleep(app.latency).await;
    }
    if app.fail_rate > 0.0 && rand::random::<f64>() < app.fail_rate {
        let body =
            json!({"service": app.service, "version": app.version, "error": "injected failure"});
        return answer(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    let passed = propagated(req.headers());
    let calls = futures::future::join_all(app.calls.iter().map(|d| call_dependency(d, &passed)));
    let mut deps = serde_json::Map::new();
    let mut degraded = false;
    for (dep, result) in app.calls.iter().zip(calls.await) {
        degraded |= result.get("error").is_some() || result.get("degraded") == Some(&json!(true));
        deps.insert(dep.service.clone(), result);
    }
    let mut body = json!({"service": app.service, "version": app.version, "calls": deps});
    if degraded {
        body["degraded"] = json!(true);
    }
    if let Some(user) = passed.get("x-user").and_then(|v| v.to_str().ok()) {
        body["user"] = json!(user);
    }
    answer(StatusCode::OK, &body)
}

fn answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The headers of `headers` that are passed on to dependencies.
pub fn propagated(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PROPAGATED {
        if let Some(v) = headers.get(name) {
            out.insert(name, v.clone());
        }
    }
    out
}

/// One dependency's answer as JSON, or `{"error": ...}`.
async fn call_dependency(dep: &Dependency, headers: &HeaderMap) -> Value {
    match get(&dep.url, headers, CALL_TIMEOUT).await {
        Ok((status, body)) if status.is_success() => {
            serde_json::from_slice(&body).unwrap_or_else(|_| json!({"error": "answer is not JSON"}))
        }
        Ok((status, _)) => json!({"error": format!("status {}", status.as_u16())}),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

/// GET `url` on a fresh connection (`Connection: close`), with `headers`; the status and the
/// whole body, within `timeout`.
pub async fn get(
    url: &Uri,
    headers: &HeaderMap,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Bytes)> {
    tokio::time::timeout(timeout, get_inner(url, headers))
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?}"))?
}

async fn get_inner(url: &Uri, headers: &HeaderMap) -> anyhow::Result<(StatusCode, Bytes)> {
    let authority = url
        .authority()
        .ok_or_else(|| anyhow!("{url}: no host:port"))?;
    let port = authority.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((authority.host(), port))
        .await
        .context("connect")?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let driver = tokio::spawn(conn);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    req.headers_mut()
        .extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    let result = async {
        let resp = sender.send_request(req).await.context("request")?;
        let status = resp.status();
        let body = resp.into_body().collect().await.context("body")?.to_bytes();
        anyhow::Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

/// Checks an answer's shape: `service` and `version` present.
#[cfg(test)]
fn describe(body: &[u8]) -> anyhow::Result<(String, String)> {
    let v: Value = serde_json::from_slice(body).context("answer is not JSON")?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match (field("service"), field("version")) {
        (Some(s), Some(ver)) => Ok((s, ver)),
        _ => anyhow::bail!("answer lacks service or version"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_arguments_are_checked() {
        let d = parse_call("reviews=http://127.0.0.1:19080/reviews").unwrap();
        assert_eq!(d.service, "reviews");
        assert_eq!(d.url.port_u16(), Some(19080));
        assert!(parse_call("reviews").is_err());
        assert!(parse_call("reviews=https://x:1/").is_err());
        assert!(parse_call("reviews=/path").is_err());
        assert!(parse_rate("0.5").is_ok());
        assert!(parse_rate("1.5").is_err());
    }

    /// reviews v2 calling ratings (up) and details (a closed port), asked `GET /` with
    /// `x-user: tester`: the status and the body of its answer.
    async fn reviews_with_one_dead_dependency() -> (StatusCode, bytes::Bytes) {
        let ratings = start(SampleAppArgs {
            service: "ratings".into(),
            version: "v1".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            calls: vec![],
            fail_rate: 0.0,
            latency: Duration::ZERO,
        })
        .await;
        let (_held, dead_addr) = halyard_sidecar::test_util::refused_addr();
        let reviews = start(SampleAppArgs {
            service: "reviews".into(),
            version: "v2".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            calls: vec![
                parse_call(&format!("ratings=http://{ratings}/ratings")).unwrap(),
                parse_call(&format!("details=http://{dead_addr}/")).unwrap(),
            ],
            fail_rate: 0.0,
            latency: Duration::ZERO,
        })
        .await;
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("tester"));
        let url: Uri = format!("http://{reviews}/").parse().unwrap();
        get(&url, &h, Duration::from_secs(5)).await.unwrap()
    }

    #[tokio::test]
    async fn answers_with_what_each_dependency_said() {
        let (status, body) = reviews_with_one_dead_dependency().await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["version"], "v2");
        assert_eq!(v["calls"]["ratings"]["service"], "ratings");
        assert!(v["calls"]["details"]["error"].is_string());
        assert_eq!(v["degraded"], true);
        assert_eq!(describe(&body).unwrap().1, "v2");
    }

    #[tokio::test]
    async fn passes_the_user_header_on_to_its_dependencies() {
        let (_, body) = reviews_with_one_dead_dependency().await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["calls"]["ratings"]["user"], "tester");
    }

    fn details(fail_rate: f64, latency: Duration) -> SampleAppArgs {
        SampleAppArgs {
            service: "details".into(),
            version: "v1".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            calls: vec![],
            fail_rate,
            latency,
        }
    }

    #[tokio::test]
    async fn a_fail_rate_of_one_fails_every_request() {
        let failing = start(details(1.0, Duration::ZERO)).await;
        let url: Uri = format!("http://{failing}/").parse().unwrap();
        let (status, _) = get(&url, &HeaderMap::new(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn latency_delays_every_answer() {
        let slow = start(details(0.0, Duration::from_millis(100))).await;
        let url: Uri = format!("http://{slow}/").parse().unwrap();
        let t = std::time::Instant::now();
        let (status, _) = get(&url, &HeaderMap::new(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(t.elapsed() >= Duration::from_millis(100));
    }

    async fn start(args: SampleAppArgs) -> SocketAddr {
        let l = TcpListener::bind(args.listen).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(Arc::new(args), l, CancellationToken::new()));
        addr
    }
}
