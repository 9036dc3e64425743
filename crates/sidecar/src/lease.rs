//! Renewing the pod's lease: every `refreshMillis` the sidecar reports what it
//! did since the last call and paces by the grant it gets back. When the
//! quota API cannot be reached it keeps the last grant until that lease
//! expires, then falls back to the limit file, then to its env share: never
//! faster than it was told. A report that was not delivered rides with the
//! next one.
//!
//! Between renewals it watches the gate, and renews at once when the pod
//! turns idle (nothing to do for `idle_after` of the grant's period), when
//! work waits again after a report that said idle, or when an answer was
//! throttled: so the quota API hears of each within a fraction of a period,
//! not a refresh later, and can lend the pod's share to others, give it
//! back, or lower the account's budget. Never sooner than [`EARLY_GAP`]
//! after the previous call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::gate::{Activity, Gate};
use crate::limits::parse_limit_file;
use crate::metrics::{OutcomeLabel, ProxyMetrics};
use crate::pacer::Limit;
use saleslayer_contract::{
    LEASES_PATH, LeaseGrant, LeaseReport, MIN_RENEWAL_INTERVAL_MILLIS, Usage, idle_after, is_idle,
};
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
/// The least time between a call and an early renewal: twice the quota API's
/// least accepted interval, so an early renewal is never refused.
pub const EARLY_GAP: Duration = Duration::from_millis(2 * MIN_RENEWAL_INTERVAL_MILLIS);
/// How often the gate is looked at between renewals.
const WATCH_EVERY: Duration = Duration::from_millis(100);

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
    /// What the last delivered report said, for early renewals.
    last: Option<Delivered>,
}

/// A delivered report, as the renewer watches for a change from it.
#[derive(Debug, Clone, Copy)]
struct Delivered {
    /// When it was sent, on the gate's clock.
    at: Duration,
    /// It said the pod was idle.
    idle: bool,
    /// How long nothing to do makes the pod idle under its grant.
    idle_after: Duration,
}

impl Delivered {
    /// Whether the gate's `activity` at `now` is news to the quota API: an
    /// answer was throttled, the pod turned idle, or work waits after a
    /// report that said idle; never within [`EARLY_GAP`] of the report.
    fn turned(self, now: Duration, activity: Activity) -> bool {
        if now.saturating_sub(self.at) < EARLY_GAP {
            return false;
        }
        if activity.throttled > 0 {
            true
        } else if self.idle {
            activity.waiting > 0
        } else {
            activity.idle_for >= self.idle_after
        }
    }
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
            last: None,
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
        let at = self.gate.now();
        match endpoint.renew(client, usage.clone()).await {
            Ok(grant) => {
                self.last = Some(Delivered {
                    at,
                    idle: is_idle(usage.queued, usage.idle_millis, grant.period_millis),
                    idle_after: Duration::from_millis(idle_after(grant.period_millis)),
                });
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
                self.last = None;
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

    /// Whether the pod changed since the last delivered report in a way the
    /// quota API should hear of now (see `Delivered::turned`).
    pub fn turned(&self) -> bool {
        self.last
            .is_some_and(|last| last.turned(self.gate.now(), self.gate.activity()))
    }

    /// Step until `stop` resolves, sleeping on `clock` in between and
    /// stepping early when the pod [turned](Renewer::turned).
    pub async fn run(mut self, clock: Arc<dyn Clock>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let next = tokio::select! {
                () = &mut stop => return,
                next = self.step() => next,
            };
            let due = clock.now().saturating_add(next);
            loop {
                let left = due.saturating_sub(clock.now());
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    () = &mut stop => return,
                    () = clock.sleep(left.min(WATCH_EVERY)) => {}
                }
                if self.turned() {
                    break;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(waiting: usize, idle_millis: u64) -> Activity {
        Activity {
            waiting,
            idle_for: Duration::from_millis(idle_millis),
            throttled: 0,
        }
    }

    #[test]
    fn a_pod_renews_early_when_it_turns_idle_and_when_work_waits_again() {
        let working = Delivered {
            at: Duration::from_secs(10),
            idle: false,
            idle_after: Duration::from_millis(idle_after(1_000)),
        };
        let at = |millis: u64| Duration::from_millis(10_000 + millis);
        // Working, or not idle long enough: nothing to say before the refresh.
        assert!(!working.turned(at(600), activity(3, 0)));
        assert!(!working.turned(at(600), activity(0, 499)));
        // Half a period with nothing to do: idle, say so now.
        assert!(working.turned(at(600), activity(0, 500)));
        // But never within EARLY_GAP of the last call, so never refused.
        assert!(!working.turned(at(499), activity(0, 5_000)));
        let idle = Delivered {
            idle: true,
            ..working
        };
        // Still idle: nothing new. Work waiting: renew now, to get a share.
        assert!(!idle.turned(at(5_000), activity(0, 5_000)));
        assert!(idle.turned(at(5_000), activity(1, 0)));
        assert!(!idle.turned(at(100), activity(1, 0)));
        // A throttled answer is news whatever the pod does.
        let throttled = Activity {
            throttled: 1,
            ..activity(4, 0)
        };
        assert!(working.turned(at(600), throttled));
        assert!(!working.turned(at(400), throttled));
    }
}
