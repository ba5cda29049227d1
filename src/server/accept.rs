//! Taking a connection from a listener in one system call, ready to be
//! handed to another runtime.
//!
//! tokio's `TcpListener::accept` registers each new socket with the
//! accepting thread's reactor, and the connection then runs on another
//! runtime, so handing it over took a second `epoll_ctl` to unregister it
//! before the one that registers it where it runs. Its socket was also
//! made `TCP_NODELAY` one call at a time. Here the listener is watched for
//! readiness alone, `accept4` makes the socket non-blocking and
//! close-on-exec, and `TCP_NODELAY`, set once on the listening socket
//! ([`super::bind`]), is inherited by every connection Linux accepts from it.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd};
use tokio::io::unix::AsyncFd;

/// The next connection on `listener` (non-blocking), and its peer. A
/// connection that failed on its way in is passed over; the error returned
/// is the listener's (out of descriptors or memory, say).
pub async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        // A would-block clears the readiness and waits again; any other
        // outcome keeps it, so a backlog of connections is taken without
        // asking the reactor between them.
        match ready.try_io(|listener| accept_now(listener.get_ref())) {
            Ok(Err(e)) if of_that_connection_only(&e) => {
                tracing::debug!(error = %e, "a connection failed before it was accepted");
            }
            Ok(accepted) => return accepted,
            Err(_would_block) => {}
        }
    }
}

/// Whether `e`, from `accept4`, concerns only the connection it was
/// taking: Linux passes a connection's pending network error on through
/// `accept`, and the next connection may well be fine (accept(2) asks to
/// treat these as "try again"; EPERM is a firewall refusing that one).
fn of_that_connection_only(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::EOPNOTSUPP
                | libc::EPERM
        )
    )
}

fn accept_now(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut peer: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `peer` and `len` are ours and `len` says how big `peer` is.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut peer).cast::<libc::sockaddr>(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 gave us this descriptor, which nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    Ok((stream, socket_addr(&peer)?))
}

/// The address in `storage`, as `accept4` filled it for a TCP socket.
fn socket_addr(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    let storage: *const libc::sockaddr_storage = storage;
    // SAFETY: every sockaddr starts with its family.
    match i32::from(unsafe { (*storage).ss_family }) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in, which fits.
            let v4 = unsafe { &*storage.cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6, which fits.
            let v6 = unsafe { &*storage.cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        family => Err(io::Error::other(format!(
            "accepted a connection of address family {family}, not TCP over IP"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A connection's own failure is passed over, at once; running out of
    /// descriptors or memory is the listener's, for the caller to wait out.
    #[test]
    fn only_a_connections_own_failure_is_passed_over() {
        let of = |errno| of_that_connection_only(&io::Error::from_raw_os_error(errno));
        for errno in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EPERM,
        ] {
            assert!(of(errno), "{}", io::Error::from_raw_os_error(errno));
        }
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
        ] {
            assert!(!of(errno), "{}", io::Error::from_raw_os_error(errno));
        }
    }

    /// What the client sees of a connection is what `accept` says of its
    /// peer, over IPv4 and IPv6; the socket is non-blocking (tokio takes it
    /// as it is), closed on exec, and has Nagle off, from the listener; and
    /// it comes to `accept` only once the client has sent something, which
    /// is then there to read.
    #[tokio::test]
    async fn a_connection_comes_once_it_has_sent_with_its_peer_non_blocking_and_without_delay() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().expect("an address");
            let mut listeners = match super::super::bind(addr) {
                Ok(l) => l,
                // A machine without IPv6 on loopback tests IPv4 only.
                Err(_) if addr.is_ipv6() => continue,
                Err(e) => panic!("cannot bind {addr}: {e}"),
            };
            let local = listeners.local_addr().expect("its address");
            let listener = AsyncFd::new(listeners.0.remove(0)).expect("registered");
            let mut client = tokio::net::TcpStream::connect(local)
                .await
                .expect("connected");
            let early = tokio::time::timeout(Duration::from_millis(300), accept(&listener)).await;
            assert!(
                early.is_err(),
                "accepted before the client sent anything, for {addr}"
            );
            client.write_all(b"GET").await.expect("sent");
            let (stream, peer) = accept(&listener).await.expect("accepted");
            let mut first = [0u8; 8];
            // SAFETY: recv into a buffer we own, of its length.
            let read = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    first.as_mut_ptr().cast(),
                    first.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            assert_eq!(
                read, 3,
                "the request is not there to read at once, for {addr}"
            );
            assert_eq!(peer, client.local_addr().expect("the client's address"));
            assert_eq!(stream.peer_addr().expect("its peer"), peer);
            // SAFETY: plain fcntl queries on a descriptor we own.
            let (status, fd_flags) = unsafe {
                (
                    libc::fcntl(stream.as_raw_fd(), libc::F_GETFL),
                    libc::fcntl(stream.as_raw_fd(), libc::F_GETFD),
                )
            };
            assert_ne!(status & libc::O_NONBLOCK, 0, "blocking for {addr}");
            assert_ne!(
                fd_flags & libc::FD_CLOEXEC,
                0,
                "inherited by children for {addr}"
            );
            let stream = tokio::net::TcpStream::from_std(stream).expect("registered");
            assert!(
                stream.nodelay().expect("TCP_NODELAY"),
                "Nagle is on for {addr}"
            );
        }
    }
}
