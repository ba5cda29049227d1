//! The cluster: what other nodes sharing the store did, applied to this node.
//!
//! A shared store reports other nodes' accepts, revocations, delayed messages
//! and poll starts as [`StoreEvent`]s. One task per node applies them to the
//! hub, the session validator and the delay scheduler, the same parts the
//! local paths update, so a notify on any node wakes polls held on every node
//! and a revocation anywhere ends held polls everywhere. When events may have
//! been missed ([`StoreEvent::Resync`], or this task fell behind), the node
//! reloads the revocations and wakes every held poll to re-check the store:
//! the store, not the events, is the truth.

use crate::app::App;
use crate::shutdown::Shutdown;
use crate::store::StoreEvent;
use std::sync::Arc;
use tokio::sync::broadcast::{error::RecvError, Receiver};

/// Apply `events` to this node until shutdown.
pub async fn follow(app: Arc<App>, mut events: Receiver<StoreEvent>, shutdown: Shutdown) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait() => return,
        };
        match event {
            Ok(event) => apply(&app, event).await,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "fell behind the other nodes' events; re-checking every held poll"
                );
                apply(&app, StoreEvent::Resync).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn apply(app: &App, event: StoreEvent) {
    match event {
        StoreEvent::News { user } => app.hub.wake(&user),
        StoreEvent::SessionRevoked { jti, expires_ms } => {
            app.sessions.note_revoked_session(&jti, expires_ms);
            app.hub.revoke_session(&jti);
            app.registry.forget_session(&jti);
        }
        StoreEvent::MailboxRevoked { user, at_ms } => {
            app.sessions.note_revoked_mailbox(&user, at_ms);
            // Woken polls check their session against the revocation, so a
            // session begun after `at_ms` keeps polling.
            app.hub.wake(&user);
            app.registry.forget_user(&user);
        }
        StoreEvent::OpaqueSessionChanged { sid_hash, deleted } => {
            app.opaque.forget(&sid_hash);
            if deleted {
                app.hub.revoke_session(&sid_hash);
                app.registry.forget_session(&sid_hash);
            }
        }
        StoreEvent::DelayedAccepted => app.scheduler.reschedule(),
        StoreEvent::PollStarted {
            user,
            session,
            at_ms,
        } => app.hub.supersede(&user, &session, at_ms),
        StoreEvent::Resync => {
            // Revocations first, so the polls woken next see them.
            if let Err(e) = app
                .sessions
                .load_from(&app.store, crate::clock::now_ms())
                .await
            {
                tracing::warn!(error = %e, "could not reload revocations");
            }
            app.hub.wake_all();
            app.scheduler.reschedule();
        }
    }
}
