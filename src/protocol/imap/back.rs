//! IMAP toward a backend, up to and including the login: greeting, optional STARTTLS, CAPABILITY,
//! ID with the client's address, then LOGIN replay or a master-user AUTHENTICATE PLAIN.
//!
//! The proxy is a careful client here: every line is bounded, every step has the caller's
//! deadline, untagged data around STARTTLS aborts (reliability cases 10, 11), a PREAUTH greeting
//! aborts (case 13), and user-supplied strings are re-encoded as quoted strings or literals,
//! never copied as client syntax (case 33).

use std::sync::Arc;

use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::auth::Credentials;
use crate::backend::{self, BackendError, ClientInfo, Lines, LoggedIn, MAX_BACKEND_LINE, starts_with_ci, warn_once};
use crate::config::{Backend, BackendLogin, ClientAddress, Transport};
use crate::protocol::sasl::plain_response;

const NO_ID: &str = "backend does not announce IMAP ID: it sees the proxy's address, not the client's \
    (set client_address = \"proxy-v2\" or \"none\" to choose, or \"imap-id\" to refuse such backends)";
const ID_REFUSED: &str = "backend refused IMAP ID: it sees the proxy's address, not the client's \
    (set client_address = \"imap-id\" to refuse its logins instead)";

/// Connect and log in. The caller wraps this in the backend login deadline.
pub async fn connect_and_login(
    backend: &Backend,
    tls: Option<Arc<ClientConfig>>,
    client: &ClientInfo,
    user: &str,
    creds: &Credentials,
    connect_timeout: std::time::Duration,
) -> Result<LoggedIn, BackendError> {
    let mut stream = backend::connect(backend, tls.as_ref(), client, connect_timeout).await?;
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
        stream = backend::starttls(backend, tls.as_ref(), stream, &lines).await?;
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

    let send_id = match backend.client_address {
        ClientAddress::ImapId if !caps.id => {
            // Set explicitly: fail closed rather than lose the client's address silently.
            return Err(BackendError::Protocol("backend does not announce ID (client_address = \"imap-id\")"));
        }
        ClientAddress::ImapIdIfAnnounced if !caps.id => {
            warn_once(backend, NO_ID);
            false
        }
        ClientAddress::ImapId | ClientAddress::ImapIdIfAnnounced => true,
        ClientAddress::Xclient | ClientAddress::XclientIfAnnounced | ClientAddress::ProxyV2 | ClientAddress::None => {
            false
        }
    };
    // A health check's login is the proxy's own connection: no client's address to tell.
    if send_id && !client.probe {
        let mut cmd = b"P2 ID (".to_vec();
        let mut fields: Vec<(String, String)> = vec![
            ("x-originating-ip".into(), client.peer.ip().to_string()),
            ("x-originating-port".into(), client.peer.port().to_string()),
            ("x-connected-ip".into(), client.local.ip().to_string()),
            ("x-connected-port".into(), client.local.port().to_string()),
            ("x-session-id".into(), client.session_id.clone()),
            ("x-proxy-ttl".into(), crate::backend::PROXY_TTL.to_string()),
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
            if let Some(status) = l.strip_prefix(b"P2 ") {
                let ok = starts_with_ci(status, b"OK") && matches!(status.get(2), Some(b' ' | b'\r' | b'\n') | None);
                if !ok {
                    // Set explicitly: fail closed, as for a backend without ID.
                    if backend.client_address == ClientAddress::ImapId {
                        return Err(BackendError::Protocol("backend refused ID (client_address = \"imap-id\")"));
                    }
                    warn_once(backend, ID_REFUSED);
                }
                break;
            }
        }
    }

    // RFC 9051 §6.2.3: no login where the server says LOGINDISABLED (a plaintext backend that
    // wants STARTTLS): not the client's password, nor the master password, which opens every
    // mailbox, over a link the backend calls insecure. Its refusal would read as wrong
    // credentials and count against the user; it is the backend's configuration instead.
    if caps.login_disabled {
        return Err(BackendError::Protocol("backend advertises LOGINDISABLED (use starttls or tls)"));
    }
    match &backend.login {
        // Config validation only allows XCLIENT logins on SMTP backends.
        BackendLogin::Replay | BackendLogin::Xclient => {
            // One write for the whole command (unless a synchronising literal must wait for the
            // backend's "+"): a command in pieces costs the backend a wakeup per segment.
            // Zeroed when dropped, also on an error path; room for quoting that doubles every
            // byte and two literal headers, so it never grows (and leaves a copy behind).
            let (user, password) = (creds.user.as_bytes(), creds.password.expose());
            let mut line = crate::auth::Password::new(Vec::with_capacity(64 + 2 * (user.len() + password.len())));
            let cmd = line.buffer_mut();
            cmd.extend_from_slice(b"P3 LOGIN ");
            push_astring(&mut stream, &mut lines, cmd, user, caps.literal_plus).await?;
            cmd.push(b' ');
            push_astring(&mut stream, &mut lines, cmd, password, caps.literal_plus).await?;
            cmd.extend_from_slice(b"\r\n");
            stream.write_all(cmd).await?;
        }
        BackendLogin::Master { user: master, password } => {
            let (user, master, password) = (user.as_bytes(), master.as_bytes(), password.as_bytes());
            if caps.sasl_ir {
                stream.write_all(plain_response(b"P3 AUTHENTICATE PLAIN ", user, master, password).expose()).await?;
            } else {
                stream.write_all(b"P3 AUTHENTICATE PLAIN\r\n").await?;
                let l = lines.line(&mut stream).await?;
                if !l.starts_with(b"+") {
                    return Err(BackendError::Protocol("no continuation for AUTHENTICATE"));
                }
                stream.write_all(plain_response(b"", user, master, password).expose()).await?;
            }
        }
    }
    stream.flush().await?;

    let mut untagged = Vec::new();
    loop {
        let l = lines.line(&mut stream).await?;
        if let Some(rest) = l.strip_prefix(b"P3 ") {
            if starts_with_ci(rest, b"OK") {
                let reply = rest.to_vec();
                return Ok(LoggedIn { stream, untagged, reply, leftover: lines.into_leftover(), extensions: None });
            }
            return Err(refusal(rest));
        }
        if l.starts_with(b"* BYE") {
            return Err(BackendError::LoginRefused);
        }
        if l.starts_with(b"*") {
            // Reliability case 68: untagged data with the login reply is forwarded.
            if untagged.len() + l.len() > MAX_BACKEND_LINE {
                return Err(BackendError::Protocol("too much untagged data at login"));
            }
            untagged.extend_from_slice(&l);
        } else {
            // Also a "+": nothing is left to send (literals are done, SASL-IR went whole), and
            // waiting would hold the client until the backend login times out.
            return Err(BackendError::Protocol("unexpected line at login"));
        }
    }
}

