//! The backend leg, protocol-agnostic: connect with a deadline, PROXY v2 out, implicit TLS or a
//! STARTTLS upgrade with certificate verification, a bounded line reader, and the typed errors
//! the session maps to client replies.
//!
//! The protocol modules (`protocol::*::back`) drive the dialogue up to the login on top of these.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Backend, ClientAddress, Transport};
use crate::tls::{BackendStream, MaybeTls};

/// Longest backend line accepted before the login completes (nginx: "upstream sent too long
/// response line", reliability case 67).
pub const MAX_BACKEND_LINE: usize = 64 * 1024;

/// Why a backend login did not succeed. `Rejected` is the backend's verdict on the credentials;
/// everything else is the backend's fault and the client may retry.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// This host, not the backend, is out of something a connection needs: file descriptors
    /// (`EMFILE`, `ENFILE`), memory or socket buffers, or local ports. Never counted against the
    /// backend's health: a descriptor flood on the proxy would otherwise mark its backends down.
    #[error("no local resources to connect: {0}")]
    Local(io::Error),
    #[error("TLS failed: {0}")]
    Tls(io::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("backend refused service")]
    Refused,
    /// The backend refused the login itself, for now (IMAP `NO [UNAVAILABLE]` or `[SERVERBUG]`,
    /// a `* BYE` in reply; POP3 `-ERR [SYS/TEMP]`; SMTP `454`). It came after the credentials, so
    /// it may be the user's own condition: Dovecot answers so when one user has too many
    /// connections. Another backend is tried, but it does not count against this one's health,
    /// or one user could mark a backend down for everyone; active checks still see a backend
    /// that refuses every login.
    #[error("backend refused the login for now")]
    LoginRefused,
    /// The user's mailbox is in use (POP3 `[IN-USE]`, IMAP `[INUSE]`): the user's own state, not
    /// the backend's health.
    #[error("mailbox in use")]
    InUse,
    /// The backend refused the client's own EHLO name (replayed after XCLIENT; it took the
    /// proxy's), or the client's address (Postfix runs its connection checks again for the
    /// address XCLIENT gives: per-client connection limits, client restrictions), for now (4xx)
    /// or for good (5xx): the client's own, the same on every replica, not the backend's health.
    #[error("backend refused the client's EHLO name or address")]
    ClientRefused { temporary: bool, address: bool },
    #[error("backend rejected the credentials")]
    Rejected,
    /// This login cannot be sent to this backend as it is configured (a user name too long for
    /// SMTP `XCLIENT LOGIN=`): nothing was sent, so neither the user's password nor the
    /// backend's health is in question. A pool's next backend is tried.
    #[error("the login cannot be sent to this backend as configured")]
    UserUnsupported,
}

impl BackendError {
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Connect(_) => "connect",
            BackendError::Local(_) => "local_resources",
            BackendError::Tls(_) => "tls",
            BackendError::Io(_) => "io",
            BackendError::Protocol(_) => "protocol",
            BackendError::Refused => "refused",
            BackendError::LoginRefused => "login_refused",
            BackendError::InUse => "in_use",
            BackendError::ClientRefused { .. } => "client_refused",
            BackendError::Rejected => "rejected",
            BackendError::UserUnsupported => "user_unsupported",
        }
    }
}

/// Facts about the client that a backend may be told.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    /// The proxy address the client reached (from a PROXY header when a trusted one came first).
    pub local: SocketAddr,
    /// The proxy's own socket address this connection was accepted on (never from a header):
    /// what the proxy-loop check compares a backend with.
    pub accepted_on: SocketAddr,
    pub session_id: String,
    /// IMAP: the client's own ID fields (already filtered).
    pub id_fields: Vec<(String, String)>,
    /// SMTP: the name the client gave in EHLO/HELO, and whether it used EHLO.
    pub helo: Option<String>,
    pub esmtp: bool,
    /// The proxy's own connection (health check, capability probe): no client's address to tell.
    pub probe: bool,
    /// TCP keepalive for the backend connection (`Limits::tcp_keepalive`): a session's lasts,
    /// a probe's does not need one.
    pub keepalive: Option<crate::config::Keepalive>,
}

impl ClientInfo {
    /// The proxy itself as the client (health checks, probes).
    pub fn local() -> ClientInfo {
        let here = SocketAddr::from(([127, 0, 0, 1], 0));
        ClientInfo {
            peer: here,
            local: here,
            accepted_on: here,
            session_id: String::new(),
            id_fields: Vec::new(),
            helo: None,
            esmtp: true,
            probe: true,
            keepalive: None,
        }
    }
}

