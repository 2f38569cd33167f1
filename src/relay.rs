//! After login the proxy is a byte pipe: copy both ways until both sides are done, propagate
//! half-close, count bytes (into the metrics as they move, not only at the end, so a long
//! session shows up in throughput graphs while it lasts), and end the session after an idle
//! period with no traffic.
//!
//! Memory: a direction holds a buffer only while it has bytes in flight. When a read would block
//! the (empty) buffer is released, so an idle session holds no copy buffers at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::config::Protocol;
use crate::protocol::pop3::responses::Responses;
use crate::protocol::smtp::guard::CommandGuard;

/// Per-direction copy buffer, allocated only while data moves: commands and short replies fit
/// the small one; once a read fills it (a bulk transfer), the direction moves to the large one,
/// which cuts CPU per byte relayed (fewer reads and TLS writes per megabyte).
const SMALL_BUF: usize = 16 * 1024;
const LARGE_BUF: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// The relay ended with backend bytes read but not yet written to the client, or with the
    /// last written not ending a line: a reply was part-way through (a big FETCH, say), so a
    /// goodbye line now would land inside it.
    pub mid_reply: bool,
}

/// Counters the relay adds each direction's bytes to as they are written: once per wakeup of
/// the session at most, not per write.
#[derive(Debug, Clone, Default)]
pub struct Meters {
    pub client_to_backend: Option<IntCounter>,
    pub backend_to_client: Option<IntCounter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished (EOF each way).
    Closed,
    IdleTimeout,
    ClientError,
    BackendError,
    /// Shutdown's grace period is over.
    Stopped,
    /// `limits.max_session_duration` reached.
    MaxDuration,
    /// The client sent a command that must not reach the backend (see `CommandGuard`).
    Refused,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::ClientError => "client_error",
            RelayEnd::BackendError => "backend_error",
            RelayEnd::Stopped => "shutdown",
            RelayEnd::MaxDuration => "max_duration",
            RelayEnd::Refused => "refused_command",
        }
    }
}

#[derive(Default)]
struct Direction {
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    read_done: bool,
    done: bool,
    needs_flush: bool,
    /// A read has filled the small buffer: this direction carries bulk data.
    bulk: bool,
    /// At EOF, do not shut the writer down: the relay decides when to close (the backend's
    /// disconnect spread).
    hold_close: bool,
    /// EOF was read and everything before it written; the shutdown is held back.
    held: bool,
    /// The guard refused what was read: what came before it is written, then the copy ends.
    refused: bool,
    /// `buf` holds bytes the session had before the relay began (`Start`), sized to them: once
    /// written it is dropped, not read into.
    seeded: bool,
    /// The last byte written was not a line end: a line (or a literal, or a message) is
    /// part-way through at the other end, even when nothing is left in `buf`.
    mid_line: bool,
    /// Client to backend (IMAP, or with a disconnect spread): what the client's commands said.
    commands: Option<Commands>,
    /// Backend to client: where replies end can be told (a protocol followed, not compressed),
    /// so an EOF inside one is a cut (set by the relay before each copy).
    replies_seen: bool,
    bytes: u64,
    /// How much of `bytes` the meter has been given.
    reported: u64,
}

/// What the relay follows of the protocol after login: where the backend's replies end (so
/// that a goodbye is never written inside one) and, for SMTP, what the client may send.
enum Follow {
    /// Bytes only.
    Bytes,
    /// The literal the client is part-way through, if any.
    Imap(Literals),
    /// Which responses are multi-line, and whether the client is inside one.
    Pop3(Responses),
    /// The guard: checks what the client sends, following the backend's replies.
    Smtp(CommandGuard),
}

impl Follow {
    /// Client bytes, read and not yet written: `Some(n)` if only `bytes[..n]` may go on (SMTP's
    /// guard refused what follows).
    fn client_read(&mut self, bytes: &[u8]) -> Option<usize> {
        match self {
            Follow::Smtp(guard) => guard.scan(bytes),
            Follow::Pop3(responses) => {
                responses.sent(bytes);
                None
            }
            Follow::Imap(_) | Follow::Bytes => None,
        }
    }

    /// Backend bytes, read and not yet written. SMTP's guard sees them now: a reply that ends
    /// a message's text must count before the client sends more, even one the client has not
    /// read yet.
    fn backend_read(&mut self, bytes: &[u8]) {
        if let Follow::Smtp(guard) = self {
            guard.replied(bytes);
        }
    }

    /// Backend bytes, written to the client: where the client is in the replies.
    fn backend_written(&mut self, bytes: &[u8]) {
        match self {
            Follow::Imap(literals) => literals.feed(bytes),
            Follow::Pop3(responses) => responses.written(bytes),
            Follow::Smtp(_) | Follow::Bytes => {}
        }
    }

    /// The client is part-way through a reply, though the last byte written ended a line.
    fn inside_reply(&self) -> bool {
        match self {
            Follow::Imap(literals) => literals.inside(),
            Follow::Pop3(responses) => responses.inside(),
            Follow::Smtp(guard) => guard.inside_reply(),
            Follow::Bytes => false,
        }
    }
}

/// Whose bytes a direction carries, for `Follow`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Client,
    Backend,
}

enum Side {
    Reader,
    Writer,
    /// The direction's guard refused what the reader sent.
    Guard,
}

impl Direction {
    fn report(&mut self, meter: Option<&IntCounter>) {
        if let Some(m) = meter
            && self.bytes > self.reported
        {
            m.inc_by(self.bytes - self.reported);
            self.reported = self.bytes;
        }
    }

    /// Write what is buffered to `w` and flush it; nothing is read. Ready(Ok) once all of it
    /// is written.
    fn poll_drain<W>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        active: &mut bool,
        follow: &mut Follow,
        from: Source,
    ) -> Poll<Result<(), (Side, io::Error)>>
    where
        W: AsyncWrite + ?Sized,
    {
        while self.pos < self.cap {
            let Some(buf) = self.buf.as_ref() else {
                return Poll::Ready(Err((Side::Writer, io::ErrorKind::Other.into())));
            };
            let n = ready!(w.as_mut().poll_write(cx, &buf[self.pos..self.cap])).map_err(|e| (Side::Writer, e))?;
            if n == 0 {
                return Poll::Ready(Err((Side::Writer, io::ErrorKind::WriteZero.into())));
            }
            self.mid_line = buf[self.pos + n - 1] != b'\n';
            if from == Source::Backend {
                follow.backend_written(&buf[self.pos..self.pos + n]);
            }
            self.pos += n;
            self.bytes += n as u64;
            self.needs_flush = true;
            *active = true;
        }
        if self.needs_flush {
            ready!(w.as_mut().poll_flush(cx)).map_err(|e| (Side::Writer, e))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Move bytes from `r` to `w`. Ready(Ok) when EOF was read and propagated.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        active: &mut bool,
        follow: &mut Follow,
        from: Source,
    ) -> Poll<Result<(), (Side, io::Error)>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_drain(cx, w.as_mut(), active, follow, from))?;
            if self.seeded {
                self.seeded = false;
                self.buf = None;
            }
            if self.refused {
                self.buf = None;
                return Poll::Ready(Err((Side::Guard, io::ErrorKind::InvalidData.into())));
            }
            if self.read_done {
                if self.hold_close {
                    // The relay's timer wakes it; nothing more moves this way.
                    self.held = true;
                    self.buf = None;
                    return Poll::Pending;
                }
                // The backend's end part-way through a reply (inside a line, an IMAP literal, a
                // POP3 multi-line response): no close_notify for the client, which would make
                // the cut look like the reply's end. The session ends as the backend's failure,
                // and the client's connection is closed without it.
                if from == Source::Backend && self.inside_reply(follow) {
                    self.buf = None;
                    return Poll::Ready(Err((Side::Reader, io::ErrorKind::UnexpectedEof.into())));
                }
                ready!(w.as_mut().poll_shutdown(cx)).map_err(|e| (Side::Writer, e))?;
                self.done = true;
                self.buf = None;
                continue;
            }
            let size = if self.bulk { LARGE_BUF } else { SMALL_BUF };
            let buf = self.buf.get_or_insert_with(|| vec![0u8; size].into_boxed_slice());
            let len = buf.len();
            let mut rb = ReadBuf::new(buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => {
                    // Idle: give the buffer back rather than hold it while nothing moves.
                    self.buf = None;
                    return Poll::Pending;
                }
                // A client that closes its socket without TLS close_notify (most do after QUIT
                // or LOGOUT: swaks, Python's smtplib and poplib) has ended its side as one that
                // sends it does. Nothing is gained by cutting it short: the backend sees the
                // same end of the client's bytes either way.
                Poll::Ready(Err(e)) if from == Source::Client && e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.read_done = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Reader, e))),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.read_done = true;
                    } else {
                        let cut = match from {
                            Source::Client => follow.client_read(rb.filled()),
                            Source::Backend => {
                                follow.backend_read(rb.filled());
                                None
                            }
                        };
                        self.refused = cut.is_some();
                        self.pos = 0;
                        self.cap = cut.unwrap_or(n);
                        if let Some(c) = &mut self.commands {
                            c.feed(&rb.filled()[..self.cap]);
                        }
                        self.bulk |= n == len;
                        *active = true;
                    }
                }
            }
        }
    }
}

