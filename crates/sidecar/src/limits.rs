//! Which grant the sidecar paces by, pure: the lease while it holds, else the
//! limit file (the pod's annotation, which the controller keeps current),
//! else the share injected into the environment at admission (DESIGN.md §6).

use std::time::Duration;

use crate::pacer::Limit;

/// Where the grant in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Lease,
    File,
    Env,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Lease => "lease",
            Source::File => "file",
            Source::Env => "env",
        }
    }
}

/// Everything the sidecar knows about its grant.
#[derive(Debug, Clone)]
pub struct Limits {
    env: Limit,
    file: Option<Limit>,
    lease: Option<(Limit, Duration)>,
}

impl Limits {
    /// Only the environment's share, until a file or a lease says more.
    pub fn new(env: Limit) -> Self {
        Self {
            env,
            file: None,
            lease: None,
        }
    }

    /// The limit file as last read (`None`: missing, empty or unreadable).
    pub fn set_file(&mut self, file: Option<Limit>) {
        self.file = file;
    }

    /// A lease granted `limit` until `expires`.
    pub fn set_lease(&mut self, limit: Limit, expires: Duration) {
        self.lease = Some((limit, expires));
    }

    /// The grant in force at `now`.
    pub fn current(&self, now: Duration) -> (Limit, Source) {
        match (self.lease, self.file) {
            (Some((limit, expires)), _) if now < expires => (limit, Source::Lease),
            (_, Some(file)) => (file, Source::File),
            _ => (self.env, Source::Env),
        }
    }
}

/// The limit file's JSON (`{"requests":12,"periodMillis":10000,"maxConcurrency":2}`).
/// An empty file (the annotation is not there yet) or a period of zero reads
/// as no file.
pub fn parse_limit_file(text: &str) -> Result<Option<Limit>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let limit: Limit = serde_json::from_str(text).map_err(|e| format!("not a limit: {e}"))?;
    if limit.period_millis == 0 {
        return Err("periodMillis is 0".into());
    }
    Ok(Some(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests: u32) -> Limit {
        Limit {
            requests,
            period_millis: 10_000,
            max_concurrency: 1,
        }
    }

    #[test]
    fn a_lease_wins_until_it_expires_then_the_file_then_the_env() {
        let second = Duration::from_secs(1);
        let mut limits = Limits::new(limit(4));
        assert_eq!(limits.current(second), (limit(4), Source::Env));
        limits.set_file(Some(limit(6)));
        assert_eq!(limits.current(second), (limit(6), Source::File));
        limits.set_lease(limit(9), 15 * second);
        assert_eq!(limits.current(14 * second), (limit(9), Source::Lease));
        assert_eq!(limits.current(15 * second), (limit(6), Source::File));
        limits.set_file(None);
        assert_eq!(limits.current(16 * second), (limit(4), Source::Env));
    }

    #[test]
    fn the_file_reads_the_annotation_json() {
        assert_eq!(
            parse_limit_file(r#"{"requests":12,"periodMillis":10000,"maxConcurrency":2}"#),
            Ok(Some(Limit {
                requests: 12,
                period_millis: 10_000,
                max_concurrency: 2
            }))
        );
        assert_eq!(parse_limit_file("\n"), Ok(None));
        assert!(parse_limit_file(r#"{"requests":1,"periodMillis":0,"maxConcurrency":1}"#).is_err());
        assert!(parse_limit_file("{").is_err());
    }
}
