//! Renewing the pod's lease: every `refreshMillis` the sidecar reports what it
//! did since the last call and paces by the grant it gets back. When the
//! quota API cannot be reached it keeps the last grant until that lease
//! expires, then falls back to the limit file, then to its env share: never
//! faster than it was told. A report that was not delivered rides with the
//! next one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::gate::Gate;
use crate::limits::parse_limit_file;
use crate::metrics::{OutcomeLabel, ProxyMetrics};
use crate::pacer::Limit;
use saleslayer_contract::{LEASES_PATH, LeaseGrant, LeaseReport, Usage};
use saleslayer_runtime::clock::Clock;

/// Who the sidecar reports for.
#[derive(Debug, Clone)]
pub struct Identity {
    pub namespace: String,
    pub integration: String,
    pub job: String,
    pub pod: String,
}

/// How to reach the quota API.
#[derive(Debug, Clone)]
pub struct QuotaEndpoint {
    /// `SALESLAYER_QUOTA_URL`, without `/v1/leases`.
    pub url: String,
    pub token_file: PathBuf,
    /// The CA that signs the quota API's certificate; the system roots when absent.
    pub ca_file: Option<PathBuf>,
    pub identity: Identity,
}

/// How long to wait before the first renewal answers, and between attempts
/// while the quota API is unreachable.
const RETRY_UNREACHABLE: Duration = Duration::from_secs(2);
/// Without a quota API, how often the limit file is read again.
const FILE_EVERY: Duration = Duration::from_secs(2);
/// One renewal may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A renewal that did not give a grant.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("reading the token file: {0}")]
    Token(std::io::Error),
    #[error("the quota API is unreachable: {0}")]
    Unreachable(reqwest::Error),
    #[error("the quota API answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the quota API's answer is not a grant: {0}")]
    Answer(reqwest::Error),
}

impl QuotaEndpoint {
    /// An HTTPS client that trusts only the operator's CA (when given).
    pub fn client(&self) -> Result<reqwest::Client, String> {
        crate::ensure_tls_provider();
        let mut builder = reqwest::Client::builder().timeout(CALL_TIMEOUT);
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading the CA file {}: {e}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("the CA file {} holds no certificate: {e}", path.display()))?;
            builder = builder.tls_certs_only(certificates);
        }
        builder
            .build()
            .map_err(|e| format!("building the quota API client: {e}"))
    }

    /// One renewal: report `usage`, get the grant.
    pub async fn renew(
        &self,
        http: &reqwest::Client,
        usage: Usage,
    ) -> Result<LeaseGrant, RenewError> {
        // Projected tokens rotate: read it every time.
        let token = std::fs::read_to_string(&self.token_file).map_err(RenewError::Token)?;
        let body = LeaseReport {
            namespace: self.identity.namespace.clone(),
            integration: self.identity.integration.clone(),
            job: self.identity.job.clone(),
            pod: self.identity.pod.clone(),
            usage,
        };
        let url = format!("{}{LEASES_PATH}", self.url.trim_end_matches('/'));
        let response = http
            .post(url)
            .bearer_auth(token.trim())
            .json(&body)
            .send()
            .await
            .map_err(RenewError::Unreachable)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(RenewError::Refused {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        response.json().await.map_err(RenewError::Answer)
    }
}

/// Keeps one sidecar's grant current: one [`Renewer::step`] per refresh.
#[derive(Debug)]
pub struct Renewer {
    gate: Arc<Gate>,
    endpoint: Option<QuotaEndpoint>,
    limit_file: Option<PathBuf>,
    metrics: Arc<ProxyMetrics>,
    http: Option<reqwest::Client>,
    failing: bool,
}

impl Renewer {
    pub fn new(
        gate: Arc<Gate>,
        endpoint: Option<QuotaEndpoint>,
        limit_file: Option<PathBuf>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            gate,
            endpoint,
            limit_file,
            metrics,
            http: None,
            failing: false,
        }
    }

    /// Read the limit file, renew the lease (reporting usage), and say how
    /// long to wait before the next step.
    pub async fn step(&mut self) -> Duration {
        if let Some(path) = &self.limit_file {
            self.gate.set_file(read_limit_file(path));
        }
        let Some(endpoint) = &self.endpoint else {
            return FILE_EVERY;
        };
        if self.http.is_none() {
            match endpoint.client() {
                Ok(client) => self.http = Some(client),
                Err(error) => {
                    if !self.failing {
                        warn!(%error, "no quota API client yet; pacing by the limit file or env");
                        self.failing = true;
                    }
                    return RETRY_UNREACHABLE;
                }
            }
        }
        let Some(client) = &self.http else {
            return RETRY_UNREACHABLE;
        };
        let usage = self.gate.take_usage();
        match endpoint.renew(client, usage.clone()).await {
            Ok(grant) => {
                self.gate.set_lease(
                    Limit {
                        requests: grant.requests,
                        period_millis: grant.period_millis,
                        max_concurrency: grant.max_concurrency,
                    },
                    Duration::from_millis(grant.ttl_millis),
                );
                count(&self.metrics, "ok");
                if self.failing {
                    info!("the quota API answers again");
                    self.failing = false;
                }
                Duration::from_millis(grant.refresh_millis.max(100))
            }
            Err(error) => {
                self.gate.restore_usage(usage);
                count(&self.metrics, "error");
                if !self.failing {
                    warn!(%error, "lease renewal failed; keeping the last grant until it expires, then the limit file, then the env share");
                    self.failing = true;
                }
                RETRY_UNREACHABLE
            }
        }
    }

    /// Step until `stop` resolves, sleeping on `clock` in between.
    pub async fn run(mut self, clock: Arc<dyn Clock>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let next = tokio::select! {
                () = &mut stop => return,
                next = self.step() => next,
            };
            tokio::select! {
                () = &mut stop => return,
                () = clock.sleep(next) => {}
            }
        }
    }
}

fn count(metrics: &ProxyMetrics, outcome: &str) {
    metrics
        .renewals
        .get_or_create(&OutcomeLabel {
            outcome: outcome.into(),
        })
        .inc();
}

/// The limit file, or `None` when it is missing, empty or not a limit.
fn read_limit_file(path: &std::path::Path) -> Option<Limit> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_limit_file(&text).ok().flatten()
}
