//! TLS on the client leg: SNI selection (exact, wildcard, default), RSA and ECDSA, strict ALPN,
//! TLS 1.2, the server's cipher suite order, STARTTLS (capabilities before/after, injection),
//! session resumption, the greeting sent with the handshake, and certificate files changing on
//! disk.

mod common;

use portcullis::app::Reloaded;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Pki { ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// (cert PEM, key PEM, cert DER) for `names`, ECDSA P-256 or RSA.
    fn leaf(&self, names: &[&str], rsa: bool) -> (String, String, CertificateDer<'static>) {
        let key =
            if rsa { KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap() } else { KeyPair::generate().unwrap() };
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    fn client(&self, alpn: &[&[u8]], tls12_only: bool) -> TlsConnector {
        TlsConnector::from(self.client_config(alpn, tls12_only))
    }

    fn client_config(&self, alpn: &[&[u8]], tls12_only: bool) -> Arc<ClientConfig> {
        self.client_config_with_suites(alpn, tls12_only, rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES)
    }

    /// A client offering `suites` in that order.
    fn client_config_with_suites(
        &self,
        alpn: &[&[u8]],
        tls12_only: bool,
        suites: &[rustls::SupportedCipherSuite],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = suites.to_vec();
        let versions: &[&rustls::SupportedProtocolVersion] =
            if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
        let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

fn tls_config(backend: SocketAddr) -> String {
    format!(
        r#"
[limits]
auth_failure_delay = "10ms"

[[tls.certificate]]
cert = "mail.pem"
key = "mail.key"
names = ["mail.example.test"]
default = true

[[tls.certificate]]
cert = "wild.pem"
key = "wild.key"
names = ["*.example.org"]

[[tls.certificate]]
cert = "rsa.pem"
key = "rsa.key"
names = ["rsa.example.test"]

[[listener]]
name = "imaps"
bind = "127.0.0.1:0"
protocol = "imap"
tls = "implicit"

[[listener]]
name = "imap"
bind = "127.0.0.1:0"
protocol = "imap"
tls = "starttls"

[auth]
passwd_file = "users"

[[backend]]
name = "fake"
address = "{backend}"
health = {{ enabled = false }}

[routing.imap]
default = "fake"
"#
    )
}

struct Setup {
    pki: Pki,
    proxy: Proxy,
    _backend: FakeBackend,
    mail: CertificateDer<'static>,
    wild: CertificateDer<'static>,
    rsa: CertificateDer<'static>,
}

async fn setup() -> Setup {
    setup_with("").await
}

/// `tls_settings` goes into the `[tls]` table.
async fn setup_with(tls_settings: &str) -> Setup {
    setup_full(tls_settings, "").await
}

/// Like `setup_with`, with `extra` appended to the config (more listeners, say); the CA is in
/// `ca.pem` beside it.
async fn setup_full(tls_settings: &str, extra: &str) -> Setup {
    setup_backend(Behaviour::Normal, tls_settings, extra).await
}

/// Like `setup_full`, with a backend that behaves as `behaviour` says.
async fn setup_backend(behaviour: Behaviour, tls_settings: &str, extra: &str) -> Setup {
    portcullis::tls::init_crypto();
    let pki = Pki::new();
    let backend = FakeBackend::start(behaviour).await;
    let (mail_pem, mail_key, mail) = pki.leaf(&["mail.example.test"], false);
    let (wild_pem, wild_key, wild) = pki.leaf(&["*.example.org"], false);
    let (rsa_pem, rsa_key, rsa) = pki.leaf(&["rsa.example.test"], true);
    let ca_pem = pki.ca.pem();
    let files = [
        ("ca.pem", ca_pem.as_str()),
        ("mail.pem", mail_pem.as_str()),
        ("mail.key", mail_key.as_str()),
        ("wild.pem", wild_pem.as_str()),
        ("wild.key", wild_key.as_str()),
        ("rsa.pem", rsa_pem.as_str()),
        ("rsa.key", rsa_key.as_str()),
    ];
    let config = tls_config(backend.addr).replacen(
        "[[tls.certificate]]",
        &format!("[tls]\n{tls_settings}\n\n[[tls.certificate]]"),
        1,
    ) + extra;
    let proxy = Proxy::start_with_files(&config, USERS, &files).await;
    Setup { pki, proxy, _backend: backend, mail, wild, rsa }
}

async fn handshake(c: &TlsConnector, addr: SocketAddr, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    c.connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await
}

fn served(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// Reliability case 17 (an unknown name gets the default certificate).
#[tokio::test]
async fn sni_selects_exact_wildcard_rsa_and_default() {
    let s = setup().await;
    let c = s.pki.client(&[], false);
    let addr = s.proxy.addr("imaps");
    assert_eq!(served(&handshake(&c, addr, "mail.example.test").await.unwrap()), s.mail);
    assert_eq!(served(&handshake(&c, addr, "MAIL.example.TEST").await.unwrap()), s.mail);
    assert_eq!(served(&handshake(&c, addr, "imap.example.org").await.unwrap()), s.wild);
    assert_eq!(served(&handshake(&c, addr, "rsa.example.test").await.unwrap()), s.rsa);
    // An unknown name gets the default certificate (and so fails name verification).
    let err = handshake(&c, addr, "other.example.net").await.unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

/// Reliability case 17, strict mode: a name no certificate is for ends the handshake with an
/// alert from the proxy (rustls sends access_denied when no certificate resolves); known names
/// and clients that send no name are served as before.
#[tokio::test]
async fn strict_sni_refuses_unknown_names_but_serves_clients_without_sni() {
    let s = setup_with("strict_sni = true").await;
    let addr = s.proxy.addr("imaps");
    let c = s.pki.client(&[], false);
    assert_eq!(served(&handshake(&c, addr, "imap.example.org").await.unwrap()), s.wild);
    let err = handshake(&c, addr, "other.example.net").await.unwrap_err();
    assert!(err.to_string().contains("received fatal alert: AccessDenied"), "{err}");
    let mut no_sni = (*s.pki.client_config(&[], false)).clone();
    no_sni.enable_sni = false;
    let tls = handshake(&TlsConnector::from(Arc::new(no_sni)), addr, "mail.example.test").await.unwrap();
    assert_eq!(served(&tls), s.mail);
}

#[tokio::test]
async fn alpn_is_strict() {
    let s = setup().await;
    let addr = s.proxy.addr("imaps");
    // Reliability case 15: a client that offers only other protocols is refused.
    let err = handshake(&s.pki.client(&[b"http/1.1"], false), addr, "mail.example.test").await.unwrap_err();
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    // Case 16: the protocol's own id is selected; no ALPN at all is accepted.
    let tls = handshake(&s.pki.client(&[b"h2", b"imap"], false), addr, "mail.example.test").await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"imap"[..]));
    let mut c = Client::new(handshake(&s.pki.client(&[], false), addr, "mail.example.test").await.unwrap());
    assert!(c.line().await.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR ID LITERAL- AUTH=PLAIN AUTH=LOGIN]"));
}

#[tokio::test]
async fn tls12_clients_work_and_login_relays() {
    let s = setup().await;
    let tls = handshake(&s.pki.client(&[], true), s.proxy.addr("imaps"), "mail.example.test").await.unwrap();
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    let mut c = Client::new(tls);
    c.line().await;
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK [CAPABILITY IMAP4rev1 IDLE MOVE]"));
}

/// Reliability case 69 over TLS: a backend that fails mid-session (a reset here; a TLS backend
/// that closes without close_notify is the same read error) ends the client's TLS with
/// close_notify after what the backend sent, as an ordinary close does, not with a bare TCP
/// close that the client must take for a truncation.
#[tokio::test]
async fn a_failed_backend_ends_the_clients_tls_with_close_notify() {
    use tokio::io::AsyncReadExt;
    let s = setup_backend(Behaviour::ResetAfterLogin, "", "").await;
    let tls = handshake(&s.pki.client(&[], false), s.proxy.addr("imaps"), "mail.example.test").await.unwrap();
    let mut c = Client::new(tls);
    c.line().await;
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(c.until_tagged("a").await.last().unwrap().starts_with("a OK"));
    c.send(b"b NOOP\r\n").await;
    assert_eq!(c.line().await, "* BYE going away\r\n");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), c.stream.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(end.map_err(|e| e.kind()), Ok(0), "a clean TLS close (close_notify), nothing after the BYE");
}

/// Reliability case 20: a TLS 1.1 ClientHello gets one fatal alert and nothing else: no handshake,
/// no greeting. (rustls answers `handshake_failure` to this bare hello, `protocol_version` to
/// some others; either ends it.)
#[tokio::test]
async fn tls11_client_gets_a_fatal_alert_and_nothing_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[7u8; 32]); // random
    // No session id; AES128-SHA and ECDHE-ECDSA-AES128-GCM-SHA256; null compression.
    hello.extend_from_slice(&[0, 0, 4, 0x00, 0x2f, 0xc0, 0x2b, 1, 0]);
    let mut handshake = vec![1, 0, 0, hello.len() as u8];
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    let mut tcp = TcpStream::connect(s.proxy.addr("imaps")).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut got)).await.unwrap().unwrap();
    // One alert record, level fatal (2): handshake_failure (40) or protocol_version (70).
    assert_eq!(got.len(), 7, "{got:?}");
    assert_eq!((got[0], got[5]), (0x15, 2), "{got:?}");
    assert!(matches!(got[6], 40 | 70), "{got:?}");
}

