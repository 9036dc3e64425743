//! The operator's own CA and serving certificates (DESIGN.md §8).
//!
//! The CA (ten years) lives in the Secret `saleslayer-operator-tls` in the
//! operator's namespace so every replica and every restart signs with the
//! same one; the API server trusts it through the webhook's `caBundle`, and
//! pods through the `saleslayer-operator-ca` ConfigMap. Each process issues
//! its own short-lived serving certificate from that CA at start and again
//! well before it expires, so rotation never needs coordination. When the
//! namespace does not exist, the CA is kept in memory and a warning says so.
//! Certificate files from a mount (cert-manager) replace all of this.
//!
//! Private keys never reach a log.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The Secret holding the operator's CA.
pub const SECRET_NAME: &str = "saleslayer-operator-tls";
/// How long a serving certificate is valid.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a process re-issues its serving certificate (well within validity).
pub const REISSUE_EVERY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading Secret {0}: {1}")]
    ReadSecret(String, #[source] kube::Error),
    #[error("writing Secret {0}: {1}")]
    WriteSecret(String, #[source] kube::Error),
    #[error("Secret {0} lacks {1}")]
    IncompleteSecret(String, &'static str),
    #[error("reading certificate file {0}: {1}")]
    ReadFile(String, #[source] std::io::Error),
}

/// A CA able to sign serving certificates.
pub struct Authority {
    /// PEM of the CA certificate (the caBundle, and the pods' CA file).
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A serving certificate and its key, PEM.
#[derive(Clone)]
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serving { .. }")
    }
}

impl Authority {
    /// A new CA.
    pub fn generate() -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let params = ca_params()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored as PEM.
    pub fn from_pem(ca_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)?;
        Ok(Self {
            ca_pem: ca_pem.to_owned(),
            issuer,
        })
    }

    /// A serving certificate for `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[String]) -> Result<Serving, Error> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "saleslayer-operator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + SERVING_VALIDITY;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Serving {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

fn ca_params() -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "saleslayer-operator-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    Ok(params)
}

/// The CA from the Secret in `namespace`, made and stored there on first use.
/// If the namespace does not exist, a CA kept in memory, with a warning.
pub async fn authority(client: &Client, namespace: &str) -> Result<Authority, Error> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let at = format!("{namespace}/{SECRET_NAME}");
    loop {
        match secrets.get_opt(SECRET_NAME).await {
            Ok(Some(secret)) => return from_secret(&secret, &at),
            Ok(None) => {}
            Err(error) => return Err(Error::ReadSecret(at, error)),
        }
        let authority = Authority::generate()?;
        let data: BTreeMap<String, ByteString> = [
            (
                "ca.crt".to_owned(),
                ByteString(authority.ca_pem.clone().into_bytes()),
            ),
            (
                "ca.key".to_owned(),
                ByteString(authority.key_pem().into_bytes()),
            ),
        ]
        .into();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.into()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(authority),
            // Another replica made it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::warn!(
                    %namespace,
                    "namespace does not exist: the CA is kept in memory only, so each restart makes a new one (create the namespace or set --namespace)"
                );
                return Ok(authority);
            }
            Err(error) => return Err(Error::WriteSecret(at, error)),
        }
    }
}

fn from_secret(secret: &Secret, at: &str) -> Result<Authority, Error> {
    let data = secret.data.as_ref();
    let field = |key: &'static str| {
        data.and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| Error::IncompleteSecret(at.to_owned(), key))
    };
    Authority::from_pem(&field("ca.crt")?, &field("ca.key")?)
}

/// The names a serving certificate must cover: the Service's DNS names in
/// `namespace`, and the host of `url` when the operator runs outside.
pub fn serving_names(services: &[&str], namespace: &str, url: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = services
        .iter()
        .flat_map(|service| {
            [
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ]
        })
        .collect();
    if let Some(host) = url.and_then(url_host) {
        names.push(host);
    }
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    names.sort();
    names.dedup();
    names
}

/// The host of an `https://host:port/path` URL (brackets removed from IPv6).
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_services_and_the_url_host() {
        let names = serving_names(
            &["saleslayer-operator-webhook"],
            "saleslayer-system",
            Some("https://10.1.2.3:9443/mutate"),
        );
        assert!(names.contains(&"saleslayer-operator-webhook.saleslayer-system.svc".to_owned()));
        assert!(names.contains(&"10.1.2.3".to_owned()));
        assert_eq!(
            url_host("https://[::1]:9443/mutate").as_deref(),
            Some("::1")
        );
        assert_eq!(
            url_host("https://webhook.example:9443").as_deref(),
            Some("webhook.example")
        );
    }

    #[test]
    fn a_stored_ca_signs_again() {
        let ca = Authority::generate().expect("CA");
        let again = Authority::from_pem(&ca.ca_pem, &ca.key_pem()).expect("CA from PEM");
        let serving = again
            .issue(&["localhost".into()])
            .expect("serving certificate");
        assert!(serving.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{serving:?}").contains("PRIVATE"));
    }
}
