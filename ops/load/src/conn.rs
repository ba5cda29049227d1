//! One HTTP/1.1 keep-alive connection, opened from a chosen loopback source
//! address. Binding each client socket to its own 127.x.y.z before connecting
//! gives every source address its own ~28,000 ephemeral ports, so tens of
//! thousands of connections to one server port never run out of them.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::net::TcpSocket;

/// Source addresses one target spreads its clients over.
const SOURCE_ADDRESSES: u32 = 1000;

/// The source address of client `index` of a target whose addresses start
/// with `127.<octet>.`.
pub fn source_addr(octet: u8, index: u32) -> Ipv4Addr {
    let i = index % SOURCE_ADDRESSES;
    Ipv4Addr::new(127, octet, (i / 250) as u8, (i % 250 + 1) as u8)
}

pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    host: String,
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
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
            .with_context(|| format!("cannot bind a client socket to {source}"))?;
        let stream = socket
            .connect(server)
            .await
            .with_context(|| format!("cannot connect to {server} from {source}"))?;
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        // Ends when `send` is dropped or the server closes.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            send,
            host: server.to_string(),
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
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, &self.host);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder.body(Full::new(body))?;
        let exchange = async {
            self.send.ready().await?;
            let resp = self.send.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(r) => Ok(r?),
            Err(_) => anyhow::bail!("no answer within {limit:?}"),
        }
    }
}
