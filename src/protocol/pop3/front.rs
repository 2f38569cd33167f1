//! POP3 before authentication (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 SASL).
//!
//! Lifecycle: `greet` → `next_event` until `StartTls` (the caller upgrades and builds a fresh
//! front end), `Login` (USER/PASS or AUTH PLAIN/LOGIN; the caller verifies and calls
//! `login_failed` or relays) or `Closed`. Replies are fixed strings; nothing the client sends is
//! echoed. Commands other than the pre-auth ones get `-ERR` and count as errors.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::line::{Dialogue, Replies};
use crate::protocol::sasl;
use crate::protocol::{
    CloseReason, Event, FrontSettings, LoginFailure, LoginRequest, Mechanism, looks_like_http, write,
};

/// RFC 2449 §4: command lines are at most 255 octets, the CRLF included (SASL responses may be longer, and so may
/// USER and PASS: user names and passwords are held to the limits IMAP's LOGIN has, as Dovecot
/// does, not cut at a length a long generated password passes).
const MAX_COMMAND: usize = 255;

const REPLIES: Replies = Replies {
    plain_challenge: b"+ \r\n",
    user_challenge: b"+ VXNlcm5hbWU6\r\n",
    password_challenge: b"+ UGFzc3dvcmQ6\r\n",
    canceled: "-ERR Authentication canceled.\r\n",
    invalid: "-ERR Invalid base64 data.\r\n",
    too_long: b"-ERR Line too long.\r\n",
    idle: b"-ERR Disconnected for inactivity.\r\n",
    last_error: Some(b"-ERR Too many invalid commands.\r\n"),
};

pub struct Pop3Front {
    settings: FrontSettings,
    pub(crate) d: Dialogue,
    /// The name from USER, waiting for PASS.
    user: Option<Vec<u8>>,
}

impl Pop3Front {
    pub fn new(settings: FrontSettings) -> Pop3Front {
        let d = Dialogue::new(settings.max_line as usize, &settings, &REPLIES);
        Pop3Front { settings, d, user: None }
    }

    /// CAPA before login. TOP and UIDL are announced in both states (RFC 2449 §6: "no
    /// differences"), so a client may take them from this list and never ask again (K-9 Mail
    /// does, and without TOP fetches every message whole); every POP3 server known to be put
    /// behind a proxy has them (Dovecot, Courier, Cyrus, Exchange, qpopper), and nginx announces
    /// them by default too.
    pub fn capabilities(&self) -> String {
        let mut caps = String::from(
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n",
        );
        if self.settings.starttls_offered && !self.settings.tls_active {
            caps.push_str("STLS\r\n");
        }
        if self.settings.auth_allowed {
            caps.push_str(if self.settings.external {
                "USER\r\nSASL PLAIN LOGIN EXTERNAL\r\n"
            } else {
                "USER\r\nSASL PLAIN LOGIN\r\n"
            });
        }
        caps.push_str(".\r\n");
        caps
    }

    /// Answer a command with an error and count it. The answer that reaches `max_errors` says
    /// the connection is closing instead (`REPLIES.last_error`), SASL's cancel and bad base64
    /// included: a separate `-ERR` after it would be read by a pipelining client as the answer
    /// to its next command (RFC 2449 §6.6: one reply each).
    async fn error<S: AsyncWrite + Unpin>(&mut self, s: &mut S, reply: &str) -> io::Result<()> {
        self.d.err(s, reply).await
    }

    pub async fn greet<S: AsyncWrite + Unpin>(&self, s: &mut S) -> io::Result<()> {
        write(s, Self::GREETING).await
    }

    pub const GREETING: &'static [u8] = b"+OK POP3 proxy ready.\r\n";

