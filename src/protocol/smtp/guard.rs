//! After login an SMTP session is relayed as bytes, with one exception: XCLIENT and XFORWARD
//! from the client must never reach the backend (reliability case 50, after login as well as
//! before). A backend that trusts the proxy with them checks that once per connection (Postfix
//! caches `smtpd_authorized_xclient_hosts` so that XCLIENT cannot revoke itself), so a client's
//! `XCLIENT LOGIN=someone-else` relayed after AUTH would be believed: another user's login, a
//! forged address.
//!
//! So the guard refuses every command line that a server could read as one of these commands:
//! after a CR or LF (or at the start), any blanks, the verb in any case, then a line end or any
//! byte that cannot go on a word (anything but a letter or digit). Blanks are what Postfix's
//! tokenizer splits words on (C's `isspace`: space, tab, VT, FF, and a CR that does not end the
//! line, which Postfix keeps), so `XCLIENT\x0bLOGIN=x` and `XCLIENT\rLOGIN=x` are refused like
//! `XCLIENT LOGIN=x`; and Postfix reads a line as a C string, so a NUL ends it: `STARTTLS\0` is
//! a STARTTLS to Postfix, and refused here.
//!
//! BDAT is refused the same way. Its chunk is a byte count, and the server reads its next
//! command where the count ends, in the middle of a line if the client wants: `BDAT 2 LAST`,
//! then `hiXCLIENT LOGIN=x` is a message of two bytes and an XCLIENT, which Postfix takes (the
//! end-to-end test shows it). The guard does not follow chunks: the proxy never offers CHUNKING
//! (`ehlo.rs`), clients send DATA, and one that sends BDAT anyway has its session ended.
//!
//! STARTTLS is refused the same way. Relayed to a backend that takes it, it would start a TLS
//! session between the client and the backend, inside the client's session with the proxy, and
//! from then on the guard would see only ciphertext: XCLIENT, XFORWARD and BDAT would pass
//! unseen. Whether the backend takes it cannot be known from its EHLO to the proxy (Postfix can
//! offer different extensions per client address, which XCLIENT changes), and a client already
//! inside TLS has no use for it.
//!
//! **Message text is not refused**, so a message may hold a line such as `XCLIENT LOGIN=x` (a
//! pasted SMTP transcript). The guard takes the client's bytes for text only where the backend's
//! replies say the backend does too, and for commands everywhere else:
//! - It counts the command lines the backend was sent (a line ends at LF, as in Postfix) and the
//!   replies it sent back (final lines: a code and a blank or the line end), as the relay reads
//!   them. SMTP answers every command once, in order, so the reply numbered like a command
//!   answers it. A server that merges lines answers fewer, which only keeps the guard strict.
//! - Text begins only where the backend's `354` answers a `DATA` line by that count, and only
//!   when the client has sent nothing since that line (a client waits for the 354, RFC 5321
//!   4.1.1.4 and RFC 2920 3.1). So the server is then reading text, from right after that line.
//!   Bytes that came before the 354 was read were checked as commands.
//! - Text ends at the first line, ended by a CR or an LF, that is a dot among blanks or NULs:
//!   every end-of-data look-alike known to be taken for the end by some server (`\n.\n`,
//!   `\r.\r`, SMTP smuggling, cases 46–47). Where the backend reads on as text, the guard checks
//!   the rest of the message as commands, and its count is then ahead of the backend's for the
//!   rest of the session: later messages are checked as commands too. Strictness is all it costs.
//! - Whatever could make the counts disagree the other way puts the guard in doubt for the rest
//!   of the session, when it checks everything as commands (as it would without counting): a CR
//!   not followed by LF in a command (a server may end a line there), a command line over 1000
//!   octets, a backend line that is not a reply, more replies than commands, and a reply while
//!   text is being sent (the server may have stopped reading it).
//!
//! What is left to the backend: a server that answers in the middle of a message and then reads
//! commands without closing (none known; RFC 5321 4.1.1.4 has it read to the end) could be sent
//! a command the client wrote before that reply reached the proxy. A server that cuts an overlong
//! command line in two and runs the second part (Postfix skips the excess) could be sent a verb
//! the guard did not see at a line start. Neither can reach Postfix.

