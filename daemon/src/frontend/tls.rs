//! TLS on the front-end (`--listen-tls-cert`, `--listen-tls-key`, optionally
//! `--listen-tls-client-ca` for client certificates).
//!
//! In a DaemonSet the front-end's port is on the node's network, so it may need TLS of its
//! own, independent of the cluster's mutual TLS: any certificate the clients trust. ALPN offers
//! `h2` and `http/1.1`, so gRPC, gRPC-Web and HTTP/JSON all work over it. TLS 1.2 and 1.3
//! (ring). With a client CA, a client without a certificate signed by it is refused at the
//! handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::DaemonError;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn tls_err(path: &Path, reason: impl std::fmt::Display) -> DaemonError {
    DaemonError::Tls {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, DaemonError> {
    let all = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if all.is_empty() {
        return Err(tls_err(path, "no certificate in file"));
    }
    Ok(all)
}

/// The front-end's TLS configuration from the PEM files: the certificate chain and key, and
/// the CA client certificates must chain to (none: no client certificates asked).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, DaemonError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| tls_err(ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| tls_err(cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