    pub async fn next_event<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        crate::protocol::closed_event(self.events(s).await)
    }

    async fn events<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        loop {
            if self.d.errors >= self.settings.max_errors {
                // The last error's reply said so (`error`): POP3 has no unsolicited replies.
                return Ok(Event::Closed(CloseReason::TooManyErrors));
            }
            let line = match self.d.line(s).await? {
                Ok(line) => line,
                Err(reason) => return Ok(Event::Closed(reason)),
            };
            // RFC 1939 §7: after USER comes PASS (or QUIT). A name given before any other
            // command (an AUTH failed or cancelled, a CAPA, a line not read as a command) is
            // forgotten, so a later PASS is not taken for that name.
            let user = self.user.take();
            let Some(line) = line else {
                self.error(s, "-ERR Invalid command line.\r\n").await?;
                continue;
            };
            if looks_like_http(&line) {
                return Ok(Event::Closed(CloseReason::HttpRequest));
            }
            if line.len() + 2 > MAX_COMMAND
                && ![&b"AUTH"[..], b"USER", b"PASS"].iter().any(|w| starts_with_word(&line, w))
            {
                write(s, b"-ERR Line too long.\r\n").await?;
                return Ok(Event::Closed(CloseReason::LineTooLong));
            }
            let (verb, arg) = split_command(&line);
            match verb.as_str() {
                "CAPA" => write(s, self.capabilities().as_bytes()).await?,
                "NOOP" => write(s, b"+OK\r\n").await?,
                "QUIT" => {
                    write(s, b"+OK Logging out.\r\n").await?;
                    return Ok(Event::Closed(CloseReason::Logout));
                }
                "STLS" => {
                    if !self.settings.starttls_offered || self.settings.tls_active {
                        // Reliability case 3.
                        self.error(s, "-ERR STLS not available.\r\n").await?;
                        continue;
                    }
                    if self.d.lines.has_buffered() {
                        // Reliability cases 1/2: plaintext after STLS is never executed.
                        write(s, b"-ERR Pipelined data after STLS refused.\r\n").await?;
                        return Ok(Event::Closed(CloseReason::StartTlsInjection));
                    }
                    write(s, b"+OK Begin TLS negotiation now.\r\n").await?;
                    return Ok(Event::StartTls);
                }
                "USER" => {
                    if !self.privacy_ok(s).await? {
                        continue;
                    }
                    match arg {
                        // Reliability case 34: no NUL or other control byte in a name; refused
                        // here, not as a login attempt after PASS.
                        Some(user) if user.iter().any(|b| b.is_ascii_control()) => {
                            self.error(s, "-ERR Invalid user name.\r\n").await?
                        }
                        Some(user) if !user.is_empty() => {
                            self.user = Some(user.to_vec());
                            write(s, b"+OK\r\n").await?;
                        }
                        _ => self.error(s, "-ERR Missing user name.\r\n").await?,
                    }
                }
                "PASS" => {
                    if !self.privacy_ok(s).await? {
                        continue;
                    }
                    let Some(user) = user else {
                        self.error(s, "-ERR No user name given.\r\n").await?;
                        continue;
                    };
                    let credentials = sasl::credentials(&user, arg.unwrap_or_default());
                    return Ok(Event::Login(LoginRequest { mechanism: Mechanism::Login, credentials }));
                }
                "AUTH" => {
                    let Some(arg) = arg else {
                        // The pre-RFC 5034 listing some clients still ask for (K-9 Mail, on every
                        // connection, before STLS too): no credentials, so no refusal and no
                        // error counted; before TLS, where none may be used, the list is empty.
                        let listing: &[u8] = if !self.settings.auth_allowed {
                            b"+OK\r\n.\r\n"
                        } else if self.settings.external {
                            b"+OK\r\nPLAIN\r\nLOGIN\r\nEXTERNAL\r\n.\r\n"
                        } else {
                            b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
                        };
                        write(s, listing).await?;
                        continue;
                    };
                    if !self.privacy_ok(s).await? {
                        continue;
                    }
                    // RFC 5034 §4: an empty initial response is `=`; nothing after the blank (a
                    // trailing space) is no initial response, and the first challenge follows.
                    let (mech, ir) = match arg.iter().position(|b| *b == b' ') {
                        Some(i) => (&arg[..i], Some(arg[i + 1..].to_vec()).filter(|r| !r.is_empty())),
                        None => (arg, None),
                    };
                    let mechanism = if mech.eq_ignore_ascii_case(b"PLAIN") {
                        Mechanism::Plain
                    } else if mech.eq_ignore_ascii_case(b"LOGIN") {
                        Mechanism::SaslLogin
                    } else if mech.eq_ignore_ascii_case(b"EXTERNAL") && self.settings.external {
                        Mechanism::External
                    } else {
                        // Reliability case 42.
                        self.error(s, "-ERR Unsupported authentication mechanism.\r\n").await?;
                        continue;
                    };
                    if let Some(credentials) = self.d.sasl(s, mechanism, ir).await? {
                        return Ok(Event::Login(LoginRequest { mechanism, credentials }));
                    }
                }
                "APOP" | "STAT" | "LIST" | "RETR" | "DELE" | "RSET" | "TOP" | "UIDL" | "LAST" => {
                    self.error(s, "-ERR Not allowed before authentication.\r\n").await?
                }
                _ => self.error(s, "-ERR Unknown command.\r\n").await?,
            }
        }
    }

    pub async fn login_failed<S: AsyncWrite + Unpin>(&mut self, s: &mut S, failure: LoginFailure) -> io::Result<()> {
        match failure {
            LoginFailure::BadCredentials => write(s, b"-ERR [AUTH] Authentication failed.\r\n").await,
            LoginFailure::Unavailable => write(s, b"-ERR [SYS/TEMP] Server unavailable, try again later.\r\n").await,
            LoginFailure::Message { text, temporary, .. } => {
                // CAPA announces AUTH-RESP-CODE (RFC 3206): every failed login carries a code,
                // unless the auth service's text brings its own.
                let code = match (text.starts_with('['), temporary) {
                    (true, _) => "",
                    (false, true) => "[SYS/TEMP] ",
                    (false, false) => "[AUTH] ",
                };
                write(s, format!("-ERR {code}{text}\r\n").as_bytes()).await
            }
            LoginFailure::Throttled => write(s, b"-ERR [SYS/TEMP] Too many login failures, try again later.\r\n").await,
            LoginFailure::InUse => write(s, b"-ERR [IN-USE] Mailbox is in use, try again later.\r\n").await,
        }
    }

    pub fn into_pipelined(self) -> Vec<u8> {
        self.d.lines.into_buffered()
    }

    async fn privacy_ok<S: AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<bool> {
        if self.settings.auth_allowed {
            return Ok(true);
        }
        // Reliability cases 6/7: no credentials before TLS.
        self.error(s, "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n").await?;
        Ok(false)
    }
}

