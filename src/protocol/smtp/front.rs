//! SMTP submission before authentication (RFC 5321, RFC 3207 STARTTLS, RFC 4954 AUTH).
//!
//! Lifecycle: `greet` (with the optional greeting delay that catches early talkers) →
//! `next_event` until `StartTls` (the caller upgrades and builds a fresh front end: the EHLO
//! state is forgotten, RFC 3207 §4.2), `Login` (AUTH PLAIN/LOGIN) or `Closed`.
//!
//! Lines are framed here (bounded, CRLF only); one complete line is parsed with smtp-proto.
//! Mail transactions need authentication: `MAIL`, `RCPT`, `DATA` get `530 5.7.0`, or `503 5.5.1`
//! before any HELO/EHLO (also right after STARTTLS). The EHLO reply
//! lists what the proxy does itself (STARTTLS, AUTH) and what the backend really announces.
//! Replies never echo client input.

use std::io;

use smtp_proto::{AUTH_EXTERNAL, AUTH_LOGIN, AUTH_PLAIN, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::protocol::line::{Dialogue, Replies};
use crate::protocol::sasl;
use crate::protocol::{
    ClientHints, CloseReason, Event, FrontSettings, LoginFailure, LoginRequest, Mechanism, looks_like_http, write,
};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
const MAX_COMMAND: usize = 510;
/// RFC 4954 §4: AUTH lines and responses may reach 12288 octets.
const MAX_AUTH_LINE: usize = sasl::MAX_RESPONSE;

const REPLIES: Replies = Replies {
    plain_challenge: b"334 \r\n",
    user_challenge: b"334 VXNlcm5hbWU6\r\n",
    password_challenge: b"334 UGFzc3dvcmQ6\r\n",
    canceled: "501 5.7.0 Authentication aborted\r\n",
    invalid: "501 5.5.2 Error: cannot decode response\r\n",
    // Closing: RFC 5321 §3.8 allows a server to close on its own only after a 421.
    too_long: b"421 4.7.0 Line too long, closing connection\r\n",
    idle: b"421 4.4.2 Error: timeout exceeded\r\n",
    // A 421 follows the error that reaches the limit: SMTP may say so on its own.
    last_error: None,
};

pub struct SmtpFront {
    settings: FrontSettings,
    pub(crate) d: Dialogue,
    /// The client's EHLO/HELO name and whether it said EHLO.
    helo: Option<String>,
    esmtp: bool,
}

/// The answer to a client that talks before the greeting.
const EARLY_TALKER: &[u8] = b"421 4.7.0 Error: SMTP protocol synchronization, closing connection\r\n";

impl SmtpFront {
    pub fn new(settings: FrontSettings) -> SmtpFront {
        let d = Dialogue::new(MAX_AUTH_LINE + 2, &settings, &REPLIES);
        SmtpFront { settings, d, helo: None, esmtp: false }
    }

    pub fn hints(&self) -> ClientHints {
        ClientHints { id_fields: Vec::new(), helo: self.helo.clone(), esmtp: self.esmtp }
    }

    /// Greet, after the configured delay. A client that talks before the greeting is refused
    /// (reliability case 36). Returns `Some(reason)` when the connection must close.
    pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Option<CloseReason>> {
        if !self.settings.greeting_delay.is_zero() {
            let mut probe = [0u8; 1];
            if let Ok(r) = tokio::time::timeout(self.settings.greeting_delay, s.read(&mut probe)).await {
                if matches!(r, Ok(n) if n > 0) {
                    // RFC 5321 §3.8: a server closes on its own only after a 421 (a 554 in place
                    // of the greeting must wait for QUIT, §3.1).
                    write(s, EARLY_TALKER).await?;
                    return Ok(Some(CloseReason::EarlyTalker));
                }
                return Ok(Some(CloseReason::ClientClosed));
            }
        }
        write(s, &self.greeting()).await?;
        Ok(None)
    }

    /// The greeting, when it goes out at once (no early-talker wait configured).
    pub fn immediate_greeting(&self) -> Option<Vec<u8>> {
        self.settings.greeting_delay.is_zero().then(|| self.greeting())
    }

    fn greeting(&self) -> Vec<u8> {
        format!("220 {} ESMTP ready\r\n", self.settings.hostname).into_bytes()
    }

    /// The EHLO reply: our own name, STARTTLS/AUTH as the connection allows, then the backend's
    /// extensions.
    pub fn ehlo_reply(&self) -> String {
        let mut lines = vec![self.settings.hostname.clone()];
        if self.settings.starttls_offered && !self.settings.tls_active {
            lines.push("STARTTLS".into());
        }
        if self.settings.auth_allowed {
            lines.push(if self.settings.external { "AUTH PLAIN LOGIN EXTERNAL" } else { "AUTH PLAIN LOGIN" }.into());
        }
        lines.extend(self.settings.extensions.iter().cloned());
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("250{sep}{l}\r\n"));
        }
        out
    }

    pub async fn next_event<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        crate::protocol::closed_event(self.events(s).await)
    }

    async fn events<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Event> {
        loop {
            if self.d.errors >= self.settings.max_errors {
                write(s, b"421 4.7.0 Too many errors, closing connection\r\n").await?;
                return Ok(Event::Closed(CloseReason::TooManyErrors));
            }
            let line = match self.d.line(s).await? {
                Ok(Some(line)) => line,
                Ok(None) => {
                    // Reliability case 28 / SMTP smuggling: bare CR or LF before auth.
                    self.d.err(s, "500 5.5.2 Error: bare <CR> or <LF> received\r\n").await?;
                    continue;
                }
                Err(reason) => return Ok(Event::Closed(reason)),
            };
            if looks_like_http(&line) {
                // Reliability case 18: Postfix's smtpd_forbidden_commands.
                return Ok(Event::Closed(CloseReason::HttpRequest));
            }
            let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
            if line.len() > MAX_COMMAND && !is_auth {
                write(s, REPLIES.too_long).await?;
                return Ok(Event::Closed(CloseReason::LineTooLong));
            }
            if line.contains(&0) {
                self.d.err(s, "500 5.5.2 Error: NUL character received\r\n").await?;
                continue;
            }
            let upper_verb: Vec<u8> =
                line.iter().take_while(|b| **b != b' ').map(u8::to_ascii_uppercase).take(12).collect();
            if upper_verb == b"XCLIENT" || upper_verb == b"XFORWARD" {
                // Reliability case 50: only the proxy's own XCLIENT reaches a backend.
                self.d.err(s, "550 5.7.0 Error: insufficient authorization\r\n").await?;
                continue;
            }
            let mut framed = line.clone();
            framed.extend_from_slice(b"\r\n");
            let request = Request::parse(&mut framed.iter()).map(Request::into_owned);
            match request {
                Ok(Request::Ehlo { host }) => {
                    if !valid_domain(&host) {
                        self.d.err(s, "501 5.5.4 Error: invalid EHLO domain\r\n").await?;
                        continue;
                    }
                    self.helo = Some(host);
                    self.esmtp = true;
                    write(s, self.ehlo_reply().as_bytes()).await?;
                }
                Ok(Request::Helo { host }) => {
                    if !valid_domain(&host) {
                        self.d.err(s, "501 5.5.4 Error: invalid HELO domain\r\n").await?;
                        continue;
                    }
                    self.helo = Some(host);
                    self.esmtp = false;
                    write(s, format!("250 {}\r\n", self.settings.hostname).as_bytes()).await?;
                }
                Ok(Request::StartTls) => {
                    if !line.trim_ascii_end().eq_ignore_ascii_case(b"STARTTLS") {
                        // RFC 3207 §4 (the parser skips whatever follows the verb).
                        self.d.err(s, "501 5.5.4 Syntax: STARTTLS (no parameters allowed)\r\n").await?;
                        continue;
                    }
                    if self.settings.tls_active {
                        self.d.err(s, "503 5.5.1 Error: TLS already active\r\n").await?;
                        continue;
                    }
                    if !self.settings.starttls_offered {
                        self.d.err(s, "502 5.5.1 Error: command not implemented\r\n").await?;
                        continue;
                    }
                    if self.d.lines.has_buffered() {
                        // Reliability cases 1/2.
                        write(s, b"421 4.7.0 Error: pipelining after STARTTLS refused\r\n").await?;
                        return Ok(Event::Closed(CloseReason::StartTlsInjection));
                    }
                    write(s, b"220 2.0.0 Ready to start TLS\r\n").await?;
                    return Ok(Event::StartTls);
                }
                Ok(Request::Auth { mechanism, initial_response }) => {
                    if !self.settings.auth_allowed {
                        // RFC 4954 §6: 538 when the mechanism needs an encrypted connection.
                        self.d
                            .err(s, "538 5.7.11 Encryption required for requested authentication mechanism\r\n")
                            .await?;
                        continue;
                    }
                    if !self.esmtp {
                        self.d.err(s, "503 5.5.1 Error: send EHLO first\r\n").await?;
                        continue;
                    }
                    let mechanism = match mechanism {
                        AUTH_PLAIN => Mechanism::Plain,
                        AUTH_LOGIN => Mechanism::SaslLogin,
                        AUTH_EXTERNAL if self.settings.external => Mechanism::External,
                        _ => {
                            // Reliability case 42 (smtp-proto reports unknown names as 0).
                            self.d.err(s, "504 5.5.4 Unrecognized authentication type\r\n").await?;
                            continue;
                        }
                    };
                    let ir = (!initial_response.is_empty()).then(|| initial_response.into_bytes());
                    if let Some(credentials) = self.d.sasl(s, mechanism, ir).await? {
                        return Ok(Event::Login(LoginRequest { mechanism, credentials }));
                    }
                }
                Ok(Request::Noop { .. }) => write(s, b"250 2.0.0 OK\r\n").await?,
                Ok(Request::Rset) => write(s, b"250 2.0.0 OK\r\n").await?,
                Ok(Request::Quit) => {
                    write(s, b"221 2.0.0 Bye\r\n").await?;
                    return Ok(Event::Closed(CloseReason::Logout));
                }
                Ok(Request::Bdat { .. }) => {
                    // RFC 3030: a refused BDAT's chunk is still the client's to send, and what
                    // follows it is data, not commands. Reading it only to drop it is not worth
                    // the code; a client that sends one before AUTH is told and disconnected.
                    write(s, b"421 4.7.0 Error: BDAT before authentication, closing connection\r\n").await?;
                    return Ok(Event::Closed(CloseReason::ChunkBeforeLogin));
                }
                Ok(
                    Request::Mail { .. }
                    | Request::Rcpt { .. }
                    | Request::Data
                    | Request::Burl { .. }
                    | Request::Vrfy { .. }
                    | Request::Expn { .. }
                    | Request::Etrn { .. }
                    | Request::Atrn { .. },
                ) => {
                    if self.helo.is_none() {
                        // Also right after STARTTLS, which forgets the EHLO (reliability case 5,
                        // RFC 3207 §4.2).
                        self.d.err(s, "503 5.5.1 Error: send HELO/EHLO first\r\n").await?;
                    } else {
                        self.d.err(s, "530 5.7.0 Authentication required\r\n").await?;
                    }
                }
                Ok(Request::Help { .. } | Request::Lhlo { .. }) => {
                    self.d.err(s, "502 5.5.1 Error: command not implemented\r\n").await?;
                }
                Err(smtp_proto::Error::UnknownCommand) => {
                    self.d.err(s, "500 5.5.2 Error: command not recognized\r\n").await?;
                }
                Err(_) => self.d.err(s, "501 5.5.4 Error: syntax error in parameters\r\n").await?,
            }
        }
    }

    pub async fn login_failed<S: AsyncWrite + Unpin>(&mut self, s: &mut S, failure: LoginFailure) -> io::Result<()> {
        match failure {
            LoginFailure::BadCredentials => write(s, b"535 5.7.8 Authentication credentials invalid\r\n").await,
            LoginFailure::Unavailable | LoginFailure::InUse => {
                write(s, b"454 4.7.0 Temporary authentication failure\r\n").await
            }
            LoginFailure::Throttled => write(s, b"454 4.7.0 Too many login failures, try again later\r\n").await,
            LoginFailure::Message { text, smtp_code, temporary } => {
                // nginx's default code for a refusal without Auth-Error-Code (454 for one that is
                // temporary). Not 421 (RFC 5321 §3.8: the server closes after it, and the session
                // goes on here), and with an enhanced code, as EHLO announces ENHANCEDSTATUSCODES.
                let code = match smtp_code.as_deref().filter(|c| valid_reply_code(c) && !c.starts_with("421")) {
                    Some(c) if c.len() == 3 => format!("{c} {}.7.0", &c[..1]),
                    Some(c) => c.to_string(),
                    None if temporary => "454 4.7.0".to_string(),
                    None => "535 5.7.0".to_string(),
                };
                write(s, format!("{code} {text}\r\n").as_bytes()).await
            }
        }
    }

    pub fn into_pipelined(self) -> Vec<u8> {
        self.d.lines.into_buffered()
    }
}

