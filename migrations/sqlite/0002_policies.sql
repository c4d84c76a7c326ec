-- Policies: retries (per-attempt log), auto-pause, run limits.

ALTER TABLE runs ADD COLUMN attempt_log TEXT;             -- JSON array, runs with retries only

ALTER TABLE jobs ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN runs_started INTEGER NOT NULL DEFAULT 0;  -- scheduled and catch-up runs started
ALTER TABLE jobs ADD COLUMN max_runs INTEGER;             -- copy of policy.max_runs, enforced on insert
ALTER TABLE jobs ADD COLUMN auto_pause_after INTEGER;     -- copy of policy.auto_pause_after
ALTER TABLE jobs ADD COLUMN history_keep_last INTEGER;    -- copy of policy.history.keep_last
ALTER TABLE jobs ADD COLUMN history_max_age_ms INTEGER;   -- copy of policy.history.max_age