fn starts_with_word(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len()
        && line[..word.len()].eq_ignore_ascii_case(word)
        && (line.len() == word.len() || line[word.len()] == b' ')
}

/// `VERB [arg]`: the verb upper-cased, the argument as sent (PASS keeps its spaces).
fn split_command(line: &[u8]) -> (String, Option<&[u8]>) {
    let (verb, arg) = match line.iter().position(|b| *b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let verb = if verb.len() <= 8 && verb.iter().all(u8::is_ascii_alphabetic) {
        String::from_utf8_lossy(verb).to_ascii_uppercase()
    } else {
        String::new()
    };
    (verb, arg)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::config::Protocol;
    use crate::protocol::tests::{run_front, settings, split_at_all};

    fn run(chunks: Vec<Vec<u8>>) -> (String, Vec<String>) {
        let (out, ev) = run_front(Protocol::Pop3, settings(), chunks);
        (String::from_utf8_lossy(&out).into_owned(), ev)
    }

    /// A connection ended inside a SASL exchange is closed for what it was (the access log's
    /// result), as outside one: the client gone, a response over the line limit.
    #[test]
    fn closes_inside_sasl_are_told_apart() {
        let (_, ev) = run(vec![b"AUTH PLAIN\r\n".to_vec()]);
        assert_eq!(ev, vec!["closed client_closed"]);
        let mut long = b"AUTH LOGIN\r\n".to_vec();
        long.extend(vec![b'A'; 2000]);
        long.extend_from_slice(b"\r\n");
        let (out, ev) = run(vec![long]);
        assert!(out.ends_with("-ERR Line too long.\r\n"), "{out}");
        assert_eq!(ev, vec!["closed line_too_long"]);
    }

    /// Reliability case 3: no second STLS inside TLS (nor on an implicit-TLS port); an error,
    /// and the session goes on.
    #[test]
    fn no_stls_inside_tls() {
        let st = crate::protocol::FrontSettings { tls_active: true, ..settings() };
        let (out, ev) = run_front(Protocol::Pop3, st, vec![b"STLS\r\nNOOP\r\n".to_vec()]);
        assert!(String::from_utf8_lossy(&out).ends_with("-ERR STLS not available.\r\n+OK\r\n"));
        assert_eq!(ev, vec!["closed client_closed"]);
    }

    #[test]
    fn user_pass_and_capa() {
        let (out, ev) = run(vec![b"CAPA\r\nUSER alice\r\nPASS pw with spaces\r\nQUIT\r\n".to_vec()]);
        assert_eq!(
            out,
            "+OK POP3 proxy ready.\r\n+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nSTLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n+OK Logging out.\r\n"
        );
        assert_eq!(ev, vec!["login Some(\"alice\")", "closed logout"]);
    }

    /// A 300-character password is checked like any other, not refused as a long line.
    #[test]
    fn long_passwords_are_checked() {
        let pass = "x".repeat(300);
        let (out, ev) = run(vec![format!("USER alice\r\nPASS {pass}\r\nNOOP {pass}\r\n").into_bytes()]);
        assert!(out.ends_with("+OK\r\n-ERR [AUTH] Authentication failed.\r\n-ERR Line too long.\r\n"), "{out}");
        assert_eq!(ev, vec!["login Some(\"alice\")", "closed line_too_long"]);
    }

    /// SASL EXTERNAL only where offered (reliability case 42); the response names the user.
    #[test]
    fn external_only_where_offered() {
        let input = b"AUTH\r\nAUTH EXTERNAL YWxpY2U=\r\nAUTH EXTERNAL\r\nYWxpY2U=\r\n".to_vec();
        let (out, ev) = run(vec![input.clone()]);
        assert!(out.contains("+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"), "{out}");
        assert_eq!(out.matches("-ERR Unsupported authentication mechanism.").count(), 2, "{out}");
        assert!(ev.iter().all(|e| !e.starts_with("login")), "{ev:?}");
        let st = crate::protocol::FrontSettings { external: true, ..settings() };
        let (out, ev) = run_front(Protocol::Pop3, st, vec![b"CAPA\r\n".to_vec(), input]);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("SASL PLAIN LOGIN EXTERNAL\r\n") && out.contains("+OK\r\nPLAIN\r\nLOGIN\r\nEXTERNAL\r\n.\r\n"),
            "{out}"
        );
        assert!(out.contains("-ERR [AUTH] Authentication failed.\r\n+ \r\n-ERR [AUTH]"), "{out}");
        assert_eq!(&ev[..2], ["login Some(\"alice\")", "login Some(\"alice\")"]);
    }

    #[test]
    fn before_tls_no_user_or_sasl() {
        let mut st = settings();
        st.auth_allowed = false;
        st.max_errors = 3;
        let (out, ev) = run_front(
            Protocol::Pop3,
            st,
            vec![b"CAPA\r\nAUTH\r\nAUTH\r\nUSER a\r\nAUTH PLAIN AGEAYg==\r\nSTLS\r\n".to_vec()],
        );
        let out = String::from_utf8(out).unwrap();
        // Reliability case 6: STLS, but no USER/SASL before TLS.
        assert!(out.contains("STLS\r\n") && !out.contains("USER\r\n") && !out.contains("SASL"), "{out}");
        assert!(out.contains("TOP\r\nUIDL\r\n"), "{out}");
        assert_eq!(out.matches("-ERR [AUTH] Plaintext authentication disallowed").count(), 2);
        // A bare AUTH asks for the mechanisms and sends no credentials (K-9 Mail's probe, on
        // every connection): an empty list, no refusal, not an error (three would have closed
        // the connection before STLS).
        assert_eq!(out.matches("+OK\r\n.\r\n").count(), 2, "{out}");
        assert_eq!(ev, vec!["starttls"]);
    }

    #[test]
    fn stls_with_pipelined_data_is_refused() {
        let (out, ev) = run(vec![b"STLS\r\nUSER a\r\n".to_vec()]);
        assert!(out.ends_with("-ERR Pipelined data after STLS refused.\r\n"));
        assert_eq!(ev, vec!["closed starttls_injection"]);
    }

    #[test]
    fn sasl_flows() {
        let (out, ev) = run(vec![b"AUTH PLAIN\r\nAGFsaWNlAHB3\r\nAUTH LOGIN YWxpY2U=\r\ncHc=\r\nAUTH PLAIN\r\n*\r\nAUTH CRAM-MD5\r\nAUTH\r\n".to_vec()]);
        assert_eq!(
            out,
            "+OK POP3 proxy ready.\r\n+ \r\n-ERR [AUTH] Authentication failed.\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] Authentication failed.\r\n+ \r\n-ERR Authentication canceled.\r\n-ERR Unsupported authentication mechanism.\r\n+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        );
        assert_eq!(ev, vec!["login Some(\"alice\")", "login Some(\"alice\")", "closed client_closed"]);
    }

    /// Case 54: unknown mechanisms and cancelled exchanges count as errors.
    #[test]
    fn refused_and_cancelled_auth_count_as_errors() {
        let (out, ev) = run(vec![b"AUTH CRAM-MD5\r\nAUTH PLAIN\r\n*\r\n".repeat(3)]);
        assert!(out.ends_with("-ERR Too many invalid commands.\r\n"), "{out}");
        assert_eq!(out.matches("-ERR Authentication canceled.").count(), 2, "{out}");
        assert_eq!(ev, vec!["closed too_many_errors"]);
    }

    /// The error that reaches the limit says so, also when it is a SASL cancel (one reply per
    /// command: nothing after it).
    #[test]
    fn a_cancel_that_reaches_the_limit_says_the_connection_closes() {
        let (out, ev) = run(vec![b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nAUTH PLAIN\r\n*\r\nNOOP\r\n".to_vec()]);
        assert!(out.ends_with("+ \r\n-ERR Too many invalid commands.\r\n"), "{out}");
        assert_eq!(ev, vec!["closed too_many_errors"]);
    }

    /// `AUTH PLAIN ` (a trailing blank) has no initial response: the challenge follows, not an
    /// empty response taken for credentials (RFC 5034 §4: an empty one is `=`). A user name
    /// with a NUL is refused at USER (reliability case 34), not checked after PASS.
    #[test]
    fn a_trailing_blank_is_no_initial_response_and_a_nul_is_no_name() {
        let (out, ev) = run(vec![b"AUTH PLAIN \r\nAGFsaWNlAHB3\r\nAUTH LOGIN \r\nYWxpY2U=\r\ncHc=\r\n".to_vec()]);
        assert!(out.ends_with("+ \r\n-ERR [AUTH] Authentication failed.\r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] Authentication failed.\r\n"), "{out}");
        assert_eq!(ev, vec!["login Some(\"alice\")", "login Some(\"alice\")", "closed client_closed"]);
        let (out, ev) = run(vec![b"USER alice\r\nUSER a\0b\r\nPASS x\r\n".to_vec()]);
        assert!(out.ends_with("-ERR Invalid user name.\r\n-ERR No user name given.\r\n"), "{out}");
        assert_eq!(ev, vec!["closed client_closed"]);
    }

    /// After USER comes PASS (RFC 1939 §7): a name followed by any other command, here a
    /// cancelled AUTH or a CAPA, is forgotten, and the PASS after it is not a login as that name.
    #[test]
    fn a_name_is_forgotten_at_any_command_but_pass() {
        for between in ["AUTH PLAIN\r\n*\r\n", "AUTH LOGIN\r\n*\r\n", "CAPA\r\n", "NOOP\r\n", "FOO\n"] {
            let (out, ev) = run(vec![format!("USER alice\r\n{between}PASS x\r\n").into_bytes()]);
            assert!(out.ends_with("-ERR No user name given.\r\n"), "{between}: {out}");
            assert_eq!(ev, vec!["closed client_closed"], "{between}");
        }
    }

    #[test]
    fn errors_and_limits() {
        let (out, ev) = run(vec![b"RETR 1\r\nFOO\r\nBAR\n\r\nPASS x\r\nUSER\r\nNOOP\r\n".to_vec()]);
        assert!(out.ends_with("-ERR Too many invalid commands.\r\n"), "{out}");
        // One reply per command: the fifth error's reply is the one that says so, and the
        // pipelined NOOP gets none (no unsolicited -ERR a client would take for its answer).
        assert_eq!(out.matches("-ERR").count(), 5, "{out}");
        assert_eq!(ev, vec!["closed too_many_errors"]);
        let mut long = b"LIST ".to_vec();
        long.extend(vec![b'1'; 300]);
        long.extend_from_slice(b"\r\n");
        let (out, ev) = run(vec![long]);
        assert!(out.ends_with("-ERR Line too long.\r\n"));
        assert_eq!(ev, vec!["closed line_too_long"]);
        // 255 octets with the CRLF (RFC 2449 §4) is a command; 256 is too long.
        let noop = |octets: usize| format!("NOOP {}\r\n", "x".repeat(octets - 7)).into_bytes();
        let (out, _) = run(vec![noop(255)]);
        assert!(out.ends_with("ready.\r\n+OK\r\n"), "{out}");
        let (out, ev) = run(vec![noop(256)]);
        assert!(out.ends_with("-ERR Line too long.\r\n"), "{out}");
        assert_eq!(ev, vec!["closed line_too_long"]);
        for request in [&b"GET / HTTP/1.1\r\n"[..], b"GET / HTTP/1.0\nHost: x\n\n"] {
            let (out, ev) = run(vec![request.to_vec()]);
            assert_eq!(out, "+OK POP3 proxy ready.\r\n");
            assert_eq!(ev, vec!["closed http_request"]);
        }
    }

    proptest! {
        #[test]
        fn any_bytes_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let a = run_front(Protocol::Pop3, settings(), vec![bytes.clone()]);
            let b = run_front(Protocol::Pop3, settings(), split_at_all(&bytes, &cuts));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn pop3_shaped_input(lines in proptest::collection::vec(prop_oneof![
            Just("USER a".to_string()), Just("PASS b".to_string()), Just("AUTH PLAIN".to_string()),
            Just("AUTH LOGIN".to_string()), Just("*".to_string()), Just("=".to_string()), Just("CAPA".to_string()),
            Just("AGEAYg==".to_string()), "[ -~]{0,30}",
        ], 0..20), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let bytes = lines.join("\r\n").into_bytes();
            let a = run_front(Protocol::Pop3, settings(), vec![bytes.clone()]);
            let b = run_front(Protocol::Pop3, settings(), split_at_all(&bytes, &cuts));
            prop_assert_eq!(a, b);
        }
    }
}