/// Reliability case 9: the plaintext phase is compared byte for byte (no `[ALERT]`, nothing extra).
#[tokio::test]
async fn starttls_capabilities_and_upgrade() {
    let s = setup().await;
    let mut c = Client::connect(s.proxy.addr("imap")).await;
    let g = c.line().await;
    // Reliability case 6: STARTTLS and LOGINDISABLED before TLS, no AUTH=.
    assert_eq!(g, "* OK [CAPABILITY IMAP4rev1 SASL-IR ID LITERAL- STARTTLS LOGINDISABLED] IMAP proxy ready.\r\n");
    c.send(b"a LOGIN alice@example.test secret\r\n").await;
    assert!(c.line().await.starts_with("a NO [PRIVACYREQUIRED]"));
    c.send(b"b STARTTLS\r\n").await;
    assert_eq!(c.line().await, "b OK Begin TLS negotiation now.\r\n");
    let tcp = c.stream.into_inner();
    let tls =
        s.pki.client(&[b"imap"], false).connect(ServerName::try_from("mail.example.test").unwrap(), tcp).await.unwrap();
    let mut c = Client::new(tls);
    // Case 5: capabilities re-issued after TLS, without STARTTLS or LOGINDISABLED.
    c.send(b"c CAPABILITY\r\n").await;
    let caps = c.until_tagged("c").await;
    assert_eq!(caps[0], "* CAPABILITY IMAP4rev1 SASL-IR ID LITERAL- AUTH=PLAIN AUTH=LOGIN\r\n");
    // Case 3: no second STARTTLS.
    c.send(b"d STARTTLS\r\n").await;
    assert_eq!(c.line().await, "d BAD STARTTLS not available.\r\n");
    c.send(b"e LOGIN alice@example.test secret\r\n").await;
    assert!(c.until_tagged("e").await.last().unwrap().starts_with("e OK"));
}

