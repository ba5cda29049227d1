//! Shutdown: one token that every long-lived task holds and watches.
//!
//! `pns serve` trips it on SIGTERM or SIGINT. Listeners stop accepting, the
//! hub answers held polls at once, background tasks return, and requests in
//! flight (a notify waiting for its commit) finish before the process exits.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }
}

/// Listens for SIGTERM and SIGINT from now on, and resolves on the first.
/// Called before the node opens its store and listeners: a signal before
/// this ends the process as the kernel's default does, with no clean
/// shutdown.
pub fn signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let listen = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for {name}");
            None
        }
    };
    let (mut term, mut int) = (
        listen(SignalKind::terminate(), "SIGTERM"),
        listen(SignalKind::interrupt(), "SIGINT"),
    );
    async fn received(signal: &mut Option<Signal>) {
        match signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    async move {
        tokio::select! {
            _ = received(&mut term) => tracing::info!("SIGTERM: shutting down"),
            _ = received(&mut int) => tracing::info!("SIGINT: shutting down"),
        }
    }
}