/// A logged-in backend connection, ready to relay.
pub struct LoggedIn {
    pub stream: BackendStream,
    /// IMAP: untagged lines the backend sent with its login reply, forwarded first.
    pub untagged: Vec<u8>,
    /// The backend's final login reply (IMAP: after the tag; POP3: the `+OK` line; SMTP: empty,
    /// the front end answers `235` itself).
    pub reply: Vec<u8>,
    /// Bytes read past the login reply; they belong to the relay.
    pub leftover: Vec<u8>,
    /// SMTP: the extensions the backend announced (for the honest EHLO cache).
    pub extensions: Option<Vec<String>>,
}

/// Dovecot's proxy loop guard, sent as XCLIENT `TTL` (POP3) and ID `x-proxy-ttl` (IMAP): each
/// proxy hop behind this one decrements it, and one that reaches 0 refuses the login. The
/// proxy is the first hop (clients' own `x-` ID fields are dropped), so it sends Dovecot's
/// starting value.
pub const PROXY_TTL: u32 = 5;

/// Connect to `backend`, send a PROXY v2 header if configured, and do implicit TLS if the
/// transport says so. STARTTLS is the protocol module's business (see `starttls`).
pub async fn connect(
    backend: &Backend,
    tls: Option<&Arc<ClientConfig>>,
    client: &ClientInfo,
    timeout: std::time::Duration,
) -> Result<BackendStream, BackendError> {
    // Failed and timed-out connects are observed too: they are the slow ones. Only sessions'
    // connects: on a quiet instance health checks would otherwise make most of the figures.
    let started = tokio::time::Instant::now();
    let result = connect_inner(backend, tls, client, timeout).await;
    if !client.probe {
        crate::metrics::metrics()
            .backend_connect_duration
            .with_label_values(&[backend.label()])
            .observe(started.elapsed().as_secs_f64());
    }
    result
}

async fn connect_inner(
    backend: &Backend,
    tls: Option<&Arc<ClientConfig>>,
    client: &ClientInfo,
    timeout: std::time::Duration,
) -> Result<BackendStream, BackendError> {
    // Reliability case 73 (Dovecot's login_proxy_is_ourself): a backend at the very address the
    // client reached us on is this listener, and the login would loop back into it for ever.
    // An address literal is checked before connecting, a host name once it has resolved. The
    // socket the connection was accepted on counts, not an address from a PROXY header.
    const LOOP: BackendError = BackendError::Protocol("proxy loop: the backend is the listener the client reached");
    let own = client.accepted_on;
    let here = |a: SocketAddr| a.port() == own.port() && a.ip().to_canonical() == own.ip().to_canonical();
    let literal = backend.address.parse::<SocketAddr>().ok();
    if literal.is_some_and(|a| a.ip().to_canonical().is_unspecified()) {
        // Refused in the config; an auth service could still name it. It would reach this host.
        return Err(BackendError::Protocol("backend address names no host (0.0.0.0 or [::])"));
    }
    if literal.is_some_and(here) {
        return Err(LOOP);
    }
    let connect = async {
        match literal {
            Some(a) => TcpStream::connect(a).await,
            None => TcpStream::connect(backend.address.as_str()).await,
        }
    };
    let mut tcp = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| BackendError::Connect(io::ErrorKind::TimedOut.into()))?
        .map_err(connect_error)?;
    if literal.is_none() && tcp.peer_addr().is_ok_and(here) {
        return Err(LOOP);
    }
    let _ = tcp.set_nodelay(true);
    if let Some(k) = &client.keepalive {
        let _ = k.apply(&socket2::SockRef::from(&tcp));
    }
    if backend.client_address == ClientAddress::ProxyV2 {
        // A probe is the proxy's own connection: LOCAL, so the backend does not take it for a
        // client at 127.0.0.1 (which it may trust).
        let header = if client.probe {
            proxy_header::ProxyHeader::with_local()
        } else {
            proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(client.peer, client.local))
        };
        let mut buf = Vec::with_capacity(64);
        header.encode_v2(&mut buf).map_err(|_| BackendError::Protocol("cannot encode PROXY header"))?;
        tcp.write_all(&buf).await?;
    }
    match backend.transport {
        Transport::Tls => Ok(MaybeTls::Tls(Box::new(tls_connect(backend, tls, tcp).await?))),
        Transport::Plain | Transport::StartTls => Ok(MaybeTls::Plain(tcp)),
    }
}

