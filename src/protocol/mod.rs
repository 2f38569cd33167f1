//! Protocol front ends (the pre-auth dialogue the proxy speaks itself), backend login clients,
//! and what they share: events, failure kinds, the SASL decoder and the line reader.
//!
//! `Front` is the one type the session drives: an enum over the three protocols, so the pipeline
//! in `session.rs` is written once.

pub mod imap;
pub mod line;
pub mod pop3;
pub mod sasl;
pub mod smtp;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::auth::Credentials;
use crate::config::Protocol;

/// What a front end needs to know about its connection.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// TLS is active on this connection (implicit, or after STARTTLS).
    pub tls_active: bool,
    /// STARTTLS/STLS may be offered (a `starttls` listener before the upgrade).
    pub starttls_offered: bool,
    /// Credentials may be accepted now.
    pub auth_allowed: bool,
    /// SASL EXTERNAL may be offered: TLS with an accepted client certificate, and an auth
    /// service to decide what it is worth.
    pub external: bool,
    pub max_line: u32,
    pub max_errors: u32,
    pub idle_timeout: Duration,
    /// Minimum progress: a started command must be complete within this.
    pub command_timeout: Duration,
    /// SMTP: the proxy's name for the greeting and EHLO reply.
    pub hostname: String,
    /// SMTP: the extensions the backend announces (honest EHLO), already filtered.
    pub extensions: Arc<[String]>,
    /// SMTP: wait this long before greeting; a client that talks first is refused.
    pub greeting_delay: Duration,
}

/// Why a front end ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    Logout,
    TooManyErrors,
    IdleTimeout,
    LineTooLong,
    HttpRequest,
    StartTlsInjection,
    EarlyTalker,
    /// SMTP BDAT before login: its chunk would otherwise be read as commands.
    ChunkBeforeLogin,
    /// IMAP: a non-synchronizing literal in a SASL response, whose bytes cannot be told from
    /// the commands after them.
    SaslLiteral,
}

/// A close decided inside a nested dialogue (a SASL exchange, whose reader returns its response
/// or an error), carried out as an `io::Error` and turned back into `Event::Closed` by
/// `closed_event`: the session then logs it as what it was and shuts the connection down as for
/// any other close, not as a client's I/O error.
#[derive(Debug)]
struct Closed(CloseReason);

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl std::error::Error for Closed {}

/// The error a nested dialogue returns to close the connection for `reason`.
pub(crate) fn closed(reason: CloseReason) -> io::Error {
    io::Error::other(Closed(reason))
}

/// A front end's event, with a close decided by a nested dialogue (`closed`) as the event.
pub(crate) fn closed_event(event: io::Result<Event>) -> io::Result<Event> {
    match event {
        Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<Closed>()) {
            Some(Closed(reason)) => Ok(Event::Closed(*reason)),
            None => Err(e),
        },
        ok => ok,
    }
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::Logout => "logout",
            CloseReason::TooManyErrors => "too_many_errors",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LineTooLong => "line_too_long",
            CloseReason::HttpRequest => "http_request",
            CloseReason::StartTlsInjection => "starttls_injection",
            CloseReason::EarlyTalker => "early_talker",
            CloseReason::ChunkBeforeLogin => "chunk_before_login",
            CloseReason::SaslLiteral => "sasl_literal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// IMAP LOGIN or POP3 USER/PASS.
    Login,
    Plain,
    SaslLogin,
    /// SASL EXTERNAL (RFC 4422 appendix A): the client certificate vouches, the client names the
    /// user, there is no password. Offered only with an accepted client certificate and an auth
    /// service to judge it.
    External,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::SaslLogin => "sasl-login",
            Mechanism::External => "external",
        }
    }
}

#[derive(Debug)]
pub struct LoginRequest {
    pub mechanism: Mechanism,
    /// `None` when the client sent malformed credentials: answered like a wrong password.
    pub credentials: Option<Credentials>,
}

#[derive(Debug)]
pub enum Event {
    /// The upgrade was accepted and no plaintext is buffered: start TLS on the socket now.
    StartTls,
    Login(LoginRequest),
    Closed(CloseReason),
}

