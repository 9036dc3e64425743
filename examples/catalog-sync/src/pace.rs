//! Pacing without a sidecar, as any client of the pod contract would
//! (DESIGN.md §5–§6): the grant is the lease from the quota API while it
//! holds, else the limit file (the pod's annotation, kept current by the
//! kubelet), else the share injected at admission. Requests start at least
//! `period / requests` apart, which keeps every window within the grant for
//! a client that sends one request at a time, as this one does.
//!
//! The lease is renewed between pages when its refresh is due, reporting
//! what the client sent since the last renewal; a failed renewal keeps the
//! last grant until it expires.

use std::time::Duration;

use saleslayer_contract::{LEASES_PATH, LeaseGrant, LeaseReport, Limit, Usage};
use tokio::time::Instant;

use crate::config::{LeaseSettings, SelfPacing};
use crate::log;

/// After a failed renewal, the next try.
const RETRY_RENEWAL: Duration = Duration::from_secs(2);

/// The spacing of requests under `limit`; `None` when it allows none.
pub fn spacing(limit: Limit) -> Option<Duration> {
    (limit.requests > 0).then(|| Duration::from_millis(limit.period_millis.max(1)) / limit.requests)
}

/// Parse the limit file's JSON; empty (no annotation yet) or invalid is none.
pub fn parse_limit(text: &str) -> Option<Limit> {
    serde_json::from_str::<Limit>(text.trim())
        .ok()
        .filter(|limit| limit.period_millis > 0)
}

/// One client's own pacer.
#[derive(Debug)]
pub struct SelfPacer {
    settings: SelfPacing,
    http: Option<reqwest::Client>,
    lease: Option<(Limit, Instant)>,
    renew_at: Instant,
    usage: Usage,
    last_start: Option<Instant>,
    warned: bool,
}

impl SelfPacer {
    pub fn new(settings: SelfPacing) -> Self {
        Self {
            settings,
            http: None,
            lease: None,
            renew_at: Instant::now(),
            usage: Usage::default(),
            last_start: None,
            warned: false,
        }
    }

