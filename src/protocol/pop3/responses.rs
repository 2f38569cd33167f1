//! POP3 after login, as the relay follows it: which of the backend's responses are multi-line
//! (RFC 1939 3: a `+OK` line, then lines up to one holding only a dot), so that a goodbye (a
//! shutdown's, say) is never written inside one. Inside a RETR it would become a line of the
//! message, and the client, seeing no final dot, would have a truncated message or none.
//!
//! Whether a `+OK` starts a multi-line response depends on the command it answers, and POP3
//! answers commands in order (RFC 2449 6.6, PIPELINING), so the commands the client sends are
//! queued and each status line takes the next. Client to backend traffic in POP3 is a few short
//! commands, so following every line costs nothing that shows.

use std::collections::VecDeque;

/// Commands in flight that are followed; a client pipelining more leaves the relay unsure,
/// and it takes every later moment for the middle of a response (no goodbye).
const MOST_PENDING: usize = 1024;

/// Follows one POP3 session's commands and the backend's responses to them.
#[derive(Debug)]
pub struct Responses {
    /// For each command sent and not yet answered: whether a `+OK` to it is multi-line.
    pending: VecDeque<bool>,
    /// Which responses are multi-line is no longer known, for the rest of the session: more
    /// commands were in flight than `pending` keeps, or a line the backend sent where a status
    /// line was due was not one (a multi-line `+OK` to a command not known to have one).
    lost: bool,
    /// The client's current command line: its verb so far (up to 4 letters; `verb_len` counts
    /// on past them) and where the line is.
    verb: [u8; 4],
    verb_len: usize,
    command: Command,
    /// Inside a multi-line response: where the backend is in a line that may be the final dot.
    body: Option<BodyLine>,
    /// The backend's current status line: its first bytes, and how many have come.
    line: [u8; 3],
    line_len: usize,
}

/// Where a client's command line is (Dovecot splits the verb off at the first space, and
/// reads the line as a C string: a NUL ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Verb,
    /// Spaces after the verb.
    Gap,
    Argument,
    /// After a NUL: nothing more counts.
    Ended,
}

/// Where a multi-line response's current line is, as far as its end goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLine {
    /// At the start of a line.
    Start,
    /// A dot so far.
    Dot,
    /// A dot and a CR so far.
    DotCr,
    /// In a line that is not the final dot.
    Text,
}

impl Default for Responses {
    /// Before the relay: the login command (USER/PASS or AUTH) is in flight, and its one-line
    /// `+OK` is the first thing the relay writes to the client.
    fn default() -> Self {
        Responses {
            pending: VecDeque::from([false]),
            lost: false,
            verb: [0; 4],
            verb_len: 0,
            command: Command::Verb,
            body: None,
            line: [0; 3],
            line_len: 0,
        }
    }
}