/// The verbs the guard knows, one bit each in a guard's set.
const VERBS: [&[u8]; 5] = [b"XCLIENT", b"XFORWARD", b"BDAT", b"STARTTLS", b"DATA"];
/// Refused.
const REFUSED: u8 = 0b0_1111;
/// Not refused: its 354 starts a message.
const DATA: u8 = 0b1_0000;
/// A command line longer than this puts the guard in doubt. RFC 5321 (4.5.3.1.4) allows 512
/// octets; Postfix reads 2048, and some servers cut a longer line in two.
const LONGEST_COMMAND: usize = 1000;

/// Scans what the client sends after login, across reads, and follows the backend's replies.
#[derive(Debug)]
pub struct CommandGuard {
    state: State,
    /// The client is sending a message's text, and where in its current line.
    body: Option<Body>,
    /// The last byte scanned was a CR (a command's): an LF must follow.
    cr: bool,
    /// The current command line began with DATA.
    data: bool,
    /// The last byte scanned ended a DATA line.
    after_data: bool,
    line_len: usize,
    /// Command lines the backend has been sent and final reply lines it sent back. The login
    /// counts as the first command: its reply is the proxy's own `235`, relayed first.
    sent: u64,
    replies: u64,
    /// The backend's current line: its first bytes, and how many have come.
    reply_head: [u8; 4],
    reply_len: usize,
    /// The backend's last line went on to another (`250-`): a reply is part-way through.
    continued: bool,
    /// The counts may no longer match the backend's: text is never followed again.
    doubt: bool,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// At the start of a line or in its leading blanks (`matched` = 0), or `matched` letters
    /// into the verbs whose bits are set in `verbs`.
    Line { matched: usize, verbs: u8 },
    /// In a line that cannot be one of the commands.
    Text,
}

/// Where a message's text line is, as far as its end goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Blanks or NULs so far.
    Start,
    /// Blanks and NULs around one dot so far.
    Dot,
    /// A dot line ended with a CR: the end of the message, with the LF that may follow.
    DotCr,
    /// Anything else: a line of text.
    Line,
}

/// Word separators besides CR and LF (those end a line here, and CR may separate words too).
fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

impl Default for CommandGuard {
    fn default() -> Self {
        // The first byte after login starts a command line.
        Self {
            state: State::Line { matched: 0, verbs: REFUSED | DATA },
            body: None,
            cr: false,
            data: false,
            after_data: false,
            line_len: 0,
            sent: 1,
            replies: 0,
            reply_head: [0; 4],
            reply_len: 0,
            continued: false,
            doubt: false,
        }
    }
}

