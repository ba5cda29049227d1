//! Ingest: every way a message enters PNS ends here.
//!
//! [`Ingest::accept`] validates nothing (the callers' parsers do), stores the
//! batch, wakes the polls of the users who got visible news as soon as the
//! store shows it (unless the store wakes them itself, see
//! [`crate::store::MessageStore::wake_after_commits`]), tells the delay scheduler about delayed ones, and returns
//! once the batch is durable: only then may a caller acknowledge it. A
//! caller that stops waiting (its sender went away) takes nothing back:
//! the rest runs on by itself. Data flows one way from here: store, then
//! hub, then poll answers.
//!
//! The ways in: the internal API (`crate::http::notify`), Dovecot's
//! `push_notification` driver (`crate::http::dovecot`) and the [`maildir`]
//! watcher; [`mime`] turns raw mail into the fields of a new-mail message.

pub mod maildir;
pub mod mime;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::runs_to_end::RunsToEnd;
use crate::scheduler::DelayScheduler;
use crate::store::{Accepted, NewMessage, SharedStore, StoreResult};
use std::sync::Arc;

/// Where a message came from, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Api,
    Maildir,
    Dovecot,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Maildir => "maildir",
            Source::Dovecot => "dovecot",
        }
    }
}

/// The outcome of one accepted batch.
#[derive(Debug)]
pub struct AcceptReport {
    pub accepted: usize,
    pub duplicates: usize,
    pub ids: Vec<String>,
}

/// Cheap to clone: every part is shared.
#[derive(Clone)]
pub struct Ingest {
    store: SharedStore,
    hub: Arc<Hub>,
    /// The store wakes the hub after its commits; otherwise [`Ingest::accept`] does.
    store_wakes: bool,
    scheduler: Arc<DelayScheduler>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(
        store: SharedStore,
        hub: Arc<Hub>,
        scheduler: Arc<DelayScheduler>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store_wakes = store.wake_after_commits(hub.clone());
        Ingest {
            store,
            hub,
            store_wakes,
            scheduler,
            metrics,
        }
    }

    pub async fn accept(
        &self,
        batch: Vec<NewMessage>,
        source: Source,
    ) -> StoreResult<AcceptReport> {
        RunsToEnd::new(self.clone().carry_out(batch, source)).await
    }

    /// What [`Ingest::accept`] does, owning what it needs, so that it can
    /// finish in a task of its own.
    async fn carry_out(self, batch: Vec<NewMessage>, source: Source) -> StoreResult<AcceptReport> {
        let now = crate::clock::now_ms();
        // Whom to wake, unless the store wakes them itself.
        let users: Vec<String> = match self.store_wakes {
            true => Vec::new(),
            false => batch.iter().map(|m| m.user.clone()).collect(),
        };
        // A failure is counted by the metered store.
        let acceptance = self.store.accept(batch, now).await?;
        let outcomes = acceptance.outcomes;
        let mut report = AcceptReport {
            accepted: 0,
            duplicates: 0,
            ids: Vec::with_capacity(outcomes.len()),
        };
        let mut woken: Vec<&str> = Vec::new();
        let mut delayed = false;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Accepted::Stored { id, visible } => {
                    report.accepted += 1;
                    report.ids.push(id);
                    match users.get(i) {
                        _ if !visible => delayed = true,
                        Some(user) => woken.push(user),
                        None => {}
                    }
                }
                Accepted::Duplicate { id } => {
                    report.duplicates += 1;
                    report.ids.push(id);
                }
            }
        }
        woken.sort_unstable();
        woken.dedup();
        for user in woken {
            self.hub.wake(user);
        }
        if delayed {
            self.scheduler.reschedule();
        }
        acceptance.durable.wait().await?;
        self.metrics
            .accepted(source, report.accepted as u64, report.duplicates as u64);
        Ok(report)
    }
}
