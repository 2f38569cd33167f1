//! A bounded CRLF line reader shared by the POP3 and SMTP front ends.
//!
//! It buffers at most `max` bytes plus one read, hands out complete lines without their CRLF,
//! and flags the malformed ones instead of guessing: a bare LF as line end and a CR that is not
//! followed by LF are errors (reliability case 28), so no part of the proxy ever splits lines
//! differently from another.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::auth::Credentials;
use crate::protocol::sasl::{self, Response};
use crate::protocol::{CloseReason, FrontSettings, Mechanism, looks_like_http, write};

const READ_CHUNK: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line without its CRLF.
    Ok(Vec<u8>),
    /// A line ending in bare LF, or holding a bare CR: reject it. `http`: it starts like an HTTP
    /// request (reliability case 18), which closes the connection at once, line ends or not.
    Malformed { http: bool },
    /// No line end within the limit: close the connection.
    TooLong,
}

pub enum Fill {
    Data,
    Eof,
    Timeout,
}

pub struct LineReader {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no LF: a line sent a byte at a time is searched once.
    scanned: usize,
    max: usize,
    /// When the line being received started (minimum-progress rule).
    partial_since: Option<tokio::time::Instant>,
}

impl LineReader {
    pub fn new(max: usize) -> LineReader {
        LineReader { buf: Vec::new(), scanned: 0, max, partial_since: None }
    }

