//! One HTTP/1.1 keep-alive connection, opened from a chosen loopback source
//! address. Binding each client socket to its own 127.x.y.z before connecting
//! gives every source address its own ~28,000 ephemeral ports, so tens of
//! thousands of connections to one server port never run out of them.
//!
//! The client is the least HTTP/1.1 the tool needs: one request at a time,
//! written whole, and the answer read in the same task. The tool shares the
//! machine's two cores with the server it measures, so every microsecond it
//! spends on a poll or a notify is one the server does not get: a general
//! client (hyper's, which the tool used first) runs each connection as a
//! task of its own and hands requests and answers to it over channels, and
//! kept about 21 KiB per held poll.

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses one target spreads its clients over.
const SOURCE_ADDRESSES: u32 = 1000;
/// Headers an answer may carry.
const MAX_HEADERS: usize = 32;
/// What the read buffer starts with, and grows by: a poll's answer fits.
const READ_CHUNK: usize = 1024;
/// The longest answer head the client reads.
const MAX_HEAD: usize = 64 * 1024;

/// The source address of client `index` of a target whose addresses start
/// with `127.<octet>.`.
pub fn source_addr(octet: u8, index: u32) -> Ipv4Addr {
    let i = index % SOURCE_ADDRESSES;
    Ipv4Addr::new(127, octet, (i / 250) as u8, (i % 250 + 1) as u8)
}

pub struct Conn {
    stream: TcpStream,
    /// Read from the socket and not yet part of an answer.
    read: BytesMut,
    host: String,
    /// The server said it closes the connection after its last answer, or
    /// an exchange failed.
    closing: bool,
}

/// An answer read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Conn {
    /// Connect from `source` (port chosen by the kernel) to `server`.
    pub async fn open(source: Ipv4Addr, server: SocketAddr) -> anyhow::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        // Closed with a reset, as a worker's thousands are when it quits:
        // a closing handshake would leave each in TIME_WAIT for a minute on
        // its source address, which the next round of the same target binds
        // again; that round's ramp ran slower, on both sides
        // (docs/benchmarks/NOTES.md, ³⁹).
        socket.set_linger(Some(Duration::ZERO))?;
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
            .with_context(|| format!("cannot bind a client socket to {source}"))?;
        let stream = socket
            .connect(server)
            .await
            .with_context(|| format!("cannot connect to {server} from {source}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            read: BytesMut::new(),
            host: server.to_string(),
            closing: false,
        })
    }

    /// `GET path` and the number on the first line of the answer that
    /// starts with `prefix`: how a server's status page says how many polls
    /// it holds.
    pub async fn count_in(
        &mut self,
        path: &str,
        prefix: &str,
        limit: Duration,
    ) -> anyhow::Result<u64> {
        let reply = self
            .request(Method::GET, path, &[], Bytes::new(), limit)
            .await?;
        if reply.status != StatusCode::OK {
            anyhow::bail!("{path} answered {}", reply.status);
        }
        String::from_utf8_lossy(&reply.body)
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("{path} has no {prefix:?} line"))
    }

    /// Send one request and read the whole answer, giving up after `limit`.
    pub async fn request(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        limit: Duration,
    ) -> anyhow::Result<Reply> {
        if self.closing {
            bail!("the connection ended with its last answer, or failed");
        }
        let request = encode(&method, path_and_query, &self.host, headers, &body);
        let exchange = async {
            self.stream.write_all(&request).await?;
            self.read_answer(method == Method::HEAD).await
        };
        let answered = match tokio::time::timeout(limit, exchange).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within {limit:?}")),
        };
        // After a failure the stream may hold part of an answer: nothing
        // more is read from it, so no later request takes that for its own.
        if answered.is_err() {
            self.closing = true;
        }
        answered
    }

    /// Read one answer: its head, then a body framed as the head says.
    async fn read_answer(&mut self, to_head: bool) -> anyhow::Result<Reply> {
        let (status, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut answer = httparse::Response::new(&mut slots);
            match answer
                .parse(&self.read)
                .context("the answer is not HTTP/1.1")?
            {
                httparse::Status::Complete(len) => {
                    let status = StatusCode::from_u16(answer.code.unwrap_or_default())
                        .context("the answer's status is not a number")?;
                    let mut headers = HeaderMap::with_capacity(answer.headers.len());
                    for h in answer.headers.iter() {
                        headers.append(
                            HeaderName::from_bytes(h.name.as_bytes())?,
                            HeaderValue::from_bytes(h.value)?,
                        );
                    }
                    break (status, headers, len);
                }
                httparse::Status::Partial if self.read.len() >= MAX_HEAD => {
                    bail!("the answer's head is longer than {MAX_HEAD} bytes")
                }
                httparse::Status::Partial => self.fill().await?,
            }
        };
        self.read.advance(head_len);
        self.closing = headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let bodiless = to_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let chunked = headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let body = if bodiless {
            Bytes::new()
        } else if chunked {
            self.read_chunked().await?
        } else if let Some(len) = headers.get(http::header::CONTENT_LENGTH) {
            let len: usize = std::str::from_utf8(len.as_bytes())
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .context("the answer's content-length is not a number")?;
            self.read_exactly(len).await?
        } else {
            // Framed by the end of the connection.
            self.closing = true;
            while self.fill_or_end().await? {}
            self.read.split().freeze()
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// The next `len` bytes.
    async fn read_exactly(&mut self, len: usize) -> anyhow::Result<Bytes> {
        while self.read.len() < len {
            self.fill().await?;
        }
        Ok(self.read.split_to(len).freeze())
    }

    /// A chunked body, its chunks joined.
    async fn read_chunked(&mut self) -> anyhow::Result<Bytes> {
        let mut body = BytesMut::new();
        loop {
            let line = self.read_line().await?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .context("a chunk's size is not hexadecimal")?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body.freeze());
            }
            body.extend_from_slice(&self.read_exactly(size).await?);
            if !self.read_line().await?.is_empty() {
                bail!("a chunk is longer than its size");
            }
        }
    }

    /// One line, without its CRLF.
    async fn read_line(&mut self) -> anyhow::Result<Bytes> {
        loop {
            if let Some(at) = self.read.windows(2).position(|w| w == b"\r\n") {
                let line = self.read.split_to(at).freeze();
                self.read.advance(2);
                return Ok(line);
            }
            if self.read.len() >= MAX_HEAD {
                bail!("a chunk line is longer than {MAX_HEAD} bytes");
            }
            self.fill().await?;
        }
    }

    /// Read more, or fail if the server closed the connection.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.fill_or_end().await? {
            Ok(())
        } else {
            self.closing = true;
            bail!("the server closed the connection before its answer ended")
        }
    }

    /// Read more: false at the end of the connection.
    async fn fill_or_end(&mut self) -> anyhow::Result<bool> {
        self.read.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(&mut self.read).await? > 0)
    }
}

