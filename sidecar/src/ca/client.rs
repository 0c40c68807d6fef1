//! The sidecar's side of the CA protocol: enrollment with a token, renewal with the current
//! leaf. One short TLS 1.3 connection per request; the CA must present the CA id of the
//! workload's trust domain, chained to the workload's bundle.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halyard_certs::enroll::BootstrapToken;
use halyard_certs::{CertResolver, ExpectedServer, SpiffeId, TrustBundle};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::{Refusal, SignRequest, Signed};

/// Largest answer read, bytes.
const MAX_ANSWER: usize = 256 * 1024;

/// Why a request to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// No connection (refused, unreachable, timed out): retry later.
    #[error("CA at {addr} unreachable: {reason}")]
    Unreachable {
        /// The CA address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The CA refused the request; retrying the same request will not help.
    #[error("CA at {addr} refused ({status}): {error}")]
    Refused {
        /// The CA address.
        addr: String,
        /// HTTP status.
        status: StatusCode,
        /// The CA's reason.
        error: String,
    },
    /// The CA's answer is not what the protocol says.
    #[error("CA at {addr} answered badly: {reason}")]
    BadAnswer {
        /// The CA address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The local TLS setup failed.
    #[error("TLS setup for the CA failed: {0}")]
    Tls(#[from] halyard_certs::CertError),
}

impl CaClientError {
    /// Whether a later retry of the same request may succeed (the CA was not reached, or it
    /// was itself unavailable).
    pub fn retryable(&self) -> bool {
        match self {
            CaClientError::Unreachable { .. } | CaClientError::BadAnswer { .. } => true,
            CaClientError::Refused { status, .. } => status.is_server_error(),
            CaClientError::Tls(_) => false,
        }
    }
}

/// A client of one CA address.
#[derive(Debug, Clone)]
pub struct CaClient {
    addr: String,
    ca_id: SpiffeId,
    timeout: Duration,
}

impl CaClient {
    /// A client of the CA at `addr` (`host:port`, an `https://` prefix is allowed) that must
    /// present `ca_id`; each request gives up after `timeout`.
    pub fn new(addr: &str, ca_id: SpiffeId, timeout: Duration) -> Self {
        let addr = addr.strip_prefix("https://").unwrap_or(addr);
        CaClient {
            addr: addr.trim_end_matches('/').to_owned(),
            ca_id,
            timeout,
        }
    }

    /// Enrolls with a bootstrap token: no client certificate.
    pub async fn enroll(
        &self,
        bundle: Arc<TrustBundle>,
        token: &BootstrapToken,
        request: &SignRequest,
    ) -> Result<Signed, CaClientError> {
        let tls = halyard_certs::tls::anonymous_client_config(
            bundle,
            ExpectedServer::Id(self.ca_id.clone()),
        )?;
        let auth = format!("Bearer {}", token.secret());
        self.post(tls, "/v1/enroll", Some(auth), request).await
    }

    /// Renews with the current leaf as client certificate.
    pub async fn renew(
        &self,
        bundle: Arc<TrustBundle>,
        current: Arc<CertResolver>,
        request: &SignRequest,
    ) -> Result<Signed, CaClientError> {
        let tls = halyard_certs::tls::client_config(
            current,
            bundle,
            ExpectedServer::Id(self.ca_id.clone()),
        )?;
        self.post(tls, "/v1/renew", None, request).await
    }

    async fn post(
        &self,
        tls: rustls::ClientConfig,
        path: &str,
        auth: Option<String>,
        request: &SignRequest,
    ) -> Result<Signed, CaClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(tls, path, auth, request)).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn exchange(
        &self,
        mut tls: rustls::ClientConfig,
        path: &str,
        auth: Option<String>,
        request: &SignRequest,
    ) -> Result<Signed, CaClientError> {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        // SVIDs carry no DNS name: the verifier checks the CA's SPIFFE id instead.
        let name = rustls::pki_types::ServerName::try_from("halyard-ca")
            .map_err(|e| self.unreachable(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let result = self.send(&mut send, path, auth, request).await;
        driver.abort();
        result
    }

    async fn send(
        &self,
        send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        path: &str,
        auth: Option<String>,
        request: &SignRequest,
    ) -> Result<Signed, CaClientError> {
        let body = serde_json::to_vec(request).map_err(|e| self.bad(e.to_string()))?;
        let mut req = Request::post(path)
            .header(http::header::HOST, &self.addr)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.bad(e.to_string()))?;
        // TLS 1.3: a client certificate the CA refuses shows up here, as a failed request.
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.unreachable(e.to_string()))?
            .to_bytes();
        if status == StatusCode::OK {
            return serde_json::from_slice(&bytes).map_err(|e| self.bad(e.to_string()));
        }
        let error = serde_json::from_slice::<Refusal>(&bytes)
            .map(|r| r.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(CaClientError::Refused {
            addr: self.addr.clone(),
            status,
            error,
        })
    }

    fn unreachable(&self, reason: String) -> CaClientError {
        CaClientError::Unreachable {
            addr: self.addr.clone(),
            reason,
        }
    }

    fn bad(&self, reason: String) -> CaClientError {
        CaClientError::BadAnswer {
            addr: self.addr.clone(),
            reason,
        }
    }
}
