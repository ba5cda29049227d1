-- Every message written also wrote a page of this index: with it, a notify
-- alone in its commit wrote four pages to the write-ahead log, without it
-- three. The purge and the start of the store, its only readers, scan the
-- table instead; the purge scans it whole for the per-mailbox cap anyway.
DROP INDEX IF EXISTS messages_visible;
