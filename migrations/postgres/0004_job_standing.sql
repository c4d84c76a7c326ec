-- A job's standing at a glance, kept up to date in the commit that ends
-- each of its runs (the job view shows it; GET /v1/jobs?health= filters on
-- it) instead of a scan of its runs per request.
ALTER TABLE jobs ADD COLUMN last_run_id TEXT;
ALTER TABLE jobs ADD COLUMN last_run_status TEXT;
ALTER TABLE jobs ADD COLUMN last_run_scheduled_at BIGINT;
ALTER TABLE jobs ADD COLUMN last_run_ended_at BIGINT;
ALTER TABLE jobs ADD COLUMN last_run_error TEXT;           -- first line, at most 200 characters
ALTER TABLE jobs ADD COLUMN last_success_at BIGINT;
ALTER TABLE jobs ADD COLUMN last_failure_at BIGINT;

-- Jobs that already ran take their standing from their history.
UPDATE jobs SET
    last_success_at = (SELECT MAX(r.ended_at) FROM runs r WHERE r.job_id = jobs.id AND r.status = 'succeeded'),
    last_failure_at = (SELECT MAX(r.ended_at) FROM runs r WHERE r.job_id = jobs.id AND r.status IN ('failed', 'timed_out'));
UPDATE jobs SET
    last_run_id = l.id, last_run_status = l.status, last_run_scheduled_at = l.scheduled_at,
    last_run_ended_at = l.ended_at,
    last_run_error = SUBSTR(SPLIT_PART(l.error, E'\n', 1), 1, 200)
FROM (SELECT r.job_id, r.id, r.status, r.scheduled_at, r.ended_at, r.error FROM runs r
      WHERE r.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
        AND r.id = (SELECT MAX(x.id) FROM runs x WHERE x.job_id = r.job_id
                    AND x.status IN ('succeeded', 'failed', 'timed_out', 'cancelled'))) AS l
WHERE l.job_id = jobs.id;
