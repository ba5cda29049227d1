-- Messages kept in (mailbox, seq) order in one B-tree, and `seq` given by
-- the writer instead of AUTOINCREMENT. Before, a notify alone in its
-- commit wrote three pages to the write-ahead log: the table's, its
-- (mailbox, seq) index's and sqlite_sequence's. Now it writes one. A
-- poll's read from the file (mailbox = ? AND seq > ?) is a range of the
-- table itself.
--
-- `seq_floor` keeps seqs from going back, which AUTOINCREMENT did: every
-- seq given out is at most the largest seq in `messages` or `seq_floor`.
-- The store raises the floor at every start (by the jump that covers rows
-- shown before a power loss took them back) and before every purge.
CREATE TABLE seq_floor (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO seq_floor (id, seq) VALUES (1, max(
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
    coalesce((SELECT max(seq) FROM messages), 0)
));

CREATE TABLE messages_by_mailbox (
    mailbox     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    id          TEXT    NOT NULL,
    type        INTEGER NOT NULL,
    data        TEXT    NOT NULL,
    accepted_ms INTEGER NOT NULL,
    visible_ms  INTEGER NOT NULL,
    PRIMARY KEY (mailbox, seq)
) WITHOUT ROWID;
INSERT INTO messages_by_mailbox (mailbox, seq, id, type, data, accepted_ms, visible_ms)
    SELECT mailbox, seq, id, type, data, accepted_ms, visible_ms FROM messages;
DROP TABLE messages;
ALTER TABLE messages_by_mailbox RENAME TO messages;
