//! The accept loop both listeners run: HTTP/1.1 connections with a header
//! read timeout against slow clients (request bodies have their own timeout,
//! in [`crate::http`]), a cap on the request head, a cap on open
//! connections, the peer address in each request's extensions, and a
//! graceful drain.
//!
//! Both listeners run our own small front ([`http1`]): the public one for
//! the requests browsers send, so that a held poll owns no read buffer; the
//! internal one also for the notifies delivery agents send, which it
//! answers with less work than hyper. Each hands anything else to hyper.

mod accept;
mod answer_slot;
mod http1;

pub use answer_slot::AnswerSlot;
pub use http1::encode_answer;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use axum::Router;
use futures_util::future::{Either, FutureExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// How long the drain waits for requests in flight at most.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The public listener's cap on a request head (request line and headers);
/// answered with 431 past it. Browsers' polls are far smaller.
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

/// What our own front ([`http1`]) serves on a listener; hyper serves the
/// rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// Bodiless requests: browsers' polls. The public listener's, which
    /// accepts on a thread of its own (see [`crate::threads`]).
    Bodiless,
    /// Bodiless requests, and the direct route's requests whose whole body
    /// came with their head: delivery agents' notifies. The internal
    /// listener's.
    DirectBodies,
}

/// A request a listener answers without its router: the poll on the public
/// listener, the notifies (the API's and Dovecot's) on the internal one, each
/// on every message's path.
/// Its answer must be the router's, byte for byte; what it saves is the
/// router's dispatch, layers and extractors.
pub trait DirectRoute: Send + Sync + 'static {
    /// Whether this route answers `req` (else the router does).
    fn takes(&self, req: &Request<Body>) -> bool;
    /// The future of the answer to `req`, one this route takes.
    fn answer(&self, req: Request<Body>, peer: SocketAddr) -> Answering;
}

/// The future of a request's answer.
pub type Answering = Pin<Box<dyn Future<Output = Response> + Send>>;

/// What every connection of one listener shares.
struct Listener {
    router: Router,
    /// Served before the router, if set.
    direct: Option<Arc<dyn DirectRoute>>,
    front: Front,
    builder: hyper::server::conn::http1::Builder,
    limits: ConnLimits,
    shutdown: Shutdown,
}

impl Listener {
    /// Serve a connection with hyper until it closes; on shutdown, let the
    /// request in flight finish and close.
    async fn hyper<I>(&self, io: I, peer: SocketAddr)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let direct = self.direct.clone();
        let answers = Arc::new(crate::closed_loop::Connection::default());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(Body::new);
            let answering = match direct.as_ref().filter(|d| d.takes(&req)) {
                Some(direct) => Either::Left(direct.answer(req, peer).map(Ok)),
                None => {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    Either::Right(router.clone().oneshot(req))
                }
            };
            answers.clone().answer(answering)
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = self.shutdown.wait() => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

/// Serve `router` on `listener` until `shutdown`, then drain, with `direct`
/// served before the router.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    direct: Option<Arc<dyn DirectRoute>>,
    limits: ConnLimits,
    front: Front,
    shutdown: Shutdown,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    if let Some(max) = limits.max_head_bytes {
        // hyper refuses (panics on) a buffer below its own minimum.
        builder.max_buf_size(max.max(8192));
    }
    let shared = Arc::new(Listener {
        router,
        direct,
        front,
        builder,
        limits,
        shutdown: shutdown.clone(),
    });
    let connections = TaskTracker::new();
    let accepting = Accepting {
        shared,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        connections: connections.clone(),
        connections_run_on: tokio::runtime::Handle::current(),
    };
    // The public listener accepts on a thread of its own (see
    // crate::threads); its connections still run on this runtime.
    match listener.into_std() {
        Ok(listener) if front == Front::Bodiless => {
            match crate::threads::spawn("pns-accept", accepting.run(listener)) {
                Ok(done) => done.await,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot start accepting; stopping");
                    shutdown.trigger();
                }
            }
        }
        Ok(listener) => accepting.run(listener).await,
        Err(e) => {
            tracing::error!(error = %e, "cannot take over the listening socket; stopping");
            shutdown.trigger();
        }
    }
    // Each connection watches `shutdown` itself: idle ones close, requests
    // in flight finish and their answers close the connection.
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
    }
}

/// The accept loop of one listener.
struct Accepting {
    shared: Arc<Listener>,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    connections_run_on: tokio::runtime::Handle,
}

impl Accepting {
    /// Accept until shutdown, spawning each connection on the main runtime.
    async fn run(self, listener: std::net::TcpListener) {
        let shutdown = self.shared.shutdown.clone();
        let listener = match AsyncFd::with_interest(listener, Interest::READABLE) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept on the listening socket; stopping");
                shutdown.trigger();
                return;
            }
        };
        loop {
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.wait() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = accept::accept(&listener) => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors or memory: back off instead
                        // of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.wait() => break,
            };
            let shared = self.shared.clone();
            self.connections.spawn_on(
                async move {
                    // It registers with the reactor of the runtime it runs on.
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        http1::serve(stream, peer, &shared).await;
                    }
                    drop(permit);
                },
                &self.connections_run_on,
            );
        }
    }
}

/// Connections the kernel queues for `accept` at most, per listener (it caps
/// this at `net.core.somaxconn`). tokio's default, 1,024, overflowed when
/// 19,000 clients connected at once (as after a restart): each connection
/// dropped from a full queue waits a second for its SYN to be sent again.
pub const LISTEN_BACKLOG: u32 = 16_384;

/// How long the kernel keeps a connection that has sent nothing from
/// `accept` (`TCP_DEFER_ACCEPT`), in seconds; past it (Linux rounds it up
/// to its handshake's retransmissions: about 7 s), the connection is
/// accepted anyway and its head waits out the header timeout.
pub const DEFER_ACCEPT_SECS: libc::c_int = 5;

/// Listen on `addr` with a backlog of [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's own bind: a restarted node need not wait for the
    // old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    // Every connection accepted inherits it: an answer goes out at once,
    // not held back until the client acknowledges the last one.
    socket.set_nodelay(true)?;
    // A connection comes to `accept` with its first request already there,
    // as browsers send it as soon as they connect: the server is woken once
    // for it, not once for the handshake and again for the request, and a
    // client that connects and stays silent holds no descriptor meanwhile
    // (nginx's `listen ... deferred`).
    set_int_option(
        &socket,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        DEFER_ACCEPT_SECS,
    )?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&value`,
    // which lives across the call.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The address a request came from.
pub fn peer(req: &axum::http::Extensions) -> Option<SocketAddr> {
    req.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
