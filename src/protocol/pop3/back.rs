//! POP3 toward a backend, up to and including the login: greeting, optional STLS, Dovecot's
//! `XCLIENT` with the client's address, then the client's USER/PASS replayed (as one AUTH PLAIN
//! to backends whose CAPA lists SASL PLAIN) or a master-user AUTH PLAIN.
//!
//! Dovecot announces XCLIENT in its greeting (`+OK [XCLIENT] ...`) to trusted networks only; a
//! backend configured for XCLIENT that does not announce it fails closed, so an operator never
//! silently loses client addresses.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use base64::Engine;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::auth::Credentials;
use crate::backend::{self, BackendError, ClientInfo, Lines, LoggedIn, starts_with_ci};
use crate::config::{Backend, BackendLogin, ClientAddress, Transport};

/// Dovecot's loop guard: each proxy hop decrements it.
const PROXY_TTL: u32 = 5;

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
    if !greeting.starts_with(b"+OK") {
        return Err(if greeting.starts_with(b"-ERR") {
            BackendError::Refused
        } else {
            BackendError::Protocol("unexpected greeting")
        });
    }
    let xclient = greeting.windows(9).any(|w| w.eq_ignore_ascii_case(b"[XCLIENT]"));

    if backend.transport == Transport::StartTls {
        stream.write_all(b"STLS\r\n").await?;
        if !lines.line(&mut stream).await?.starts_with(b"+OK") {
            return Err(BackendError::Protocol("backend refused STLS"));
        }
        stream = backend::starttls(backend, tls.as_ref(), stream, &lines).await?;
    }

    if backend.client_address == ClientAddress::Xclient {
        if !xclient {
            return Err(BackendError::Protocol(
                "backend does not offer XCLIENT (is the proxy in login_trusted_networks?)",
            ));
        }
        let cmd = format!(
            "XCLIENT ADDR={} PORT={} SESSION={} TTL={PROXY_TTL}\r\n",
            client.peer.ip(),
            client.peer.port(),
            client.session_id
        );
        stream.write_all(cmd.as_bytes()).await?;
        if !lines.line(&mut stream).await?.starts_with(b"+OK") {
            return Err(BackendError::Protocol("backend rejected XCLIENT"));
        }
    }

    let reply = match &backend.login {
        BackendLogin::Replay | BackendLogin::Xclient => {
            let password = creds.password.expose();
            if !line_safe(creds.user.as_bytes()) || !line_safe(password) {
                // USER/PASS carry their argument to the end of the line: a CR or LF would
                // inject a command (and a NUL would split SASL PLAIN's fields). Such credentials
                // cannot be replayed.
                return Err(BackendError::Rejected);
            }
            if sasl_plain(&mut stream, &mut lines, &backend.address).await? {
                // One command and one reply, where USER and PASS take two round trips.
                auth_plain(&mut stream, &mut lines, b"", creds.user.as_bytes(), password).await?
            } else {
                command(&mut stream, &mut lines, &[b"USER ", creds.user.as_bytes()]).await?;
                command(&mut stream, &mut lines, &[b"PASS ", password]).await?
            }
        }
        BackendLogin::Master { user: master, password } => {
            auth_plain(&mut stream, &mut lines, user.as_bytes(), master.as_bytes(), password.as_bytes()).await?
        }
    };
    Ok(LoggedIn { stream, untagged: Vec::new(), reply, leftover: lines.into_leftover(), extensions: None })
}

/// Send one command and return its `+OK` line; `-ERR` is the backend's verdict.
async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    parts: &[&[u8]],
) -> Result<Vec<u8>, BackendError> {
    send(s, parts).await?;
    verdict(lines.line(s).await?)
}

/// Write `parts` and a line end in one write; the buffer is wiped (it may hold a password).
async fn send<S: AsyncWrite + Unpin>(s: &mut S, parts: &[&[u8]]) -> Result<(), BackendError> {
    let mut cmd = Vec::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 2);
    for p in parts {
        cmd.extend_from_slice(p);
    }
    cmd.extend_from_slice(b"\r\n");
    let written = s.write_all(&cmd).await;
    crate::auth::wipe(&mut cmd);
    written?;
    s.flush().await?;
    Ok(())
}

