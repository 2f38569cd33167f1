//! After login the proxy is a byte pipe: copy both ways until both sides are done, propagate
//! half-close, count bytes, and end the session after an idle period with no traffic.
//!
//! Memory: a direction holds a buffer only while it has bytes in flight. When a read would block
//! the (empty) buffer is released, so an idle session holds no copy buffers at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Per-direction copy buffer, allocated only while data moves.
const BUF_SIZE: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished (EOF each way).
    Closed,
    IdleTimeout,
    ClientError,
    BackendError,
    /// The `stop` future completed (shutdown after its grace period).
    Stopped,
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::ClientError => "client_error",
            RelayEnd::BackendError => "backend_error",
            RelayEnd::Stopped => "shutdown",
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
    bytes: u64,
}

enum Side {
    Reader,
    Writer,
}

impl Direction {
    /// Move bytes from `r` to `w`. Ready(Ok) when EOF was read and propagated.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        active: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pos < self.cap {
                let Some(buf) = self.buf.as_ref() else {
                    return Poll::Ready(Err((Side::Writer, io::ErrorKind::Other.into())));
                };
                let n = ready!(w.as_mut().poll_write(cx, &buf[self.pos..self.cap])).map_err(|e| (Side::Writer, e))?;
                if n == 0 {
                    return Poll::Ready(Err((Side::Writer, io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.needs_flush = true;
                *active = true;
                continue;
            }
            if self.needs_flush {
                ready!(w.as_mut().poll_flush(cx)).map_err(|e| (Side::Writer, e))?;
                self.needs_flush = false;
            }
            if self.read_done {
                ready!(w.as_mut().poll_shutdown(cx)).map_err(|e| (Side::Writer, e))?;
                self.done = true;
                self.buf = None;
                continue;
            }
            let buf = self.buf.get_or_insert_with(|| vec![0u8; BUF_SIZE].into_boxed_slice());
            let mut rb = ReadBuf::new(buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => {
                    // Idle: give the buffer back rather than hold it while nothing moves.
                    self.buf = None;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Side::Reader, e))),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.read_done = true;
                    } else {
                        self.pos = 0;
                        self.cap = n;
                        *active = true;
                    }
                }
            }
        }
    }
}

/// Relay between `client` and `backend` until both directions end, an error, `idle` passes with
/// no byte moving either way, or `stop` completes.
pub async fn relay<C, B, F>(client: &mut C, backend: &mut B, idle: Duration, stop: F) -> (RelayEnd, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    F: Future<Output = ()>,
{
    let stop = std::pin::pin!(stop);
    let mut r = Relay {
        client,
        backend,
        up: Direction::default(),
        down: Direction::default(),
        idle,
        sleep: Box::pin(tokio::time::sleep(idle)),
        stop,
    };
    let end = (&mut r).await;
    (end, Transferred { client_to_backend: r.up.bytes, backend_to_client: r.down.bytes })
}

struct Relay<'a, 's, C: ?Sized, B: ?Sized, F> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Direction,
    down: Direction,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    stop: Pin<&'s mut F>,
}

impl<C, B, F> Future for &mut Relay<'_, '_, C, B, F>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    F: Future<Output = ()>,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = &mut **self.get_mut();
        if this.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::Stopped);
        }
        let mut active = false;
        let up = this.up.poll_copy(cx, Pin::new(&mut *this.client), Pin::new(&mut *this.backend), &mut active);
        if let Poll::Ready(Err((side, _))) = up {
            return Poll::Ready(match side {
                Side::Reader => RelayEnd::ClientError,
                Side::Writer => RelayEnd::BackendError,
            });
        }
        let down = this.down.poll_copy(cx, Pin::new(&mut *this.backend), Pin::new(&mut *this.client), &mut active);
        if let Poll::Ready(Err((side, _))) = down {
            return Poll::Ready(match side {
                Side::Reader => RelayEnd::BackendError,
                Side::Writer => RelayEnd::ClientError,
            });
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(RelayEnd::Closed);
        }
        if active {
            this.sleep.as_mut().reset(Instant::now() + this.idle);
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(RelayEnd::IdleTimeout);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_app) = duplex(64);
        let task = tokio::spawn(async move {
            relay(&mut client_proxy, &mut backend_proxy, Duration::from_secs(5), std::future::pending()).await
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
        backend_app.write_all(b"* BYE\r\n").await.unwrap();
        backend_app.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"* BYE\r\n");
        let (end, t) = task.await.unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(t.client_to_backend, 100_000);
        assert_eq!(t.backend_to_client, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_relay() {
        let (_client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, _backend_app) = duplex(64);
        let (end, _) =
            relay(&mut client_proxy, &mut backend_proxy, Duration::from_secs(1800), std::future::pending()).await;
        assert_eq!(end, RelayEnd::IdleTimeout);
    }
}
