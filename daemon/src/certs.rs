//! Certificates: `latticed certs init|issue`, loading PEM files, and the ephemeral self-signed
//! material a lone node runs on.
//!
//! Every node certificate carries two DNS names: the node name and [`CLUSTER_SERVER_NAME`],
//! which is the name a node asks for when it dials a peer (peers are dialled by address, and
//! any certificate the cluster CA signed is a cluster member). The node name is what ties a
//! peer's replication hello to its certificate ([`certifies`]): a node cannot speak for another.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::DaemonError;

/// The TLS server name every node certificate carries and every dial asks for.
pub const CLUSTER_SERVER_NAME: &str = "latticed";

/// The node names a certificate (DER) carries: its DNS names, [`CLUSTER_SERVER_NAME`] aside.
pub fn node_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) if *d != CLUSTER_SERVER_NAME => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// Whether the holder of `cert` (a peer's end-entity certificate, which the cluster CA signed)
/// may speak for the node `name`: one of the certificate's node names must be `name`. A
/// certificate with no node name (one certificate shared by every node) speaks for any node:
/// per-node certificates (as the DaemonSet in docker/kubernetes/ issues) are what stop a node
/// from speaking for another.
pub fn certifies(cert: &CertificateDer<'_>, name: &str) -> bool {
    let names = node_names(cert);
    names.is_empty() || names.iter().any(|n| n == name)
}

/// What a node needs for mutual TLS.
#[derive(Debug)]
pub struct TlsMaterial {
    /// the cluster CA (trust anchor for peers)
    pub ca: Vec<CertificateDer<'static>>,
    /// this node's certificate chain
    pub chain: Vec<CertificateDer<'static>>,
    /// this node's key
    pub key: PrivateKeyDer<'static>,
    /// whether this is throwaway material made at startup
    pub ephemeral: bool,
}

fn certs_err(e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Certs(e.to_string())
}

fn write_new(path: &Path, contents: &str, force: bool, private: bool) -> Result<(), DaemonError> {
    if path.exists() && !force {
        return Err(DaemonError::Certs(format!(
            "{} exists; pass --force to overwrite it",
            path.display()
        )));
    }
    // a private key is created readable by its owner only: never, even briefly, by others
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .map_err(|e| DaemonError::io(format!("writing {}", path.display()), e))?;
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .map_err(|e| DaemonError::io(format!("writing {}", path.display()), e))?;
    #[cfg(unix)]
    if private {
        // an existing file (--force) keeps its mode on open: restrict it too
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| DaemonError::io(format!("restricting {}", path.display()), e))?;
    }
    Ok(())
}

fn ca_params() -> Result<CertificateParams, DaemonError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(certs_err)?;
    p.distinguished_name
        .push(DnType::CommonName, "latticed cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(p)
}

fn node_params(name: &str) -> Result<CertificateParams, DaemonError> {
    let mut p = CertificateParams::new(vec![name.to_string(), CLUSTER_SERVER_NAME.to_string()])
        .map_err(|e| {
            DaemonError::Certs(format!("node name `{name}` is not a valid DNS name: {e}"))
        })?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2031, 1, 1);
    Ok(p)
}

/// `latticed certs init`: a new cluster CA in `dir`. Returns the files written.
pub fn init_ca(dir: &Path, force: bool) -> Result<Vec<PathBuf>, DaemonError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| DaemonError::io(format!("creating {}", dir.display()), e))?;
    let key = KeyPair::generate().map_err(certs_err)?;
    let cert = ca_params()?.self_signed(&key).map_err(certs_err)?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    write_new(&cert_path, &cert.pem(), force, false)?;
    write_new(&key_path, &key.serialize_pem(), force, true)?;
    Ok(vec![cert_path, key_path])
}

/// `latticed certs issue`: a node certificate signed by the CA in `dir`.
pub fn issue(dir: &Path, name: &str, force: bool) -> Result<Vec<PathBuf>, DaemonError> {
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(|e| {
            DaemonError::io(
                format!("reading {} (run `latticed certs init` first)", p.display()),
                e,
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(certs_err)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).map_err(certs_err)?;
    let key = KeyPair::generate().map_err(certs_err)?;
    let cert = node_params(name)?
        .signed_by(&key, &issuer)
        .map_err(certs_err)?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    write_new(&cert_path, &cert.pem(), force, false)?;
    write_new(&key_path, &key.serialize_pem(), force, true)?;
    Ok(vec![cert_path, key_path])
}

/// Loads the CA, certificate chain and key from PEM files.
pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, DaemonError> {
    let tls_err = |path: &Path, reason: String| DaemonError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, DaemonError> {
        let all = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_err(path, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(path, e.to_string()))?;
        if all.is_empty() {
            return Err(tls_err(path, "no certificate in file".into()));
        }
        Ok(all)
    };
    Ok(TlsMaterial {
        ca: certs(ca)?,
        chain: certs(cert)?,
        key: PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?,
        ephemeral: false,
    })
}

/// Throwaway material for a node that runs alone: a CA and a node certificate made now.
pub fn ephemeral(name: &str) -> Result<TlsMaterial, DaemonError> {
    let ca_key = KeyPair::generate().map_err(certs_err)?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(certs_err)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(certs_err)?;
    let params = node_params(name).or_else(|_| node_params(CLUSTER_SERVER_NAME))?;
    let cert = params.signed_by(&key, &issuer).map_err(certs_err)?;
    Ok(TlsMaterial {
        ca: vec![ca_cert.der().clone()],
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| DaemonError::Certs(e.to_string()))?,
        ephemeral: true,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_node_certificate_speaks_for_its_node_only() {
        let n1 = ephemeral("n1").unwrap();
        assert_eq!(node_names(&n1.chain[0]), vec!["n1".to_string()]);
        assert!(certifies(&n1.chain[0], "n1"));
        assert!(!certifies(&n1.chain[0], "n2"));
        assert!(!certifies(&n1.chain[0], CLUSTER_SERVER_NAME));
        // one certificate shared by every node carries no node name
        let shared = ephemeral(CLUSTER_SERVER_NAME).unwrap();
        assert!(node_names(&shared.chain[0]).is_empty());
        assert!(certifies(&shared.chain[0], "n2"));
    }
}
