-- Opaque sessions: webmail sids that are not JWTs, registered over the
-- internal API. Only the hex SHA-256 of the sid is kept, never the sid.
-- `created_ms` is where the session's news begins.
CREATE TABLE opaque_sessions (
    sid_hash   TEXT    PRIMARY KEY,
    mailbox    TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX opaque_sessions_expires ON opaque_sessions (expires_ms);