/// How a failed login is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    /// Wrong user, wrong password, malformed credentials: one answer for all.
    BadCredentials,
    /// The backend could not be reached or failed: the client may retry.
    Unavailable,
    /// The auth service's own text (already made printable and bounded), for SMTP its reply
    /// code, and whether the client may retry (POP3 then says `[SYS/TEMP]`, else `[AUTH]`).
    Message { text: String, smtp_code: Option<String>, temporary: bool },
    /// Too many failures from this address or for this user: come back later.
    Throttled,
    /// The backend says another session holds the user's mailbox.
    InUse,
}

/// Final words before the proxy closes a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    Shutdown,
    TooManyConnections,
    LoginTimeout,
    TooManyFailures,
    LineTooLong,
    /// The listener requires a client certificate and the client sent none.
    NoCertificate,
    /// The client's certificate was refused.
    CertificateError,
    /// After login, the client sent a command only the proxy may send (SMTP XCLIENT, XFORWARD).
    RefusedCommand,
    /// After login, nothing went either way for `idle_timeout` (the lines Dovecot and Postfix
    /// close with; RFC 5321 §3.8 has a server close only after a 421).
    Idle,
    /// The session reached `max_session_duration`: not a shutdown, which clients may report
    /// as the server's outage.
    MaxDuration,
}

/// Client facts a front end learned that a backend may be told.
#[derive(Debug, Clone, Default)]
pub struct ClientHints {
    pub id_fields: Vec<(String, String)>,
    pub helo: Option<String>,
    pub esmtp: bool,
}

pub enum Front {
    Imap(imap::front::ImapFront),
    Pop3(pop3::front::Pop3Front),
    Smtp(smtp::front::SmtpFront),
}

impl Front {
    pub fn new(protocol: Protocol, settings: FrontSettings) -> Front {
        match protocol {
            Protocol::Imap => Front::Imap(imap::front::ImapFront::new(settings)),
            Protocol::Pop3 => Front::Pop3(pop3::front::Pop3Front::new(settings)),
            Protocol::Smtp => Front::Smtp(smtp::front::SmtpFront::new(settings)),
        }
    }

    /// The greeting when it does not depend on anything the client does first (not for an SMTP
    /// listener that waits to catch early talkers). With implicit TLS it is handed to rustls
    /// before the handshake and leaves with the server's first flight (TLS 1.3 half-RTT data).
    pub fn immediate_greeting(&self) -> Option<Vec<u8>> {
        match self {
            Front::Imap(f) => Some(f.greeting()),
            Front::Pop3(_) => Some(pop3::front::Pop3Front::GREETING.to_vec()),
            Front::Smtp(f) => f.immediate_greeting(),
        }
    }

    /// Send the greeting. `Some(reason)` means the connection must close (SMTP early talker).
    pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Option<CloseReason>> {
        match self {
            Front::Imap(f) => f.greet(s).await.map(|_| None),
            Front::Pop3(f) => f.greet(s).await.map(|_| None),
            Front::Smtp(f) => f.greet(s).await,
        }
    }

