//! IMAP before authentication: the proxy speaks IMAP itself and nothing reaches a backend.
//!
//! Lifecycle: `greet` → `next_event` until it yields `StartTls` (the caller upgrades the socket
//! and builds a fresh front end: pre-TLS state is forgotten), `Login` (the caller verifies, then
//! either `login_failed` and loops, or `success_reply` + `into_pipelined` and starts relaying) or
//! `Closed`. The tag of the pending login is kept here, so the session stays protocol-agnostic.
//!
//! Framing is imap-codec's `Fragmentizer` (bounded lines and literals); decoding is its
//! `CommandCodec`, and the allow-list of pre-auth commands is ours, because the decoder is
//! state-blind. Replies are fixed strings: client input is never echoed, except the tag, which
//! the codec has already checked to be an atom.

use std::io;

use imap_codec::fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer, LineEnding};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::auth::Credentials;
use crate::protocol::{
    CloseReason, Event, FrontSettings, LoginFailure, LoginRequest, Mechanism, looks_like_http, sasl, write,
};

/// Read size for pre-auth input; the Fragmentizer only gets more when it asks for it.
const READ_CHUNK: usize = 4096;
/// Limits of RFC 2971 as Dovecot applies them to forwarded ID fields.
const MAX_ID_PAIRS: usize = 20;
const MAX_ID_KEY: usize = 30;
const MAX_ID_VALUE: usize = 1024;
/// Most bytes of the client's ID fields, quoted as they go to the backend: its ID line stays
/// far under the 8 KiB a backend reads before login (Dovecot's limit), whatever the client
/// sends within its own line limit (quoting can double a value).
const MAX_ID_BYTES: usize = 2048;
/// Why a command other than those of the login dialogue is refused.
const NOT_PERMITTED: &str = "Command not permitted before authentication.";

/// Why LOGIN and AUTHENTICATE are refused before TLS.
const PRIVACY_REQUIRED: &str = "[PRIVACYREQUIRED] Authentication disallowed on non-secure connections, use STARTTLS.";

pub struct ImapFront {
    settings: FrontSettings,
    frag: Fragmentizer,
    pub(crate) errors: u32,
    /// The client's own ID fields (minus any `x-` field), kept to forward to the backend.
    client_id: Vec<(String, String)>,
    /// Tag of the login command being decided.
    pending_tag: String,
    /// When the command being received started (minimum-progress rule).
    partial_since: Option<tokio::time::Instant>,
}

/// One decoded, owned pre-auth action (so the Fragmentizer borrow ends before we write).
enum Action {
    Capability(String),
    Noop(String),
    Logout(String),
    Id(String, Vec<(String, String)>),
    StartTls(String),
    Login(String, Option<Credentials>),
    Authenticate(String, Option<Mechanism>, Option<Vec<u8>>),
    NotAllowed(String),
    Bad(Option<String>),
}

enum SaslLine {
    Data(Vec<u8>),
    Cancel,
    Bad,
}

/// The command size below which LITERAL- is not offered.
const LITERAL_MINUS_LINE: usize = 4096 + 256;

impl ImapFront {
    pub fn new(settings: FrontSettings) -> ImapFront {
        ImapFront {
            frag: Fragmentizer::new(settings.max_line),
            settings,
            errors: 0,
            client_id: Vec::new(),
            pending_tag: String::new(),
            partial_since: None,
        }
    }

    pub fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR ID");
        // RFC 7888: LITERAL- promises non-synchronizing literals up to 4096 octets (a command
        // with one such and room to spare must fit max_line_length); LITERAL+ would promise any
        // size, and one over max_line_length closes the connection.
        if self.settings.max_line as usize >= LITERAL_MINUS_LINE {
            caps.push_str(" LITERAL-");
        }
        if self.settings.starttls_offered && !self.settings.tls_active {
            caps.push_str(" STARTTLS");
        }
        if self.settings.auth_allowed {
            caps.push_str(" AUTH=PLAIN AUTH=LOGIN");
            if self.settings.external {
                caps.push_str(" AUTH=EXTERNAL");
            }
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    pub async fn greet<S: AsyncWrite + Unpin>(&self, s: &mut S) -> io::Result<()> {
        write(s, &self.greeting()).await
    }

    pub fn greeting(&self) -> Vec<u8> {
        format!("* OK [CAPABILITY {}] IMAP proxy ready.\r\n", self.capabilities()).into_bytes()
    }

    /// The client's ID fields to forward (never containing `x-` keys).
    pub fn client_id(&self) -> &[(String, String)] {
        &self.client_id
    }

    /// Run the pre-auth dialogue until something the caller must act on.
    pub async fn next_event<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        crate::protocol::closed_event(self.events(s).await)
    }

