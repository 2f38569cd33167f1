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
    /// More commands were in flight than `pending` keeps.
    lost: bool,
    /// The client's current command line: its first bytes, and how many have come.
    command: [u8; 8],
    command_len: usize,
    /// The backend is inside a multi-line response.
    body: bool,
    /// The backend's current line: its first bytes, and how many have come.
    line: [u8; 4],
    line_len: usize,
}

impl Default for Responses {
    /// Before the relay: the login command (USER/PASS or AUTH) is in flight, and its one-line
    /// `+OK` is the first thing the relay writes to the client.
    fn default() -> Self {
        Responses {
            pending: VecDeque::from([false]),
            lost: false,
            command: [0; 8],
            command_len: 0,
            body: false,
            line: [0; 4],
            line_len: 0,
        }
    }
}

/// Keep the first `head.len()` bytes of a line that arrives in pieces.
fn keep(head: &mut [u8], len: &mut usize, bytes: &[u8]) {
    let have = (*len).min(head.len());
    let take = bytes.len().min(head.len() - have);
    head[have..have + take].copy_from_slice(&bytes[..take]);
    *len = len.saturating_add(bytes.len());
}

/// Each LF-terminated piece of `bytes` (`true`: the line ends there) in turn.
fn lines(mut bytes: &[u8], mut each: impl FnMut(&[u8], bool)) {
    while !bytes.is_empty() {
        match memchr::memchr(b'\n', bytes) {
            Some(at) => {
                each(&bytes[..at], true);
                bytes = &bytes[at + 1..];
            }
            None => {
                each(bytes, false);
                return;
            }
        }
    }
}

impl Responses {
    /// The client sent `bytes` (commands) on to the backend.
    pub fn sent(&mut self, bytes: &[u8]) {
        lines(bytes, |piece, ended| {
            keep(&mut self.command, &mut self.command_len, piece);
            if ended {
                let multi = self.multi_line();
                self.command_len = 0;
                if self.pending.len() >= MOST_PENDING {
                    self.lost = true;
                } else {
                    self.pending.push_back(multi);
                }
            }
        });
    }

    /// Whether a `+OK` to the command line just ended is followed by lines: RETR, TOP and CAPA,
    /// LIST and UIDL without a message number.
    fn multi_line(&self) -> bool {
        let line = &self.command[..self.command_len.min(self.command.len())];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let verb = words.next().unwrap_or_default();
        let argument = words.next().is_some() || self.command_len > self.command.len();
        let is = |v: &[u8]| verb.eq_ignore_ascii_case(v);
        is(b"RETR") || is(b"TOP") || is(b"CAPA") || ((is(b"LIST") || is(b"UIDL")) && !argument)
    }

    /// The backend's `bytes` were written to the client.
    pub fn written(&mut self, bytes: &[u8]) {
        lines(bytes, |piece, ended| {
            keep(&mut self.line, &mut self.line_len, piece);
            if ended {
                let line = &self.line[..self.line_len.min(self.line.len())];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if self.body {
                    // Only a dot alone ends it (a text line starting with a dot is stuffed).
                    self.body = line != b".";
                } else {
                    let multi = self.pending.pop_front().unwrap_or(false);
                    self.body = multi && line.starts_with(b"+OK");
                }
                self.line_len = 0;
            }
        });
    }

    /// The client is part-way through a response (or the relay cannot tell).
    pub fn inside(&self) -> bool {
        self.body || self.lost
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