fn verdict(reply: Vec<u8>) -> Result<Vec<u8>, BackendError> {
    if reply.starts_with(b"+OK") {
        return Ok(reply);
    }
    if starts_with_ci(&reply, b"-ERR [SYS/TEMP]") || starts_with_ci(&reply, b"-ERR [IN-USE]") {
        return Err(BackendError::Refused);
    }
    if reply.starts_with(b"-ERR") {
        return Err(BackendError::Rejected);
    }
    Err(BackendError::Protocol("unexpected reply at login"))
}

/// `AUTH PLAIN` with the initial response (RFC 5034): `authz` acting as `authc` with `password`.
/// The buffers holding the password are wiped.
async fn auth_plain<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    authz: &[u8],
    authc: &[u8],
    password: &[u8],
) -> Result<Vec<u8>, BackendError> {
    let mut msg = Vec::with_capacity(authz.len() + authc.len() + password.len() + 2);
    msg.extend_from_slice(authz);
    msg.push(0);
    msg.extend_from_slice(authc);
    msg.push(0);
    msg.extend_from_slice(password);
    let mut b64 = base64::engine::general_purpose::STANDARD.encode(&msg).into_bytes();
    crate::auth::wipe(&mut msg);
    let reply = command(s, lines, &[b"AUTH PLAIN ", &b64]).await;
    crate::auth::wipe(&mut b64);
    reply
}

/// Whether the backend at `address` takes `AUTH PLAIN` (its CAPA list has `SASL ... PLAIN`,
/// RFC 2449/5034). Asked with one `CAPA` at the first login to each address (after STLS, which
/// may change the list) and remembered, so later logins replay the client's USER and PASS as
/// one AUTH PLAIN: one backend round trip less per login. (USER and PASS pipelined in one write
/// would save the same round trip, but Dovecot then writes its two replies back to back without
/// TCP_NODELAY, and the second waits about 40 ms for the proxy's delayed ACK.)
async fn sasl_plain<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    lines: &mut Lines,
    address: &str,
) -> Result<bool, BackendError> {
    if let Some(known) = known_sasl_plain().get(address) {
        return Ok(*known);
    }
    send(s, &[b"CAPA"]).await?;
    let mut plain = false;
    if lines.line(s).await?.starts_with(b"+OK") {
        let mut n = 0;
        loop {
            let line = lines.line(s).await?;
            let item = line.strip_suffix(b"\r\n").or_else(|| line.strip_suffix(b"\n")).unwrap_or(&line);
            if item == b"." {
                break;
            }
            n += 1;
            if n > MAX_CAPA_LINES {
                return Err(BackendError::Protocol("CAPA list too long"));
            }
            let mut words = item.split(|b| *b == b' ').filter(|w| !w.is_empty());
            if words.next().is_some_and(|w| w.eq_ignore_ascii_case(b"SASL")) {
                plain |= words.any(|w| w.eq_ignore_ascii_case(b"PLAIN"));
            }
        }
    }
    let mut known = known_sasl_plain();
    if known.len() >= MAX_KNOWN_BACKENDS {
        // Addresses named by an auth service can be many: start over rather than grow.
        known.clear();
    }
    known.insert(address.to_string(), plain);
    Ok(plain)
}

const MAX_CAPA_LINES: usize = 64;
const MAX_KNOWN_BACKENDS: usize = 4096;

fn known_sasl_plain() -> MutexGuard<'static, HashMap<String, bool>> {
    static KNOWN: LazyLock<Mutex<HashMap<String, bool>>> = LazyLock::new(Default::default);
    // A panic elsewhere while holding the lock leaves a valid map: keep using it.
    KNOWN.lock().unwrap_or_else(|e| e.into_inner())
}

fn line_safe(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}