    async fn events<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        loop {
            if self.errors >= self.settings.max_errors {
                write(s, b"* BYE Too many invalid IMAP commands.\r\n").await?;
                return Ok(Event::Closed(CloseReason::TooManyErrors));
            }
            let info = match self.frag.progress() {
                Some(info) => info,
                None if self.frag.is_max_message_size_exceeded() => {
                    // Reliability case 28: a line that never ends is cut off at the limit.
                    write(s, b"* BYE Command line too long.\r\n").await?;
                    return Ok(Event::Closed(CloseReason::LineTooLong));
                }
                None => match self.fill(s).await? {
                    Fill::Data => continue,
                    Fill::Eof => return Ok(Event::Closed(CloseReason::ClientClosed)),
                    Fill::Timeout => {
                        write(s, b"* BYE Disconnected for inactivity.\r\n").await?;
                        return Ok(Event::Closed(CloseReason::IdleTimeout));
                    }
                },
            };
            if let FragmentInfo::Line { ending: LineEnding::Lf, .. } = info {
                // Reliability case 28: one line terminator everywhere, CRLF.
                self.frag.poison_message();
            }
            if let FragmentInfo::Line { announcement: Some(ann), .. } = info {
                if self.frag.is_max_message_size_exceeded() {
                    // Reliability case 27: a line already over the limit is not saved by the
                    // literal it announces at its end.
                    write(s, b"* BYE Command line too long.\r\n").await?;
                    return Ok(Event::Closed(CloseReason::LineTooLong));
                }
                // With room for the CRLF that must still follow it: a "+" for a literal that
                // only fits without it would invite data the limit then refuses (case 29).
                let used = self.frag.message_bytes().len() as u64;
                if u64::from(ann.length) + used + 2 > u64::from(self.settings.max_line) {
                    // Reliability case 29/31: never send "+" for an oversized literal.
                    match ann.mode {
                        LiteralMode::Sync => {
                            let tag = self.frag.decode_tag().map(|t| t.as_ref().to_string());
                            self.frag.skip_message();
                            self.bad(s, tag.as_deref(), "Literal too large.").await?;
                            continue;
                        }
                        LiteralMode::NonSync => {
                            write(s, b"* BYE Literal too large.\r\n").await?;
                            return Ok(Event::Closed(CloseReason::LineTooLong));
                        }
                    }
                }
                if ann.mode == LiteralMode::Sync {
                    if self.frag.is_message_poisoned() {
                        // The client waits for "+" that will not come: refuse the whole command.
                        let tag = self.frag.decode_tag().map(|t| t.as_ref().to_string());
                        self.frag.skip_message();
                        self.bad(s, tag.as_deref(), "Error in IMAP command.").await?;
                        continue;
                    }
                    // Reliability cases 6/7: no "+" that asks for a name or password where
                    // LOGIN will be refused anyway (before TLS), nor for the literal of a command
                    // that is refused before login whatever it holds (an APPEND's message).
                    let verb = verb(self.frag.message_bytes());
                    let refusal = if verb.eq_ignore_ascii_case(b"LOGIN") {
                        (!self.settings.auth_allowed).then_some(PRIVACY_REQUIRED)
                    } else if verb.eq_ignore_ascii_case(b"ID") {
                        None
                    } else {
                        Some(NOT_PERMITTED)
                    };
                    if let Some(text) = refusal {
                        let tag = self.frag.decode_tag().map(|t| t.as_ref().to_string());
                        self.frag.skip_message();
                        // BAD here: the command is cut off mid-way, its literal never read.
                        match tag {
                            Some(tag) => self.bad(s, Some(&tag), text).await?,
                            None => self.bad(s, None, "Error in IMAP command.").await?,
                        }
                        continue;
                    }
                    write(s, b"+ Ready for literal data.\r\n").await?;
                }
                continue;
            }
            if !self.frag.is_message_complete() {
                continue;
            }
            // The next command's time starts when its own first bytes are read, even when they
            // came in the same read as this one's end (case 58).
            self.partial_since = None;
            if self.frag.is_max_message_size_exceeded() {
                // Reliability case 27: error and close, memory stays bounded.
                write(s, b"* BYE Command line too long.\r\n").await?;
                return Ok(Event::Closed(CloseReason::LineTooLong));
            }
            if looks_like_http(self.frag.message_bytes()) {
                // Reliability case 18 (ALPACA): an HTTP request on a mail port ends the session.
                return Ok(Event::Closed(CloseReason::HttpRequest));
            }
            let action = self.decode();
            match action {
                Action::Capability(tag) => {
                    let reply = format!("* CAPABILITY {}\r\n{tag} OK Capability completed.\r\n", self.capabilities());
                    write(s, reply.as_bytes()).await?;
                }
                Action::Noop(tag) => write(s, format!("{tag} OK NOOP completed.\r\n").as_bytes()).await?,
                Action::Logout(tag) => {
                    write(s, format!("* BYE Logging out.\r\n{tag} OK Logout completed.\r\n").as_bytes()).await?;
                    return Ok(Event::Closed(CloseReason::Logout));
                }
                Action::Id(tag, fields) => {
                    self.client_id = fields;
                    write(s, format!("* ID NIL\r\n{tag} OK ID completed.\r\n").as_bytes()).await?;
                }
                Action::StartTls(tag) => {
                    if !self.settings.starttls_offered || self.settings.tls_active {
                        // Reliability case 3: no STARTTLS on implicit TLS, no second STARTTLS.
                        self.bad(s, Some(&tag), "STARTTLS not available.").await?;
                        continue;
                    }
                    if self.has_buffered_input() {
                        // Reliability cases 1/2: plaintext after STARTTLS is never executed.
                        write(s, b"* BYE Pipelined data after STARTTLS refused.\r\n").await?;
                        return Ok(Event::Closed(CloseReason::StartTlsInjection));
                    }
                    write(s, format!("{tag} OK Begin TLS negotiation now.\r\n").as_bytes()).await?;
                    return Ok(Event::StartTls);
                }
                Action::Login(tag, credentials) => {
                    if !self.settings.auth_allowed {
                        self.privacy_required(s, &tag).await?;
                        continue;
                    }
                    self.pending_tag = tag;
                    return Ok(Event::Login(LoginRequest { mechanism: Mechanism::Login, credentials }));
                }
                Action::Authenticate(tag, mechanism, ir) => {
                    if !self.settings.auth_allowed {
                        self.privacy_required(s, &tag).await?;
                        continue;
                    }
                    // Reliability case 42: EXTERNAL only where it is offered.
                    let Some(mechanism) = mechanism.filter(|m| *m != Mechanism::External || self.settings.external)
                    else {
                        // Counted like an error (case 54), or a client could ask forever.
                        self.errors += 1;
                        write(s, format!("{tag} NO Unsupported authentication mechanism.\r\n").as_bytes()).await?;
                        continue;
                    };
                    match self.sasl(s, &tag, mechanism, ir).await? {
                        Some(credentials) => {
                            self.pending_tag = tag;
                            return Ok(Event::Login(LoginRequest { mechanism, credentials }));
                        }
                        None => continue,
                    }
                }
                Action::NotAllowed(tag) => self.bad(s, Some(&tag), NOT_PERMITTED).await?,
                Action::Bad(tag) => self.bad(s, tag.as_deref(), "Error in IMAP command.").await?,
            }
        }
    }

    /// Answer the pending login with a failure. The caller applies the delay before calling this.
    pub async fn login_failed<S: AsyncWrite + Unpin>(&mut self, s: &mut S, failure: LoginFailure) -> io::Result<()> {
        let tag = &self.pending_tag;
        let reply = match failure {
            LoginFailure::BadCredentials => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            LoginFailure::Unavailable => format!("{tag} NO [UNAVAILABLE] Server unavailable, try again later.\r\n"),
            // RFC 5530: a client takes a bare NO after LOGIN for a wrong password and asks the
            // user again; a temporary refusal says so, unless the text brings its own code.
            LoginFailure::Message { text, temporary: true, .. } if !text.starts_with('[') => {
                format!("{tag} NO [UNAVAILABLE] {text}\r\n")
            }
            LoginFailure::Message { text, .. } => format!("{tag} NO {text}\r\n"),
            LoginFailure::Throttled => format!("{tag} NO [UNAVAILABLE] Too many login failures, try again later.\r\n"),
            LoginFailure::InUse => format!("{tag} NO [INUSE] Mailbox is in use, try again later.\r\n"),
        };
        write(s, reply.as_bytes()).await
    }

    /// The backend's untagged lines, then its tagged reply under the client's tag.
    pub fn success_reply(&self, mut untagged: Vec<u8>, reply: Vec<u8>) -> Vec<u8> {
        untagged.extend_from_slice(self.pending_tag.as_bytes());
        untagged.push(b' ');
        untagged.extend_from_slice(&reply);
        untagged
    }

    /// Bytes the client pipelined after its login command, to forward to the backend verbatim
    /// (reliability case 25). `None` if the pipeline overflowed the line limit and was cut.
    pub fn into_pipelined(mut self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let more = self.frag.progress().is_some();
            if self.frag.is_max_message_size_exceeded() {
                return None;
            }
            if !more {
                out.extend_from_slice(self.frag.message_bytes());
                return Some(out);
            }
            if self.frag.is_message_complete() {
                out.extend_from_slice(self.frag.message_bytes());
            }
        }
    }

    /// Whether any bytes after the current command are already buffered.
    fn has_buffered_input(&mut self) -> bool {
        self.frag.progress().is_some() || !self.frag.message_bytes().is_empty()
    }

    fn decode(&mut self) -> Action {
        // RFC 4959: an empty initial response is sent as `=`; a bare trailing space after the
        // mechanism (which the codec reads as an empty one) is no initial response at all.
        let raw = self.frag.message_bytes();
        let empty_ir_sent =
            raw.strip_suffix(b"\n").map(|l| l.strip_suffix(b"\r").unwrap_or(l)).unwrap_or(raw).ends_with(b"=");
        let cmd = match self.frag.decode_message(&CommandCodec::default()) {
            Ok(cmd) => cmd,
            Err(
                DecodeMessageError::DecodingRemainder { .. }
                | DecodeMessageError::DecodingFailure(_)
                | DecodeMessageError::MessagePoisoned { .. }
                | DecodeMessageError::MessageTooLong { .. },
            ) => {
                return Action::Bad(self.frag.decode_tag().map(|t| t.as_ref().to_string()));
            }
        };
        let tag = cmd.tag.as_ref().to_string();
        match cmd.body {
            CommandBody::Capability => Action::Capability(tag),
            CommandBody::Noop => Action::Noop(tag),
            CommandBody::Logout => Action::Logout(tag),
            CommandBody::StartTLS => Action::StartTls(tag),
            CommandBody::Id { parameters } => {
                let mut fields = Vec::new();
                let mut bytes = 0;
                for (k, v) in parameters.unwrap_or_default() {
                    let (Ok(key), Some(value)) = (std::str::from_utf8(k.as_ref()), v.0.as_ref()) else {
                        continue;
                    };
                    let Ok(value) = std::str::from_utf8(value.as_ref()) else {
                        continue;
                    };
                    // Reliability case 50: a client may not claim x-originating-ip and friends.
                    if key.len() > MAX_ID_KEY
                        || key.to_ascii_lowercase().starts_with("x-")
                        || value.len() > MAX_ID_VALUE
                    {
                        continue;
                    }
                    if !printable(key) || !printable(value) || fields.len() >= MAX_ID_PAIRS {
                        continue;
                    }
                    // Each string quoted, backslash before `"` and `\`, a blank before each.
                    let quoted = |s: &str| s.len() + s.bytes().filter(|b| matches!(b, b'"' | b'\\')).count() + 3;
                    let cost = quoted(key) + quoted(value);
                    if bytes + cost > MAX_ID_BYTES {
                        continue;
                    }
                    bytes += cost;
                    fields.push((key.to_string(), value.to_string()));
                }
                Action::Id(tag, fields)
            }
            CommandBody::Login { username, password } => {
                Action::Login(tag, sasl::credentials(username.as_ref(), password.declassify().as_ref()))
            }
            CommandBody::Authenticate { mechanism, initial_response } => {
                let mech = match mechanism {
                    AuthMechanism::Plain => Some(Mechanism::Plain),
                    AuthMechanism::Login => Some(Mechanism::SaslLogin),
                    ref other if other.as_ref().eq_ignore_ascii_case("EXTERNAL") => Some(Mechanism::External),
                    _ => None,
                };
                let ir = initial_response.map(|ir| ir.declassify().to_vec());
                Action::Authenticate(tag, mech, ir.filter(|ir| !ir.is_empty() || empty_ir_sent))
            }
            _ => Action::NotAllowed(tag),
        }
    }

    /// Run a SASL exchange; `Ok(None)` means it was answered (cancelled or bad) and the dialogue
    /// goes on. `Ok(Some(None))` carries malformed credentials to be failed like wrong ones.
    async fn sasl<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        tag: &str,
        mechanism: Mechanism,
        ir: Option<Vec<u8>>,
    ) -> io::Result<Option<Option<Credentials>>> {
        match mechanism {
            Mechanism::Plain | Mechanism::External => {
                let msg = match ir {
                    Some(msg) => msg,
                    None => {
                        write(s, b"+ \r\n").await?;
                        match self.sasl_line(s, tag).await? {
                            Some(msg) => msg,
                            None => return Ok(None),
                        }
                    }
                };
                Ok(Some(if mechanism == Mechanism::External { sasl::external(&msg) } else { sasl::decode_plain(&msg) }))
            }
            Mechanism::SaslLogin | Mechanism::Login => {
                let user = match ir {
                    Some(user) => user,
                    None => {
                        write(s, format!("+ {}\r\n", sasl::LOGIN_USER_CHALLENGE).as_bytes()).await?;
                        match self.sasl_line(s, tag).await? {
                            Some(u) => u,
                            None => return Ok(None),
                        }
                    }
                };
                write(s, format!("+ {}\r\n", sasl::LOGIN_PASSWORD_CHALLENGE).as_bytes()).await?;
                let Some(password) = self.sasl_line(s, tag).await? else {
                    return Ok(None);
                };
                Ok(Some(sasl::credentials(&user, &password)))
            }
        }
    }

    /// One SASL continuation line; answers cancel and garbage itself and returns `None` then.
    async fn sasl_line<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        tag: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        let line = loop {
            match self.frag.progress() {
                // Reliability cases 27 and 28, as for commands: over the limit, whether its end
                // has arrived yet or not (the answer must not depend on how the bytes were split),
                // and whether it ends in a literal or not.
                Some(FragmentInfo::Line { .. }) | None if self.frag.is_max_message_size_exceeded() => {
                    write(s, b"* BYE Command line too long.\r\n").await?;
                    return Err(crate::protocol::closed(CloseReason::LineTooLong));
                }
                Some(FragmentInfo::Line { announcement: Some(ann), .. }) => {
                    // A literal has no place in a SASL response (crates.md §5): refuse it.
                    if ann.mode == LiteralMode::Sync {
                        self.frag.skip_message();
                    } else {
                        self.frag.poison_message();
                        write(s, b"* BYE Literal in SASL response.\r\n").await?;
                        return Err(crate::protocol::closed(CloseReason::SaslLiteral));
                    }
                    break SaslLine::Bad;
                }
                Some(FragmentInfo::Line { ending, .. }) => {
                    self.partial_since = None;
                    if ending == LineEnding::Lf {
                        break SaslLine::Bad;
                    }
                    break match self.frag.decode_message(&AuthenticateDataCodec::default()) {
                        Ok(AuthenticateData::Continue(data)) => SaslLine::Data(data.declassify().to_vec()),
                        Ok(AuthenticateData::Cancel) => SaslLine::Cancel,
                        Err(_) => SaslLine::Bad,
                    };
                }
                Some(FragmentInfo::Literal { .. }) => continue,
                None => match self.fill(s).await? {
                    Fill::Data => continue,
                    Fill::Eof => return Err(crate::protocol::closed(CloseReason::ClientClosed)),
                    Fill::Timeout => {
                        write(s, b"* BYE Disconnected for inactivity.\r\n").await?;
                        return Err(crate::protocol::closed(CloseReason::IdleTimeout));
                    }
                },
            }
        };
        match line {
            SaslLine::Data(d) => Ok(Some(d)),
            SaslLine::Cancel => {
                // RFC 9051 §6.2.2: a cancelled exchange is answered with a tagged BAD.
                self.bad(s, Some(tag), "Authentication canceled.").await?;
                Ok(None)
            }
            SaslLine::Bad => {
                self.bad(s, Some(tag), "Invalid base64 data in SASL response.").await?;
                Ok(None)
            }
        }
    }

    /// Counts as an error (closing after `max_errors`).
    async fn bad<S: AsyncWrite + Unpin>(&mut self, s: &mut S, tag: Option<&str>, text: &str) -> io::Result<()> {
        self.errors += 1;
        write(s, format!("{} BAD {text}\r\n", tag.unwrap_or("*")).as_bytes()).await
    }

    async fn privacy_required<S: AsyncWrite + Unpin>(&mut self, s: &mut S, tag: &str) -> io::Result<()> {
        // Reliability cases 6/7: no credentials before TLS. NO, as RFC 9051 §7.1 and Dovecot
        // answer a well-formed command refused by policy; still counted, so a client that keeps
        // trying is closed.
        self.errors += 1;
        write(s, format!("{tag} NO {PRIVACY_REQUIRED}\r\n").as_bytes()).await
    }

    async fn fill<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> io::Result<Fill> {
        let mut buf = [0u8; READ_CHUNK];
        // Reliability case 58: a started command must finish within command_timeout, however
        // slowly its bytes trickle in.
        let mut wait = self.settings.idle_timeout;
        if self.frag.message_bytes().is_empty() {
            self.partial_since = None;
        } else {
            let since = *self.partial_since.get_or_insert_with(tokio::time::Instant::now);
            wait = wait.min(self.settings.command_timeout.saturating_sub(since.elapsed()));
        }
        // Never more than the line limit at once: what follows a LOGIN in the same read (the
        // client's pipelined commands, an APPEND's data) is then always less than the limit, and
        // goes on to the backend (`into_pipelined`) instead of failing the login as too long.
        let take = READ_CHUNK.min(self.settings.max_line as usize);
        match tokio::time::timeout(wait, s.read(&mut buf[..take])).await {
            Err(_) => Ok(Fill::Timeout),
            Ok(Ok(0)) => Ok(Fill::Eof),
            Ok(Ok(n)) => {
                self.frag.enqueue_bytes(&buf[..n]);
                Ok(Fill::Data)
            }
            Ok(Err(e)) => Err(e),
        }
    }
}

