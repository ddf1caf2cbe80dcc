//! TLS and mutual TLS on the gRPC port, with certificates reloaded when their files change.
//!
//! rustls asks a resolver for the certificate on every handshake; ours hands out the one
//! last loaded, and a watcher swaps in a new one when the PEM files change on disk (as
//! cert-manager rotates a Kubernetes Secret), so rotation needs no restart. A broken new
//! pair is logged and the old one keeps serving.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The PEM files of the gRPC port's TLS setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
    /// When set (with `client_ca`), the client certificate must also be valid for this
    /// name: a DNS name or IP address among its subject alternative names.
    pub client_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}; check --tls-cert, --tls-key and --tls-client-ca")]
    Read { path: String, source: io::Error },
    #[error("{path} holds no PEM {what}; pass a PEM file with a `-----BEGIN {what}` block")]
    Empty { path: String, what: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The CA certificates in a PEM file; an error names the file.
fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let invalid = |message: String| TlsError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pem) {
        let ca = ca.map_err(|e| invalid(e.to_string()))?;
        roots.add(ca).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "CERTIFICATE",
        });
    }
    Ok(roots)
}

/// A TLS client's settings: servers must present a certificate from the CAs in `ca`, or
/// from the system's roots when `ca` is `None`; `alpn` names the protocol spoken inside
/// (`h2`, `http/1.1`); `identity` is the client's own certificate, for servers that ask for
/// one (mTLS). For meshlimit's own calls out: the OTLP exporter's, the xDS client's.
pub fn client_config(
    ca: Option<&Path>,
    alpn: &[u8],
    identity: Option<&ClientIdentity>,
) -> Result<Arc<ClientConfig>, String> {
    // Not `read`: its message names the gRPC port's flags.
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))
    };
    let roots = match ca {
        Some(path) => roots_from_pem(path, &read(path)?).map_err(|error| error.to_string())?,
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no CA certificates found on this system; name the server's CA file".to_owned(),
                );
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let files = TlsFiles {
                cert: identity.cert.clone(),
                key: identity.key.clone(),
                client_ca: None,
                client_name: None,
            };
            let certified = certified_key(&files, &read(&files.cert)?, &read(&files.key)?)
                .map_err(|error| error.to_string())?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified,
            )))
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The PEM certificate chain and key a TLS client presents when the server asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Connects a tonic channel over meshlimit's own TLS: TCP, then TLS with `tls`'s settings
/// (see `grpc_channel`).
#[derive(Clone)]
pub struct TlsConnect {
    pub tls: tokio_rustls::TlsConnector,
    /// The name the server's certificate must hold, when not the address's host.
    pub server_name: Option<String>,
}

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.server_name.clone());
        Box::pin(async move {
            let stream = connect(&tls, &uri, name.as_deref()).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A lazily connected gRPC channel to `url`, with `tune` applied to its endpoint (timeouts,
/// keep-alive): in the clear for http://, over `tls` for https://. tonic refuses to dial an
/// https:// address without its own TLS built in, so the channel dials it as http://
/// through `TlsConnect`, while its requests name the https:// origin (`:scheme https`), as
/// a strict gRPC server expects on a TLS connection. The error says what is wrong with
/// `url`.
pub fn grpc_channel(
    url: &str,
    tls: Option<TlsConnect>,
    tune: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::Endpoint;
    let endpoint = match &tls {
        Some(_) => {
            let origin: http::Uri = url.parse().map_err(|error| format!("{url}: {error}"))?;
            Endpoint::from_shared(url.replacen("https://", "http://", 1))
                .map_err(|error| format!("{url}: {error}"))?
                .origin(origin)
        }
        None => Endpoint::from_shared(url.to_owned()).map_err(|error| format!("{url}: {error}"))?,
    };
    let endpoint = tune(endpoint);
    Ok(match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(tls),
        None => endpoint.connect_lazy(),
    })
}

/// `headers` as gRPC metadata (names lower-cased), for meshlimit's own calls out; the
/// error is the name of the first header that cannot be sent.
pub fn grpc_metadata(headers: &[(String, String)]) -> Result<tonic::metadata::MetadataMap, String> {
    use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
    let mut metadata = MetadataMap::new();
    for (name, value) in headers {
        let key = MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| name.clone())?;
        let value = MetadataValue::try_from(value.as_str()).map_err(|_| name.clone())?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// TCP to `uri`'s host and port (443 when it names none), then TLS checking the
/// certificate is for `server_name`, or else that host.
pub async fn connect(
    tls: &tokio_rustls::TlsConnector,
    uri: &http::Uri,
    server_name: Option<&str>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host, port)).await?;
    let name = ServerName::try_from(server_name.unwrap_or(host).to_owned())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    tls.connect(name, tcp).await
}

fn certified_key(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let cert_path = files.cert.display().to_string();
    let key_path = files.key.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: cert_path,
            what: "CERTIFICATE",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::Empty {
        path: key_path.clone(),
        what: "PRIVATE KEY",
    })?;
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Invalid {
                path: key_path.clone(),
                message: e.to_string(),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified.keys_match().map_err(|e| TlsError::Invalid {
        path: key_path,
        message: format!("the key does not belong to the certificate ({e})"),
    })?;
    Ok(certified)
}

/// Hands rustls the current certificate; `reload_if_changed` swaps in a new one.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// The bytes last loaded, to notice changes.
    last: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let (cert, key) = (read(&files.cert)?, read(&files.key)?);
        let certified = certified_key(&files, &cert, &key)?;
        Ok(Self {
            files,
            current: ArcSwap::from_pointee(certified),
            last: Mutex::new((cert, key)),
        })
    }

    /// Loads the files again if their bytes changed; an invalid new pair is an error and
    /// leaves the old one in place.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert, key) = (read(&self.files.cert)?, read(&self.files.key)?);
        let mut last = self.last.lock();
        if last.0 == cert && last.1 == key {
            return Ok(false);
        }
        // Remember the bytes even when they fail, so one bad write is reported once.
        *last = (cert.clone(), key.clone());
        drop(last);
        let certified = certified_key(&self.files, &cert, &key)?;
        self.current.store(Arc::new(certified));
        Ok(true)
    }

    /// Checks the files every `interval` for as long as the returned task runs.
    pub fn watch(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let cert = self.clone();
                match tokio::task::spawn_blocking(move || cert.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(Ok(false)) | Err(_) => {}
                    Ok(Err(error)) => tracing::error!(
                        "TLS certificate not reloaded, the previous one keeps serving: {error}"
                    ),
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The rustls server config for the gRPC port: HTTP/2 only, client certificates required
/// when a client CA is given.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            path: "TLS".into(),
            message: e.to_string(),
        })?;
    let builder = match &cert.files.client_ca {
        Some(ca_path) => {
            let roots = roots_from_pem(ca_path, &read(ca_path)?)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Invalid {
                    path: ca_path.display().to_string(),
                    message: e.to_string(),
                })?;
            match &cert.files.client_name {
                Some(name) => builder.with_client_cert_verifier(Arc::new(ClientNameVerifier {
                    signed: verifier,
                    name: ServerName::try_from(name.clone()).map_err(|_| TlsError::Invalid {
                        path: "--tls-client-san".into(),
                        message: format!(
                            "`{name}` is neither a DNS name nor an IP address; write the name \
                             the clients' certificates hold, e.g. envoy.istio-system.svc"
                        ),
                    })?,
                })),
                None => builder.with_client_cert_verifier(verifier),
            }
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client certificate must be signed by the client CA (`signed`) and valid for `name`,
/// as envoyproxy/ratelimit's `GRPC_CLIENT_TLS_SAN` asks: when the CA also signs other
/// workloads' certificates, only the named client gets decisions.
#[derive(Debug)]
struct ClientNameVerifier {
    signed: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for ClientNameVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.signed.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .signed
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signed.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signed.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signed.supported_verify_schemes()
    }
}

