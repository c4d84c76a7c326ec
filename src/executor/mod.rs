//! Runs one attempt of an action and reports how it ended.
//!
//! The executor never records anything itself: it returns an [`Outcome`]
//! and the supervisor, which owns the run, writes it. Every attempt has a
//! deadline and honours its cancellation token; command attempts kill their
//! whole process group on either.

mod command;
mod http;
pub mod live;
mod output;
pub mod shim;
#[cfg(feature = "fault-injection")]
mod test;

/// The first argument that makes the cronguard binary act as the shim.
pub const SHIM_ARG: &str = "__shim";

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_util::sync::CancellationToken;

use crate::action::Action;
use crate::clock::SharedClock;
use crate::job::JobId;
use crate::run::{Outcome, RunId};
use crate::store::Store;

pub use self::command::{ProcessInfo, ProcessTable};
pub use self::output::Tail;

/// The occurrence identity every action receives (headers or environment),
/// so receivers can deduplicate a fire that was executed twice.
#[derive(Debug, Clone)]
pub struct Occurrence {
    /// The job.
    pub job_id: JobId,
    /// The job's name.
    pub job_name: String,
    /// This run.
    pub run_id: RunId,
    /// The nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// Attempt number, from 1.
    pub attempt: u32,
}

impl Occurrence {
    /// `scheduled_at` as RFC 3339 with milliseconds, in UTC.
    pub fn scheduled_at_text(&self) -> String {
        self.scheduled_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// Settings the operator chose for execution.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// What actions may do (checked again at run time: the operator may
    /// have narrowed it since a job was stored).
    pub actions: crate::action::ActionPolicy,
    /// Bytes of output kept per run.
    pub output_tail_bytes: usize,
    /// Where HTTP actions go through a proxy (`--action-proxy`). Proxy
    /// variables in the environment are never used for actions.
    pub action_proxy: Option<url::Url>,
    /// The cronguard binary, run as `__shim` around every command so no
    /// descendant outlives the service; `None` spawns commands directly
    /// (only the direct child then gets the parent-death signal).
    pub shim: Option<std::path::PathBuf>,
}

/// Runs actions; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    config: ExecutorConfig,
    http: reqwest::Client,
    store: Store,
    processes: ProcessTable,
    live: Arc<live::LiveOutput>,
    #[cfg_attr(
        not(feature = "fault-injection"),
        expect(dead_code, reason = "used by the test action")
    )]
    clock: SharedClock,
}

/// How an attempt is to be bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The attempt's timeout.
    pub timeout: Duration,
    /// SIGTERM-to-SIGKILL grace for command process groups.
    pub kill_grace: Duration,
}

impl Executor {
    /// An executor with one shared HTTP client (connection reuse across runs).
    pub fn new(config: ExecutorConfig, store: Store, clock: SharedClock) -> Result<Self, reqwest::Error> {
        // reqwest is built without a default TLS provider (ring is lighter to
        // build than aws-lc); install ring once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("cronguard/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            // Keep every connection of a burst for the next one (reqwest's
            // default: unbounded, closed after 90 s idle). Connections are
            // bounded by the runs in flight (`--max-running`); capping the
            // idle pool below that makes each burst reconnect.
            .connect_timeout(Duration::from_secs(10))
            // HTTP_PROXY and friends would hand the target's name to a
            // proxy, past the SSRF guard's resolver: only an explicit
            // `--action-proxy` sends actions through one.
            .no_proxy();
        match &config.action_proxy {
            Some(proxy) => http = http.proxy(reqwest::Proxy::all(proxy.as_str())?),
            // Names are checked when they resolve, so a name that points
            // at a private address (or is re-pointed later) is refused too.
            // Through a proxy the proxy resolves; `execute` checks first.
            None if config.actions.deny_private_networks => {
                http = http.dns_resolver(Arc::new(http::PublicOnly));
            }
            None => {}
        }
        let http = http.build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                store,
                processes: ProcessTable::default(),
                live: Arc::default(),
                clock,
            }),
        })
    }

    /// The output of command runs executing now, for live followers.
    pub fn live(&self) -> Arc<live::LiveOutput> {
        self.inner.live.clone()
    }

    /// The leaders of command runs alive now (for the stray reaper).
    pub fn processes(&self) -> &ProcessTable {
        &self.inner.processes
    }

    /// Sends one notification: a POST of `body` to `url` on the actions'
    /// client, under the same SSRF guard and proxy rules. `Ok` with the
    /// status when a 2xx answered; otherwise why not (without the URL: a
    /// secret URL must not reach a log line or the API).
    pub async fn post(
        &self,
        url: &reqwest::Url,
        headers: reqwest::header::HeaderMap,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<u16, String> {
        let cfg = &self.inner.config;
        if cfg.actions.deny_private_networks {
            http::check_destination(url, cfg.action_proxy.is_some()).await?;
        }
        http::post(&self.inner.http, url, headers, body, timeout).await
    }

    /// Runs one attempt. `cancel` ends it early with `cancelled`.
    pub async fn execute(
        &self,
        action: &Action,
        occurrence: &Occurrence,
        limits: Limits,
        cancel: &CancellationToken,
    ) -> Outcome {
        let cfg = &self.inner.config;
        match action {
            Action::Http(a) => {
                if let Some(name) = a
                    .headers
                    .keys()
                    .find(|h| crate::action::forbidden_header(h.as_str()).is_some())
                {
                    return Outcome::failed(format!(
                        "the job sets header {name}, which jobs may no longer set; replace the job without it"
                    ));
                }
                if cfg.actions.deny_private_networks
                    && let Err(e) = http::check_destination(&a.url, cfg.action_proxy.is_some()).await
                {
                    return Outcome::failed(e);
                }
                http::execute(
                    &self.inner.http,
                    a,
                    occurrence,
                    limits,
                    cfg.output_tail_bytes,
                    cancel,
                )
                .await
            }
            Action::Command(a) => {
                if let Some(why) = a.env.keys().find_map(|name| crate::action::forbidden_env(name)) {
                    return Outcome::failed(format!("refused to start: {why}; replace the job without it"));
                }
                if !cfg.actions.program_allowed(&a.program) {
                    return Outcome::failed(format!(
                        "`{}` is not in the server's command allowlist (--command-allowlist)",
                        a.program
                    ));
                }
                if !cfg.actions.commands_enabled {
                    return Outcome::failed(
                        "command actions are disabled on this server (--enable-command-jobs); \
                         the job was stored while they were enabled",
                    );
                }
                let store = self.inner.store.clone();
                let run_id = occurrence.run_id;
                let on_spawn = move |p: ProcessInfo| async move {
                    if let Err(e) = store
                        .runs()
                        .record_process(run_id, p.pid, p.pgid, p.start_ticks)
                        .await
                    {
                        tracing::warn!(error = %e, "could not record the run's process");
                    }
                };
                command::execute(
                    a,
                    occurrence,
                    limits,
                    cfg.output_tail_bytes,
                    cancel,
                    command::Launch {
                        shim: cfg.shim.as_deref(),
                        table: &self.inner.processes,
                        live: &self.inner.live,
                    },
                    on_spawn,
                )
                .await
            }
            #[cfg(feature = "fault-injection")]
            Action::Test(spec) => {
                test::execute_test_action(spec, occurrence, &self.inner.clock, cancel).await
            }
        }
    }
}
