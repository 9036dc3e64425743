//! The page loop: fetch the next page, write its products, write the
//! checkpoint, report progress; follow `@nextLink` until there is none.
//!
//! What the job does itself, even behind the sidecar: it follows the
//! `@nextLink` *path* against its own base URL (an absolute link names the
//! upstream, and following it would bypass the sidecar and send the key
//! elsewhere); it retries a page the sidecar gave up on (a throttle status,
//! a 5xx or no answer) with its own backoff, a few times, and then stops with
//! an error so the Job's restart resumes from the checkpoint; it never
//! retries a 400, 401 or 404; and it bounds what it reads.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::log;
use crate::pace::SelfPacer;

/// The collection this client syncs.
pub const PRODUCTS_PATH: &str = "/catalog/rest/Catalog/Products";
/// The largest page body read (100 products are a few tens of KiB).
const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// Why a run stopped early; `exit_code` tells a Job's `podFailurePolicy`
/// which failures a retry cannot fix.
#[derive(Debug)]
pub enum SyncError {
    /// 400, 401, 403, 404…: the same request would fail the same way.
    Refused { status: u16, body: String },
    /// Throttled or failing for every attempt: a later run may succeed.
    GaveUp { attempts: u32, last: String },
    /// The answer is not a page of the Catalog API.
    NotAPage(String),
    /// The checkpoint or output could not be read or written.
    Storage(String),
    /// Told to stop (SIGTERM: the pod is deleted, evicted or drained) after
    /// `pages` checkpointed pages; the next run resumes from there.
    Stopped { pages: u64 },
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused { status, body } => write!(
                f,
                "the API refused the request with {status} (retrying cannot help): {body}"
            ),
            Self::GaveUp { attempts, last } => {
                write!(f, "gave up after {attempts} attempts; last: {last}")
            }
            Self::NotAPage(why) => write!(f, "the answer is not a page of products: {why}"),
            Self::Storage(why) => f.write_str(why),
            Self::Stopped { pages } => write!(
                f,
                "told to stop; {pages} pages are checkpointed and the next run resumes after them"
            ),
        }
    }
}

impl std::error::Error for SyncError {}

impl SyncError {
    /// 3 for what a retry cannot fix, 1 for what it may, 143 (128 +
    /// SIGTERM, as a shell reports it) when told to stop.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused { .. } | Self::NotAPage(_) => 3,
            Self::GaveUp { .. } | Self::Storage(_) => 1,
            Self::Stopped { .. } => 143,
        }
    }
}

/// One page as the API answers it.
#[derive(Debug, Deserialize)]
pub struct Page {
    pub value: Vec<Value>,
    #[serde(rename = "@count")]
    pub count: Option<u64>,
    #[serde(rename = "@nextLink")]
    pub next_link: Option<String>,
}

/// The path and query of `link` (absolute or already relative), to be sent
/// to the client's own base URL; `None` if it is neither.
pub fn relative_link(link: &str) -> Option<String> {
    let rest = link
        .strip_prefix("https://")
        .or_else(|| link.strip_prefix("http://"));
    let relative = match rest {
        Some(rest) => rest.find('/').map(|slash| &rest[slash..])?,
        None if link.starts_with('/') => link,
        None => return None,
    };
    // A link that is a path on another host (`//evil/...`) is refused.
    (!relative.starts_with("//")).then(|| relative.to_owned())
}

/// The first page, or the page after the checkpoint's last good item.
pub fn start_path(checkpoint: &Checkpoint, page_size: u32) -> String {
    match (&checkpoint.next, checkpoint.last_id) {
        (Some(next), _) => next.clone(),
        (None, Some(last)) => format!("{PRODUCTS_PATH}?$top={page_size}&$skipToken={last}"),
        (None, None) => format!("{PRODUCTS_PATH}?$top={page_size}&$count=true"),
    }
}

/// The wait before attempt `attempt + 1`: 1, 2, 4 … times the base, with
/// up to as much again of jitter, capped, and never before `Retry-After`.
pub fn backoff(
    config: &Config,
    attempt: u32,
    unit: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let floor = config
        .base_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let wait = floor
        .saturating_add(floor.mul_f64(unit.clamp(0.0, 1.0)))
        .min(config.max_delay);
    retry_after.map_or(wait, |floor| floor.max(wait))
}