/// Accepted TLS connections, for tonic's `serve_with_incoming`. Handshakes run on their own
/// tasks with a deadline, so a slow or silent client never holds up the accept loop; failed
/// handshakes (a client without a certificate under mTLS, say) are logged and dropped.
pub struct TlsIncoming {
    connections: mpsc::Receiver<io::Result<TlsStream<TcpStream>>>,
}

impl TlsIncoming {
    /// Accepts until `stop` resolves; then the listener is dropped at once, so new
    /// connections are refused as they are without TLS.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let (sender, connections) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                let accepted = tokio::select! {
                    () = &mut stop => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!("accepting a gRPC connection failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                if sender.is_closed() {
                    return;
                }
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Self { connections }
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    /// A CA and a `localhost` server certificate it signed, as PEM.
    fn server_pem() -> (String, String) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: None,
            client_name: None,
        }
    }

    fn served(cert: &ReloadingCert) -> Vec<u8> {
        cert.current.load().cert[0].to_vec()
    }

    #[test]
    fn a_rotated_certificate_is_served_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first_cert, first_key) = server_pem();
        std::fs::write(dir.path().join("tls.crt"), &first_cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), &first_key).unwrap();
        let cert = ReloadingCert::load(files(dir.path())).unwrap();
        let first = served(&cert);
        assert!(!cert.reload_if_changed().unwrap());

        let (second_cert, second_key) = server_pem();
        std::fs::write(dir.path().join("tls.crt"), &second_cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), &second_key).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        let second = served(&cert);
        assert_ne!(first, second);

        // A certificate written without its new key: refused, the second pair keeps serving.
        std::fs::write(dir.path().join("tls.crt"), &first_cert).unwrap();
        let error = cert.reload_if_changed().unwrap_err().to_string();
        assert!(
            error.contains("the key does not belong to the certificate"),
            "{error}"
        );
        assert_eq!(served(&cert), second);
    }

    #[test]
    fn missing_and_empty_files_say_which_flag_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let error = ReloadingCert::load(files(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.crt") && error.contains("--tls-cert"),
            "{error}"
        );
        std::fs::write(dir.path().join("tls.crt"), "not pem").unwrap();
        std::fs::write(dir.path().join("tls.key"), "not pem").unwrap();
        let error = ReloadingCert::load(files(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no PEM CERTIFICATE"), "{error}");
    }
}
