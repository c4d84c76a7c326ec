-- The PostgreSQL schema: the same tables and columns as the SQLite schema
-- (migrations/sqlite, 0001-0003), so every statement in src/store is
-- written once. Instants are BIGINT Unix milliseconds; ids are UUID text
-- (v7, time-ordered) compared bytewise (COLLATE "C", as SQLite does:
-- cursors and pruning compare ids); booleans are 0/1 integers like SQLite's.

CREATE TABLE jobs (
    id                    TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name                  TEXT NOT NULL UNIQUE,
    spec                  TEXT NOT NULL,       -- JSON JobSpec (without `paused`)
    paused                BIGINT NOT NULL DEFAULT 0,
    pause_note            TEXT,
    source                TEXT NOT NULL DEFAULT 'api',
    version               BIGINT NOT NULL,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    cursor_at             BIGINT NOT NULL,     -- next fire is the first strictly after this
    consecutive_failures  BIGINT NOT NULL DEFAULT 0,
    runs_started          BIGINT NOT NULL DEFAULT 0,
    max_runs              BIGINT,
    auto_pause_after      BIGINT,
    history_keep_last     BIGINT,
    history_max_age_ms    BIGINT
);

CREATE TABLE job_labels (
    job_id  TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);

CREATE INDEX job_labels_by_pair ON job_labels (key, value, job_id);

CREATE TABLE runs (
    id                  TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    job_id              TEXT COLLATE "C" NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    job_name            TEXT NOT NULL,
    scheduled_at        BIGINT NOT NULL,
    scheduled_until     BIGINT,
    fires               BIGINT NOT NULL DEFAULT 1,
    status              TEXT NOT NULL,
    trigger             TEXT NOT NULL,
    reason              TEXT,
    created_at          BIGINT NOT NULL,
    started_at          BIGINT,
    ended_at            BIGINT,
    attempts            BIGINT NOT NULL DEFAULT 0,
    exit_code           BIGINT,
    http_status         BIGINT,
    error               TEXT,
    output              TEXT,
    pid                 BIGINT,
    pgid                BIGINT,
    process_start_ticks BIGINT,
    incarnation         TEXT NOT NULL,
    attempt_log         TEXT                 -- JSON array, runs with retries only
);

CREATE INDEX runs_by_job ON runs (job_id, id);
CREATE INDEX runs_by_status ON runs (status, id);
-- A scheduled fire is recorded at most once, whatever happens (and whichever replica).
CREATE UNIQUE INDEX runs_one_per_fire ON runs (job_id, scheduled_at)
    WHERE trigger IN ('schedule', 'catch_up');

CREATE TABLE incarnations (
    id            TEXT PRIMARY KEY NOT NULL,
    pid           BIGINT NOT NULL,
    version       TEXT NOT NULL,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    stopped_at    BIGINT
);

-- Results waiting for the control backend, written in the same commit as
-- the run's final state; deleted only once the backend acknowledged them.
CREATE TABLE outbox (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
