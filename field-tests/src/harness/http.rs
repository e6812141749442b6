//! HTTPS clients for the harness: rustls with the ring provider (the workspace's one
//! provider), trusting only the server's private CA, optionally presenting a device
//! certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client trusting only `ca_pem`; with `identity` = (certificate PEM, key PEM) it
/// authenticates as that device (mutual TLS). Every request is bounded by `timeout`.
pub fn client(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("reading the CA PEM")?)
            .context("adding the CA certificate")?;
    }
    if roots.is_empty() {
        return Err(anyhow!("the CA PEM holds no certificate"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("reading the client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .context("reading the client key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client identity")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .https_only(true)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .build()
        .context("building the HTTPS client")
}

/// A plain-HTTP client for the agent's loopback API. (It is handed a ring TLS config
/// trusting nothing, as reqwest is built without a default crypto provider.)
pub fn local_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .no_proxy()
        .timeout(timeout)
        .build()
        .context("building the HTTP client")
}
