//! Log setup and the stable log lines operators build on (fail2ban, access logs).
//!
//! Never pass a password, an AUTH payload or a raw client line to these functions.

use std::net::IpAddr;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber. `RUST_LOG` wins over the config's level.
/// The `[log]` settings logging was set up with, once it has been.
static STARTED_WITH: std::sync::OnceLock<(LogFormat, Option<String>)> = std::sync::OnceLock::new();

/// Whether `format` and `level` differ from what logging was set up with at start (they are
/// read only then); false before `init`.
pub fn differs_from_start(format: LogFormat, level: Option<&str>) -> bool {
    STARTED_WITH.get().is_some_and(|(f, l)| (*f, l.as_deref()) != (format, level))
}

pub fn init(format: LogFormat, level: Option<&str>) {
    let _ = STARTED_WITH.set((format, level.map(str::to_string)));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A user name made safe for a log line: anything outside a conservative set becomes `?`, and
/// it is cut at 64 characters, so a client cannot forge or break log lines.
pub fn safe_user(user: Option<&str>) -> String {
    match user {
        None => "-".into(),
        Some(u) => u
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || "@._+-=".contains(c) { c } else { '?' })
            .collect(),
    }
}

/// The one line per failed login. Its shape is a contract (deploy/fail2ban matches it):
/// `login failed: rip=IP user=<USER> protocol=P listener=L reason=R`.
pub fn login_failed(rip: IpAddr, user: Option<&str>, protocol: &str, listener: &str, reason: &str) {
    tracing::warn!(target: "portcullis::auth", "login failed: rip={rip} user=<{}> protocol={protocol} listener={listener} reason={reason}", safe_user(user));
}