/// IMAP literals in what a client has been sent: a line ending in `{N}` (or `~{N}`, RFC 3516)
/// announces N octets that are not lines, so a goodbye written while any of them are still due
/// would become part of a message.
#[derive(Default)]
struct Literals {
    /// Octets of the current literal not yet written.
    left: u64,
    /// The end of the current line so far, where `{N}` would be when its CRLF comes.
    tail: [u8; 24],
    tail_len: usize,
}

impl Literals {
    /// Follow `bytes`, written to the client in order.
    fn feed(&mut self, mut bytes: &[u8]) {
        loop {
            if self.left > 0 {
                let skip = self.left.min(bytes.len() as u64);
                self.left -= skip;
                bytes = &bytes[skip as usize..];
                if self.left > 0 {
                    return;
                }
            }
            match memchr::memchr(b'\n', bytes) {
                None => {
                    self.push_tail(bytes);
                    return;
                }
                Some(i) => {
                    self.push_tail(&bytes[..i]);
                    self.left = self.announced();
                    self.tail_len = 0;
                    bytes = &bytes[i + 1..];
                }
            }
        }
    }

    /// Part-way through a literal.
    fn inside(&self) -> bool {
        self.left > 0
    }

    fn push_tail(&mut self, bytes: &[u8]) {
        let keep = self.tail.len();
        if bytes.len() >= keep {
            self.tail.copy_from_slice(&bytes[bytes.len() - keep..]);
            self.tail_len = keep;
            return;
        }
        let total = self.tail_len + bytes.len();
        if total > keep {
            self.tail.copy_within(total - keep..self.tail_len, 0);
            self.tail_len -= total - keep;
        }
        self.tail[self.tail_len..self.tail_len + bytes.len()].copy_from_slice(bytes);
        self.tail_len += bytes.len();
    }

    /// The octets the line just ended announces (0: none).
    fn announced(&self) -> u64 {
        let line = &self.tail[..self.tail_len];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(open) = line.strip_suffix(b"}").and_then(|l| l.iter().rposition(|&b| b == b'{')) else {
            return 0;
        };
        let digits = &line[open + 1..line.len() - 1];
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return 0;
        }
        std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).unwrap_or(0)
    }
}

/// What the client's last command line said, as far as the relay needs to know (client to
/// backend; only the end of each read is looked at, so an upload costs nothing more).
#[derive(Debug, Default, Clone, Copy)]
struct Commands {
    imap: bool,
    /// The last read ended with LOGOUT (IMAP, after its tag) or QUIT (POP3, SMTP): the
    /// backend's close answers it.
    said_bye: bool,
    /// IMAP `COMPRESS DEFLATE` (RFC 4978) was sent: from its OK on both ways are compressed,
    /// and no line end or literal can be told in them, so the client is always taken to be
    /// part-way through a reply (no goodbye is written into the compressed stream). Also when
    /// the backend refused it: such a session only goes without goodbyes. A LOGOUT cannot be
    /// seen once compressed either, so a backend's close after one may be held.
    compressed: bool,
}

impl Commands {
    /// With what the client pipelined after its login command (already on its way).
    fn new(imap: bool, pipelined: &[u8]) -> Commands {
        let mut c = Commands { imap, ..Commands::default() };
        c.feed(pipelined);
        c
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut words = last_line(bytes).split(|&b| b == b' ').filter(|w| !w.is_empty());
        let (first, second, third) = (words.next(), words.next(), words.next());
        let rest = words.next();
        let is = |w: Option<&[u8]>, what: &[u8]| w.is_some_and(|w| w.eq_ignore_ascii_case(what));
        self.said_bye = if self.imap {
            first.is_some() && is(second, b"LOGOUT") && third.is_none()
        } else {
            is(first, b"QUIT") && second.is_none()
        };
        if self.imap && first.is_some() && is(second, b"COMPRESS") && is(third, b"DEFLATE") && rest.is_none() {
            self.compressed = true;
        }
    }
}

/// The last command line `bytes` end with, without its line end (empty if they do not end one).
fn last_line(bytes: &[u8]) -> &[u8] {
    let Some(body) = bytes.strip_suffix(b"\n") else { return &[] };
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    memchr::memrchr(b'\n', body).map_or(body, |i| &body[i + 1..])
}

/// Asked when the backend ends a session whose client is still connected: how long to keep the
/// client before closing it (zero: close at once). See `limits.backend_disconnect_spread`.
pub type CloseHold = Box<dyn FnOnce() -> Duration + Send>;

/// When a relayed session must end even if bytes still move.
#[derive(Default)]
pub struct Deadlines {
    /// No byte either way for this long ends the session.
    pub idle: Duration,
    /// The session's hard end (`limits.max_session_duration`).
    pub max_end: Option<Instant>,
    /// Shutdown: once cancelled, the session has `grace` more to finish.
    pub shutdown: Option<(CancellationToken, Duration)>,
    /// When the backend ends the session while the client is still connected, close the client
    /// this much later (or as soon as it closes itself), so that the clients of a backend that
    /// goes away do not all reconnect at the same moment. None: pass the close on at once.
    pub backend_close_hold: Option<CloseHold>,
}

/// What each direction has to write before it reads: the login reply and what the backend sent
/// with it, for the client; what the client pipelined after its login command (already passed
/// by the guard), for the backend.
#[derive(Default)]
pub struct Start {
    pub to_client: Vec<u8>,
    pub to_backend: Vec<u8>,
    /// The protocol spoken, for where its replies end: IMAP's carry literals (`{N}` CRLF, then
    /// N octets of a message), POP3's multi-line responses end at a dot line, in both a line
    /// end is not the end of a reply. None: bytes only.
    pub protocol: Option<Protocol>,
}

impl Direction {
    /// The backend's bytes so far end inside a reply (a line, an IMAP literal, a POP3
    /// multi-line response), where replies are followed.
    fn inside_reply(&self, follow: &Follow) -> bool {
        self.replies_seen && (self.mid_line || follow.inside_reply())
    }

    fn seeded(bytes: Vec<u8>) -> Direction {
        let cap = bytes.len();
        Direction { buf: (cap > 0).then(|| bytes.into_boxed_slice()), cap, seeded: cap > 0, ..Direction::default() }
    }
}

/// Relay between `client` and `backend` until both directions end, an error, `idle` passes with
/// no byte moving either way, or a deadline (max duration, shutdown grace) passes. With a
/// `guard`, what the client sends is checked before it is written, and the relay ends (as
/// `Refused`) where the guard refuses it.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    d: Deadlines,
    meters: Meters,
    guard: Option<CommandGuard>,
) -> (RelayEnd, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay_from(client, backend, d, meters, guard, Start::default()).await
}

