-- A command's standard error kept apart from its standard output (each its
-- own bounded tail; `output` keeps stdout, or an HTTP response body).
ALTER TABLE runs ADD COLUMN stderr TEXT;
