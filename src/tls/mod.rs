//! TLS for both legs: per-listener server configs (strict ALPN, TLS 1.2/1.3, shared session cache
//! and certificate store), per-backend client configs, and the stream type that is either plain
//! or TLS.
//!
//! The STARTTLS rule lives with the callers: a front end may only hand a socket to
//! `accept` when it holds no unread plaintext (reliability cases 1 and 2).

pub mod acme;
pub mod certs;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::StoresServerSessions;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Backend, Protocol};
use certs::CertStore;

/// Install the process-wide crypto provider (aws-lc-rs). Safe to call more than once.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// State shared by every server config, so resumption survives config reloads.
#[derive(Clone)]
pub struct TlsShared {
    pub certs: Arc<CertStore>,
    pub sessions: Arc<dyn StoresServerSessions>,
}

impl TlsShared {
    pub fn new(certs: Arc<CertStore>) -> TlsShared {
        TlsShared { certs, sessions: rustls::server::ServerSessionMemoryCache::new(4096) }
    }

    /// A server config for one protocol: only TLS 1.2/1.3 (the provider's defaults), ALPN limited
    /// to the protocol's own identifier (a client offering only others gets
    /// `no_application_protocol`; a client offering none is accepted).
    pub fn server_config(&self, protocol: Protocol) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .with_no_client_auth()
            .with_cert_resolver(self.certs.clone());
        cfg.alpn_protocols = vec![protocol.alpn().to_vec()];
        cfg.session_storage = self.sessions.clone();
        Arc::new(cfg)
    }
}

/// A client config for one backend: system roots or the backend's CA file; verification can
/// only be turned off explicitly per backend.
pub fn client_config(backend: &Backend) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let builder = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let cfg = if !backend.tls_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify::new())).with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &backend.tls_ca_file {
            Some(path) => {
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))? {
                    let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => {
                let system = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
                if let Ok(iter) = CertificateDer::pem_file_iter(system) {
                    for cert in iter.flatten() {
                        let _ = roots.add(cert);
                    }
                }
            }
        }
        if roots.is_empty() {
            return Err("no CA certificates to verify the backend with".into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Accepts any backend certificate: only for backends configured with `tls_verify = false`.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    fn new() -> NoVerify {
        NoVerify(
            rustls::crypto::CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())),
        )
    }
}

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP stream with or without TLS. `T` is the TLS stream type of the side (server or client).
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
pub type BackendStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
