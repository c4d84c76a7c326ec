//! The application's parts: recovery at startup, the loops and the router
//! built from the configuration, and the steps of shutdown that need the
//! store.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::AppError;
use crate::action::ActionPolicy;
use crate::api::events::Feed;
use crate::api::{self, ApiContext, HttpLimits};
use crate::backend::Contact;
use crate::backend::client::BackendClient;
use crate::backend::config::BackendConfig;
use crate::backend::metrics::SyncMetrics;
use crate::backend::pull::Puller;
use crate::backend::upload::Uploader;
use crate::cluster::Membership;
use crate::cluster::lease::Lease;
use crate::cluster::listen::Listener;
use crate::config::Config;
use crate::engine::{EngineContext, EngineLoop};
use crate::executor::{Executor, ExecutorConfig};
use crate::fault::Faults;
use crate::health::Health;
use crate::loops::{Loop, Services};
use crate::notifier::{Notifier, NotifierConfig, NotifyMetrics};
use crate::orphans::Orphans;
use crate::orphans::reaper::Reaper;
use crate::retention::Retention;
use crate::run::Incarnation;
use crate::store::JobChange;
use crate::supervisor::{Supervisor, SupervisorConfig, SupervisorHandle, TaskContext};

/// What every part is built from.
pub(super) struct Cx {
    pub config: Config,
    pub services: Services,
    /// For changes heard from other replicas (and re-plan requests).
    pub notices: mpsc::UnboundedSender<JobChange>,
    pub membership: Arc<Membership>,
    pub health: Arc<Health>,
    pub incarnation: Incarnation,
    pub faults: Arc<Faults>,
    pub orphans: Arc<Orphans>,
}

/// The running service, before it runs.
pub(super) struct Parts {
    pub router: Router,
    /// Ends the live event streams (before the HTTP server stops, which
    /// waits for open responses).
    pub streams: tokio_util::sync::CancellationToken,
    /// Stopped by `stop`, in no particular order.
    pub loops: Vec<Arc<dyn Loop>>,
    /// Stopped only once every run is recorded.
    pub lease: Vec<Arc<dyn Loop>>,
    /// Drained after the loops stop.
    pub supervisor: Arc<Mutex<Supervisor>>,
    /// Sweeps escaped processes after the drain.
    pub reaper: Arc<Reaper>,
}

/// How long one notification attempt may take.
const NOTIFY_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The run supervisor, a handle to it, and the orphan reaper.
type Runs = (Arc<Mutex<Supervisor>>, SupervisorHandle, Arc<Reaper>, Executor);