impl CommandGuard {
    /// Scan the next bytes the client sent. `Some(n)`: a refused command starts at `bytes[n]`
    /// (or, at 0, began in an earlier read); only `bytes[..n]` may go on, and the session must
    /// end. What went on before holds no line end after the verb, so no server acts on it.
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut line_start = 0;
        let mut i = 0;
        while i < bytes.len() {
            if self.body.is_some() {
                i = self.scan_text(bytes, i);
                line_start = i;
                continue;
            }
            let b = bytes[i];
            self.after_data = false;
            if std::mem::take(&mut self.cr) && b != b'\n' {
                // A bare CR: a server may have ended a command line there, and the counts with it.
                self.doubt = true;
            }
            if b == b'\r' || b == b'\n' {
                // The verb followed by a line end (bare), or by a CR that a server may take for a
                // word separator inside the line.
                if let State::Line { matched, verbs } = self.state {
                    match Self::complete(matched, verbs) {
                        Some(true) => return Some(line_start),
                        Some(false) => self.data = true,
                        None => {}
                    }
                }
                self.state = State::Line { matched: 0, verbs: REFUSED | DATA };
                i += 1;
                line_start = i;
                if b == b'\r' {
                    self.cr = true;
                } else {
                    // A command line ends: the backend answers it.
                    self.sent += 1;
                    self.after_data = std::mem::take(&mut self.data);
                    self.line_len = 0;
                }
                continue;
            }
            match self.state {
                State::Text => {
                    let at = memchr::memchr2(b'\r', b'\n', &bytes[i..]).unwrap_or(bytes.len() - i);
                    self.grow_line(at);
                    i += at;
                }
                State::Line { matched: 0, .. } if blank(b) => {
                    self.grow_line(1);
                    i += 1;
                }
                State::Line { matched, verbs } => {
                    let mut next = 0;
                    if !b.is_ascii_alphanumeric() {
                        match Self::complete(matched, verbs) {
                            Some(true) => return Some(line_start),
                            Some(false) => self.data = true,
                            None => {}
                        }
                    } else {
                        for (k, verb) in VERBS.iter().enumerate() {
                            if verbs & (1 << k) != 0 && matched < verb.len() && verb[matched].eq_ignore_ascii_case(&b) {
                                next |= 1 << k;
                            }
                        }
                    }
                    self.state =
                        if next == 0 { State::Text } else { State::Line { matched: matched + 1, verbs: next } };
                    self.grow_line(1);
                    i += 1;
                }
            }
        }
        None
    }

    /// `matched` letters into `verbs` make a whole verb: Some(true) a refused one, Some(false)
    /// DATA.
    fn complete(matched: usize, verbs: u8) -> Option<bool> {
        let k = (0..VERBS.len()).find(|&k| verbs & (1 << k) != 0 && VERBS[k].len() == matched)?;
        Some(REFUSED & (1 << k) != 0)
    }

    fn grow_line(&mut self, n: usize) {
        self.line_len += n;
        if self.line_len > LONGEST_COMMAND {
            self.doubt = true;
        }
    }

    /// Scan message text from `bytes[i]` to the end of the message or of `bytes`; returns where
    /// it stopped.
    fn scan_text(&mut self, bytes: &[u8], mut i: usize) -> usize {
        while let Some(at) = self.body {
            let Some(&b) = bytes.get(i) else { return i };
            let next = match (at, b) {
                (Body::DotCr, b'\n') => {
                    self.end_text();
                    return i + 1;
                }
                (Body::DotCr, _) => {
                    // A bare CR after the dot: the next line is a command's, and in doubt.
                    self.end_text();
                    self.doubt = true;
                    return i;
                }
                (Body::Dot, b'\n') => {
                    self.end_text();
                    return i + 1;
                }
                (Body::Dot, b'\r') => Body::DotCr,
                (_, b'\r' | b'\n') => Body::Start,
                (Body::Start, b'.') => Body::Dot,
                (Body::Start | Body::Dot, 0) => at,
                (Body::Start | Body::Dot, b) if blank(b) => at,
                _ => {
                    // Text: on to the next line end.
                    i += memchr::memchr2(b'\r', b'\n', &bytes[i..]).unwrap_or(bytes.len() - i);
                    self.body = Some(Body::Line);
                    continue;
                }
            };
            self.body = Some(next);
            i += 1;
        }
        i
    }

    /// The message's end (as far as any server may take it): the next line is a command, and the
    /// end itself is answered like one.
    fn end_text(&mut self) {
        self.body = None;
        self.sent += 1;
        self.state = State::Line { matched: 0, verbs: REFUSED | DATA };
        self.data = false;
        self.after_data = false;
        self.cr = false;
        self.line_len = 0;
    }

    /// Follow the next bytes the backend sent the client: count its replies, and at a 354 that
    /// answers the client's DATA, treat what the client sends next as message text.
    pub fn replied(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (line, ended) = match memchr::memchr(b'\n', bytes) {
                Some(at) => (&bytes[..at], true),
                None => (bytes, false),
            };
            bytes = &bytes[line.len() + usize::from(ended)..];
            let have = self.reply_len.min(self.reply_head.len());
            let take = line.len().min(self.reply_head.len() - have);
            self.reply_head[have..have + take].copy_from_slice(&line[..take]);
            self.reply_len = self.reply_len.saturating_add(line.len());
            if ended {
                self.reply_line();
            }
        }
    }

    /// The client has part of a multi-line reply, its last line ended.
    pub fn inside_reply(&self) -> bool {
        self.continued
    }

    /// The backend's current line has ended.
    fn reply_line(&mut self) {
        let head = &self.reply_head[..self.reply_len.min(self.reply_head.len())];
        self.reply_len = 0;
        self.continued = false;
        let code = head.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit));
        let fin = match head.get(3) {
            None | Some(b' ' | b'\r') => true,
            Some(b'-') => false,
            Some(_) => {
                self.doubt = true;
                return;
            }
        };
        let Some(code) = code else {
            self.doubt = true;
            return;
        };
        self.continued = !fin;
        if !fin {
            return;
        }
        self.replies += 1;
        if self.replies > self.sent {
            // A reply nobody asked for, or one while text is sent (whose end is not counted
            // yet): the backend may be reading commands where the guard would not look.
            self.doubt = true;
            if self.body.take().is_some() {
                self.state = State::Line { matched: 0, verbs: REFUSED | DATA };
                self.line_len = 0;
            }
        } else if code == b"354" && self.after_data && self.replies == self.sent && !self.doubt {
            self.body = Some(Body::Start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Where a guard that is fed `chunks` one after the other refuses: (chunk, offset).
    fn refused(chunks: &[&[u8]]) -> Option<(usize, usize)> {
        let mut g = CommandGuard::default();
        chunks.iter().enumerate().find_map(|(k, c)| g.scan(c).map(|at| (k, at)))
    }

    #[test]
    fn refuses_the_commands_wherever_a_line_starts() {
        // Reliability case 50 after login, and the forms the end-to-end test shows Postfix
        // accepting: any case, leading blanks, a tab after the verb, bare LF line ends, after
        // other commands and inside what may be message text (case 46's look-alikes).
        for (stream, at) in [
            (&b"XCLIENT LOGIN=x\r\n"[..], 0),
            (b"xclient login=x\n", 0),
            (b"  \tXClient\tLOGIN=x\r\n", 0),
            (b"XFORWARD ADDR=1.2.3.4\r\n", 0),
            (b"NOOP\r\nXCLIENT ADDR=1.2.3.4\r\n", 6),
            (b"NOOP\rXCLIENT ADDR=1.2.3.4\r\n", 5),
            (b"DATA\r\nSubject: x\r\n\r\nbody\n.\nXCLIENT LOGIN=x\r\n", 27),
            (b"MAIL FROM:<a@b>\r\nDATA\r\ntext\r\n xforward NAME=x\r\n", 29),
            // Postfix splits words on every isspace character and keeps a CR inside a line.
            (b"XCLIENT\x0bLOGIN=victim\r\n", 0),
            (b"XCLIENT\x0cLOGIN=victim\r\n", 0),
            (b"XCLIENT\rLOGIN=victim\r\n", 0),
            (b"\x0cXCLIENT LOGIN=victim\r\n", 0),
            (b"\x0b \tXFORWARD\x0bNAME=x\r\n", 0),
            (b"NOOP\r\nXCLIENT\r\n", 6),
            (b"NOOP\r\nxforward\n", 6),
            // A BDAT chunk ends where its count says, mid-line: the XCLIENT after "hi" would be
            // read as a command. BDAT itself is refused, however it goes on.
            (b"BDAT 2 LAST\r\nhiXCLIENT LOGIN=x\r\n", 0),
            (b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nbdat 10\r\n", 32),
        ] {
            assert_eq!(refused(&[stream]), Some((0, at)), "{:?}", String::from_utf8_lossy(stream));
        }
    }

    #[test]
    fn a_command_split_across_reads_is_refused_where_the_verb_completes() {
        // The line began in the first read: nothing of the second may go on.
        assert_eq!(refused(&[b"NOOP\r\nXCLI", b"ENT LOGIN=x\r\n"]), Some((1, 0)));
        assert_eq!(refused(&[b"NOOP\r\n", b"XCLIENT", b" LOGIN=x\r\n"]), Some((2, 0)));
        assert_eq!(refused(&[b"NOOP\r", b"\nXFORWARD ADDR=x\r\n"]), Some((1, 1)));
        // The line end and the verb in separate reads: the verb's read is cut at its start.
        assert_eq!(refused(&[b"RSET\r\n", b"  XCLIENT NAME=x\r\n"]), Some((1, 0)));
    }

    /// A STARTTLS would take the rest of the session out of the guard's sight (reliability
    /// case 50). A NUL ends a line for Postfix (a C string), and any byte that cannot go on a
    /// word ends the verb here.
    #[test]
    fn starttls_and_verbs_ended_by_any_other_byte_are_refused() {
        for (stream, at) in [
            (&b"STARTTLS\r\n"[..], 0),
            (b"NOOP\r\n starttls\n", 6),
            (b"RSET\r\nStartTLS \r\n", 6),
            (b"STARTTLS\0\r\n", 0),
            (b"NOOP\r\nXCLIENT\0LOGIN=x\r\n", 6),
            (b"XFORWARD\x7fNAME=x\r\n", 0),
            (b"BDAT:2\r\n", 0),
        ] {
            assert_eq!(refused(&[stream]), Some((0, at)), "{:?}", String::from_utf8_lossy(stream));
        }
        // A longer word is not the verb.
        assert_eq!(CommandGuard::default().scan(b"STARTTLSX\r\nSTART TLS\r\nSTARTTLS2\r\n"), None);
    }

    #[test]
    fn everything_else_goes_through() {
        let ok: &[&[u8]] = &[
            b"EHLO client.example\r\nMAIL FROM:<xclient@example.test>\r\nRCPT TO:<a@b>\r\nDATA\r\n",
            // Not the verb: longer words, not at a line start.
            b"XCLIENTS x\r\nXFORWARDED x\r\nXCLIENT1 x\r\n",
            b"Subject: about XCLIENT LOGIN=x\r\n\r\nsee the XFORWARD ADDR= doc\r\n.\r\n",
            b"X-Header: XCLIENT\r\nXCLIEN T\r\nX CLIENT a\r\n.XCLIENT a\r\n>XCLIENT a\r\n",
            b"",
        ];
        let mut g = CommandGuard::default();
        for chunk in ok {
            assert_eq!(g.scan(chunk), None, "{:?}", String::from_utf8_lossy(chunk));
        }
        // Also when every byte arrives on its own.
        let mut g = CommandGuard::default();
        for chunk in ok {
            for b in chunk.iter() {
                assert_eq!(g.scan(std::slice::from_ref(b)), None);
            }
        }
        // Binary data: no line start followed by a verb, however long.
        let bulk: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let mut g = CommandGuard::default();
        assert_eq!(g.scan(&bulk), None);
    }

    /// A guard after login whose client sent `commands` and whose backend answered with the
    /// login's reply and then `replies`.
    fn after(commands: &[u8], replies: &[u8]) -> CommandGuard {
        let mut g = CommandGuard::default();
        g.replied(b"235 2.7.0 Authentication successful\r\n");
        assert_eq!(g.scan(commands), None);
        g.replied(replies);
        g
    }

    const ENVELOPE: &[u8] = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n";
    const ACCEPTED: &[u8] = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";
    /// Lines a message may hold that would be refused as commands.
    const LOOK_ALIKES: &[u8] = b"XCLIENT LOGIN=x\r\n xforward ADDR=1.2.3.4\r\nBDAT 10 LAST\r\nSTARTTLS\r\n\
        ..XCLIENT dot-stuffed\r\nData follows\r\nDATA\r\n\r\n";

    #[test]
    fn message_text_after_the_backends_354_goes_through() {
        let mut g = after(ENVELOPE, ACCEPTED);
        assert_eq!(g.scan(LOOK_ALIKES), None);
        assert_eq!(g.scan(b"last line\r\n.\r\n"), None);
        // The message has ended: commands again, checked as before.
        assert_eq!(g.scan(b"NOOP\r\nXCLIENT LOGIN=x\r\n"), Some(6));

        // Byte by byte, with the replies split too, and a second transaction pipelined after
        // the first message's end (RFC 2920): its 354 is the fifth reply after the login's.
        let mut g = CommandGuard::default();
        let feed = |g: &mut CommandGuard, bytes: &[u8]| {
            for b in bytes {
                assert_eq!(g.scan(std::slice::from_ref(b)), None);
            }
        };
        let replies = |g: &mut CommandGuard, bytes: &[u8]| bytes.chunks(3).for_each(|c| g.replied(c));
        replies(&mut g, b"235 2.7.0 Authentication successful\r\n");
        feed(&mut g, ENVELOPE);
        replies(&mut g, ACCEPTED);
        feed(&mut g, LOOK_ALIKES);
        feed(&mut g, b".\r\n");
        feed(&mut g, ENVELOPE);
        replies(&mut g, b"250 2.0.0 Ok: queued as 1234\r\n250-2.1.0 Ok\r\n250 more\r\n250 2.1.5 Ok\r\n354 go\r\n");
        feed(&mut g, LOOK_ALIKES);
        assert_eq!(g.scan(b".\r\nXCLIENT LOGIN=x\r\n"), Some(3));

        // After a DATA the backend refused, the next one's 354 starts text.
        let mut g = after(b"DATA\r\n", b"554 5.5.1 Error: no valid recipients\r\n");
        g.scan(ENVELOPE);
        g.replied(ACCEPTED);
        assert_eq!(g.scan(LOOK_ALIKES), None);

        // Binary data in a message: no end, however long.
        let bulk: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let mut g = after(ENVELOPE, ACCEPTED);
        assert_eq!(g.scan(&bulk), None);
        assert!(g.body.is_some());
    }

    /// Between the lines of a multi-line reply the client is inside it (no goodbye there).
    #[test]
    fn a_multi_line_reply_is_followed_to_its_last_line() {
        let mut g = after(b"EHLO x\r\n", b"250-mail.example\r\n250-PIPELINING\r\n");
        assert!(g.inside_reply());
        g.replied(b"250 SMTPUTF8\r\n");
        assert!(!g.inside_reply());
        g.replied(b"250-x\r\nnot a reply\r\n");
        assert!(!g.inside_reply(), "not known to go on");
    }

    /// Reliability cases 46 and 47: whatever some server may take for the end of the message
    /// (SMTP smuggling) ends the text here too, so a command smuggled after it is refused.
    #[test]
    fn every_end_of_data_look_alike_ends_the_text() {
        for end in [
            &b"\r\n.\r\n"[..],
            b"\n.\n",
            b"\r.\r",
            b"\r.\n",
            b"\n.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n\0.\r\n",
            b"\r\n.\0\r\n",
            b"\r\r\n.\r\r\n",
            b"\r\n . \r\n",
            b"\r\n\t.\x0b\r\n",
        ] {
            let mut stream = b"Subject: x\r\n\r\nbody".to_vec();
            stream.extend_from_slice(end);
            let at = stream.len();
            stream.extend_from_slice(b"XCLIENT LOGIN=x\r\n");
            assert_eq!(after(ENVELOPE, ACCEPTED).scan(&stream), Some(at), "{:?}", String::from_utf8_lossy(end));
            // Also when every byte arrives on its own.
            let mut g = after(ENVELOPE, ACCEPTED);
            let cut = stream.iter().position(|b| g.scan(std::slice::from_ref(b)).is_some());
            assert_eq!(cut, Some(at + "XCLIENT".len()), "{:?}", String::from_utf8_lossy(end));
        }
    }

    /// Text is followed only where the backend is certain to read text: anything that could
    /// make the guard's count of commands and replies disagree with the backend's keeps
    /// checking lines as commands.
    #[test]
    fn text_is_followed_only_after_a_354_that_answers_the_data_line() {
        let smuggled: &[u8] = b"XCLIENT LOGIN=x\r\n";
        for (name, commands, replies) in [
            // The client did not wait for the 354.
            ("text before the 354", &b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhello\r\n"[..], ACCEPTED),
            // The 354 answers the first DATA; the backend refuses the second (a 503 on its
            // way) and reads what follows as commands.
            ("a 354 for an earlier DATA", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\nDATA\r\n", ACCEPTED),
            ("a 354 for another command", b"NOOP\r\n", b"354 odd\r\n"),
            ("too few replies yet", ENVELOPE, b"250 2.1.0 Ok\r\n354 odd\r\n"),
            // A server may end a command line at a bare CR.
            ("a bare CR", b"NOOP\rMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", ACCEPTED),
            ("a bare CR at a 354's count", b"NOOP\rRSET\r\nDATA\r\n", b"250 Ok\r\n354 go\r\n"),
            // A server may cut a long line in two.
            ("a long line", &[&b"NOOP "[..], &[b'x'; 1000], b"\r\nDATA\r\n"].concat(), b"250 Ok\r\n354 go\r\n"),
            ("more replies than commands", b"DATA\r\n", b"250 Ok\r\n354 go\r\n"),
            ("a line that is not a reply", b"NOOP\r\nDATA\r\n", b"ok\r\n250 Ok\r\n354 go\r\n"),
        ] {
            let mut g = after(commands, replies);
            assert_eq!(g.scan(smuggled), Some(0), "{name}");
        }
        // A reply while text is sent: the backend may have stopped reading it.
        let mut g = after(ENVELOPE, ACCEPTED);
        assert_eq!(g.scan(b"some text\r\n"), None);
        g.replied(b"451 4.4.2 Timeout\r\n");
        assert_eq!(g.scan(smuggled), Some(0));
        // More replies than commands, then counts that match again.
        let mut g = after(b"NOOP\r\n", b"250 Ok\r\n250 Ok\r\n");
        g.scan(ENVELOPE);
        g.replied(b"250 Ok\r\n354 go\r\n");
        assert_eq!(g.scan(smuggled), Some(0));
        // And doubt lasts: a later 354 that would match is not followed.
        let mut g = after(b"NOOP\rRSET\r\n", b"250 Ok\r\n");
        g.scan(ENVELOPE);
        g.replied(ACCEPTED);
        assert_eq!(g.scan(smuggled), Some(0));
    }

    /// What a guard makes of `events` (client bytes, or backend bytes when `true`), each
    /// event fed whole or split at `cut` (a fraction of it): where the first refusal lands as
    /// (event, offset in it), and the state after.
    fn run(events: &[(bool, Vec<u8>)], cuts: &[usize]) -> (Option<(usize, usize)>, Option<Body>, bool, u64, u64) {
        let mut g = CommandGuard::default();
        g.replied(b"235 ok\r\n");
        for (k, (backend, bytes)) in events.iter().enumerate() {
            let cut = cuts.get(k).map_or(bytes.len(), |c| c % (bytes.len() + 1));
            if *backend {
                g.replied(&bytes[..cut]);
                g.replied(&bytes[cut..]);
                continue;
            }
            if let Some(at) = g.scan(&bytes[..cut]) {
                return (Some((k, at)), g.body, g.doubt, g.sent, g.replies);
            }
            if let Some(at) = g.scan(&bytes[cut..]) {
                // A verb begun before the cut is refused at the cut: where its line starts.
                let line = bytes[..cut].iter().rposition(|&b| b == b'\r' || b == b'\n').map_or(0, |p| p + 1);
                return (Some((k, if at == 0 { line.min(cut) } else { cut + at })), g.body, g.doubt, g.sent, g.replies);
            }
        }
        (None, g.body, g.doubt, g.sent, g.replies)
    }

    proptest! {
        /// However the client's and the backend's bytes are cut into reads, the guard refuses
        /// the same line and ends in the same state.
        #[test]
        fn reads_cut_anywhere_change_nothing(
            events in proptest::collection::vec(prop_oneof![
                proptest::collection::vec(prop_oneof![
                    Just(&b"XCLIENT"[..]), Just(&b"DATA"[..]),
                    Just(&b"MAIL FROM:<a@b>"[..]), Just(&b"STARTTLS"[..]),
                    Just(&b"\r\n"[..]), Just(&b"\r"[..]),
                    Just(&b"\n"[..]), Just(&b"."[..]),
                    Just(&b" "[..]), Just(&b"\0"[..]),
                    Just(&b"x"[..]),
                ], 1..12).prop_map(|parts| (false, parts.concat())),
                proptest::collection::vec(prop_oneof![
                    Just(&b"250 ok\r\n"[..]), Just(&b"354 go\r\n"[..]),
                    Just(&b"250-more\r\n"[..]), Just(&b"451 no\r\n"[..]),
                ], 1..4).prop_map(|parts| (true, parts.concat())),
            ], 0..24),
            cuts in proptest::collection::vec(any::<usize>(), 24),
        ) {
            prop_assert_eq!(run(&events, &[]), run(&events, &cuts));
        }
    }
}
