//! Certificates for TLS tests, made fresh by each test: a private CA, a server certificate
//! and a client certificate it signed, written as PEM files that an agent config can name,
//! and the TLS setups of the clients and stand-ins that use them.
//!
//! Every key and certificate lives only as long as its [`Pki`]; two `Pki`s share nothing,
//! so one's CA never vouches for the other's certificates — the way to play a wrong CA.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// ALPN of a gRPC server: HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of an HTTP/1.1 server.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// The names the server certificate of [`Pki::new`] is valid for: what clients on this
/// machine dial.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// Makes ring the process's rustls crypto provider, once. reqwest is built with rustls but
/// without a provider of its own (ring is the one the agent and this suite use), so building
/// a client that brings no TLS config of its own panics until one is installed. That covers
/// the SDK's OTLP/HTTP exporter too: [`crate::Agent::start`] calls this first.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only when another provider is already the default, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A certificate and its private key, in memory and as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A private CA and the certificates it signed, as PEM files in a temporary directory that
/// is removed on drop.
pub struct Pki {
    /// Holds the PEM files; removed on drop.
    _dir: TempDir,
    pub ca_pem: String,
    pub ca_file: PathBuf,
    /// For a server: extended key usage `serverAuth`, the names given at creation.
    pub server: Issued,
    /// For a client: extended key usage `clientAuth`.
    pub client: Issued,
}

impl Pki {
    /// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate.
    pub fn new() -> Pki {
        Pki::with_server_names(LOCAL_NAMES)
    }

    /// A CA, a server certificate valid for exactly `names` (DNS names or IP addresses), and
    /// a client certificate.
    pub fn with_server_names(names: &[&str]) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("periscope-e2e-pki-")
            .tempdir()
            .expect("cannot create a temporary directory");

        let ca_key = KeyPair::generate().expect("cannot generate the CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        // A name of its own: a client that trusts another CA must find this one unknown,
        // not mistake it for its own and fail on the signature.
        static CAS: AtomicUsize = AtomicUsize::new(0);
        let serial = CAS.fetch_add(1, Ordering::Relaxed);
        ca_params.distinguished_name.push(DnType::CommonName, format!("Periscope test CA {serial}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("cannot self-sign the CA certificate");
        let ca = Issuer::new(ca_params, ca_key);
        let ca_pem = ca_cert.pem();
        let ca_file = write(dir.path(), "ca.pem", &ca_pem);

        let server_names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let server = issue(&ca, dir.path(), "server", server_names, ExtendedKeyUsagePurpose::ServerAuth);
        let client = issue(&ca, dir.path(), "client", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        Pki { _dir: dir, ca_pem, ca_file, server, client }
    }

    /// The body of `sources.otlp.tls`: this server certificate, and with `require_client_cert`
    /// clients must present a certificate signed by this CA.
    pub fn receiver_config(&self, require_client_cert: bool) -> String {
        let mut body =
            format!("{{ cert_file: {}, key_file: {}", quoted(&self.server.cert_file), quoted(&self.server.key_file));
        if require_client_cert {
            body.push_str(&format!(", client_ca_file: {}", quoted(&self.ca_file)));
        }
        body.push_str(" }");
        body
    }

    /// The value of `exporters.jaeger.tls`: trust this CA, present this client certificate.
    pub fn exporter_config(&self) -> String {
        format!(
            "{{ ca_file: {}, cert_file: {}, key_file: {} }}",
            quoted(&self.ca_file),
            quoted(&self.client.cert_file),
            quoted(&self.client.key_file)
        )
    }

    /// The value of `exporters.jaeger.tls` that trusts this CA and presents no certificate.
    pub fn exporter_config_without_certificate(&self) -> String {
        format!("{{ ca_file: {} }}", quoted(&self.ca_file))
    }

    /// [`Pki::exporter_config`], verifying the server certificate against `server_name`
    /// instead of the endpoint's host.
    pub fn exporter_config_with_server_name(&self, server_name: &str) -> String {
        let config = self.exporter_config();
        let open = config.strip_suffix(" }").expect("a flow mapping");
        format!("{open}, server_name: \"{server_name}\" }}")
    }

    /// The CA certificate, parsed.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("the CA PEM parses")
    }

    /// A rustls client config trusting only this CA, offering HTTP/2 and HTTP/1.1, that
    /// presents `certificate` when given (this `Pki`'s client, or another's).
    pub fn rustls_client(&self, certificate: Option<&Issued>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).expect("the CA certificate is a valid root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots);
        let mut config = match certificate {
            Some(issued) => {
                let (certs, key) = issued.parsed();
                builder.with_client_auth_cert(certs, key).expect("the client certificate fits its key")
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// A rustls server config with this server certificate that requires clients to present
    /// a certificate signed by this CA, offering the protocols of `alpn`.
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).expect("the CA certificate is a valid root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("a client verifier for the CA");
        let (certs, key) = self.server.parsed();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("the server certificate fits its key");
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        config
    }

    /// A rustls server config with this server certificate that asks clients for none (as
    /// an API server does for bearer-token clients), offering the protocols of `alpn`.
    pub fn rustls_server_without_client_auth(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (certs, key) = self.server.parsed();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the server certificate fits its key");
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        config
    }

    /// A tonic client TLS config trusting only this CA that presents `certificate` when
    /// given (this `Pki`'s client, or another's).
    pub fn tonic_client(&self, certificate: Option<&Issued>) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        match certificate {
            Some(issued) => config.identity(tonic::transport::Identity::from_pem(&issued.cert_pem, &issued.key_pem)),
            None => config,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Issued {
    fn parsed(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("the certificate PEM parses");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("the key PEM parses");
        (certs, key)
    }
}

fn issue(
    ca: &Issuer<'_, KeyPair>,
    dir: &Path,
    name: &str,
    subject_alt_names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
) -> Issued {
    let key = KeyPair::generate().expect("cannot generate a key");
    let mut params = CertificateParams::new(subject_alt_names).expect("valid subject alternative names");
    params.distinguished_name.push(DnType::CommonName, format!("periscope-e2e {name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca).expect("cannot sign a certificate");
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    Issued {
        cert_file: write(dir, &format!("{name}.pem"), &cert_pem),
        key_file: write(dir, &format!("{name}.key"), &key_pem),
        cert_pem,
        key_pem,
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// A path as a YAML double-quoted string.
fn quoted(path: &Path) -> String {
    let text = path.to_str().expect("temporary paths are UTF-8");
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