    /// Run the pre-auth dialogue until something the session must act on.
    pub async fn next_event<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        match self {
            Front::Imap(f) => f.next_event(s).await,
            Front::Pop3(f) => f.next_event(s).await,
            Front::Smtp(f) => f.next_event(s).await,
        }
    }

    /// Protocol errors counted so far toward `max_errors`.
    pub fn errors(&self) -> u32 {
        match self {
            Front::Imap(f) => f.errors,
            Front::Pop3(f) => f.d.errors,
            Front::Smtp(f) => f.d.errors,
        }
    }

    /// Start counting from the errors of the front end this one replaces after STARTTLS: the
    /// connection has `max_errors` in all, as in nginx, not again after each upgrade.
    pub fn carry_errors(&mut self, errors: u32) {
        match self {
            Front::Imap(f) => f.errors = errors,
            Front::Pop3(f) => f.d.errors = errors,
            Front::Smtp(f) => f.d.errors = errors,
        }
    }

    /// Answer the pending login with a failure (the caller applies the delay first).
    pub async fn login_failed<S: AsyncWrite + Unpin>(&mut self, s: &mut S, failure: LoginFailure) -> io::Result<()> {
        match self {
            Front::Imap(f) => f.login_failed(s, failure).await,
            Front::Pop3(f) => f.login_failed(s, failure).await,
            Front::Smtp(f) => f.login_failed(s, failure).await,
        }
    }

    /// What the client is told when the backend accepted the login: IMAP and POP3 pass on the
    /// backend's own reply; SMTP answers `235` itself.
    pub fn success_reply(&self, untagged: Vec<u8>, reply: Vec<u8>) -> Vec<u8> {
        match self {
            Front::Imap(f) => f.success_reply(untagged, reply),
            Front::Pop3(_) => reply,
            Front::Smtp(_) => b"235 2.7.0 Authentication successful\r\n".to_vec(),
        }
    }

    /// Bytes the client pipelined after its login, to forward verbatim (reliability case 25).
    /// `None` if they could not be kept whole.
    pub fn into_pipelined(self) -> Option<Vec<u8>> {
        match self {
            Front::Imap(f) => f.into_pipelined(),
            Front::Pop3(f) => Some(f.into_pipelined()),
            Front::Smtp(f) => Some(f.into_pipelined()),
        }
    }

    pub fn hints(&self) -> ClientHints {
        match self {
            Front::Imap(f) => ClientHints { id_fields: f.client_id().to_vec(), ..ClientHints::default() },
            Front::Pop3(_) => ClientHints::default(),
            Front::Smtp(f) => f.hints(),
        }
    }

    pub fn goodbye(&self, why: Goodbye) -> &'static [u8] {
        let protocol = match self {
            Front::Imap(_) => Protocol::Imap,
            Front::Pop3(_) => Protocol::Pop3,
            Front::Smtp(_) => Protocol::Smtp,
        };
        goodbye(protocol, why)
    }
}

/// The line a session is closed with, for `why`.
pub fn goodbye(protocol: Protocol, why: Goodbye) -> &'static [u8] {
    match (protocol, why) {
        (Protocol::Imap, Goodbye::Shutdown) => b"* BYE Server shutting down.\r\n",
        (Protocol::Imap, Goodbye::TooManyConnections) => b"* BYE Too many connections, try again later.\r\n",
        // RFC 3206 SYS/TEMP: a temporary condition of the server. IN-USE (RFC 2449) means the
        // maildrop is locked, which some clients show as such.
        (Protocol::Pop3, Goodbye::TooManyConnections) => b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n",
        (Protocol::Smtp, Goodbye::TooManyConnections) => b"421 4.7.0 Too many connections, try again later\r\n",
        (Protocol::Imap, Goodbye::LoginTimeout) => b"* BYE Login timed out.\r\n",
        (Protocol::Pop3, Goodbye::LoginTimeout) => b"-ERR Login timed out.\r\n",
        (Protocol::Smtp, Goodbye::LoginTimeout) => b"421 4.4.2 Error: login timed out, closing connection\r\n",
        (Protocol::Imap, Goodbye::TooManyFailures) => b"* BYE Too many failed logins.\r\n",
        (Protocol::Imap, Goodbye::LineTooLong) => b"* BYE Command line too long.\r\n",
        (Protocol::Pop3, Goodbye::Shutdown) => b"-ERR [SYS/TEMP] Server shutting down.\r\n",
        // POP3 has no unsolicited replies: a second `-ERR` after the failed login's own would be
        // read by a pipelining client as the answer to its next command. Just close.
        (Protocol::Pop3, Goodbye::TooManyFailures) => b"",
        (Protocol::Pop3, Goodbye::LineTooLong) => b"-ERR Line too long.\r\n",
        (Protocol::Smtp, Goodbye::Shutdown) => b"421 4.3.2 Service shutting down, closing connection\r\n",
        (Protocol::Smtp, Goodbye::TooManyFailures) => {
            b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n"
        }
        (Protocol::Smtp, Goodbye::LineTooLong) => b"421 4.7.0 Line too long, closing connection\r\n",
        // nginx's lines for a listener that wants a client certificate (reliability case 21).
        (Protocol::Imap, Goodbye::NoCertificate) => b"* BYE No required SSL certificate\r\n",
        (Protocol::Pop3, Goodbye::NoCertificate) => b"-ERR No required SSL certificate\r\n",
        (Protocol::Smtp, Goodbye::NoCertificate) => b"421 4.7.1 No required SSL certificate\r\n",
        (Protocol::Imap, Goodbye::CertificateError) => b"* BYE SSL certificate error\r\n",
        (Protocol::Pop3, Goodbye::CertificateError) => b"-ERR SSL certificate error\r\n",
        (Protocol::Smtp, Goodbye::CertificateError) => b"421 4.7.1 SSL certificate error\r\n",
        (Protocol::Imap, Goodbye::RefusedCommand) => b"* BYE Command not allowed after login.\r\n",
        (Protocol::Pop3, Goodbye::RefusedCommand) => b"-ERR Command not allowed after login.\r\n",
        (Protocol::Smtp, Goodbye::RefusedCommand) => {
            b"421 4.7.0 Command not allowed after login, closing connection\r\n"
        }
        (Protocol::Imap, Goodbye::Idle) => b"* BYE Disconnected for inactivity.\r\n",
        (Protocol::Pop3, Goodbye::Idle) => b"-ERR Disconnected for inactivity.\r\n",
        (Protocol::Smtp, Goodbye::Idle) => b"421 4.4.2 Error: timeout exceeded, closing connection\r\n",
        (Protocol::Imap, Goodbye::MaxDuration) => b"* BYE Session time limit reached.\r\n",
        (Protocol::Pop3, Goodbye::MaxDuration) => b"-ERR [SYS/TEMP] Session time limit reached.\r\n",
        (Protocol::Smtp, Goodbye::MaxDuration) => b"421 4.4.2 Session time limit reached, closing connection\r\n",
    }
}