/// A request's bytes: its line, `host`, `headers`, the body's length if it
/// has one, and the body.
fn encode(
    method: &Method,
    path_and_query: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + path_and_query.len() + body.len());
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "{method} {path_and_query} HTTP/1.1\r\nhost: {host}\r\n"
    );
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if !body.is_empty() || *method == Method::POST || *method == Method::PUT {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that reads one request per answer in `answers` and writes
    /// the answer back, split in two writes to test reading in parts; the
    /// requests it read.
    async fn serve(answers: Vec<&'static [u8]>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                    if n == 0 || seen.ends_with(b"\r\n\r\n") || seen.ends_with(b"}") {
                        break;
                    }
                }
                let (a, b) = answer.split_at(answer.len() / 2);
                s.write_all(a).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.write_all(b).await.unwrap();
            }
            String::from_utf8(seen).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn answers_framed_each_way_are_read_whole_on_one_connection() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nEtag: 7\r\n\r\nhello",
            b"HTTP/1.1 304 Not Modified\r\nEtag: 7\r\n\r\n",
            b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end",
        ])
        .await;
        let mut conn = Conn::open(Ipv4Addr::LOCALHOST, addr).await.unwrap();
        let limit = Duration::from_secs(10);
        let get = |path| (Method::GET, path, Bytes::new());
        let mut replies = Vec::new();
        for (method, path, body) in [
            get("/a?x=1"),
            get("/b"),
            (Method::POST, "/c", Bytes::from_static(b"{}")),
            get("/d"),
        ] {
            let headers = [("if-none-match", "7")];
            replies.push(
                conn.request(method, path, &headers, body, limit)
                    .await
                    .unwrap(),
            );
        }
        let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
        assert_eq!(statuses, [200, 304, 202, 200]);
        let bodies: Vec<&[u8]> = replies.iter().map(|r| &r.body[..]).collect();
        assert_eq!(bodies, [&b"hello"[..], b"", b"abcde", b"to the end"]);
        assert_eq!(replies[0].headers.get("etag").unwrap(), "7");
        let err = conn
            .request(Method::GET, "/e", &[], Bytes::new(), limit)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("ended"), "{err}");

        let seen = server.await.unwrap();
        assert!(
            seen.starts_with(&format!(
                "GET /a?x=1 HTTP/1.1\r\nhost: {addr}\r\nif-none-match: 7\r\n\r\n"
            )),
            "{seen}"
        );
        assert!(seen.contains("POST /c HTTP/1.1\r\n"), "{seen}");
        assert!(seen.contains("content-length: 2\r\n\r\n{}"), "{seen}");
        let get_b = seen
            .split("GET /b")
            .nth(1)
            .unwrap()
            .split("\r\n\r\n")
            .next()
            .unwrap();
        assert!(!get_b.contains("content-length"), "{seen}");
    }

    /// An answer that comes after the request gave up is never taken for
    /// the next request's.
    #[tokio::test]
    async fn a_connection_is_not_used_after_an_answer_came_too_late() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let late = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate";
            s.write_all(late).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut conn = Conn::open(Ipv4Addr::LOCALHOST, addr).await.unwrap();
        let first = conn
            .request(
                Method::GET,
                "/",
                &[],
                Bytes::new(),
                Duration::from_millis(50),
            )
            .await
            .err()
            .unwrap();
        assert!(first.to_string().contains("no answer within"), "{first}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = conn
            .request(Method::GET, "/", &[], Bytes::new(), Duration::from_secs(10))
            .await;
        assert!(
            second.is_err(),
            "took the late answer: {:?}",
            second.map(|r| r.body)
        );
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error() {
        let (addr, _server) =
            serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort"]).await;
        let mut conn = Conn::open(Ipv4Addr::LOCALHOST, addr).await.unwrap();
        let err = conn
            .request(Method::GET, "/", &[], Bytes::new(), Duration::from_secs(10))
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("closed the connection before"),
            "{err}"
        );
    }
}
