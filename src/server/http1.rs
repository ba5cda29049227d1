//! Our own HTTP/1.1 front, for the bodiless GETs browsers send (the public
//! listener) and for the notifies delivery agents send (the internal one).
//!
//! Why it exists: hyper keeps an 8 KiB read buffer per connection and reads
//! ahead into it while a request is in flight, and neither is configurable.
//! A held poll is in flight for up to the hold (~110 s), so with tens of
//! thousands of them those buffers were most of the server's memory. Here the
//! request head is read into a small buffer that grows only as needed, the
//! request is built from copies of its parts, and the buffer is freed before
//! the router is called: while a poll is held its connection owns no buffer.
//! Bytes that arrive meanwhile (a pipelined request) are read only when the
//! socket is readable, into a `Vec` sized to them.
//!
//! On the internal listener a request for its direct route (a notify) may
//! have a body, if the whole of it came with the head: a delivery agent
//! writes a small notify in one piece, and through hyper a notify at 1,000
//! a second cost the server 158 µs of CPU against 146 here
//! (`docs/BENCHMARKS.md`). A body still on its way is hyper's, whose body
//! timeout and `100 Continue` stay as they were.
//!
//! A request that does not fit (another body, an upgrade, anything
//! `httparse` refuses) is handed to hyper with the bytes already read
//! replayed first, and hyper serves the connection from then on: it answers
//! 413, 400 and the like as it always has.
//!
//! While the router's future is pending the socket is watched: a client that
//! closes ends the request at once, which releases its held poll.
//!
//! A poll (`GET /pns/poll`, HTTP/1.1, keep-alive) carries its socket in an
//! [`AnswerSlot`], for its answer to be written where the news is committed;
//! the connection goes on to the next request once it finds it answered.
//!
//! The listener's [`super::DirectRoute`] (the poll on the public listener,
//! the notifies on the internal one) is offered each request before the
//! router: every poll passes here, and the router's dispatch, layers and
//! extractors were a good part of a poll's CPU and most of a held poll's
//! memory.

use super::{AnswerSlot, Answering, Front, Listener};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

/// The head buffer's first size: a browser's poll fits.
const FIRST_READ: usize = 1024;
/// hyper's default cap on the head, for a listener that sets none.
const DEFAULT_MAX_HEAD: usize = 8192 + 4096 * 100;
/// Headers per request at most, as hyper; more go to hyper, which answers 431.
const MAX_HEADERS: usize = 100;
/// Bodies up to this size are sent in the same write as the head.
const ONE_WRITE: usize = 16 * 1024;
/// The largest request body this front reads itself (on the internal
/// listener); a longer one is hyper's. A batch of a few hundred notifies.
const MAX_WHOLE_BODY: usize = 64 * 1024;

