//! The serving TLS of the webhook and the quota API: one configuration both
//! servers read at each new connection, so a renewed certificate is served
//! from the next handshake on, without a restart. It is replaced when the
//! operator issues itself a new certificate, and when mounted certificate
//! files (cert-manager) change on disk ([`follow_files`]).
//!
//! HTTP/1.1 only (ALPN), which is what the servers speak. Keys never reach a log.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

/// Why a certificate could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate PEM holds no certificate: {0}")]
    Certificate(String),
    #[error("the key PEM holds no private key: {0}")]
    Key(String),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The certificate being served, replaceable while serving.
pub struct ServingTls {
    current: RwLock<Arc<ServerConfig>>,
}

impl ServingTls {
    /// Serve `cert_pem` (the leaf first, then its chain) with `key_pem`.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(server_config(cert_pem, key_pem)?)),
        }))
    }

    /// Serve another certificate from the next handshake on.
    pub fn reload(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let config = Arc::new(server_config(cert_pem, key_pem)?);
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// Complete the server side of a handshake with the current certificate.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let config = match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config).accept(stream).await
    }
}

fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Certificate("no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Mounted certificate files, as cert-manager renews them.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The contents of the three files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificates {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateFiles {
    /// Read all three.
    pub fn read(&self) -> std::io::Result<Certificates> {
        Ok(Certificates {
            ca_pem: std::fs::read_to_string(&self.ca)?,
            cert_pem: std::fs::read_to_string(&self.cert)?,
            key_pem: std::fs::read_to_string(&self.key)?,
        })
    }
}

/// Every `every`, read the files; when they changed, serve the new
/// certificate and hand a new CA to `on_new_ca` (the caBundle, the CA that
/// pods trust). A half-written rotation (a cert and key that do not match
/// yet) is retried at the next look. Runs until `stopped` resolves.
pub async fn follow_files(
    files: CertificateFiles,
    mut seen: Certificates,
    tls: Arc<ServingTls>,
    every: Duration,
    on_new_ca: impl Fn(String) + Send + 'static,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = match files.read() {
            Ok(now) => now,
            Err(error) => {
                warn!(%error, "reading the certificate files failed; serving the previous certificate");
                continue;
            }
        };
        if now == seen {
            continue;
        }
        if (now.cert_pem.as_str(), now.key_pem.as_str())
            != (seen.cert_pem.as_str(), seen.key_pem.as_str())
        {
            if let Err(error) = tls.reload(now.cert_pem.as_bytes(), now.key_pem.as_bytes()) {
                warn!(%error, "the renewed certificate files do not load yet; retrying");
                continue;
            }
            info!("serving the renewed certificate from the mounted files");
        }
        if now.ca_pem != seen.ca_pem {
            on_new_ca(now.ca_pem.clone());
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Authority;

    #[test]
    fn a_certificate_and_its_key_load_and_garbage_does_not() {
        let ca = Authority::generate().expect("CA");
        let serving = ca.issue(&["localhost".into()]).expect("issued");
        assert!(
            ServingTls::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes()).is_ok()
        );
        assert!(matches!(
            ServingTls::from_pem(b"not a certificate", serving.key_pem.as_bytes()),
            Err(TlsError::Certificate(_))
        ));
        assert!(matches!(
            ServingTls::from_pem(serving.cert_pem.as_bytes(), b"no key"),
            Err(TlsError::Key(_))
        ));
    }
}
