//! Answering a poll: read the store from the session's position, and if there
//! is no news, wait in the hub until there is, the hold ends, a newer poll of
//! the session takes over, the session is revoked, the user holds too many
//! polls, or the node shuts down. A poll with a cursor, parked on a
//! connection that lent its socket, may instead be answered by the thread
//! that commits its news ([`AtCommit`]).

use crate::app::App;
use crate::http::error::ApiError;
use crate::http::HeadId;
use crate::hub::{AnswerAtCommit, ReadNews, Wake, WakeSender};
use crate::metrics::Outcome;
use crate::server::AnswerSlot;
use crate::session::{Session, SessionError};
use crate::store::StoredMessage;
use crate::wire::{PollAnswer, WireMessage, MAX_MESSAGES_PER_ANSWER};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A validated poll.
pub struct PollRequest {
    pub session: Session,
    /// The position from the client's cursor; `None` for cursor-less clients.
    pub cursor: Option<i64>,
    pub timeout: Duration,
    /// The connection's socket, lent for an answer written where the news
    /// is committed, and that answer's head.
    pub lent: Option<(Arc<AnswerSlot>, HeadId)>,
}

const CURSOR_PREFIX: &str = "1.";

pub fn encode_cursor(seq: i64) -> String {
    format!("{CURSOR_PREFIX}{seq}")
}

pub fn decode_cursor(s: &str) -> Result<i64, ApiError> {
    s.strip_prefix(CURSOR_PREFIX)
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::BadRequest("cursor is not one this server issued".into()))
}

/// The poll's answer, counted in the metrics unless the thread that
/// committed its news answered it first (and counted that answer).
pub async fn answer(app: &Arc<App>, req: PollRequest) -> Result<PollAnswer, ApiError> {
    let PollRequest {
        session,
        cursor,
        timeout,
        lent,
    } = req;
    // A poll without a cursor has its position saved before its answer,
    // which is no work for the committing thread.
    let lent = lent.filter(|_| cursor.is_some());
    let answered = answer_lent(app, &session, cursor, timeout, lent.as_ref()).await;
    if answered.is_err() && answers_here(lent.as_ref().map(|(slot, _)| &**slot)) {
        app.metrics.answered(Outcome::error);
    }
    answered
}