enum Fill {
    Data,
    Eof,
    Timeout,
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Whether a command (so far) is LOGIN: its second word, after the tag.
/// The command's name (its second word, after the tag).
fn verb(command: &[u8]) -> &[u8] {
    command.split(|b| *b == b' ').nth(1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::tests::{Script, run_front, settings, split_at_all};

    /// Run the front end over `chunks` (greeting included); its output and events.
    fn run(chunks: Vec<Vec<u8>>) -> (Vec<u8>, Vec<String>) {
        run_front(crate::config::Protocol::Imap, settings(), chunks)
    }

    /// Case 58: each command has `command_timeout` from its own first bytes, also when they
    /// arrive in the same read as the end of the one before (which used to lend the next one
    /// its start time, cutting a steady pipeline off mid-way).
    #[tokio::test(start_paused = true)]
    async fn each_command_has_its_own_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            let mut front = crate::protocol::Front::new(crate::config::Protocol::Imap, settings());
            assert!(front.greet(&mut server).await.unwrap().is_none());
            match front.next_event(&mut server).await {
                Ok(Event::Closed(r)) => r.as_str(),
                _ => "other",
            }
        });
        // command_timeout is 5 s: each command is 4 s in the making, 8 s since the first.
        let step = std::time::Duration::from_secs(4);
        client.write_all(b"a CAPA").await.unwrap();
        tokio::time::sleep(step).await;
        client.write_all(b"BILITY\r\nb NO").await.unwrap();
        tokio::time::sleep(step).await;
        client.write_all(b"OP\r\nc LOGOUT\r\n").await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("b OK") && !out.contains("inactivity"), "{out}");
        assert_eq!(task.await.unwrap(), "logout");
    }

    /// Case 54: unknown mechanisms and cancelled exchanges count as errors.
    #[test]
    fn refused_and_cancelled_authenticate_count_as_errors() {
        let (out, ev) = run(vec![b"a AUTHENTICATE CRAM-MD5\r\nb AUTHENTICATE PLAIN\r\n*\r\n".repeat(3)]);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("NO Unsupported authentication mechanism.").count(), 3, "{out}");
        assert_eq!(out.matches("BAD Authentication canceled.").count(), 2, "{out}");
        assert_eq!(ev, vec!["closed too_many_errors"]);
    }

    /// Reliability cases 26 and 24: a read that fills the 4,096-byte buffer exactly with whole
    /// commands, and a pipeline longer than two buffers, are each answered in full and in order.
    #[test]
    fn full_buffers_of_pipelined_commands() {
        let exact = b"a NOOP\r\n".repeat(READ_CHUNK / 8);
        assert_eq!(exact.len(), READ_CHUNK);
        let long = b"b NOOP\r\n".repeat(1100);
        let (out, events) = run(vec![exact, long, b"z LOGOUT\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 1 + 512 + 1100 + 2, "{}", lines.len());
        assert!(lines[1..513].iter().all(|l| *l == "a OK NOOP completed."));
        assert!(lines[513..1613].iter().all(|l| *l == "b OK NOOP completed."));
        assert_eq!(&lines[1613..], ["* BYE Logging out.", "z OK Logout completed."]);
        assert_eq!(events, vec!["closed logout"]);
    }

    /// SASL EXTERNAL: offered and taken only where the session allows it (reliability case 42);
    /// the one response names the user, with or without SASL-IR; an empty one is malformed.
    #[test]
    fn external_only_where_offered() {
        let input =
            b"a AUTHENTICATE EXTERNAL YWxpY2U=\r\nb AUTHENTICATE EXTERNAL\r\nYWxpY2U=\r\nc AUTHENTICATE EXTERNAL =\r\n"
                .to_vec();
        let (out, events) = run(vec![input.clone()]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("AUTH=EXTERNAL"), "{out}");
        assert!(out.contains("a NO Unsupported authentication mechanism.\r\nb NO Unsupported"), "{out}");
        assert!(events.iter().all(|e| !e.starts_with("login")), "{events:?}");
        let external = FrontSettings { external: true, ..settings() };
        let (out, events) = run_front(crate::config::Protocol::Imap, external, vec![input]);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=PLAIN AUTH=LOGIN AUTH=EXTERNAL]"),
            "{out}"
        );
        assert!(out.contains("a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n+ \r\nb NO"), "{out}");
        assert_eq!(&events[..3], ["login Some(\"alice\")", "login Some(\"alice\")", "login None"]);
    }

    /// No "+" for the literal of a command refused before login whatever it holds (an APPEND's
    /// message would be uploaded only to be thrown away); LOGIN and ID get theirs.
    #[test]
    fn no_continuation_for_a_literal_of_a_command_refused_before_login() {
        let (out, _) = run(vec![b"a APPEND INBOX {20}\r\n".to_vec(), b"b NOOP\r\nc ID ({1}\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        let after_greeting = out.split_once("\r\n").unwrap().1;
        assert_eq!(
            after_greeting,
            "a BAD Command not permitted before authentication.\r\nb OK NOOP completed.\r\n+ Ready for literal data.\r\n"
        );
    }

    /// A trailing space after the mechanism is no initial response (RFC 4959 sends an empty
    /// one as `=`): the client is asked for it, as without the space.
    #[test]
    fn a_trailing_space_after_the_mechanism_is_no_initial_response() {
        // base64("\0alice\0pw")
        let (out, events) = run(vec![b"a AUTHENTICATE PLAIN \r\nAGFsaWNlAHB3\r\nb AUTHENTICATE LOGIN \r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("+ \r\n"), "{out}");
        assert!(out.ends_with("+ VXNlcm5hbWU6\r\n"), "LOGIN asks for the user name first: {out}");
        assert_eq!(events[0], "login Some(\"alice\")");
    }

    /// LITERAL- (non-synchronizing literals up to 4096 octets) only where a command with one
    /// fits max_line_length; never LITERAL+, which would promise any size.
    #[test]
    fn literal_minus_only_where_a_4096_octet_literal_fits() {
        let caps = |max_line| ImapFront::new(FrontSettings { max_line, ..settings() }).capabilities();
        assert!(caps(8192).contains(" LITERAL- ") && !caps(8192).contains("LITERAL+"), "{}", caps(8192));
        assert!(!caps(4096).contains("LITERAL"), "{}", caps(4096));
    }

    /// Cases 29 and 31: what only looks like a literal (`{-1}`, `{ 5}`) is a bad command, with
    /// no "+" and nothing after it taken as its data; real non-synchronizing literals in LOGIN
    /// are read without one.
    #[test]
    fn literal_look_alikes_and_non_synchronizing_logins() {
        for bad in ["a LOGIN {-1}\r\n", "a LOGIN { 5}\r\n"] {
            let (out, events) = run(vec![format!("{bad}b NOOP\r\n").into_bytes()]);
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains("+ "), "{bad}: {out}");
            assert!(out.contains("\r\na BAD ") && out.ends_with("b OK NOOP completed.\r\n"), "{bad}: {out}");
            assert_eq!(events, vec!["closed client_closed"], "{bad}");
        }
        let (out, events) = run(vec![b"a LOGIN {5+}\r\nalice {2+}\r\npw\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("+ "), "{out}");
        assert_eq!(events, vec!["login Some(\"alice\")", "closed client_closed"]);
    }

    /// A non-synchronizing literal in a SASL response closes the connection for that reason (a
    /// synchronizing one is refused without a "+" and the exchange goes on).
    #[test]
    fn a_literal_in_a_sasl_response() {
        let (out, events) = run(vec![b"a AUTHENTICATE PLAIN\r\nAGFsaWNl {5+}\r\nxxxxx\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("+ \r\n* BYE Literal in SASL response.\r\n"), "{out}");
        assert_eq!(events, vec!["closed sasl_literal"]);
    }

    #[test]
    fn scripted_dialogue() {
        let (out, events) = run(vec![b"a NOOP\r\nb LOGIN {5}\r\n".to_vec(), b"alice pw\r\nc LOGOUT\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "* OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=PLAIN AUTH=LOGIN] IMAP proxy ready.\r\na OK NOOP completed.\r\n+ Ready for literal data.\r\nb NO [AUTHENTICATIONFAILED] Authentication failed.\r\n* BYE Logging out.\r\nc OK Logout completed.\r\n"
        );
        assert_eq!(events, vec!["login Some(\"alice\")", "closed logout"]);
    }

    /// Cases 6/7: before TLS, LOGIN's literal gets no "+" (the client would send its name and
    /// password in the clear only to be refused), just a refusal (BAD: the command is cut off).
    #[test]
    fn no_continuation_for_a_login_literal_before_tls() {
        let st = FrontSettings { auth_allowed: false, ..settings() };
        let (out, ev) =
            run_front(crate::config::Protocol::Imap, st, vec![b"a login {5}\r\n".to_vec(), b"b LOGOUT\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("+ Ready"), "{out}");
        assert!(out.contains("\r\na BAD [PRIVACYREQUIRED] "), "{out}");
        assert!(out.ends_with("b OK Logout completed.\r\n"), "{out}");
        assert_eq!(ev, vec!["closed logout"]);
        // Other commands' literals still get theirs.
        let st = FrontSettings { auth_allowed: false, ..settings() };
        let (out, _) = run_front(crate::config::Protocol::Imap, st, vec![b"a ID ({2}\r\n".to_vec()]);
        assert!(String::from_utf8(out).unwrap().ends_with("+ Ready for literal data.\r\n"));
    }

    /// Case 29 at the limit: no "+" for a literal that fills the line limit exactly, since
    /// the command's CRLF still has to follow it; one that leaves room for it gets its "+".
    #[test]
    fn a_literal_gets_its_continuation_only_with_room_for_the_crlf() {
        // settings(): max_line 1024; "a LOGIN {1008}\r\n" is 16 bytes.
        let (out, _) = run(vec![b"a LOGIN {1008}\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("a BAD Literal too large.\r\n") && !out.contains("+ Ready"), "{out}");
        let (out, _) = run(vec![b"a LOGIN {1006}\r\n".to_vec()]);
        assert!(String::from_utf8(out).unwrap().ends_with("+ Ready for literal data.\r\n"));
        // And the literal then sent with its CRLF is within the limit.
        let mut literal = vec![b'x'; 1006];
        literal.extend_from_slice(b"\r\n");
        let (out, _) = run(vec![b"a LOGIN {1006}\r\n".to_vec(), literal]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("+ Ready") && !out.contains("too long"), "{out}");
    }

    /// Case 27 when the over-long line ends in a literal, and case 28 for a SASL response that
    /// never ends: the line limit closes the connection in both.
    #[test]
    fn over_long_lines_close_also_before_a_literal_and_in_sasl() {
        let mut line = b"a LOGIN ".to_vec();
        line.extend(vec![b'x'; 1100]);
        line.extend_from_slice(b" {5}\r\n");
        let (out, ev) = run(vec![line]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("ready.\r\n* BYE Command line too long.\r\n"), "{out}");
        assert!(!out.contains("+ Ready") && !out.contains("Literal too large"), "{out}");
        assert_eq!(ev, vec!["closed line_too_long"]);
        // In SASL: a response that never ends, one whose end comes in the same read as the
        // bytes over the limit, and one that ends in a literal.
        let mut ended = vec![b'A'; 1500];
        ended.extend_from_slice(b"\r\n");
        let mut literal = vec![b'A'; 1100];
        literal.extend_from_slice(b" {5}\r\n");
        for response in [vec![vec![b'A'; 2000], vec![b'A'; 2000]], vec![ended], vec![literal]] {
            let mut input = vec![b"a AUTHENTICATE PLAIN\r\n".to_vec()];
            input.extend(response);
            let (out, ev) = run(input);
            let out = String::from_utf8(out).unwrap();
            assert!(out.ends_with("+ \r\n* BYE Command line too long.\r\n"), "{out}");
            // Closed for what it is, as a command line over the limit is.
            assert_eq!(ev, vec!["closed line_too_long"]);
        }
    }

    #[test]
    fn pipelined_bytes_after_login_are_handed_over_verbatim() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let tail = b"b APPEND INBOX {5+}\r\nhello\r\nc NOOP\r\nd SEL";
            let mut input = b"a LOGIN u p\r\n".to_vec();
            input.extend_from_slice(tail);
            let mut s = Script::new(vec![input]);
            let mut front = ImapFront::new(settings());
            assert!(matches!(front.next_event(&mut s).await.unwrap(), Event::Login(_)));
            assert_eq!(front.into_pipelined().unwrap(), tail.to_vec());
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any bytes: no panic, bounded output, and the same answer however the bytes are split.
        #[test]
        fn any_bytes_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let (whole_out, whole_events) = run(vec![bytes.clone()]);
            let (split_out, split_events) = run(split_at_all(&bytes, &cuts));
            prop_assert_eq!(&whole_out, &split_out);
            prop_assert_eq!(whole_events, split_events);
            prop_assert!(whole_out.len() < 64 * 1024);
        }

        /// IMAP-shaped input reaches deeper states than random bytes do.
        #[test]
        fn imap_shaped_input(lines in proptest::collection::vec(
            prop_oneof![
                Just("a NOOP".to_string()),
                Just("b CAPABILITY".to_string()),
                Just("c LOGIN {3}".to_string()),
                Just("d LOGIN {3+}".to_string()),
                Just("e AUTHENTICATE PLAIN".to_string()),
                Just("f AUTHENTICATE LOGIN dXNlcg==".to_string()),
                Just("*".to_string()),
                Just("=".to_string()),
                Just("g ID (\"a\" \"b\")".to_string()),
                Just("h LOGIN \"a\\\\\" \"b\\\"\"".to_string()),
                "[ -~]{0,40}",
            ], 0..20), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let bytes = lines.join("\r\n").into_bytes();
            let (a, ea) = run(vec![bytes.clone()]);
            let (b, eb) = run(split_at_all(&bytes, &cuts));
            prop_assert_eq!(a, b);
            prop_assert_eq!(ea, eb);
        }
    }
}
