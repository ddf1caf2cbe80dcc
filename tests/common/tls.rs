//! Certificates for the gRPC port's TLS, made fresh by each test with `rcgen`, and a raw
//! TLS client that reports which certificate the server presented.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The name every server certificate here is issued for (with 127.0.0.1), and the name
/// clients check.
pub const SERVER_NAME: &str = "localhost";

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER bytes, to compare with what a server presents.
    pub der: Vec<u8>,
}

impl Issued {
    /// This pair as a client identity for tonic.
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Writes the certificate to `cert` and the key to `key`, each through a rename, so
    /// meshlimit's watcher reads whole files (as a Kubernetes Secret update gives them).
    pub fn write(&self, cert: &Path, key: &Path) {
        write_atomically(key, &self.key_pem);
        write_atomically(cert, &self.cert_pem);
    }
}

fn write_atomically(path: &Path, text: &str) {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temp, text).unwrap_or_else(|err| panic!("write {}: {err}", temp.display()));
    std::fs::rename(&temp, path)
        .unwrap_or_else(|err| panic!("rename {} to {}: {err}", temp.display(), path.display()));
}

/// A certificate authority that issues server and client certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(common_name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("generate the CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-sign the CA"),
        }
    }

    /// The CA certificate, for `--tls-client-ca` or a client's trusted roots.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A new server certificate (with a new key) for `localhost` and 127.0.0.1.
    pub fn server_cert(&self) -> Issued {
        self.issue(
            vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()],
            "meshlimit",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A new client certificate naming `common_name`.
    pub fn client_cert(&self, common_name: &str) -> Issued {
        self.issue(Vec::new(), common_name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A new client certificate whose subject alternative name is the DNS name `name`.
    pub fn client_cert_for(&self, name: &str) -> Issued {
        self.issue(
            vec![name.to_owned()],
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Issued {
        let mut params = CertificateParams::new(names).expect("certificate params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("generate a key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign a certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A tonic client config trusting this CA for `localhost`, presenting `identity` when
    /// given.
    pub fn client_config(&self, identity: Option<&Issued>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.pem()))
            .domain_name(SERVER_NAME);
        match identity {
            Some(issued) => config.identity(issued.identity()),
            None => config,
        }
    }

    /// Connects to `addr` over TLS as a client trusting this CA (presenting `identity`) and
    /// returns the DER of the leaf certificate the server presented.
    pub async fn presented_certificate(
        &self,
        addr: SocketAddr,
        identity: &Issued,
    ) -> Result<Vec<u8>, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.issuer.der().clone())
            .map_err(|err| format!("trust the CA: {err}"))?;
        let chain = vec![CertificateDer::from(identity.der.clone())];
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|err| format!("read the client key: {err}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|err| format!("use the client certificate: {err}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(SERVER_NAME).map_err(|err| err.to_string())?;
        let handshake = async {
            let tcp = TcpStream::connect(addr).await?;
            connector.connect(name, tcp).await
        };
        let stream = tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .map_err(|_| format!("TLS handshake with {addr} timed out"))?
            .map_err(|err| format!("TLS handshake with {addr}: {err}"))?;
        let (_, session) = stream.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.to_vec())
            .ok_or_else(|| format!("{addr} presented no certificate"))
    }
}

/// A TLS acceptor offering h2 with the certificate `issued`, for tests that stand in for a
/// server meshlimit calls and look at the raw HTTP/2 request.
pub fn h2_acceptor(issued: &Issued) -> tokio_rustls::TlsAcceptor {
    let chain = vec![CertificateDer::from(issued.der.clone())];
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("the server key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
