//! A caller connection whose writes may not stall for longer than `server.send_timeout`. A caller that stops
//! reading leaves the gateway's writes to it pending; nothing else would end them, and the response (with the
//! upstream stream behind it, and its connection) would be held for as long as the caller liked. As nginx's
//! `send_timeout`, the time counts between two writes that make progress: a slow reader is cut only if it frees
//! no room in the connection's send buffer for a whole timeout (the kernel reports a full buffer writable again
//! once about a third of it has drained), however long its response takes in all.
//!
//! A response that upstream starts before the caller has sent its whole request body (an early answer) counts
//! too: a caller that reads nothing until its upload ends, while that answer fills the buffers, is cut.
//!
//! tokio-io-timeout's `TimeoutWriter` does the same with a tokio `Sleep` held in every connection from the start
//! (136 bytes more per connection, boxed, as it is not `Unpin`: +0.45% memory per idle stream, against a target
//! of no more); this one makes its `Sleep` only when a write first has to wait, which almost never happens.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `io`, failing a write that has waited longer than `timeout` with [`io::ErrorKind::TimedOut`].
pub struct SendTimeout<IO> {
    io: IO,
    timeout: Duration,
    /// Made when a write first waits, and kept for the connection's life once made.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether a write is waiting (the timer is armed).
    stalled: bool,
}

impl<IO> SendTimeout<IO> {
    /// Wraps `io`.
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self { io, timeout, timer: None, stalled: false }
    }

    /// What a write (or flush) that returned `polled` means: progress disarms the timer; waiting arms it, or
    /// fails once it has fired.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let deadline = Instant::now().checked_add(self.timeout).unwrap_or_else(far_future);
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !std::mem::replace(&mut self.stalled, true) {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, SendTimedOut(self.timeout)))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Thirty years on: a configured "never".
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 86_400)
}

/// Why a connection was cut: its caller read nothing for the timeout.
#[derive(Debug, thiserror::Error)]
#[error("the caller read nothing for {0:?}")]
pub struct SendTimedOut(Duration);

/// Whether a connection ended because its caller stopped reading.
pub fn is_send_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    // An `io::Error`'s sources skip the error it wraps, so that one is looked at directly.
    crate::error::chain(error).any(|e| {
        e.downcast_ref::<io::Error>().and_then(io::Error::get_ref).is_some_and(|inner| inner.is::<SendTimedOut>())
    })
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_write_the_reader_never_takes_fails_after_the_timeout() {
        let (writer, _reader) = tokio::io::duplex(64);
        let mut writer = SendTimeout::new(writer, Duration::from_millis(20));
        let started = std::time::Instant::now();
        let written = tokio::time::timeout(BOUND, writer.write_all(&[0; 1024])).await.expect("the write never failed");
        let error = written.expect_err("a write nobody reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(is_send_timeout(&error));
        assert!(!is_send_timeout(&io::Error::from(io::ErrorKind::TimedOut)));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn a_reader_that_keeps_reading_is_never_cut() {
        let (writer, mut reader) = tokio::io::duplex(64);
        let mut writer = SendTimeout::new(writer, Duration::from_millis(200));
        // A slow reader: 64 bytes every 10 ms, for several timeouts' worth in all.
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 64 * 64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                total += reader.read(&mut buf).await.expect("read");
            }
        });
        tokio::time::timeout(BOUND, writer.write_all(&[0; 64 * 64])).await.expect("bounded").expect("never cut");
        reading.await.expect("reader");
    }
}
