//! Integration tests against a real control plane (etcd + kube-apiserver from
//! `tests/testenv/`, started per test by `saleslayer_testenv`).
//! One test binary, one module per part.

mod chart;
mod controller;
mod crd;
mod leader;
mod proxy;
mod quota;
mod smoke;
mod support;
mod webhook;
