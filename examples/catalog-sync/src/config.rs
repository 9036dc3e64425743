//! Everything the client runs with, from its environment: the variables the
//! operator's webhook injects (`SALESLAYER_*`, DESIGN.md §5) and a few of its
//! own (`CATALOG_SYNC_*`). Read through a lookup function so tests need no
//! process environment.

use std::path::PathBuf;
use std::time::Duration;

use saleslayer_contract::{DEFAULT_THROTTLE_STATUSES, Limit, env, parse_throttle_statuses};

/// Where the API is when no sidecar is injected.
pub const DEFAULT_UPSTREAM: &str = "https://api2.saleslayer.com";
/// Where the checkpoint is kept by default: a volume the Job mounts.
pub const DEFAULT_CHECKPOINT: &str = "/var/lib/catalog-sync/checkpoint.json";
/// The API key's variable (or `SALESLAYER_API_KEY_FILE`, a mounted Secret).
pub const API_KEY: &str = "SALESLAYER_API_KEY";
pub const API_KEY_FILE: &str = "SALESLAYER_API_KEY_FILE";
pub const UPSTREAM: &str = "CATALOG_SYNC_UPSTREAM";
pub const CHECKPOINT: &str = "CATALOG_SYNC_CHECKPOINT";
pub const OUTPUT: &str = "CATALOG_SYNC_OUTPUT";
pub const METRICS_FILE: &str = "CATALOG_SYNC_METRICS_FILE";
pub const PAGE_SIZE: &str = "CATALOG_SYNC_PAGE_SIZE";

/// How the client reaches the quota API for a lease (no sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub namespace: String,
    pub integration: String,
    pub job: String,
    pub pod: String,
}

/// How the client paces itself when no sidecar does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SelfPacing {
    /// The share injected at admission.
    pub env_share: Option<Limit>,
    pub limit_file: Option<PathBuf>,
    pub lease: Option<LeaseSettings>,
}

/// The client's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where requests go: the sidecar, else the API itself.
    pub base_url: String,
    /// `None` when a sidecar paces (it does, and retries throttling).
    pub self_pacing: Option<SelfPacing>,
    pub api_key: String,
    pub checkpoint: PathBuf,
    /// JSON lines of the synced products, when wanted.
    pub output: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub page_size: u32,
    /// The job's own retries of a page the sidecar gave up on (or, without
    /// one, of every throttled or failed page): attempts and backoff.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// What counts as throttling on this account.
    pub throttle_statuses: Vec<u16>,
}

/// A setting the client cannot run with: the sentence says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn number<T: std::str::FromStr>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, ConfigError> {
    match lookup(name) {
        None => Ok(None),
        Some(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ConfigError(format!("{name}={text:?} is not a number"))),
    }
}

impl Config {
    /// Read the settings through `lookup` (the process environment in
    /// `main`); the API key file is read here.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let non_empty = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let api_key = match (non_empty(API_KEY), non_empty(API_KEY_FILE)) {
            (Some(key), _) => key.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("reading {API_KEY_FILE} {path}: {e}")))?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(ConfigError(format!(
                    "no API key: set {API_KEY}, or {API_KEY_FILE} to a file holding it"
                )));
            }
        };
        if api_key.is_empty() {
            return Err(ConfigError("the API key is empty".into()));
        }
        let (base_url, self_pacing) = match non_empty(env::API_URL) {
            Some(sidecar) => (sidecar, None),
            None => {
                let upstream = non_empty(UPSTREAM).unwrap_or_else(|| DEFAULT_UPSTREAM.into());
                (upstream, Some(self_pacing(&lookup)?))
            }
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ConfigError(format!("{base_url:?} is not an http(s) URL")));
        }
        let page_size = number::<u32>(&lookup, PAGE_SIZE)?.unwrap_or(100);
        if !(1..=100).contains(&page_size) {
            return Err(ConfigError(format!(
                "{PAGE_SIZE} must be from 1 to 100 (the API's largest page)"
            )));
        }
        let throttle_statuses = match non_empty(env::THROTTLE_STATUSES) {
            None => DEFAULT_THROTTLE_STATUSES.to_vec(),
            Some(list) => parse_throttle_statuses(&list)
                .map_err(|e| ConfigError(format!("{}: {e}", env::THROTTLE_STATUSES)))?,
        };
        let millis = |name, default| -> Result<Duration, ConfigError> {
            Ok(Duration::from_millis(
                number::<u64>(&lookup, name)?.unwrap_or(default),
            ))
        };
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            self_pacing,
            api_key,
            checkpoint: non_empty(CHECKPOINT)
                .unwrap_or_else(|| DEFAULT_CHECKPOINT.into())
                .into(),
            output: non_empty(OUTPUT).map(PathBuf::from),
            metrics_file: non_empty(METRICS_FILE).map(PathBuf::from),
            page_size,
            max_attempts: number::<u32>(&lookup, env::RETRY_MAX_ATTEMPTS)?
                .unwrap_or(4)
                .max(1),
            base_delay: millis(env::RETRY_BASE_DELAY_MS, 1_000)?,
            max_delay: millis(env::RETRY_MAX_DELAY_MS, 8_000)?,
            throttle_statuses,
        })
    }
}