    /// The next complete line from the buffer, if any.
    pub fn next_line(&mut self) -> Option<Line> {
        match memchr::memchr(b'\n', &self.buf[self.scanned..]).map(|i| i + self.scanned) {
            Some(i) => {
                self.partial_since = None;
                self.scanned = 0;
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if i + 1 > self.max {
                    return Some(Line::TooLong);
                }
                if line.pop() != Some(b'\r') || line.contains(&b'\r') {
                    return Some(Line::Malformed { http: looks_like_http(&line) });
                }
                Some(Line::Ok(line))
            }
            None if self.buf.len() > self.max => Some(Line::TooLong),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Whether bytes beyond the lines handed out are buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The buffered bytes (after a login: forwarded to the backend verbatim).
    pub fn into_buffered(self) -> Vec<u8> {
        self.buf
    }

    /// Read once more from `s`, waiting at most `idle`, and at most what is left of
    /// `command_timeout` since the current line's first byte (reliability case 58: one byte
    /// every few seconds cannot hold a session).
    pub async fn fill<S: AsyncRead + Unpin>(
        &mut self,
        s: &mut S,
        idle: Duration,
        command_timeout: Duration,
    ) -> io::Result<Fill> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut wait = idle;
        if self.buf.is_empty() {
            self.partial_since = None;
        } else {
            let since = *self.partial_since.get_or_insert_with(tokio::time::Instant::now);
            wait = wait.min(command_timeout.saturating_sub(since.elapsed()));
        }
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Err(_) => Ok(Fill::Timeout),
            Ok(Ok(0)) => Ok(Fill::Eof),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(Fill::Data)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    #[cfg(test)]
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

/// The fixed replies of a line protocol's SASL exchange and line errors (POP3 and SMTP differ
/// only in these).
pub struct Replies {
    pub plain_challenge: &'static [u8],
    pub user_challenge: &'static [u8],
    pub password_challenge: &'static [u8],
    /// `*` from the client (reliability case 40).
    pub canceled: &'static str,
    /// A response that is not base64 (case 39); counted as an error.
    pub invalid: &'static str,
    pub too_long: &'static [u8],
    pub idle: &'static [u8],
    /// In place of the error reply that reaches `max_errors`, where the protocol cannot say it
    /// is closing in a reply of its own (POP3: one reply per command, RFC 2449 §6.6; a separate
    /// `-ERR` would be read as the answer to a pipelined next command).
    pub last_error: Option<&'static [u8]>,
}

/// The shared half of the POP3 and SMTP front ends: framing, error counting, deadlines and the
/// SASL PLAIN/LOGIN exchange.
pub struct Dialogue {
    pub lines: LineReader,
    pub errors: u32,
    max_errors: u32,
    idle: Duration,
    command: Duration,
    replies: &'static Replies,
}

impl Dialogue {
    pub fn new(max_line: usize, settings: &FrontSettings, replies: &'static Replies) -> Dialogue {
        Dialogue {
            lines: LineReader::new(max_line),
            errors: 0,
            max_errors: settings.max_errors,
            idle: settings.idle_timeout,
            command: settings.command_timeout,
            replies,
        }
    }

    /// Answer with an error reply and count it (the last one allowed says the connection closes,
    /// where `Replies::last_error` has it).
    pub async fn err<S: AsyncWrite + Unpin>(&mut self, s: &mut S, reply: &str) -> io::Result<()> {
        self.errors += 1;
        match self.replies.last_error {
            Some(last) if self.errors >= self.max_errors => write(s, last).await,
            _ => write(s, reply.as_bytes()).await,
        }
    }

    /// The next line: `Ok(Some)` a line, `Ok(None)` a malformed one, `Err(reason)` to close
    /// (the reason's reply already sent).
    pub async fn line<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> io::Result<Result<Option<Vec<u8>>, CloseReason>> {
        loop {
            match self.lines.next_line() {
                Some(Line::Ok(l)) => return Ok(Ok(Some(l))),
                Some(Line::Malformed { http: true }) => return Ok(Err(CloseReason::HttpRequest)),
                Some(Line::Malformed { http: false }) => return Ok(Ok(None)),
                Some(Line::TooLong) => {
                    write(s, self.replies.too_long).await?;
                    return Ok(Err(CloseReason::LineTooLong));
                }
                None => match self.lines.fill(s, self.idle, self.command).await? {
                    Fill::Data => {}
                    Fill::Eof => return Ok(Err(CloseReason::ClientClosed)),
                    Fill::Timeout => {
                        write(s, self.replies.idle).await?;
                        return Ok(Err(CloseReason::IdleTimeout));
                    }
                },
            }
        }
    }

    /// Run a SASL exchange: `Ok(Some(creds))` to decide on (`None` inside: malformed, answered
    /// like wrong credentials), `Ok(None)` when it was cancelled or refused here.
    pub async fn sasl<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        mechanism: Mechanism,
        ir: Option<Vec<u8>>,
    ) -> io::Result<Option<Option<Credentials>>> {
        let first = match ir {
            Some(ir) => sasl::decode_response(&ir),
            None => {
                let challenge = if matches!(mechanism, Mechanism::Plain | Mechanism::External) {
                    self.replies.plain_challenge
                } else {
                    self.replies.user_challenge
                };
                write(s, challenge).await?;
                self.response(s).await?
            }
        };
        let Some(first) = self.answered(s, first).await? else { return Ok(None) };
        match mechanism {
            Mechanism::Plain => return Ok(Some(sasl::decode_plain(&first))),
            Mechanism::External => return Ok(Some(sasl::external(&first))),
            Mechanism::Login | Mechanism::SaslLogin => {}
        }
        write(s, self.replies.password_challenge).await?;
        let second = self.response(s).await?;
        let Some(password) = self.answered(s, second).await? else { return Ok(None) };
        Ok(Some(sasl::credentials(&first, &password)))
    }

    async fn answered<S: AsyncWrite + Unpin>(&mut self, s: &mut S, r: Response) -> io::Result<Option<Vec<u8>>> {
        match r {
            Response::Data(d) => Ok(Some(d)),
            Response::Cancel => {
                // An error for case 54's count: AUTH and cancel over and over would never end.
                self.err(s, self.replies.canceled).await?;
                Ok(None)
            }
            Response::Invalid => {
                self.err(s, self.replies.invalid).await?;
                Ok(None)
            }
        }
    }

    async fn response<S: AsyncRead + AsyncWrite + Unpin>(&mut self, s: &mut S) -> io::Result<Response> {
        match self.line(s).await? {
            Ok(Some(line)) => Ok(sasl::decode_response(&line)),
            Ok(None) => Ok(Response::Invalid),
            Err(reason) => Err(crate::protocol::closed(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_and_malformed_ends() {
        let mut r = LineReader::new(16);
        r.push(b"NOOP\r\nA\nB\rC\r\nPARTIAL");
        assert_eq!(r.next_line(), Some(Line::Ok(b"NOOP".to_vec())));
        assert_eq!(r.next_line(), Some(Line::Malformed { http: false }));
        assert_eq!(r.next_line(), Some(Line::Malformed { http: false }));
        assert_eq!(r.next_line(), None);
        assert!(r.has_buffered());
        r.push(&[b'x'; 20]);
        assert_eq!(r.next_line(), Some(Line::TooLong));
    }

    proptest! {
        #[test]
        fn bounded_and_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut r = LineReader::new(64);
            r.push(&bytes);
            while let Some(l) = r.next_line() {
                if let Line::Ok(l) = &l {
                    prop_assert!(l.len() <= 64 && !l.contains(&b'\n') && !l.contains(&b'\r'));
                }
                if l == Line::TooLong { break; }
            }
        }
    }
}
