//! The validated runtime model: what the rest of the proxy trusts.
//!
//! `Config::load` turns a file into typed values (socket addresses, durations, enums, resolved
//! backend references, a parsed users file) or a `ConfigError` that names the file, line and
//! field. Nothing downstream re-checks strings. Relative paths are resolved against the directory
//! of the config file, so a config works wherever it is started from.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::file::{self, BindFile, FileConfig};
use crate::auth::passwd::UserDb;

/// Pre-auth idle timeout (nginx `timeout` default).
pub const DEFAULT_PREAUTH_IDLE: Duration = Duration::from_secs(60);
/// Total time from accept to a finished login (Dovecot's login timeout).
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(180);
/// Post-login idle timeout: RFC 9051 asks for at least 30 minutes so IDLE survives.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_TLS_HANDSHAKE: Duration = Duration::from_secs(10);
pub const DEFAULT_BACKEND_CONNECT: Duration = Duration::from_secs(10);
pub const DEFAULT_BACKEND_LOGIN: Duration = Duration::from_secs(30);
/// The largest `limits.max_line_length` taken (Dovecot's own default is 64 KiB).
pub const MAX_LINE_LENGTH_LIMIT: u32 = 1 << 20;
pub const DEFAULT_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(2);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// TCP keepalive on client and backend connections: first probe after this long without
/// traffic. Under the idle timeouts of the NAT gateways and cloud load balancers in front of
/// mail servers (Azure's 4 minutes, AWS NLB's 350 s), as Dovecot's IDLE notifications are.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(2 * 60);
/// Linux's ceiling for the first probe's wait (`TCP_KEEPIDLE`, `MAX_TCP_KEEPIDLE`).
pub const MAX_TCP_KEEPALIVE: Duration = Duration::from_secs(32_767);
/// Unanswered keepalive probes after which the kernel drops the connection.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// Longest pre-auth command, literals included (RFC 7162 §4 asks servers to accept 8192).
pub const DEFAULT_MAX_LINE: u32 = 8192;
/// Protocol errors before the connection is closed (nginx `max_errors`).
pub const DEFAULT_MAX_ERRORS: u32 = 5;
/// Failed logins on one connection before it is closed.
pub const DEFAULT_MAX_AUTH_ATTEMPTS: u32 = 3;

/// A configuration error with enough position to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": field `{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug)]
pub struct Config {
    /// The file this was loaded from.
    pub path: PathBuf,
    /// The proxy's own name (SMTP greeting and EHLO).
    pub hostname: String,
    /// Where the admin server listens, if enabled.
    pub admin: Option<SocketAddr>,
    pub acme: Option<AcmeSettings>,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub limits: Limits,
    pub throttle: ThrottleSettings,
    pub tls: TlsSettings,
    pub listeners: Vec<Arc<ListenerConfig>>,
    pub auth: AuthSource,
    pub backends: HashMap<String, Arc<Backend>>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub routing: Routing,
    /// The one rule for user names, used by auth, routing and logs alike.
    pub users: UserRule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub tls_handshake_timeout: Duration,
    pub preauth_idle_timeout: Duration,
    pub login_timeout: Duration,
    pub idle_timeout: Duration,
    pub backend_connect_timeout: Duration,
    pub backend_login_timeout: Duration,
    pub auth_failure_delay: Duration,
    pub shutdown_grace: Duration,
    pub smtp_greeting_delay: Duration,
    pub command_timeout: Duration,
    pub max_session_duration: Option<Duration>,
    /// TCP keepalive (None: off): see `tcp_keepalive()`.
    pub tcp_keepalive: Option<Duration>,
    /// When a backend ends more sessions a second than this spread's share of them (it failed),
    /// each further client is closed after a random delay up to this (0: always at once), so the
    /// clients of a failed backend reconnect spread out (Dovecot's
    /// `login_proxy_max_disconnect_delay`; see `SessionGuard::close_hold`).
    pub backend_disconnect_spread: Duration,
    pub max_connections: usize,
    pub max_connections_per_listener: usize,
    pub max_connections_per_ip: usize,
    pub max_sessions_per_user: usize,
    pub max_line_length: u32,
    pub max_errors: u32,
    pub max_auth_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE,
            preauth_idle_timeout: DEFAULT_PREAUTH_IDLE,
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
            idle_timeout: DEFAULT_IDLE,
            backend_connect_timeout: DEFAULT_BACKEND_CONNECT,
            backend_login_timeout: DEFAULT_BACKEND_LOGIN,
            auth_failure_delay: DEFAULT_AUTH_FAILURE_DELAY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            smtp_greeting_delay: Duration::ZERO,
            command_timeout: Duration::from_secs(30),
            max_session_duration: None,
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            backend_disconnect_spread: Duration::ZERO,
            max_connections: 0,
            max_connections_per_listener: 0,
            max_connections_per_ip: 100,
            max_sessions_per_user: 50,
            max_line_length: DEFAULT_MAX_LINE,
            max_errors: DEFAULT_MAX_ERRORS,
            max_auth_attempts: DEFAULT_MAX_AUTH_ATTEMPTS,
        }
    }
}

impl Limits {
    /// The keepalive set on client connections (through the listening sockets, whose accepted
    /// connections inherit it) and on sessions' backend connections: the first probe after
    /// `tcp_keepalive` without traffic, then one every 30 s (or `tcp_keepalive` if shorter),
    /// and the connection dropped after `TCP_KEEPALIVE_PROBES` unanswered. A client that
    /// vanished without a FIN (a phone out of coverage, a NAT that forgot the mapping) then
    /// frees its session and its backend connection within minutes, not at `idle_timeout`,
    /// and the probes keep middleboxes from forgetting quiet sessions.
    pub fn tcp_keepalive(&self) -> Option<Keepalive> {
        let time = self.tcp_keepalive?;
        let interval = time.min(Duration::from_secs(30));
        Some(Keepalive {
            probes: socket2::TcpKeepalive::new()
                .with_time(time)
                .with_interval(interval)
                .with_retries(TCP_KEEPALIVE_PROBES),
            give_up: time + interval * TCP_KEEPALIVE_PROBES,
        })
    }
}

/// TCP keepalive for one socket (`Limits::tcp_keepalive`).
#[derive(Debug, Clone)]
pub struct Keepalive {
    probes: socket2::TcpKeepalive,
    /// TCP_USER_TIMEOUT: as long as the probes take. Linux sends no probe while data it sent is
    /// unacknowledged, and a session with a vanished client has such data whenever the backend
    /// speaks (Dovecot's IDLE "still here" every 2 minutes): without it, retransmissions would
    /// hold the connection for about 15 minutes. Also applies to a peer that keeps its window
    /// shut this long.
    pub give_up: Duration,
}

impl Keepalive {
    pub fn apply(&self, s: &socket2::SockRef<'_>) -> std::io::Result<()> {
        s.set_tcp_keepalive(&self.probes)?;
        s.set_tcp_user_timeout(Some(self.give_up))
    }
}

/// Login throttling (see `limits.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSettings {
    pub enabled: bool,
    pub penalty_after: u32,
    pub penalty_base: Duration,
    pub penalty_max: Duration,
    pub block_after: u32,
    pub user_block_after: u32,
    pub cooldown: Duration,
    pub window: Duration,
    pub ipv6_prefix: u8,
    pub trusted: Vec<Cidr>,
    pub max_entries: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            enabled: true,
            penalty_after: 3,
            penalty_base: Duration::from_secs(2),
            penalty_max: Duration::from_secs(15),
            block_after: 20,
            user_block_after: 10,
            cooldown: Duration::from_secs(300),
            window: Duration::from_secs(900),
            ipv6_prefix: 64,
            trusted: Vec::new(),
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub certificates: Vec<CertSpec>,
    pub self_signed_names: Vec<String>,
    /// TLS 1.3 session tickets sent after a handshake; 0 disables resumption.
    pub session_tickets: usize,
    /// Cipher suites in the server's order of preference: the first one the client also offers
    /// is chosen, whatever the client's own order. Names as rustls and IANA spell them.
    pub cipher_suites: Vec<String>,
    /// A client that names (SNI) a host no certificate is for gets a failed handshake instead of
    /// the default certificate (ALPACA's countermeasure: a mail port never answers for a name it
    /// does not serve). Clients that send no name still get the default certificate.
    pub strict_sni: bool,
}

/// The server's order unless configured: AES-128-GCM first, because its TLS 1.3 key schedule runs
/// on SHA-256 (SHA-NI on current x86 and ARM cores), where AES-256-GCM's runs on SHA-384 (the
/// SHA-512 block function, several times slower): about a sixth of a full handshake's CPU on the
/// server (docs/performance.md). Then AES-256-GCM and ChaCha20-Poly1305; TLS 1.2 likewise, with
/// ECDHE only and AEAD only.
pub const DEFAULT_CIPHER_SUITES: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Tickets per handshake unless configured: one is enough for a client that reconnects, and each
/// costs a key derivation, a cache entry and a record on the wire.
pub const DEFAULT_SESSION_TICKETS: usize = 1;
/// More than this only fills the session cache.
pub const MAX_SESSION_TICKETS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Where `cert` and `key` are set: (field, line and column), for errors about the files.
    pub origin: [(String, Option<(usize, usize)>); 2],
    /// Lower-case names; a leading `*.` marks a wildcard.
    pub names: Vec<String>,
    pub default: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Imap,
    Pop3,
    Smtp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }

    /// The ALPN identifier a client may offer for this protocol (RFC 7301 registry).
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::Imap => b"imap",
            Protocol::Pop3 => b"pop3",
            Protocol::Smtp => b"smtp",
        }
    }

    fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS from the first byte (993).
    Implicit,
    /// Plaintext greeting, upgraded by STARTTLS (143).
    StartTls,
    /// No TLS at all: trusted test networks only.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub tls: TlsMode,
    /// Accept credentials without TLS. Off unless the operator says so.
    pub allow_plaintext_auth: bool,
    /// Peers that must send a PROXY header first; empty when the listener does not use it.
    pub trusted_proxies: Vec<Cidr>,
    /// Client certificates (nginx `ssl_verify_client` and friends).
    pub client_cert: ClientCertSettings,
}

/// A listener's client-certificate settings: nginx's `ssl_verify_client`,
/// `ssl_client_certificate`, `ssl_crl` and `ssl_verify_depth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertSettings {
    pub mode: VerifyClient,
    /// The CAs a certificate must chain to (`None` only with `VerifyClient::Off`, or
    /// `OptionalNoCa` without CAs).
    pub ca_file: Option<PathBuf>,
    /// Revocation lists, checked for every certificate in the chain up to the CAs.
    pub crl_file: Option<PathBuf>,
    /// How many intermediate CAs from the client may stand between its certificate and a CA
    /// from `ca_file`, as OpenSSL (1.1 and later) counts `ssl_verify_depth`: 0 is a certificate
    /// issued by one of those CAs itself, 1 (nginx's default) allows one intermediate.
    pub verify_depth: usize,
}

impl Default for ClientCertSettings {
    fn default() -> ClientCertSettings {
        ClientCertSettings {
            mode: VerifyClient::Off,
            ca_file: None,
            crl_file: None,
            verify_depth: DEFAULT_VERIFY_DEPTH,
        }
    }
}

/// nginx's `ssl_verify_depth` default.
pub const DEFAULT_VERIFY_DEPTH: usize = 1;
/// webpki builds paths of at most six intermediates.
const MAX_VERIFY_DEPTH: i64 = 6;

/// Whether a TLS listener asks for client certificates, named as nginx's `ssl_verify_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyClient {
    /// Not asked for.
    #[default]
    Off,
    /// Required, and it must chain to `client_ca_file`.
    On,
    /// Asked for; a client without one is served, one with a bad certificate is not.
    Optional,
    /// Asked for; any certificate that is in its validity period is accepted, whoever issued it,
    /// and the verdict goes to the auth service (`Auth-SSL-Verify`).
    OptionalNoCa,
}

/// An address range such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, p.parse().ok()?),
            None => {
                let a: std::net::IpAddr = s.parse().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if matches!(addr, std::net::IpAddr::V4(_)) { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        // `::ffff:192.0.2.10` (how a `[::]` listener shows IPv4 peers) is that IPv4 range:
        // `contains` compares mapped addresses as IPv4. A prefix that cuts into the mapping
        // prefix itself names no IPv4 range and is refused.
        if let std::net::IpAddr::V6(a) = addr
            && let Some(v4) = a.to_ipv4_mapped()
        {
            return (prefix >= 96).then(|| Cidr { addr: std::net::IpAddr::V4(v4), prefix: prefix - 96 });
        }
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        fn bits(ip: std::net::IpAddr) -> (u128, u32) {
            match ip {
                std::net::IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
                std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(v4) => (u128::from(u32::from(v4)), 32),
                    None => (u128::from(a), 128),
                },
            }
        }
        let (net, width) = bits(self.addr);
        let (ip, ip_width) = bits(ip);
        if width != ip_width {
            return false;
        }
        match width.checked_sub(u32::from(self.prefix)) {
            Some(shift) => shift >= width || (net >> shift) == (ip >> shift),
            None => false,
        }
    }
}

#[derive(Debug)]
pub enum AuthSource {
    /// Users and password hashes from a Dovecot-style passwd-file.
    PasswdFile { path: PathBuf, users: Arc<UserDb> },
    /// The routed backend verifies the credentials; its OK is the only proof.
    Backend,
    /// An nginx `auth_http`-compatible service decides and routes.
    Http(AuthHttpSettings),
}

#[derive(Clone, PartialEq, Eq)]
pub struct AuthHttpSettings {
    pub urls: Vec<String>,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub ca_file: Option<PathBuf>,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    /// `Auth-SSL-Cert` with the client certificate in PEM (nginx: auth_http_pass_client_cert).
    pub pass_client_cert: bool,
}

/// Header values are secrets as often as not (an API key, a bearer token).
impl fmt::Debug for AuthHttpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self.headers.iter().map(|(k, _)| format!("{k}: <redacted>")).collect();
        // Without query strings, where a token may be.
        let urls: Vec<&str> = self.urls.iter().map(|u| crate::auth::http::shown(u)).collect();
        f.debug_struct("AuthHttpSettings")
            .field("urls", &urls)
            .field("timeout", &self.timeout)
            .field("headers", &headers)
            .field("ca_file", &self.ca_file)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("pass_client_cert", &self.pass_client_cert)
            .finish()
    }
}

pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub directory: String,
    pub contact: Vec<String>,
    pub terms_agreed: bool,
    /// (key id, raw HMAC key); the key is redacted in Debug output and zeroed when dropped.
    pub eab: Option<(String, crate::auth::Password)>,
    pub ca_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub challenge: AcmeChallenge,
    pub retry_min: Duration,
    pub certificates: Vec<AcmeCertSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01Responder(SocketAddr),
    Http01Webroot(PathBuf),
    TlsAlpn01(SocketAddr),
    Dns01 { hook: PathBuf, propagation: Duration },
}

