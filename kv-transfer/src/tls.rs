//! Optional TLS for the TCP backend (rustls, ring). The sink's secret already keeps strangers
//! from writing, but without TLS it crosses the network in clear once per connection, and so
//! do the KV bytes: on a network others can read or spoof, the decode worker serves its KV
//! endpoint with a certificate (`--kv-tls-cert`, `--kv-tls-key`) for the address it advertises,
//! and prefill workers verify it against a CA (`--kv-tls-ca`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TransferError;

pub use rustls::{ClientConfig, ServerConfig};

fn tls_err(path: &Path, reason: impl std::fmt::Display) -> TransferError {
    TransferError::Tls(format!("`{}`: {reason}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransferError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The KV server's side: its certificate chain and private key, both PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TransferError> {
    let chain = certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(cert, e))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| tls_err(cert, format!("does not go with the key: {e}")))?;
    Ok(Arc::new(config))
}

/// A writer's side: the CA certificates (PEM) that a KV server's certificate must chain to.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, TransferError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|e| tls_err(ca, e))?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(ca, e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}
