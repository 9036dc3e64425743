//! The pure core of saleslayer-operator: what the world should look like,
//! computed from values, with no I/O.
//!
//! ```text
//!  api (CRD types) ──▶ account::validate_account ─┐  (usable, effective, who may use it)
//!                  ──▶ plan::validate ──────────────┴▶ plan::plan_account ──▶ allocation::allocate
//!                                                        │                      │
//!                 status, account::account_status ◀──────┘                      ▼
//!  injection (the webhook's decision)     lease_book (grants) ◀── demand, throttle (books of reports)
//!  adaptation (AIMD of the effective budget) ◀── adaptation::AccountThrottling
//! ```
//!
//! May import: the pod contract (`saleslayer-contract`), Kubernetes *types*
//! (`k8s-openapi`, `kube`'s derive and admission types), serde, json-patch.
//! Never: a Kubernetes client, an async runtime, a clock (time is always a
//! parameter in milliseconds), a file, a socket, a log line. Everything here
//! is tested without an API server.
#![forbid(unsafe_code)]

pub mod account;
pub mod adaptation;
pub mod allocation;
pub mod api;
pub mod demand;
pub mod injection;
pub mod lease_book;
pub mod plan;
pub mod status;
pub mod throttle;

#[cfg(test)]
mod fixtures;

pub use saleslayer_contract as contract;
