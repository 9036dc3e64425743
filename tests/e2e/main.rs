//! End-to-end tests on a real node (DESIGN.md §9, issue 11): the control
//! plane plus kube-controller-manager, kube-scheduler, containerd, the
//! kubelet, kube-proxy and CoreDNS from `tests/testenv/`, in a network
//! namespace of their own (`saleslayer_testenv::Node`), one for the whole
//! run. The operator runs from its own image (`make image`), installed by the
//! Helm chart; workloads run their injected sidecars for real against the
//! simulator, itself a pod behind a Service.
//!
//! `make e2e` runs them (`cargo test --test e2e -- --test-threads=1
//! --nocapture`): the target is `test = false`, so `cargo test` never
//! starts a node. Each test uses its own namespace; timings are measured and
//! printed, never asserted. Modules run in name order with one thread:
//! `image` and `network` first, then the scenarios `s1`…`s6` of the
//! real-node issue and `s7`, the batch client as a Job (issue 14).

mod image;
mod network;
mod operator;
mod s1_install;
mod s2_workload;
mod s3_share;
mod s4_rollout;
mod s5_failover;
mod s6_upgrade;
mod s7_batch_job;
mod support;
mod workload;
