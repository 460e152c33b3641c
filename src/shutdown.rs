//! Graceful shutdown: one flag the hot path reads without a lock, and a notification the servers wait on.
//! On SIGTERM (or Ctrl-C) the traffic listener stops accepting, `/readyz` turns 503, requests that still
//! arrive on open connections get 503 `shutting_down`, and in-flight responses get `shutdown_grace` to finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A cloneable shutdown switch.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// Starts draining; idempotent.
    pub fn trigger(&self) {
        self.0.draining.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Resolves once draining has begun.
    pub async fn wait(&self) {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        // Register before checking the flag, so a trigger in between is not missed.
        notified.as_mut().enable();
        if self.is_draining() {
            return;
        }
        notified.await;
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
