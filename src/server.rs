//! The accept loop both listeners run: hyper HTTP/1.1 connections with a
//! header read timeout against slow clients (request bodies have their own
//! timeout, in [`crate::http`]), a cap on the request head, a cap on open connections, the
//! peer address in each request's extensions, and a graceful drain.

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// How long the drain waits for requests in flight at most.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The public listener's cap on a request head (request line and headers);
/// hyper answers 431 past it. Browsers' polls are far smaller.
pub const PUBLIC_MAX_HEAD_BYTES: usize = 32 * 1024;

/// The limits of one listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once at most; further ones wait to be accepted.
    pub max_connections: usize,
    /// A request's headers must arrive within this time, or the connection
    /// is closed (this also ends idle keep-alive connections).
    pub header_timeout: Duration,
    /// The largest request head read; `None` for hyper's default.
    pub max_head_bytes: Option<usize>,
}

/// Serve `router` on `listener` until `shutdown`, then drain.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnLimits, shutdown: Shutdown) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    if let Some(max) = limits.max_head_bytes {
        // hyper refuses (panics on) a buffer below its own minimum.
        builder.max_buf_size(max.max(8192));
    }
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

/// The address a request came from.
pub fn peer(req: &axum::http::Extensions) -> Option<SocketAddr> {
    req.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
