//! The configuration file as written by an operator: serde structs that mirror the TOML one to one.
//!
//! No logic lives here. Every table denies unknown fields so a typo is an error, not a silent
//! default. Fields that validation may reject are `Spanned`, so `portcullis check` can name the
//! line. The validated runtime model is in `model.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// A duration with its place in the file, for settings whose value is checked (and an error must
/// name the line).
pub type SpannedDuration = Spanned<BoundedDuration>;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// The longest duration any setting accepts. Operators write huge values to mean "never", but the
/// runtime adds durations to clock readings, which overflow (and panic) near `u64` seconds.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600); // humantime's "10years"

/// A humantime duration (`"30s"`, `"5m"`) of at most [`MAX_DURATION`]; every duration in the file
/// is read through it.
#[derive(Debug, Clone, Copy)]
pub struct BoundedDuration(Duration);

impl std::ops::Deref for BoundedDuration {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl<'de> Deserialize<'de> for BoundedDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = humantime_serde::Serde::<Duration>::deserialize(d)?.into_inner();
        if value > MAX_DURATION {
            return Err(serde::de::Error::invalid_value(
                serde::de::Unexpected::Other("duration"),
                &"a duration of at most 10 years",
            ));
        }
        Ok(Self(value))
    }
}

/// `deserialize_with` for the optional durations that need no position.
fn bounded<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(Option::<BoundedDuration>::deserialize(d)?.map(|b| b.0))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    /// The admin HTTP server (metrics, health); off unless the table is present.
    pub admin: Option<AdminFile>,
    /// Certificates obtained and renewed over ACME.
    pub acme: Option<AcmeFile>,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub throttle: ThrottleFile,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendFile>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolFile>,
    #[serde(default)]
    pub users: UsersFile,
    #[serde(default)]
    pub routing: RoutingFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// The name the proxy gives itself in SMTP greetings and EHLO (default: the system host name).
    pub hostname: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeFile {
    /// `letsencrypt`, `letsencrypt-staging`, or a directory URL.
    pub directory: Spanned<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    #[serde(default)]
    pub terms_agreed: bool,
    /// External account binding (ZeroSSL, commercial CAs): key id and base64url HMAC key.
    pub eab_kid: Option<String>,
    pub eab_hmac_key: Option<Spanned<String>>,
    /// PEM root to trust for the directory (internal CAs, tests).
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Account key and certificates (files 0600).
    pub state_dir: Spanned<PathBuf>,
    /// `http-01` (default), `tls-alpn-01` or `dns-01`.
    pub challenge: Option<Spanned<String>>,
    /// HTTP-01 built-in responder address (default 0.0.0.0:80) ...
    pub http01_bind: Option<Spanned<String>>,
    /// ... or a directory an existing web server serves as its document root.
    pub http01_webroot: Option<Spanned<PathBuf>>,
    /// TLS-ALPN-01 responder address (default 0.0.0.0:443).
    pub tls_alpn01_bind: Option<Spanned<String>>,
    /// DNS-01: a command run as `hook add|remove NAME VALUE`.
    pub dns01_hook: Option<Spanned<PathBuf>>,
    #[serde(default, deserialize_with = "bounded")]
    pub dns01_propagation: Option<Duration>,
    /// First retry delay after a failure (doubles, jittered, up to 6 h). Default 60 s.
    #[serde(default)]
    pub retry_min: Option<SpannedDuration>,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<AcmeCertFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCertFile {
    pub names: Spanned<Vec<String>>,
    /// `ecdsa-p256` (default) or `rsa-2048`.
    pub key_type: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Default 127.0.0.1:10080.
    pub bind: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// `text` (default) or `json`.
    pub format: Option<Spanned<String>>,
    /// A tracing filter such as `info` or `portcullis=debug`.
    pub level: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default)]
    pub tls_handshake_timeout: Option<SpannedDuration>,
    #[serde(default)]
    pub preauth_idle_timeout: Option<SpannedDuration>,
    #[serde(default)]
    pub login_timeout: Option<SpannedDuration>,
    #[serde(default)]
    pub idle_timeout: Option<SpannedDuration>,
    #[serde(default)]
    pub backend_connect_timeout: Option<SpannedDuration>,
    #[serde(default)]
    pub backend_login_timeout: Option<SpannedDuration>,
    #[serde(default, deserialize_with = "bounded")]
    pub auth_failure_delay: Option<Duration>,
    #[serde(default, deserialize_with = "bounded")]
    pub shutdown_grace: Option<Duration>,
    /// SMTP: wait this long before the greeting; a client that talks first is refused.
    #[serde(default, deserialize_with = "bounded")]
    pub smtp_greeting_delay: Option<Duration>,
    /// Minimum progress: a command must be complete this long after its first byte.
    #[serde(default)]
    pub command_timeout: Option<SpannedDuration>,
    /// Longest a relayed session may last (default: unlimited).
    #[serde(default, deserialize_with = "bounded")]
    pub max_session_duration: Option<Duration>,
    /// TCP keepalive's first probe after this long without traffic (0: off).
    #[serde(default)]
    pub tcp_keepalive: Option<SpannedDuration>,
    /// When a backend ends sessions, close each client after a random delay up to this.
    #[serde(default, deserialize_with = "bounded")]
    pub backend_disconnect_spread: Option<Duration>,
    /// Connection caps (0 = unlimited).
    pub max_connections: Option<usize>,
    pub max_connections_per_listener: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    /// Relayed sessions per user (0 = unlimited).
    pub max_sessions_per_user: Option<usize>,
    pub max_line_length: Option<Spanned<u32>>,
    pub max_errors: Option<Spanned<u32>>,
    pub max_auth_attempts: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleFile {
    pub enabled: Option<bool>,
    pub penalty_after: Option<u32>,
    #[serde(default, deserialize_with = "bounded")]
    pub penalty_base: Option<Duration>,
    #[serde(default, deserialize_with = "bounded")]
    pub penalty_max: Option<Duration>,
    pub block_after: Option<u32>,
    pub user_block_after: Option<u32>,
    #[serde(default, deserialize_with = "bounded")]
    pub cooldown: Option<Duration>,
    #[serde(default, deserialize_with = "bounded")]
    pub window: Option<Duration>,
    pub ipv6_prefix: Option<Spanned<u8>>,
    pub trusted: Option<Spanned<Vec<String>>>,
    pub max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateFile>,
    /// Names for the self-signed certificate made at start when no certificate is configured.
    pub self_signed_names: Option<Vec<String>>,
    /// TLS 1.3 session tickets sent after each full handshake (0 turns resumption off).
    pub session_tickets: Option<Spanned<usize>>,
    /// Cipher suites in the server's order of preference (rustls / IANA names).
    pub cipher_suites: Option<Spanned<Vec<String>>>,
    /// Refuse the handshake when the client names a host no certificate is for.
    pub strict_sni: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
    /// Server names (exact or `*.domain`) this certificate answers for.
    #[serde(default)]
    pub names: Vec<Spanned<String>>,
    /// Served when the client sends no SNI or an unknown name.
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: Spanned<String>,
    pub bind: Spanned<BindFile>,
    pub protocol: Spanned<String>,
    pub tls: Spanned<String>,
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Expect a PROXY protocol v1/v2 header from a load balancer before anything else.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers allowed to send the PROXY header (CIDRs); anyone else is closed.
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
    /// Ask TLS clients for a certificate: "off" (default), "on", "optional", "optional_no_ca".
    pub verify_client: Option<Spanned<String>>,
    /// PEM file of the CAs client certificates must chain to.
    pub client_ca_file: Option<Spanned<PathBuf>>,
    /// PEM file of certificate revocation lists for client certificates (nginx's `ssl_crl`).
    pub client_crl_file: Option<Spanned<PathBuf>>,
    /// How long a client's chain may be (nginx's `ssl_verify_depth`, default 1).
    pub client_verify_depth: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum BindFile {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// `passwd-file` (default when `passwd_file` is set), `backend` or `http`.
    pub source: Option<Spanned<String>>,
    pub passwd_file: Option<Spanned<PathBuf>>,
    pub http: Option<AuthHttpFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHttpFile {
    /// One or more URLs, tried in order when one fails.
    pub urls: Spanned<Vec<String>>,
    #[serde(default, deserialize_with = "bounded")]
    pub timeout: Option<Duration>,
    /// Extra request headers (nginx `auth_http_header`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM CA certificates for https URLs (default: the system roots).
    pub ca_file: Option<Spanned<PathBuf>>,
    /// How long a positive answer is reused (default 0: not cached).
    #[serde(default, deserialize_with = "bounded")]
    pub cache_ttl: Option<Duration>,
    /// How long a negative answer is reused (default 0: not cached).
    #[serde(default, deserialize_with = "bounded")]
    pub negative_cache_ttl: Option<Duration>,
    /// Send the client certificate itself (`Auth-SSL-Cert`), as nginx's auth_http_pass_client_cert.
    #[serde(default)]
    pub pass_client_cert: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    /// `all` (default): lower-case the whole name; `domain`: only the domain part; `none`.
    pub lowercase: Option<Spanned<String>>,
    /// Added to user names without a domain.
    pub default_domain: Option<Spanned<String>>,
    /// Strip `@default_domain` instead (names are then stored without it).
    #[serde(default)]
    pub strip_default_domain: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub name: Spanned<String>,
    /// `imap` (default), `pop3` or `smtp`.
    pub protocol: Option<Spanned<String>>,
    pub address: Spanned<String>,
    /// `plain` (default), `tls` or `starttls`.
    pub transport: Option<Spanned<String>>,
    /// Server name checked in the backend's certificate (default: the host part of `address`).
    pub tls_server_name: Option<Spanned<String>>,
    /// Verify the backend's certificate (default true).
    pub tls_verify: Option<bool>,
    /// PEM file of CA certificates to trust instead of the system roots.
    pub tls_ca_file: Option<Spanned<PathBuf>>,
    /// IMAP: `imap-id` (default); POP3 and SMTP: `xclient` (default); all: `proxy-v2` or `none`.
    pub client_address: Option<Spanned<String>>,
    /// `replay` or `master`; SMTP also `xclient` (its default).
    pub login: Option<Spanned<String>>,
    /// Relative share of a pool's users (default 1).
    pub weight: Option<Spanned<f64>>,
    /// `up` (default), `draining` (no new sessions) or `disabled`.
    pub state: Option<Spanned<String>>,
    /// Rendezvous key: backends of different protocols on one host share it, so a user's IMAP,
    /// POP3 and SMTP land on the same host (default: the backend name).
    pub host_key: Option<String>,
    /// Most concurrent sessions on this backend (0 = unlimited); a full backend is skipped.
    pub max_sessions: Option<u32>,
    #[serde(default)]
    pub health: Option<HealthFile>,
    pub master_user: Option<Spanned<String>>,
    pub master_password: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    /// Rules for every protocol (a pool shared by several protocols).
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub domains: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub users: BTreeMap<String, Spanned<String>>,
    /// Per-protocol rules, consulted before the shared ones.
    pub imap: Option<RouteTableFile>,
    pub pop3: Option<RouteTableFile>,
    pub smtp: Option<RouteTableFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTableFile {
    pub default: Option<Spanned<String>>,
    /// Domain (or `*.domain`) → pool or backend.
    #[serde(default)]
    pub domains: BTreeMap<String, Spanned<String>>,
    /// Exact user → pool or backend.
    #[serde(default)]
    pub users: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Active checks on (default true).
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "bounded")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "bounded")]
    pub timeout: Option<Duration>,
    /// Consecutive successes to mark a down backend up (default 2).
    pub rise: Option<u32>,
    /// Consecutive failures to mark an up backend down (default 3).
    pub fall: Option<u32>,
    /// Also STARTTLS when the transport is `starttls` (default true).
    pub starttls: Option<bool>,
    /// Optional test login (IMAP and POP3).
    pub login_user: Option<String>,
    pub login_password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: Spanned<String>,
    pub backends: Spanned<Vec<String>>,
    /// Move a session to the next backend in rendezvous order when its backend is down or
    /// fails at connect (default true). `false` for mailboxes that live on exactly one server.
    pub failover: Option<bool>,
}
