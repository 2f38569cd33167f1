//! After login an SMTP session is relayed as bytes, with one exception: XCLIENT and XFORWARD
//! from the client must never reach the backend (reliability case 50, after login as well as
//! before). A backend that trusts the proxy with them checks that once per connection (Postfix
//! caches `smtpd_authorized_xclient_hosts` so that XCLIENT cannot revoke itself), so a client's
//! `XCLIENT LOGIN=someone-else` relayed after AUTH would be believed: another user's login, a
//! forged address.
//!
//! The guard does not follow the session's state. Whether a line is a command or message text
//! depends on the backend's replies (a refused DATA leaves it reading commands) and on where it
//! thinks a message ends (Postfix also ends one at `\n.\n`, case 46), which the proxy cannot
//! know for certain. So it refuses every line, anywhere in what the client sends, that a server
//! could read as one of these commands: after a CR or LF (or at the start), any blanks, the verb
//! in any case, then a blank or a line end. Blanks are what Postfix's tokenizer splits words on
//! (C's `isspace`: space, tab, VT, FF, and a CR that does not end the line, which Postfix keeps),
//! so `XCLIENT\x0bLOGIN=x` and `XCLIENT\rLOGIN=x` are refused like `XCLIENT LOGIN=x`. A line of
//! message text that starts that way ends the session too; that is the price of never guessing.
//!
//! BDAT is refused the same way. Its chunk is a byte count, and the server reads its next
//! command where the count ends, in the middle of a line if the client wants: `BDAT 2 LAST`,
//! then `hiXCLIENT LOGIN=x` is a message of two bytes and an XCLIENT, which Postfix takes (the
//! end-to-end test shows it). The guard cannot know whether a BDAT was accepted or how a
//! server counted, so it does not follow chunks: the proxy never offers CHUNKING (`ehlo.rs`),
//! clients send DATA, and one that sends BDAT anyway has its session ended.
//!
//! STARTTLS is refused the same way when the backend offered it on the proxy's connection (a
//! plaintext one: a server does not offer it again inside TLS). Relayed, it would start a TLS
//! session between the client and the backend, inside the client's session with the proxy, and
//! from then on the guard would see only ciphertext: XCLIENT, XFORWARD and BDAT would pass
//! unseen. Where the backend does not offer it, the line goes through (and is refused there), so
//! message text that starts with the word is only at risk where the risk is real.

/// The verbs refused, one bit each in a guard's set.
const VERBS: [&[u8]; 4] = [b"XCLIENT", b"XFORWARD", b"BDAT", b"STARTTLS"];
/// Refused always.
const ALWAYS: u8 = 0b0111;
/// Refused when the backend offered STARTTLS.
const STARTTLS: u8 = 0b1000;

/// Scans what the client sends after login, across reads.
#[derive(Debug)]
pub struct CommandGuard {
    state: State,
    /// The verbs refused (bits of `VERBS`).
    refused: u8,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// At the start of a line or in its leading blanks (`matched` = 0), or `matched` letters
    /// into the verbs whose bits are set in `verbs`.
    Line { matched: usize, verbs: u8 },
    /// In a line that cannot be one of the commands.
    Text,
}

impl Default for CommandGuard {
    fn default() -> Self {
        Self::new(false)
    }
}

/// Word separators besides CR and LF (those end a line here, and CR may separate words too).
fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c)
}

impl CommandGuard {
    /// `backend_offers_starttls`: the backend announced STARTTLS on the proxy's connection.
    pub fn new(backend_offers_starttls: bool) -> Self {
        let refused = if backend_offers_starttls { ALWAYS | STARTTLS } else { ALWAYS };
        // The first byte after login starts a command line.
        Self { state: State::Line { matched: 0, verbs: refused }, refused }
    }

    /// Scan the next bytes the client sent. `Some(n)`: a refused command starts at `bytes[n]`
    /// (or, at 0, began in an earlier read); only `bytes[..n]` may go on, and the session must
    /// end. What went on before holds no line end after the verb, so no server acts on it.
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut line_start = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\r' || b == b'\n' {
                // The verb followed by a line end (bare), or by a CR that a server may take for a
                // word separator inside the line.
                if let State::Line { matched, verbs } = self.state
                    && matched > 0
                    && VERBS.iter().enumerate().any(|(k, v)| verbs & (1 << k) != 0 && v.len() == matched)
                {
                    return Some(line_start);
                }
                self.state = State::Line { matched: 0, verbs: self.refused };
                i += 1;
                line_start = i;
                continue;
            }
            match self.state {
                State::Text => match memchr::memchr2(b'\r', b'\n', &bytes[i..]) {
                    Some(at) => i += at,
                    None => return None,
                },
                State::Line { matched: 0, .. } if blank(b) => i += 1,
                State::Line { matched, verbs } => {
                    let mut next = 0;
                    for (k, verb) in VERBS.iter().enumerate() {
                        if verbs & (1 << k) == 0 {
                            continue;
                        }
                        if matched == verb.len() {
                            if blank(b) {
                                return Some(line_start);
                            }
                        } else if verb[matched].eq_ignore_ascii_case(&b) {
                            next |= 1 << k;
                        }
                    }
                    self.state =
                        if next == 0 { State::Text } else { State::Line { matched: matched + 1, verbs: next } };
                    i += 1;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A STARTTLS to a backend that offers it would take the rest of the session out of the
    /// guard's sight (reliability case 50): refused then, and only then.
    #[test]
    fn starttls_is_refused_when_the_backend_offers_it() {
        for (stream, at) in [(&b"STARTTLS\r\n"[..], 0), (b"NOOP\r\n starttls\n", 6), (b"RSET\r\nStartTLS \r\n", 6)] {
            let mut g = CommandGuard::new(true);
            assert_eq!(g.scan(stream), Some(at), "{:?}", String::from_utf8_lossy(stream));
            assert_eq!(CommandGuard::new(false).scan(stream), None);
        }
        // The others stay refused either way; a longer word is not the verb.
        assert_eq!(CommandGuard::new(true).scan(b"XCLIENT LOGIN=x\r\n"), Some(0));
        assert_eq!(CommandGuard::new(true).scan(b"STARTTLSX\r\nSTART TLS\r\n"), None);
    }

    #[test]
    fn everything_else_goes_through() {
        let ok: &[&[u8]] = &[
            b"EHLO client.example\r\nMAIL FROM:<xclient@example.test>\r\nRCPT TO:<a@b>\r\nDATA\r\n",
            // Not the verb: longer words, not at a line start.
            b"XCLIENTS x\r\nXFORWARDED x\r\nXCLIENT_ x\r\n",
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
}
