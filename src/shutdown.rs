//! Graceful shutdown: on SIGTERM (or Ctrl-C) the traffic listener stops accepting, `/readyz` turns 503,
//! requests that still arrive on open connections get 503 `shutting_down`, and in-flight responses get
//! `shutdown_grace` to finish; a second signal ends the grace at once. Both switches are tokio-util's
//! cancellation tokens; each traffic thread holds child tokens of its own, so that the per-request clones a
//! request body takes stay on its thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown switch: the drain, and the end of its grace.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    drain: CancellationToken,
    hurry: CancellationToken,
}

impl Shutdown {
    /// Starts draining; idempotent.
    pub fn trigger(&self) {
        self.drain.cancel();
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Resolves once draining has begun.
    pub async fn wait(&self) {
        self.drain.cancelled().await;
    }

    /// Ends the drain's grace at once (a second signal): open connections are closed now.
    pub fn hurry(&self) {
        self.hurry.cancel();
    }

    /// Resolves once [`Self::hurry`] has been called.
    pub async fn hurried(&self) {
        self.hurry.cancelled().await;
    }

    /// The drain alone, as a token that is cancelled when it begins.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// A switch that follows this one (triggered and hurried with it), for one traffic thread.
    pub fn child(&self) -> Self {
        Self { drain: self.drain.child_token(), hurry: self.hurry.child_token() }
    }
}

/// One traffic thread's open connections, told together to finish what they are serving and close. It does
/// what hyper-util's `GracefulShutdown` does for the drain, at less cost: a connection reads one flag each time
/// it is polled and registers its waker only when that changes (once per connection), where a watch channel's
/// `changed()` future takes a lock on every poll (~1.3k instructions per JSON request, whose connection is
/// polled about five times) and holds a waiter in every connection: with hyper-util's, an idle stream took
/// 0.38 KiB more (29.21 against 28.83 KiB at 9,900 streams; bench/README.md, eleventh round), against a target
/// of no more than before.
///
/// Invariants: a connection is registered (its waker stored) before it reads the flag a second time, so a
/// drain that starts in between wakes it; `start` takes every waker and sets the flag, so a connection watched
/// after it starts is closed at its first poll; a connection that ends removes its registration.
#[derive(Debug, Default)]
pub struct ConnectionDrain {
    started: AtomicBool,
    /// The waker of each connection not yet told, by its registration number.
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    wakers: HashMap<u64, Waker>,
}

/// A connection that can be asked to finish its current exchange and close.
pub trait Graceful: Future {
    /// Starts closing: hyper's `graceful_shutdown`.
    fn close_gracefully(self: Pin<&mut Self>);
}

impl ConnectionDrain {
    /// Tells every connection, open now or watched later, to close after its current response.
    pub fn start(&self) {
        self.started.store(true, Ordering::Release);
        let waiting = std::mem::take(&mut self.waiting.lock().unwrap_or_else(PoisonError::into_inner).wakers);
        for waker in waiting.into_values() {
            waker.wake();
        }
    }

    /// `conn`, closed gracefully once the drain starts.
    pub fn watch<C: Graceful>(self: &Arc<Self>, conn: C) -> Watched<C> {
        Watched { conn, drain: self.clone(), registered: None, closing: false }
    }

    fn register(&self, id: Option<u64>, waker: &Waker) -> u64 {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let id = id.unwrap_or_else(|| {
            waiting.next += 1;
            waiting.next
        });
        waiting.wakers.insert(id, waker.clone());
        id
    }

    fn forget(&self, id: u64) {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner).wakers.remove(&id);
    }
}

pin_project_lite::pin_project! {
    /// A connection under a [`ConnectionDrain`].
    pub struct Watched<C> {
        #[pin]
        conn: C,
        drain: Arc<ConnectionDrain>,
        // The registration, and the waker it holds.
        registered: Option<(u64, Waker)>,
        closing: bool,
    }

    impl<C> PinnedDrop for Watched<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((id, _)) = this.registered.take() {
                this.drain.forget(id);
            }
        }
    }
}