impl Cx {
    /// Records this incarnation, settles what earlier ones left (alone,
    /// every earlier incarnation is gone; among replicas, only those whose
    /// lease expired) and, among replicas, joins the live set before the
    /// engine loads the jobs it owns.
    pub async fn recover(&self) -> Result<Arc<Lease>, AppError> {
        let now = self.services.clock.now();
        self.services
            .store
            .incarnations()
            .register(self.incarnation, self.membership.host().to_owned(), now)
            .await?;
        let expired_before = self
            .membership
            .lease()
            .map(|lease| now - chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX));
        crate::orphans::reconcile_previous_incarnations(
            &self.services.store,
            &self.orphans,
            self.incarnation,
            now,
            expired_before,
            self.config.orphan_policy,
        )
        .await?;
        let lease = Arc::new(Lease {
            membership: self.membership.clone(),
            services: self.services.clone(),
            changes: self.notices.clone(),
            orphans: self.orphans.clone(),
            policy: self.config.orphan_policy,
        });
        if self.services.store.shared() {
            let mut renewed = self.services.clock.now();
            lease.round(&mut renewed).await?;
        }
        self.health.set_recovered();
        Ok(lease)
    }

    /// Every loop and the router, wired.
    pub fn assemble(
        &self,
        changes: mpsc::UnboundedReceiver<JobChange>,
        lease: Arc<Lease>,
    ) -> Result<Parts, AppError> {
        let actions = ActionPolicy {
            commands_enabled: self.config.enable_command_jobs,
            command_allowlist: self.config.command_allowlist.clone(),
            deny_private_networks: self.config.deny_private_networks,
            loading: false,
        };
        let (supervisor, handle, reaper, executor) = self.runs(&actions)?;
        let live = executor.live();
        let engine = EngineLoop::new(
            EngineContext {
                services: self.services.clone(),
                supervisor: handle.clone(),
                health: self.health.clone(),
                interval: self.config.engine_tick,
                membership: self.membership.clone(),
            },
            changes,
        );
        let retention = Retention {
            services: self.services.clone(),
            defaults: self.config.history,
            interval: self.config.retention_interval,
        };
        let notifier = Notifier {
            counters: NotifyMetrics::new(&self.services.metrics),
            late: std::sync::Mutex::default(),
            services: self.services.clone(),
            executor,
            config: NotifierConfig {
                defaults: self.config.notify.clone(),
                give_up_after: self.config.notify_give_up_after,
                attempt_timeout: NOTIFY_ATTEMPT_TIMEOUT,
                actions: actions.clone(),
            },
        };
        let mut loops: Vec<Arc<dyn Loop>> = vec![
            Arc::new(engine),
            supervisor.clone(),
            reaper.clone(),
            Arc::new(retention),
            Arc::new(notifier),
        ];
        let mut contact = None;
        if let Some(b) = &self.config.backend {
            let (puller, uploader) = self.backend(b, &actions)?;
            contact = Some(puller.contact.clone());
            loops.push(Arc::new(puller));
            loops.push(Arc::new(uploader));
        }
        let mut leases: Vec<Arc<dyn Loop>> = Vec::new();
        if self.services.store.shared() {
            loops.push(Arc::new(Listener {
                store: self.services.store.clone(),
                changes: self.notices.clone(),
            }));
            leases.push(lease);
        }
        let feed = Arc::new(Feed::new(
            self.config.events_max_subscribers,
            &self.services.metrics,
        ));
        Ok(Parts {
            router: self.router(handle, actions, contact, (&feed, live)),
            streams: feed.stop.clone(),
            loops,
            lease: leases,
            supervisor,
            reaper,
        })
    }

    /// The run supervisor (over the executor) and the orphan reaper.
    fn runs(&self, actions: &ActionPolicy) -> Result<Runs, AppError> {
        let executor = Executor::new(
            ExecutorConfig {
                actions: actions.clone(),
                output_tail_bytes: self.config.output_tail_bytes,
                action_proxy: self.config.action_proxy.clone(),
                shim: self.config.command_shim.clone(),
            },
            self.services.store.clone(),
            self.services.clock.clone(),
        )?;
        let processes = self
            .config
            .process_supervision
            .then(|| executor.processes().clone());
        let (supervisor, handle) = Supervisor::new(
            TaskContext {
                services: self.services.clone(),
                executor: executor.clone(),
            },
            SupervisorConfig {
                max_running: self.config.max_running,
                shutdown_grace: self.config.shutdown_grace,
                incarnation: self.incarnation,
            },
        );
        let supervisor = Arc::new(Mutex::new(supervisor));
        let reaper = Arc::new(Reaper {
            services: self.services.clone(),
            supervisor: handle.clone(),
            orphans: self.orphans.clone(),
            incarnation: self.incarnation,
            processes,
            interval: self.config.reaper_interval,
        });
        Ok((supervisor, handle, reaper, executor))
    }

    /// The control backend's loops. Startup never waits for the backend:
    /// the engine already runs the last known backend jobs from the store.
    fn backend(&self, b: &BackendConfig, actions: &ActionPolicy) -> Result<(Puller, Uploader), AppError> {
        let token = b.token.as_ref().map(crate::backend::Secret::expose);
        let client = BackendClient::new(&b.url, token, self.incarnation, b.timeout, b.max_body_bytes)
            .map_err(AppError::Backend)?;
        let stale_after = b.poll_interval * 3 + b.timeout;
        let contact = Arc::new(Contact::new(
            self.services.metrics.clone(),
            Some(self.services.store.events().clone()),
            b.contact_max_age,
            stale_after,
            self.services.clock.now(),
        ));
        tracing::info!(url = %b.url, "control backend configured");
        let metrics = SyncMetrics::new(&self.services.metrics);
        let puller = Puller {
            client: client.clone(),
            services: self.services.clone(),
            contact: contact.clone(),
            counters: metrics.clone(),
            actions: actions.clone(),
            max_jobs: self.config.max_jobs,
            interval: b.poll_interval,
        };
        let uploader = Uploader {
            client,
            services: self.services.clone(),
            contact,
            counters: metrics,
            incarnation: self.incarnation,
            limit: b.outbox_limit,
            batch: b.upload_batch,
            max_backoff: b.max_backoff,
            signal: self.services.store.outbox().signal(),
        };
        Ok((puller, uploader))
    }

    fn router(
        &self,
        supervisor: SupervisorHandle,
        actions: ActionPolicy,
        backend: Option<Arc<Contact>>,
        (feed, live): (&Arc<Feed>, Arc<crate::executor::live::LiveOutput>),
    ) -> Router {
        let ctx = Arc::new(ApiContext {
            services: self.services.clone(),
            supervisor,
            health: self.health.clone(),
            orphans: self.orphans.clone(),
            faults: self.faults.clone(),
            actions,
            incarnation: self.incarnation,
            membership: self.membership.clone(),
            started_at: self.services.clock.now(),
            tokens: self.config.tokens.clone(),
            max_jobs: self.config.max_jobs,
            backend,
            feed: feed.clone(),
            live,
        });
        api::router(
            ctx,
            HttpLimits {
                max_body_bytes: self.config.max_body_bytes,
                request_timeout: self.config.request_timeout,
                max_concurrent_requests: self.config.max_concurrent_requests,
            },
        )
    }

    /// Waits for `stop`; a replica that another one fenced (its runs were
    /// taken over) stops as if told to. `true` when fenced.
    pub async fn stopped_or_fenced(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            () = self.membership.fenced().cancelled() => {
                tracing::error!("fenced: stopping this replica");
                stop.cancel();
                true
            }
            () = stop.cancelled() => false,
        }
    }

    /// Readiness fails from now on; a replica records that it leaves, so
    /// the others take its jobs over without waiting for its lease.
    pub async fn leave(&self) {
        self.health.set_shutting_down();
        tracing::info!("shutting down: readiness is failing, draining runs");
        self.membership.leave();
        if self.services.store.shared()
            && let Err(e) = self
                .services
                .store
                .incarnations()
                .leave(self.incarnation, self.services.clock.now())
                .await
        {
            tracing::warn!(error = %e, "could not record that this replica leaves");
        }
    }

    /// Records the stop of this incarnation and closes the store; the
    /// writer commits what is queued first.
    pub async fn close(self, writer: JoinHandle<()>) {
        if let Err(e) = self
            .services
            .store
            .incarnations()
            .stop(self.incarnation, self.services.clock.now())
            .await
        {
            tracing::warn!(error = %e, "could not record the stop of this incarnation");
        }
        if let Err(e) = self.services.store.close().await {
            tracing::warn!(error = %e, "closing the store failed");
        }
        drop(self.notices);
        if tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .is_err()
        {
            tracing::error!("the database writer did not finish within 10s");
        }
    }
}
