-- One row the readiness probe rewrites to learn whether the database takes
-- writes (a full disk, an I/O error) while nothing else is being written.
CREATE TABLE store_probe (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL
);
