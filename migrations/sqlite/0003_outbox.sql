-- Results waiting for the control backend, written in the same commit as
-- the run's final state; deleted only once the backend acknowledged them.
CREATE TABLE outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,            -- 'result' or 'rejection'
    key         TEXT NOT NULL,            -- run id, or rejected job name
    payload     TEXT NOT NULL,            -- JSON as uploaded
    created_at  INTEGER NOT NULL
) STRICT;
