//! Reads that may touch many rows (lists, loads, history, outbox), written
//! once in portable SQL (see [`super::sql`]) over the async pool of
//! whichever database is configured.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::TryStreamExt;
use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};

use super::rows::{self, Columns, JOB_COLUMNS, RUN_COLUMNS, STANDING_COLUMNS, parse};
use super::sql::Value;
use super::{JobFilter, OutboxEntry, Page, RunFilter, StoreError};
use crate::job::{Job, JobId, Timing};
use crate::run::{Incarnation, Run, RunId, RunStatus};
use crate::standing::Standing;

/// The async read pool.
#[derive(Clone)]
pub enum Pool {
    /// Read-only SQLite connections.
    Sqlite(SqlitePool),
    /// The PostgreSQL pool.
    Postgres(PgPool),
}

/// A row from either database.
pub enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl Columns for Row {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(match self {
            Self::Sqlite(r) => r.try_get(i)?,
            Self::Postgres(r) => r.try_get(i)?,
        })
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(match self {
            Self::Sqlite(r) => r.try_get(i)?,
            Self::Postgres(r) => r.try_get(i)?,
        })
    }
}

/// A statement under construction: SQL with `$N` placeholders numbered as
/// values are bound.
#[derive(Default)]
pub struct Query {
    sql: String,
    params: Vec<Value>,
}

impl Query {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    /// Appends SQL text.
    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.params.push(value.into());
        self.sql.push('$');
        self.sql.push_str(&self.params.len().to_string());
        self
    }

    /// Appends `(p1, p2, …)` bound to `values`.
    pub fn list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Self {
        self.sql.push('(');
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql.push_str(", ");
            }
            self.bind(v);
        }
        self.sql.push(')');
        self
    }
}

/// A sqlx query for `$sql` with owned [`Value`]s bound, for either
/// database (a macro: the query type differs per database).
macro_rules! bound {
    ($sql:expr, $params:expr) => {{
        let mut q = sqlx::query(sqlx::AssertSqlSafe($sql));
        for p in $params {
            q = match p {
                $crate::store::sql::Value::Int(v) => q.bind(v),
                $crate::store::sql::Value::Text(v) => q.bind(v),
            };
        }
        q
    }};
}
pub(super) use bound;

impl Pool {
    /// Every row of `query`.
    pub async fn all(&self, query: Query) -> Result<Vec<Row>, StoreError> {
        Ok(match self {
            Self::Sqlite(pool) => bound!(query.sql, query.params)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(Row::Sqlite)
                .collect(),
            Self::Postgres(pool) => bound!(query.sql, query.params)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(Row::Postgres)
                .collect(),
        })
    }