/// Serve one connection until it closes.
pub(super) async fn serve(mut stream: TcpStream, peer: SocketAddr, listener: &Listener) {
    let max_head = listener.limits.max_head_bytes.unwrap_or(DEFAULT_MAX_HEAD);
    // Bytes received after the last request's head (pipelining); most often
    // empty, and then unallocated.
    let mut pending = Vec::new();
    // The slot lent with the request in flight, closed before the stream
    // goes (locals are dropped before arguments).
    let mut lent = Lent(None);
    // A delivery agent's requests are marked as in a loop or not
    // (`crate::closed_loop`); browsers' polls need no mark.
    let answers = (listener.front == Front::DirectBodies)
        .then(|| Arc::new(crate::closed_loop::Connection::default()));
    let end = loop {
        // The futures of this loop are boxed while they run, so that what
        // a held poll's task keeps is little more than the socket and the
        // router's future; and the request is moved out of the way at once.
        let (mut call, head_only, version, keep_alive) =
            match Box::pin(read_head(&mut stream, pending, max_head, listener)).await {
                Head::Request {
                    mut req,
                    keep_alive,
                    rest,
                } => {
                    pending = rest;
                    let head_only = req.method() == Method::HEAD;
                    let version = req.version();
                    if keep_alive && answerable(&req) {
                        let slot = Arc::new(AnswerSlot::new(stream.as_raw_fd()));
                        req.extensions_mut().insert(slot.clone());
                        lent.0 = Some(slot);
                    }
                    let call = call(listener, req, peer, answers.as_ref());
                    (call, head_only, version, keep_alive)
                }
                other => break other,
            };
        // Watch the socket while the answer is pending: the hold can last
        // minutes, and a client gone away must release its poll at once.
        // `poll_read_ready` rather than `readable()`: it needs no waiter of
        // its own in this future.
        let mut watching = pending.len() < max_head;
        let slot = lent.0.as_deref();
        let held = std::future::poll_fn(|cx| {
            // Answered elsewhere: the routed future is not polled again,
            // so it answers nothing more (and counts nothing more).
            if let Some(Poll::Ready(rest)) = slot.map(|s| s.poll_answered(cx)) {
                return Poll::Ready(Some(Held::Elsewhere(rest)));
            }
            if let Poll::Ready(r) = call.as_mut().poll(cx) {
                // Answered elsewhere while the router answered too (the
                // hold ending, say): the routed answer, already counted,
                // is dropped.
                if slot.is_some_and(|s| !s.claim()) {
                    if let Some(Poll::Ready(rest)) = slot.map(|s| s.poll_answered(cx)) {
                        return Poll::Ready(Some(Held::Elsewhere(rest)));
                    }
                }
                return Poll::Ready(Some(Held::Routed(r)));
            }
            while watching {
                match stream.poll_read_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(_)) => return Poll::Ready(None),
                    Poll::Ready(Ok(())) => match read_pipelined(&stream, &mut pending) {
                        // Closed: dropping `call` ends the request.
                        Ok(0) => return Poll::Ready(None),
                        // Past the cap the kernel's buffer holds the rest
                        // until the next head is read (and refused).
                        Ok(_) => watching = pending.len() < max_head,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Poll::Ready(None),
                    },
                }
            }
            Poll::Pending
        });
        let response = match held.await {
            Some(Held::Routed(r)) => r,
            Some(Held::Elsewhere(rest)) => {
                drop(call);
                lent.close();
                if !rest.is_empty() && Box::pin(stream.write_all(&rest)).await.is_err() {
                    return;
                }
                continue;
            }
            None => return,
        };
        drop(call);
        lent.close();
        let keep_alive = keep_alive && !listener.shutdown.is_triggered();
        let Ok(keep_alive) = Box::pin(respond(
            &mut stream,
            response,
            head_only,
            version,
            keep_alive,
        ))
        .await
        else {
            return;
        };
        if !keep_alive {
            break Head::Closed;
        }
    };
    lent.close();
    Box::pin(finish(stream, peer, end, listener)).await;
}

/// Whether a request may be answered from elsewhere: a poll, whose answer
/// keeps the connection open and has a body.
fn answerable(req: &Request<Body>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && req.uri().path() == crate::http::POLL_PATH
}

/// How a request in flight ended.
enum Held<R> {
    /// The router answered.
    Routed(R),
    /// The answer went out from elsewhere; the part of it left to write.
    Elsewhere(Vec<u8>),
}

/// The slot lent with the request in flight.
struct Lent(Option<Arc<AnswerSlot>>);

impl Lent {
    fn close(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.close();
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.close();
    }
}

/// A poll's `200` answer, as [`respond`] writes the routed one: the
/// router's headers (`headers`), then the length and the date.
pub fn encode_answer(headers: HeaderMap, body: &[u8]) -> Vec<u8> {
    let mut out = encode(StatusCode::OK, headers, body, false, Connection::Default);
    if body.len() > ONE_WRITE {
        out.extend_from_slice(body);
    }
    out
}

/// Hand `req` to the listener's direct route if it takes it, else to the
/// router, with the peer address as hyper's connections give it; marked
/// with whether it is in a loop when the connection keeps `answers`.
fn call(
    listener: &Listener,
    mut req: Request<Body>,
    peer: SocketAddr,
    answers: Option<&Arc<crate::closed_loop::Connection>>,
) -> Answering {
    let answering: Answering = match listener.direct.as_ref().filter(|d| d.takes(&req)) {
        Some(direct) => direct.answer(req, peer),
        None => {
            req.extensions_mut().insert(ConnectInfo(peer));
            let routing = listener.router.clone().oneshot(req);
            Box::pin(async move {
                match routing.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            })
        }
    };
    match answers {
        Some(answers) => Box::pin(answers.clone().answer(answering)),
        None => answering,
    }
}