fn self_pacing(lookup: &impl Fn(&str) -> Option<String>) -> Result<SelfPacing, ConfigError> {
    let requests = number::<u32>(lookup, env::RATE_REQUESTS)?;
    let period = number::<u64>(lookup, env::RATE_PERIOD_MS)?;
    let concurrency = number::<u32>(lookup, env::MAX_CONCURRENCY)?.unwrap_or(1);
    let env_share = match (requests, period) {
        (Some(requests), Some(period_millis)) if period_millis > 0 => Some(Limit {
            requests,
            period_millis,
            max_concurrency: concurrency,
        }),
        (None, None) => None,
        _ => {
            return Err(ConfigError(format!(
                "{} and {} go together (and the period is at least 1 ms)",
                env::RATE_REQUESTS,
                env::RATE_PERIOD_MS
            )));
        }
    };
    let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
    let lease = match (
        get(env::QUOTA_URL),
        get(env::TOKEN_FILE),
        get(env::POD_NAMESPACE),
        get(env::POD_NAME),
        get(env::INTEGRATION),
        get(env::JOB),
    ) {
        (Some(url), Some(token), Some(namespace), Some(pod), Some(integration), Some(job)) => {
            Some(LeaseSettings {
                url,
                token_file: token.into(),
                ca_file: get(env::CA_FILE).map(PathBuf::from),
                namespace,
                integration,
                job,
                pod,
            })
        }
        _ => None,
    };
    Ok(SelfPacing {
        env_share,
        limit_file: get(env::LIMIT_FILE).map(PathBuf::from),
        lease,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn through_a_sidecar_the_client_does_not_pace_itself() {
        let config = from(&[
            ("SALESLAYER_API_URL", "http://127.0.0.1:8787/"),
            ("SALESLAYER_API_KEY", " key "),
            ("SALESLAYER_RATE_REQUESTS", "5"),
        ])
        .expect("valid");
        assert_eq!(config.base_url, "http://127.0.0.1:8787");
        assert_eq!(config.self_pacing, None);
        assert_eq!(config.api_key, "key");
        assert_eq!(config.checkpoint, PathBuf::from(DEFAULT_CHECKPOINT));
        assert_eq!((config.page_size, config.max_attempts), (100, 4));
        assert_eq!(config.throttle_statuses, vec![429]);
    }

    #[test]
    fn without_a_sidecar_it_paces_by_env_file_and_lease() {
        let config = from(&[
            ("SALESLAYER_API_KEY", "key"),
            ("CATALOG_SYNC_UPSTREAM", "http://127.0.0.1:18090"),
            ("SALESLAYER_RATE_REQUESTS", "12"),
            ("SALESLAYER_RATE_PERIOD_MS", "10000"),
            ("SALESLAYER_LIMIT_FILE", "/etc/saleslayer/limit"),
            ("SALESLAYER_QUOTA_URL", "https://quota:8443"),
            ("SALESLAYER_TOKEN_FILE", "/var/run/saleslayer/token"),
            ("POD_NAMESPACE", "shop"),
            ("POD_NAME", "sync-x"),
            ("SALESLAYER_INTEGRATION", "catalog"),
            ("SALESLAYER_JOB", "product-import"),
            ("SALESLAYER_THROTTLE_STATUSES", "429, 503"),
            ("CATALOG_SYNC_PAGE_SIZE", "50"),
        ])
        .expect("valid");
        let pacing = config.self_pacing.expect("self-paced");
        assert_eq!(
            pacing.env_share,
            Some(Limit {
                requests: 12,
                period_millis: 10_000,
                max_concurrency: 1
            })
        );
        assert_eq!(pacing.limit_file, Some("/etc/saleslayer/limit".into()));
        assert_eq!(pacing.lease.map(|l| l.pod), Some("sync-x".into()));
        assert_eq!(config.throttle_statuses, vec![429, 503]);
        assert_eq!(config.page_size, 50);
    }

    #[test]
    fn the_key_comes_from_a_file_and_bad_settings_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        std::fs::write(&key, "from-file\n").expect("write");
        let path = key.to_str().expect("utf-8");
        let config = from(&[("SALESLAYER_API_KEY_FILE", path)]).expect("valid");
        assert_eq!(config.api_key, "from-file");
        assert_eq!(config.base_url, DEFAULT_UPSTREAM);
        for (pairs, names) in [
            (vec![], "SALESLAYER_API_KEY"),
            (vec![("SALESLAYER_API_KEY_FILE", "/nowhere")], "/nowhere"),
            (
                vec![
                    ("SALESLAYER_API_KEY", "k"),
                    ("CATALOG_SYNC_PAGE_SIZE", "500"),
                ],
                "CATALOG_SYNC_PAGE_SIZE",
            ),
            (
                vec![
                    ("SALESLAYER_API_KEY", "k"),
                    ("SALESLAYER_RATE_REQUESTS", "5"),
                ],
                "SALESLAYER_RATE_PERIOD_MS",
            ),
            (
                vec![
                    ("SALESLAYER_API_KEY", "k"),
                    ("SALESLAYER_API_URL", "ftp://x"),
                ],
                "ftp://x",
            ),
            (
                vec![
                    ("SALESLAYER_API_KEY", "k"),
                    ("SALESLAYER_THROTTLE_STATUSES", "200"),
                ],
                "THROTTLE",
            ),
        ] {
            let error = from(&pairs).expect_err("invalid");
            assert!(error.0.contains(names), "{error}");
        }
    }
}
