//! The configuration file as written by an operator: serde structs that mirror the TOML one to one.
//!
//! No logic lives here. Every table denies unknown fields so a typo is an error, not a silent
//! default. Fields that validation may reject are `Spanned`, so `portcullis check` can name the
//! line. The validated runtime model is in `model.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendFile>,
    #[serde(default)]
    pub routing: RoutingFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// The name the proxy gives itself in SMTP greetings and EHLO (default: the system host name).
    pub hostname: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// `text` (default) or `json`.
    pub format: Option<Spanned<String>>,
    /// A tracing filter such as `info` or `portcullis=debug`.
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default, with = "humantime_serde::option")]
    pub tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub preauth_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub login_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub backend_connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub backend_login_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub auth_failure_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    /// SMTP: wait this long before the greeting; a client that talks first is refused.
    #[serde(default, with = "humantime_serde::option")]
    pub smtp_greeting_delay: Option<Duration>,
    pub max_line_length: Option<Spanned<u32>>,
    pub max_errors: Option<Spanned<u32>>,
    pub max_auth_attempts: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateFile>,
    /// Names for the self-signed certificate made at start when no certificate is configured.
    pub self_signed_names: Option<Vec<String>>,
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
    /// `passwd-file` (default when `passwd_file` is set) or `backend`.
    pub source: Option<Spanned<String>>,
    pub passwd_file: Option<Spanned<PathBuf>>,
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
    pub master_user: Option<Spanned<String>>,
    pub master_password: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingFile {
    pub imap: Option<RouteTableFile>,
    pub pop3: Option<RouteTableFile>,
    pub smtp: Option<RouteTableFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTableFile {
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub domains: BTreeMap<String, Spanned<String>>,
}