/// End a connection whose next request our front does not serve.
async fn finish(mut stream: TcpStream, peer: SocketAddr, end: Head, listener: &Listener) {
    match end {
        Head::Request { .. } | Head::Closed => {}
        Head::TimedOut => write_and_close(&mut stream, StatusCode::REQUEST_TIMEOUT).await,
        Head::TooLarge => {
            write_and_close(&mut stream, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).await
        }
        Head::Misfit(read) => return listener.hyper(Replay::new(read, stream), peer).await,
    }
    let _ = stream.shutdown().await;
}

/// Write `response` (its body collected: ours are small); whether the
/// connection stays open after it.
async fn respond(
    stream: &mut TcpStream,
    response: axum::response::Response,
    head_only: bool,
    version: Version,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "response body failed; closing the connection");
            return Err(io::Error::other("response body failed"));
        }
    };
    let keep_alive = keep_alive && !has_token(&parts.headers, "close");
    let out = encode(
        parts.status,
        parts.headers,
        &body,
        head_only,
        Connection::of(version, keep_alive),
    );
    stream.write_all(&out).await?;
    if !head_only && body.len() > ONE_WRITE {
        stream.write_all(&body).await?;
    }
    Ok(keep_alive)
}

/// What reading a request head came to.
// Short-lived: boxing the request would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// A request our front serves, and the bytes read past its head.
    Request {
        req: Request<Body>,
        keep_alive: bool,
        rest: Vec<u8>,
    },
    /// The client closed, or shutdown came while the connection was idle.
    Closed,
    /// Part of a head came, but not all of it within the header timeout.
    TimedOut,
    /// The head is larger than the listener accepts.
    TooLarge,
    /// A request for hyper; everything read so far.
    Misfit(Vec<u8>),
}

/// Read until a whole request head is in `buf` (which starts with the bytes
/// left from the last request), within the header timeout.
async fn read_head(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    max_head: usize,
    listener: &Listener,
) -> Head {
    let deadline = Instant::now() + listener.limits.header_timeout;
    loop {
        if !buf.is_empty() {
            match parse(&buf) {
                Parsed::Partial => {}
                Parsed::Misfit => return Head::Misfit(buf),
                Parsed::Request {
                    mut req,
                    keep_alive,
                    used,
                    body,
                } => {
                    let mut end = used;
                    if body > 0 {
                        if !takes_body(listener, &req, body)
                            || !read_body(stream, &mut buf, used + body)
                        {
                            return Head::Misfit(buf);
                        }
                        end += body;
                        *req.body_mut() = Body::from(buf[used..end].to_vec());
                    }
                    // The buffer is dropped here; only what follows the
                    // request (usually nothing) is kept, in a Vec of its size.
                    let rest = buf[end..].to_vec();
                    return Head::Request {
                        req,
                        keep_alive,
                        rest,
                    };
                }
            }
            if buf.len() >= max_head {
                return Head::TooLarge;
            }
        }
        // An idle connection closes on shutdown; one with part of a head
        // gets to finish it (and its answer closes the connection).
        let idle = buf.is_empty();
        tokio::select! {
            ready = stream.readable() => if ready.is_err() {
                return Head::Closed;
            },
            _ = tokio::time::sleep_until(deadline) => {
                return if idle { Head::Closed } else { Head::TimedOut };
            }
            _ = listener.shutdown.wait(), if idle => return Head::Closed,
        }
        // Only now, with bytes to read, is there a buffer.
        if buf.len() == buf.capacity() {
            let grown = (buf.capacity() * 2).clamp(FIRST_READ, max_head);
            buf.reserve_exact(grown.saturating_sub(buf.len()).max(1));
        }
        match read_available(stream, &mut buf) {
            Ok(0) => return Head::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Head::Closed,
        }
    }
}

/// Whether this front reads the `length` bytes of `req`'s body itself: a
/// request for the direct route of a listener whose front takes bodies.
fn takes_body(listener: &Listener, req: &Request<Body>, length: usize) -> bool {
    listener.front == Front::DirectBodies
        && length <= MAX_WHOLE_BODY
        && listener.direct.as_ref().is_some_and(|d| d.takes(req))
}

/// Whether `buf` holds `len` bytes, after at most one read of what the
/// socket already has: a body still on its way is hyper's, which waits for
/// it within the body timeout.
fn read_body(stream: &TcpStream, buf: &mut Vec<u8>, len: usize) -> bool {
    if buf.len() >= len {
        return true;
    }
    buf.reserve_exact(len - buf.len());
    let _ = read_available(stream, buf);
    buf.len() >= len
}