impl AcmeChallenge {
    /// The challenge's name as the config spells it.
    pub fn name(&self) -> &'static str {
        match self {
            AcmeChallenge::Http01Responder(_) | AcmeChallenge::Http01Webroot(_) => "http-01",
            AcmeChallenge::TlsAlpn01(_) => "tls-alpn-01",
            AcmeChallenge::Dns01 { .. } => "dns-01",
        }
    }

    /// The name the challenge's own responder counts its accept errors and refusals under, if
    /// the proxy answers the challenge on a port of its own.
    pub const HTTP01_RESPONDER: &'static str = "acme-http-01";
    pub const TLS_ALPN01_RESPONDER: &'static str = "acme-tls-alpn-01";

    /// The address the challenge's own responder listens on, if it has one.
    pub fn responder_addr(&self) -> Option<SocketAddr> {
        match self {
            AcmeChallenge::Http01Responder(a) | AcmeChallenge::TlsAlpn01(a) => Some(*a),
            AcmeChallenge::Http01Webroot(_) | AcmeChallenge::Dns01 { .. } => None,
        }
    }

    pub fn responder(&self) -> Option<&'static str> {
        match self {
            AcmeChallenge::Http01Responder(_) => Some(Self::HTTP01_RESPONDER),
            AcmeChallenge::TlsAlpn01(_) => Some(Self::TLS_ALPN01_RESPONDER),
            AcmeChallenge::Http01Webroot(_) | AcmeChallenge::Dns01 { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeCertSpec {
    /// Lower-case DNS names.
    pub names: Vec<String>,
    pub rsa: bool,
    /// What names the certificate's stored files, metrics and `renew NAME`: the first name, or
    /// for the RSA one of an ECDSA and RSA pair with the same first name, `NAME+rsa` (`+` is in
    /// no DNS name).
    pub label: String,
}

impl AcmeCertSpec {
    /// A certificate labelled by its first name.
    pub fn new(names: Vec<String>, rsa: bool) -> AcmeCertSpec {
        let label = names.first().cloned().unwrap_or_default();
        AcmeCertSpec { names, rsa, label }
    }
}

/// How user names are made canonical. Lower-casing the whole name by default is what Dovecot
/// does (`auth_username_format = %Lu`) and what most mail stores do: `Alice@` and `alice@` are
/// one user, so they share per-user limits and a backend (reliability case 43). A replayed login
/// still carries the name as the client typed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRule {
    pub lowercase: Lowercase,
    pub default_domain: Option<String>,
    pub strip_default_domain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowercase {
    Domain,
    All,
    None,
}

impl Default for UserRule {
    fn default() -> Self {
        UserRule { lowercase: Lowercase::All, default_domain: None, strip_default_domain: false }
    }
}

impl UserRule {
    /// The canonical form of a user name, or `None` for names never to be looked up: empty, too
    /// long, or holding control characters or spaces (reliability case 35), or starting with
    /// `[` (Postfix's XCLIENT reads `LOGIN=[UNAVAILABLE]` as no login at all).
    pub fn canonical(&self, raw: &str) -> Option<String> {
        if raw.is_empty()
            || raw.len() > crate::auth::MAX_USER_LEN
            || raw.starts_with('[')
            || raw.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return None;
        }
        let (local, domain) = match raw.rsplit_once('@') {
            Some((l, d)) if !l.is_empty() && !d.is_empty() => (l, Some(d)),
            Some(_) => return None,
            None => (raw, None),
        };
        let local = if self.lowercase == Lowercase::All { local.to_lowercase() } else { local.to_string() };
        let domain = match domain {
            Some(d) if self.lowercase == Lowercase::None => Some(d.to_string()),
            Some(d) => Some(canonical_domain(d)?),
            None => self.default_domain.clone(),
        };
        Some(match domain {
            Some(d)
                if self.strip_default_domain
                    && self.default_domain.as_deref().is_some_and(|dd| dd.eq_ignore_ascii_case(&d)) =>
            {
                local
            }
            Some(d) => format!("{local}@{d}"),
            None => local,
        })
    }
}

/// A domain in its one canonical form: lower case, and an internationalised name in its ASCII
/// (`xn--`) form (IDNA, UTS #46), whichever form it was typed in: `Bücher.example`,
/// `xn--bcher-kva.example` and a decomposed `bu\u{308}cher.example` are one domain
/// (reliability case 43). None for a name IDNA refuses, such as a broken `xn--` label.
pub fn canonical_domain(d: &str) -> Option<String> {
    let ace = |l: &str| l.len() >= 4 && l.as_bytes()[..4].eq_ignore_ascii_case(b"xn--");
    if d.is_ascii() && !d.split('.').any(ace) {
        return Some(d.to_ascii_lowercase());
    }
    idna::domain_to_ascii(d).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddress {
    /// IMAP `ID ("x-originating-ip" ...)`, read by Dovecot from `login_trusted_networks`. Set
    /// explicitly (config or auth service): a backend that does not announce ID fails the login.
    ImapId,
    /// IMAP's default: ID where the backend announces it; elsewhere (Courier, Exchange) the login
    /// goes ahead without, and a warning names the backend once.
    ImapIdIfAnnounced,
    /// POP3 `XCLIENT ADDR= PORT= SESSION= TTL=` (Dovecot) or SMTP `XCLIENT ADDR= PORT= NAME=
    /// HELO= PROTO=` (Postfix), honoured from trusted networks only.
    Xclient,
    /// POP3 to a backend an auth service named by address, without `Auth-Client-Address`:
    /// XCLIENT where the backend announces it; elsewhere (nginx never sends XCLIENT for POP3, so
    /// a backend moved over from behind it need not take it) the login goes ahead without, and
    /// a warning names the backend once.
    XclientIfAnnounced,
    /// A PROXY protocol v2 header before the first backend byte.
    ProxyV2,
    None,
}

impl ClientAddress {
    /// Whether `protocol` has this way of telling a backend the client's address.
    pub fn fits(self, protocol: Protocol) -> bool {
        match self {
            ClientAddress::ImapId | ClientAddress::ImapIdIfAnnounced => protocol == Protocol::Imap,
            ClientAddress::Xclient => protocol != Protocol::Imap,
            ClientAddress::XclientIfAnnounced => protocol == Protocol::Pop3,
            ClientAddress::ProxyV2 | ClientAddress::None => true,
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum BackendLogin {
    /// Send the client's own user name and password.
    Replay,
    /// `AUTHENTICATE PLAIN` with authzid = the user, authcid/password = the master user.
    Master { user: String, password: String },
    /// SMTP only: `XCLIENT LOGIN=user`; the backend trusts the proxy's verification.
    Xclient,
}

impl fmt::Debug for BackendLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendLogin::Replay => f.write_str("Replay"),
            BackendLogin::Xclient => f.write_str("Xclient"),
            BackendLogin::Master { user, .. } => write!(f, "Master {{ user: {user:?}, password: <redacted> }}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    /// Named by the auth service, not the config (metrics label `dynamic`).
    pub dynamic: bool,
    pub protocol: Protocol,
    /// Relative share of a pool's users.
    pub weight: f64,
    pub state: BackendState,
    /// Rendezvous key (shared by a host's backends of different protocols).
    pub host_key: String,
    /// Most concurrent sessions (0 = unlimited).
    pub max_sessions: u32,
    pub health: HealthSettings,
    /// `host:port` as written; resolved at connect time.
    pub address: String,
    pub host: String,
    pub transport: Transport,
    pub tls_server_name: String,
    pub tls_verify: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub client_address: ClientAddress,
    pub login: BackendLogin,
}

/// Ordered from least to most restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendState {
    Up,
    /// No new sessions; existing ones continue.
    Draining,
    /// Never used.
    Disabled,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub starttls: bool,
    /// Test login (user, password) for IMAP and POP3 checks.
    pub login: Option<(String, String)>,
}

impl fmt::Debug for HealthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthSettings")
            .field("enabled", &self.enabled)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("rise", &self.rise)
            .field("fall", &self.fall)
            .field("starttls", &self.starttls)
            .field("login", &self.login.as_ref().map(|(user, _)| (user, "<redacted>")))
            .finish()
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            enabled: true,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            rise: 2,
            fall: 3,
            starttls: true,
            login: None,
        }
    }
}

/// Backends sharing users by weighted rendezvous hashing.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub failover: bool,
}

/// What a routing rule points at.
#[derive(Debug, Clone)]
pub enum Target {
    Backend(Arc<Backend>),
    Pool(Arc<Pool>),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Backend(b) => &b.name,
            Target::Pool(p) => &p.name,
        }
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        match self {
            Target::Backend(b) => std::slice::from_ref(b),
            Target::Pool(p) => &p.backends,
        }
    }

    /// A lone backend has nowhere to fail over to.
    pub fn failover(&self) -> bool {
        match self {
            Target::Backend(_) => false,
            Target::Pool(p) => p.failover,
        }
    }

    pub fn serves(&self, protocol: Protocol) -> bool {
        self.backends().iter().any(|b| b.protocol == protocol)
    }
}

impl Backend {
    /// The backend's metrics label: its name, or `dynamic` for auth-service addresses (so the
    /// label set stays bounded).
    pub fn label(&self) -> &str {
        if self.dynamic { "dynamic" } else { &self.name }
    }

    /// A backend the auth service named by address: protocol defaults, verified TLS, no checks.
    pub fn adhoc(protocol: Protocol, host: &str, port: u16) -> Backend {
        let address = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Backend {
            name: address.clone(),
            dynamic: true,
            protocol,
            weight: 1.0,
            state: BackendState::Up,
            host_key: address.clone(),
            max_sessions: 0,
            health: HealthSettings { enabled: false, ..HealthSettings::default() },
            address,
            host: host.to_string(),
            transport: Transport::Plain,
            tls_server_name: host.to_string(),
            tls_verify: true,
            tls_ca_file: None,
            client_address: match protocol {
                Protocol::Imap => ClientAddress::ImapIdIfAnnounced,
                Protocol::Pop3 => ClientAddress::XclientIfAnnounced,
                // Its login is XCLIENT LOGIN=: nothing works without XCLIENT.
                Protocol::Smtp => ClientAddress::Xclient,
            },
            login: match protocol {
                Protocol::Smtp => BackendLogin::Xclient,
                Protocol::Imap | Protocol::Pop3 => BackendLogin::Replay,
            },
        }
    }
}

/// Where each protocol's users go: per-protocol rules first, then the shared ones.
#[derive(Debug, Default)]
pub struct Routing {
    pub shared: RouteTable,
    pub tables: HashMap<Protocol, RouteTable>,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    pub default: Option<Target>,
    /// Canonical domain (lower case, IDNs in their xn-- form) → target.
    pub domains: HashMap<String, Target>,
    /// `*.parent` rules keyed by the canonical parent domain.
    pub wildcards: HashMap<String, Target>,
    /// Canonical user → target.
    pub users: HashMap<String, Target>,
}

impl RouteTable {
    fn is_empty(&self) -> bool {
        self.default.is_none() && self.domains.is_empty() && self.wildcards.is_empty() && self.users.is_empty()
    }

    fn targets(&self) -> impl Iterator<Item = &Target> {
        self.default.iter().chain(self.domains.values()).chain(self.wildcards.values()).chain(self.users.values())
    }
}

impl Config {
    /// Read, parse and validate a configuration file (and the files it names).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            position: None,
            field: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate configuration text that was read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let v = Validator { path, text };
        let raw: FileConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(raw)
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerConfig>> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The listener for a connection accepted on `bound` by the accept loop of listener `name`:
    /// the one bound there, whatever its name (a reload that renamed it swaps the config before
    /// it stops the loop under the old name, which another listener, bound elsewhere, may now
    /// have); by name where the address matches none (a bind to port 0).
    pub fn listener_on(&self, name: &str, bound: Option<SocketAddr>) -> Option<&Arc<ListenerConfig>> {
        self.listeners.iter().find(|l| bound.is_some_and(|a| l.bind.contains(&a))).or_else(|| self.listener(name))
    }

    /// Every file whose change should trigger a reload.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        if let AuthSource::PasswdFile { path, .. } = &self.auth {
            files.push(path.clone());
        }
        if let AuthSource::Http(AuthHttpSettings { ca_file: Some(ca), .. }) = &self.auth {
            files.push(ca.clone());
        }
        // The ACME CA's: a replaced one restarts ACME with it (`App::apply_acme`).
        files.extend(self.acme.as_ref().and_then(|a| a.ca_file.clone()));
        for c in &self.tls.certificates {
            files.push(c.cert.clone());
            files.push(c.key.clone());
        }
        // CA files, so a replaced CA applies to new sessions without a SIGHUP.
        files.extend(self.listeners.iter().filter_map(|l| l.client_cert.ca_file.clone()));
        files.extend(self.listeners.iter().filter_map(|l| l.client_cert.crl_file.clone()));
        let mut backends: Vec<_> = self.backends.values().filter_map(|b| b.tls_ca_file.clone()).collect();
        backends.sort();
        files.extend(backends);
        files
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

/// Where `field` (named as errors name it: `backend[2].transport`) is set in the config file at
/// `path`, for errors found after parsing (building TLS contexts, say); as `Validator`'s
/// placing of errors the parser keeps no position for.
pub fn locate(path: &Path, field: &str) -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(path).ok()?;
    Validator { path, text: &text }.find_field(field)
}

/// An error about `key` of the `[[array]]` entry named `name` (`backend`, `listener`), found
/// after parsing: named as the parser names it (`backend[2].tls_ca_file`), at its line.
pub fn entry_error(path: &Path, array: &str, name: &str, key: &str, message: String) -> ConfigError {
    let index = std::fs::read_to_string(path).ok().and_then(|text| {
        let table: toml::Table = text.parse().ok()?;
        table.get(array)?.as_array()?.iter().position(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
    });
    let field = match index {
        Some(i) => format!("{array}[{i}].{key}"),
        None => format!("{array} {name:?} {key}"),
    };
    ConfigError { file: path.to_path_buf(), position: locate(path, &field), field, message }
}

/// A key or table in the file, named as errors name it (the third `[[backend]]` is
/// `backend[2]`, a `[backend.health]` under it `backend[2].health`, a dotted `health.fall = 0`
/// in it `backend[2].health.fall`), with where it starts and where its value ends. The
/// positions come from the toml crate's own spanned parse, so they hold for every shape TOML
/// allows (multi-line arrays and strings, inline tables, dotted and quoted keys).
struct KeyAt {
    name: String,
    /// The key's first byte, or for a table written as a `[header]` the header's.
    start: usize,
    /// One past the value's last byte.
    end: usize,
    /// A table opened by a `[header]` or `[[header]]` line.
    header: bool,
}

/// The key at the start of `t` (bare, dotted or quoted) when `=` follows it.
fn key_token(t: &str) -> Option<&str> {
    let end = match t.chars().next()? {
        q @ ('"' | '\'') => t[1..].find(q)? + 2,
        _ => t.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))).unwrap_or(t.len()),
    };
    t[end..].trim_start().strip_prefix('=')?;
    (end > 0).then_some(&t[..end])
}

/// Every key and table under `value`, depth first, named below `prefix`.
fn key_spans(text: &str, prefix: &str, value: &Spanned<toml::de::DeValue<'_>>, out: &mut Vec<KeyAt>) {
    use toml::de::DeValue;
    match value.get_ref() {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                let name =
                    if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
                let (key, val) = (k.span(), v.span());
                out.push(KeyAt {
                    name: name.clone(),
                    start: key.start.min(val.start),
                    end: key.end.max(val.end),
                    // A header's value starts at its `[`, before the key inside it.
                    header: val.start < key.start,
                });
                key_spans(text, &name, v, out);
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate().filter(|(_, v)| matches!(v.get_ref(), DeValue::Table(_))) {
                let name = format!("{prefix}[{i}]");
                // An element of an array of tables starts at its `[[` (inline: at its `{`).
                let header = text.get(v.span().start..).is_some_and(|t| t.starts_with('['));
                out.push(KeyAt { name: name.clone(), start: v.span().start, end: v.span().end, header });
                key_spans(text, &name, v, out);
            }
        }
        _ => {}
    }
}

