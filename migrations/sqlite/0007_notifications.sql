-- Notifications (docs/notifications.md). An event is written with status
-- 'new' in the same commit as the state change it reports (a run's end, an
-- orphaning, an auto-pause), so a crash can neither lose it nor report a
-- change that was never committed. The notifier routes it: one 'pending'
-- row per destination, each with its own stable id (`webhook-id`), sent in
-- `seq` order per destination until 'sent' or given up ('failed').
CREATE TABLE notifications (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT,                   -- msg_<uuid>, set when routed
    event           TEXT NOT NULL,
    job_id          TEXT NOT NULL,
    job_name        TEXT NOT NULL,
    run_id          TEXT,
    first           INTEGER NOT NULL DEFAULT 1,   -- failure: the first of a streak
    detail          TEXT,
    dedupe          TEXT,                   -- late: the expected instant, reported once
    occurred_at     INTEGER NOT NULL,
    target          TEXT,                   -- JSON Target, set when routed
    status          TEXT NOT NULL,          -- new, pending, sent, failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    sent_at         INTEGER,
    last_error      TEXT
) STRICT;

CREATE INDEX notifications_by_status ON notifications (status, seq);
CREATE INDEX notifications_by_job ON notifications (job_id, event, dedupe);
