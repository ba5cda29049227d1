-- Kept in step with sqlite/0003, which drops `messages_visible` there.
-- PostgreSQL keeps the index: its purge deletes by age through it, and its
-- commits are not bound by the pages they write as SQLite's writer is.
SELECT 1;