/// Read what the socket has into `buf`'s spare room. `Ok(0)`: the client
/// closed.
fn read_available(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if n > 0 && n < room {
        drained(stream);
    }
    Ok(n)
}

/// A read that did not fill its buffer took all the socket had: forget the
/// socket's readiness, as tokio's own `poll_read` does after a short read,
/// so that the next look at the socket waits for the kernel to announce
/// more instead of reading once more to learn there is nothing. The next
/// poll's head, or the client closing, is announced.
fn drained(stream: &TcpStream) {
    let _ = stream.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
    });
}

/// Read what a readable socket has into `pending`, through a stack buffer so
/// that nothing is allocated unless bytes came. `Ok(0)`: the client closed.
fn read_pipelined(stream: &TcpStream, pending: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 1024];
    let n = stream.try_read(&mut chunk)?;
    pending.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[allow(clippy::large_enum_variant)] // short-lived, like `Head`
enum Parsed {
    Partial,
    Misfit,
    Request {
        req: Request<Body>,
        keep_alive: bool,
        /// The length of the head in the buffer.
        used: usize,
        /// The body's announced length, which follows the head (0: none).
        body: usize,
    },
}

/// Parse a request head. Every part of the request is copied out of `buf`,
/// so the buffer can go before the request is served.
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let used = match head.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Let hyper give its own answer (400, 431).
        Err(_) => return Parsed::Misfit,
    };
    let (Some(method), Some(target), Some(version)) = (head.method, head.path, head.version) else {
        return Parsed::Misfit;
    };
    let version = match version {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return Parsed::Misfit,
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Misfit;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Misfit;
    };
    if method == Method::CONNECT {
        return Parsed::Misfit;
    }
    let mut map = HeaderMap::with_capacity(head.headers.len());
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Misfit;
        };
        map.append(name, value);
    }
    let Some(body) = body_length(&map) else {
        return Parsed::Misfit;
    };
    if map.contains_key(header::UPGRADE) {
        return Parsed::Misfit;
    }
    let keep_alive = match version {
        Version::HTTP_11 => !has_token(&map, "close"),
        _ => has_token(&map, "keep-alive"),
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    Parsed::Request {
        req,
        keep_alive,
        used,
        body,
    }
}

/// The length of a request's body, when it is plain: at most one
/// Content-Length, all digits, and no Transfer-Encoding; and no `Expect`
/// with a body, whose `100 Continue` is hyper's to send. Hyper judges
/// anything else (`None`).
fn body_length(headers: &HeaderMap) -> Option<usize> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => {
            let digits = v.as_bytes().trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(digits).ok()?.parse().ok()?
        }
        (Some(_), Some(_)) => return None,
    };
    if length > 0 && headers.contains_key(header::EXPECT) {
        return None;
    }
    Some(length)
}

/// Whether the Connection header lists `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the answer says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    /// HTTP/1.1 keep-alive: nothing to say.
    Default,
    /// An HTTP/1.0 client asked to keep the connection.
    KeepAlive,
    Close,
}

impl Connection {
    fn of(version: Version, keep_alive: bool) -> Connection {
        match (keep_alive, version) {
            (false, _) => Connection::Close,
            (true, Version::HTTP_10) => Connection::KeepAlive,
            (true, _) => Connection::Default,
        }
    }

    /// Its header line, if it needs one.
    fn write(self, out: &mut Vec<u8>) {
        match self {
            Connection::Default => {}
            Connection::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
            Connection::Close => out.extend_from_slice(b"connection: close\r\n"),
        }
    }
}