/// A cheap uniform draw in [0, 1) for the jitter: no dependency for it.
fn jitter(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

/// A run: resume from the checkpoint, sync every remaining page.
pub struct Sync {
    config: Config,
    http: reqwest::Client,
    pacer: Option<SelfPacer>,
    seed: u64,
    throttled: u64,
}

impl Sync {
    pub fn new(config: Config) -> Result<Self, SyncError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| SyncError::Storage(format!("building the HTTP client: {e}")))?;
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        Ok(Self {
            pacer: config.self_pacing.clone().map(SelfPacer::new),
            config,
            http,
            seed,
            throttled: 0,
        })
    }

    /// Sync to the end; the final checkpoint.
    pub async fn run(&mut self) -> Result<Checkpoint, SyncError> {
        self.run_until(std::future::pending()).await
    }

    /// [`Sync::run`] until `stop` completes: a page in flight then is
    /// dropped unwritten (the checkpoint names the last written one), and
    /// the run ends with [`SyncError::Stopped`].
    pub async fn run_until(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Checkpoint, SyncError> {
        let mut stop = std::pin::pin!(stop);
        let storage = |e: crate::checkpoint::CheckpointError| SyncError::Storage(e.0);
        let mut checkpoint = Checkpoint::load(&self.config.checkpoint)
            .map_err(storage)?
            .unwrap_or_default();
        if checkpoint.done {
            log::info(&format!(
                "the checkpoint says the sync is done ({} products); remove {} to sync again",
                checkpoint.items,
                self.config.checkpoint.display()
            ));
            return Ok(checkpoint);
        }
        if checkpoint.pages > 0 {
            log::info(&format!(
                "resuming after product {} ({} products, {} pages already synced)",
                checkpoint.last_id.unwrap_or(0),
                checkpoint.items,
                checkpoint.pages
            ));
        }
        let mut output = self.open_output(&checkpoint)?;
        let mut path = start_path(&checkpoint, self.config.page_size);
        loop {
            let page = tokio::select! {
                biased;
                () = &mut stop => return Err(SyncError::Stopped { pages: checkpoint.pages }),
                page = self.fetch(&path) => page?,
            };
            let mut written = 0u64;
            for item in &page.value {
                if let Some(id) = item.get("prod_id").and_then(Value::as_u64) {
                    checkpoint.last_id = Some(id);
                }
                if let Some(out) = &mut output {
                    let mut line = item.to_string();
                    line.push('\n');
                    out.write_all(line.as_bytes())
                        .map_err(|e| SyncError::Storage(format!("writing the output: {e}")))?;
                    written = written.saturating_add(line.len() as u64);
                }
            }
            if let Some(out) = &mut output {
                out.sync_data()
                    .map_err(|e| SyncError::Storage(format!("writing the output: {e}")))?;
            }
            let next = match &page.next_link {
                Some(link) => Some(relative_link(link).ok_or_else(|| {
                    SyncError::NotAPage(format!("@nextLink {:?} is not a URL of this API", link))
                })?),
                None => None,
            };
            checkpoint.items = checkpoint.items.saturating_add(page.value.len() as u64);
            checkpoint.pages = checkpoint.pages.saturating_add(1);
            checkpoint.total = page.count.or(checkpoint.total);
            checkpoint.output_bytes = checkpoint.output_bytes.saturating_add(written);
            checkpoint.done = next.is_none();
            checkpoint.next = next.clone();
            checkpoint.save(&self.config.checkpoint).map_err(storage)?;
            self.report(&checkpoint, page.value.len());
            match next {
                Some(next) => path = next,
                None => return Ok(checkpoint),
            }
        }
    }

    /// The output file cut to what the checkpoint covers, open for appending.
    fn open_output(&self, checkpoint: &Checkpoint) -> Result<Option<std::fs::File>, SyncError> {
        let Some(path) = &self.config.output else {
            return Ok(None);
        };
        let failed = |e: std::io::Error| {
            SyncError::Storage(format!("opening the output {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(failed)?;
        // What a killed run wrote after its last checkpoint is written again.
        file.set_len(checkpoint.output_bytes).map_err(failed)?;
        Ok(Some(file))
    }

    /// One page, with the job's own retries.
    async fn fetch(&mut self, path: &str) -> Result<Page, SyncError> {
        let url = format!("{}{path}", self.config.base_url);
        let mut attempt = 1;
        loop {
            if let Some(pacer) = &mut self.pacer {
                pacer.wait_turn().await;
            }
            let (failure, retry_after) = match self.attempt(&url).await {
                Attempt::Page(page) => {
                    self.record(Some(200), attempt > 1);
                    return Ok(page);
                }
                Attempt::Refused(status, body) => {
                    self.record(Some(status), attempt > 1);
                    return Err(SyncError::Refused { status, body });
                }
                Attempt::Retry {
                    status,
                    retry_after,
                    what,
                } => {
                    self.record(status, attempt > 1);
                    (what, retry_after)
                }
            };
            if attempt >= self.config.max_attempts {
                return Err(SyncError::GaveUp {
                    attempts: attempt,
                    last: failure,
                });
            }
            let wait = backoff(&self.config, attempt, jitter(&mut self.seed), retry_after);
            log::warn(&format!(
                "{failure}; attempt {attempt} of {}, next in {} ms",
                self.config.max_attempts,
                wait.as_millis()
            ));
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn record(&mut self, status: Option<u16>, retry: bool) {
        let throttled = status.is_some_and(|s| self.config.throttle_statuses.contains(&s));
        self.throttled = self.throttled.saturating_add(u64::from(throttled));
        if let Some(pacer) = &mut self.pacer {
            pacer.record(status, throttled, retry);
        }
    }

    async fn attempt(&self, url: &str) -> Attempt {
        let sent = self
            .http
            .get(url)
            .header("X-API-KEY", &self.config.api_key)
            .header("Accept", "application/json")
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Retry {
                    status: None,
                    retry_after: None,
                    what: format!("no answer: {error}"),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match read_limited(&mut response).await {
            Ok(body) => body,
            Err(what) => {
                return Attempt::Retry {
                    status: None,
                    retry_after: None,
                    what,
                };
            }
        };
        let throttled = self.config.throttle_statuses.contains(&status);
        if status == 200 {
            return match serde_json::from_slice::<Page>(&body) {
                Ok(page) => Attempt::Page(page),
                Err(error) => Attempt::Refused(status, format!("not a page: {error}")),
            };
        }
        let shown: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        if throttled || matches!(status, 408 | 500 | 502 | 503 | 504) {
            let kind = if throttled { "throttled" } else { "failed" };
            return Attempt::Retry {
                status: Some(status),
                retry_after,
                what: format!("{kind} with {status}"),
            };
        }
        Attempt::Refused(status, shown)
    }

    /// Progress: a log line, the metrics file.
    fn report(&self, checkpoint: &Checkpoint, on_page: usize) {
        log::info(&format!(
            "page {} synced: {on_page} products, {} of {} so far, last prod_id {}",
            checkpoint.pages,
            checkpoint.items,
            checkpoint
                .total
                .map_or_else(|| "?".to_owned(), |t| t.to_string()),
            checkpoint.last_id.unwrap_or(0)
        ));
        if let Some(path) = &self.config.metrics_file
            && let Err(error) = write_metrics(path, checkpoint, self.throttled)
        {
            log::warn(&format!("writing the metrics file: {error}"));
        }
    }
}

enum Attempt {
    Page(Page),
    Refused(u16, String),
    Retry {
        status: Option<u16>,
        retry_after: Option<Duration>,
        what: String,
    },
}

async fn read_limited(response: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("the answer broke off: {e}"))?
    {
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(format!("the answer is larger than {MAX_PAGE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The progress metric in Prometheus' text format, written atomically (for
/// a textfile collector, or for whoever reads the volume).
pub fn write_metrics(path: &Path, checkpoint: &Checkpoint, throttled: u64) -> std::io::Result<()> {
    let text = format!(
        "# HELP catalog_sync_products Products synced so far, resumed runs included.\n\
         # TYPE catalog_sync_products gauge\n\
         catalog_sync_products {}\n\
         # HELP catalog_sync_pages Pages synced so far, resumed runs included.\n\
         # TYPE catalog_sync_pages gauge\n\
         catalog_sync_pages {}\n\
         # HELP catalog_sync_done 1 once the whole catalog is synced.\n\
         # TYPE catalog_sync_done gauge\n\
         catalog_sync_done {}\n\
         # HELP catalog_sync_throttled_total Throttled answers this run saw.\n\
         # TYPE catalog_sync_throttled_total counter\n\
         catalog_sync_throttled_total {throttled}\n",
        checkpoint.items,
        checkpoint.pages,
        u8::from(checkpoint.done)
    );
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_are_followed_against_our_own_base_url() {
        let link =
            "https://api2.saleslayer.com/catalog/rest/Catalog/Products?$top=100&$skipToken=100";
        assert_eq!(
            relative_link(link).as_deref(),
            Some("/catalog/rest/Catalog/Products?$top=100&$skipToken=100")
        );
        assert_eq!(
            relative_link("http://127.0.0.1:18090/x?a=1").as_deref(),
            Some("/x?a=1")
        );
        assert_eq!(relative_link("/x").as_deref(), Some("/x"));
        for bad in ["ftp://x/y", "x/y", "//evil.example/x", "https://host-only"] {
            assert_eq!(relative_link(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_run_starts_at_the_first_page_or_after_the_last_good_item() {
        let fresh = Checkpoint::default();
        assert_eq!(
            start_path(&fresh, 100),
            "/catalog/rest/Catalog/Products?$top=100&$count=true"
        );
        let linked = Checkpoint {
            next: Some("/catalog/rest/Catalog/Products?$skipToken=300".into()),
            last_id: Some(300),
            ..Checkpoint::default()
        };
        assert_eq!(
            start_path(&linked, 100),
            "/catalog/rest/Catalog/Products?$skipToken=300"
        );
        let unlinked = Checkpoint {
            last_id: Some(300),
            ..Checkpoint::default()
        };
        assert_eq!(
            start_path(&unlinked, 50),
            "/catalog/rest/Catalog/Products?$top=50&$skipToken=300"
        );
    }

    #[test]
    fn the_backoff_doubles_within_its_band_and_honours_retry_after() {
        let config = crate::config::Config::from_lookup(|name| {
            (name == "SALESLAYER_API_KEY").then(|| "k".to_owned())
        })
        .expect("config");
        let ms = |n| Duration::from_millis(n);
        assert_eq!(backoff(&config, 1, 0.0, None), ms(1_000));
        assert_eq!(backoff(&config, 2, 0.5, None), ms(3_000));
        assert_eq!(backoff(&config, 4, 0.9, None), ms(8_000));
        assert_eq!(backoff(&config, 1, 0.0, Some(ms(5_000))), ms(5_000));
        let mut seed = 42;
        assert!(
            (0..1000)
                .map(|_| jitter(&mut seed))
                .all(|u| (0.0..1.0).contains(&u))
        );
    }

    #[test]
    fn the_metrics_file_says_how_far_the_sync_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("metrics.prom");
        let checkpoint = Checkpoint {
            items: 2_500,
            pages: 25,
            ..Checkpoint::default()
        };
        write_metrics(&path, &checkpoint, 3).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\ncatalog_sync_products 2500\n"), "{text}");
        assert!(text.contains("\ncatalog_sync_done 0\n"));
        assert!(text.contains("\ncatalog_sync_throttled_total 3\n"));
    }

    #[test]
    fn a_page_parses_with_or_without_count_and_link() {
        let page: Page =
            serde_json::from_str(r#"{"value":[{"prod_id":1}],"@count":5000,"@nextLink":"/x"}"#)
                .expect("page");
        assert_eq!(
            (page.value.len(), page.count, page.next_link.as_deref()),
            (1, Some(5_000), Some("/x"))
        );
        let last: Page = serde_json::from_str(r#"{"value":[]}"#).expect("page");
        assert_eq!((last.count, last.next_link), (None, None));
    }
}
