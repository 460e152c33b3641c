//! Graceful shutdown: on SIGTERM (or Ctrl-C) the traffic listener stops accepting, `/readyz` turns 503,
//! requests that still arrive on open connections get 503 `shutting_down`, and in-flight responses get
//! `shutdown_grace` to finish; a second signal ends the grace at once. Both switches are tokio-util's
//! cancellation tokens; each traffic thread holds child tokens of its own, so that the per-request clones a
//! request body takes stay on its thread.

use std::future::Future;

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

    /// A switch that follows this one (triggered and hurried with it), for one traffic thread.
    pub fn child(&self) -> Self {
        Self { drain: self.drain.child_token(), hurry: self.hurry.child_token() }
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
}
