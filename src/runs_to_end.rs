//! Work that, once begun, runs to its end even when its caller stops
//! waiting.
//!
//! Dropping a request's future is how a server forgets a client that went
//! away; but what that request had begun in the store goes on there (the
//! writer has the write), and what was to follow it in memory must follow
//! it too: the polls a stored message concerns woken, a revoked session
//! refused, the messages counted. Such work runs in [`RunsToEnd`]: while
//! the caller waits it is polled in the caller's task, as any future;
//! dropped before its end, the rest goes on in a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A future that runs to its end even when its caller stops waiting: the
/// rest then runs in a task of its own.
pub struct RunsToEnd<F: Future<Output: Send> + Send + 'static>(Option<Pin<Box<F>>>);

impl<F: Future<Output: Send> + Send + 'static> RunsToEnd<F> {
    pub fn new(work: F) -> Self {
        RunsToEnd(Some(Box::pin(work)))
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for RunsToEnd<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(work) = self.0.as_mut() else {
            panic!("RunsToEnd polled after it finished");
        };
        let done = ready!(work.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(done)
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for RunsToEnd<F> {
    fn drop(&mut self) {
        let Some(work) = self.0.take() else {
            return;
        };
        // Without a runtime (the node is shutting down) there is nowhere
        // to finish; the store's own shutdown writes what its writer has taken.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(work);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn work_whose_caller_stops_waiting_runs_to_its_end() {
        let (go, gone) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel();
        let mut work = Box::pin(RunsToEnd::new(async move {
            let _ = gone.await;
            let _ = done.send("finished");
        }));
        // Started, then the caller goes away.
        let waker = std::task::Waker::noop();
        assert!(work
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending());
        drop(work);
        go.send(()).unwrap();
        let finished = tokio::time::timeout(std::time::Duration::from_secs(10), finished).await;
        assert_eq!(finished.unwrap(), Ok("finished"));
    }

    #[tokio::test]
    async fn work_waited_for_gives_its_output() {
        assert_eq!(RunsToEnd::new(async { 7 }).await, 7);
    }
}
