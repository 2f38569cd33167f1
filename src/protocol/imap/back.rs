//! IMAP toward a backend, up to and including the login: greeting, optional STARTTLS, CAPABILITY,
//! ID with the client's address, then LOGIN replay or a master-user AUTHENTICATE PLAIN.
//!
//! The proxy is a careful client here: every line is bounded, every step has the caller's
//! deadline, untagged data around STARTTLS aborts (reliability cases 10, 11), a PREAUTH greeting
//! aborts (case 13), and user-supplied strings are re-encoded as quoted strings or literals,
//! never copied as client syntax (case 33).

use std::io;
use std::sync::Arc;

use base64::Engine;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::Credentials;
use crate::config::{Backend, BackendLogin, ClientAddress, Transport};
use crate::tls::{BackendStream, MaybeTls};

/// Longest backend line accepted before the login completes (nginx: "upstream sent too long
/// response line").
const MAX_BACKEND_LINE: usize = 64 * 1024;

/// Why a backend login did not succeed. `Rejected` is the backend's verdict on the credentials;
/// everything else is the backend's fault and the client may retry.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("TLS failed: {0}")]
    Tls(io::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("backend refused service")]
    Refused,
    #[error("backend rejected the credentials")]
    Rejected,
}

impl BackendError {
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Connect(_) => "connect",
            BackendError::Tls(_) => "tls",
            BackendError::Io(_) => "io",
            BackendError::Protocol(_) => "protocol",
            BackendError::Refused => "refused",
            BackendError::Rejected => "rejected",
        }
    }
}

/// Facts about the client passed to the backend.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub session_id: String,
    pub id_fields: Vec<(String, String)>,
}

/// A logged-in backend connection, ready to relay.
pub struct LoggedIn {
    pub stream: BackendStream,
    /// Untagged lines the backend sent with its login reply, to forward first.
    pub untagged: Vec<u8>,
    /// The tagged reply after the tag, e.g. `OK [CAPABILITY ...] Logged in\r\n`.
    pub tagged_rest: Vec<u8>,
    /// Bytes read past the tagged reply; they belong to the relay.
    pub leftover: Vec<u8>,
}

