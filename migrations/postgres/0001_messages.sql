-- The same tables and columns as sqlite/0001_messages.sql, in PostgreSQL's
-- dialect. Integers are BIGINT throughout so that every column reads back as
-- the i64 the code uses for both stores.

-- Visible messages: `seq` is the position a cursor points at. A sequence
-- hands out numbers in call order, not commit order; the store serializes
-- inserts per mailbox (an advisory lock held to commit) so that, per mailbox,
-- `seq` still grows in commit order and a cursor never skips a message.
CREATE TABLE messages (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT   NOT NULL,
    mailbox     TEXT   NOT NULL,
    type        BIGINT NOT NULL,
    data        TEXT   NOT NULL,
    accepted_ms BIGINT NOT NULL,
    visible_ms  BIGINT NOT NULL
);
CREATE INDEX messages_mailbox_seq ON messages (mailbox, seq);
CREATE INDEX messages_visible ON messages (visible_ms);

-- Messages accepted with a delay: moved into `messages` when due, so that they
-- take a position after everything already delivered.
CREATE TABLE delayed_messages (
    id          TEXT   PRIMARY KEY,
    mailbox     TEXT   NOT NULL,
    type        BIGINT NOT NULL,
    data        TEXT   NOT NULL,
    accepted_ms BIGINT NOT NULL,
    due_ms      BIGINT NOT NULL
);
CREATE INDEX delayed_messages_due ON delayed_messages (due_ms);

-- (mailbox, dedupKey) seen inside retention, and the message it named.
CREATE TABLE dedup_keys (
    mailbox    TEXT   NOT NULL,
    dedup_key  TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (mailbox, dedup_key)
);
CREATE INDEX dedup_keys_created ON dedup_keys (created_ms);

-- Where a session that sends no cursor has read up to.
CREATE TABLE session_positions (
    session    TEXT   PRIMARY KEY,
    mailbox    TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Revoked sessions, kept until the token would have expired anyway.
CREATE TABLE revoked_sessions (
    jti        TEXT   PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);

-- Every session of the mailbox that started at or before `revoked_ms` is revoked.
CREATE TABLE revoked_mailboxes (
    mailbox    TEXT   PRIMARY KEY,
    revoked_ms BIGINT NOT NULL
);
