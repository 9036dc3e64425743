//! saleslayer-operator keeps every workload that shares a Sales Layer account
//! under the account's rate limit (50 requests per 10 seconds). This crate is
//! the operator process: the parts that talk to the API server and serve
//! HTTPS, wired together by [`operator::run`].
//!
//! ```text
//!  SLI/pod watches ──▶ state (stores, pod index, reports) ──▶ controller ──▶ status + pod annotations
//!                              │                                 ▲
//!  API server ──▶ webhook ─────┤ (injects each pod's share)      │ reconcile on change
//!  sidecars ───▶ quota API ────┘ (leases; reports ──▶ Reports) ──┘
//!                 leader (Lease) decides who writes; certs, metrics, alerts serve them all
//! ```
//!
//! What to compute lives in `saleslayer-core` (pure: allocation, planning,
//! status, injection, the books); what pods read lives in
//! `saleslayer-contract`. Modules here may import those, the Kubernetes
//! client and `saleslayer-runtime`, and each other only downwards:
//! `operator` → {`controller`, `webhook`, `quota`} → {`state`, `leader`,
//! `metrics`, `certs`, `alerts`}. Nothing here is test support: the test
//! cluster is the `saleslayer-testenv` dev-dependency.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod certs;
pub mod cli;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod quota;
pub mod state;
pub mod tls;
pub mod webhook;

/// The one field manager every write of the operator goes through.
pub const FIELD_MANAGER: &str = "saleslayer-operator";
