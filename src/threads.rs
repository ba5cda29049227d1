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