/// Write and flush (TLS streams buffer until flushed).
pub async fn write<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// An HTTP request line or header arriving on a mail port (reliability case 18, ALPACA).
pub fn looks_like_http(line: &[u8]) -> bool {
    const METHODS: [&[u8]; 8] = [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"CONNECT ", b"OPTIONS ", b"DELETE ", b"PATCH "];
    METHODS.iter().any(|m| line.starts_with(m)) || (line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:"))
}

/// Drive front ends over scripted input without sockets: shared by the unit tests, the
/// proptest campaigns and the `fuzz/` targets.
#[doc(hidden)]
pub mod harness {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    pub fn settings() -> FrontSettings {
        FrontSettings {
            tls_active: false,
            starttls_offered: true,
            auth_allowed: true,
            external: false,
            max_line: 1024,
            max_errors: 5,
            idle_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            hostname: "proxy.example.test".into(),
            extensions: Arc::from(vec!["SIZE 1000".to_string(), "8BITMIME".to_string()]),
            greeting_delay: Duration::ZERO,
        }
    }

    /// A scripted client: yields its chunks, then EOF; records everything written to it.
    pub struct Script {
        chunks: VecDeque<Vec<u8>>,
        pub written: Vec<u8>,
    }

    impl Script {
        pub fn new(chunks: Vec<Vec<u8>>) -> Script {
            Script { chunks: chunks.into(), written: Vec::new() }
        }
    }

    impl AsyncRead for Script {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some(mut c) = self.chunks.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.chunks.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Split `bytes` at the given (wrapped) positions.
    pub fn split_at_all(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for c in cuts {
            out.push(bytes[last..c].to_vec());
            last = c;
        }
        out.push(bytes[last..].to_vec());
        out.retain(|c| !c.is_empty());
        out
    }

    /// Drive any front end over `chunks`, failing every login; returns its output and events.
    pub fn run_front(protocol: Protocol, settings: FrontSettings, chunks: Vec<Vec<u8>>) -> (Vec<u8>, Vec<String>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async move {
            let mut s = Script::new(chunks);
            let mut front = Front::new(protocol, settings);
            let mut events = Vec::new();
            if let Ok(Some(r)) = front.greet(&mut s).await {
                return (s.written, vec![format!("closed {}", r.as_str())]);
            }
            for _ in 0..10_000 {
                match front.next_event(&mut s).await {
                    Ok(Event::Login(req)) => {
                        events.push(format!("login {:?}", req.credentials.map(|c| c.user)));
                        front.login_failed(&mut s, LoginFailure::BadCredentials).await.unwrap();
                    }
                    Ok(Event::StartTls) => {
                        events.push("starttls".into());
                        break;
                    }
                    Ok(Event::Closed(r)) => {
                        events.push(format!("closed {}", r.as_str()));
                        break;
                    }
                    Err(e) => {
                        events.push(format!("error {:?}", e.kind()));
                        break;
                    }
                }
            }
            (s.written, events)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    pub use super::harness::*;
}
