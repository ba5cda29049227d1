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
use tokio::net::TcpStream;
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

/// Serve `router` on `listeners` until `shutdown`, then drain, with
/// `direct` served before the router.
pub async fn serve(
    listeners: Listeners,
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
    let accepting = futures_util::future::join_all(
        listeners
            .0
            .into_iter()
            .map(move |listener| accepting.clone().run(listener)),
    )
    .map(drop);
    // The public listener accepts on a thread of its own (see
    // crate::threads); its connections still run on this runtime.
    if front == Front::Bodiless {
        match crate::threads::spawn("pns-accept", accepting) {
            Ok(done) => done.await,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot start accepting; stopping");
                shutdown.trigger();
            }
        }
    } else {
        accepting.await;
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

/// The accept loop of one listening socket.
#[derive(Clone)]
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

/// Connections the kernel queues for `accept` at most, per listening
/// socket (it caps this at `net.core.somaxconn`). tokio's default, 1,024,
/// overflowed when 19,000 clients connected at once (as after a restart):
/// each connection dropped from a full queue waits a second for its SYN to
/// be sent again.
pub const LISTEN_BACKLOG: u32 = 16_384;

/// The most sockets [`bind_spread`] opens on one address.
const MAX_SPREAD: usize = 16;

/// How long the kernel keeps a connection that has sent nothing from
/// `accept` (`TCP_DEFER_ACCEPT`), in seconds; past it (Linux rounds it up
/// to its handshake's retransmissions: about 7 s), the connection is
/// accepted anyway and its head waits out the header timeout.
pub const DEFER_ACCEPT_SECS: libc::c_int = 5;

/// The listening sockets of one address: one, or several sharing its port.
#[derive(Debug)]
pub struct Listeners(Vec<std::net::TcpListener>);

impl Listeners {
    /// The address listened on, its port resolved.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0
            .first()
            .ok_or_else(|| std::io::Error::other("no listening socket"))?
            .local_addr()
    }

    /// How many sockets listen.
    pub fn sockets(&self) -> usize {
        self.0.len()
    }
}

/// Listen on `addr` with one socket and a backlog of [`LISTEN_BACKLOG`],
/// as far as `net.core.somaxconn` allows.
pub fn bind(addr: SocketAddr) -> std::io::Result<Listeners> {
    Ok(Listeners(vec![listen(addr, false)?]))
}

/// Listen on `addr` with as many sockets sharing its port (`SO_REUSEPORT`)
/// as it takes for the kernel to queue `connections` at once (up to
/// [`MAX_SPREAD`] sockets): it caps each socket's queue at
/// `net.core.somaxconn` (4,096 by default), and spreads new connections
/// over the sockets by their addresses, as it does for nginx's `listen ...
/// reuseport`. A second node on the same address is still refused, as
/// with one socket.
pub fn bind_spread(addr: SocketAddr, connections: usize) -> std::io::Result<Listeners> {
    let sockets = connections.div_ceil(socket_queue()).clamp(1, MAX_SPREAD);
    if sockets == 1 {
        return bind(addr);
    }
    // Sockets that share a port let any other that asks share it too (of
    // the same user): a node started twice would split the connections
    // with the first. A socket that does not share is refused while a
    // node listens, which settles the port, zero included, beforehand.
    let addr = {
        let probe = new_socket(addr)?;
        probe.bind(addr)?;
        probe.local_addr()?
    };
    (0..sockets)
        .map(|_| listen(addr, true))
        .collect::<std::io::Result<_>>()
        .map(Listeners)
}

/// The connections the kernel queues for one listening socket: as many as
/// it asks for, up to `net.core.somaxconn` (its default since Linux 5.4
/// where that cannot be read).
fn socket_queue() -> usize {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    somaxconn.clamp(1, LISTEN_BACKLOG) as usize
}

fn new_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's own bind: a restarted node need not wait for the
    // old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// A socket listening on `addr`, sharing its port if `shared`.
fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuseport(shared)?;
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
    socket.listen(LISTEN_BACKLOG)?.into_std()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Room for more connections than one socket's queue holds takes
    /// several sockets on one port, and the kernel hands each of them some
    /// of the connections; another listener on that port is refused, with
    /// its port shared or not.
    #[tokio::test]
    async fn a_spread_listener_shares_its_port_among_its_own_sockets_only() {
        let queue = socket_queue();
        let listeners =
            bind_spread(SocketAddr::from(([127, 0, 0, 1], 0)), 2 * queue + 1).expect("listening");
        assert_eq!(listeners.sockets(), 3);
        let addr = listeners.local_addr().expect("its address");
        assert_ne!(addr.port(), 0);
        for socket in &listeners.0 {
            assert_eq!(socket.local_addr().expect("its address"), addr);
        }

        let clients: Vec<std::net::TcpStream> = (0..64)
            .map(|_| {
                let mut client = std::net::TcpStream::connect(addr).expect("connected");
                // Accepted only once it has sent something (TCP_DEFER_ACCEPT).
                client.write_all(b"G").expect("sent");
                client
            })
            .collect();
        let mut accepted = vec![0; listeners.sockets()];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while accepted.iter().sum::<usize>() < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "accepted {accepted:?} of {}",
                clients.len()
            );
            for (socket, count) in listeners.0.iter().zip(&mut accepted) {
                while socket.accept().is_ok() {
                    *count += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            accepted.iter().all(|&n| n > 0),
            "a socket got no connection: {accepted:?}"
        );

        for again in [bind_spread(addr, 2 * queue + 1), bind(addr)] {
            let refused = again.expect_err("a second listener on the same port");
            assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse, "{refused}");
        }
    }

    /// No more room than one socket's queue holds: one socket, not shared.
    #[tokio::test]
    async fn a_listener_for_few_connections_is_one_socket() {
        let listeners = bind_spread(SocketAddr::from(([127, 0, 0, 1], 0)), 100).expect("listening");
        assert_eq!(listeners.sockets(), 1);
    }
}
