//! A held poll's socket, lent so that its answer can be written from the
//! thread that committed the news ([`crate::hub::AnswerAtCommit`]).
//!
//! Waking the poll's task on the polls' runtime costs a wake-up of that
//! thread and a hop of latency for every delivery. The SQLite writer knows
//! the new rows the moment it commits them, so for a poll whose news is
//! exactly those rows it writes the answer itself. The connection task
//! learns of it the next time it runs (the client's next request, the
//! client closing, or the hold ending) and goes on with the connection.
//!
//! Whoever claims the slot first answers: the writer with
//! [`AnswerSlot::answer`], or the connection task with [`AnswerSlot::claim`]
//! before it writes the routed answer. The connection task closes the slot
//! before it lets go of the socket, under the same lock as the writer's
//! write, so the writer never writes to a descriptor that was closed (and
//! perhaps given to another connection).

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

pub struct AnswerSlot {
    state: Mutex<State>,
}

/// Small: every held poll has one.
struct State {
    /// The socket, while the connection task holds it and no answer went out.
    fd: Option<RawFd>,
    /// The connection task's, to have it write what the socket did not take.
    waker: Option<Waker>,
    answered: Option<Box<Answered>>,
}

struct Answered {
    /// The part of the answer the socket did not take at once; the
    /// connection task writes it.
    rest: Vec<u8>,
    /// Kept until the connection task lets go of the slot: what the
    /// answering thread must not drop, since dropping it would wake the
    /// poll's task (its hub wake sender).
    _keep: Box<dyn Send>,
}

impl AnswerSlot {
    pub(crate) fn new(fd: RawFd) -> AnswerSlot {
        AnswerSlot {
            state: Mutex::new(State {
                fd: Some(fd),
                waker: None,
                answered: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data: a panic elsewhere leaves nothing half-done here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write `answer` (a whole HTTP response) to the socket, if nobody
    /// answered yet and the connection is still held; `keep` stays with the
    /// slot. Gives `keep` back when the slot was taken.
    pub fn answer<K: Send + 'static>(&self, answer: &[u8], keep: K) -> Result<(), K> {
        let mut state = self.lock();
        let Some(fd) = state.fd.take() else {
            return Err(keep);
        };
        // SAFETY: `fd` is open: the connection task clears it under this
        // lock before the socket is closed. MSG_DONTWAIT: never block the
        // writer; MSG_NOSIGNAL: a closed peer is an error, not a signal.
        let sent = unsafe {
            libc::send(
                fd,
                answer.as_ptr().cast(),
                answer.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // An error other than a full buffer means a broken connection: the
        // connection task finds it so on its next read.
        let sent = match usize::try_from(sent) {
            Ok(n) => n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => answer.len(),
        };
        let rest = answer[sent.min(answer.len())..].to_vec();
        let wake = !rest.is_empty();
        state.answered = Some(Box::new(Answered {
            rest,
            _keep: Box::new(keep),
        }));
        if let Some(waker) = state.waker.take().filter(|_| wake) {
            waker.wake();
        }
        Ok(())
    }

    /// The connection task: whether the answer went out from elsewhere, and
    /// then what is left of it to write. Until then, `cx` is woken should
    /// part of an answer be left to write.
    pub(super) fn poll_answered(&self, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
        let mut state = self.lock();
        if let Some(answered) = &mut state.answered {
            let rest = std::mem::take(&mut answered.rest);
            state.fd = None;
            return Poll::Ready(rest);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The routed answer is about to be given (by the connection task, or
    /// by the poll before it counts its answer): false if the answer went
    /// out from elsewhere already. From then on nobody else answers.
    pub fn claim(&self) -> bool {
        let mut state = self.lock();
        state.fd = None;
        state.answered.is_none()
    }

    /// The connection task lets go of the socket.
    pub(super) fn close(&self) {
        self.lock().fd = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (server, client)
    }

    #[test]
    fn the_first_to_claim_answers_and_the_other_is_refused() {
        let (server, mut client) = pair();
        let slot = AnswerSlot::new(server.as_raw_fd());
        assert_eq!(slot.answer(b"hello", 1), Ok(()));
        assert_eq!(slot.answer(b"again", 2), Err(2));
        assert!(!slot.claim());
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        let slot = AnswerSlot::new(server.as_raw_fd());
        assert!(slot.claim());
        assert_eq!(slot.answer(b"late", 3), Err(3));
    }

    #[test]
    fn a_closed_slot_writes_nothing() {
        let (server, mut client) = pair();
        let slot = AnswerSlot::new(server.as_raw_fd());
        slot.close();
        assert_eq!(slot.answer(b"hello", ()), Err(()));
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn what_the_socket_does_not_take_is_left_to_the_connection_task() {
        let (server, _client) = pair();
        server.set_nonblocking(true).unwrap();
        let slot = AnswerSlot::new(server.as_raw_fd());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(slot.poll_answered(&mut cx).is_pending());
        // Far more than a socket buffer takes while nobody reads.
        let answer = vec![b'x'; 64 << 20];
        assert_eq!(slot.answer(&answer, ()), Ok(()));
        let Poll::Ready(rest) = slot.poll_answered(&mut cx) else {
            panic!("answered, yet pending");
        };
        assert!(
            !rest.is_empty() && rest.len() < answer.len(),
            "{}",
            rest.len()
        );
    }
}