    /// Streams the rows of `query` through `each` (a million rows never sit
    /// in memory at once).
    pub async fn each(
        &self,
        query: Query,
        mut each: impl FnMut(&Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(pool) => {
                let mut rows = bound!(query.sql, query.params).fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    each(&Row::Sqlite(row))?;
                }
            }
            Self::Postgres(pool) => {
                let mut rows = bound!(query.sql, query.params).fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    each(&Row::Postgres(row))?;
                }
            }
        }
        Ok(())
    }

    /// The first row of `query`, if any.
    pub async fn first(&self, query: Query) -> Result<Option<Row>, StoreError> {
        Ok(match self {
            Self::Sqlite(pool) => bound!(query.sql, query.params)
                .fetch_optional(pool)
                .await?
                .map(Row::Sqlite),
            Self::Postgres(pool) => bound!(query.sql, query.params)
                .fetch_optional(pool)
                .await?
                .map(Row::Postgres),
        })
    }

    pub async fn get_job_by(&self, column: &str, key: String) -> Result<Option<Job>, StoreError> {
        let mut q = Query::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {column} = "));
        q.bind(key);
        self.first(q).await?.as_ref().map(rows::job).transpose()
    }

    pub async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let mut q = Query::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = "));
        q.bind(id.to_string());
        self.first(q).await?.as_ref().map(rows::run).transpose()
    }

    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<JobId>,
        limit: u32,
    ) -> Result<Page<Job>, StoreError> {
        let mut q = Query::new(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE 1=1"));
        if let Some(paused) = filter.paused {
            q.push(" AND j.paused = ").bind(paused);
        }
        if let Some(source) = filter.source {
            q.push(" AND j.source = ").bind(source.as_str());
        }
        if let Some(cursor) = cursor {
            q.push(" AND j.id > ").bind(cursor.to_string());
        }
        for (key, value) in &filter.labels {
            q.push(" AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = j.id AND l.key = ")
                .bind(key)
                .push(" AND l.value = ")
                .bind(value)
                .push(")");
        }
        q.push(" ORDER BY j.id LIMIT ").bind(i64::from(limit) + 1);
        let found = self.all(q).await?;
        let mut items = found.iter().map(rows::job).collect::<Result<Vec<_>, _>>()?;
        let next = page_cursor(&mut items, limit, |j| j.id.to_string());
        Ok(Page { items, next })
    }

    pub async fn load_jobs(&self) -> Result<Vec<Arc<Job>>, StoreError> {
        let mut jobs = Vec::new();
        self.each(
            Query::new(format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id")),
            |row| {
                push_decoded(&mut jobs, rows::shared_job(row));
                Ok(())
            },
        )
        .await?;
        Ok(jobs)
    }

    pub async fn load_timings(&self) -> Result<Vec<Timing>, StoreError> {
        let mut timings = Vec::new();
        let q =
            Query::new("SELECT id, spec, paused, cursor_at, runs_started, max_runs FROM jobs ORDER BY id");
        self.each(q, |row| {
            let id = row.text(0)?;
            let decoded = id
                .parse::<JobId>()
                .map_err(|_| format!("job id {id}"))
                .and_then(|job| {
                    let read = || -> Result<_, StoreError> {
                        let started = row.int(4)?;
                        let exhausted = row.opt_int(5)?.is_some_and(|max| started >= max);
                        Ok((
                            row.text(1)?,
                            row.int(2)? != 0,
                            rows::instant(row.int(3)?)?,
                            exhausted,
                        ))
                    };
                    let (spec, paused, cursor, exhausted) = read().map_err(|e| e.to_string())?;
                    Timing::from_stored(job, &spec, paused, cursor, exhausted)
                });
            match decoded {
                Ok(timing) => timings.push(timing),
                // One undecodable row must not keep every other job from
                // firing; it is reported loudly instead.
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "skipping a stored job that does not decode");
                }
            }
            Ok(())
        })
        .await?;
        Ok(timings)
    }

    pub async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Arc<Job>>, StoreError> {
        let mut jobs = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut q = Query::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id IN "));
            q.list(chunk.iter().map(ToString::to_string));
            for row in self.all(q).await? {
                push_decoded(&mut jobs, rows::shared_job(&row));
            }
        }
        Ok(jobs)
    }

    pub async fn standings(&self, ids: &[JobId]) -> Result<HashMap<JobId, Standing>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut q = Query::new(format!("SELECT {STANDING_COLUMNS} FROM jobs WHERE id IN "));
            q.list(chunk.iter().map(ToString::to_string));
            for row in self.all(q).await? {
                let (id, standing) = rows::standing(&row)?;
                found.insert(id, standing);
            }
        }
        Ok(found)
    }

    pub async fn all_standings(&self) -> Result<HashMap<JobId, Standing>, StoreError> {
        let mut found = HashMap::new();
        let q = Query::new(format!("SELECT {STANDING_COLUMNS} FROM jobs"));
        self.each(q, |row| {
            let (id, standing) = rows::standing(row)?;
            found.insert(id, standing);
            Ok(())
        })
        .await?;
        Ok(found)
    }

    pub async fn count_jobs(&self) -> Result<(u64, u64), StoreError> {
        let q = Query::new(
            "SELECT COUNT(CASE WHEN paused = 0 THEN 1 END), COUNT(CASE WHEN paused = 1 THEN 1 END) FROM jobs",
        );
        let row = self.first(q).await?;
        let (active, paused) = match row {
            Some(row) => (row.int(0)?, row.int(1)?),
            None => (0, 0),
        };
        Ok((active.max(0) as u64, paused.max(0) as u64))
    }

    pub async fn list_runs(
        &self,
        filter: &RunFilter,
        cursor: Option<RunId>,
        limit: u32,
    ) -> Result<Page<Run>, StoreError> {
        let mut q = Query::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1=1"));
        if let Some(job) = filter.job {
            q.push(" AND job_id = ").bind(job.to_string());
        }
        if !filter.statuses.is_empty() {
            q.push(" AND status IN ")
                .list(filter.statuses.iter().map(|s| s.as_str()));
        }
        if let Some(cursor) = cursor {
            q.push(" AND id < ").bind(cursor.to_string());
        }
        q.push(" ORDER BY id DESC LIMIT ").bind(i64::from(limit) + 1);
        let found = self.all(q).await?;
        let mut items = found.iter().map(rows::run).collect::<Result<Vec<_>, _>>()?;
        let next = page_cursor(&mut items, limit, |r| r.id.to_string());
        Ok(Page { items, next })
    }

    pub async fn live_runs(&self, incarnation: Incarnation) -> Result<Vec<(RunId, JobId)>, StoreError> {
        let mut q = Query::new(
            "SELECT id, job_id FROM runs WHERE status IN ('queued', 'running') AND incarnation = ",
        );
        q.bind(incarnation.to_string());
        self.all(q)
            .await?
            .iter()
            .map(|row| Ok((parse(&row.text(0)?, "run id")?, parse(&row.text(1)?, "job id")?)))
            .collect()
    }

    pub async fn run_statuses(&self, ids: &[RunId]) -> Result<HashMap<RunId, RunStatus>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut q = Query::new("SELECT id, status FROM runs WHERE id IN ");
            q.list(chunk.iter().map(ToString::to_string));
            for row in self.all(q).await? {
                let status = row
                    .text(1)?
                    .parse()
                    .map_err(|e| StoreError::corrupt("runs.status", e))?;
                out.insert(parse(&row.text(0)?, "run id")?, status);
            }
        }
        Ok(out)
    }

    pub async fn jobs_with_runs_since(
        &self,
        after: Option<RunId>,
    ) -> Result<(Vec<JobId>, Option<RunId>), StoreError> {
        let mut q = Query::new("SELECT job_id, MAX(id) FROM runs WHERE id > ");
        q.bind(after.map(|a| a.to_string()).unwrap_or_default())
            .push(" GROUP BY job_id");
        let mut newest: Option<RunId> = None;
        let mut jobs = Vec::new();
        for row in self.all(q).await? {
            jobs.push(parse(&row.text(0)?, "job id")?);
            newest = newest.max(Some(parse(&row.text(1)?, "run id")?));
        }
        Ok((jobs, newest))
    }

    pub async fn history_overrides(&self) -> Result<HashMap<JobId, (Option<u32>, Option<i64>)>, StoreError> {
        let q = Query::new(
            "SELECT id, history_keep_last, history_max_age_ms FROM jobs \
             WHERE history_keep_last IS NOT NULL OR history_max_age_ms IS NOT NULL",
        );
        self.all(q)
            .await?
            .iter()
            .map(|row| {
                let keep = row.opt_int(1)?.and_then(|k| u32::try_from(k).ok());
                Ok((parse(&row.text(0)?, "job id")?, (keep, row.opt_int(2)?)))
            })
            .collect()
    }

    pub async fn outbox_peek(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut q = Query::new("SELECT seq, kind, payload FROM outbox ORDER BY seq LIMIT ");
        q.bind(i64::from(limit));
        self.all(q)
            .await?
            .iter()
            .map(|row| {
                Ok(OutboxEntry {
                    seq: row.int(0)?,
                    kind: row.text(1)?,
                    payload: row.text(2)?,
                })
            })
            .collect()
    }

    pub async fn outbox_stats(&self) -> Result<(u64, Option<chrono::DateTime<chrono::Utc>>), StoreError> {
        let q =
            Query::new("SELECT COUNT(*), (SELECT created_at FROM outbox ORDER BY seq LIMIT 1) FROM outbox");
        let Some(row) = self.first(q).await? else {
            return Ok((0, None));
        };
        Ok((
            row.int(0)?.max(0) as u64,
            row.opt_int(1)?.map(rows::instant).transpose()?,
        ))
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.first(Query::new("SELECT 1 FROM _sqlx_migrations LIMIT 1"))
            .await?;
        Ok(())
    }
}

/// Keeps a decoded job; one undecodable row must not keep every other job
/// from firing, so it is reported loudly instead.
fn push_decoded(jobs: &mut Vec<Arc<Job>>, decoded: Result<Arc<Job>, StoreError>) {
    match decoded {
        Ok(job) => jobs.push(job),
        Err(e) => tracing::error!(error = %e, "skipping a stored job that does not decode"),
    }
}

/// Trims the look-ahead row and returns the cursor for the next page.
fn page_cursor<T>(items: &mut Vec<T>, limit: u32, key: impl Fn(&T) -> String) -> Option<String> {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(key)
    } else {
        None
    }
}
