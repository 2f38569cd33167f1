//! TLS for both legs: per-listener server configs (strict ALPN, TLS 1.2/1.3, shared session cache
//! and certificate store), per-backend client configs, and the stream type that is either plain
//! or TLS.
//!
//! The STARTTLS rule lives with the callers: a front end may only hand a socket to
//! `accept` when it holds no unread plaintext (reliability cases 1 and 2).

pub mod acme;
pub mod certs;
pub mod client_cert;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::StoresServerSessions;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Backend, Protocol, TlsSettings};
use certs::CertStore;

/// The CA certificates in a PEM file; Err (the file and the reason) if there are none.
pub fn load_roots(path: &std::path::Path) -> Result<RootCertStore, String> {
    load_roots_checked(path, |_| Ok(()))
}

/// Where distributions keep the system's CA bundle, the usual first: Debian and Ubuntu; Fedora,
/// RHEL and its rebuilds (two places); openSUSE; Alpine.
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's CA certificates: the file `SSL_CERT_FILE` names (OpenSSL's variable), and only
/// it where it is set (as OpenSSL: an operator narrowing trust to a private CA must not get the
/// public bundle behind it), else the first of the distributions' bundles that holds any.
/// Empty if none does: the caller says which setting to give instead (`no_system_roots`).
pub fn system_roots() -> RootCertStore {
    match std::env::var_os("SSL_CERT_FILE") {
        Some(named) => first_roots([std::path::Path::new(&named)]),
        None => first_roots(SYSTEM_BUNDLES.iter().map(std::path::Path::new)),
    }
}

/// The certificates of the first file in `paths` that holds any (unreadable, missing or empty
/// files are passed over).
fn first_roots<'a>(paths: impl IntoIterator<Item = &'a std::path::Path>) -> RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    for path in paths {
        let mut roots = RootCertStore::empty();
        if let Ok(iter) = CertificateDer::pem_file_iter(path) {
            for cert in iter.flatten() {
                let _ = roots.add(cert);
            }
        }
        if !roots.is_empty() {
            return roots;
        }
    }
    RootCertStore::empty()
}

/// What to say when `system_roots` found none: where it looked.
pub fn no_system_roots() -> String {
    match std::env::var_os("SSL_CERT_FILE") {
        Some(named) => format!("no CA certificates in {} (SSL_CERT_FILE)", std::path::Path::new(&named).display()),
        None => {
            format!("the system's CA certificates are missing (package ca-certificates: {})", SYSTEM_BUNDLES.join(", "))
        }
    }
}

/// `load_roots`, with each certificate passed through `check` first.
pub fn load_roots_checked(
    path: &std::path::Path,
    mut check: impl FnMut(&rustls::pki_types::CertificateDer<'_>) -> Result<(), String>,
) -> Result<RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        check(&cert).map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificates in the file", path.display()));
    }
    Ok(roots)
}

/// A client connection's TLS facts, named as nginx passes them to `auth_http` (`Auth-SSL-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    pub cipher: String,
    /// Set on listeners that ask for client certificates.
    pub client_cert: Option<client_cert::ClientCertFacts>,
}

/// Install the process-wide crypto provider (aws-lc-rs). Safe to call more than once.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// State shared by every server config, so resumption survives config reloads. (Listeners that
/// ask for client certificates keep their own sessions, made afresh at each reload: their CA or
/// CRL may have changed with it.)
#[derive(Clone)]
pub struct TlsShared {
    pub certs: Arc<CertStore>,
    pub sessions: Arc<dyn StoresServerSessions>,
}

impl TlsShared {
    pub fn new(certs: Arc<CertStore>) -> TlsShared {
        TlsShared { certs, sessions: Arc::new(SessionCache::new(SESSION_CACHE_SIZE)) }
    }