/// Connect and log in. The caller wraps this in the backend login deadline.
pub async fn connect_and_login(
    backend: &Backend,
    tls: Option<Arc<ClientConfig>>,
    client: &ClientInfo,
    user: &str,
    creds: &Credentials,
    connect_timeout: std::time::Duration,
) -> Result<LoggedIn, BackendError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(backend.address.as_str()))
        .await
        .map_err(|_| BackendError::Connect(io::ErrorKind::TimedOut.into()))?
        .map_err(BackendError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    if backend.client_address == ClientAddress::ProxyV2 {
        let local = tcp.local_addr().map_err(BackendError::Connect)?;
        let _ = local;
        let header =
            proxy_header::ProxyHeader::with_address(proxy_header::ProxiedAddress::stream(client.peer, client.local));
        let mut buf = Vec::with_capacity(64);
        header.encode_v2(&mut buf).map_err(|_| BackendError::Protocol("cannot encode PROXY header"))?;
        tcp.write_all(&buf).await?;
    }
    let mut stream: BackendStream = match backend.transport {
        Transport::Tls => MaybeTls::Tls(Box::new(tls_connect(backend, tls.clone(), tcp).await?)),
        _ => MaybeTls::Plain(tcp),
    };
    let mut lines = Lines::default();
    let greeting = lines.line(&mut stream).await?;
    let mut caps = if greeting.starts_with(b"* OK") {
        capability_code(&greeting)
    } else if greeting.starts_with(b"* PREAUTH") {
        return Err(BackendError::Protocol("PREAUTH greeting"));
    } else if greeting.starts_with(b"* BYE") {
        return Err(BackendError::Refused);
    } else {
        return Err(BackendError::Protocol("unexpected greeting"));
    };

    if backend.transport == Transport::StartTls {
        stream.write_all(b"P0 STARTTLS\r\n").await?;
        let reply = lines.line(&mut stream).await?;
        if !reply.starts_with(b"P0 ") {
            return Err(BackendError::Protocol("untagged data before STARTTLS reply"));
        }
        if !starts_with_ci(&reply[3..], b"OK") {
            return Err(BackendError::Protocol("backend refused STARTTLS"));
        }
        if !lines.buf.is_empty() {
            return Err(BackendError::Protocol("data after STARTTLS reply"));
        }
        let MaybeTls::Plain(tcp) = stream else {
            return Err(BackendError::Protocol("STARTTLS on a TLS stream"));
        };
        stream = MaybeTls::Tls(Box::new(tls_connect(backend, tls, tcp).await?));
        // Capabilities from before TLS are forgotten (RFC 9051 §6.2.1).
        caps = None;
    }

    let caps = match caps {
        Some(c) => c,
        None => {
            stream.write_all(b"P1 CAPABILITY\r\n").await?;
            let mut found = None;
            loop {
                let l = lines.line(&mut stream).await?;
                if starts_with_ci(&l, b"* CAPABILITY ") {
                    found = Some(Caps::parse(&l[13..]));
                } else if l.starts_with(b"P1 ") {
                    break;
                }
            }
            found.ok_or(BackendError::Protocol("no capabilities"))?
        }
    };

    if backend.client_address == ClientAddress::ImapId && caps.id {
        let mut cmd = b"P2 ID (".to_vec();
        let mut fields: Vec<(String, String)> = vec![
            ("x-originating-ip".into(), client.peer.ip().to_string()),
            ("x-originating-port".into(), client.peer.port().to_string()),
            ("x-connected-ip".into(), client.local.ip().to_string()),
            ("x-connected-port".into(), client.local.port().to_string()),
            ("x-session-id".into(), client.session_id.clone()),
        ];
        fields.extend(client.id_fields.iter().cloned());
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                cmd.push(b' ');
            }
            quoted(&mut cmd, k.as_bytes());
            cmd.push(b' ');
            quoted(&mut cmd, v.as_bytes());
        }
        cmd.extend_from_slice(b")\r\n");
        stream.write_all(&cmd).await?;
        loop {
            let l = lines.line(&mut stream).await?;
            if l.starts_with(b"P2 ") {
                break;
            }
        }
    }

    match &backend.login {
        BackendLogin::Replay => {
            stream.write_all(b"P3 LOGIN ").await?;
            send_astring(&mut stream, &mut lines, creds.user.as_bytes(), caps.literal_plus).await?;
            stream.write_all(b" ").await?;
            send_astring(&mut stream, &mut lines, creds.password.expose(), caps.literal_plus).await?;
            stream.write_all(b"\r\n").await?;
        }
        BackendLogin::Master { user: master, password } => {
            let mut msg = Vec::with_capacity(user.len() + master.len() + password.len() + 2);
            msg.extend_from_slice(user.as_bytes());
            msg.push(0);
            msg.extend_from_slice(master.as_bytes());
            msg.push(0);
            msg.extend_from_slice(password.as_bytes());
            let b64 = base64::engine::general_purpose::STANDARD.encode(&msg);
            if caps.sasl_ir {
                stream.write_all(format!("P3 AUTHENTICATE PLAIN {b64}\r\n").as_bytes()).await?;
            } else {
                stream.write_all(b"P3 AUTHENTICATE PLAIN\r\n").await?;
                let l = lines.line(&mut stream).await?;
                if !l.starts_with(b"+") {
                    return Err(BackendError::Protocol("no continuation for AUTHENTICATE"));
                }
                stream.write_all(format!("{b64}\r\n").as_bytes()).await?;
            }
        }
    }
    stream.flush().await?;

    let mut untagged = Vec::new();
    loop {
        let l = lines.line(&mut stream).await?;
        if let Some(rest) = l.strip_prefix(b"P3 ") {
            if starts_with_ci(rest, b"OK") {
                return Ok(LoggedIn {
                    stream,
                    untagged,
                    tagged_rest: rest.to_vec(),
                    leftover: std::mem::take(&mut lines.buf),
                });
            }
            if starts_with_ci(rest, b"NO [UNAVAILABLE]") || starts_with_ci(rest, b"NO [SERVERBUG]") {
                return Err(BackendError::Refused);
            }
            return Err(BackendError::Rejected);
        }
        if l.starts_with(b"* BYE") {
            return Err(BackendError::Refused);
        }
        if l.starts_with(b"*") {
            // Reliability case 68: untagged data with the login reply is forwarded.
            if untagged.len() + l.len() > MAX_BACKEND_LINE {
                return Err(BackendError::Protocol("too much untagged data at login"));
            }
            untagged.extend_from_slice(&l);
        } else if !l.starts_with(b"+") {
            return Err(BackendError::Protocol("unexpected line at login"));
        }
    }
}

