-- The SQLite store keeps its messages in (mailbox, seq) order and gives
-- seqs itself (see migrations/sqlite/0004). PostgreSQL keeps its sequence
-- and index; this keeps the two migration sets in step.
SELECT 1;