/// [`answer`], with the socket `lent` for an answer at the commit; counts
/// every answer but an error.
async fn answer_lent(
    app: &Arc<App>,
    session: &Session,
    cursor: Option<i64>,
    timeout: Duration,
    lent: Option<&(Arc<AnswerSlot>, HeadId)>,
) -> Result<PollAnswer, ApiError> {
    let slot = lent.map(|(slot, _)| &**slot);
    let after = match cursor {
        Some(seq) => seq,
        None => app.store.position(&session.key).await?.unwrap_or(0),
    };
    let deadline = Instant::now() + timeout;
    // Other nodes sharing the store release their older polls of this session.
    app.store
        .announce_poll(&session.user, &session.key, crate::clock::now_ms());
    loop {
        // Park before reading, so a commit between the read and the wait
        // still wakes this poll.
        let at_commit = lent.map(|(slot, head)| {
            Box::new(AtCommit {
                app: app.clone(),
                slot: slot.clone(),
                head: *head,
                after,
                start_ms: session.start_ms,
            }) as Box<dyn AnswerAtCommit>
        });
        let mut parked = app.hub.park(
            &session.user,
            &session.key,
            after,
            session.start_ms,
            at_commit,
        );
        // The hub may know from the last read that nothing is new: then the
        // poll that follows an answer waits without reading the store.
        if !parked.nothing_new() {
            let mut found = app
                .store
                .fetch(
                    &session.user,
                    after,
                    session.start_ms,
                    MAX_MESSAGES_PER_ANSWER as u32 + 1,
                )
                .await?;
            let more = found.len() > MAX_MESSAGES_PER_ANSWER;
            found.truncate(MAX_MESSAGES_PER_ANSWER);
            if !more {
                let last = found.last().map_or(after, |m| m.seq);
                app.hub.note_read(&parked, last, session.start_ms);
            }
            if !found.is_empty() {
                drop(parked);
                return deliver(app, slot, session, cursor.is_none(), found, more).await;
            }
        }
        if timeout.is_zero() {
            return Ok(empty(app, slot, after, Outcome::timeout));
        }
        tokio::select! {
            wake = parked.woken() => match wake {
                // A revocation heard from another node (or reloaded after
                // a reconnect) reaches a held poll as a wake.
                Wake::News if app.sessions.is_revoked(session) => {
                    return Err(SessionError::Revoked.into());
                }
                Wake::News => continue,
                Wake::Superseded => return Ok(empty(app, slot, after, Outcome::superseded)),
                Wake::ShuttingDown => return Ok(empty(app, slot, after, Outcome::shutdown)),
                Wake::Capped => return Ok(empty(app, slot, after, Outcome::capped)),
                // Counted as an error answer by `answer`.
                Wake::Revoked => return Err(SessionError::Revoked.into()),
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(empty(app, slot, after, Outcome::timeout)),
        }
    }
}

/// Whether the answer a poll is about to give is the one its client gets.
/// With a lent socket, the thread that commits the poll's news may have
/// answered it meanwhile, and counted that answer (the poll's own, the
/// hold ending say, is then dropped by the connection task); claiming the
/// socket settles it, so each answer is counted once.
fn answers_here(slot: Option<&AnswerSlot>) -> bool {
    slot.is_none_or(AnswerSlot::claim)
}

fn empty(app: &App, slot: Option<&AnswerSlot>, after: i64, outcome: Outcome) -> PollAnswer {
    if answers_here(slot) {
        app.metrics.answered(outcome);
    }
    PollAnswer {
        c: 0,
        msg: Vec::new(),
        cursor: encode_cursor(after),
        more: false,
    }
}

async fn deliver(
    app: &App,
    slot: Option<&AnswerSlot>,
    session: &Session,
    keep_position: bool,
    found: Vec<StoredMessage>,
    more: bool,
) -> Result<PollAnswer, ApiError> {
    let last = found.last().map(|m| m.seq).unwrap_or_default();
    if keep_position {
        app.store
            .save_position(&session.key, &session.user, last, crate::clock::now_ms())
            .await?;
    }
    if answers_here(slot) {
        count_delivery(app, found.iter().map(|m| m.visible_ms));
    }
    with_messages(found, more)
}

/// Count an answer with messages that became visible at `visible_ms`.
fn count_delivery(app: &App, visible_ms: impl Iterator<Item = i64>) {
    let now = crate::clock::now_ms();
    let mut delivered = 0;
    for visible in visible_ms {
        app.metrics.observe_delivery(now - visible);
        delivered += 1;
    }
    app.metrics.delivered.inc_by(delivered);
    app.metrics.answered(Outcome::message);
}

/// The answer that carries `found`.
fn with_messages(found: Vec<StoredMessage>, more: bool) -> Result<PollAnswer, ApiError> {
    let last = found.last().map(|m| m.seq).unwrap_or_default();
    let mut msg = Vec::with_capacity(found.len());
    for m in found {
        let data = serde_json::value::RawValue::from_string(m.data).map_err(|e| {
            ApiError::Internal(anyhow::anyhow!("stored data of {} is not JSON: {e}", m.id))
        })?;
        msg.push(WireMessage {
            id: m.id,
            kind: m.kind,
            time: m.accepted_ms,
            data,
        });
    }
    Ok(PollAnswer {
        c: msg.len(),
        msg,
        cursor: encode_cursor(last),
        more,
    })
}

/// A parked poll with a cursor, on a connection that lent its socket: it
/// can be answered by the thread that commits its news.
struct AtCommit {
    app: Arc<App>,
    slot: Arc<AnswerSlot>,
    head: HeadId,
    after: i64,
    start_ms: i64,
}

impl AnswerAtCommit for AtCommit {
    fn answer(
        self: Box<Self>,
        user: &str,
        session: &str,
        read: ReadNews<'_>,
        wake: WakeSender,
    ) -> Result<(), WakeSender> {
        let app = &self.app;
        // Anything unusual is left to the poll's own runtime.
        if app.sessions.is_revoked_parts(session, user, self.start_ms) {
            return Err(wake);
        }
        let limit = MAX_MESSAGES_PER_ANSWER as u32 + 1;
        let Some(found) = read(user, self.after, self.start_ms, limit) else {
            return Err(wake);
        };
        if found.is_empty() || found.len() > MAX_MESSAGES_PER_ANSWER {
            return Err(wake);
        }
        let visible_ms: Vec<i64> = found.iter().map(|m| m.visible_ms).collect();
        let delivered = found.len() as u64;
        let Ok(answer) = with_messages(found, false) else {
            return Err(wake);
        };
        let Ok(body) = answer.to_json() else {
            return Err(wake);
        };
        let head = app.poll_heads.get(self.head).clone();
        self.slot
            .answer(&crate::server::encode_answer(head, &body), wake)?;
        count_delivery(app, visible_ms.into_iter());
        app.metrics.answered_at_commit.inc();
        app.registry.delivered(session, delivered);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Source;
    use crate::session::SessionError;
    use crate::store::NewMessage;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    /// `user`'s poll with a cursor, lending `slot`, held on its own task.
    async fn held(
        app: &Arc<App>,
        user: &str,
        slot: Arc<AnswerSlot>,
        timeout: Duration,
    ) -> tokio::task::JoinHandle<Result<PollAnswer, ApiError>> {
        let request = PollRequest {
            session: Session {
                key: format!("session of {user}"),
                user: user.into(),
                start_ms: 0,
                expires_ms: i64::MAX,
            },
            cursor: Some(0),
            timeout,
            lent: Some((slot, app.poll_heads.id(None))),
        };
        let held_before = app.hub.held();
        let task = tokio::spawn({
            let app = app.clone();
            async move { answer(&app, request).await }
        });
        while app.hub.held() == held_before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        task
    }

    /// A poll answered where its mail was committed, whose own answer comes
    /// anyway (here its hold ends before anything else looks at the slot;
    /// in the server the connection task then drops that answer): counted
    /// once, as the message the client got.
    #[tokio::test]
    async fn a_poll_answered_at_commit_counts_nothing_when_its_own_answer_follows() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::app::for_tests(dir.path()).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let slot = Arc::new(AnswerSlot::new(server.as_raw_fd()));
        let user = "alice@example.com";
        let held = held(&app, user, slot, Duration::from_millis(300)).await;
        let mail = NewMessage {
            user: user.into(),
            kind: 70,
            data: r#"{"subject":"once"}"#.into(),
            dedup_key: None,
            delay_ms: 0,
        };
        app.ingest.accept(vec![mail], Source::Api).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("once") {
            let n = client.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(app.metrics.answered_at_commit.get(), 1);

        let own = held.await.unwrap().unwrap();
        assert_eq!(own.c, 0);
        assert_eq!(app.metrics.answers(Outcome::timeout), 0);
        assert_eq!(app.metrics.answers(Outcome::message), 1);
        assert_eq!(app.metrics.delivered.get(), 1);
    }

    /// A poll whose answer went out from the thread that committed its
    /// news, and whose own answer is then an error (its session revoked
    /// while it is still held): the client never gets that error, so it
    /// is not counted. The same error given to the client is.
    #[tokio::test]
    async fn an_error_answer_is_counted_only_when_the_client_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::app::for_tests(dir.path()).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        for (user, answered_at_commit, errors) in [
            ("alice@example.com", true, 0),
            ("bob@example.com", false, 1),
        ] {
            let slot = Arc::new(AnswerSlot::new(socket.as_raw_fd()));
            if answered_at_commit {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                assert!(slot.answer(answer, ()).is_ok());
            }
            let held = held(&app, user, slot, Duration::from_secs(30)).await;
            app.revoke_user(user).await.unwrap();
            let answered = held.await.unwrap();
            assert!(
                matches!(answered, Err(ApiError::Session(SessionError::Revoked))),
                "{user}: {:?}",
                answered.map(|a| a.c)
            );
            assert_eq!(app.metrics.answers(Outcome::error), errors, "{user}");
        }
    }
}