    /// The grant in force now, and where it came from.
    fn grant(&self) -> Option<(Limit, &'static str)> {
        if let Some((limit, expires)) = self.lease
            && Instant::now() < expires
        {
            return Some((limit, "lease"));
        }
        let file = self.settings.limit_file.as_ref().and_then(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| parse_limit(&text))
        });
        file.map(|limit| (limit, "file"))
            .or(self.settings.env_share.map(|limit| (limit, "env")))
    }

    /// Wait until the next request may start under the grant, and take it.
    pub async fn wait_turn(&mut self) {
        self.renew_if_due().await;
        loop {
            let Some((limit, _)) = self.grant() else {
                if !self.warned {
                    log::warn("no lease, limit file or SALESLAYER_RATE_* share: not pacing");
                    self.warned = true;
                }
                break;
            };
            match spacing(limit) {
                Some(gap) => {
                    if let Some(last) = self.last_start {
                        tokio::time::sleep_until(last + gap).await;
                    }
                    break;
                }
                // A grant of zero: look again a period later.
                None => {
                    tokio::time::sleep(Duration::from_millis(limit.period_millis.max(1))).await;
                    self.renew_if_due().await;
                }
            }
        }
        self.last_start = Some(Instant::now());
    }

    /// Count an attempt for the next lease report.
    pub fn record(&mut self, status: Option<u16>, throttled: bool, retry: bool) {
        let usage = &mut self.usage;
        usage.requests = usage.requests.saturating_add(1);
        if let Some(status) = status {
            let count = usage.by_status.entry(status.to_string()).or_default();
            *count = count.saturating_add(1);
        }
        usage.throttled = usage.throttled.saturating_add(u64::from(throttled));
        usage.retries = usage.retries.saturating_add(u64::from(retry));
        usage.peak_concurrency = 1;
    }

    async fn renew_if_due(&mut self) {
        let Some(lease) = self.settings.lease.clone() else {
            return;
        };
        if Instant::now() < self.renew_at {
            return;
        }
        let usage = std::mem::take(&mut self.usage);
        match self.renew(&lease, usage.clone()).await {
            Ok(grant) => {
                let now = Instant::now();
                self.lease = Some((grant.limit(), now + Duration::from_millis(grant.ttl_millis)));
                self.renew_at = now + Duration::from_millis(grant.refresh_millis.max(100));
            }
            Err(error) => {
                // Not lost: the next report carries it.
                self.usage.requests = self.usage.requests.saturating_add(usage.requests);
                self.usage.throttled = self.usage.throttled.saturating_add(usage.throttled);
                self.usage.retries = self.usage.retries.saturating_add(usage.retries);
                log::warn(&format!(
                    "lease renewal failed, keeping the last grant until it expires: {error}"
                ));
                self.renew_at = Instant::now() + RETRY_RENEWAL;
            }
        }
    }

    async fn renew(&mut self, lease: &LeaseSettings, usage: Usage) -> Result<LeaseGrant, String> {
        if self.http.is_none() {
            self.http = Some(quota_client(lease)?);
        }
        let http = self.http.as_ref().ok_or("no client")?;
        let token = std::fs::read_to_string(&lease.token_file)
            .map_err(|e| format!("reading {}: {e}", lease.token_file.display()))?;
        let report = LeaseReport {
            namespace: lease.namespace.clone(),
            integration: lease.integration.clone(),
            job: lease.job.clone(),
            pod: lease.pod.clone(),
            usage,
        };
        let url = format!("{}{LEASES_PATH}", lease.url.trim_end_matches('/'));
        let response = http
            .post(url)
            .bearer_auth(token.trim())
            .json(&report)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the quota API answered {}", response.status()));
        }
        response.json().await.map_err(|e| e.to_string())
    }
}

fn quota_client(lease: &LeaseSettings) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(3));
    if let Some(path) = &lease.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} holds no certificate: {e}", path.display()))?;
        builder = builder.tls_certs_only(certificates);
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32, period_millis: u64) -> Limit {
        Limit {
            requests,
            period_millis,
            max_concurrency: 1,
        }
    }

    #[test]
    fn requests_are_spaced_period_over_requests() {
        assert_eq!(
            spacing(limit(12, 10_000)),
            Some(Duration::from_nanos(833_333_333))
        );
        assert_eq!(
            spacing(limit(1, 13_334)),
            Some(Duration::from_millis(13_334))
        );
        assert_eq!(spacing(limit(0, 10_000)), None);
    }

    #[test]
    fn the_limit_file_reads_the_annotation_or_nothing() {
        assert_eq!(
            parse_limit(r#"{"requests":12,"periodMillis":10000,"maxConcurrency":2}"#),
            Some(Limit {
                requests: 12,
                period_millis: 10_000,
                max_concurrency: 2
            })
        );
        assert_eq!(parse_limit(""), None);
        assert_eq!(
            parse_limit(r#"{"requests":1,"periodMillis":0,"maxConcurrency":1}"#),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_wins_over_the_env_share_and_paces_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("limit");
        let mut pacer = SelfPacer::new(SelfPacing {
            env_share: Some(limit(1, 10_000)),
            limit_file: Some(file.clone()),
            lease: None,
        });
        assert_eq!(pacer.grant(), Some((limit(1, 10_000), "env")));
        std::fs::write(
            &file,
            r#"{"requests":4,"periodMillis":1000,"maxConcurrency":1}"#,
        )
        .expect("write");
        assert_eq!(pacer.grant().map(|(_, source)| source), Some("file"));
        let start = Instant::now();
        pacer.wait_turn().await;
        pacer.wait_turn().await;
        pacer.wait_turn().await;
        // Paused time: exactly two gaps of 250 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
