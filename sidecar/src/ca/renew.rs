//! The sidecar's own leaf from the CA: enrollment at start when there is no valid leaf, then
//! renewal at half-life with jitter (`RenewalPolicy`), retried with backoff. A failed renewal
//! keeps the current leaf in use until it expires, and says so on `/readyz`, in the log (once
//! per failure streak) and in `halyard_cert_renewal_failures_total`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use halyard_certs::enroll::BootstrapToken;
use halyard_certs::pem::write_atomic;
use halyard_certs::rotation::RenewalPolicy;
use halyard_certs::{CertResolver, SpiffeId, TrustBundle, WorkloadIdentity};
use tokio_util::sync::CancellationToken;

use super::client::{CaClient, CaClientError};
use super::{SignRequest, Signed};
use crate::config::IdentityConfig;
use crate::identity::InForce;

/// Why the sidecar could not get a leaf from the CA.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollError {
    /// The request to the CA failed.
    #[error(transparent)]
    Ca(#[from] CaClientError),
    /// There is no usable token to enroll with.
    #[error("identity.token = {path:?}: {reason}")]
    Token {
        /// The token file.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The CA's answer is not a usable identity (nothing was written).
    #[error("the CA's certificate for {id} is not usable: {source}")]
    Answer {
        /// The id asked for.
        id: String,
        /// What is wrong with it.
        source: halyard_certs::CertError,
    },
}

impl EnrollError {
    /// Whether retrying later may help.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            EnrollError::Ca(e) => e.retryable(),
            EnrollError::Token { .. } | EnrollError::Answer { .. } => false,
        }
    }
}

/// Gets leaves from the CA for one sidecar and writes them to its identity files.
#[derive(Debug)]
pub(crate) struct Enroller {
    client: CaClient,
    files: IdentityConfig,
    id: SpiffeId,
    policy: RenewalPolicy,
}

impl Enroller {
    /// An enroller for `[identity]`, or `None` when it names no CA.
    pub(crate) fn new(files: &IdentityConfig) -> anyhow::Result<Option<Self>> {
        let (Some(addr), Some(id)) = (&files.ca, &files.id) else {
            return Ok(None);
        };
        let ca_id = super::ca_id(&id.trust_domain())?;
        Ok(Some(Enroller {
            client: CaClient::new(addr, ca_id, files.ca_timeout),
            files: files.clone(),
            id: id.clone(),
            policy: RenewalPolicy::default(),
        }))
    }

    /// The leaf on disk if it is for this id and still valid at `now`.
    pub(crate) fn valid_on_disk(&self, now: SystemTime) -> Option<WorkloadIdentity> {
        let ident = WorkloadIdentity::load(&self.files.cert, &self.files.key).ok()?;
        (ident.id() == &self.id && ident.not_after() > now).then_some(ident)
    }

    /// The bundle file, or before the first enrollment wrote it, `ca_root`.
    fn bundle(&self) -> Result<Arc<TrustBundle>, EnrollError> {
        let path = match &self.files.ca_root {
            Some(root) if !self.files.bundle.exists() => root,
            _ => &self.files.bundle,
        };
        TrustBundle::load(path)
            .map(Arc::new)
            .map_err(|source| EnrollError::Answer {
                id: self.id.to_string(),
                source,
            })
    }

    fn request(&self, csr: String) -> SignRequest {
        SignRequest {
            csr,
            ttl_seconds: self.files.leaf_ttl.map(|t| t.as_secs().max(1)),
        }
    }

    /// Enrolls with the token file: a key made here, a CSR, the leaf and bundle written.
    pub(crate) async fn enroll(&self) -> Result<WorkloadIdentity, EnrollError> {
        let token = self.token()?;
        let (key, csr) = self.csr()?;
        let signed = self
            .client
            .enroll(self.bundle()?, &token, &self.request(csr))
            .await?;
        self.install(&signed, &key)
    }

    /// Renews with the current leaf as credential.
    pub(crate) async fn renew(
        &self,
        current: Arc<CertResolver>,
    ) -> Result<(WorkloadIdentity, Signed), EnrollError> {
        let (key, csr) = self.csr()?;
        let signed = self
            .client
            .renew(self.bundle()?, current, &self.request(csr))
            .await?;
        let ident = self.install(&signed, &key)?;
        Ok((ident, signed))
    }