/// A failed connect: the backend's, or this host's own shortage (Linux error numbers: ENOMEM 12,
/// ENFILE 23, EMFILE 24, EADDRNOTAVAIL 99 for no free local port, ENOBUFS 105).
fn connect_error(e: io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(12 | 23 | 24 | 99 | 105) => BackendError::Local(e),
        _ => BackendError::Connect(e),
    }
}

/// Upgrade a plaintext backend connection after its STARTTLS/STLS reply. The reader must be
/// empty: bytes after the reply are an injection attempt (reliability case 10).
pub async fn starttls(
    backend: &Backend,
    tls: Option<&Arc<ClientConfig>>,
    stream: BackendStream,
    lines: &Lines,
) -> Result<BackendStream, BackendError> {
    if !lines.is_empty() {
        return Err(BackendError::Protocol("data after STARTTLS reply"));
    }
    let MaybeTls::Plain(tcp) = stream else {
        return Err(BackendError::Protocol("STARTTLS on a TLS stream"));
    };
    Ok(MaybeTls::Tls(Box::new(tls_connect(backend, tls, tcp).await?)))
}

async fn tls_connect(
    backend: &Backend,
    tls: Option<&Arc<ClientConfig>>,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BackendError> {
    let tls = tls.cloned().ok_or(BackendError::Protocol("no TLS client config"))?;
    let name = rustls::pki_types::ServerName::try_from(backend.tls_server_name.clone())
        .map_err(|_| BackendError::Protocol("invalid TLS server name"))?;
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(BackendError::Tls)
}

/// A bounded line reader that keeps what it over-read.
#[derive(Default)]
pub struct Lines {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no line end: a line arriving a byte at a time is
    /// scanned once, not once per read.
    scanned: usize,
}

impl Lines {
    /// The next line including its line end.
    pub async fn line<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(self.scanned + i + 1);
                self.scanned = 0;
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_BACKEND_LINE {
                return Err(BackendError::Protocol("backend line too long"));
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(BackendError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What was read past the last line returned.
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf
    }
}

/// What a default `client_address` does where the backend lacks the way it prefers (IMAP ID,
/// POP3 XCLIENT): said once per backend and problem, so the operator knows its logs see the
/// proxy's address, without a line per login.
pub fn warn_once(backend: &Backend, problem: &'static str) {
    static WARNED: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.len() < 1024 && !warned.iter().any(|(a, p)| *a == backend.address && *p == problem) {
        warned.push((backend.address.clone(), problem));
        tracing::warn!(backend = %backend.name, address = %backend.address, "{problem}");
    }
}

pub fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect that fails for want of descriptors, memory or local ports is this host's
    /// shortage, never the backend's (not counted against its health); a refused or timed-out
    /// connect is the backend's.
    #[test]
    fn local_shortages_are_told_apart_from_backend_failures() {
        for errno in [12, 23, 24, 99, 105] {
            assert!(matches!(connect_error(io::Error::from_raw_os_error(errno)), BackendError::Local(_)), "{errno}");
        }
        for e in [io::Error::from_raw_os_error(111), io::Error::from_raw_os_error(113), io::ErrorKind::TimedOut.into()]
        {
            assert!(matches!(connect_error(e), BackendError::Connect(_)));
        }
        assert_eq!(BackendError::Local(io::Error::from_raw_os_error(24)).reason(), "local_resources");
    }

    /// Lines come out whole and in order however the bytes arrive: a byte at a time (each byte
    /// scanned once), or several lines in one read; what follows the last one is kept.
    #[tokio::test]
    async fn lines_are_split_alike_whatever_the_reads() {
        let bytes = b"* OK ready\r\n* CAPABILITY IMAP4rev1\r\nP1 OK done\r\nrest";
        for step in [1, 3, bytes.len()] {
            let chunks = bytes.chunks(step).map(<[u8]>::to_vec).collect();
            let mut mock = crate::protocol::harness::Script::new(chunks);
            let mut lines = Lines::default();
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(lines.line(&mut mock).await.unwrap());
            }
            assert_eq!(got, [&b"* OK ready\r\n"[..], b"* CAPABILITY IMAP4rev1\r\n", b"P1 OK done\r\n"], "{step}");
            let mut leftover = lines.into_leftover();
            // A read of one byte at a time may not have reached the rest yet.
            let mut more = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut mock, &mut more).await.unwrap();
            leftover.extend_from_slice(&more);
            assert_eq!(leftover, b"rest", "{step}");
        }
    }
}