/// `relay`, with bytes each way to write first: they are bounded by the same deadlines
/// (idle, max duration, shutdown), counted and metered like the rest.
pub async fn relay_from<C, B>(
    client: &mut C,
    backend: &mut B,
    d: Deadlines,
    meters: Meters,
    guard: Option<CommandGuard>,
    start: Start,
) -> (RelayEnd, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let first = d.max_end.map_or(Instant::now() + d.idle, |m| m.min(Instant::now() + d.idle));
    let (cancelled, grace) = match d.shutdown {
        Some((token, grace)) => (Some(Box::pin(token.cancelled_owned())), grace),
        None => (None, Duration::ZERO),
    };
    let imap = start.protocol == Some(Protocol::Imap);
    let follow = match (guard, start.protocol) {
        (Some(mut guard), _) => {
            // The login reply, the first bytes the client gets, is not read in the relay.
            guard.replied(&start.to_client);
            Follow::Smtp(guard)
        }
        (None, Some(Protocol::Imap)) => Follow::Imap(Literals::default()),
        (None, Some(Protocol::Pop3)) => {
            let mut responses = Responses::default();
            responses.sent(&start.to_backend);
            Follow::Pop3(responses)
        }
        (None, _) => Follow::Bytes,
    };
    let mut r = Relay {
        client,
        backend,
        follow,
        up: Direction {
            commands: (imap || d.backend_close_hold.is_some()).then(|| Commands::new(imap, &start.to_backend)),
            ..Direction::seeded(start.to_backend)
        },
        down: Direction { hold_close: d.backend_close_hold.is_some(), ..Direction::seeded(start.to_client) },
        hold: d.backend_close_hold,
        held_end: None,
        up_failed: false,
        linger_end: None,
        idle: d.idle,
        sleep: Box::pin(tokio::time::sleep_until(first)),
        max_end: d.max_end,
        stopping: false,
        cancelled,
        grace,
        meters,
    };
    let mut end = (&mut r).await;
    if r.up_failed && end == RelayEnd::Closed {
        end = RelayEnd::BackendError;
    }
    let mid_reply = r.mid_reply();
    if r.held_end.is_some() && !mid_reply {
        // The held direction never shut the client's side down: do it now (TLS close_notify),
        // briefly, as an ordinary close would have. Not after a reply cut off part-way (a
        // backend that failed inside a literal): a clean close would hide the truncation.
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(1), r.client.shutdown()).await;
    }
    (end, Transferred { client_to_backend: r.up.bytes, backend_to_client: r.down.bytes, mid_reply })
}

/// One allocation-light future for the whole relayed life of a session: the timers are one
/// boxed `Sleep` (idle and hard deadlines folded together) and a boxed shutdown waiter.
struct Relay<'a, C: ?Sized, B: ?Sized> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Direction,
    down: Direction,
    /// What is followed of the protocol (SMTP's guard among it).
    follow: Follow,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    max_end: Option<Instant>,
    /// Shutdown began: `max_end` is now the end of the grace period.
    stopping: bool,
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    grace: Duration,
    meters: Meters,
    /// `Deadlines::backend_close_hold`, taken when the backend ends the session.
    hold: Option<CloseHold>,
    /// The backend has gone while the client is connected: how the session will be reported
    /// once the hold is over (or the client closes).
    held_end: Option<RelayEnd>,
    /// A write to the backend failed: the session ends as a backend error, once what the
    /// backend sent before has reached the client.
    up_failed: bool,
    /// The backend's side is over (its EOF read, everything it sent written, the client's side
    /// shut down) while the client's is not: the session ends at this time if the client has
    /// not closed by then.
    linger_end: Option<Instant>,
}

/// How long a client is given to close after its backend has ended the session and the close
/// has been passed on. Meanwhile what it sends is still read (to meet the closed backend), so
/// closing the socket then does not reset it with unread bytes and lose the last reply on the
/// way; after it, a client that neither reads nor closes no longer keeps its session's slots
/// (sessions per user, the backend's session count) until the idle timeout.
const CLIENT_CLOSE_WAIT: Duration = Duration::from_secs(5);

impl<C: ?Sized, B: ?Sized> Relay<'_, C, B> {
    /// Backend bytes not yet written, or a write that ended inside a line, an IMAP literal or a
    /// POP3 multi-line response (a message's lines end in LF too): a big FETCH or RETR is often
    /// written whole each read, so the buffer alone would say "between replies" while the
    /// client is in the middle of one.
    fn mid_reply(&self) -> bool {
        self.down.pos < self.down.cap
            || self.down.mid_line
            || self.follow.inside_reply()
            || self.up.commands.is_some_and(|c| c.compressed)
    }

    /// The backend has ended the session between replies (its EOF read): what the client does
    /// after that (leave without close_notify, reset) is an ordinary end. Not after a reply the
    /// backend cut off: that stays the failure it was.
    fn backend_ended(&self) -> bool {
        self.down.read_done && !self.mid_reply()
    }

    /// How a session the backend closed ends: closed, or the backend's failure where it closed
    /// part-way through a reply (as `Direction::poll_copy` ends it without a hold).
    fn close_end(&self) -> RelayEnd {
        if self.down.inside_reply(&self.follow) { RelayEnd::BackendError } else { RelayEnd::Closed }
    }

    fn next_deadline(&self) -> Instant {
        let idle = Instant::now() + self.idle;
        let next = self.max_end.map_or(idle, |m| m.min(idle));
        self.linger_end.map_or(next, |l| l.min(next))
    }

    /// The backend is gone: ask how long to keep the client, and if at all, keep it connected
    /// that long (never past a hard deadline), then end the session as `end`. False: no hold
    /// (an ordinary close), and the direction goes on to shut the client's side down as usual.
    fn hold_client(&mut self, end: RelayEnd) -> bool {
        if self.held_end.is_some() {
            return true;
        }
        // An answer to the client's LOGOUT or QUIT (which the client waits for) is neither held
        // nor counted as one of a failure's closes.
        // Nor is the backend's answer to the client's own close (a client that leaves without
        // LOGOUT or QUIT, as many do): it is not one of a failure's closes either.
        let answered = self.up.commands.is_some_and(|c| c.said_bye) || self.up.read_done;
        let hold = if answered { Duration::ZERO } else { self.hold.take().map_or(Duration::ZERO, |h| h()) };
        if hold.is_zero() {
            self.down.hold_close = false;
            self.down.held = false;
            return false;
        }
        self.held_end = Some(end);
        self.down.read_done = true;
        // Held, a client only waits: no copy buffer either way (the backend has gone, and
        // what the client sends now is read into a scratch buffer and dropped).
        self.down.buf = None;
        self.up.buf = None;
        let until = Instant::now() + hold;
        self.sleep.as_mut().reset(self.max_end.map_or(until, |m| m.min(until)));
        true
    }
}

impl<C, B> Future for &mut Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = &mut **self.get_mut();
        let end = this.poll_relay(cx);
        this.up.report(this.meters.client_to_backend.as_ref());
        this.down.report(this.meters.backend_to_client.as_ref());
        end
    }
}

