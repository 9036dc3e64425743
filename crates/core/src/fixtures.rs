//! Objects the core's unit tests build again and again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::account::{ValidatedAccount, validate_account};
use crate::api::{SalesLayerAccount, SalesLayerIntegration, SalesLayerIntegrationSpec};
use crate::plan::{ValidatedIntegration, validate};

/// An integration `namespace/name` with `spec` (JSON), generation 3.
pub fn sli(namespace: &str, name: &str, spec: serde_json::Value) -> SalesLayerIntegration {
    let spec: SalesLayerIntegrationSpec = serde_json::from_value(spec).expect("spec");
    let mut sli = SalesLayerIntegration::new(name, spec);
    sli.metadata.namespace = Some(namespace.into());
    sli.metadata.generation = Some(3);
    sli
}

/// The same, validated.
pub fn valid(namespace: &str, name: &str, spec: serde_json::Value) -> ValidatedIntegration {
    validate(&sli(namespace, name, spec)).expect("valid")
}

/// A time `seconds` after the epoch.
pub fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("time"))
}

/// An account `name` with `spec` (JSON), generation 1.
pub fn account(name: &str, spec: serde_json::Value) -> SalesLayerAccount {
    let spec = serde_json::from_value(spec).expect("account spec");
    let mut sla = SalesLayerAccount::new(name, spec);
    sla.metadata.generation = Some(1);
    sla
}

/// The documented account `acme`: 50 per 10 s, 40 usable, all namespaces.
pub fn acme() -> ValidatedAccount {
    validate_account(&account("acme", serde_json::json!({}))).expect("valid account")
}
