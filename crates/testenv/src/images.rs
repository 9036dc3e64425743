//! The images `make image` builds (`scripts/image.py`): docker-archive
//! tarballs and an `images.json` that names them. No registry is reachable
//! from the node, so every image a pod runs is imported into the node's
//! containerd from these files, and pods use `imagePullPolicy: Never`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::{Error, workspace_root};

/// One image archive.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageArchive {
    /// The image reference pods name (`localhost/saleslayer-operator:0.1.0`).
    pub reference: String,
    /// The archive's file name in [`images_dir`].
    pub file: String,
}

impl ImageArchive {
    /// The archive's path.
    pub fn path(&self) -> PathBuf {
        images_dir().join(&self.file)
    }
}

/// Where `make image` writes: `SALESLAYER_IMAGES`, else
/// `$CARGO_TARGET_DIR/images`, else `target/images`.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SALESLAYER_IMAGES") {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("images")
}

/// The archive `make image` built as `name` (`operator`, `pause`, `workload`).
pub fn image(name: &str) -> Result<ImageArchive, Error> {
    let index = images_dir().join("images.json");
    let text = std::fs::read_to_string(&index).map_err(|_| Error::MissingImages(index.clone()))?;
    let images: BTreeMap<String, ImageArchive> = serde_json::from_str(&text).map_err(|e| {
        Error::Setup(format!(
            "{} is not what make image writes: {e}",
            index.display()
        ))
    })?;
    let image = images
        .get(name)
        .cloned()
        .ok_or_else(|| Error::Setup(format!("{} names no {name} image", index.display())))?;
    if !image.path().is_file() {
        return Err(Error::MissingImages(image.path()));
    }
    Ok(image)
}
