//! saleslayer-operator keeps every workload that shares a Sales Layer account
//! under the account's rate limit (50 requests per 10 seconds).
//!
//! ```text
//!  SalesLayerIntegration ──▶ controller ──▶ allocation (pure) ──▶ status + pod annotations
//!          pods ──▶ webhook (injects each pod's share)      quota API ◀── sidecars / clients
//! ```
//!
//! The binary (`src/main.rs`) is a thin command line over these modules; see
//! `DESIGN.md` for the contracts each one builds against.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod allocation;
pub mod api;
pub mod certs;
pub mod cli;
pub mod clock;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod proxy;
pub mod quota;
pub mod simulator;
pub mod testenv;
pub mod webhook;