    /// A server config for one protocol: only TLS 1.2/1.3 (the provider's defaults), ALPN limited
    /// to the protocol's own identifier (a client offering only others gets
    /// `no_application_protocol`; a client offering none is accepted).
    /// The cipher suite is the first of `tls.cipher_suites` the client offers (server order), and
    /// `tls.session_tickets` TLS 1.3 session tickets follow each handshake. Err (rustls' reason)
    /// only if rustls refuses the suites, which config validation rules out (it keeps a TLS 1.3
    /// suite); never a silent fallback to suites the operator did not list.
    /// With `client`, the handshake asks for a client certificate (judged after it by
    /// `ClientAuth::check`).
    pub fn server_config(
        &self,
        protocol: Protocol,
        settings: &TlsSettings,
        client: Option<&client_cert::ClientAuth>,
    ) -> Result<Arc<ServerConfig>, String> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = cipher_suites(&settings.cipher_suites);
        let builder = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let builder = match client {
            Some(c) => builder.with_client_cert_verifier(c.verifier()),
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_cert_resolver(self.certs.clone());
        cfg.ignore_client_order = true;
        cfg.alpn_protocols = vec![protocol.alpn().to_vec()];
        cfg.session_storage = match (settings.session_tickets, client) {
            // No resumption at all: TLS 1.2 session IDs are stored here too, not only tickets.
            (0, _) => Arc::new(rustls::server::NoServerSessionStorage {}),
            // A listener that asks for client certificates keeps its own sessions. rustls
            // resumes on suite and name alone, so a session from a listener without client
            // auth (same SNI, another port) would resume here with no certificate: a client
            // that holds one would be refused, or on an optional listener lose EXTERNAL.
            (_, Some(_)) => Arc::new(SessionCache::new(SESSION_CACHE_SIZE)),
            (_, None) => self.sessions.clone(),
        };
        cfg.send_tls13_tickets = settings.session_tickets;
        // The greeting, queued before the handshake, leaves with the server's Finished.
        cfg.send_half_rtt_data = true;
        Ok(Arc::new(cfg))
    }
}

/// The provider's suites named in `names`, in that order (names are validated with the config).
fn cipher_suites(names: &[String]) -> Vec<rustls::SupportedCipherSuite> {
    let all = rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES;
    names.iter().filter_map(|n| all.iter().find(|s| s.suite().as_str() == Some(n.as_str())).copied()).collect()
}

/// Sessions kept for resumption (TLS 1.2 session IDs and TLS 1.3 tickets), about 4,096 at once.
const SESSION_CACHE_SIZE: usize = 4096;
/// The most one stored session may take. A session is a few hundred bytes, plus the client's
/// certificate chain on listeners that ask for one (a few KiB); rustls stores it before the
/// proxy has checked that chain, so without a cap anyone could park 64 KiB handshake messages
/// here, 4,096 times (reliability: bounded memory). A larger one is not stored: that client's
/// next connection is a full handshake.
const MAX_SESSION_BYTES: usize = 8 * 1024;

/// The server's session store: two generations of hash maps, so storing, finding and taking a
/// session are O(1). (rustls' `ServerSessionMemoryCache` finds the entry to remove with a linear
/// scan of its insertion order, and every TLS 1.3 resumption takes one: about 3% of a login's
/// CPU at 4,096 entries.) When the newer generation is full the older one is dropped whole, so
/// between half and all of `capacity` of the most recent sessions are kept.
#[derive(Debug)]
pub struct SessionCache {
    generations: std::sync::Mutex<[std::collections::HashMap<Vec<u8>, Vec<u8>>; 2]>,
    per_generation: usize,
}

