//! The Prometheus text exposition every process serves on `/metrics`: one
//! encoder and one answer, so the operator and the sidecar agree on the
//! content type.

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;

/// An outcome and, for failures, its reason: the one label set the
/// operator's and the sidecar's counters of outcomes share.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// The text exposition of `registry` (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        text.clear();
    }
    text
}

/// A `/metrics` answer: `text` as OpenMetrics.
pub fn exposition(text: String) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
