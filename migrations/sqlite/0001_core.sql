-- Core schema: jobs, their labels, runs, and service incarnations.
-- Instants are integer Unix milliseconds; ids are UUID text (v7, time-ordered).

CREATE TABLE jobs (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    spec        TEXT NOT NULL,             -- JSON JobSpec (without `paused`)
    paused      INTEGER NOT NULL DEFAULT 0,
    pause_note  TEXT,
    source      TEXT NOT NULL DEFAULT 'api',
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    cursor_at   INTEGER NOT NULL           -- next fire is the first strictly after this
) STRICT;

CREATE TABLE job_labels (
    job_id  TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX job_labels_by_pair ON job_labels (key, value, job_id);

CREATE TABLE runs (
    id                  TEXT PRIMARY KEY NOT NULL,
    job_id              TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    job_name            TEXT NOT NULL,
    scheduled_at        INTEGER NOT NULL,
    scheduled_until     INTEGER,
    fires               INTEGER NOT NULL DEFAULT 1,
    status              TEXT NOT NULL,
    trigger             TEXT NOT NULL,
    reason              TEXT,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    ended_at            INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    exit_code           INTEGER,
    http_status         INTEGER,
    error               TEXT,
    output              TEXT,
    pid                 INTEGER,
    pgid                INTEGER,
    process_start_ticks INTEGER,
    incarnation         TEXT NOT NULL
) STRICT;

CREATE INDEX runs_by_job ON runs (job_id, id);
CREATE INDEX runs_by_status ON runs (status, id);
-- A scheduled fire is recorded at most once, whatever happens.
CREATE UNIQUE INDEX runs_one_per_fire ON runs (job_id, scheduled_at)
    WHERE trigger IN ('schedule', 'catch_up');

CREATE TABLE incarnations (
    id            TEXT PRIMARY KEY NOT NULL,
    pid           INTEGER NOT NULL,
    version       TEXT NOT NULL,
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL,
    stopped_at    INTEGER
) STRICT;