/// Reliability case 54: `max_errors` is for the whole connection. Errors made before STARTTLS
/// still count after it, as in nginx; an upgrade does not buy another five.
#[tokio::test]
async fn protocol_errors_before_starttls_count_after_it() {
    let s = setup().await;
    let mut c = Client::connect(s.proxy.addr("imap")).await;
    c.line().await;
    for tag in ["a", "b", "c", "d"] {
        c.send(format!("{tag} FOO\r\n").as_bytes()).await;
        assert!(c.line().await.starts_with(&format!("{tag} BAD")));
    }
    c.send(b"e STARTTLS\r\n").await;
    assert_eq!(c.line().await, "e OK Begin TLS negotiation now.\r\n");
    let tcp = c.stream.into_inner();
    let tls =
        s.pki.client(&[b"imap"], false).connect(ServerName::try_from("mail.example.test").unwrap(), tcp).await.unwrap();
    let mut c = Client::new(tls);
    c.send(b"f FOO\r\n").await;
    assert!(c.line().await.starts_with("f BAD"));
    assert_eq!(c.line().await, "* BYE Too many invalid IMAP commands.\r\n");
    assert!(c.closed().await);
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_never_executed() {
    let s = setup().await;
    // Reliability case 1: STARTTLS and a command in one segment.
    let mut c = Client::connect(s.proxy.addr("imap")).await;
    c.line().await;
    c.send(b"a STARTTLS\r\nb LOGIN alice@example.test secret\r\n").await;
    assert_eq!(c.line().await, "* BYE Pipelined data after STARTTLS refused.\r\n");
    assert!(c.closed().await);
    // Case 2: the injected command in a second segment, before the ClientHello: the handshake
    // sees plaintext and fails; nothing is executed.
    let mut c = Client::connect(s.proxy.addr("imap")).await;
    c.line().await;
    c.send(b"a STARTTLS\r\n").await;
    assert_eq!(c.line().await, "a OK Begin TLS negotiation now.\r\n");
    c.send(b"b LOGIN alice@example.test secret\r\n").await;
    assert!(c.closed().await);
    assert_eq!(s._backend.connections(), 0);
}

#[tokio::test]
async fn certificate_files_changing_on_disk_are_reloaded_and_broken_ones_ignored() {
    let s = setup().await;
    let c = s.pki.client(&[], false);
    let addr = s.proxy.addr("imaps");
    // Reliability case 78: a rotated certificate is served to new handshakes.
    let (pem, key, new_mail) = s.pki.leaf(&["mail.example.test"], false);
    write_file(&s.proxy.path("mail.key"), &key);
    write_file(&s.proxy.path("mail.pem"), &pem);
    assert_eq!(s.proxy.app.reload(false).await.unwrap(), Reloaded::Applied);
    assert_eq!(served(&handshake(&c, addr, "mail.example.test").await.unwrap()), new_mail);
    // A key that does not match its certificate keeps the previous pair, and the reload says
    // it was not all applied (so the reload-failed alert sees it), again at the next event.
    let (_, other_key, _) = s.pki.leaf(&["mail.example.test"], false);
    write_file(&s.proxy.path("mail.key"), &other_key);
    let reloaded = s.proxy.app.reload(false).await.unwrap();
    assert!(matches!(&reloaded, Reloaded::CertificatesKept(e) if e.contains("mail.key")), "{reloaded:?}");
    assert_eq!(served(&handshake(&c, addr, "mail.example.test").await.unwrap()), new_mail);
    write_file(&s.proxy.path("mail.pem"), "garbage");
    assert!(matches!(s.proxy.app.reload(false).await.unwrap(), Reloaded::CertificatesKept(_)));
    assert!(matches!(s.proxy.app.reload(false).await.unwrap(), Reloaded::CertificatesKept(_)));
    assert_eq!(served(&handshake(&c, addr, "mail.example.test").await.unwrap()), new_mail);
    // Fixed: a success again.
    write_file(&s.proxy.path("mail.key"), &key);
    write_file(&s.proxy.path("mail.pem"), &pem);
    assert_eq!(s.proxy.app.reload(false).await.unwrap(), Reloaded::Applied);
}

/// A name added to a certificate's list that its file does not cover is refused at reload, as
/// `check` refuses it: the previous certificate of the file is not served under the new name
/// either, where another certificate (here a wildcard) covers it.
#[tokio::test]
async fn a_name_added_that_the_file_does_not_cover_is_refused_at_reload() {
    let s = setup().await;
    let c = s.pki.client(&[], false);
    let addr = s.proxy.addr("imaps");
    assert_eq!(served(&handshake(&c, addr, "imap.example.org").await.unwrap()), s.wild);
    let config = std::fs::read_to_string(s.proxy.config_path()).unwrap();
    let widened =
        config.replacen("names = [\"mail.example.test\"]", "names = [\"mail.example.test\", \"imap.example.org\"]", 1);
    assert_ne!(config, widened);
    write_file(&s.proxy.config_path(), &widened);
    let refused = s.proxy.app.reload(false).await;
    assert!(refused.as_ref().is_err_and(|e| format!("{e:#}").contains("does not cover")), "{refused:?}");
    assert_eq!(served(&handshake(&c, addr, "imap.example.org").await.unwrap()), s.wild);
    assert_eq!(served(&handshake(&c, addr, "mail.example.test").await.unwrap()), s.mail);
}

#[tokio::test]
async fn certificate_change_is_noticed_without_a_signal() {
    let s = setup().await;
    portcullis::config::watch::spawn(s.proxy.app.clone(), hangup());
    let c = s.pki.client(&[], false);
    let addr = s.proxy.addr("imaps");
    let (pem, key, new_wild) = s.pki.leaf(&["*.example.org"], false);
    write_file(&s.proxy.path("wild.key"), &key);
    write_file(&s.proxy.path("wild.pem"), &pem);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if served(&handshake(&c, addr, "x.example.org").await.unwrap()) == new_wild {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new certificate not picked up");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A full session's start: greeting and one command answered. The greeting comes with the
/// handshake and the TLS 1.3 ticket after the client's Finished, so by the time a command is
/// answered the client holds the ticket if the server sent one.
async fn first_session(c: &TlsConnector, addr: SocketAddr) -> Client<TlsStream<TcpStream>> {
    let mut first = Client::new(handshake(c, addr, "mail.example.test").await.unwrap());
    first.line().await;
    first.send(b"a NOOP\r\n").await;
    assert!(first.line().await.starts_with("a OK"));
    first
}

#[tokio::test]
async fn sessions_resume() {
    let s = setup().await;
    let c = s.pki.client(&[], false);
    let addr = s.proxy.addr("imaps");
    let first = first_session(&c, addr).await;
    assert_eq!(first.stream.get_ref().get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    let again = handshake(&c, addr, "mail.example.test").await.unwrap();
    assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
}

#[tokio::test]
async fn session_tickets_zero_turns_resumption_off() {
    let s = setup_with("session_tickets = 0").await;
    // TLS 1.3 tickets, and TLS 1.2 session IDs too.
    for tls12_only in [false, true] {
        let c = s.pki.client(&[], tls12_only);
        let addr = s.proxy.addr("imaps");
        let _first = first_session(&c, addr).await;
        let again = handshake(&c, addr, "mail.example.test").await.unwrap();
        assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full), "TLS 1.2 only: {tls12_only}");
    }
}

#[tokio::test]
async fn a_session_does_not_resume_on_a_listener_with_another_client_certificate_policy() {
    // Same name, another port that asks for client certificates: resuming there would carry no
    // certificate (a client holding one would be refused, or lose EXTERNAL).
    let extra = "\n[[listener]]\nname = \"imaps-cert\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"implicit\"\nverify_client = \"optional\"\nclient_ca_file = \"ca.pem\"\n";
    let s = setup_full("", extra).await;
    for tls12_only in [false, true] {
        let c = s.pki.client(&[], tls12_only);
        let _first = first_session(&c, s.proxy.addr("imaps")).await;
        let there = handshake(&c, s.proxy.addr("imaps-cert"), "mail.example.test").await.unwrap();
        assert_eq!(there.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full), "TLS 1.2 only: {tls12_only}");
    }
}

/// A client's CA replaced by a reload applies to a STARTTLS on a connection accepted before it:
/// a certificate of the CA taken out is refused.
#[tokio::test]
async fn starttls_after_a_reload_is_judged_by_the_client_cas_now_installed() {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let extra = "\n[[listener]]\nname = \"imap-cert\"\nbind = \"127.0.0.1:0\"\nprotocol = \"imap\"\ntls = \"starttls\"\nverify_client = \"on\"\nclient_ca_file = \"ca.pem\"\n";
    let s = setup_full("", extra).await;
    let (_, key, der) = s.pki.leaf(&["client.example.test"], false);
    let mut roots = RootCertStore::empty();
    roots.add(s.pki.ca.der().clone()).unwrap();
    let client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![der], PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    let upgrade = |mut c: Client<TcpStream>, client: Arc<ClientConfig>| async move {
        c.line().await;
        c.send(b"a STARTTLS\r\n").await;
        assert_eq!(c.line().await, "a OK Begin TLS negotiation now.\r\n");
        let tcp = c.stream.into_inner();
        let tls = TlsConnector::from(client).connect(ServerName::try_from("mail.example.test").unwrap(), tcp).await;
        let mut c = Client::new(tls.unwrap());
        c.send(b"b NOOP\r\n").await;
        c.line().await
    };
    let client = Arc::new(client);
    // Accepted under the CA that issued the client's certificate.
    let before = Client::connect(s.proxy.addr("imap-cert")).await;
    assert_eq!(upgrade(before, client.clone()).await, "b OK NOOP completed.\r\n");
    // Connected now, upgraded after the CA file names another CA only.
    let waiting = Client::connect(s.proxy.addr("imap-cert")).await;
    write_file(&s.proxy.path("ca.pem"), &Pki::new().ca.pem());
    assert!(s.proxy.app.reload(false).await.is_ok());
    assert_eq!(upgrade(waiting, client).await, "* BYE SSL certificate error\r\n");
}

fn suite(s: &TlsStream<TcpStream>) -> rustls::CipherSuite {
    s.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

/// A client offering only `suites`.
fn client_with_suites(pki: &Pki, suites: &[rustls::SupportedCipherSuite]) -> TlsConnector {
    TlsConnector::from(pki.client_config_with_suites(&[], false, suites))
}

/// The server's order decides: AES-128-GCM (SHA-256 key schedule) although rustls' client lists
/// AES-256-GCM first; a suite the client does not offer is never chosen.
#[tokio::test]
async fn server_chooses_the_cipher_suite() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let s = setup().await;
    let addr = s.proxy.addr("imaps");
    let tls = handshake(&s.pki.client(&[], false), addr, "mail.example.test").await.unwrap();
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let tls = handshake(&s.pki.client(&[], true), addr, "mail.example.test").await.unwrap();
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    let only_chacha = client_with_suites(&s.pki, &[cs::TLS13_CHACHA20_POLY1305_SHA256]);
    let tls = handshake(&only_chacha, addr, "mail.example.test").await.unwrap();
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
}

/// Reliability case 20 (cipher policy).
#[tokio::test]
async fn configured_cipher_suites_are_the_only_ones() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let s = setup_with(r#"cipher_suites = ["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_256_GCM_SHA384"]"#).await;
    let addr = s.proxy.addr("imaps");
    let tls = handshake(&s.pki.client(&[], false), addr, "mail.example.test").await.unwrap();
    assert_eq!(suite(&tls), rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    let only_aes128 = client_with_suites(&s.pki, &[cs::TLS13_AES_128_GCM_SHA256]);
    assert!(handshake(&only_aes128, addr, "mail.example.test").await.is_err());
    // No TLS 1.2 suite configured: a TLS 1.2-only client is refused.
    assert!(handshake(&s.pki.client(&[], true), addr, "mail.example.test").await.is_err());
}

/// The greeting leaves with the server's first TLS 1.3 flight (half-RTT data): a client that has
/// read that flight, and has not sent its own Finished yet, can already read the greeting.
#[tokio::test]
async fn greeting_comes_with_the_servers_first_flight() {
    let s = setup().await;
    let cfg = s.pki.client_config(&[], false);
    let addr = s.proxy.addr("imaps");
    let greeting = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let name = ServerName::try_from("mail.example.test").unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
        conn.write_tls(&mut tcp).unwrap(); // ClientHello; nothing is written after it
        let mut plain = Vec::new();
        while plain.is_empty() {
            match conn.read_tls(&mut tcp) {
                Ok(0) => panic!("closed before the greeting"),
                Ok(_) => {}
                Err(e) => panic!("no greeting before the client's Finished: {e}"),
            }
            conn.process_new_packets().unwrap();
            let mut buf = [0u8; 1024];
            match conn.reader().read(&mut buf) {
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        plain
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&greeting);
    assert!(text.starts_with("* OK [CAPABILITY "), "{text}");
}
