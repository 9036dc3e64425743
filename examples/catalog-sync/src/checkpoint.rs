//! The checkpoint: the last good item and where the next page starts,
//! written after every page to a file on a volume, so a killed or evicted
//! run resumes where it stopped instead of fetching finished pages again.
//!
//! A write is atomic: the JSON goes to a temporary file beside it, is
//! synced, and is renamed over the old one, so a kill mid-write leaves the
//! previous checkpoint whole. With an output file, the checkpoint also holds
//! the output's length at that page: a resumed run cuts what a killed run
//! wrote after its last checkpoint, so every product is written exactly once.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Progress after the last good page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// The id (`prod_id`) of the last product of the last good page.
    pub last_id: Option<u64>,
    /// Path and query of the next page (the `@nextLink`, made relative to
    /// the base URL); `None` once the last page is done.
    pub next: Option<String>,
    /// Products synced so far.
    pub items: u64,
    /// Pages synced so far.
    pub pages: u64,
    /// The catalog's size as the API counted it (`@count`).
    pub total: Option<u64>,
    /// Bytes of the output file that hold the products synced so far.
    pub output_bytes: u64,
    /// The whole catalog is synced.
    pub done: bool,
}

/// A checkpoint that cannot be read or written.
#[derive(Debug)]
pub struct CheckpointError(pub String);

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointError {}

/// The largest checkpoint read: anything bigger is not ours.
const MAX_CHECKPOINT: u64 = 64 * 1024;

impl Checkpoint {
    /// The checkpoint at `path`; `None` when there is none yet. A file that
    /// is not a checkpoint is an error, never silently a fresh start.
    pub fn load(path: &Path) -> Result<Option<Self>, CheckpointError> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(CheckpointError(format!(
                    "reading the checkpoint {}: {error}",
                    path.display()
                )));
            }
        };
        let mut text = String::new();
        use std::io::Read;
        file.take(MAX_CHECKPOINT)
            .read_to_string(&mut text)
            .map_err(|e| {
                CheckpointError(format!("reading the checkpoint {}: {e}", path.display()))
            })?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            CheckpointError(format!(
                "{} is not a checkpoint ({e}); remove it to start over",
                path.display()
            ))
        })
    }

    /// Write atomically to `path` (creating its directory).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let failed = |e: std::io::Error| {
            CheckpointError(format!("writing the checkpoint {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let temporary = temporary_beside(path);
        let json = serde_json::to_vec(self).map_err(|e| CheckpointError(e.to_string()))?;
        let mut file = std::fs::File::create(&temporary).map_err(failed)?;
        file.write_all(&json).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&temporary, path).map_err(failed)
    }
}

fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_survives_a_round_trip_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/checkpoint.json");
        assert!(Checkpoint::load(&path).expect("readable").is_none());
        let checkpoint = Checkpoint {
            last_id: Some(2_500),
            next: Some("/catalog/rest/Catalog/Products?$top=100&$skipToken=2500".into()),
            items: 2_500,
            pages: 25,
            total: Some(5_000),
            output_bytes: 123,
            done: false,
        };
        checkpoint.save(&path).expect("saved");
        assert_eq!(Checkpoint::load(&path).expect("readable"), Some(checkpoint));
        assert!(
            !temporary_beside(&path).exists(),
            "the temporary file is renamed away"
        );
        let text = std::fs::read_to_string(&path).expect("text");
        assert!(text.contains(r#""lastId":2500"#), "{text}");
    }

    #[test]
    fn a_file_that_is_not_a_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, "{\"lastId\": ").expect("write");
        let error = Checkpoint::load(&path).expect_err("corrupt");
        assert!(error.0.contains("remove it to start over"), "{error}");
    }
}
