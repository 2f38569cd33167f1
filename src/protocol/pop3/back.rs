//! POP3 toward a backend, up to and including the login: greeting, optional STLS, Dovecot's
//! `XCLIENT` with the client's address, then USER/PASS replay or a master-user AUTH PLAIN.
//!
//! Dovecot announces XCLIENT in its greeting (`+OK [XCLIENT] ...`) to trusted networks only; a
//! backend configured for XCLIENT that does not announce it fails closed, so an operator never
//! silently loses client addresses.

use std::sync::Arc;

use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;

use crate::auth::Credentials;
use crate::backend::{self, BackendError, ClientInfo, Lines, LoggedIn, starts_with_ci, warn_once};
use crate::config::{Backend, BackendLogin, ClientAddress, Transport};
use crate::protocol::sasl::plain_response;

use crate::backend::PROXY_TTL;

const NO_XCLIENT: &str = "POP3 backend named by the auth service does not announce XCLIENT: it sees the proxy's \
    address, not the client's (answer with Auth-Client-Address: xclient to refuse such backends)";

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
    let xclient_offered = greeting.windows(9).any(|w| w.eq_ignore_ascii_case(b"[XCLIENT]"));

    if backend.transport == Transport::StartTls {
        stream.write_all(b"STLS\r\n").await?;
        if !lines.line(&mut stream).await?.starts_with(b"+OK") {
            return Err(BackendError::Protocol("backend refused STLS"));
        }
        stream = backend::starttls(backend, tls.as_ref(), stream, &lines).await?;
    }

    // The login goes out in writes, each answered in full before the next. A backend that
    // announces XCLIENT in its greeting is Dovecot, which takes pipelined commands (it announces
    // PIPELINING, RFC 2449), so XCLIENT and USER share a write: a round trip less per login. The
    // last command (PASS, or AUTH) waits for the replies before it and so carries their ACK:
    // pipelined too, it made each login wait about 40 ms, its reply held by the backend's Nagle
    // algorithm until our delayed ACK (measured against Dovecot; docs/performance.md). Other
    // backends get one command at a time, as nginx sends them.
    let mut first = Batch::default();
    let xclient = match backend.client_address {
        ClientAddress::Xclient if !xclient_offered => {
            return Err(BackendError::Protocol(
                "backend does not offer XCLIENT (is the proxy in login_trusted_networks?)",
            ));
        }
        ClientAddress::Xclient => true,
        ClientAddress::XclientIfAnnounced if !xclient_offered => {
            warn_once(backend, NO_XCLIENT);
            false
        }
        ClientAddress::XclientIfAnnounced => true,
        _ => false,
    };
    // A health check's login is the proxy's own connection: there is no client address to tell
    // (and Dovecot refuses the port 0 of a made-up one: every check would fail).
    let send_xclient = xclient && !client.probe;
    if send_xclient {
        let cmd = format!(
            "XCLIENT ADDR={} PORT={} SESSION={} TTL={PROXY_TTL}",
            client.peer.ip(),
            client.peer.port(),
            client.session_id
        );
        first.add(&[cmd.as_bytes()]);
    }
    let mut last = Batch::default();
    match &backend.login {
        BackendLogin::Replay | BackendLogin::Xclient => {
            let password = creds.password.expose();
            if !line_safe(creds.user.as_bytes()) || !line_safe(password) {
                // USER/PASS carry their argument to the end of the line: a CR or LF would
                // inject a command. Such credentials cannot be replayed.
                return Err(BackendError::Rejected);
            }
            first.add(&[b"USER ", creds.user.as_bytes()]);
            last.add(&[b"PASS ", password]);
        }
        BackendLogin::Master { user: master, password } => {
            let line = plain_response(b"AUTH PLAIN ", user.as_bytes(), master.as_bytes(), password.as_bytes());
            let line = line.expose();
            last.add(&[&line[..line.len() - 2]]);
        }
    }
    let mut xclient_reply_due = send_xclient;
    let mut reply = Vec::new();
    for batch in [&first, &last] {
        if batch.replies == 0 {
            continue;
        }
        stream.write_all(&batch.bytes).await?;
        stream.flush().await?;
        for _ in 0..batch.replies {
            reply = lines.line(&mut stream).await?;
            if std::mem::take(&mut xclient_reply_due) {
                if !reply.starts_with(b"+OK") {
                    return Err(BackendError::Protocol("backend rejected XCLIENT"));
                }
            } else {
                verdict(&reply)?;
            }
        }
    }
    Ok(LoggedIn { stream, untagged: Vec::new(), reply, leftover: lines.into_leftover(), extensions: None })
}

/// Login commands sent in one write, and how many replies they get. The bytes may hold a
/// password: they are zeroed when dropped, whichever way the login ends.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    replies: usize,
}

impl Batch {
    /// Append one command line (its parts, then CRLF).
    fn add(&mut self, parts: &[&[u8]]) {
        // Reserved before copying: a line holding a password is always alone in its batch
        // (PASS, AUTH), so it is never left behind, unzeroed, by a reallocation.
        self.bytes.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 2);
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        self.bytes.extend_from_slice(b"\r\n");
        self.replies += 1;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        crate::auth::wipe(&mut self.bytes);
    }
}

/// A login command's reply: `+OK` goes on, `-ERR` is the backend's verdict on the credentials,
/// but for what RFC 3206 and Dovecot say is not about them.
fn verdict(reply: &[u8]) -> Result<(), BackendError> {
    if reply.starts_with(b"+OK") {
        return Ok(());
    }
    if starts_with_ci(reply, b"-ERR [IN-USE]") {
        return Err(BackendError::InUse);
    }
    if starts_with_ci(reply, b"-ERR [SYS/TEMP]") {
        return Err(BackendError::LoginRefused);
    }
    // RFC 3206: a failure of the server's, not of the credentials (an internal error, POP
    // access not enabled for the user): not a guess to throttle or report to fail2ban, and,
    // possibly one user's condition, not counted against the backend either.
    // RFC 2449 (8.1.1): the user logged in too recently to log in again yet (a login delay
    // some ISPs enforce); the user's own state, for now, not a wrong password.
    if starts_with_ci(reply, b"-ERR [SYS/PERM]") || starts_with_ci(reply, b"-ERR [LOGIN-DELAY]") {
        return Err(BackendError::LoginRefused);
    }
    // Dovecot's refusal of USER on a link it calls insecure (disable_plaintext_auth, the proxy
    // not trusted): the backend's configuration, which would otherwise fail every user's login
    // as a wrong password.
    if reply.windows(PLAINTEXT_REFUSED.len()).any(|w| w.eq_ignore_ascii_case(PLAINTEXT_REFUSED)) {
        return Err(BackendError::Protocol("backend refuses plaintext logins (use starttls or tls)"));
    }
    if reply.starts_with(b"-ERR") {
        return Err(BackendError::Rejected);
    }
    Err(BackendError::Protocol("unexpected reply at login"))
}

/// Dovecot's words for a plaintext login it will not take ("-ERR [AUTH] Plaintext
/// authentication disallowed on non-secure (SSL/TLS) connections.").
const PLAINTEXT_REFUSED: &[u8] = b"Plaintext authentication disallowed";

fn line_safe(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}
