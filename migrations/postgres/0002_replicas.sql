-- Replicas (docs/scaling.md). Each incarnation says where it runs and when
-- it began to leave (a clean shutdown hands its jobs over at once instead
-- of after its lease expires). Live runs are looked up per job when a fire
-- is claimed (the overlap policy across replicas), so they get their own
-- small index.
ALTER TABLE incarnations ADD COLUMN host TEXT NOT NULL DEFAULT '';
ALTER TABLE incarnations ADD COLUMN leaving_at BIGINT;
CREATE INDEX runs_live_by_job ON runs (job_id) WHERE status IN ('queued', 'running');