    fn token(&self) -> Result<BootstrapToken, EnrollError> {
        let err = |reason: String| EnrollError::Token {
            path: self
                .files
                .token
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason,
        };
        let path = self.files.token.as_deref().ok_or_else(|| {
            err("no token file configured and no valid leaf: nothing to enroll with".into())
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        BootstrapToken::parse(&text).map_err(|e| err(e.to_string()))
    }

    /// A fresh key (PEM) and a CSR for it: the key never leaves this machine.
    fn csr(&self) -> Result<(String, String), EnrollError> {
        let (key, csr) = halyard_certs::workload::generate_csr(&self.id).map_err(|source| {
            EnrollError::Answer {
                id: self.id.to_string(),
                source,
            }
        })?;
        Ok((key.serialize_pem(), csr))
    }

    /// Checks the answer, then writes bundle, key (0600) and leaf, each atomically; a bad
    /// answer writes nothing.
    fn install(&self, signed: &Signed, key_pem: &str) -> Result<WorkloadIdentity, EnrollError> {
        let answer = |source| EnrollError::Answer {
            id: self.id.to_string(),
            source,
        };
        let ident = WorkloadIdentity::from_pem(&signed.chain, key_pem).map_err(answer)?;
        if ident.id() != &self.id {
            return Err(answer(halyard_certs::CertError::IdChanged {
                old: self.id.to_string(),
                new: ident.id().to_string(),
            }));
        }
        TrustBundle::from_pem(&signed.bundle).map_err(answer)?;
        write_atomic(&self.files.bundle, &signed.bundle, 0o644).map_err(answer)?;
        write_atomic(&self.files.key, key_pem, 0o600).map_err(answer)?;
        write_atomic(&self.files.cert, &signed.chain, 0o644).map_err(answer)?;
        Ok(ident)
    }

    /// The identity to start with: the leaf on disk while valid, else a new one by enrollment,
    /// retried with backoff while the CA is unreachable. A refused enrollment ends the start.
    pub(crate) async fn initial(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<WorkloadIdentity>, EnrollError> {
        if let Some(ident) = self.valid_on_disk(SystemTime::now()) {
            return Ok(Some(ident));
        }
        let mut attempt = 0;
        loop {
            match self.enroll().await {
                Ok(ident) => {
                    tracing::info!(id = %ident.id(), "enrolled with the CA");
                    return Ok(Some(ident));
                }
                Err(e) if e.retryable() => {
                    if attempt == 0 {
                        tracing::warn!(error = %e, "enrollment failed; retrying");
                    }
                    let far = SystemTime::now() + Duration::from_secs(3600);
                    let wait =
                        self.policy
                            .retry_delay(attempt, rand::random(), SystemTime::now(), far);
                    attempt += 1;
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reports of the renewal loop to the rest of the sidecar.
pub(crate) struct Hooks {
    /// Called with each new leaf's bundle text when it differs from the last one.
    pub(crate) on_bundle: Box<dyn Fn(&str) + Send + Sync>,
    /// Called after each successful renewal.
    pub(crate) on_renewed: Box<dyn Fn() + Send + Sync>,
    /// Called with a failing streak's state (`Some(text)`) or its end (`None`).
    pub(crate) on_failing: Box<dyn Fn(Option<String>) + Send + Sync>,
}

/// Renews the leaf in force at the policy's time, until `stop`.
pub(crate) async fn renew_loop(
    enroller: Arc<Enroller>,
    in_force: Arc<InForce>,
    hooks: Hooks,
    stop: CancellationToken,
) {
    let resolver = in_force.resolver().clone();
    let mut bundle_pem = std::fs::read_to_string(&enroller.files.bundle).unwrap_or_default();
    loop {
        let cur = resolver.current();
        let wait = enroller.policy.wait(
            SystemTime::now(),
            cur.not_before(),
            cur.not_after(),
            rand::random(),
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(signed) = renew_until_done(&enroller, &in_force, &hooks, &stop).await else {
            return;
        };
        if signed.bundle != bundle_pem {
            (hooks.on_bundle)(&signed.bundle);
            bundle_pem = signed.bundle;
        }
    }
}

/// One renewal, retried with backoff until it succeeds; `None` when stopped first.
async fn renew_until_done(
    enroller: &Enroller,
    in_force: &InForce,
    hooks: &Hooks,
    stop: &CancellationToken,
) -> Option<Signed> {
    let resolver = in_force.resolver();
    let mut attempt = 0u32;
    loop {
        let cur = resolver.current();
        let now = SystemTime::now();
        // An expired leaf is no credential any more: enroll again if a token is there.
        let result = if cur.not_after() <= now && enroller.files.token.is_some() {
            enroller.enroll().await.map(|i| (i, None))
        } else {
            enroller
                .renew(resolver.clone())
                .await
                .map(|(i, s)| (i, Some(s)))
        };
        match result.and_then(|(ident, signed)| {
            in_force
                .swap_leaf(ident)
                .map_err(|source| EnrollError::Answer {
                    id: enroller.id.to_string(),
                    source,
                })?;
            Ok(signed)
        }) {
            Ok(signed) => {
                if attempt > 0 {
                    tracing::info!(failures = attempt, "certificate renewed after failures");
                    (hooks.on_failing)(None);
                }
                (hooks.on_renewed)();
                let bundle = std::fs::read_to_string(&enroller.files.bundle).unwrap_or_default();
                return Some(signed.unwrap_or(Signed {
                    chain: String::new(),
                    bundle,
                }));
            }
            Err(e) => {
                let left = cur.seconds_to_expiry(now);
                if attempt == 0 {
                    tracing::warn!(error = %e, expires_in_secs = left as i64,
                        "certificate renewal failed; keeping the current leaf and retrying");
                }
                (hooks.on_failing)(Some(format!(
                    "certificate renewal failing ({} attempts): {e}; current leaf expires in {}s",
                    attempt + 1,
                    left as i64
                )));
                let wait = enroller.policy.retry_delay(
                    attempt,
                    rand::random(),
                    SystemTime::now(),
                    cur.not_after(),
                );
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The identity to start with: from the CA when `[identity] ca` is set (see
/// [`Enroller::initial`]), else from the files. `None` when stopped while enrolling.
pub(crate) async fn startup_identity(
    files: &IdentityConfig,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(WorkloadIdentity, Option<Arc<Enroller>>)>> {
    use anyhow::Context;
    let Some(enroller) = Enroller::new(files)? else {
        let ident = WorkloadIdentity::load(&files.cert, &files.key)
            .context("identity.cert / identity.key")?;
        return Ok(Some((ident, None)));
    };
    let ident = enroller
        .initial(stop)
        .await
        .with_context(|| format!("identity.ca = {:?}", files.ca.as_deref().unwrap_or("")))?;
    Ok(ident.map(|i| (i, Some(Arc::new(enroller)))))
}