impl<C, B> Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// A held client (its backend has gone): what it sends now goes nowhere, so read it only to
    /// notice it closing (EOF or an error, also one seen earlier), and end as `end` then or when
    /// the hold is over.
    fn poll_held(&mut self, cx: &mut Context<'_>, end: RelayEnd) -> Poll<RelayEnd> {
        let mut scratch = [0u8; 512];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *self.client).poll_read(cx, &mut rb) {
                Poll::Pending => break,
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => continue,
                Poll::Ready(_) => return Poll::Ready(end),
            }
        }
        self.sleep.as_mut().poll(cx).map(|()| end)
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self;
        if let Some(c) = this.cancelled.as_mut()
            && c.as_mut().poll(cx).is_ready()
        {
            this.cancelled = None;
            this.stopping = true;
            let end = Instant::now() + this.grace;
            this.max_end = Some(this.max_end.map_or(end, |m| m.min(end)));
            let mut next = this.next_deadline();
            if this.held_end.is_some() {
                // Holding a client whose backend has gone: shutdown may end it sooner, never later.
                next = next.min(this.sleep.deadline());
            }
            this.sleep.as_mut().reset(next);
        }
        if let Some(end) = this.held_end {
            return this.poll_held(cx, end);
        }
        let mut active = false;
        let (client, backend) = (Pin::new(&mut *this.client), Pin::new(&mut *this.backend));
        let mut up = this.up.poll_copy(cx, client, backend, &mut active, &mut this.follow, Source::Client);
        if let Poll::Ready(Err((Side::Writer, _))) = up {
            // The backend stopped taking bytes (it closed, and our write met its RST): what it
            // sent before still goes to the client (reliability case 69), so this direction
            // ends here and the other runs on to its end. What the client sent is dropped, as
            // the backend would have dropped it.
            this.up.done = true;
            this.up.buf = None;
            // After the backend's own end of the session (its EOF already read: a LOGOUT or
            // QUIT answered, the client's close_notify or last bytes meeting the closed socket),
            // an ordinary close.
            this.up_failed = !this.down.read_done;
            up = Poll::Ready(Ok(()));
        }
        if let Poll::Ready(Err((side, _))) = up {
            if matches!(side, Side::Guard) {
                // What the backend sent before the refused line and is still buffered goes to the
                // client first (at the first poll, the login reply itself), as when the line
                // arrives later: the client's replies must not depend on how its bytes were
                // split. Only written: nothing more is read from the backend.
                let client = Pin::new(&mut *this.client);
                let _ = this.down.poll_drain(cx, client, &mut active, &mut this.follow, Source::Backend);
            }
            return Poll::Ready(match side {
                // After the backend's own end of the session (its EOF read between replies: a
                // QUIT or LOGOUT answered), a client that goes without close_notify, or resets,
                // has only left as most do (swaks, Python's smtplib and poplib close the
                // socket): an ordinary close, not a client error.
                Side::Reader if this.backend_ended() => RelayEnd::Closed,
                Side::Reader => RelayEnd::ClientError,
                Side::Writer => RelayEnd::BackendError,
                Side::Guard => RelayEnd::Refused,
            });
        }
        let (backend, client) = (Pin::new(&mut *this.backend), Pin::new(&mut *this.client));
        this.down.replies_seen =
            !matches!(this.follow, Follow::Bytes) && !this.up.commands.is_some_and(|c| c.compressed);
        let mut down = this.down.poll_copy(cx, backend, client, &mut active, &mut this.follow, Source::Backend);
        if let Poll::Ready(Err((Side::Reader, _))) = down
            && this.down.hold_close
            && this.hold_client(RelayEnd::BackendError)
        {
            // A backend that fails is held like one that closes (reliability case 74).
            down = Poll::Pending;
        } else if down.is_pending() && this.down.held && !this.hold_client(this.close_end()) {
            // No hold after all: shut the client's side down as without a spread.
            let (backend, client) = (Pin::new(&mut *this.backend), Pin::new(&mut *this.client));
            down = this.down.poll_copy(cx, backend, client, &mut active, &mut this.follow, Source::Backend);
        }
        if let Poll::Ready(Err((side, _))) = down {
            return Poll::Ready(match side {
                Side::Reader => RelayEnd::BackendError,
                // The client gone before the backend's last bytes and close reached it, after
                // the backend's end (as above).
                Side::Writer if this.backend_ended() => RelayEnd::Closed,
                Side::Writer => RelayEnd::ClientError,
                Side::Guard => RelayEnd::Refused,
            });
        }
        if let Some(end) = this.held_end {
            // The hold began in this poll (a client that already closed its side ends it at once).
            return this.poll_held(cx, end);
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(RelayEnd::Closed);
        }
        if down.is_ready() && this.linger_end.is_none() {
            this.linger_end = Some(Instant::now() + CLIENT_CLOSE_WAIT);
            active = true;
        }
        if active {
            let next = this.next_deadline();
            this.sleep.as_mut().reset(next);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            if this.linger_end.is_some() {
                // The backend ended the session, and its close has been passed on whole (one
                // inside a reply ends as the backend's error before this): the client only did
                // not close. Whichever deadline came, no goodbye can follow the close.
                return Poll::Ready(RelayEnd::Closed);
            }
            let hard = this.max_end.is_some_and(|m| Instant::now() >= m);
            return Poll::Ready(match (hard, this.stopping) {
                (true, true) => RelayEnd::Stopped,
                (true, false) => RelayEnd::MaxDuration,
                (false, _) => RelayEnd::IdleTimeout,
            });
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// Poll one direction until it waits for more input.
    async fn copy_until_idle(d: &mut Direction, r: &mut tokio::io::DuplexStream, w: &mut tokio::io::DuplexStream) {
        let mut active = false;
        std::future::poll_fn(|cx| {
            let (r, w) = (Pin::new(&mut *r), Pin::new(&mut *w));
            assert!(d.poll_copy(cx, r, w, &mut active, &mut Follow::Bytes, Source::Backend).is_pending());
            Poll::Ready(())
        })
        .await;
    }

    #[tokio::test]
    async fn commands_keep_the_small_buffer_bulk_data_takes_the_large_one() {
        let (mut from, mut sender) = duplex(256 * 1024);
        let (mut to, mut receiver) = duplex(256 * 1024);
        let mut d = Direction::default();

        sender.write_all(b"a1 NOOP\r\n").await.unwrap();
        copy_until_idle(&mut d, &mut from, &mut to).await;
        assert!(!d.bulk, "a short command is not bulk");
        assert!(d.buf.is_none(), "an idle direction holds no buffer");
        let mut got = [0u8; 9];
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"a1 NOOP\r\n");

        let body = vec![7u8; 100 * 1024];
        sender.write_all(&body).await.unwrap();
        copy_until_idle(&mut d, &mut from, &mut to).await;
        assert!(d.bulk, "a read that filled the small buffer marks the direction bulk");
        assert!(d.buf.is_none());
        let mut got = vec![0u8; body.len()];
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(got, body);
    }

    /// Reliability case 71.
    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_app) = duplex(64);
        let up = IntCounter::new("up", "up").unwrap();
        let down = IntCounter::new("down", "down").unwrap();
        let meters = Meters { client_to_backend: Some(up.clone()), backend_to_client: Some(down.clone()) };
        let task = tokio::spawn(async move {
            relay(
                &mut client_proxy,
                &mut backend_proxy,
                Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() },
                meters,
                None,
            )
            .await
        });
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&big2).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        backend_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        // Counted while the session is still open (the backend has not answered yet).
        assert_eq!((up.get(), down.get()), (100_000, 0));
        backend_app.write_all(b"* BYE\r\n").await.unwrap();
        backend_app.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"* BYE\r\n");
        let (end, t) = task.await.unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(t.client_to_backend, 100_000);
        assert_eq!(t.backend_to_client, 7);
        assert_eq!((up.get(), down.get()), (100_000, 7));
    }

    /// Reliability case 69: a backend that sends the end of a reply and closes, while the client
    /// (slow to read) sends something: the write to the backend fails, and what the backend
    /// sent before still reaches the client in full.
    #[tokio::test]
    async fn a_failed_write_to_the_backend_still_delivers_what_it_sent() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_app) = duplex(256 * 1024);
        let reply: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        backend_app.write_all(&reply).await.unwrap();
        drop(backend_app);
        client_app.write_all(b"a NOOP\r\n").await.unwrap();
        let task = tokio::spawn(async move {
            let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await
        });
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), reply.len());
        assert!(got == reply);
        let (end, t) = task.await.unwrap();
        assert_eq!((end, t.backend_to_client), (RelayEnd::BackendError, 100_000));
    }

    /// The login reply and the client's pipelined commands go first, in order, counted like
    /// the rest; and a client that reads none of its reply is still ended by shutdown.
    #[tokio::test]
    async fn the_start_goes_first_counted_and_bounded_by_the_deadlines() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_app) = duplex(64);
        let start =
            Start { to_client: b"a OK logged in\r\n".to_vec(), to_backend: b"b NOOP\r\n".to_vec(), ..Start::default() };
        let task = tokio::spawn(async move {
            let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
            relay_from(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None, start).await
        });
        let mut got = [0u8; 8];
        backend_app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"b NOOP\r\n");
        backend_app.write_all(b"b OK done\r\n").await.unwrap();
        drop(backend_app);
        client_app.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"a OK logged in\r\nb OK done\r\n");
        let (end, t) = task.await.unwrap();
        assert_eq!((end, t.client_to_backend, t.backend_to_client), (RelayEnd::Closed, 8, 27));

        // 100 KB of login reply to a client that reads nothing: shutdown still ends it.
        let (_client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, _backend_app) = duplex(64);
        let (stop, d) = stoppable();
        let start = Start { to_client: vec![b'x'; 100_000], ..Start::default() };
        stop.cancel();
        let (end, t) = tokio::time::timeout(
            Duration::from_secs(5),
            relay_from(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None, start),
        )
        .await
        .unwrap();
        assert_eq!(end, RelayEnd::Stopped);
        assert!(t.mid_reply && t.backend_to_client == 64, "{t:?}");
    }

    /// Literals are followed across writes, whatever the cut: a header split between two
    /// writes, a literal written a byte at a time, long lines that are not headers.
    #[test]
    fn literals_are_followed_across_writes() {
        let reply =
            b"* 1 FETCH (FLAGS (\\Seen) BODY[] {12}\r\nab\r\n{3}\r\nxyz)\r\n* 2 FETCH (BODY[HEADER] {2}\r\n\r\n)\r\n";
        let whole = {
            let mut l = Literals::default();
            l.feed(reply);
            l.inside()
        };
        assert!(!whole);
        for cut in 1..reply.len() {
            let mut l = Literals::default();
            l.feed(&reply[..cut]);
            // Inside the 12-octet literal (from after its CRLF up to its last octet) or the
            // 2-octet one.
            let lit1 = reply.windows(6).position(|w| w == b"{12}\r\n").unwrap() + 6;
            let lit2 = reply.windows(5).position(|w| w == b"{2}\r\n").unwrap() + 5;
            let expected = (lit1..lit1 + 12).contains(&cut) || (lit2..lit2 + 2).contains(&cut);
            assert_eq!(l.inside(), expected, "cut at {cut}");
            l.feed(&reply[cut..]);
            assert!(!l.inside(), "cut at {cut}");
        }
        let mut l = Literals::default();
        for b in b"* 1 FETCH (BODY[] {4}\r\n1234" {
            l.feed(&[*b]);
        }
        assert!(!l.inside());
        let mut long = vec![b'x'; 100];
        long.extend_from_slice(b" {5}\r\n");
        l.feed(&long);
        assert!(l.inside());
        l.feed(b"12345 {x}\r\n{99999999999999999999}\r\n");
        assert!(!l.inside(), "not a literal: {{x}}, nor a length past 19 digits");
    }

    /// The backend answers LOGOUT and closes; the client, having read that, sends more (its
    /// close_notify, a pipelined command) into the closed socket: an ordinary close, not a
    /// backend error.
    #[tokio::test]
    async fn bytes_after_the_backends_own_close_are_not_a_backend_error() {
        let (mut client_app, mut client_proxy) = duplex(4096);
        let (mut backend_proxy, mut backend_app) = duplex(4096);
        let task = tokio::spawn(async move {
            let d = Deadlines { idle: Duration::from_secs(60), ..Deadlines::default() };
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await
        });
        backend_app.write_all(b"* BYE\r\na OK Logout completed.\r\n").await.unwrap();
        drop(backend_app);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"* BYE\r\na OK Logout completed.\r\n");
        client_app.write_all(b"b NOOP\r\n").await.unwrap();
        client_app.shutdown().await.unwrap();
        let (end, _) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
        assert_eq!(end, RelayEnd::Closed);
    }

    #[test]
    fn logout_quit_and_compress_are_recognised() {
        let said_bye = |imap: bool, bytes: &[u8]| Commands::new(imap, bytes).said_bye;
        for yes in [&b"a LOGOUT\r\n"[..], b"x1 logout\n", b"b NOOP\r\nc LOGOUT\r\n"] {
            assert!(said_bye(true, yes), "{:?}", String::from_utf8_lossy(yes));
        }
        for yes in [&b"QUIT\r\n"[..], b"quit\r\n", b"RSET\r\nQUIT\r\n"] {
            assert!(said_bye(false, yes), "{:?}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"a LOGOUT"[..],
            b"a NOOP\r\n",
            b"a SELECT LOGOUT\r\n",
            b"a LOGOUT\r\nb NOOP\r\n",
            b"LOGOUT\r\n",
            b"\r\n",
            b"",
        ] {
            assert!(!said_bye(true, no), "{:?}", String::from_utf8_lossy(no));
        }
        for no in [&b"HELP QUIT\r\n"[..], b"VRFY logout\r\n", b"a QUIT\r\n", b"QUIT"] {
            assert!(!said_bye(false, no), "{:?}", String::from_utf8_lossy(no));
        }
        let mut c = Commands::new(true, b"");
        c.feed(b"a SELECT INBOX\r\n");
        assert!(!c.compressed);
        c.feed(b"z compress deflate\r\n");
        assert!(c.compressed);
        c.feed(b"garbage");
        assert!(c.compressed, "for the rest of the session");
        assert!(!Commands::new(false, b"a COMPRESS DEFLATE\r\n").compressed, "IMAP only");
    }

    /// Deadlines with a long idle timeout and a shutdown (50 ms of grace) that the token asks.
    fn stoppable() -> (CancellationToken, Deadlines) {
        let stop = CancellationToken::new();
        let d = Deadlines {
            idle: Duration::from_secs(60),
            shutdown: Some((stop.clone(), Duration::from_millis(50))),
            ..Deadlines::default()
        };
        (stop, d)
    }

    /// A relay of `protocol` between `client` and a new backend stream, the client's commands
    /// `pipelined` (as after its login), once the backend has sent `sent` and the client's end
    /// (`client_app`) has read all of it: the relay's task, and the backend's end.
    async fn relay_after<C>(
        protocol: Protocol,
        mut client: C,
        client_app: &mut DuplexStream,
        d: Deadlines,
        (pipelined, sent): (&[u8], &[u8]),
    ) -> (tokio::task::JoinHandle<(RelayEnd, Transferred)>, DuplexStream)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut backend_proxy, mut backend_app) = duplex(4096);
        let start = Start { protocol: Some(protocol), to_backend: pipelined.to_vec(), ..Start::default() };
        let task = tokio::spawn(async move {
            relay_from(&mut client, &mut backend_proxy, d, Meters::default(), None, start).await
        });
        backend_app.write_all(sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        client_app.read_exact(&mut got).await.unwrap();
        (task, backend_app)
    }

    /// Shutdown while a reply is part-way through, with everything read so far written (the
    /// backend is slow to send the rest of a literal): the relay says mid-reply, so no goodbye
    /// line lands inside the literal. Between replies it does not.
    #[tokio::test]
    async fn a_reply_written_up_to_mid_line_counts_as_mid_reply() {
        for (sent, mid) in [
            (&b"* 1 FETCH (BODY[] {20}\r\n0123456789"[..], true),
            (b"* OK still here\r\n", false),
            // Reliability cases 60 and 80: a literal whose header, or whose lines so far, end in
            // LF is still a reply in progress.
            (b"* 1 FETCH (BODY[] {20}\r\n", true),
            (b"* 1 FETCH (BODY[] {20}\r\nFrom: a\r\nTo: b\r\n", true),
            (b"* 1 FETCH (BINARY[] ~{3}\r\n\n\n", true),
            (b"* 1 FETCH (BODY[] {9}\r\nFrom: a\r\n)\r\na OK done\r\n", false),
            (b"* 1 FETCH (BODY[] {0}\r\n)\r\n", false),
        ] {
            let (mut client_app, client_proxy) = duplex(4096);
            let (stop, d) = stoppable();
            let (task, _backend_app) = relay_after(Protocol::Imap, client_proxy, &mut client_app, d, (b"", sent)).await;
            stop.cancel();
            let (end, t) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
            assert_eq!(end, RelayEnd::Stopped);
            assert_eq!(t.mid_reply, mid, "{:?}", String::from_utf8_lossy(sent));
        }
    }

    /// The same for POP3: inside a multi-line response (a RETR whose message lines so far end
    /// in LF) the relay says mid-reply; after its final dot, or after a one-line response, not.
    #[tokio::test]
    async fn a_pop3_multi_line_response_counts_as_mid_reply_up_to_its_dot() {
        let login = "+OK Logged in.\r\n";
        for (pipelined, sent, mid) in [
            (&b"RETR 1\r\n"[..], format!("{login}+OK 20 octets\r\nFrom: a\r\n"), true),
            (b"RETR 1\r\n", format!("{login}+OK 20 octets\r\nFrom: a\r\n\r\ntext\r\n.\r\n"), false),
            (b"DELE 1\r\nLIST\r\n", format!("{login}+OK Marked to be deleted.\r\n+OK\r\n"), true),
            (b"DELE 1\r\nLIST 2\r\n", format!("{login}+OK Marked to be deleted.\r\n+OK 2 40\r\n"), false),
        ] {
            let (mut client_app, client_proxy) = duplex(4096);
            let (stop, d) = stoppable();
            let (task, _backend_app) =
                relay_after(Protocol::Pop3, client_proxy, &mut client_app, d, (pipelined, sent.as_bytes())).await;
            stop.cancel();
            let (end, t) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
            assert_eq!((end, t.mid_reply), (RelayEnd::Stopped, mid), "{sent:?}");
        }
    }

    /// Reliability case 59: a client that stops reading stops the backend being read. The relay
    /// holds at most one buffer per direction; the rest stays in the backend's socket (here, its
    /// writer stays blocked), and every byte arrives once the client reads again.
    #[tokio::test]
    async fn slow_reader_applies_backpressure_to_the_backend() {
        let (mut client_app, mut client_proxy) = duplex(4096);
        let (mut backend_proxy, mut backend_app) = duplex(4096);
        let down = IntCounter::new("down", "down").unwrap();
        let meters = Meters { backend_to_client: Some(down.clone()), ..Meters::default() };
        let task = tokio::spawn(async move {
            let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
            relay(&mut client_proxy, &mut backend_proxy, d, meters, None).await
        });
        let body: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            backend_app.write_all(&sent).await.unwrap();
            backend_app.shutdown().await.unwrap();
            backend_app
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writer.is_finished(), "the backend must be held back while the client reads nothing");
        assert!(down.get() <= 4096, "only what fits the client's pipe was written: {}", down.get());
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert!(got == body, "all {} bytes, in order", body.len());
        drop(client_app);
        drop(writer.await.unwrap());
        assert_eq!(task.await.unwrap().0, RelayEnd::Closed);
    }

    /// Reliability case 74: with a hold, a backend that goes away (closing or failing) leaves its
    /// client connected, with everything the backend sent, until the hold is over; a client that
    /// closes first ends the session at once. Without a hold the close is passed on at once
    /// (`copies_both_ways_and_propagates_half_close`).
    #[tokio::test(start_paused = true)]
    async fn backend_close_is_held_back_from_the_client() {
        /// Returns the proxy's client stream too, still open: an EOF the client sees is the
        /// relay's own shutdown (close_notify over TLS), not the stream being dropped.
        async fn relay_with_hold(
            mut client_proxy: tokio::io::DuplexStream,
            mut backend_proxy: tokio::io::DuplexStream,
        ) -> (RelayEnd, Duration, tokio::io::DuplexStream) {
            let start = Instant::now();
            let d = Deadlines {
                idle: Duration::from_secs(1800),
                backend_close_hold: Some(Box::new(|| Duration::from_secs(7))),
                ..Deadlines::default()
            };
            let end = relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0;
            (end, start.elapsed(), client_proxy)
        }

        // The backend closes after a last line; the client stays connected and, during the hold,
        // sends a command that goes nowhere and does not end the hold.
        let (mut client_app, client_proxy) = duplex(1024);
        let (backend_proxy, mut backend_app) = duplex(1024);
        let task = tokio::spawn(relay_with_hold(client_proxy, backend_proxy));
        backend_app.write_all(b"* BYE going away\r\n").await.unwrap();
        drop(backend_app);
        let mut got = [0u8; 18];
        client_app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"* BYE going away\r\n");
        tokio::time::sleep(Duration::from_secs(1)).await;
        client_app.write_all(b"a NOOP\r\n").await.unwrap();
        let (end, took, _open) = task.await.unwrap();
        assert_eq!((end, took), (RelayEnd::Closed, Duration::from_secs(7)));
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(5), client_app.read_to_end(&mut rest)).await;
        assert!(eof.is_ok() && rest.is_empty(), "the relay shuts the client's side down itself");

        // The client closes during the hold: the session ends then.
        let (client_app, client_proxy) = duplex(1024);
        let (backend_proxy, backend_app) = duplex(1024);
        let task = tokio::spawn(relay_with_hold(client_proxy, backend_proxy));
        drop(backend_app);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!task.is_finished());
        drop(client_app);
        let (end, took, _) = task.await.unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert!(took < Duration::from_secs(3), "{took:?}");

        // The client closed its side before the backend went: nothing to hold it for.
        let (mut client_app, client_proxy) = duplex(1024);
        let (backend_proxy, backend_app) = duplex(1024);
        let task = tokio::spawn(relay_with_hold(client_proxy, backend_proxy));
        client_app.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(backend_app);
        let (end, took, _) = task.await.unwrap();
        assert_eq!((end, took), (RelayEnd::Closed, Duration::from_secs(1)));

        // No hold granted (an ordinary logout): the close is passed on at once and the session
        // waits for the client's own close, exactly as without a spread.
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_app) = duplex(1024);
        let task = tokio::spawn(async move {
            let d = Deadlines {
                idle: Duration::from_secs(1800),
                backend_close_hold: Some(Box::new(|| Duration::ZERO)),
                ..Deadlines::default()
            };
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0
        });
        backend_app.write_all(b"a OK Logout completed.\r\n").await.unwrap();
        drop(backend_app);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"a OK Logout completed.\r\n");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "the client's side is still open");
        drop(client_app);
        assert_eq!(task.await.unwrap(), RelayEnd::Closed);

        // Shutdown during a hold ends it at whichever comes first, the hold or the grace.
        for (hold, grace, ends) in [(600, 5, 7), (3, 30, 3)] {
            let (_client_app, mut client_proxy) = duplex(1024);
            let (mut backend_proxy, backend_app) = duplex(1024);
            let token = CancellationToken::new();
            let d = Deadlines {
                idle: Duration::from_secs(1800),
                shutdown: Some((token.clone(), Duration::from_secs(grace))),
                backend_close_hold: Some(Box::new(move || Duration::from_secs(hold))),
                ..Deadlines::default()
            };
            let start = Instant::now();
            let task = tokio::spawn(async move {
                relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0
            });
            drop(backend_app);
            tokio::time::sleep(Duration::from_secs(2)).await;
            token.cancel();
            assert_eq!(task.await.unwrap(), RelayEnd::Closed);
            assert_eq!(start.elapsed(), Duration::from_secs(ends), "hold {hold}s, grace {grace}s");
        }
    }

    /// The proxy's side of a client connection: its end reads as `end` (an error where a TLS
    /// stream would fail: no close_notify, a reset) instead of EOF, and `shut` notes whether the
    /// relay closed it cleanly.
    struct TestClient {
        inner: DuplexStream,
        end: Option<io::ErrorKind>,
        shut: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    }

    impl TestClient {
        fn new(inner: DuplexStream) -> TestClient {
            TestClient { inner, end: None, shut: None }
        }
    }

    impl AsyncRead for TestClient {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let end = self.end;
            match Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before && end.is_some() => {
                    Poll::Ready(Err(end.unwrap_or(io::ErrorKind::UnexpectedEof).into()))
                }
                other => other,
            }
        }
    }

    impl AsyncWrite for TestClient {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if let Some(shut) = &self.shut {
                shut.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A client that closes without TLS close_notify (swaks, Python's smtplib) ends its side as
    /// one that sends it does, whichever side goes first: the session ends "closed". A client
    /// connection that fails (a reset) is the client's error, unless the backend had already
    /// ended the session between replies; after a reply the backend cut off, it still is.
    #[tokio::test]
    async fn a_client_gone_without_close_notify_is_an_ordinary_close() {
        use io::ErrorKind::{ConnectionReset, UnexpectedEof};
        // (how the client's end reads, what the backend sends and whether it closes before the
        // client goes, how the session ends)
        let cases: [(io::ErrorKind, Option<&[u8]>, RelayEnd); 5] = [
            (UnexpectedEof, Some(b"221 2.0.0 Bye\r\n"), RelayEnd::Closed),
            (UnexpectedEof, None, RelayEnd::Closed),
            (ConnectionReset, None, RelayEnd::ClientError),
            (ConnectionReset, Some(b"221 2.0.0 Bye\r\n"), RelayEnd::Closed),
            (ConnectionReset, Some(b"* 1 FETCH (BODY[] {20}\r\nFrom: a"), RelayEnd::ClientError),
        ];
        for (client_end, backend_last, expected) in cases {
            let (mut client_app, client_proxy) = duplex(1024);
            let (mut backend_proxy, mut backend_app) = duplex(1024);
            let task = tokio::spawn(async move {
                let mut client = TestClient { end: Some(client_end), ..TestClient::new(client_proxy) };
                let d = Deadlines { idle: Duration::from_secs(60), ..Deadlines::default() };
                relay(&mut client, &mut backend_proxy, d, Meters::default(), None).await.0
            });
            client_app.write_all(b"QUIT\r\n").await.unwrap();
            let mut quit = [0u8; 6];
            backend_app.read_exact(&mut quit).await.unwrap();
            let still_open = match backend_last {
                Some(last) => {
                    backend_app.write_all(last).await.unwrap();
                    drop(backend_app);
                    let mut got = Vec::new();
                    client_app.read_to_end(&mut got).await.unwrap();
                    assert_eq!(got, last);
                    drop(client_app);
                    None
                }
                None => {
                    drop(client_app);
                    if client_end == UnexpectedEof {
                        // The client's end reaches the backend as an end, not a cut: it then closes.
                        let mut rest = Vec::new();
                        backend_app.read_to_end(&mut rest).await.unwrap();
                        drop(backend_app);
                        None
                    } else {
                        Some(backend_app)
                    }
                }
            };
            let end = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
            assert_eq!(end, expected, "{client_end:?} after {:?}", backend_last.map(String::from_utf8_lossy));
            drop(still_open);
        }
    }

    /// A backend that closes part-way through a reply (inside an IMAP literal, or a line): the
    /// session ends as the backend's failure and the client gets no close_notify, which would
    /// make the cut look like the reply's end. Between replies its close is an ordinary one.
    #[tokio::test]
    async fn a_backend_that_closes_inside_a_reply_gives_the_client_no_clean_close() {
        for (last, cut) in [
            (&b"* 1 FETCH (BODY[] {20}\r\nFrom: a\r\n"[..], true),
            (b"* 1 FETCH (FLAGS (\\Seen", true),
            (b"* BYE bye\r\na OK LOGOUT done\r\n", false),
        ] {
            let (mut client_app, client_proxy) = duplex(4096);
            let shut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let client = TestClient { shut: Some(shut.clone()), ..TestClient::new(client_proxy) };
            let (task, mut backend_app) =
                relay_after(Protocol::Imap, client, &mut client_app, Deadlines::default(), (b"", b"")).await;
            backend_app.write_all(last).await.unwrap();
            drop(backend_app);
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), client_app.read_to_end(&mut got)).await.unwrap().unwrap();
            assert_eq!(got, last);
            drop(client_app);
            let (end, _) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
            let expected = if cut { RelayEnd::BackendError } else { RelayEnd::Closed };
            assert_eq!(end, expected, "{:?}", String::from_utf8_lossy(last));
            assert_eq!(shut.load(std::sync::atomic::Ordering::SeqCst), !cut, "{:?}", String::from_utf8_lossy(last));
        }
    }

    /// A backend that fails (a read error, as a TLS backend's close without close_notify is)
    /// holds its client like one that closes, and the held session keeps no copy buffer: with
    /// thousands of sessions held after a backend crash (case 74) they would add up.
    #[tokio::test(start_paused = true)]
    async fn a_session_held_after_a_backend_error_keeps_no_buffer() {
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
            }
        }
        impl AsyncWrite for Failing {
            fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
                Poll::Ready(Ok(b.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (_client_app, mut client) = duplex(1024);
        let mut backend = Failing;
        let mut r = Relay {
            client: &mut client,
            backend: &mut backend,
            up: Direction::default(),
            down: Direction { hold_close: true, bulk: true, ..Direction::default() },
            follow: Follow::Bytes,
            hold: Some(Box::new(|| Duration::from_secs(60))),
            held_end: None,
            up_failed: false,
            linger_end: None,
            idle: Duration::from_secs(1800),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(1800))),
            max_end: None,
            stopping: false,
            cancelled: None,
            grace: Duration::ZERO,
            meters: Meters::default(),
        };
        assert!(tokio::time::timeout(Duration::from_secs(1), &mut r).await.is_err(), "held, not ended");
        assert_eq!(r.held_end, Some(RelayEnd::BackendError));
        assert!(r.down.buf.is_none() && r.up.buf.is_none());
    }

    /// A client held after its backend went (the disconnect spread) gets close_notify when the
    /// hold ends between replies, and none when the backend went part-way through a literal:
    /// a clean close would hide the truncation.
    #[tokio::test]
    async fn a_held_client_cut_off_inside_a_literal_gets_no_clean_close() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        struct Recording(DuplexStream, Arc<AtomicBool>);
        impl AsyncRead for Recording {
            fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_read(cx, b)
            }
        }
        impl AsyncWrite for Recording {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.0).poll_write(cx, b)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.1.store(true, Ordering::SeqCst);
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
        for (sent, clean) in [(&b"* 1 FETCH (BODY[] {20}\r\n0123\r\n"[..], false), (b"* BYE going away\r\n", true)] {
            let (mut client_app, client_proxy) = duplex(4096);
            let shut = Arc::new(AtomicBool::new(false));
            let client = Recording(client_proxy, shut.clone());
            let d = Deadlines {
                idle: Duration::from_secs(60),
                backend_close_hold: Some(Box::new(|| Duration::from_millis(100))),
                ..Deadlines::default()
            };
            let (task, backend_app) = relay_after(Protocol::Imap, client, &mut client_app, d, (b"", sent)).await;
            drop(backend_app);
            let (end, t) = tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
            assert_eq!(t.mid_reply, !clean, "{:?}", String::from_utf8_lossy(sent));
            // Logged as the backend's failure, as without a hold.
            let expected = if clean { RelayEnd::Closed } else { RelayEnd::BackendError };
            assert_eq!(end, expected, "{:?}", String::from_utf8_lossy(sent));
            assert_eq!(shut.load(Ordering::SeqCst), clean, "{:?}", String::from_utf8_lossy(sent));
        }
    }

    /// Reliability case 50 after login: the guard's cut is where the relay stops writing, and
    /// the backend's replies up to then still reach the client.
    #[tokio::test]
    async fn a_refused_command_ends_the_relay_with_what_came_before_it_written() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_app) = duplex(1024);
        let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
        let task = tokio::spawn(async move {
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), Some(CommandGuard::default())).await
        });
        client_app.write_all(b"NOOP\r\n").await.unwrap();
        let mut got = [0u8; 6];
        backend_app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"NOOP\r\n");
        backend_app.write_all(b"250 2.0.0 Ok\r\n").await.unwrap();
        let mut reply = [0u8; 14];
        client_app.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"250 2.0.0 Ok\r\n");
        client_app.write_all(b"RSET\r\nXCLIENT LOGIN=other\r\nMAIL FROM:<x@y>\r\n").await.unwrap();
        let (end, t) = task.await.unwrap();
        assert_eq!(end, RelayEnd::Refused);
        assert_eq!(t.client_to_backend, 12, "NOOP and RSET, nothing after");
        let mut rest = Vec::new();
        backend_app.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"RSET\r\n");
    }

    /// A refused line already waiting when the relay starts (sent before the client had its
    /// login reply): the login reply still reaches the client before the session ends, as when
    /// the line comes later.
    #[tokio::test]
    async fn a_refused_line_waiting_at_the_start_still_lets_the_login_reply_through() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, _backend_app) = duplex(1024);
        client_app.write_all(b"XCLIENT LOGIN=x\r\n").await.unwrap();
        let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
        let start = Start { to_client: b"235 2.7.0 ok\r\n".to_vec(), ..Start::default() };
        let guard = Some(CommandGuard::default());
        let (end, t) = relay_from(&mut client_proxy, &mut backend_proxy, d, Meters::default(), guard, start).await;
        assert_eq!((end, t.client_to_backend, t.mid_reply), (RelayEnd::Refused, 0, false));
        drop(client_proxy);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"235 2.7.0 ok\r\n");
    }

    /// The guard sees the backend's replies as the relay writes them (the login's first): after
    /// the 354 a message's line that looks like XCLIENT reaches the backend, after the message's
    /// end the command does not.
    #[tokio::test]
    async fn the_guard_lets_message_text_through_after_the_backends_354() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_app) = duplex(1024);
        let d = Deadlines { idle: Duration::from_secs(5), ..Deadlines::default() };
        let start = Start { to_client: b"235 2.7.0 ok\r\n".to_vec(), ..Start::default() };
        let task = tokio::spawn(async move {
            let guard = Some(CommandGuard::default());
            relay_from(&mut client_proxy, &mut backend_proxy, d, Meters::default(), guard, start).await
        });
        async fn exchange(from: &mut DuplexStream, to: &mut DuplexStream, bytes: &[u8]) {
            from.write_all(bytes).await.unwrap();
            let mut got = vec![0u8; bytes.len()];
            to.read_exact(&mut got).await.unwrap();
            assert_eq!(got, bytes);
        }
        let mut login = [0u8; 14];
        client_app.read_exact(&mut login).await.unwrap();
        exchange(&mut client_app, &mut backend_app, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n").await;
        exchange(&mut backend_app, &mut client_app, b"250 Ok\r\n250 Ok\r\n354 go\r\n").await;
        exchange(&mut client_app, &mut backend_app, b"XCLIENT LOGIN=x\r\n.\r\n").await;
        exchange(&mut backend_app, &mut client_app, b"250 Ok: queued\r\n").await;
        client_app.write_all(b"XCLIENT LOGIN=x\r\n").await.unwrap();
        let (end, t) = task.await.unwrap();
        assert_eq!((end, t.client_to_backend), (RelayEnd::Refused, 58));
    }

    /// A relay between the two proxy-side streams with a 30-minute idle timeout, spawned: how it
    /// ended and how long it took.
    fn timed_relay(
        mut client_proxy: DuplexStream,
        mut backend_proxy: DuplexStream,
    ) -> tokio::task::JoinHandle<(RelayEnd, Duration)> {
        let start = Instant::now();
        tokio::spawn(async move {
            let d = Deadlines { idle: Duration::from_secs(1800), ..Deadlines::default() };
            let end = relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0;
            (end, start.elapsed())
        })
    }

    /// A backend that ends the session (Postfix's 421 at its own timeout) while the client
    /// neither reads nor closes: the session ends a few seconds after the close was passed on,
    /// not at the idle timeout (its slots would be held that long), and the client still finds
    /// the last reply and the end when it reads.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_close_after_its_backend_did_is_let_go() {
        let (mut client_app, client_proxy) = duplex(1024);
        let (backend_proxy, mut backend_app) = duplex(1024);
        let task = timed_relay(client_proxy, backend_proxy);
        backend_app.write_all(b"421 4.4.2 Error: timeout exceeded\r\n").await.unwrap();
        drop(backend_app);
        assert_eq!(task.await.unwrap(), (RelayEnd::Closed, CLIENT_CLOSE_WAIT));
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"421 4.4.2 Error: timeout exceeded\r\n");

        // Bytes only (replies not followed), the last without a line end: the close was passed
        // on whole all the same, so the session still ends as closed.
        let (_client_app, client_proxy) = duplex(1024);
        let (backend_proxy, mut backend_app) = duplex(1024);
        let task = timed_relay(client_proxy, backend_proxy);
        backend_app.write_all(b"no line end").await.unwrap();
        drop(backend_app);
        assert_eq!(task.await.unwrap().0, RelayEnd::Closed);
    }

    /// A client that closes its side first (no LOGOUT or QUIT) makes its backend close in
    /// answer: that close is not asked for a hold, so it does not count among a failure's.
    #[tokio::test(start_paused = true)]
    async fn the_backends_answer_to_a_clients_close_is_not_counted_for_the_spread() {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_app) = duplex(1024);
        let counted = asked.clone();
        let task = tokio::spawn(async move {
            let d = Deadlines {
                idle: Duration::from_secs(1800),
                backend_close_hold: Some(Box::new(move || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Duration::from_secs(7)
                })),
                ..Deadlines::default()
            };
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0
        });
        client_app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        backend_app.read_to_end(&mut rest).await.unwrap();
        drop(backend_app);
        assert_eq!(task.await.unwrap(), RelayEnd::Closed);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// Reliability case 60.
    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_relay() {
        let (_client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, _backend_app) = duplex(64);
        let (end, _) = relay(
            &mut client_proxy,
            &mut backend_proxy,
            Deadlines { idle: Duration::from_secs(1800), ..Deadlines::default() },
            Meters::default(),
            None,
        )
        .await;
        assert_eq!(end, RelayEnd::IdleTimeout);
    }

    /// Reliability case 60: traffic either way restarts the idle timer (IDLE keepalives keep a
    /// session), silence ends it one idle period after the last byte.
    #[tokio::test(start_paused = true)]
    async fn traffic_restarts_the_idle_timer() {
        let (mut client_app, client_proxy) = duplex(64);
        let (backend_proxy, mut backend_app) = duplex(64);
        let task = timed_relay(client_proxy, backend_proxy);
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1200)).await;
            client_app.write_all(b"DONE\r\n").await.unwrap();
            backend_app.read_exact(&mut buf[..6]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1200)).await;
            backend_app.write_all(b"* OK\r\n").await.unwrap();
            client_app.read_exact(&mut buf[..6]).await.unwrap();
        }
        assert!(!task.is_finished(), "two hours of traffic at 20-minute gaps keep the session");
        assert_eq!(task.await.unwrap(), (RelayEnd::IdleTimeout, Duration::from_secs(6 * 1200 + 1800)));
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_and_shutdown_grace_end_busy_sessions() {
        let (_a, mut client_proxy) = duplex(64);
        let (mut backend_proxy, _b) = duplex(64);
        let d = Deadlines {
            idle: Duration::from_secs(1800),
            max_end: Some(Instant::now() + Duration::from_secs(60)),
            ..Deadlines::default()
        };
        assert_eq!(
            relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0,
            RelayEnd::MaxDuration
        );
        let token = CancellationToken::new();
        let t2 = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            t2.cancel();
        });
        let start = Instant::now();
        let d = Deadlines {
            idle: Duration::from_secs(1800),
            shutdown: Some((token, Duration::from_secs(10))),
            ..Deadlines::default()
        };
        assert_eq!(relay(&mut client_proxy, &mut backend_proxy, d, Meters::default(), None).await.0, RelayEnd::Stopped);
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }
}