impl<C: Graceful> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.closing {
            let mut started = this.drain.started.load(Ordering::Acquire);
            if !started && !this.registered.as_ref().is_some_and(|(_, w)| w.will_wake(cx.waker())) {
                let id = this.drain.register(this.registered.as_ref().map(|(id, _)| *id), cx.waker());
                *this.registered = Some((id, cx.waker().clone()));
                // Checked again: a drain that started in between took its wakers before this one was in.
                started = this.drain.started.load(Ordering::Acquire);
            }
            if started {
                *this.closing = true;
                this.conn.as_mut().close_gracefully();
            }
        }
        this.conn.poll(cx)
    }
}

/// Listens for SIGTERM and Ctrl-C (SIGINT) from the moment it is called, and resolves on the first. On Unix the
/// handlers are installed here, not when the future is first polled: a signal that arrives in between (a
/// supervisor stopping the gateway just after it started listening) is not lost to the default action, which
/// would end the process without its drain. (Elsewhere only Ctrl-C is listened for, from the first poll.)
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        async fn first(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => drop(signal.recv().await),
                None => std::future::pending().await,
            }
        }
        let (term, int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
        async move {
            tokio::select! {
                () = first(term) => {},
                () = first(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Listens for SIGHUP (a reload) from the moment it is called; as with [`signal`], a SIGHUP that arrives before
/// the first poll is not lost to the default action, which would end the process.
#[cfg(unix)]
pub fn hangup() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the handler installed when `signal()` is called, the SIGTERM below would end this test process.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_not_lost() {
        let signal = signal();
        let sent = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()));
        tokio::time::timeout(std::time::Duration::from_secs(30), signal).await.expect("the SIGTERM was seen");
    }

    #[tokio::test]
    async fn waiters_see_a_trigger_before_or_after_they_wait() {
        let s = Shutdown::default();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait().await }
        });
        assert!(!s.is_draining());
        s.trigger();
        waiter.await.expect("waiter");
        s.wait().await;
        assert!(s.is_draining());
    }

    #[tokio::test]
    async fn a_child_follows_its_parent() {
        let s = Shutdown::default();
        let child = s.child();
        assert!(!child.is_draining());
        s.trigger();
        child.wait().await;
        s.hurry();
        child.hurried().await;
    }

    use futures_util::FutureExt as _;

    /// A connection that ends once told to close.
    struct Closable(bool);

    impl Future for Closable {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.0 { Poll::Ready(()) } else { Poll::Pending }
        }
    }

    impl Graceful for Closable {
        fn close_gracefully(mut self: Pin<&mut Self>) {
            self.0 = true;
        }
    }

    fn waiting(drain: &ConnectionDrain) -> usize {
        drain.waiting.lock().unwrap_or_else(PoisonError::into_inner).wakers.len()
    }

    #[tokio::test]
    async fn the_drain_wakes_and_closes_open_connections_and_closes_later_ones_at_once() {
        let drain = Arc::new(ConnectionDrain::default());
        let open = tokio::spawn(drain.watch(Closable(false)));
        // Once polled, the connection waits with its waker registered.
        while waiting(&drain) == 0 {
            tokio::task::yield_now().await;
        }
        drain.start();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(10), open).await.expect("not woken");
        assert!(closed.is_ok(), "{closed:?}");
        let mut later = std::pin::pin!(drain.watch(Closable(false)));
        assert!(later.as_mut().now_or_never().is_some(), "watched after the drain began, and not closed");
        assert_eq!(waiting(&drain), 0);
    }

    #[tokio::test]
    async fn a_connection_that_ends_leaves_no_registration_behind() {
        let drain = Arc::new(ConnectionDrain::default());
        for _ in 0..3 {
            let mut conn = Box::pin(drain.watch(Closable(false)));
            assert!(conn.as_mut().now_or_never().is_none());
            assert_eq!(waiting(&drain), 1);
            drop(conn);
            assert_eq!(waiting(&drain), 0);
        }
    }
}
