//! Client TLS material for exporters: CA bundle, client certificate and key, from PEM files.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

use super::BuildError;
use crate::config::ClientTlsConfig;

fn read(key: &str, path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|e| BuildError::new(key, format!("cannot read {}: {e}", path.display())))
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, BuildError> {
    let pem = read(key, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| BuildError::new(key, format!("{}: not a PEM certificate: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(BuildError::new(key, format!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

/// A rustls client config for HTTP exporters: the given CA (or the built-in web roots) and an
/// optional client certificate.
pub fn rustls_client_config(tls: Option<&ClientTlsConfig>, base_key: &str) -> Result<rustls::ClientConfig, BuildError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BuildError::new(base_key, format!("TLS setup failed: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match tls.and_then(|t| t.ca_file.as_deref()) {
        Some(ca) => {
            let key = format!("{base_key}.ca_file");
            for cert in certificates(&key, ca)? {
                roots.add(cert).map_err(|e| BuildError::new(&key, format!("{}: {e}", ca.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match tls.map(|t| (t.cert_file.as_deref(), t.key_file.as_deref())) {
        Some((Some(cert), Some(key_path))) => {
            let certs = certificates(&format!("{base_key}.cert_file"), cert)?;
            let key_name = format!("{base_key}.key_file");
            let key = PrivateKeyDer::from_pem_slice(&read(&key_name, key_path)?)
                .map_err(|e| BuildError::new(&key_name, format!("{}: not a PEM private key: {e}", key_path.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| BuildError::new(&key_name, format!("client certificate and key do not fit: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The same material for a tonic (gRPC) channel.
pub fn tonic_client_config(
    tls: Option<&ClientTlsConfig>,
    base_key: &str,
) -> Result<tonic::transport::ClientTlsConfig, BuildError> {
    let mut config = tonic::transport::ClientTlsConfig::new();
    let Some(tls) = tls else {
        return Ok(config.with_webpki_roots());
    };
    config = match &tls.ca_file {
        Some(ca) => {
            let key = format!("{base_key}.ca_file");
            certificates(&key, ca)?;
            config.ca_certificate(tonic::transport::Certificate::from_pem(read(&key, ca)?))
        }
        None => config.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        let cert_pem = read(&format!("{base_key}.cert_file"), cert)?;
        let key_pem = read(&format!("{base_key}.key_file"), key)?;
        config = config.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}