impl Responses {
    /// The client sent `bytes` (commands) on to the backend.
    pub fn sent(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match (b, self.command) {
                (b'\n', _) => {
                    let multi = self.multi_line();
                    (self.verb_len, self.command) = (0, Command::Verb);
                    if self.pending.len() >= MOST_PENDING {
                        self.lost = true;
                    } else {
                        self.pending.push_back(multi);
                    }
                }
                (0, _) => self.command = Command::Ended,
                (b' ', Command::Verb) => self.command = Command::Gap,
                (b'\r', Command::Verb) | (b' ' | b'\r', Command::Gap) => {}
                (_, Command::Verb) => {
                    if let Some(at) = self.verb.get_mut(self.verb_len) {
                        *at = b;
                    }
                    self.verb_len = self.verb_len.saturating_add(1);
                }
                (_, Command::Gap) => self.command = Command::Argument,
                (_, Command::Argument | Command::Ended) => {}
            }
        }
    }

    /// Whether a `+OK` to the command line just ended is followed by lines: RETR, TOP and CAPA,
    /// LIST and UIDL without a message number.
    fn multi_line(&self) -> bool {
        let verb = &self.verb[..self.verb_len.min(self.verb.len())];
        let is = |v: &[u8]| self.verb_len == v.len() && verb.eq_ignore_ascii_case(v);
        let argument = self.command == Command::Argument;
        is(b"RETR") || is(b"TOP") || is(b"CAPA") || ((is(b"LIST") || is(b"UIDL")) && !argument)
    }

    /// The backend's `bytes` were written to the client.
    pub fn written(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.body {
                Some(at) => self.skip_body(at, bytes),
                None => self.status(bytes),
            };
        }
    }

    /// A status line (or part of one) at the start of `bytes`; returns what follows it.
    fn status<'b>(&mut self, bytes: &'b [u8]) -> &'b [u8] {
        let (line, rest, ended) = match memchr::memchr(b'\n', bytes) {
            Some(at) => (&bytes[..at], &bytes[at + 1..], true),
            None => (bytes, &[][..], false),
        };
        let have = self.line_len.min(self.line.len());
        let take = line.len().min(self.line.len() - have);
        self.line[have..have + take].copy_from_slice(&line[..take]);
        self.line_len = self.line_len.saturating_add(line.len());
        if ended {
            let head = &self.line[..self.line_len.min(self.line.len())];
            let ok = head == b"+OK";
            if !ok && head != b"-ER" {
                // Not a status line: a line of a multi-line response the relay did not expect
                // (or a server's own way); nothing after it can be placed.
                self.lost = true;
            }
            let multi = self.pending.pop_front().unwrap_or(false);
            self.body = (multi && ok).then_some(BodyLine::Start);
            self.line_len = 0;
        }
        rest
    }

    /// Inside a multi-line response, at `at`: skip to its final dot line (only a dot alone ends
    /// it; a text line starting with a dot is stuffed). Returns what follows the end, or nothing.
    fn skip_body<'b>(&mut self, mut at: BodyLine, mut bytes: &'b [u8]) -> &'b [u8] {
        loop {
            let Some((&b, rest)) = bytes.split_first() else {
                self.body = Some(at);
                return bytes;
            };
            at = match (at, b) {
                (BodyLine::Start, b'.') => BodyLine::Dot,
                (BodyLine::Dot, b'\r') => BodyLine::DotCr,
                (BodyLine::Dot | BodyLine::DotCr, b'\n') => {
                    self.body = None;
                    return rest;
                }
                (_, b'\n') => BodyLine::Start,
                _ => {
                    // On to the next line that starts with a dot: most lines need no look.
                    match memchr::memmem::find(bytes, b"\n.") {
                        Some(i) => {
                            bytes = &bytes[i + 2..];
                            at = BodyLine::Dot;
                            continue;
                        }
                        None => {
                            let start = bytes.last() == Some(&b'\n');
                            self.body = Some(if start { BodyLine::Start } else { BodyLine::Text });
                            return &[];
                        }
                    }
                }
            };
            bytes = rest;
        }
    }

    /// The client is part-way through a response (or the relay cannot tell).
    pub fn inside(&self) -> bool {
        self.body.is_some() || self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `commands` sent (pipelined with the login, so before its `+OK`), then the login's `+OK`
    /// and `responses` written, each in pieces of `step` bytes: inside a response at the end?
    fn inside_after(commands: &[u8], responses: &[u8], step: usize) -> bool {
        let mut r = Responses::default();
        commands.chunks(step).for_each(|c| r.sent(c));
        r.written(b"+OK Logged in.\r\n");
        responses.chunks(step).for_each(|c| r.written(c));
        r.inside()
    }

    #[test]
    fn multi_line_responses_are_followed_to_their_final_dot() {
        let retr = b"+OK 40 octets\r\nSubject: x\r\n\r\n..stuffed\r\n.\r\n";
        for step in [1, 3, 1000] {
            // Inside the message at every line end before its final dot, between responses after.
            for cut in [15, 27, 29, 40, 41] {
                assert!(inside_after(b"RETR 1\r\n", &retr[..cut], step), "{cut} {step}");
            }
            assert!(!inside_after(b"RETR 1\r\n", retr, step));
            // Pipelined (RFC 2449 PIPELINING): each status line answers the next command.
            let stream = b"STAT\r\nLIST 1\r\nUIDL\r\nRETR 2\r\nDELE 2\r\n";
            let answers: &[&[u8]] =
                &[b"+OK 2 80\r\n", b"+OK 1 40\r\n", b"+OK\r\n1 a\r\n2 b\r\n.\r\n", b"-ERR no such message\r\n"];
            let mut written = Vec::new();
            for (k, a) in answers.iter().enumerate() {
                written.extend_from_slice(a);
                assert!(!inside_after(stream, &written, step), "after answer {k}");
            }
            assert!(inside_after(stream, b"+OK 2 80\r\n+OK 1 40\r\n+OK\r\n1 a\r\n", step));
            assert!(inside_after(b"top 1 0\r\n", b"+OK\r\nSubject: x\r\n", step));
            assert!(inside_after(b"capa\n", b"+OK\nTOP\n", step), "bare LF line ends");
            assert!(!inside_after(b"capa\n", b"+OK\nTOP\n.\n", step));
            // LIST and UIDL with a message number answer in one line.
            assert!(!inside_after(b"UIDL 1\r\nLIST 2\r\nNOOP\r\n", b"+OK 1 a\r\n+OK 2 40\r\n+OK\r\n", step));
            // As Dovecot reads a command: trailing spaces are no argument, and a NUL ends the
            // line (a C string).
            for command in [&b"LIST    \r\n"[..], b"uidl\0 1\r\n", b"LIST\0\r\n"] {
                assert!(inside_after(command, b"+OK\r\n1 40\r\n", step), "{command:?}");
            }
        }
    }

    /// Whatever two writes a response comes in, its end is found (a cut right after a line end,
    /// before the final dot, among them).
    #[test]
    fn the_final_dot_is_found_wherever_the_writes_are_cut() {
        let stream: &[u8] = b"+OK Logged in.\r\n+OK 3 octets\r\nab\r\n..c\r\n.\r\n+OK\r\n";
        for cut in 0..stream.len() {
            let mut r = Responses::default();
            r.sent(b"RETR 1\r\nNOOP\r\n");
            r.written(&stream[..cut]);
            r.written(&stream[cut..]);
            assert!(!r.inside(), "cut at {cut}");
        }
    }

    /// Commands are read as Dovecot reads them: the verb ends at the first space, more spaces
    /// are no argument, and a NUL ends the line (a C string).
    #[test]
    fn commands_are_read_as_dovecot_reads_them() {
        for (command, multi) in [
            (&b"LIST\r\n"[..], true),
            (b"LIST    \r\n", true),
            (b"LIST 1\r\n", false),
            (b"LIST\0 1\r\n", true),
            (b"uidl\n", true),
            (b"UIDL  7\r\n", false),
            (b"RETR 1\r\n", true),
            (b"TOP 1 0\r\n", true),
            (b"CAPA\r\n", true),
            (b"RETRX 1\r\n", false),
            (b"RET\r\n", false),
            (b"DELE 1\r\n", false),
        ] {
            let mut r = Responses::default();
            r.sent(command);
            assert_eq!(r.pending.back(), Some(&multi), "{:?}", String::from_utf8_lossy(command));
        }
    }

    /// A line where a status line was due that is not one (a multi-line `+OK` to a command the
    /// relay does not know to have one): unsure from then on, never wrongly between responses.
    #[test]
    fn an_unexpected_multi_line_response_leaves_the_relay_unsure() {
        for step in [1, 1000] {
            assert!(inside_after(b"LANG\r\nRETR 1\r\n", b"+OK\r\nen English\r\n.\r\n+OK 9 octets\r\nx\r\n.\r\n", step));
            assert!(!inside_after(b"LANG\r\n", b"-ERR Unknown command\r\n", step));
        }
    }

    #[test]
    fn a_client_pipelining_past_the_limit_leaves_the_relay_unsure() {
        let many = b"NOOP\r\n".repeat(MOST_PENDING + 1);
        let mut r = Responses::default();
        r.sent(&many);
        assert!(r.inside());
        // An unasked-for response (nothing pending) is one line.
        let mut r = Responses::default();
        r.written(b"+OK Logged in.\r\n-ERR Disconnected for inactivity.\r\n");
        assert!(!r.inside());
    }
}