async fn tls_connect(
    backend: &Backend,
    tls: Option<Arc<ClientConfig>>,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BackendError> {
    let tls = tls.ok_or(BackendError::Protocol("no TLS client config"))?;
    let name = rustls::pki_types::ServerName::try_from(backend.tls_server_name.clone())
        .map_err(|_| BackendError::Protocol("invalid TLS server name"))?;
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(BackendError::Tls)
}

/// Send one IMAP astring argument: a quoted string when it is plain ASCII, else a literal
/// (`{n+}` with LITERAL+, otherwise a synchronising literal after the backend's "+").
async fn send_astring<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    value: &[u8],
    literal_plus: bool,
) -> Result<(), BackendError> {
    if value.iter().all(|b| (0x20..0x7f).contains(b)) {
        let mut out = Vec::with_capacity(value.len() + 8);
        quoted(&mut out, value);
        s.write_all(&out).await?;
        return Ok(());
    }
    if literal_plus {
        s.write_all(format!("{{{}+}}\r\n", value.len()).as_bytes()).await?;
    } else {
        s.write_all(format!("{{{}}}\r\n", value.len()).as_bytes()).await?;
        s.flush().await?;
        let l = lines.line(s).await?;
        if !l.starts_with(b"+") {
            return Err(BackendError::Rejected);
        }
    }
    s.write_all(value).await?;
    Ok(())
}

/// Append `value` as an IMAP quoted string (only called with printable ASCII).
fn quoted(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The capabilities the login step cares about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Caps {
    id: bool,
    sasl_ir: bool,
    literal_plus: bool,
}

impl Caps {
    fn parse(list: &[u8]) -> Caps {
        let mut c = Caps::default();
        for word in list.split(|b| *b == b' ' || *b == b']' || *b == b'\r' || *b == b'\n') {
            if word.eq_ignore_ascii_case(b"ID") {
                c.id = true;
            } else if word.eq_ignore_ascii_case(b"SASL-IR") {
                c.sasl_ir = true;
            } else if word.eq_ignore_ascii_case(b"LITERAL+") {
                c.literal_plus = true;
            }
        }
        c
    }
}

/// `[CAPABILITY ...]` inside a greeting, if present.
fn capability_code(line: &[u8]) -> Option<Caps> {
    let start = line.windows(12).position(|w| w.eq_ignore_ascii_case(b"[CAPABILITY "))?;
    let rest = &line[start + 12..];
    let end = rest.iter().position(|b| *b == b']')?;
    Some(Caps::parse(&rest[..end]))
}

/// A bounded line reader that keeps what it over-read.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    async fn line<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes() {
        let mut out = Vec::new();
        quoted(&mut out, br#"a"b\c"#);
        assert_eq!(out, br#""a\"b\\c""#);
    }

    #[test]
    fn capability_code_in_greeting() {
        let c =
            capability_code(b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] Dovecot ready.\r\n").unwrap();
        assert!(c.id && c.sasl_ir && c.literal_plus);
        assert!(capability_code(b"* OK ready\r\n").is_none());
    }
}