impl Validator<'_> {
    fn position(&self, span: Range<usize>) -> (usize, usize) {
        let upto = &self.text[..span.start.min(self.text.len())];
        let line = upto.matches('\n').count() + 1;
        let col = upto.rfind('\n').map_or(upto.len(), |i| upto.len() - i - 1) + 1;
        (line, col)
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut message = e.message().trim().to_string();
        let position = e.span().map(|s| self.position(s));
        let field = if message.starts_with("invalid type") || message.starts_with("invalid value") {
            // serde quotes the *value* here (``invalid type: integer `20240611`, expected a
            // string``, or `string "..."`), which may be a password: keep only its kind, and name
            // the key it belongs to.
            if let Some(colon) = message.find(": ")
                && let Some(expected) = message.find(", expected")
                && expected > colon
            {
                let kind = message[colon + 2..expected].split([' ', '`', '"']).next().unwrap_or("").to_string();
                message.replace_range(colon + 2..expected, &kind);
            }
            e.span().and_then(|s| self.key_at(s.start)).unwrap_or_else(|| "-".into())
        } else if ["missing field", "unknown field", "duplicate field"].iter().any(|m| message.starts_with(m)) {
            // serde names the offending key in backticks.
            message.split('`').nth(1).map(str::to_string).unwrap_or_else(|| "-".into())
        } else {
            // A syntax error, a duplicate key, a value of no accepted shape: the key it is in,
            // if there is one (the backticks there quote a token, not a field).
            if message.contains("untagged enum BindFile") {
                message = "expected an \"IP:port\" string or a list of them".into();
            }
            e.span().and_then(|s| self.key_at(s.start)).unwrap_or_else(|| "-".into())
        };
        ConfigError { file: self.path.to_path_buf(), position, field, message }
    }

    fn err(&self, span: Option<Range<usize>>, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let field = field.into();
        let position = span.map(|s| self.position(s)).or_else(|| self.find_field(&field));
        ConfigError { file: self.path.to_path_buf(), position, field, message: message.into() }
    }

    /// Addresses that cannot all be listened on at once, which `bind` would only find at start
    /// (or at a reload): a wildcard beside a specific address on the same port (`0.0.0.0:993` and
    /// `127.0.0.1:993`; `[::]:993` alone is dual-stack and takes IPv4 too), whether listeners,
    /// the admin server or an ACME responder ask for them. (A backend that is one of the
    /// proxy's own listeners is left to the run-time loop guard, which also covers the backends
    /// an auth service names.)
    fn check_sockets(
        &self,
        raw: &FileConfig,
        listeners: &[Arc<ListenerConfig>],
        admin: Option<SocketAddr>,
        acme: Option<&AcmeSettings>,
    ) -> Result<(), ConfigError> {
        let mut binds: Vec<(SocketAddr, String, Option<Range<usize>>)> = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            let span = raw.listeners.get(i).map(|r| r.bind.span());
            binds.extend(l.bind.iter().map(|a| (*a, format!("listener[{i}].bind"), span.clone())));
        }
        if let Some(a) = admin {
            binds.push((a, "admin.bind".into(), raw.admin.as_ref().and_then(|r| r.bind.as_ref()).map(|b| b.span())));
        }
        let raw_acme = raw.acme.as_ref();
        match acme.map(|a| &a.challenge) {
            Some(AcmeChallenge::Http01Responder(a)) => binds.push((
                *a,
                "acme.http01_bind".into(),
                raw_acme.and_then(|r| r.http01_bind.as_ref()).map(|b| b.span()),
            )),
            Some(AcmeChallenge::TlsAlpn01(a)) => binds.push((
                *a,
                "acme.tls_alpn01_bind".into(),
                raw_acme.and_then(|r| r.tls_alpn01_bind.as_ref()).map(|b| b.span()),
            )),
            _ => {}
        }
        // As `bind_all` does: a listener's `[::]:P` is IPv6-only when a listener also binds
        // `0.0.0.0:P`. The admin server and the ACME responders bind with the system's default,
        // dual-stack on Linux, so their `[::]:P` always takes IPv4 too.
        let listener_binds = listeners.iter().flat_map(|l| &l.bind).count();
        let v4_wildcard = |port: u16| {
            listeners.iter().flat_map(|l| &l.bind).any(|b| b.is_ipv4() && b.port() == port && b.ip().is_unspecified())
        };
        let dual_stack =
            |i: usize, a: &SocketAddr| a.ip().is_unspecified() && (i >= listener_binds || !v4_wildcard(a.port()));
        let overlap = |(i, a): (usize, &SocketAddr), (j, b): (usize, &SocketAddr)| {
            if a.port() == 0 || a.port() != b.port() {
                return false;
            }
            match (a.is_ipv4(), b.is_ipv4()) {
                _ if a == b => true,
                (true, true) | (false, false) => a.ip().is_unspecified() || b.ip().is_unspecified(),
                // A dual-stack `[::]:P` takes every IPv4 address on P.
                (false, true) => dual_stack(i, a),
                (true, false) => dual_stack(j, b),
            }
        };
        for (j, (b, field, span)) in binds.iter().enumerate() {
            if let Some((a, other, _)) =
                binds[..j].iter().enumerate().find(|(i, (a, _, _))| overlap((*i, a), (j, b))).map(|(_, x)| x)
            {
                return Err(self.err(
                    span.clone(),
                    field.clone(),
                    format!("{b} cannot listen beside {a} ({other}): the two overlap on port {}", b.port()),
                ));
            }
        }
        Ok(())
    }

    /// The file's keys and tables with their positions, from the toml crate's spanned parse
    /// (which recovers past syntax errors, so a file that failed to load still has them).
    fn layout(&self) -> Vec<KeyAt> {
        let (doc, _) = toml::de::DeTable::parse_recoverable(self.text);
        let root = Spanned::new(doc.span(), toml::de::DeValue::Table(doc.into_inner()));
        let mut keys = Vec::new();
        key_spans(self.text, "", &root, &mut keys);
        keys
    }

    /// The full name (`limits.login_timeout`) of the key an error at byte `at` is about: the
    /// innermost key that starts before it and whose value reaches its line (so a bad element
    /// of a multi-line array names the array); else a key given a second time at `at`, in the
    /// table whose header is above it. None on a header line or between keys.
    fn key_at(&self, at: usize) -> Option<String> {
        let keys = self.layout();
        let line = |offset: usize| self.position(offset..offset).0;
        let on = line(at);
        if let Some(k) = keys
            .iter()
            .filter(|k| !k.header && k.start <= at && line(k.end) >= on)
            .max_by_key(|k| (k.start, k.name.len()))
        {
            return Some(k.name.clone());
        }
        let key = key_token(self.text.get(at..)?)?.trim_matches(['"', '\'']);
        match keys.iter().filter(|k| k.header && k.start <= at).max_by_key(|k| k.start) {
            Some(table) => Some(format!("{}.{key}", table.name)),
            None => Some(key.to_string()),
        }
    }

    /// Where `field` (`table.key`, `backend[2].health.fall`) is set, for errors about values the
    /// parser keeps no position for: the key's line, else (a default, or a key inside a value
    /// given as a whole) the nearest enclosing table or key that is written out.
    fn find_field(&self, field: &str) -> Option<(usize, usize)> {
        let keys = self.layout();
        let mut f = field;
        loop {
            if let Some(k) = keys.iter().find(|k| k.name == f) {
                return Some(self.position(k.start..k.start));
            }
            f = &f[..f.rfind(['.', '['])?];
        }
    }

    /// A CA file setting, resolved, with its certificates read once here so a file that is
    /// missing or holds none is reported at its line (the runtime reads it again).
    fn ca_file(&self, v: &Option<Spanned<PathBuf>>, field: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(p) = v else { return Ok(None) };
        let path = self.resolve(p.get_ref());
        crate::tls::load_roots(&path).map_err(|message| self.err(Some(p.span()), field, message))?;
        Ok(Some(path))
    }

    /// A duration setting: `default` when absent, an error at its line when below `min`.
    fn duration_at_least(
        &self,
        v: &Option<file::SpannedDuration>,
        field: &str,
        default: Duration,
        min: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) if **s.get_ref() >= min => Ok(**s.get_ref()),
            Some(s) => Err(self.err(
                Some(s.span()),
                field,
                format!("must be at least {}", humantime_serde::re::humantime::format_duration(min)),
            )),
        }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.path.parent().unwrap_or(Path::new(".")).join(p) }
    }

    fn validate(&self, raw: FileConfig) -> Result<Config, ConfigError> {
        let log_format = match raw.log.format.as_ref() {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(self.err(
                        Some(f.span()),
                        "log.format",
                        format!("expected \"text\" or \"json\", found {other:?}"),
                    ));
                }
            },
        };
        let limits = self.limits(&raw.limits)?;
        let throttle = self.throttle(&raw.throttle)?;
        let tls = self.tls(&raw.tls)?;
        let listeners = self.listeners(&raw.listeners)?;
        if listeners.iter().any(|l| l.tls != TlsMode::None)
            && tls.certificates.is_empty()
            && tls.self_signed_names.is_empty()
        {
            return Err(self.err(
                None,
                "tls.certificate",
                "TLS listeners need a certificate (or tls.self_signed_names)",
            ));
        }
        let users_rule = self.users(&raw.users)?;
        let auth = self.auth(&raw.auth, &users_rule)?;
        let backends = self.backends(&raw.backends)?;
        let pools = self.pools(&raw.pools, &backends)?;
        let routing = self.routing(&raw.routing, &backends, &pools, &users_rule)?;
        for l in &listeners {
            let served = routing
                .tables
                .get(&l.protocol)
                .into_iter()
                .chain([&routing.shared])
                .any(|t| t.targets().any(|t| t.serves(l.protocol)));
            if !served && !matches!(auth, AuthSource::Http(_)) {
                return Err(self.err(
                    None,
                    format!("routing.{}", l.protocol.as_str()),
                    format!("listener {:?} needs routes to a {} backend", l.name, l.protocol.as_str()),
                ));
            }
        }
        let hostname = match &raw.server.hostname {
            Some(h) => {
                let name = h.get_ref().trim().to_ascii_lowercase();
                if name.is_empty() || !name.split('.').all(valid_label) {
                    return Err(self.err(
                        Some(h.span()),
                        "server.hostname",
                        format!("{:?} is not a DNS name", h.get_ref()),
                    ));
                }
                name
            }
            None => system_hostname(),
        };
        if matches!(auth, AuthSource::Backend) {
            // Backend-verified auth: the backend's verdict on the client's own password is the only
            // proof. A master-user or XCLIENT login would let any password in.
            let mut names: Vec<&String> = backends.keys().collect();
            names.sort();
            for name in names {
                let b = &backends[name];
                if b.login != BackendLogin::Replay {
                    let i = raw.backends.iter().position(|f| f.name.get_ref() == name).unwrap_or(0);
                    let span = raw.backends.get(i).and_then(|f| f.login.as_ref().map(|l| l.span()));
                    let span = span.or_else(|| raw.backends.get(i).map(|f| f.name.span()));
                    return Err(self.err(
                        span,
                        format!("backend[{i}].login"),
                        "auth.source = \"backend\" needs login = \"replay\": the backend must check the client's own password",
                    ));
                }
            }
        }
        if let AuthSource::PasswdFile { users, path } = &auth {
            for (line, user, backend) in users.backend_refs() {
                if !backends.contains_key(backend) && !pools.contains_key(backend) {
                    return Err(ConfigError {
                        file: path.clone(),
                        position: Some((line, 1)),
                        field: "backend".into(),
                        message: format!("user {user:?} names unknown backend or pool {backend:?}"),
                    });
                }
            }
        }
        let admin = match &raw.admin {
            None => None,
            Some(a) => Some(match &a.bind {
                // Not in 9100-9999, Prometheus' exporters' ports (9100 is node_exporter's, which
                // many hosts run on every address): the quickstart's admin port.
                None => SocketAddr::from(([127, 0, 0, 1], 10080)),
                Some(b) => b.get_ref().parse().map_err(|_| {
                    self.err(Some(b.span()), "admin.bind", format!("{:?} is not an IP:port address", b.get_ref()))
                })?,
            }),
        };
        let acme = match &raw.acme {
            Some(a) => Some(self.acme(a)?),
            None => None,
        };
        self.check_sockets(&raw, &listeners, admin, acme.as_ref())?;
        Ok(Config {
            path: self.path.to_path_buf(),
            hostname,
            admin,
            acme,
            log_format,
            log_level: match &raw.log.level {
                // An invalid filter would silently fall back to errors only, and the warn-level
                // "login failed" lines fail2ban reads would vanish.
                Some(l) if l.get_ref().split(',').all(|d| d.trim().is_empty()) => {
                    return Err(self.err(Some(l.span()), "log.level", "empty: name a level such as \"info\""));
                }
                Some(l) => match tracing_subscriber::EnvFilter::builder().parse(l.get_ref()) {
                    Ok(_) => Some(l.get_ref().clone()),
                    Err(e) => return Err(self.err(Some(l.span()), "log.level", format!("not a log filter: {e}"))),
                },
                None => None,
            },
            limits,
            throttle,
            tls,
            listeners,
            auth,
            backends,
            pools,
            routing,
            users: users_rule,
        })
    }

    fn limits(&self, l: &file::LimitsFile) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let positive = |v: &Option<Spanned<u32>>, field: &str, default: u32, min: u32| -> Result<u32, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) if *s.get_ref() >= min => Ok(*s.get_ref()),
                Some(s) => Err(self.err(Some(s.span()), format!("limits.{field}"), format!("must be at least {min}"))),
            }
        };
        // A zero timeout would end every handshake, login or session at once.
        let timeout = |v: &Option<file::SpannedDuration>, field: &str, default: Duration| {
            self.duration_at_least(v, &format!("limits.{field}"), default, Duration::from_millis(1))
        };
        let limits = Limits {
            tls_handshake_timeout: timeout(&l.tls_handshake_timeout, "tls_handshake_timeout", d.tls_handshake_timeout)?,
            preauth_idle_timeout: timeout(&l.preauth_idle_timeout, "preauth_idle_timeout", d.preauth_idle_timeout)?,
            login_timeout: timeout(&l.login_timeout, "login_timeout", d.login_timeout)?,
            idle_timeout: timeout(&l.idle_timeout, "idle_timeout", d.idle_timeout)?,
            backend_connect_timeout: timeout(
                &l.backend_connect_timeout,
                "backend_connect_timeout",
                d.backend_connect_timeout,
            )?,
            backend_login_timeout: timeout(&l.backend_login_timeout, "backend_login_timeout", d.backend_login_timeout)?,
            auth_failure_delay: l.auth_failure_delay.unwrap_or(d.auth_failure_delay),
            shutdown_grace: l.shutdown_grace.unwrap_or(d.shutdown_grace),
            smtp_greeting_delay: l.smtp_greeting_delay.unwrap_or(d.smtp_greeting_delay),
            command_timeout: timeout(&l.command_timeout, "command_timeout", d.command_timeout)?,
            max_session_duration: l.max_session_duration.filter(|d| !d.is_zero()),
            tcp_keepalive: match &l.tcp_keepalive {
                None => d.tcp_keepalive,
                Some(s) if s.get_ref().is_zero() => None,
                // The kernel counts whole seconds, from 1 to MAX_TCP_KEEPIDLE.
                Some(s) if (Duration::from_secs(1)..=MAX_TCP_KEEPALIVE).contains(&**s.get_ref()) => {
                    Some(Duration::from_secs(s.get_ref().as_secs()))
                }
                Some(s) => {
                    return Err(self.err(
                        Some(s.span()),
                        "limits.tcp_keepalive",
                        "must be 0 (off) or from 1s to 32767s",
                    ));
                }
            },
            backend_disconnect_spread: l.backend_disconnect_spread.unwrap_or(d.backend_disconnect_spread),
            max_connections: l.max_connections.unwrap_or(d.max_connections),
            max_connections_per_listener: l.max_connections_per_listener.unwrap_or(d.max_connections_per_listener),
            max_connections_per_ip: l.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
            max_sessions_per_user: l.max_sessions_per_user.unwrap_or(d.max_sessions_per_user),
            max_line_length: positive(&l.max_line_length, "max_line_length", d.max_line_length, 1024)?,
            max_errors: positive(&l.max_errors, "max_errors", d.max_errors, 1)?,
            max_auth_attempts: positive(&l.max_auth_attempts, "max_auth_attempts", d.max_auth_attempts, 1)?,
        };
        // Each connection before login may buffer this much: a slip of a few zeros would let
        // anyone unauthenticated take gigabytes per connection.
        if let Some(v) = &l.max_line_length
            && *v.get_ref() > MAX_LINE_LENGTH_LIMIT
        {
            return Err(self.err(
                Some(v.span()),
                "limits.max_line_length",
                format!("must be at most {MAX_LINE_LENGTH_LIMIT} (1 MiB)"),
            ));
        }
        // The delay runs inside the login deadline: as long, and every SMTP client would be cut
        // off before its greeting.
        if limits.smtp_greeting_delay >= limits.login_timeout {
            return Err(self.err(
                None,
                "limits.smtp_greeting_delay",
                format!(
                    "must be shorter than limits.login_timeout ({})",
                    humantime_serde::re::humantime::format_duration(limits.login_timeout)
                ),
            ));
        }
        Ok(limits)
    }

    fn throttle(&self, t: &file::ThrottleFile) -> Result<ThrottleSettings, ConfigError> {
        let d = ThrottleSettings::default();
        let ipv6_prefix = match &t.ipv6_prefix {
            None => d.ipv6_prefix,
            Some(p) if *p.get_ref() <= 128 => *p.get_ref(),
            Some(p) => return Err(self.err(Some(p.span()), "throttle.ipv6_prefix", "must be 0 to 128")),
        };
        let mut trusted = Vec::new();
        if let Some(list) = &t.trusted {
            for c in list.get_ref() {
                trusted.push(Cidr::parse(c).ok_or_else(|| {
                    self.err(Some(list.span()), "throttle.trusted", format!("{c:?} is not an address or CIDR"))
                })?);
            }
        }
        let s = ThrottleSettings {
            enabled: t.enabled.unwrap_or(d.enabled),
            penalty_after: t.penalty_after.unwrap_or(d.penalty_after),
            penalty_base: t.penalty_base.unwrap_or(d.penalty_base),
            penalty_max: t.penalty_max.unwrap_or(d.penalty_max),
            block_after: t.block_after.unwrap_or(d.block_after),
            user_block_after: t.user_block_after.unwrap_or(d.user_block_after),
            cooldown: t.cooldown.unwrap_or(d.cooldown),
            window: t.window.unwrap_or(d.window),
            ipv6_prefix,
            trusted,
            max_entries: t.max_entries.unwrap_or(d.max_entries),
        };
        if s.max_entries < 100 {
            return Err(self.err(None, "throttle.max_entries", "must be at least 100"));
        }
        // Only where penalty_base is written: a penalty_max alone under the default base is a
        // fixed penalty, as it always was.
        if t.penalty_base.is_some() && s.penalty_base > s.penalty_max {
            // The penalty is min(base × 2^n, max): the base would never be seen.
            return Err(self.err(None, "throttle.penalty_base", "must not be above penalty_max"));
        }
        if s.enabled && s.window.is_zero() {
            // Counts would start again at every attempt: throttling on in name only.
            return Err(self.err(None, "throttle.window", "must be above 0 (enabled = false turns throttling off)"));
        }
        if s.block_after == 0 || s.user_block_after == 0 {
            let field = if s.block_after == 0 { "throttle.block_after" } else { "throttle.user_block_after" };
            return Err(self.err(None, field, "must be at least 1"));
        }
        Ok(s)
    }

    fn tls(&self, t: &file::TlsFile) -> Result<TlsSettings, ConfigError> {
        let mut certificates = Vec::new();
        // A name may be listed by one certificate per key type (an ECDSA and an RSA one): the
        // certificate store, which reads the keys, refuses two of one type (`portcullis check`
        // too, at the second one's `cert`).
        for (i, c) in t.certificates.iter().enumerate() {
            let mut names = Vec::new();
            for n in &c.names {
                let name = n.get_ref().trim().to_ascii_lowercase();
                let bare = name.strip_prefix("*.").unwrap_or(&name);
                if bare.is_empty() || !bare.split('.').all(valid_label) {
                    return Err(self.err(
                        Some(n.span()),
                        format!("tls.certificate[{i}].names"),
                        format!("{:?} is not a DNS name", n.get_ref()),
                    ));
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            if names.is_empty() && !c.default {
                return Err(self.err(
                    Some(c.cert.span()),
                    format!("tls.certificate[{i}].names"),
                    "a certificate needs names or `default = true`",
                ));
            }
            if names.is_empty() && t.strict_sni == Some(true) {
                // Names are matched from `names` only: this one would answer no client that asks.
                return Err(self.err(
                    Some(c.cert.span()),
                    format!("tls.certificate[{i}].names"),
                    "with tls.strict_sni every certificate needs its names listed",
                ));
            }
            certificates.push(CertSpec {
                cert: self.resolve(c.cert.get_ref()),
                key: self.resolve(c.key.get_ref()),
                origin: [
                    (format!("tls.certificate[{i}].cert"), Some(self.position(c.cert.span()))),
                    (format!("tls.certificate[{i}].key"), Some(self.position(c.key.span()))),
                ],
                names,
                default: c.default,
            });
        }
        // One default per key type, as one certificate per name and key type: the store checks.
        let self_signed_names = match &t.self_signed_names {
            Some(n) => {
                let valid =
                    |n: &str| rustls::pki_types::ServerName::try_from(n.strip_prefix("*.").unwrap_or(n)).is_ok();
                if let Some(bad) = n.iter().find(|n| !valid(n)) {
                    return Err(self.err(
                        None,
                        "tls.self_signed_names",
                        format!("{bad:?} is not a DNS name or an IP address"),
                    ));
                }
                n.clone()
            }
            None if certificates.is_empty() => vec!["localhost".to_string()],
            None => Vec::new(),
        };
        let session_tickets = match &t.session_tickets {
            Some(n) if *n.get_ref() > MAX_SESSION_TICKETS => {
                return Err(self.err(
                    Some(n.span()),
                    "tls.session_tickets",
                    format!("at most {MAX_SESSION_TICKETS} tickets per handshake"),
                ));
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_SESSION_TICKETS,
        };
        let cipher_suites = match &t.cipher_suites {
            None => DEFAULT_CIPHER_SUITES.iter().map(|s| s.to_string()).collect(),
            Some(list) => {
                let mut out: Vec<String> = Vec::new();
                for name in list.get_ref() {
                    if !DEFAULT_CIPHER_SUITES.contains(&name.as_str()) {
                        return Err(self.err(
                            Some(list.span()),
                            "tls.cipher_suites",
                            format!(
                                "{name:?} is not a known cipher suite (one of: {})",
                                DEFAULT_CIPHER_SUITES.join(", ")
                            ),
                        ));
                    }
                    if out.contains(name) {
                        return Err(self.err(
                            Some(list.span()),
                            "tls.cipher_suites",
                            format!("{name:?} is listed twice"),
                        ));
                    }
                    out.push(name.clone());
                }
                if !out.iter().any(|n| n.starts_with("TLS13_")) {
                    return Err(self.err(
                        Some(list.span()),
                        "tls.cipher_suites",
                        "at least one TLS 1.3 suite (TLS13_*) is needed",
                    ));
                }
                out
            }
        };
        Ok(TlsSettings {
            certificates,
            self_signed_names,
            session_tickets,
            cipher_suites,
            strict_sni: t.strict_sni.unwrap_or(false),
        })
    }

    fn listeners(&self, ls: &[file::ListenerFile]) -> Result<Vec<Arc<ListenerConfig>>, ConfigError> {
        let mut out: Vec<Arc<ListenerConfig>> = Vec::new();
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in ls.iter().enumerate() {
            let field = |f: &str| format!("listener[{i}].{f}");
            let name = l.name.get_ref().clone();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(self.err(Some(l.name.span()), field("name"), "use letters, digits, '-' and '_'"));
            }
            if !names.insert(name.clone()) {
                return Err(self.err(Some(l.name.span()), field("name"), format!("duplicate listener name {name:?}")));
            }
            let raw_binds = match l.bind.get_ref() {
                BindFile::One(s) => vec![s.clone()],
                BindFile::Many(v) => v.clone(),
            };
            if raw_binds.is_empty() {
                return Err(self.err(Some(l.bind.span()), field("bind"), "at least one address is needed"));
            }
            let mut bind = Vec::new();
            for b in raw_binds {
                let addr: SocketAddr = b.parse().map_err(|_| {
                    self.err(Some(l.bind.span()), field("bind"), format!("{b:?} is not an IP:port address"))
                })?;
                if addr.port() != 0 && !addrs.insert(addr) {
                    return Err(self.err(
                        Some(l.bind.span()),
                        field("bind"),
                        format!("{addr} is bound by another listener"),
                    ));
                }
                bind.push(addr);
            }
            let Some(protocol) = Protocol::parse(l.protocol.get_ref()) else {
                return Err(self.err(
                    Some(l.protocol.span()),
                    field("protocol"),
                    format!(
                        "unsupported protocol {:?} (expected \"imap\", \"pop3\" or \"smtp\")",
                        l.protocol.get_ref()
                    ),
                ));
            };
            let tls = match l.tls.get_ref().as_str() {
                "implicit" => TlsMode::Implicit,
                "starttls" => TlsMode::StartTls,
                "none" => TlsMode::None,
                other => {
                    return Err(self.err(
                        Some(l.tls.span()),
                        field("tls"),
                        format!("expected \"implicit\", \"starttls\" or \"none\", found {other:?}"),
                    ));
                }
            };
            let trusted_proxies = match (&l.trusted_proxies, l.proxy_protocol) {
                (None, false) => Vec::new(),
                (None, true) => {
                    return Err(self.err(
                        Some(l.name.span()),
                        field("trusted_proxies"),
                        "proxy_protocol = true needs trusted_proxies",
                    ));
                }
                (Some(t), false) => {
                    return Err(self.err(
                        Some(t.span()),
                        field("trusted_proxies"),
                        "only used with proxy_protocol = true",
                    ));
                }
                (Some(t), true) => {
                    let mut out = Vec::new();
                    for c in t.get_ref() {
                        out.push(Cidr::parse(c).ok_or_else(|| {
                            self.err(
                                Some(t.span()),
                                field("trusted_proxies"),
                                format!("{c:?} is not an address or CIDR"),
                            )
                        })?);
                    }
                    if out.is_empty() {
                        return Err(self.err(Some(t.span()), field("trusted_proxies"), "at least one range is needed"));
                    }
                    out
                }
            };
            let client_cert = self.client_cert(l, tls, &field)?;
            // Not refused (a listener kept open only to say so is a choice), but said: no
            // credentials go over it, so no one can log in there.
            if tls == TlsMode::None && !l.allow_plaintext_auth {
                tracing::warn!(listener = %name, file = %self.path.display(),
                    "listener has tls = \"none\" without allow_plaintext_auth = true: no client can log in on it");
            }
            out.push(Arc::new(ListenerConfig {
                name,
                bind,
                protocol,
                tls,
                allow_plaintext_auth: l.allow_plaintext_auth,
                trusted_proxies,
                client_cert,
            }));
        }
        Ok(out)
    }

    /// A listener's `verify_client`, `client_ca_file`, `client_crl_file` and
    /// `client_verify_depth`. The files are read here too, so a missing or unreadable one is
    /// reported at its line (they are read again for each runtime).
    fn client_cert(
        &self,
        l: &file::ListenerFile,
        tls: TlsMode,
        field: &dyn Fn(&str) -> String,
    ) -> Result<ClientCertSettings, ConfigError> {
        let mode = match &l.verify_client {
            None => VerifyClient::Off,
            Some(v) => match v.get_ref().as_str() {
                "off" => VerifyClient::Off,
                "on" => VerifyClient::On,
                "optional" => VerifyClient::Optional,
                "optional_no_ca" => VerifyClient::OptionalNoCa,
                other => {
                    return Err(self.err(
                        Some(v.span()),
                        field("verify_client"),
                        format!("expected \"off\", \"on\", \"optional\" or \"optional_no_ca\", found {other:?}"),
                    ));
                }
            },
        };
        if mode != VerifyClient::Off && tls == TlsMode::None {
            let span = l.verify_client.as_ref().map(|v| v.span());
            return Err(self.err(
                span,
                field("verify_client"),
                "client certificates need tls = \"implicit\" or \"starttls\"",
            ));
        }
        if mode != VerifyClient::Off && l.allow_plaintext_auth {
            // A STARTTLS client could log in before TLS, and so without a certificate.
            let span = l.verify_client.as_ref().map(|v| v.span());
            return Err(self.err(span, field("allow_plaintext_auth"), "cannot be true with verify_client"));
        }
        let ca = match &l.client_ca_file {
            None if matches!(mode, VerifyClient::On | VerifyClient::Optional) => {
                let span = l.verify_client.as_ref().map(|v| v.span());
                return Err(self.err(
                    span,
                    field("client_ca_file"),
                    "verify_client = \"on\" or \"optional\" needs client_ca_file",
                ));
            }
            None => None,
            Some(p) if mode == VerifyClient::Off => {
                return Err(self.err(Some(p.span()), field("client_ca_file"), "only used with verify_client"));
            }
            Some(p) => {
                let path = self.resolve(p.get_ref());
                crate::tls::load_roots_checked(&path, crate::tls::client_cert::client_ca)
                    .map_err(|message| self.err(Some(p.span()), field("client_ca_file"), message))?;
                Some(path)
            }
        };
        let needs_ca = |span, name: &str| {
            let why = if mode == VerifyClient::Off { "only used with verify_client" } else { "needs client_ca_file" };
            self.err(Some(span), field(name), why)
        };
        let mut settings = ClientCertSettings { mode, ca_file: ca, ..ClientCertSettings::default() };
        if let Some(d) = &l.client_verify_depth {
            if settings.ca_file.is_none() {
                return Err(needs_ca(d.span(), "client_verify_depth"));
            }
            if !(0..=MAX_VERIFY_DEPTH).contains(d.get_ref()) {
                return Err(self.err(
                    Some(d.span()),
                    field("client_verify_depth"),
                    format!("expected 0 to {MAX_VERIFY_DEPTH}, found {}", d.get_ref()),
                ));
            }
            settings.verify_depth = *d.get_ref() as usize;
        }
        if let Some(p) = &l.client_crl_file {
            if settings.ca_file.is_none() {
                return Err(needs_ca(p.span(), "client_crl_file"));
            }
            settings.crl_file = Some(self.resolve(p.get_ref()));
            crate::tls::client_cert::ClientAuth::new(&settings)
                .map_err(|message| self.err(Some(p.span()), field("client_crl_file"), message))?;
        }
        Ok(settings)
    }

    fn acme(&self, a: &file::AcmeFile) -> Result<AcmeSettings, ConfigError> {
        let directory = match a.directory.get_ref().as_str() {
            "letsencrypt" => LETSENCRYPT.to_string(),
            "letsencrypt-staging" => LETSENCRYPT_STAGING.to_string(),
            url if url.starts_with("https://") => url.to_string(),
            other => {
                return Err(self.err(
                    Some(a.directory.span()),
                    "acme.directory",
                    format!("expected \"letsencrypt\", \"letsencrypt-staging\" or an https:// URL, found {other:?}"),
                ));
            }
        };
        let addr = |s: &Option<Spanned<String>>, field: &str, default: SocketAddr| -> Result<SocketAddr, ConfigError> {
            match s {
                None => Ok(default),
                Some(b) => b.get_ref().parse().map_err(|_| {
                    self.err(
                        Some(b.span()),
                        format!("acme.{field}"),
                        format!("{:?} is not an IP:port address", b.get_ref()),
                    )
                }),
            }
        };
        let challenge = match a.challenge.as_ref().map(|c| c.get_ref().as_str()) {
            None | Some("http-01") => match &a.http01_webroot {
                Some(root) => AcmeChallenge::Http01Webroot(self.resolve(root.get_ref())),
                None => AcmeChallenge::Http01Responder(addr(
                    &a.http01_bind,
                    "http01_bind",
                    SocketAddr::from(([0, 0, 0, 0], 80)),
                )?),
            },
            Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01(addr(
                &a.tls_alpn01_bind,
                "tls_alpn01_bind",
                SocketAddr::from(([0, 0, 0, 0], 443)),
            )?),
            Some("dns-01") => match &a.dns01_hook {
                Some(hook) => {
                    use std::os::unix::fs::PermissionsExt;
                    let path = self.resolve(hook.get_ref());
                    // Found missing at the first order otherwise, long after `check` said yes.
                    let runnable =
                        std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                    if !runnable {
                        return Err(self.err(
                            Some(hook.span()),
                            "acme.dns01_hook",
                            format!("{} is not an executable file", path.display()),
                        ));
                    }
                    AcmeChallenge::Dns01 {
                        hook: path,
                        propagation: a.dns01_propagation.unwrap_or(Duration::from_secs(30)),
                    }
                }
                None => {
                    return Err(self.err(
                        a.challenge.as_ref().map(|c| c.span()),
                        "acme.dns01_hook",
                        "dns-01 needs dns01_hook",
                    ));
                }
            },
            Some(other) => {
                return Err(self.err(
                    a.challenge.as_ref().map(|c| c.span()),
                    "acme.challenge",
                    format!("expected \"http-01\", \"tls-alpn-01\" or \"dns-01\", found {other:?}"),
                ));
            }
        };
        // Settings of another challenge (or of the responder, beside a webroot) would be read
        // and never used: the operator meant something else.
        let (webroot, responder, alpn, dns) = match &challenge {
            AcmeChallenge::Http01Webroot(_) => (true, false, false, false),
            AcmeChallenge::Http01Responder(_) => (false, true, false, false),
            AcmeChallenge::TlsAlpn01(_) => (false, false, true, false),
            AcmeChallenge::Dns01 { .. } => (false, false, false, true),
        };
        let unused = [
            ("http01_bind", a.http01_bind.as_ref().map(|v| v.span()), responder),
            ("http01_webroot", a.http01_webroot.as_ref().map(|v| v.span()), webroot),
            ("tls_alpn01_bind", a.tls_alpn01_bind.as_ref().map(|v| v.span()), alpn),
            ("dns01_hook", a.dns01_hook.as_ref().map(|v| v.span()), dns),
        ];
        for (key, span, used) in unused {
            if let (Some(span), false) = (span, used) {
                let why = if key == "http01_bind" && webroot {
                    "not used with http01_webroot (the web server answers the challenges, not a responder)".to_string()
                } else {
                    format!("not used with the {} challenge", challenge.name())
                };
                return Err(self.err(Some(span), format!("acme.{key}"), why));
            }
        }
        if a.dns01_propagation.is_some() && !dns {
            return Err(self.err(
                None,
                "acme.dns01_propagation",
                format!("not used with the {} challenge", challenge.name()),
            ));
        }
        if a.certificates.is_empty() {
            return Err(self.err(None, "acme", "no [[acme.certificate]]: nothing to order"));
        }
        if !a.terms_agreed {
            return Err(self.err(
                Some(a.directory.span()),
                "acme.terms_agreed",
                "the CA's terms of service must be agreed to (terms_agreed = true)",
            ));
        }
        let eab = match (&a.eab_kid, &a.eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                use base64::Engine;
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(key.get_ref().trim_end_matches('='))
                    .map_err(|_| self.err(Some(key.span()), "acme.eab_hmac_key", "not base64url"))?;
                Some((kid.clone(), crate::auth::Password::new(raw)))
            }
            // Named by the one that is there, so the position is its line.
            (Some(_), None) => return Err(self.err(None, "acme.eab_kid", "eab_kid and eab_hmac_key go together")),
            _ => return Err(self.err(None, "acme.eab_hmac_key", "eab_kid and eab_hmac_key go together")),
        };
        let mut certificates = Vec::new();
        for (i, c) in a.certificates.iter().enumerate() {
            let field = format!("acme.certificate[{i}].names");
            let rsa = match c.key_type.as_ref().map(|k| k.get_ref().as_str()) {
                None | Some("ecdsa-p256") => false,
                Some("rsa-2048") => true,
                Some(other) => {
                    return Err(self.err(
                        c.key_type.as_ref().map(|k| k.span()),
                        format!("acme.certificate[{i}].key_type"),
                        format!("expected \"ecdsa-p256\" or \"rsa-2048\", found {other:?}"),
                    ));
                }
            };
            let mut names = Vec::new();
            for n in c.names.get_ref() {
                let name = n.trim().to_ascii_lowercase();
                let bare = name.strip_prefix("*.").unwrap_or(&name);
                if bare.is_empty() || !bare.split('.').all(valid_label) {
                    return Err(self.err(Some(c.names.span()), field, format!("{n:?} is not a DNS name")));
                }
                // RFC 8555 7.1.3: a CA offers only dns-01 for a wildcard; any other challenge
                // would fail every order, long after `check` said OK.
                if bare.len() != name.len() && !matches!(challenge, AcmeChallenge::Dns01 { .. }) {
                    return Err(self.err(
                        Some(c.names.span()),
                        field,
                        format!("{n:?} is a wildcard: CAs validate wildcards by dns-01 only (challenge = \"dns-01\")"),
                    ));
                }
                // One certificate per name and key type (an ECDSA and an RSA one, as for files):
                // a second of one type would never be served.
                if let Some(j) =
                    certificates.iter().position(|o: &AcmeCertSpec| o.rsa == rsa && o.names.contains(&name))
                {
                    return Err(self.err(
                        Some(c.names.span()),
                        field,
                        format!("{name:?} is already listed in acme.certificate[{j}], with the same key_type"),
                    ));
                }
                // Twice in one certificate (differing in case, say): once is what is meant.
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            if names.is_empty() {
                return Err(self.err(Some(c.names.span()), field, "at least one name is needed"));
            }
            certificates.push(AcmeCertSpec::new(names, rsa));
        }
        // The RSA one of a pair sharing a first name gets a label of its own.
        let ecdsa_firsts: Vec<String> = certificates.iter().filter(|c| !c.rsa).map(|c| c.label.clone()).collect();
        for c in certificates.iter_mut().filter(|c| c.rsa && ecdsa_firsts.contains(&c.label)) {
            c.label.push_str("+rsa");
        }
        // RFC 8555 7.3: contacts are URLs; a bare address is refused by the CA when the account
        // is made, long after `check` said OK.
        if let Some(c) =
            a.contact.iter().find(|c| !c.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("mailto:")) || c.len() == 7)
        {
            return Err(self.err(
                None,
                "acme.contact",
                format!("{c:?} is not a mailto: URL (\"mailto:postmaster@example.org\")"),
            ));
        }
        Ok(AcmeSettings {
            directory,
            contact: a.contact.clone(),
            terms_agreed: a.terms_agreed,
            eab,
            ca_file: self.ca_file(&a.ca_file, "acme.ca_file")?,
            state_dir: self.resolve(a.state_dir.get_ref()),
            challenge,
            // Below a second a failing order would be retried hard enough to trip the CA's limits.
            retry_min: match self.duration_at_least(
                &a.retry_min,
                "acme.retry_min",
                Duration::from_secs(60),
                Duration::from_secs(1),
            )? {
                // The backoff between failed orders is capped at 6 hours (`tls::acme`): a longer
                // shortest wait would be quietly cut to it.
                r if r > Duration::from_secs(6 * 3600) => {
                    let span = a.retry_min.as_ref().map(|s| s.span());
                    return Err(self.err(
                        span,
                        "acme.retry_min",
                        "must be at most 6h, the longest wait between failed orders",
                    ));
                }
                r => r,
            },
            certificates,
        })
    }

    fn users(&self, u: &file::UsersFile) -> Result<UserRule, ConfigError> {
        let lowercase = match u.lowercase.as_ref().map(|l| l.get_ref().as_str()) {
            Some("domain") => Lowercase::Domain,
            None | Some("all") => Lowercase::All,
            Some("none") => Lowercase::None,
            Some(other) => {
                let span = u.lowercase.as_ref().map(|l| l.span());
                return Err(self.err(
                    span,
                    "users.lowercase",
                    format!("expected \"domain\", \"all\" or \"none\", found {other:?}"),
                ));
            }
        };
        let default_domain = match &u.default_domain {
            Some(d) => {
                let name = canonical_domain(d.get_ref().trim()).unwrap_or_default();
                if name.is_empty() || !name.split('.').all(valid_label) {
                    return Err(self.err(
                        Some(d.span()),
                        "users.default_domain",
                        format!("{:?} is not a domain", d.get_ref()),
                    ));
                }
                Some(name)
            }
            None => None,
        };
        if u.strip_default_domain && default_domain.is_none() {
            return Err(self.err(None, "users.strip_default_domain", "needs users.default_domain"));
        }
        Ok(UserRule { lowercase, default_domain, strip_default_domain: u.strip_default_domain })
    }

    fn auth(&self, a: &file::AuthFile, rule: &UserRule) -> Result<AuthSource, ConfigError> {
        let source = a.source.as_ref().map(|s| s.get_ref().as_str());
        if source == Some("http") {
            let Some(h) = &a.http else {
                return Err(self.err(
                    a.source.as_ref().map(|s| s.span()),
                    "auth.http",
                    "source = \"http\" needs an [auth.http] table",
                ));
            };
            if h.urls.get_ref().is_empty() {
                return Err(self.err(Some(h.urls.span()), "auth.http.urls", "at least one URL is needed"));
            }
            for u in h.urls.get_ref() {
                // No user:password@ part: it would be logged with the URL and sent in Host, never
                // used as credentials (headers are the way: `headers = { Authorization = ... }`).
                let uri = u.parse::<hyper::Uri>().ok();
                // On the text, not the parsed URL: one that does not parse must not be echoed
                // below with a password in it either.
                let authority = u.split_once("://").map_or(u.as_str(), |(_, rest)| rest);
                let authority = authority.split(['/', '?', '#']).next().unwrap_or("");
                if authority.contains('@') {
                    // Not echoed: it holds a password.
                    return Err(self.err(
                        Some(h.urls.span()),
                        "auth.http.urls",
                        "a URL may not hold a user name or password (send them in auth.http.headers)",
                    ));
                }
                // A port that is not one (`:90000`, `:8o80`) parses as no port at all, and the
                // requests would go to 80 or 443: refused here instead.
                let port_text = authority[authority.rfind(']').map_or(0, |i| i + 1)..].split_once(':');
                let port_ok = port_text.is_none_or(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0));
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && port_ok
                    && uri.is_some_and(|uri| uri.host().is_some());
                if !ok {
                    return Err(self.err(
                        Some(h.urls.span()),
                        "auth.http.urls",
                        format!("{:?} is not an http:// or https:// URL", crate::auth::http::shown(u)),
                    ));
                }
            }
            for (k, v) in &h.headers {
                if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || hyper::header::HeaderValue::from_str(v).is_err()
                {
                    return Err(self.err(None, format!("auth.http.headers.{k}"), "not a valid HTTP header"));
                }
            }
            if h.timeout.is_some_and(|t| t.is_zero()) {
                // Every request would time out: every login a temporary failure.
                return Err(self.err(None, "auth.http.timeout", "must be above 0"));
            }
            if let Some(p) = &a.passwd_file {
                // Never loaded nor watched: a user taken out of it would still log in.
                return Err(self.err(Some(p.span()), "auth.passwd_file", "not used with source = \"http\""));
            }
            return Ok(AuthSource::Http(AuthHttpSettings {
                urls: h.urls.get_ref().clone(),
                timeout: h.timeout.unwrap_or(Duration::from_secs(10)),
                headers: h.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                ca_file: self.ca_file(&h.ca_file, "auth.http.ca_file")?,
                cache_ttl: h.cache_ttl.unwrap_or(Duration::ZERO),
                negative_cache_ttl: h.negative_cache_ttl.unwrap_or(Duration::ZERO),
                pass_client_cert: h.pass_client_cert,
            }));
        }
        if a.http.is_some() {
            return Err(self.err(None, "auth.http", "only used with source = \"http\""));
        }
        match (source, &a.passwd_file) {
            (Some("backend"), None) => Ok(AuthSource::Backend),
            (Some("backend"), Some(p)) => {
                Err(self.err(Some(p.span()), "auth.passwd_file", "not used with source = \"backend\""))
            }
            (None | Some("passwd-file"), Some(p)) => {
                let path = self.resolve(p.get_ref());
                let users = UserDb::load(&path, rule).map_err(|e| match e {
                    crate::auth::passwd::LoadError::Io(io) => {
                        self.err(Some(p.span()), "auth.passwd_file", format!("cannot read {}: {io}", path.display()))
                    }
                    crate::auth::passwd::LoadError::Line { line, field, message } => {
                        ConfigError { file: path.clone(), position: Some((line, 1)), field, message }
                    }
                })?;
                Ok(AuthSource::PasswdFile { path, users: Arc::new(users) })
            }
            (None | Some("passwd-file"), None) => {
                Err(self.err(None, "auth.passwd_file", "required (or set auth.source = \"backend\")"))
            }
            (Some(other), _) => {
                let span = a.source.as_ref().map(|s| s.span());
                Err(self.err(
                    span,
                    "auth.source",
                    format!("expected \"passwd-file\", \"backend\" or \"http\", found {other:?}"),
                ))
            }
        }
    }

    fn backends(&self, bs: &[file::BackendFile]) -> Result<HashMap<String, Arc<Backend>>, ConfigError> {
        let mut out = HashMap::new();
        for (i, b) in bs.iter().enumerate() {
            let field = |f: &str| format!("backend[{i}].{f}");
            let name = b.name.get_ref().clone();
            if name.is_empty() || out.contains_key(&name) {
                return Err(self.err(
                    Some(b.name.span()),
                    field("name"),
                    format!("empty or duplicate backend name {name:?}"),
                ));
            }
            if name == "dynamic" {
                return Err(self.err(
                    Some(b.name.span()),
                    field("name"),
                    "\"dynamic\" is reserved: it is the metrics label of the backends an auth service names by address",
                ));
            }
            if split_host_port(&name).is_some() {
                // An auth service's `Auth-Server` + `Auth-Port` make a backend of that name,
                // which would take this one's health record, sessions and TLS settings.
                return Err(self.err(
                    Some(b.name.span()),
                    field("name"),
                    format!(
                        "{name:?} has the form host:port, which names the backends an auth service names by address"
                    ),
                ));
            }
            let address = b.address.get_ref().clone();
            let host = split_host_port(&address).ok_or_else(|| {
                self.err(
                    Some(b.address.span()),
                    field("address"),
                    format!("{address:?} is not host:port (an IPv6 address in brackets: \"[2001:db8::1]:143\")"),
                )
            })?;
            if address.parse::<SocketAddr>().is_ok_and(|a| a.ip().to_canonical().is_unspecified()) {
                // 0.0.0.0 / [::] reach this host: likely a listener's bind copied here (a loop).
                return Err(self.err(
                    Some(b.address.span()),
                    field("address"),
                    format!("{address:?} names no host (0.0.0.0 and [::] are for binding)"),
                ));
            }
            let transport = match b.transport.as_ref().map(|t| t.get_ref().as_str()) {
                None | Some("plain") => Transport::Plain,
                Some("tls") => Transport::Tls,
                Some("starttls") => Transport::StartTls,
                Some(other) => {
                    let span = b.transport.as_ref().map(|t| t.span());
                    return Err(self.err(
                        span,
                        field("transport"),
                        format!("expected \"plain\", \"tls\" or \"starttls\", found {other:?}"),
                    ));
                }
            };
            // TLS settings on a plain backend would be read and never used: a backend meant to
            // be reached over TLS (a CA file named for it) would get passwords in the clear.
            if transport == Transport::Plain {
                let stray = (b.tls_server_name.as_ref().map(|t| ("tls_server_name", Some(t.span()))))
                    .or(b.tls_ca_file.as_ref().map(|t| ("tls_ca_file", Some(t.span()))))
                    .or(b.tls_verify.map(|_| ("tls_verify", None)));
                if let Some((which, span)) = stray {
                    return Err(self.err(
                        span,
                        field(which),
                        "only used with transport = \"tls\" or \"starttls\"; the transport is \"plain\", so the backend gets no TLS",
                    ));
                }
            }
            // A CA file beside `tls_verify = false` would be read, watched, and never used: the
            // backend's certificate is not checked at all, which the file suggests it is.
            if b.tls_verify == Some(false)
                && let Some(ca) = &b.tls_ca_file
            {
                return Err(self.err(
                    Some(ca.span()),
                    field("tls_ca_file"),
                    "not used with tls_verify = false, which checks no certificate: remove one of them",
                ));
            }
            let protocol = match &b.protocol {
                None => Protocol::Imap,
                Some(p) => Protocol::parse(p.get_ref()).ok_or_else(|| {
                    self.err(
                        Some(p.span()),
                        field("protocol"),
                        format!("expected \"imap\", \"pop3\" or \"smtp\", found {:?}", p.get_ref()),
                    )
                })?,
            };
            let client_address = match (protocol, b.client_address.as_ref().map(|t| t.get_ref().as_str())) {
                (Protocol::Imap, None) => ClientAddress::ImapIdIfAnnounced,
                (Protocol::Imap, Some("imap-id")) => ClientAddress::ImapId,
                (Protocol::Pop3 | Protocol::Smtp, None | Some("xclient")) => ClientAddress::Xclient,
                (_, Some("proxy-v2")) => ClientAddress::ProxyV2,
                (_, Some("none")) => ClientAddress::None,
                (_, Some(other)) => {
                    let span = b.client_address.as_ref().map(|t| t.span());
                    let expected = if protocol == Protocol::Imap { "\"imap-id\"" } else { "\"xclient\"" };
                    return Err(self.err(
                        span,
                        field("client_address"),
                        format!(
                            "expected {expected}, \"proxy-v2\" or \"none\" for {}, found {other:?}",
                            protocol.as_str()
                        ),
                    ));
                }
            };
            let login_name = b.login.as_ref().map(|t| t.get_ref().as_str());
            if login_name != Some("master")
                && let Some(span) =
                    b.master_user.as_ref().map(|t| t.span()).or(b.master_password.as_ref().map(|t| t.span()))
            {
                // A forgotten `login = "master"` would replay the clients' own passwords.
                let which = if b.master_user.is_some() { "master_user" } else { "master_password" };
                return Err(self.err(Some(span), field(which), "only used with login = \"master\", which is not set"));
            }
            let login = match (protocol, login_name) {
                (Protocol::Smtp, None | Some("xclient")) => BackendLogin::Xclient,
                (_, None | Some("replay")) => BackendLogin::Replay,
                (_, Some("master")) => match (&b.master_user, &b.master_password) {
                    (Some(u), Some(p)) if !u.get_ref().is_empty() && !p.get_ref().is_empty() => {
                        BackendLogin::Master { user: u.get_ref().clone(), password: p.get_ref().clone() }
                    }
                    _ => {
                        let span = b.login.as_ref().map(|t| t.span());
                        return Err(self.err(
                            span,
                            field("master_user"),
                            "login = \"master\" needs master_user and master_password",
                        ));
                    }
                },
                (_, Some(other)) => {
                    let span = b.login.as_ref().map(|t| t.span());
                    let expected = if protocol == Protocol::Smtp {
                        "\"xclient\", \"replay\" or \"master\""
                    } else {
                        "\"replay\" or \"master\""
                    };
                    return Err(self.err(
                        span,
                        field("login"),
                        format!("expected {expected} for {}, found {other:?}", protocol.as_str()),
                    ));
                }
            };
            let tls_server_name = match &b.tls_server_name {
                Some(n) => n.get_ref().clone(),
                None => host.clone(),
            };
            if transport != Transport::Plain
                && rustls::pki_types::ServerName::try_from(tls_server_name.as_str()).is_err()
            {
                let span = b.tls_server_name.as_ref().map_or(b.address.span(), |n| n.span());
                return Err(self.err(
                    Some(span),
                    field("tls_server_name"),
                    format!("{tls_server_name:?} is not a valid server name"),
                ));
            }
            let weight = match &b.weight {
                None => 1.0,
                Some(w) if w.get_ref().is_finite() && *w.get_ref() > 0.0 && *w.get_ref() <= 1000.0 => *w.get_ref(),
                Some(w) => {
                    return Err(self.err(Some(w.span()), field("weight"), "must be a number above 0 and at most 1000"));
                }
            };
            let state = match b.state.as_ref().map(|s| s.get_ref().as_str()) {
                None | Some("up") => BackendState::Up,
                Some("draining") => BackendState::Draining,
                Some("disabled") => BackendState::Disabled,
                Some(other) => {
                    let span = b.state.as_ref().map(|s| s.span());
                    return Err(self.err(
                        span,
                        field("state"),
                        format!("expected \"up\", \"draining\" or \"disabled\", found {other:?}"),
                    ));
                }
            };
            let health = match &b.health {
                None => HealthSettings::default(),
                Some(h) => {
                    let d = HealthSettings::default();
                    let login = match (&h.login_user, &h.login_password) {
                        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                        (None, None) => None,
                        // Named by the one that is there, so the position is its line.
                        (u, _) => {
                            let which = if u.is_some() { "health.login_user" } else { "health.login_password" };
                            return Err(self.err(None, field(which), "login_user and login_password go together"));
                        }
                    };
                    // An SMTP backend's check is its EHLO: a login there would never be sent.
                    if login.is_some() && protocol == Protocol::Smtp {
                        return Err(self.err(
                            None,
                            field("health.login_user"),
                            "only IMAP and POP3 checks log in; an SMTP backend's check is its greeting and EHLO",
                        ));
                    }
                    let hs = HealthSettings {
                        enabled: h.enabled.unwrap_or(true),
                        interval: h.interval.unwrap_or(d.interval),
                        timeout: h.timeout.unwrap_or(d.timeout),
                        rise: h.rise.unwrap_or(d.rise),
                        fall: h.fall.unwrap_or(d.fall),
                        starttls: h.starttls.unwrap_or(true),
                        login,
                    };
                    let zero = [
                        ("health.interval", hs.interval.is_zero()),
                        ("health.timeout", hs.timeout.is_zero()),
                        ("health.rise", hs.rise == 0),
                        ("health.fall", hs.fall == 0),
                    ];
                    if let Some((which, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
                        return Err(self.err(None, field(which), "must be above 0"));
                    }
                    if hs.login.is_some() && !hs.starttls && transport == Transport::StartTls {
                        // The check would send the test password in the clear.
                        return Err(self.err(
                            None,
                            field("health.starttls"),
                            "a check with login_user must use STARTTLS on a starttls backend",
                        ));
                    }
                    hs
                }
            };
            out.insert(
                name.clone(),
                Arc::new(Backend {
                    host_key: b.host_key.clone().unwrap_or_else(|| name.clone()),
                    name,
                    dynamic: false,
                    protocol,
                    weight,
                    state,
                    max_sessions: b.max_sessions.unwrap_or(0),
                    health,
                    address,
                    host,
                    transport,
                    tls_server_name,
                    tls_verify: b.tls_verify.unwrap_or(true),
                    tls_ca_file: self.ca_file(&b.tls_ca_file, &field("tls_ca_file"))?,
                    client_address,
                    login,
                }),
            );
        }
        Ok(out)
    }

    fn pools(
        &self,
        ps: &[file::PoolFile],
        backends: &HashMap<String, Arc<Backend>>,
    ) -> Result<HashMap<String, Arc<Pool>>, ConfigError> {
        let mut out = HashMap::new();
        for (i, p) in ps.iter().enumerate() {
            let name = p.name.get_ref().clone();
            if name.is_empty() || out.contains_key(&name) || backends.contains_key(&name) {
                return Err(self.err(
                    Some(p.name.span()),
                    format!("pool[{i}].name"),
                    format!("{name:?} is empty or already names a pool or backend"),
                ));
            }
            let mut members = Vec::new();
            for b in p.backends.get_ref() {
                let backend = backends.get(b).ok_or_else(|| {
                    self.err(Some(p.backends.span()), format!("pool[{i}].backends"), format!("unknown backend {b:?}"))
                })?;
                if members.iter().any(|m: &Arc<Backend>| m.name == *b) {
                    return Err(self.err(
                        Some(p.backends.span()),
                        format!("pool[{i}].backends"),
                        format!("{b:?} listed twice"),
                    ));
                }
                // host_key ties one host's IMAP, POP3 and SMTP backends together; two backends
                // of one protocol with the same key would hash alike, and one would get no users.
                if let Some(m) =
                    members.iter().find(|m| m.host_key == backend.host_key && m.protocol == backend.protocol)
                {
                    return Err(self.err(
                        Some(p.backends.span()),
                        format!("pool[{i}].backends"),
                        format!(
                            "{:?} and {b:?} share host_key {:?} and a protocol: one would never get a user",
                            m.name, backend.host_key
                        ),
                    ));
                }
                members.push(backend.clone());
            }
            if members.is_empty() {
                return Err(self.err(Some(p.backends.span()), format!("pool[{i}].backends"), "a pool needs backends"));
            }
            out.insert(name.clone(), Arc::new(Pool { name, backends: members, failover: p.failover.unwrap_or(true) }));
        }
        Ok(out)
    }

    fn routing(
        &self,
        r: &file::RoutingFile,
        backends: &HashMap<String, Arc<Backend>>,
        pools: &HashMap<String, Arc<Pool>>,
        rule: &UserRule,
    ) -> Result<Routing, ConfigError> {
        let table = |protocol: Option<Protocol>,
                     default: &Option<Spanned<String>>,
                     domains: &std::collections::BTreeMap<String, Spanned<String>>,
                     users: &std::collections::BTreeMap<String, Spanned<String>>|
         -> Result<RouteTable, ConfigError> {
            let prefix = match protocol {
                Some(p) => format!("routing.{}", p.as_str()),
                None => "routing".to_string(),
            };
            let lookup = |s: &Spanned<String>, field: String| -> Result<Target, ConfigError> {
                let name = s.get_ref();
                let target = match (pools.get(name), backends.get(name)) {
                    (Some(p), _) => Target::Pool(p.clone()),
                    (None, Some(b)) => Target::Backend(b.clone()),
                    (None, None) => {
                        return Err(self.err(Some(s.span()), field, format!("unknown pool or backend {name:?}")));
                    }
                };
                if let Some(p) = protocol
                    && !target.serves(p)
                {
                    return Err(self.err(Some(s.span()), field, format!("{name:?} has no {} backend", p.as_str())));
                }
                Ok(target)
            };
            let mut t = RouteTable::default();
            if let Some(d) = default {
                t.default = Some(lookup(d, format!("{prefix}.default"))?);
            }
            for (domain, target) in domains {
                let field = format!("{prefix}.domains.{domain}");
                let d = match domain.strip_prefix("*.") {
                    Some(parent) => canonical_domain(parent).map(|p| format!("*.{p}")),
                    None => canonical_domain(domain),
                }
                .unwrap_or_default();
                let bare = d.strip_prefix("*.").unwrap_or(&d);
                if bare.is_empty() || !bare.split('.').all(valid_label) {
                    return Err(self.err(
                        Some(target.span()),
                        field,
                        format!("{domain:?} is not a domain or *.domain"),
                    ));
                }
                let tgt = lookup(target, field.clone())?;
                let previous = match d.strip_prefix("*.") {
                    Some(parent) => t.wildcards.insert(parent.to_string(), tgt),
                    None => t.domains.insert(d.clone(), tgt),
                };
                if previous.is_some() {
                    // `Example.org` and `example.org`, or an IDN in both forms: one would win.
                    return Err(self.err(
                        Some(target.span()),
                        field,
                        format!("{domain:?} is the same domain as another key ({d:?})"),
                    ));
                }
            }
            for (user, target) in users {
                let field = format!("{prefix}.users.{user}");
                let canonical = rule.canonical(user).ok_or_else(|| {
                    self.err(Some(target.span()), field.clone(), format!("{user:?} is not a user name"))
                })?;
                if t.users.contains_key(&canonical) {
                    // Two keys for one user (`Alice@` and `alice@`): one would silently win.
                    return Err(self.err(
                        Some(target.span()),
                        field,
                        format!("{user:?} is the same user as another key ({canonical:?})"),
                    ));
                }
                t.users.insert(canonical, lookup(target, field)?);
            }
            Ok(t)
        };
        let shared = table(None, &r.default, &r.domains, &r.users)?;
        let mut tables = HashMap::new();
        for (protocol, t) in [(Protocol::Imap, &r.imap), (Protocol::Pop3, &r.pop3), (Protocol::Smtp, &r.smtp)] {
            if let Some(t) = t {
                let built = table(Some(protocol), &t.default, &t.domains, &t.users)?;
                if !built.is_empty() {
                    tables.insert(protocol, built);
                }
            }
        }
        Ok(Routing { shared, tables })
    }
}

