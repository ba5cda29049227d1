//! Work that runs on a thread of its own, with a tokio runtime of its own.
//!
//! With tens of thousands of polls on the main runtime, a burst of wakes
//! puts thousands of tasks in its run queue; whatever else waits there
//! waits behind them. Three jobs must not: accepting connections (the
//! kernel's accept queue overflows, and a client whose connection it drops
//! waits a second to try again), the internal listener (notifies would be
//! acknowledged only after the answers they caused), and the SQLite writer
//! (every commit would wait its turn). On threads of their own the kernel
//! shares the CPU between them and the polls.
//!
//! The internal listener and the SQLite writer share one thread, the ingest
//! thread: each notify goes from the one to the other and back, and each
//! hand-off between two threads costs a wake-up of the other thread.

use anyhow::Context;
use std::future::Future;

/// Run `task` on a new thread named `name`; the returned future resolves
/// once `task` has finished. Dropping it leaves the thread running.
pub fn spawn(
    name: &str,
    task: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl Future<Output = ()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .with_context(|| format!("cannot build the runtime of {name}"))?;
    let (finished, finished_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(task);
            drop(finished);
        })
        .with_context(|| format!("cannot start the thread {name}"))?;
    Ok(async move {
        // Resolves with an error once `finished` is dropped: that is the signal.
        let _ = finished_rx.await;
    })
}

/// Run `task` on the ingest thread (`pns-ingest`), made on first use. The
/// returned future resolves once `task` has finished.
pub fn on_ingest_thread(
    task: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl Future<Output = ()>> {
    static INGEST: std::sync::Mutex<Option<tokio::runtime::Handle>> = std::sync::Mutex::new(None);
    let mut ingest = INGEST.lock().unwrap_or_else(|e| e.into_inner());
    let handle = match &*ingest {
        Some(handle) => handle.clone(),
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build the runtime of pns-ingest")?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("pns-ingest".to_owned())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .context("cannot start the thread pns-ingest")?;
            *ingest = Some(handle.clone());
            handle
        }
    };
    let task = handle.spawn(task);
    Ok(async move {
        let _ = task.await;
    })
}
