//! `catalog-sync`: a batch client of Sales Layer's Catalog REST API v2, the
//! worked example of the README's section for integration developers.
//!
//! ```text
//!  catalog-sync ──GET Products?$top=100…──▶ SALESLAYER_API_URL (the sidecar: paces, retries)
//!       │  ◀── {"value":[…],"@nextLink":"…"} ──┘            └──▶ Sales Layer
//!       └─ after each page: output (JSON lines), checkpoint (last good item), progress
//! ```
//!
//! It pages through every product by `@nextLink` ([`sync`]); after each page
//! it writes the products (optionally), then a checkpoint of the last good
//! item to a file on a volume ([`checkpoint`]); on start it resumes from that
//! checkpoint, so a killed run never fetches its finished pages again. Without
//! a sidecar it paces itself by the lease, the limit file or its env share,
//! like any client of the pod contract ([`pace`]). Progress goes to stderr as
//! log lines and to a Prometheus text file; the count goes to stdout at the
//! end. Every setting comes from the environment ([`config`]).
//!
//! May import: the pod contract (`saleslayer-contract`), an HTTP client,
//! serde. Never: a Kubernetes client, anything of the operator's.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod log;
pub mod pace;
pub mod sync;

pub use checkpoint::Checkpoint;
pub use config::Config;
pub use sync::{Sync, SyncError};