/// The kernel's host name, or "localhost".
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty() && h.split('.').all(valid_label))
        .unwrap_or_else(|| "localhost".into())
}

fn valid_label(l: &str) -> bool {
    !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The host part of `host:port` or `[v6]:port`, if the port is a number other than 0 (which
/// no connection can reach).
fn split_host_port(s: &str) -> Option<String> {
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    // An IPv6 address goes in brackets: `fd00::11` would read as host `fd00:`, port 11.
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/portcullis/p.toml"), text)
    }

    const BASE: &str = r#"
[auth]
source = "backend"

[[backend]]
name = "b"
address = "127.0.0.1:143"

[routing.imap]
default = "b"
"#;

    /// Names an auth service's answers make (`dynamic`, `host:port`) are not a configured
    /// backend's: one would take the other's health record, sessions and TLS settings.
    #[test]
    fn backend_names_of_the_auth_services_forms_are_refused() {
        for name in ["dynamic", "10.0.0.11:143", "mail.example.org:993", "[2001:db8::1]:143"] {
            let text = BASE
                .replace("name = \"b\"", &format!("name = \"{name}\""))
                .replace("default = \"b\"", &format!("default = \"{name}\""));
            let e = parse(&text).unwrap_err();
            assert_eq!((e.field.as_str(), e.position.is_some()), ("backend[0].name", true), "{name}: {e}");
        }
        for name in ["mail1", "mail:one", "fd00::11"] {
            let text = BASE
                .replace("name = \"b\"", &format!("name = \"{name}\""))
                .replace("default = \"b\"", &format!("default = \"{name}\""));
            assert!(parse(&text).is_ok(), "{name}");
        }
    }

    /// BASE with the auth service as the password source, and `body` as its `[auth.http]` table.
    fn with_auth_http(body: &str) -> String {
        format!("{BASE}\n[auth.http]\n{body}\n").replace("source = \"backend\"", "source = \"http\"")
    }

    fn with_listener(listener: &str) -> String {
        format!("{BASE}\n[[listener]]\n{listener}\n")
    }

    /// Reliability case 43: routing keys and the default domain in any IDN form are one domain.
    #[test]
    fn internationalised_domains_in_routing() {
        let c = parse(&BASE.replace(
            "[routing.imap]\ndefault = \"b\"",
            "[users]\ndefault_domain = \"Bücher.example\"\n[routing.imap]\ndefault = \"b\"\ndomains = { \"*.Bücher.example\" = \"b\", \"müller.test\" = \"b\" }",
        ))
        .unwrap();
        assert_eq!(c.users.default_domain.as_deref(), Some("xn--bcher-kva.example"));
        let t = &c.routing.tables[&Protocol::Imap];
        assert!(t.domains.contains_key("xn--mller-kva.test"), "{:?}", t.domains.keys());
        assert!(t.wildcards.contains_key("xn--bcher-kva.example"));
        let e = parse(&BASE.replace(
            "[routing.imap]\ndefault = \"b\"",
            "[routing.imap]\ndefault = \"b\"\nusers = { \"jo@bücher.example\" = \"b\", \"jo@xn--bcher-kva.example\" = \"b\" }",
        ))
        .unwrap_err();
        assert!(e.message.contains("same user"), "{e}");
        let e = parse(&BASE.replace(
            "default = \"b\"",
            "default = \"b\"\ndomains = { \"bücher.example\" = \"b\", \"XN--BCHER-KVA.example\" = \"b\" }",
        ))
        .unwrap_err();
        assert!(e.message.contains("same domain"), "{e}");
        let e = parse(&BASE.replace("default = \"b\"", "default = \"b\"\ndomains = { \"xn--zz.test\" = \"b\" }"))
            .unwrap_err();
        assert_eq!(e.field, "routing.imap.domains.xn--zz.test");
    }

    /// `verify_client` and `client_ca_file`: values, combinations and the CA file, each error at
    /// its line and field.
    #[test]
    fn client_certificate_settings() {
        let l =
            |extra: &str| with_listener(&format!("name = \"x\"\nbind = \"127.0.0.1:1\"\nprotocol = \"imap\"\n{extra}"));
        let e = parse(&l("tls = \"implicit\"\nverify_client = \"yes\"")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("listener[0].verify_client", Some(17)));
        let e = parse(&l("tls = \"implicit\"\nverify_client = \"on\"")).unwrap_err();
        assert_eq!(e.field, "listener[0].client_ca_file");
        assert!(e.message.contains("needs client_ca_file"), "{e}");
        let e = parse(&l("tls = \"none\"\nverify_client = \"optional_no_ca\"")).unwrap_err();
        assert_eq!(e.field, "listener[0].verify_client");
        let e = parse(&l("tls = \"implicit\"\nclient_ca_file = \"ca.pem\"")).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("listener[0].client_ca_file", "only used with verify_client")
        );
        // Relative to the config file's directory, and read now.
        let e = parse(&l("tls = \"implicit\"\nverify_client = \"on\"\nclient_ca_file = \"ca.pem\"")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("listener[0].client_ca_file", Some(18)));
        assert!(e.message.contains("/etc/portcullis/ca.pem"), "{e}");
        let c = parse(&l("tls = \"implicit\"\nverify_client = \"optional_no_ca\"")).unwrap();
        assert_eq!(
            (c.listeners[0].client_cert.mode, c.listeners[0].client_cert.ca_file.as_ref()),
            (VerifyClient::OptionalNoCa, None)
        );
        let c = parse(&l("tls = \"starttls\"")).unwrap();
        assert_eq!(c.listeners[0].client_cert, ClientCertSettings::default());
        // Logins before STARTTLS would need no certificate.
        let e = parse(&l("tls = \"starttls\"\nallow_plaintext_auth = true\nverify_client = \"optional_no_ca\""))
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("listener[0].allow_plaintext_auth", Some(18)));
        // Revocation lists need verify_client and a CA file; the file is read now.
        let e = parse(&l("tls = \"implicit\"\nclient_crl_file = \"crl.pem\"")).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("listener[0].client_crl_file", "only used with verify_client")
        );
        let e = parse(&l("tls = \"implicit\"\nverify_client = \"optional_no_ca\"\nclient_crl_file = \"crl.pem\""))
            .unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), ("listener[0].client_crl_file", "needs client_ca_file"));
        let dir = std::env::temp_dir().join(format!("portcullis-model-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let e = parse(&l(&format!(
            "tls = \"implicit\"\nverify_client = \"on\"\nclient_ca_file = \"{}\"\nclient_crl_file = \"{}\"",
            dir.join("ca.pem").display(),
            dir.join("missing.pem").display()
        )))
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("listener[0].client_crl_file", Some(19)));
        assert!(e.message.contains("missing.pem"), "{e}");
        // client_verify_depth: 1 (nginx's default) unless set, 0 to 6, only with a CA file.
        let with_ca = |extra: &str| {
            l(&format!(
                "tls = \"implicit\"\nverify_client = \"on\"\nclient_ca_file = \"{}\"\n{extra}",
                dir.join("ca.pem").display()
            ))
        };
        assert_eq!(parse(&with_ca("")).unwrap().listeners[0].client_cert.verify_depth, 1);
        assert_eq!(parse(&with_ca("client_verify_depth = 0")).unwrap().listeners[0].client_cert.verify_depth, 0);
        assert_eq!(parse(&with_ca("client_verify_depth = 6")).unwrap().listeners[0].client_cert.verify_depth, 6);
        let e = parse(&with_ca("client_verify_depth = 7")).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("listener[0].client_verify_depth", "expected 0 to 6, found 7")
        );
        assert_eq!(e.position.map(|p| p.0), Some(19));
        let e =
            parse(&l("tls = \"implicit\"\nverify_client = \"optional_no_ca\"\nclient_verify_depth = 2")).unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), ("listener[0].client_verify_depth", "needs client_ca_file"));
        assert_eq!(e.position.map(|p| p.0), Some(18));
    }

    /// Two backends of one protocol in a pool may not share a host_key (one would get no users).
    #[test]
    fn a_shared_host_key_within_a_protocol_is_refused() {
        let cfg = |second: &str| {
            format!(
                "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nhost_key = \"h\"\n[[backend]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\nhost_key = \"h\"\n{second}\n[[pool]]\nname = \"p\"\nbackends = [\"a\", \"b\"]\n[routing]\ndefault = \"p\"\n"
            )
        };
        let e = parse(&cfg("")).unwrap_err();
        assert_eq!(e.field, "pool[0].backends");
        assert!(e.message.contains("share host_key"), "{}", e.message);
        assert!(parse(&cfg("protocol = \"pop3\"")).is_ok(), "one host's IMAP and POP3 backends share it");
    }

    /// A health check's test login never goes out in the clear on a STARTTLS backend.
    #[test]
    fn check_login_without_starttls_is_refused() {
        let cfg = |starttls: bool| {
            BASE.replace(
                "address = \"127.0.0.1:143\"",
                &format!(
                    "address = \"127.0.0.1:143\"\ntransport = \"starttls\"\ntls_server_name = \"mail.example.org\"\n[backend.health]\nstarttls = {starttls}\nlogin_user = \"probe\"\nlogin_password = \"pw\""
                ),
            )
        };
        assert!(parse(&cfg(true)).is_ok());
        let e = parse(&cfg(false)).unwrap_err();
        assert_eq!(e.field, "backend[0].health.starttls");
        // An SMTP backend's check never logs in: a login set for it is refused, not ignored.
        let smtp = cfg(true)
            .replace("[backend.health]", "protocol = \"smtp\"\n[backend.health]")
            .replace("[routing.imap]\ndefault = \"b\"", "[routing.smtp]\ndefault = \"b\"");
        assert!(smtp.contains("protocol = \"smtp\"") && smtp.contains("[routing.smtp]"), "{smtp}");
        let e = parse(&smtp).unwrap_err();
        assert_eq!(e.field, "backend[0].health.login_user", "{e}");
    }

    /// Durations that would end everything at once (a zero timeout) or hammer a CA (no retry
    /// backoff) are refused at their line.
    #[test]
    fn zero_timeouts_and_retries_are_refused() {
        let e = parse(&format!("{BASE}\n[limits]\nlogin_timeout = \"0s\"\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), ("limits.login_timeout", "must be at least 1ms"));
        assert!(e.position.is_some());
        for field in ["tls_handshake_timeout", "idle_timeout", "backend_connect_timeout", "command_timeout"] {
            let e = parse(&format!("{BASE}\n[limits]\n{field} = \"0s\"\n")).unwrap_err();
            assert_eq!(e.field, format!("limits.{field}"));
        }
        let ok = parse(&format!("{BASE}\n[limits]\nlogin_timeout = \"20s\"\n")).unwrap();
        assert_eq!(ok.limits.login_timeout, Duration::from_secs(20));
        let acme = |retry: &str| {
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\nstate_dir = \"/var/lib/p\"\nretry_min = \"{retry}\"\n[[acme.certificate]]\nnames = [\"mail.example.org\"]\n"
            ))
        };
        let e = acme("0s").unwrap_err();
        assert_eq!((e.field.as_str(), e.message.as_str()), ("acme.retry_min", "must be at least 1s"));
        assert_eq!(acme("5m").unwrap().acme.unwrap().retry_min, Duration::from_secs(300));
        let e = acme("1d").unwrap_err();
        assert_eq!(e.field, "acme.retry_min", "{e}");
        assert!(e.message.contains("at most 6h"), "{e}");
        assert_eq!(acme("6h").unwrap().acme.unwrap().retry_min, Duration::from_secs(6 * 3600));
    }

    /// TCP keepalive: on by default, 0 turns it off, and what the kernel cannot take (under a
    /// second, over MAX_TCP_KEEPIDLE) is refused at its line.
    #[test]
    fn tcp_keepalive_is_on_by_default_and_bounded() {
        assert_eq!(parse(BASE).unwrap().limits.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
        let with = |v: &str| parse(&format!("{BASE}\n[limits]\ntcp_keepalive = \"{v}\"\n"));
        assert_eq!(with("0s").unwrap().limits.tcp_keepalive, None);
        assert!(with("0s").unwrap().limits.tcp_keepalive().is_none());
        assert_eq!(with("90s").unwrap().limits.tcp_keepalive, Some(Duration::from_secs(90)));
        assert_eq!(with("32767s").unwrap().limits.tcp_keepalive, Some(MAX_TCP_KEEPALIVE));
        for bad in ["500ms", "32768s", "1day"] {
            let e = with(bad).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.message.as_str()),
                ("limits.tcp_keepalive", "must be 0 (off) or from 1s to 32767s"),
                "{bad}"
            );
            assert!(e.position.is_some_and(|p| p.0 > 1), "{bad}: {e}");
        }
    }

    /// A duration meant as "never" (hundreds of billions of years) used to pass and then panic
    /// when the runtime added it to the clock. Every duration, checked or not, is capped.
    #[test]
    fn absurdly_long_durations_are_refused_at_their_line() {
        for (table, key) in [
            ("limits", "idle_timeout"),
            ("limits", "max_session_duration"),
            ("limits", "auth_failure_delay"),
            ("throttle", "cooldown"),
            ("throttle", "window"),
        ] {
            let e = parse(&format!("{BASE}\n[{table}]\n{key} = \"500000000000years\"\n")).unwrap_err();
            assert_eq!(e.field, format!("{table}.{key}"), "{e}");
            assert_eq!(e.message, "invalid value: duration, expected a duration of at most 10 years", "{e}");
            assert_eq!(e.position.map(|p| p.0), Some(13), "{e}");
        }
        let ok = parse(&format!("{BASE}\n[limits]\nidle_timeout = \"10years\"\n")).unwrap();
        assert!(ok.limits.idle_timeout > Duration::from_secs(315_000_000));
    }

    #[test]
    fn check_catches_what_run_would_only_find_later() {
        // A log filter that would silently fall back to errors only (and hide fail2ban's lines).
        let e = parse(&format!("{BASE}\n[log]\nlevel = \"portcullis=verbose\"\n")).unwrap_err();
        assert_eq!(e.field, "log.level", "{e}");
        assert!(e.position.is_some());
        assert_eq!(
            parse(&format!("{BASE}\n[log]\nlevel = \"info,portcullis=debug\"\n")).unwrap().log_level.as_deref(),
            Some("info,portcullis=debug")
        );
        // The field that is 0 is the one named.
        let e = parse(&format!("{BASE}\n[throttle]\nuser_block_after = 0\n")).unwrap_err();
        assert_eq!(e.field, "throttle.user_block_after");
        // An auth service URL with credentials in it: refused, and not echoed.
        let e = parse(&with_auth_http("urls = [\"https://svc:s3cret@auth.example/\"]")).unwrap_err();
        assert_eq!(e.field, "auth.http.urls", "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        // Also when the URL does not parse.
        let e = parse(&with_auth_http("urls = [\"https://svc:p{ss@auth.example/\"]")).unwrap_err();
        assert!(!e.to_string().contains("p{ss"), "{e}");
        // A port that is not one would go to 80 or 443 unsaid.
        for url in ["http://127.0.0.1:90000/auth", "http://auth:8o80/", "http://auth:0/", "http://[::1]:x/"] {
            let e = parse(&with_auth_http(&format!("urls = [\"{url}\"]"))).unwrap_err();
            assert_eq!(e.field, "auth.http.urls", "{url}: {e}");
        }
        for url in ["http://127.0.0.1:9000/auth", "https://[::1]:8443/", "http://[::1]/", "https://auth.example/"] {
            assert!(parse(&with_auth_http(&format!("urls = [\"{url}\"]"))).is_ok(), "{url}");
        }
        // An empty log filter would run at errors only.
        assert_eq!(parse(&format!("{BASE}\n[log]\nlevel = \",\"\n")).unwrap_err().field, "log.level");
        // A DNS-01 hook that is not there, and an ACME CA file that is not there.
        let acme = |extra: &str| {
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\nstate_dir = \"/var/lib/p\"\n{extra}\n[[acme.certificate]]\nnames = [\"mail.example.org\"]\n"
            ))
        };
        let e = acme("challenge = \"dns-01\"\ndns01_hook = \"/nonexistent/hook\"").unwrap_err();
        assert_eq!(e.field, "acme.dns01_hook", "{e}");
        assert!(e.position.is_some());
        let e = acme("ca_file = \"/nonexistent/ca.pem\"").unwrap_err();
        assert_eq!(e.field, "acme.ca_file", "{e}");
    }

    #[test]
    fn errors_about_values_without_a_span_still_name_their_line() {
        let e = parse(&format!("{BASE}\n[throttle]\npenalty_after = 3\nuser_block_after = 0\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("throttle.user_block_after", Some(14)), "{e}");
        let e = parse(&format!("{BASE}\n[users]\n\nstrip_default_domain = true\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("users.strip_default_domain", Some(14)), "{e}");
    }

    /// Settings that would be read and never used, or quietly changed, are refused where they
    /// are written: TLS settings on a plain backend (its passwords would go in the clear), a
    /// users file beside an auth service (never loaded: a user taken out would still log in), a
    /// line limit no host could give every connection, throttle values that mean nothing.
    #[test]
    fn settings_that_would_do_nothing_are_refused_at_their_line() {
        let backend = |extra: &str| {
            BASE.replace("address = \"127.0.0.1:143\"\n", &format!("address = \"127.0.0.1:143\"\n{extra}\n"))
        };
        for (extra, key) in [
            ("tls_ca_file = \"ca.pem\"", "tls_ca_file"),
            ("tls_server_name = \"imap.internal\"", "tls_server_name"),
            ("tls_verify = true", "tls_verify"),
            ("transport = \"plain\"\ntls_verify = false", "tls_verify"),
        ] {
            let e = parse(&backend(extra)).unwrap_err();
            assert_eq!(e.field, format!("backend[0].{key}"), "{e}");
            assert_eq!(e.position.map(|p| p.0), Some(if extra.starts_with("transport") { 9 } else { 8 }), "{e}");
            assert!(e.message.contains("only used with transport"), "{e}");
        }
        assert!(parse(&backend("transport = \"tls\"\ntls_server_name = \"imap.internal\"")).is_ok());
        // A CA file that tls_verify = false makes unused.
        let e = parse(&backend("transport = \"tls\"\ntls_verify = false\ntls_ca_file = \"ca.pem\"")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("backend[0].tls_ca_file", Some(10)), "{e}");
        // A port no connection can reach.
        let e = parse(&BASE.replace("127.0.0.1:143", "127.0.0.1:0")).unwrap_err();
        assert_eq!(e.field, "backend[0].address", "{e}");

        let e = parse(&format!("{BASE}\n[limits]\nmax_line_length = 4000000000\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("limits.max_line_length", Some(13)), "{e}");
        assert!(parse(&format!("{BASE}\n[limits]\nmax_line_length = 1048576\n")).is_ok());

        let text = with_auth_http("urls = [\"http://127.0.0.1:9000/auth\"]")
            .replace("[auth]\n", "[auth]\npasswd_file = \"users\"\n");
        let e = parse(&text).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("auth.passwd_file", Some(3)), "{e}");

        for (throttle, key) in [
            ("max_entries = 5", "throttle.max_entries"),
            ("penalty_base = \"1h\"\npenalty_max = \"1s\"", "throttle.penalty_base"),
        ] {
            assert!(parse(&format!("{BASE}\n[throttle]\npenalty_max = \"1s\"\n")).is_ok());
            // Above the default penalty_max (15 s): never seen either.
            let e = parse(&format!("{BASE}\n[throttle]\npenalty_base = \"30s\"\n")).unwrap_err();
            assert_eq!(e.field, "throttle.penalty_base", "{e}");
            let e = parse(&format!("{BASE}\n[throttle]\n{throttle}\n")).unwrap_err();
            assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), (key, Some(13)), "{e}");
        }

        // Named by the key that is wrong (or that is there), so the line is its own, not the
        // table's.
        for (health, key, line) in [
            ("interval = \"10s\"\nrise = 0", "backend[0].health.rise", 10),
            ("login_password = \"x\"", "backend[0].health.login_password", 9),
        ] {
            let e = parse(&backend(&format!("[backend.health]\n{health}"))).unwrap_err();
            assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), (key, Some(line)), "{e}");
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_shown() {
        // It may be a secret; the key is named instead.
        let e = parse(&format!("{BASE}\n[admin]\nbind = 20240611\n")).unwrap_err();
        assert_eq!(e.field, "admin.bind", "{e}");
        assert!(!e.to_string().contains("20240611"), "{e}");
        assert!(e.message.starts_with("invalid type: integer, expected"), "{e}");
        assert!(e.position.is_some());
        // A string where a list is expected: not shown either.
        let text = with_auth_http("urls = \"https://svc:s3cret@auth.example/\"");
        let e = parse(&text).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert_eq!(e.field, "auth.http.urls", "{e}");
    }

    #[test]
    fn a_name_is_in_one_acme_certificate_per_key_type() {
        let acme = |second: &str, key_type: &str| {
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\nstate_dir = \"/var/lib/p\"\n[[acme.certificate]]\nnames = [\"mail.example.org\", \"imap.example.org\"]\n[[acme.certificate]]\nnames = {second}\nkey_type = \"{key_type}\"\n"
            ))
        };
        // Two ECDSA certificates for one host: only one would ever be served.
        let e = acme("[\"pop.example.org\", \"Mail.example.org\"]", "ecdsa-p256").unwrap_err();
        assert_eq!(e.field, "acme.certificate[1].names");
        assert!(
            e.message.contains("\"mail.example.org\" is already listed in acme.certificate[0], with the same key_type"),
            "{e}"
        );
        assert!(e.position.is_some());
        // An ECDSA and an RSA one: both served, each to the clients that can use it. The RSA one
        // has a label of its own where the first names are the same.
        let pair = acme("[\"Mail.example.org\", \"imap.example.org\"]", "rsa-2048").unwrap().acme.unwrap();
        let labels: Vec<&str> = pair.certificates.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["mail.example.org", "mail.example.org+rsa"]);
        let other_first = acme("[\"imap.example.org\", \"mail.example.org\"]", "rsa-2048").unwrap().acme.unwrap();
        assert_eq!(other_first.certificates[1].label, "imap.example.org");
        let once = acme("[\"pop.example.org\", \"POP.example.org\"]", "rsa-2048").unwrap().acme.unwrap();
        assert_eq!(once.certificates[1].names, ["pop.example.org"]);
        let ok = acme("[\"pop.example.org\"]", "ecdsa-p256").unwrap().acme.unwrap();
        assert_eq!(ok.certificates.len(), 2);
    }

    /// Another challenge's settings, or a responder's beside a webroot, would be read and never
    /// used; an `[acme]` without certificates orders nothing. Refused at their lines.
    #[test]
    fn acme_settings_that_would_do_nothing_are_refused() {
        let acme = |body: &str, cert: bool| {
            let cert = if cert { "[[acme.certificate]]\nnames = [\"mail.example.org\"]\n" } else { "" };
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\nstate_dir = \"/var/lib/p\"\n{body}\n{cert}"
            ))
        };
        for (body, key, line) in [
            ("http01_webroot = \"/srv/www\"\nhttp01_bind = \"127.0.0.1:80\"", "acme.http01_bind", 17),
            ("tls_alpn01_bind = \"127.0.0.1:443\"", "acme.tls_alpn01_bind", 16),
            ("challenge = \"tls-alpn-01\"\nhttp01_bind = \"127.0.0.1:80\"", "acme.http01_bind", 17),
            ("dns01_propagation = \"10s\"", "acme.dns01_propagation", 16),
        ] {
            let e = acme(body, true).unwrap_err();
            assert_eq!(e.field, key, "{e}");
            assert!(e.message.starts_with("not used with"), "{e}");
            assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        }
        let e = acme("", false).unwrap_err();
        assert_eq!(e.field, "acme", "{e}");
        assert!(acme("http01_bind = \"127.0.0.1:80\"", true).is_ok());
    }

    #[test]
    fn acme_wildcards_need_dns01() {
        let acme = |challenge: &str| {
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\nstate_dir = \"/var/lib/p\"\n{challenge}\n[[acme.certificate]]\nnames = [\"example.org\", \"*.example.org\"]\n"
            ))
        };
        for challenge in ["", "challenge = \"http-01\"", "challenge = \"tls-alpn-01\""] {
            let e = acme(challenge).unwrap_err();
            assert_eq!(e.field, "acme.certificate[0].names", "{e}");
            assert!(e.message.contains("dns-01"), "{e}");
            assert!(e.position.is_some());
        }
        let ok = acme("challenge = \"dns-01\"\ndns01_hook = \"/bin/true\"").unwrap().acme.unwrap();
        assert_eq!(ok.certificates[0].names, ["example.org", "*.example.org"]);
    }

    #[test]
    fn errors_inside_arrays_of_tables_and_inline_tables_name_their_line() {
        let second = "\n[[backend]]\nname = \"c\"\naddress = \"127.0.0.1:144\"\n";
        let text = format!("{BASE}{second}[backend.health]\nfall = 0\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "backend[1].health.fall", "{e}");
        let want = text.lines().position(|l| l == "fall = 0").map(|i| i + 1);
        assert_eq!(e.position.map(|p| p.0), want, "{e}");
        let text = format!("{BASE}{second}health = {{ fall = 0 }}\n");
        let e = parse(&text).unwrap_err();
        let want = text.lines().position(|l| l.starts_with("health =")).map(|i| i + 1);
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("backend[1].health.fall", want), "{e}");
    }

    /// A connection accepted by the loop of listener `a` on a socket listener `b` now has (a
    /// reload renamed `a` to `b` and added another `a` elsewhere) goes by `b`'s settings.
    #[test]
    fn a_connection_goes_by_the_listener_bound_where_it_was_accepted() {
        let c = parse(&format!(
            "{BASE}\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:10143\"\nprotocol = \"imap\"\ntls = \"none\"\n\
             \n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:10144\"\nprotocol = \"imap\"\ntls = \"none\"\n"
        ))
        .unwrap();
        let on = |name: &str, port: u16| {
            c.listener_on(name, Some(SocketAddr::from(([127, 0, 0, 1], port)))).map(|l| l.name.clone())
        };
        assert_eq!(on("a", 10144).as_deref(), Some("b"));
        assert_eq!(on("a", 10143).as_deref(), Some("a"));
        // An address no listener names (a port-0 bind): by name.
        assert_eq!(on("b", 40000).as_deref(), Some("b"));
        assert_eq!(on("gone", 40000), None);
    }

    #[test]
    fn addresses_that_cannot_all_listen_are_refused_by_check() {
        let listeners = |binds: &[&str]| {
            let mut t = BASE.to_string();
            for (i, b) in binds.iter().enumerate() {
                t.push_str(&format!(
                    "\n[[listener]]\nname = \"l{i}\"\nbind = {b}\nprotocol = \"imap\"\ntls = \"none\"\n"
                ));
            }
            t
        };
        for binds in [
            &["\"0.0.0.0:10993\"", "\"127.0.0.1:10993\""][..],
            &["[\"0.0.0.0:10110\", \"127.0.0.1:10110\"]"],
            // `[::]` alone is dual-stack: it takes IPv4 127.0.0.1 as well.
            &["\"[::]:10110\"", "\"127.0.0.1:10110\""],
            &["\"[::]:10110\"", "\"[::1]:10110\""],
        ] {
            let e = parse(&listeners(binds)).unwrap_err();
            assert!(e.field.ends_with(".bind") && e.message.contains("overlap"), "{binds:?}: {e}");
            assert!(e.position.is_some(), "{e}");
        }
        // The usual pair, and ports that differ, are fine.
        parse(&listeners(&["[\"0.0.0.0:993\", \"[::]:993\"]", "\"127.0.0.1:995\""])).unwrap();
        // The admin server on a listener's address; or on `[::]` (dual-stack: it is not paired
        // as listeners are) beside a listener's `0.0.0.0`.
        for admin in ["127.0.0.1:10993", "[::]:10993"] {
            let e =
                parse(&format!("{}\n[admin]\nbind = \"{admin}\"\n", listeners(&["\"0.0.0.0:10993\""]))).unwrap_err();
            assert_eq!(e.field, "admin.bind", "{e}");
        }
    }

    /// Keys and tables are found from the parsed file, so text that only looks like them (in
    /// comments, multi-line strings, quoted keys) does not move an error's line or name.
    #[test]
    fn keys_are_found_where_the_toml_parser_puts_them() {
        let text = r#"# [limits]
# login_timeout = 1
[server]
hostname = """
[limits]
login_timeout = 2
"""
[[backend]]
name = "a"
health = { enabled = false, fall = 3 }
[[backend]]
name = "b"
"quoted.key" = 1
[backend.health]
rise = 2
[limits]
login_timeout = "5s"
"#;
        let v = Validator { path: Path::new("p.toml"), text };
        let line_of = |needle: &str| text.lines().position(|l| l == needle).map(|i| i + 1);
        let at = |needle: &str| text.find(needle).unwrap_or(usize::MAX);
        assert_eq!(v.find_field("limits.login_timeout"), line_of("login_timeout = \"5s\"").map(|l| (l, 1)));
        assert_eq!(v.find_field("backend[1].health.rise"), line_of("rise = 2").map(|l| (l, 1)));
        // Not written out: the table's header.
        assert_eq!(v.find_field("backend[1].health.fall"), line_of("[backend.health]").map(|l| (l, 1)));
        assert_eq!(v.find_field("backend[1].port"), line_of("[[backend]]").map(|l| (l + 3, 1)));
        assert_eq!(
            v.find_field("backend[0].health.fall").map(|p| p.0),
            line_of("health = { enabled = false, fall = 3 }")
        );
        assert_eq!(v.find_field("backend[1].quoted.key").map(|p| p.0), line_of("\"quoted.key\" = 1"));
        assert_eq!(v.key_at(at("fall = 3") + 7).as_deref(), Some("backend[0].health.fall"));
        assert_eq!(v.key_at(at("login_timeout = 2")).as_deref(), Some("server.hostname"));
        assert_eq!(v.key_at(at("# login_timeout")), None);
        assert_eq!(v.key_at(at("[backend.health]")), None);
        // A key given twice is named in the table it was given twice in.
        let text = "[[backend]]\nname = \"a\"\n[[backend]]\nname = \"b\"\nname = \"c\"\n";
        let v = Validator { path: Path::new("p.toml"), text };
        assert_eq!(v.key_at(text.rfind("name").unwrap_or(0)).as_deref(), Some("backend[1].name"));
    }

    #[test]
    fn a_key_is_named_from_the_line_that_opened_its_value() {
        // A bad element on a continuation line of a multi-line array: the key named is the
        // array's, and nothing of the value (here a URL with a token) is shown.
        let text = with_auth_http("urls = [\n  \"https://auth.example/?token=S3cr3t\", 5,\n]");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "auth.http.urls", "{e}");
        assert!(!e.to_string().contains("S3cr3t") && !e.to_string().contains("token"), "{e}");
        // A dotted key is its table's key.
        let e = parse(&format!("limits.idle_timeout = 5\n{BASE}")).unwrap_err();
        assert_eq!(e.field, "limits.idle_timeout", "{e}");
        // A scheme in capitals is still mailto:.
        parse(&format!(
            "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\ncontact = [\"MAILTO:postmaster@example.org\"]\nstate_dir = \"/var/lib/p\"\n[[acme.certificate]]\nnames = [\"mail.example.org\"]\n"
        ))
        .unwrap();
    }

    #[test]
    fn more_values_that_used_to_pass() {
        let e = parse(&format!("{BASE}\n[throttle]\nwindow = \"0s\"\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.is_some()), ("throttle.window", true), "{e}");
        parse(&format!("{BASE}\n[throttle]\nenabled = false\nwindow = \"0s\"\n")).unwrap();
        let e = parse(&format!("{BASE}\n[tls]\nself_signed_names = [\"mail example org\"]\n")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.is_some()), ("tls.self_signed_names", true), "{e}");
        parse(&format!(
            "{BASE}\n[tls]\nself_signed_names = [\"mail.example.org\", \"*.example.org\", \"127.0.0.1\"]\n"
        ))
        .unwrap();
        // Two defaults parse: one per key type is allowed, which only the store, reading the
        // keys, can check (tls::certs::tests::one_certificate_per_name_and_key_type).
        let two = "[tls]\n[[tls.certificate]]\ncert = \"/nonexistent/a.pem\"\nkey = \"/nonexistent/a.key\"\ndefault = true\n[[tls.certificate]]\ncert = \"/nonexistent/b.pem\"\nkey = \"/nonexistent/b.key\"\ndefault = true\n";
        let tls = parse(&format!("{BASE}\n{two}")).unwrap().tls;
        assert!(tls.certificates.iter().all(|c| c.default));
    }

    #[test]
    fn values_check_used_to_pass_that_fail_at_run_time() {
        // An IPv6 backend without brackets would be host "fd00:", port 11.
        let e = parse(&BASE.replace("127.0.0.1:143", "fd00::11")).unwrap_err();
        assert_eq!(e.field, "backend[0].address", "{e}");
        parse(&BASE.replace("127.0.0.1:143", "[fd00::11]:143")).unwrap();
        // An ACME contact must be a URL.
        let acme = |contact: &str| {
            parse(&format!(
                "{BASE}\n[acme]\ndirectory = \"https://acme.example/dir\"\nterms_agreed = true\ncontact = [\"{contact}\"]\nstate_dir = \"/var/lib/p\"\n[[acme.certificate]]\nnames = [\"mail.example.org\"]\n"
            ))
        };
        let e = acme("postmaster@example.org").unwrap_err();
        assert_eq!(e.field, "acme.contact", "{e}");
        assert!(e.position.is_some(), "{e}");
        acme("mailto:postmaster@example.org").unwrap();
        // A zero auth service timeout would fail every login.
        let http = |timeout: &str| {
            parse(&with_auth_http(&format!("urls = [\"http://127.0.0.1:9000/auth\"]\ntimeout = \"{timeout}\"")))
        };
        let e = http("0s").unwrap_err();
        assert_eq!(e.field, "auth.http.timeout", "{e}");
        assert!(e.position.is_some(), "{e}");
        http("2s").unwrap();
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = parse(&with_listener("name = \"x\"\nbind = \"127.0.0.1:1\"\nprotocol = \"imap\"\ntls = \"maybe\""))
            .unwrap_err();
        assert_eq!(e.file, Path::new("/etc/portcullis/p.toml"));
        assert_eq!(e.field, "listener[0].tls");
        assert_eq!(e.position.map(|p| p.0), Some(16));
        assert!(e.to_string().starts_with("/etc/portcullis/p.toml:16:7: field `listener[0].tls`"), "{e}");

        let e =
            parse(&with_listener("name = \"x\"\nbind = \"nowhere\"\nprotocol = \"imap\"\ntls = \"none\"")).unwrap_err();
        assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("listener[0].bind", Some(14)));

        // Unknown keys are errors, with their name.
        let e = parse(&with_listener(
            "name = \"x\"\nbind = \"127.0.0.1:1\"\nprotocol = \"imap\"\ntls = \"none\"\nallow_plain = true",
        ))
        .unwrap_err();
        assert_eq!(e.field, "allow_plain");
        assert_eq!(e.position.map(|p| p.0), Some(17));

        // Syntax errors carry a position too, and name no token as the field.
        let e = parse("[[listener]\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(1));
        assert_eq!(e.field, "-", "{e}");
        // A key given twice, or a value of no accepted shape: named in full.
        let e = parse(&BASE.replace("name = \"b\"", "name = \"b\"\nname = \"c\"")).unwrap_err();
        assert_eq!(e.field, "backend[0].name", "{e}");
        let e = parse(&with_listener("name = \"x\"\nbind = 10110\nprotocol = \"imap\"\ntls = \"none\"")).unwrap_err();
        assert_eq!(e.field, "listener[0].bind", "{e}");
        assert!(e.message.contains("IP:port") && !e.message.contains("enum"), "{e}");

        let e = parse(&BASE.replace("default = \"b\"", "default = \"nope\"")).unwrap_err();
        assert_eq!(e.field, "routing.imap.default");
        assert!(e.message.contains("unknown pool or backend"));

        let e = parse(&BASE.replace("127.0.0.1:143", "127.0.0.1")).unwrap_err();
        assert_eq!(e.field, "backend[0].address");
        // Two routing keys for one canonical user (reliability case 43): refused, not one winning.
        let e = parse(&BASE.replace(
            "[routing.imap]",
            "[routing.imap]\nusers = { \"Alice@example.org\" = \"b\", \"alice@example.org\" = \"b\" }",
        ))
        .unwrap_err();
        assert!(e.field.starts_with("routing.imap.users."), "{e}");
        assert!(e.message.contains("same user"), "{e}");
        let e = parse(&format!("{BASE}\n[limits]\nsmtp_greeting_delay = \"5m\"\n")).unwrap_err();
        assert_eq!(e.field, "limits.smtp_greeting_delay");
        assert!(e.message.contains("shorter than limits.login_timeout (3m)"), "{e}");
        assert!(e.position.is_some(), "{e}");
        parse(&format!("{BASE}\n[limits]\nsmtp_greeting_delay = \"5s\"\n")).unwrap();
        for wildcard in ["0.0.0.0:143", "[::]:143", "[::ffff:0.0.0.0]:143"] {
            let e = parse(&BASE.replace("127.0.0.1:143", wildcard)).unwrap_err();
            assert_eq!(e.field, "backend[0].address", "{wildcard}");
            assert!(e.message.contains("names no host"), "{e}");
        }

        let e = parse(&BASE.replace("name = \"b\"", "name = \"b\"\nlogin = \"master\"")).unwrap_err();
        assert_eq!(e.field, "backend[0].master_user");
        let e =
            parse(&BASE.replace(
                "name = \"b\"",
                "name = \"b\"\nlogin = \"master\"\nmaster_user = \"m\"\nmaster_password = \"\"",
            ))
            .unwrap_err();
        assert_eq!(e.field, "backend[0].master_user");
        // Master credentials without login = "master": the clients' passwords would be replayed.
        for extra in ["master_user = \"m\"\nmaster_password = \"p\"", "master_password = \"p\""] {
            let e = parse(&BASE.replace("name = \"b\"", &format!("name = \"b\"\n{extra}"))).unwrap_err();
            assert!(e.field.starts_with("backend[0].master_"), "{e}");
            assert!(e.message.contains("only used with login"), "{e}");
            assert!(e.position.is_some(), "{e}");
        }
        let e = parse(
            &BASE.replace("name = \"b\"", "name = \"dynamic\"").replace("default = \"b\"", "default = \"dynamic\""),
        )
        .unwrap_err();
        assert_eq!(e.field, "backend[0].name");
        assert!(e.message.contains("reserved"), "{e}");

        let e = parse(&BASE.replace("[auth]\nsource = \"backend\"", "")).unwrap_err();
        assert_eq!(e.field, "auth.passwd_file");
    }

    /// Secrets in the config never show in its Debug output (a log line, a panic message).
    #[test]
    fn debug_output_redacts_secrets() {
        let health = HealthSettings { login: Some(("probe".into(), "hunter2".into())), ..HealthSettings::default() };
        let http = AuthHttpSettings {
            urls: vec!["http://127.0.0.1:9/auth?key=hunter2".into()],
            timeout: Duration::from_secs(1),
            headers: vec![("X-Auth-Key".into(), "hunter2".into())],
            ca_file: None,
            cache_ttl: Duration::ZERO,
            negative_cache_ttl: Duration::ZERO,
            pass_client_cert: false,
        };
        let login = BackendLogin::Master { user: "m".into(), password: "hunter2".into() };
        for shown in [format!("{health:?}"), format!("{http:?}"), format!("{login:?}")] {
            assert!(!shown.contains("hunter2") && shown.contains("<redacted>"), "{shown}");
        }
        assert!(format!("{health:?}").contains("probe") && format!("{http:?}").contains("X-Auth-Key"));
        assert!(format!("{http:?}").contains("http://127.0.0.1:9/auth"));
        let service = crate::auth::http::AuthHttp::new(http).unwrap();
        let shown = format!("{service:?}");
        assert!(shown.contains("http://127.0.0.1:9/auth") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn strict_sni_needs_every_certificate_named() {
        let tls = |strict: bool, names: &str| {
            format!(
                "[tls]\nstrict_sni = {strict}\n[[tls.certificate]]\ncert = \"c.pem\"\nkey = \"c.key\"\ndefault = true\n{names}\n{BASE}"
            )
        };
        assert!(!parse(&tls(false, "")).unwrap().tls.strict_sni);
        let e = parse(&tls(true, "")).unwrap_err();
        assert_eq!(e.field, "tls.certificate[0].names");
        assert!(parse(&tls(true, "names = [\"mail.example.org\"]")).unwrap().tls.strict_sni);
    }

    /// A service URL with a token in its query is shown without it, also when it is refused.
    #[test]
    fn a_refused_auth_url_does_not_show_its_query() {
        let text = with_auth_http("urls = [\"htps://auth.example/check?key=S3cr3t\"]");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "auth.http.urls", "{e}");
        assert!(e.message.contains("htps://auth.example/check") && !e.to_string().contains("S3cr3t"), "{e}");
    }

    /// A name may be listed by two certificates (an ECDSA and an RSA one): whether their key
    /// types differ is the certificate store's to check, which reads the keys
    /// (`tls::certs::tests::one_certificate_per_name_and_key_type`). A name listed twice in
    /// one certificate is kept once.
    #[test]
    fn a_name_in_two_certificates_is_left_to_the_store() {
        let cert = |names: &str| format!("[[tls.certificate]]\ncert = \"c.pem\"\nkey = \"c.key\"\nnames = [{names}]\n");
        let text = format!(
            "[tls]\n{}{}{BASE}",
            cert("\"mail.example.org\", \"*.example.org\", \"Mail.example.org\""),
            cert("\"imap.example.org\", \"Mail.Example.org\"")
        );
        let tls = parse(&text).unwrap().tls;
        assert_eq!(tls.certificates[0].names, ["mail.example.org", "*.example.org"]);
        assert_eq!(tls.certificates[1].names, ["imap.example.org", "mail.example.org"]);
    }

    /// The admin server is off without its table, and with it listens on loopback at 10080 by
    /// default: outside 9100-9999, Prometheus exporters' ports (node_exporter holds 9100 on
    /// every address of many hosts, and a taken admin port stops the proxy's start).
    #[test]
    fn the_admin_default_is_loopback_outside_the_exporters_ports() {
        assert_eq!(parse(BASE).unwrap().admin, None);
        let admin = parse(&format!("[admin]\n{BASE}")).unwrap().admin.unwrap();
        assert_eq!(admin, "127.0.0.1:10080".parse().unwrap());
        assert!(!(9100..=9999).contains(&admin.port()));
    }

    #[test]
    fn cipher_suites_are_checked_and_kept_in_order() {
        let c = parse(&with_listener("name = \"x\"\nbind = \"127.0.0.1:1\"\nprotocol = \"imap\"\ntls = \"implicit\""))
            .unwrap();
        assert_eq!(c.tls.cipher_suites, DEFAULT_CIPHER_SUITES);
        assert_eq!(c.tls.cipher_suites[0], "TLS13_AES_128_GCM_SHA256");

        let tls = |list: &str| format!("[tls]\ncipher_suites = {list}\n{BASE}");
        let c = parse(&tls(r#"["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_256_GCM_SHA384"]"#)).unwrap();
        assert_eq!(c.tls.cipher_suites, ["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_256_GCM_SHA384"]);

        for (list, message) in [
            (r#"["TLS13_AES_128_GCM_SHA256", "RC4-MD5"]"#, "\"RC4-MD5\" is not a known cipher suite"),
            (r#"["TLS13_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256"]"#, "listed twice"),
            (r#"["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]"#, "at least one TLS 1.3 suite"),
            ("[]", "at least one TLS 1.3 suite"),
        ] {
            let e = parse(&tls(list)).unwrap_err();
            assert_eq!((e.field.as_str(), e.position.map(|p| p.0)), ("tls.cipher_suites", Some(2)), "{list}");
            assert!(e.message.contains(message), "{list}: {e}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
        // An IPv4-mapped entry is its IPv4 address or range, never "every IPv4 peer".
        let mapped = Cidr::parse("::ffff:192.0.2.10").unwrap();
        assert_eq!(mapped, Cidr::parse("192.0.2.10").unwrap());
        assert!(mapped.contains("192.0.2.10".parse().unwrap()));
        assert!(mapped.contains("::ffff:192.0.2.10".parse().unwrap()));
        assert!(!mapped.contains("192.0.2.11".parse().unwrap()));
        assert!(!mapped.contains("203.0.113.9".parse().unwrap()));
        assert_eq!(Cidr::parse("::ffff:10.0.0.0/104").unwrap(), Cidr::parse("10.0.0.0/8").unwrap());
        assert!(Cidr::parse("::ffff:10.0.0.0/64").is_none());
        // A prefix wider than its address (not made by parse) matches nothing.
        assert!(!Cidr { addr: "10.0.0.1".parse().unwrap(), prefix: 40 }.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn backend_verified_auth_refuses_logins_that_skip_the_password() {
        // An SMTP backend defaults to XCLIENT LOGIN=, which trusts the proxy: with
        // backend-verified auth that would accept any password.
        let smtp = "[auth]\nsource = \"backend\"\n[[backend]]\nname = \"s\"\nprotocol = \"smtp\"\naddress = \"127.0.0.1:587\"\n[routing.smtp]\ndefault = \"s\"\n";
        let e = parse(smtp).unwrap_err();
        assert_eq!(e.field, "backend[0].login");
        assert!(parse(&smtp.replace("protocol = \"smtp\"", "protocol = \"smtp\"\nlogin = \"replay\"")).is_ok());
        let master = BASE
            .replace("name = \"b\"", "name = \"b\"\nlogin = \"master\"\nmaster_user = \"m\"\nmaster_password = \"p\"");
        assert_eq!(parse(&master).unwrap_err().field, "backend[0].login");
    }

    #[test]
    fn duplicate_names_and_addresses_are_refused() {
        let l = "name = \"x\"\nbind = \"127.0.0.1:1\"\nprotocol = \"imap\"\ntls = \"none\"";
        let e = parse(&format!("{}\n[[listener]]\n{l}\n", with_listener(l))).unwrap_err();
        assert_eq!(e.field, "listener[1].name");
        let l2 = "name = \"y\"\nbind = [\"127.0.0.1:2\", \"127.0.0.1:1\"]\nprotocol = \"imap\"\ntls = \"none\"";
        let e = parse(&format!("{}\n[[listener]]\n{l2}\n", with_listener(l))).unwrap_err();
        assert_eq!(e.field, "listener[1].bind");
    }

    #[test]
    fn defaults_and_durations() {
        let c = parse(&format!(
            "{BASE}\n[limits]\nidle_timeout = \"45m\"\nmax_errors = 3\nbackend_disconnect_spread = \"20s\"\n[[listener]]\nname = \"x\"\nbind = \"[::1]:993\"\nprotocol = \"imap\"\ntls = \"implicit\"\n"
        ))
        .unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(45 * 60));
        assert_eq!(c.limits.max_errors, 3);
        assert_eq!(c.limits.backend_disconnect_spread, Duration::from_secs(20));
        assert_eq!(Limits::default().backend_disconnect_spread, Duration::ZERO);
        // Reliability case 60: an authenticated session idles at least 30 minutes by default
        // (RFC 9051 §5.4: IDLE clients re-issue every 29 minutes), and errors close at 5 (nginx).
        let d = parse(BASE).unwrap();
        assert_eq!(d.limits.idle_timeout, Duration::from_secs(1800));
        assert_eq!(d.limits.max_errors, 5);
        assert_eq!(c.limits.preauth_idle_timeout, DEFAULT_PREAUTH_IDLE);
        assert_eq!(c.listeners[0].tls, TlsMode::Implicit);
        // A TLS listener without certificates gets a self-signed "localhost" one.
        assert_eq!(c.tls.self_signed_names, vec!["localhost".to_string()]);
        let b = &c.backends["b"];
        assert_eq!(
            (b.transport, b.client_address, b.tls_verify),
            (Transport::Plain, ClientAddress::ImapIdIfAnnounced, true)
        );
        assert!(
            !format!("{:?}", BackendLogin::Master { user: "m".into(), password: "sekrit".into() }).contains("sekrit")
        );
    }
}