/// `4xx` or `5xx`, optionally followed by a space and an enhanced status code of the same
/// class (RFC 3463: `5.7.8`).
fn valid_reply_code(code: &str) -> bool {
    let (basic, enhanced) = match code.split_once(' ') {
        Some((b, e)) => (b, Some(e)),
        None => (code, None),
    };
    let b = basic.as_bytes();
    let number =
        |x: Option<&str>| x.is_some_and(|x| (1..=3).contains(&x.len()) && x.bytes().all(|c| c.is_ascii_digit()));
    b.len() == 3
        && matches!(b[0], b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && enhanced.is_none_or(|e| {
            let mut parts = e.split('.');
            parts.next() == Some(&basic[..1]) && number(parts.next()) && number(parts.next()) && parts.next().is_none()
        })
}

/// An EHLO/HELO argument we are willing to pass on: a domain or an address literal, printable
/// ASCII without spaces (reliability case 51: it may end up in XCLIENT HELO=).
fn valid_domain(host: &str) -> bool {
    !host.is_empty() && host.len() <= 255 && host.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Protocol;
    use crate::protocol::tests::{run_front, settings, split_at_all};

    /// An auth service's Auth-Error-Code is used only if it makes an SMTP reply line.
    #[test]
    fn only_whole_reply_codes_from_an_auth_service_are_used() {
        for good in ["535", "454", "535 5.7.8", "451 4.3.0"] {
            assert!(valid_reply_code(good), "{good}");
        }
        for bad in [
            "53599",
            "4519",
            "235",
            "53",
            "535x",
            "535 x",
            "",
            "5a5",
            "535 ",
            "535 ...",
            "535 1 2 3",
            "451 5.7.0",
            "535 5.7",
            "535 5.7.8.9",
            "535 5.7.8888",
        ] {
            assert!(!valid_reply_code(bad), "{bad}");
        }
    }

    fn run(chunks: Vec<Vec<u8>>) -> (String, Vec<String>) {
        let (out, ev) = run_front(Protocol::Smtp, settings(), chunks);
        (String::from_utf8_lossy(&out).into_owned(), ev)
    }

    /// Reliability case 51: a greeting name with control bytes, DEL or over 255 bytes is refused
    /// (it would go on to the backend in EHLO and XCLIENT), and an error; a good one then works.
    #[test]
    fn bad_greeting_names_are_refused() {
        let long = format!("EHLO {}example\r\n", format!("{}.", "a".repeat(60)).repeat(5));
        let input = [b"EHLO a\x01b\r\nHELO \x7fx\r\n".to_vec(), long.into_bytes(), b"EHLO good.example\r\n".to_vec()];
        let (out, _) = run(vec![input.concat()]);
        assert_eq!(out.matches("501 5.5.4 Error: invalid EHLO domain\r\n").count(), 1, "{out}");
        assert_eq!(out.matches("501 5.5.4 Error: invalid HELO domain\r\n").count(), 1, "{out}");
        // The parser refuses the long name before the proxy's own check sees it.
        assert_eq!(out.matches("501 5.5.4 ").count(), 3, "{out}");
        assert!(out.ends_with("250 8BITMIME\r\n"), "{out}");
        assert_eq!(out.matches("250-proxy.example.test").count(), 1, "{out}");
    }

    /// Reliability case 3: no second STARTTLS inside TLS (nor on an implicit-TLS port); an
    /// error, and the session goes on.
    #[test]
    fn no_starttls_inside_tls() {
        let st = crate::protocol::FrontSettings { tls_active: true, ..settings() };
        let (out, ev) = run_front(Protocol::Smtp, st, vec![b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n".to_vec()]);
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(!out.contains("STARTTLS"), "{out}");
        assert!(out.ends_with("503 5.5.1 Error: TLS already active\r\n250 2.0.0 OK\r\n"), "{out}");
        assert_eq!(ev, vec!["closed client_closed"]);
    }

    #[test]
    fn ehlo_auth_plain_and_failure() {
        let (out, ev) =
            run(vec![b"EHLO client.example\r\nAUTH PLAIN AGFsaWNlAHB3\r\nMAIL FROM:<a@b>\r\nQUIT\r\n".to_vec()]);
        assert_eq!(
            out,
            "220 proxy.example.test ESMTP ready\r\n250-proxy.example.test\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-SIZE 1000\r\n250 8BITMIME\r\n535 5.7.8 Authentication credentials invalid\r\n530 5.7.0 Authentication required\r\n221 2.0.0 Bye\r\n"
        );
        assert_eq!(ev, vec!["login Some(\"alice\")", "closed logout"]);
    }

    /// A connection ended inside a SASL exchange is closed for what it was (the access log's
    /// result), as outside one.
    #[test]
    fn closes_inside_sasl_are_told_apart() {
        let (_, ev) = run(vec![b"EHLO c\r\nAUTH LOGIN\r\n".to_vec()]);
        assert_eq!(ev, vec!["closed client_closed"]);
        let mut long = b"EHLO c\r\nAUTH PLAIN\r\n".to_vec();
        long.extend(vec![b'A'; MAX_AUTH_LINE + 100]);
        long.extend_from_slice(b"\r\n");
        let (_, ev) = run(vec![long]);
        assert_eq!(ev, vec!["closed line_too_long"]);
    }

    /// Case 54: cancelled exchanges count as errors (unknown mechanisms already did).
    #[test]
    fn cancelled_auth_counts_as_an_error() {
        let (out, ev) = run(vec![b"EHLO c\r\n".to_vec(), b"AUTH LOGIN\r\n*\r\n".repeat(6)]);
        assert_eq!(out.matches("501 5.7.0 Authentication aborted").count(), 5, "{out}");
        assert!(out.ends_with("421 4.7.0 Too many errors, closing connection\r\n"), "{out}");
        assert_eq!(ev, vec!["closed too_many_errors"]);
    }

    /// BDAT before login: its chunk is never read as commands (the AUTH inside it here).
    #[test]
    fn bdat_before_login_closes() {
        let (out, ev) = run(vec![b"EHLO c\r\nBDAT 32 LAST\r\nAUTH PLAIN AGFsaWNlAHB3\r\nNOOP\r\n".to_vec()]);
        assert!(
            out.ends_with("250 8BITMIME\r\n421 4.7.0 Error: BDAT before authentication, closing connection\r\n"),
            "{out}"
        );
        assert_eq!(ev, vec!["closed chunk_before_login"]);
    }

    /// SASL EXTERNAL only where offered (reliability case 42); the response names the user.
    #[test]
    fn external_only_where_offered() {
        let input = b"EHLO c\r\nAUTH EXTERNAL YWxpY2U=\r\nAUTH EXTERNAL\r\nYWxpY2U=\r\nAUTH EXTERNAL =\r\n".to_vec();
        let (out, ev) = run(vec![input.clone()]);
        assert!(out.contains("250-AUTH PLAIN LOGIN\r\n"), "{out}");
        assert_eq!(out.matches("504 5.5.4 Unrecognized authentication type").count(), 3, "{out}");
        assert!(ev.iter().all(|e| !e.starts_with("login")), "{ev:?}");
        let st = crate::protocol::FrontSettings { external: true, ..settings() };
        let (out, ev) = run_front(Protocol::Smtp, st, vec![input]);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("250-AUTH PLAIN LOGIN EXTERNAL\r\n"), "{out}");
        assert!(out.contains("535 5.7.8 Authentication credentials invalid\r\n334 \r\n535"), "{out}");
        assert_eq!(&ev[..3], ["login Some(\"alice\")", "login Some(\"alice\")", "login None"]);
    }

    /// Reliability case 26: whole commands filling the 4,096-byte read exactly: every one answered.
    #[test]
    fn a_read_filled_exactly_with_commands() {
        let mut exact = b"NOOP\r\n".repeat(680);
        exact.extend_from_slice(&b"NOOP x\r\n".repeat(2));
        assert_eq!(exact.len(), 4096);
        let (out, ev) = run(vec![b"EHLO c\r\n".to_vec(), exact, b"QUIT\r\n".to_vec()]);
        let tail = out.split_once("250 8BITMIME\r\n").map(|(_, t)| t).unwrap_or_default();
        assert_eq!(tail, format!("{}221 2.0.0 Bye\r\n", "250 2.0.0 OK\r\n".repeat(682)));
        assert_eq!(ev, vec!["closed logout"]);
    }

    #[test]
    fn before_tls_no_auth_and_538() {
        let mut st = settings();
        st.auth_allowed = false;
        let (out, ev) = run_front(Protocol::Smtp, st, vec![b"EHLO c\r\nAUTH LOGIN\r\nSTARTTLS\r\n".to_vec()]);
        let out = String::from_utf8(out).unwrap();
        // Reliability case 6: STARTTLS shown, AUTH not, and AUTH refused.
        assert!(out.contains("250-STARTTLS\r\n") && !out.contains("AUTH PLAIN"), "{out}");
        assert!(out.contains("538 5.7.11 "));
        assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"));
        assert_eq!(ev, vec!["starttls"]);
    }

    /// A transaction before any HELO/EHLO (as right after STARTTLS, case 5) is told to greet
    /// first; STARTTLS takes no parameters (RFC 3207 §4), trailing blanks aside.
    #[test]
    fn greet_first_and_starttls_without_parameters() {
        let (out, ev) = run(vec![b"MAIL FROM:<a@b>\r\nEHLO c\r\nSTARTTLS now\r\nSTARTTLS \r\n".to_vec()]);
        assert!(out.starts_with("220 proxy.example.test ESMTP ready\r\n503 5.5.1 Error: send HELO/EHLO first\r\n250-"));
        assert!(
            out.ends_with(
                "250 8BITMIME\r\n501 5.5.4 Syntax: STARTTLS (no parameters allowed)\r\n220 2.0.0 Ready to start TLS\r\n"
            ),
            "{out}"
        );
        assert_eq!(ev, vec!["starttls"]);
    }

    #[test]
    fn starttls_with_pipelined_command_is_refused() {
        let (out, ev) = run(vec![b"EHLO c\r\nSTARTTLS\r\nRSET\r\n".to_vec()]);
        assert!(out.ends_with("421 4.7.0 Error: pipelining after STARTTLS refused\r\n"), "{out}");
        assert_eq!(ev, vec!["closed starttls_injection"]);
    }

    #[test]
    fn auth_needs_ehlo_and_login_mechanism_flow() {
        let (out, ev) = run(vec![
            b"AUTH PLAIN AGFsaWNlAHB3\r\nHELO c\r\nAUTH PLAIN\r\nEHLO c\r\nAUTH LOGIN\r\nYWxpY2U=\r\n*\r\nAUTH PLAIN\r\n=\r\nAUTH CRAM-MD5\r\n"
                .to_vec(),
        ]);
        assert!(out.contains("503 5.5.1 Error: send EHLO first\r\n250 proxy.example.test\r\n503 5.5.1"), "{out}");
        assert!(out.contains("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 5.7.0 Authentication aborted\r\n"), "{out}");
        // "=" is the empty response: malformed PLAIN, answered like a wrong password.
        assert!(out.contains("334 \r\n535 5.7.8"), "{out}");
        assert!(out.ends_with("504 5.5.4 Unrecognized authentication type\r\n"), "{out}");
        assert_eq!(ev, vec!["login None", "closed client_closed"]);
    }

    #[test]
    fn bad_input() {
        let (out, _) = run(vec![b"EHLO c\nXCLIENT ADDR=1.2.3.4\r\nFOO\r\nNOOP\r\n".to_vec()]);
        assert!(out.contains("500 5.5.2 Error: bare <CR> or <LF> received\r\n"));
        assert!(out.contains("550 5.7.0 Error: insufficient authorization\r\n"));
        assert!(out.contains("500 5.5.2 Error: command not recognized\r\n250 2.0.0 OK\r\n"));
        assert!(!out.contains("1.2.3.4") && !out.contains("FOO"));
        // Case 18, with CRLF or bare LF line ends alike: closed at once, nothing answered.
        for request in [&b"POST /x HTTP/1.1\r\n"[..], b"GET / HTTP/1.0\nHost: x\n\n"] {
            let (out, ev) = run(vec![request.to_vec()]);
            assert_eq!(out, "220 proxy.example.test ESMTP ready\r\n");
            assert_eq!(ev, vec!["closed http_request"]);
        }
        let mut long = b"NOOP ".to_vec();
        long.extend(vec![b'a'; 600]);
        long.extend_from_slice(b"\r\n");
        let (out, ev) = run(vec![long]);
        assert!(out.ends_with("421 4.7.0 Line too long, closing connection\r\n"), "{out}");
        assert_eq!(ev, vec!["closed line_too_long"]);
    }

    /// An auth service's refusal goes out with its Auth-Error-Code, made whole: an enhanced code
    /// added to a bare one (EHLO announces ENHANCEDSTATUSCODES), and never 421, after which the
    /// client would expect the connection to close (RFC 5321 §3.8).
    #[tokio::test]
    async fn refusal_codes_are_whole_and_never_421() {
        for (code, temporary, want) in [
            (Some("451 4.3.0"), true, "451 4.3.0 text\r\n"),
            (Some("535"), false, "535 5.7.0 text\r\n"),
            (Some("454"), true, "454 4.7.0 text\r\n"),
            (Some("421 4.3.2"), true, "454 4.7.0 text\r\n"),
            (Some("421"), false, "535 5.7.0 text\r\n"),
            (None, true, "454 4.7.0 text\r\n"),
            (None, false, "535 5.7.0 text\r\n"),
        ] {
            let mut out = Vec::new();
            let failure = LoginFailure::Message { text: "text".into(), smtp_code: code.map(str::to_string), temporary };
            SmtpFront::new(settings()).login_failed(&mut out, failure).await.unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), want, "{code:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn early_talker_is_refused() {
        let mut st = settings();
        st.greeting_delay = std::time::Duration::from_secs(1);
        let mut front = SmtpFront::new(st);
        let mut s = crate::protocol::tests::Script::new(vec![b"EHLO eager\r\n".to_vec()]);
        assert_eq!(front.greet(&mut s).await.unwrap(), Some(CloseReason::EarlyTalker));
        assert_eq!(s.written, EARLY_TALKER);
        assert!(s.written.starts_with(b"421 "));
    }

    proptest! {
        #[test]
        fn any_bytes_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let a = run_front(Protocol::Smtp, settings(), vec![bytes.clone()]);
            let b = run_front(Protocol::Smtp, settings(), split_at_all(&bytes, &cuts));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn smtp_shaped_input(lines in proptest::collection::vec(prop_oneof![
            Just("EHLO a".to_string()), Just("HELO a".to_string()), Just("AUTH PLAIN".to_string()),
            Just("AUTH LOGIN".to_string()), Just("*".to_string()), Just("=".to_string()), Just("MAIL FROM:<a@b>".to_string()),
            Just("AGEAYg==".to_string()), Just("RSET".to_string()), "[ -~]{0,30}",
        ], 0..20), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let bytes = lines.join("\r\n").into_bytes();
            let a = run_front(Protocol::Smtp, settings(), vec![bytes.clone()]);
            let b = run_front(Protocol::Smtp, settings(), split_at_all(&bytes, &cuts));
            prop_assert_eq!(a, b);
        }
    }
}