/// The response head, and the body after it unless it is long (then the
/// caller writes it on its own) or the request was HEAD.
fn encode(
    status: StatusCode,
    mut headers: HeaderMap,
    body: &[u8],
    head_only: bool,
    connection: Connection,
) -> Vec<u8> {
    // Framing is ours to say: the body is whole in memory.
    let routed_length = headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    let inline = !head_only && body.len() <= ONE_WRITE;
    let mut out =
        Vec::with_capacity(160 + headers.len() * 48 + if inline { body.len() } else { 0 });
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // What the answer says about the connection goes where the router put
    // its Connection header, as hyper writes it, or else after the length.
    let mut connection = Some(connection);
    for (name, value) in &headers {
        if name == header::CONNECTION {
            if let Some(c) = connection.take() {
                c.write(&mut out);
            }
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless_status {
        if head_only {
            // The router strips a HEAD answer's body and keeps the length
            // a GET would have had, if it knew it.
            if let Some(length) = routed_length {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(length.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(c) = connection {
        c.write(&mut out);
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if inline && !bodiless_status {
        out.extend_from_slice(body);
    }
    out
}

/// Answer `status` with no body, before closing, as hyper does for a head
/// it refuses.
async fn write_and_close(stream: &mut TcpStream, status: StatusCode) {
    let out = encode(status, HeaderMap::new(), &[], false, Connection::Close);
    let _ = stream.write_all(&out).await;
}

thread_local! {
    /// The Date header of the current second, formatted once a second per
    /// worker thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn with_date(f: impl FnOnce(&str)) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        f(&cached.1);
    });
}

/// The bytes read before a request was found not to fit, replayed to hyper
/// before the rest of the stream.
struct Replay {
    read: Vec<u8>,
    at: usize,
    stream: TcpStream,
}

impl Replay {
    fn new(read: Vec<u8>, stream: TcpStream) -> Replay {
        Replay {
            read,
            at: 0,
            stream,
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.read.len() {
            let n = (this.read.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(buf: &[u8]) -> (Request<Body>, bool, usize) {
        match parse(buf) {
            Parsed::Request {
                req,
                keep_alive,
                used,
                body: 0,
            } => (req, keep_alive, used),
            Parsed::Request { body, .. } => panic!("a body of {body}"),
            Parsed::Partial => panic!("partial"),
            Parsed::Misfit => panic!("misfit"),
        }
    }

    #[test]
    fn a_bodiless_get_is_parsed_with_its_headers_and_length() {
        let raw = b"GET /pns/poll?timeout=5 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /";
        let (req, keep_alive, used) = request(raw);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/pns/poll");
        assert_eq!(req.uri().query(), Some("timeout=5"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert!(keep_alive);
        assert_eq!(&raw[used..], b"GET /");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        let (_, k, _) = request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!k);
        let (_, k, _) = request(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!k);
        let (_, k, _) = request(b"GET / HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n");
        assert!(k);
    }

    #[test]
    fn odd_bodies_upgrades_and_garbage_go_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET\x01 / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Parsed::Misfit), "{raw:?}");
        }
        for raw in [
            &b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Parsed::Request { body: 0, .. }));
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHo"), Parsed::Partial));
    }

    #[test]
    fn a_plain_body_is_announced_after_the_head() {
        let raw = b"PUT /n HTTP/1.1\r\nContent-Length:  3 \r\n\r\nabcGET";
        let Parsed::Request { used, body, .. } = parse(raw) else {
            panic!("not parsed");
        };
        assert_eq!(
            (&raw[used..used + body], &raw[used + body..]),
            (&b"abc"[..], &b"GET"[..])
        );
    }

    #[test]
    fn an_answer_has_its_length_date_and_connection() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let out = encode(StatusCode::OK, headers, b"hello", false, Connection::Close);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-type: text/plain\r\n"), "{text}");
        assert!(text.contains("content-length: 5\r\n"), "{text}");
        assert_eq!(text.matches("connection:").count(), 1, "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
    }

    #[test]
    fn the_connection_header_stays_where_the_router_put_it() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let out = encode(StatusCode::OK, headers, b"", false, Connection::Close);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").take(5).collect();
        assert_eq!(
            lines,
            [
                "HTTP/1.1 200 OK",
                "content-type: a/b",
                "connection: close",
                "cache-control: no-store",
                "content-length: 0"
            ]
        );
    }

    #[test]
    fn a_head_answer_has_no_body_and_keeps_the_routed_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("15"));
        let out = encode(StatusCode::OK, headers, b"", true, Connection::KeepAlive);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("content-length: 15\r\n"), "{text}");
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn a_long_body_is_left_to_a_write_of_its_own() {
        let body = vec![b'x'; ONE_WRITE + 1];
        let out = encode(
            StatusCode::OK,
            HeaderMap::new(),
            &body,
            false,
            Connection::Default,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        assert!(text.ends_with("\r\n\r\n"));
        assert!(!text.contains("connection"));
    }
}