/// What the backend's tagged non-OK reply to the login (after the tag) means.
fn refusal(rest: &[u8]) -> BackendError {
    if starts_with_ci(rest, b"NO [UNAVAILABLE]") || starts_with_ci(rest, b"NO [SERVERBUG]") {
        return BackendError::LoginRefused;
    }
    if starts_with_ci(rest, b"NO [INUSE]") {
        return BackendError::InUse;
    }
    // NO, and also BAD: a server may call a user name it cannot parse a bad command, and a
    // client chooses user names; counting that against the backend's health would let anyone
    // mark it down.
    BackendError::Rejected
}

/// Append one IMAP astring argument to `cmd`: a quoted string when it is plain ASCII, else a
/// literal (`{n+}` with LITERAL+; otherwise `cmd` so far is sent with a synchronising literal's
/// header, and the value follows the backend's "+").
async fn push_astring<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    cmd: &mut Vec<u8>,
    value: &[u8],
    literal_plus: bool,
) -> Result<(), BackendError> {
    if value.iter().all(|b| (0x20..0x7f).contains(b)) {
        quoted(cmd, value);
        return Ok(());
    }
    if literal_plus {
        cmd.extend_from_slice(format!("{{{}+}}\r\n", value.len()).as_bytes());
    } else {
        cmd.extend_from_slice(format!("{{{}}}\r\n", value.len()).as_bytes());
        s.write_all(cmd).await?;
        s.flush().await?;
        crate::auth::wipe(cmd);
        let l = lines.line(s).await?;
        if !l.starts_with(b"+") {
            // The backend answered the command before the value was sent: classify its reply
            // like the login's own, never as the user's wrong password by default.
            return Err(match l.strip_prefix(b"P3 ") {
                Some(rest) => refusal(rest),
                None if l.starts_with(b"* BYE") => BackendError::LoginRefused,
                None => BackendError::Protocol("no continuation for a literal at login"),
            });
        }
    }
    cmd.extend_from_slice(value);
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

/// The capabilities the login step cares about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Caps {
    id: bool,
    sasl_ir: bool,
    literal_plus: bool,
    login_disabled: bool,
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
            } else if word.eq_ignore_ascii_case(b"LOGINDISABLED") {
                c.login_disabled = true;
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
        let c = capability_code(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n").unwrap();
        assert!(c.login_disabled && !c.literal_plus);
    }

    #[test]
    fn login_refusals() {
        assert!(matches!(refusal(b"NO [UNAVAILABLE] later\r\n"), BackendError::LoginRefused));
        assert!(matches!(refusal(b"no [serverbug] oops\r\n"), BackendError::LoginRefused));
        assert!(matches!(refusal(b"NO [INUSE] busy\r\n"), BackendError::InUse));
        assert!(matches!(refusal(b"NO [AUTHENTICATIONFAILED] no\r\n"), BackendError::Rejected));
        assert!(matches!(refusal(b"BAD parse error\r\n"), BackendError::Rejected));
    }
}
