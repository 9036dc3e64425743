//! Certificates and kubeconfigs of a test cluster: one CA signs every
//! serving and client certificate; identities follow the Kubernetes
//! conventions (`O` = groups, `CN` = user), so RBAC's bootstrap roles apply.
//!
//! Only writes files under the directory it is given; no process, no network.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;

/// A CA whose certificate and key live in `<dir>/pki`.
pub(crate) struct Authority {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub(crate) cert: PathBuf,
}

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub(crate) struct Pair {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl Authority {
    /// A fresh CA in `<dir>/pki`.
    pub(crate) fn generate(dir: &Path) -> Result<Self, Error> {
        let dir = dir.join("pki");
        fs::create_dir_all(&dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "saleslayer-testenv-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let path = dir.join("ca.crt");
        fs::write(&path, cert.pem())?;
        Ok(Self {
            dir,
            issuer: Issuer::new(params, key),
            cert: path,
        })
    }

    /// A serving certificate for these DNS names and addresses.
    pub(crate) fn serving(
        &self,
        name: &str,
        dns: &[&str],
        addresses: &[IpAddr],
    ) -> Result<Pair, Error> {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.write(name, &params)
    }

    /// A client certificate for user `user` in `groups`.
    pub(crate) fn client(&self, file: &str, user: &str, groups: &[&str]) -> Result<Pair, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.write(file, &params)
    }

    /// A key pair for signing service-account tokens: (private, public).
    pub(crate) fn service_account_key(&self) -> Result<Pair, Error> {
        let key = KeyPair::generate()?;
        let pair = Pair {
            cert: self.dir.join("sa.pub"),
            key: self.dir.join("sa.key"),
        };
        fs::write(&pair.key, key.serialize_pem())?;
        fs::write(&pair.cert, key.public_key_pem())?;
        Ok(pair)
    }

    fn write(&self, file: &str, params: &CertificateParams) -> Result<Pair, Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pair = Pair {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        fs::write(&pair.cert, cert.pem())?;
        fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }

    /// Write a kubeconfig for `client` against `server` to `path`.
    pub(crate) fn kubeconfig(&self, path: &Path, server: &str, client: &Pair) -> Result<(), Error> {
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: user
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: testenv
  context: {{cluster: testenv, user: user, namespace: default}}
current-context: testenv
",
            ca = self.cert.display(),
            cert = client.cert.display(),
            key = client.key.display(),
        );
        fs::write(path, text)?;
        Ok(())
    }
}
