-- The same columns as the PostgreSQL schema (migrations/postgres/0002), so
-- the incarnation statements are written once. A SQLite database has one
-- instance; `leaving_at` is recorded all the same.
ALTER TABLE incarnations ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE incarnations ADD COLUMN leaving_at INTEGER;