impl SessionCache {
    pub fn new(capacity: usize) -> SessionCache {
        SessionCache { generations: Default::default(), per_generation: (capacity / 2).max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [std::collections::HashMap<Vec<u8>, Vec<u8>>; 2]> {
        // A panic elsewhere while holding the lock leaves the maps consistent: keep using them.
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        if key.len() + value.len() > MAX_SESSION_BYTES {
            return false;
        }
        let mut g = self.lock();
        let [newer, older] = &mut *g;
        if newer.len() >= self.per_generation && !newer.contains_key(&key) {
            *older = std::mem::take(newer);
        }
        newer.insert(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let g = self.lock();
        g[0].get(key).or_else(|| g[1].get(key)).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut g = self.lock();
        let [newer, older] = &mut *g;
        newer.remove(key).or_else(|| older.remove(key))
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A client config for one backend: the system roots (`system`, asked only if needed) or the
/// backend's CA file; verification can only be turned off explicitly per backend.
pub fn client_config(backend: &Backend, system: &dyn Fn() -> RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let cfg = if !backend.tls_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify::new())).with_no_client_auth()
    } else {
        let roots = match &backend.tls_ca_file {
            Some(path) => load_roots(path)?,
            None => system(),
        };
        if roots.is_empty() {
            return Err(format!(
                "no CA certificates to verify the backend with: {}; set tls_ca_file",
                no_system_roots()
            ));
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

#[cfg(test)]
mod session_cache_tests {
    use super::*;

    fn key(i: usize) -> Vec<u8> {
        i.to_be_bytes().to_vec()
    }

    #[test]
    fn stores_finds_and_takes_once() {
        let c = SessionCache::new(8);
        assert!(c.put(key(1), b"one".to_vec()));
        assert_eq!(c.get(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)), None, "a TLS 1.3 ticket is single use");
        assert_eq!(c.get(&key(2)), None);
    }

    #[test]
    fn keeps_between_half_and_all_of_capacity_most_recent_first() {
        let c = SessionCache::new(8);
        for i in 0..100 {
            c.put(key(i), vec![i as u8]);
        }
        let kept: Vec<usize> = (0..100).filter(|i| c.get(&key(*i)).is_some()).collect();
        assert!(kept.len() >= 4 && kept.len() <= 8, "kept {kept:?}");
        assert_eq!(kept, ((100 - kept.len())..100).collect::<Vec<_>>(), "the most recent ones");
        // A session from the older generation can still be taken.
        let oldest = kept[0];
        assert_eq!(c.take(&key(oldest)), Some(vec![oldest as u8]));
    }

    /// A session too large to keep (a client's padded certificate chain) is not stored, so the
    /// cache holds at most capacity × 8 KiB whatever clients send.
    #[test]
    fn an_oversized_session_is_not_stored() {
        let c = SessionCache::new(8);
        assert!(!c.put(key(1), vec![0; 60 * 1024]));
        assert_eq!(c.get(&key(1)), None);
        assert!(c.put(key(2), vec![0; 4 * 1024]), "a session with a client's certificate chain fits");
        assert!(c.get(&key(2)).is_some());
    }

    #[test]
    fn replacing_a_key_does_not_rotate() {
        let c = SessionCache::new(4);
        c.put(key(1), vec![1]);
        c.put(key(2), vec![2]);
        c.put(key(2), vec![22]);
        assert_eq!(c.get(&key(1)), Some(vec![1]));
        assert_eq!(c.get(&key(2)), Some(vec![22]));
    }
}

#[cfg(test)]
mod cipher_suite_tests {
    use super::*;
    use crate::config::DEFAULT_CIPHER_SUITES;

    /// Every name the configuration accepts is a suite of the crypto provider, in the order given
    /// (a renamed or dropped suite would otherwise vanish from the server config silently).
    #[test]
    fn every_accepted_name_maps_to_a_provider_suite_in_order() {
        let names: Vec<String> = DEFAULT_CIPHER_SUITES.iter().map(|s| s.to_string()).collect();
        let suites = cipher_suites(&names);
        let got: Vec<&str> = suites.iter().filter_map(|s| s.suite().as_str()).collect();
        assert_eq!(got, DEFAULT_CIPHER_SUITES);
        let reversed: Vec<String> = names.iter().rev().cloned().collect();
        assert_eq!(
            cipher_suites(&reversed)[0].suite(),
            rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        );
    }

    /// A suite list rustls refuses is an error, not a server config with other suites.
    #[test]
    fn suites_rustls_refuses_are_an_error_not_a_fallback() {
        let settings = TlsSettings {
            certificates: Vec::new(),
            self_signed_names: vec!["localhost".into()],
            session_tickets: 1,
            cipher_suites: Vec::new(),
            strict_sni: false,
        };
        let store = certs::CertStore::load(&settings).expect("self-signed store");
        let shared = TlsShared::new(Arc::new(store));
        assert!(shared.server_config(Protocol::Imap, &settings, None).is_err());
        let settings = TlsSettings { cipher_suites: vec!["TLS13_AES_128_GCM_SHA256".into()], ..settings };
        let cfg = shared.server_config(Protocol::Imap, &settings, None).expect("one TLS 1.3 suite");
        assert_eq!(cfg.crypto_provider().cipher_suites.len(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bundle that holds certificates is the one taken: a distribution's missing or
    /// empty file is passed over, not taken for "trust nothing".
    #[test]
    fn the_first_bundle_with_certificates_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let cert = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params.self_signed(&key).unwrap().pem()
        };
        let one = dir.path().join("one.pem");
        std::fs::write(&one, cert("one.example")).unwrap();
        let two = dir.path().join("two.pem");
        std::fs::write(&two, cert("two.example") + &cert("three.example")).unwrap();
        let found = first_roots([missing.as_path(), empty.as_path(), two.as_path(), one.as_path()]);
        assert_eq!(found.len(), 2);
        assert!(first_roots([missing.as_path(), empty.as_path()]).is_empty());
    }
}
