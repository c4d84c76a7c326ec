//! The application: built once, run until cancelled.
//!
//! [`App::build`] opens and migrates the database and binds the listener
//! (so a test can read the port before anything runs); [`App::run`] starts
//! the writer, reconciles what earlier incarnations left, and runs the
//! engine, the supervisor and the HTTP server until shutdown. Tests start
//! exactly what production starts.
//!
//! Ownership: `run` owns every long-lived task and awaits each one; none is
//! detached. Shutdown order: readiness goes red, the server stops accepting
//! and finishes in-flight requests, the engine stops firing, the supervisor
//! drains runs (grace, cancel, kill), then the incarnation is marked stopped
//! and the writer commits what is left and closes the database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::action::ActionPolicy;
use crate::api::{self, ApiContext, HttpLimits};
use crate::backend::Contact;
use crate::backend::client::BackendClient;
use crate::backend::metrics::SyncMetrics;
use crate::backend::pull::Puller;
use crate::backend::upload::Uploader;
use crate::clock::SharedClock;
use crate::cluster::Membership;
use crate::cluster::lease::Lease;
use crate::cluster::listen::Listener;
use crate::config::Config;
use crate::engine::{Engine, EngineContext};
use crate::executor::{Executor, ExecutorConfig};
use crate::fault::Faults;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::orphans::Orphans;
use crate::orphans::reaper::Reaper;
use crate::retention::Retention;
use crate::run::Incarnation;
use crate::shutdown::Shutdown;
use crate::store::WriterTask;
use crate::store::{JobChange, SqliteOptions, Store, StoreError};
use crate::supervisor::loops::{RestartBudget, supervise};
use crate::supervisor::{Supervisor, SupervisorConfig, TaskContext};

/// Why the application could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr} (setting `listen`): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The server failed.
    #[error("server: {0}")]
    Serve(std::io::Error),
    /// The control backend client could not be set up.
    #[error("control backend: {0}")]
    Backend(String),
    /// Another replica declared this one stopped (its lease expired): it
    /// stopped; a restart joins again as a new incarnation.
    #[error("this replica was declared stopped by another replica (its lease expired); restart it")]
    Fenced,
}

/// A built application, ready to run.
pub struct App {
    config: Config,
    clock: SharedClock,
    listener: TcpListener,
    store: Store,
    writer: WriterTask,
    changes: mpsc::UnboundedReceiver<JobChange>,
    /// For changes heard from other replicas (and re-plan requests).
    notices: mpsc::UnboundedSender<JobChange>,
    membership: Arc<Membership>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    incarnation: Incarnation,
    faults: Arc<Faults>,
    orphans: Arc<Orphans>,
}

impl App {
    /// Opens (creating and migrating) the database and binds the listener.
    pub async fn build(config: Config, clock: SharedClock) -> Result<Self, AppError> {
        let (tx, changes) = mpsc::unbounded_channel();
        let notices = tx.clone();
        let mut options = SqliteOptions::new(config.database.clone());
        options.synchronous = config.sqlite_synchronous;
        options.outbox = config.backend.is_some();
        let (store, writer) = Store::open(&options, tx).await?;
        let incarnation = Incarnation::new();
        let membership = Arc::new(if store.shared() {
            Membership::clustered(incarnation, config.replica_lease)
        } else {
            Membership::solo(incarnation)
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen,
                source,
            })?;
        let metrics = Arc::new(Metrics::new());
        Ok(Self {
            config,
            clock,
            listener,
            store,
            writer,
            changes,
            notices,
            membership,
            health: Arc::new(Health::new()),
            orphans: Arc::new(Orphans::new(metrics.clone())),
            metrics,
            incarnation,
            faults: Arc::new(Faults::new()),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Probe state (tests await readiness through it).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Fault injection (armed only in `fault-injection` builds).
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// This process's incarnation id.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// Runs until `shutdown.stop`, then shuts down in order.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AppError> {
        let Self {
            config,
            clock,
            listener,
            store,
            writer,
            changes,
            notices,
            membership,
            health,
            metrics,
            incarnation,
            faults,
            orphans,
        } = self;
        let stale = config.loop_stale_after;
        let writer = tokio::spawn(writer.run(health.heartbeat("store_writer", stale), metrics.clone()));

        store
            .register_incarnation(incarnation, membership.host().to_owned(), clock.now())
            .await?;
        // Alone, every earlier incarnation is gone; among replicas, only
        // those whose lease expired.
        let now = clock.now();
        let expired_before = membership
            .lease()
            .map(|lease| now - chrono::TimeDelta::from_std(lease).unwrap_or(chrono::TimeDelta::MAX));
        crate::orphans::reconcile_previous_incarnations(
            &store,
            &orphans,
            incarnation,
            now,
            expired_before,
            config.orphan_policy,
        )
        .await?;
        let lease = Arc::new(Lease {
            membership: membership.clone(),
            store: store.clone(),
            clock: clock.clone(),
            changes: notices.clone(),
            orphans: orphans.clone(),
            policy: config.orphan_policy,
            metrics: metrics.clone(),
        });
        if store.shared() {
            // Join before the engine loads: it schedules the jobs this
            // replica owns in the live set just read.
            let mut renewed = clock.now();
            lease.round(&mut renewed).await?;
        }
        health.set_recovered();
        tracing::info!(%incarnation, addr = %listener.local_addr().map_err(AppError::Serve)?, "cronguard started");

        let actions = ActionPolicy {
            commands_enabled: config.enable_command_jobs,
            command_allowlist: config.command_allowlist.clone(),
            deny_private_networks: config.deny_private_networks,
            loading: false,
        };
        let executor = Executor::new(
            ExecutorConfig {
                actions: actions.clone(),
                output_tail_bytes: config.output_tail_bytes,
                action_proxy: config.action_proxy.clone(),
                shim: config.command_shim.clone(),
            },
            store.clone(),
            clock.clone(),
        )?;
        let processes = config.process_supervision.then(|| executor.processes().clone());
        let backend = match &config.backend {
            Some(b) => {
                let token = b.token.as_ref().map(crate::backend::Secret::expose);
                let client = BackendClient::new(&b.url, token, incarnation, b.timeout, b.max_body_bytes)
                    .map_err(AppError::Backend)?;
                let stale_after = b.poll_interval * 3 + b.timeout;
                let contact = Arc::new(Contact::new(
                    metrics.clone(),
                    b.contact_max_age,
                    stale_after,
                    clock.now(),
                ));
                tracing::info!(url = %b.url, "control backend configured");
                Some((b.clone(), client, contact))
            }
            None => None,
        };
        let (supervisor, handle) = Supervisor::new(
            TaskContext {
                store: store.clone(),
                executor,
                clock: clock.clone(),
                metrics: metrics.clone(),
            },
            SupervisorConfig {
                max_running: config.max_running,
                shutdown_grace: config.shutdown_grace,
                incarnation,
            },
        );
        let ctx = Arc::new(ApiContext {
            store: store.clone(),
            supervisor: handle.clone(),
            clock: clock.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            orphans: orphans.clone(),
            faults: faults.clone(),
            actions: actions.clone(),
            incarnation,
            membership: membership.clone(),
            started_at: clock.now(),
            tokens: config.tokens.clone(),
            max_jobs: config.max_jobs,
            backend: backend.as_ref().map(|(_, _, contact)| contact.clone()),
        });
        let router = api::router(
            ctx,
            HttpLimits {
                max_body_bytes: config.max_body_bytes,
                request_timeout: config.request_timeout,
                max_concurrent_requests: config.max_concurrent_requests,
            },
        );

        let stop = shutdown.stop.clone();
        let budget = RestartBudget::default();
        // The HTTP server outlives the drain: while runs finish, `/readyz`
        // answers 503 (load balancers stop sending traffic) and the API
        // still answers reads. It stops once every run is recorded.
        let http_stop = CancellationToken::new();
        let server = api::serve::spawn(
            listener.into_std().map_err(AppError::Serve)?,
            router,
            http_stop.clone(),
        )
        .map_err(AppError::Serve)?;
        let readiness = async {
            stop.cancelled().await;
            health.set_shutting_down();
            tracing::info!("shutting down: readiness is failing, draining runs");
            // Replicas: hand the jobs over now, not when the lease expires.
            membership.leave();
            if store.shared()
                && let Err(e) = store.leave(incarnation, clock.now()).await
            {
                tracing::warn!(error = %e, "could not record that this replica leaves");
            }
        };
        // A fenced replica stops as if told to (its runs were taken over).
        let fencing = async {
            tokio::select! {
                () = membership.fenced().cancelled() => {
                    tracing::error!("fenced: stopping this replica");
                    stop.cancel();
                    true
                }
                () = stop.cancelled() => false,
            }
        };

        // The engine: rebuilt from the store on every (re)start; the change
        // feed outlives its incarnations.
        let changes = Arc::new(tokio::sync::Mutex::new(changes));
        let engine_beat = health.heartbeat("engine", stale);
        let engine_ctx = EngineContext {
            store: store.clone(),
            clock: clock.clone(),
            supervisor: handle.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            interval: config.engine_tick,
            membership: membership.clone(),
        };
        let engine = supervise(engine_beat.clone(), metrics.clone(), budget, stop.clone(), || {
            let (ctx, beat, changes) = (engine_ctx.clone(), engine_beat.clone(), changes.clone());
            let (stop, faults) = (stop.clone(), faults.clone());
            async move {
                let mut changes = changes.lock().await;
                Engine::new(ctx, beat).run(&mut changes, &stop, &faults).await
            }
        });

        // The run supervisor: its state (and every run task) survives a
        // restart of its loop.
        let supervisor = Arc::new(tokio::sync::Mutex::new(supervisor));
        let supervisor_beat = health.heartbeat("supervisor", stale);
        let supervising = supervise(
            supervisor_beat.clone(),
            metrics.clone(),
            budget,
            stop.clone(),
            || {
                let (supervisor, beat, stop, faults) = (
                    supervisor.clone(),
                    supervisor_beat.clone(),
                    stop.clone(),
                    faults.clone(),
                );
                async move {
                    supervisor.lock().await.serve(&stop, &beat, &faults).await;
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        );

        let reaper = Arc::new(Reaper {
            store: store.clone(),
            supervisor: handle.clone(),
            orphans: orphans.clone(),
            metrics: metrics.clone(),
            incarnation,
            clock: clock.clone(),
            processes,
            interval: config.reaper_interval,
        });
        let reaper_beat = health.heartbeat("reaper", stale + config.reaper_interval);
        let reaping = supervise(reaper_beat.clone(), metrics.clone(), budget, stop.clone(), || {
            let (reaper, beat, stop, faults) =
                (reaper.clone(), reaper_beat.clone(), stop.clone(), faults.clone());
            async move { reaper.run(&stop, &beat, &faults).await }
        });

        let retention = Arc::new(Retention {
            store: store.clone(),
            clock: clock.clone(),
            defaults: config.history,
            interval: config.retention_interval,
        });
        let retention_beat = health.heartbeat("retention", stale + config.retention_interval);
        let retaining = supervise(
            retention_beat.clone(),
            metrics.clone(),
            budget,
            stop.clone(),
            || {
                retention
                    .clone()
                    .run(stop.clone(), retention_beat.clone(), faults.clone())
            },
        );

        // The control backend's loops. Startup never waits for the backend:
        // the engine already runs the last known backend jobs from the store.
        let syncing = async {
            let Some((b, client, contact)) = backend else {
                return;
            };
            let sync_metrics = SyncMetrics::new(&metrics);
            let threshold = stale + b.timeout;
            let puller = Arc::new(Puller {
                client: client.clone(),
                store: store.clone(),
                clock: clock.clone(),
                contact: contact.clone(),
                metrics: sync_metrics.clone(),
                actions: actions.clone(),
                max_jobs: config.max_jobs,
                interval: b.poll_interval,
            });
            let pull_beat = health.heartbeat("backend_sync", threshold);
            let pulling = supervise(pull_beat.clone(), metrics.clone(), budget, stop.clone(), || {
                puller
                    .clone()
                    .run(stop.clone(), pull_beat.clone(), faults.clone())
            });
            let uploader = Arc::new(Uploader {
                client,
                store: store.clone(),
                clock: clock.clone(),
                contact,
                metrics: sync_metrics,
                incarnation,
                limit: b.outbox_limit,
                batch: b.upload_batch,
                max_backoff: b.max_backoff,
                signal: store.outbox_signal(),
            });
            let upload_beat = health.heartbeat("uploader", threshold);
            let uploading = supervise(upload_beat.clone(), metrics.clone(), budget, stop.clone(), || {
                uploader
                    .clone()
                    .run(stop.clone(), upload_beat.clone(), faults.clone())
            });
            tokio::join!(pulling, uploading);
        };

        // Replicas: the lease and the change listener.
        // Replicas: the change listener stops with the engine; the lease is
        // renewed until every run here is recorded (a draining replica is
        // alive: its runs must not be taken for orphans).
        let lease_stop = CancellationToken::new();
        let listening = async {
            if !store.shared() {
                return;
            }
            let listener = Arc::new(Listener {
                store: store.clone(),
                changes: notices.clone(),
            });
            let listen_beat = health.heartbeat("replica_listener", stale);
            supervise(listen_beat.clone(), metrics.clone(), budget, stop.clone(), || {
                listener
                    .clone()
                    .run(stop.clone(), listen_beat.clone(), faults.clone())
            })
            .await;
        };
        let leasing = async {
            if !store.shared() {
                return;
            }
            let lease_beat = health.heartbeat("replica_lease", stale);
            supervise(
                lease_beat.clone(),
                metrics.clone(),
                budget,
                lease_stop.clone(),
                || {
                    lease
                        .clone()
                        .run(lease_stop.clone(), lease_beat.clone(), faults.clone())
                },
            )
            .await;
        };

        let stopping = async {
            let (fenced, ..) = tokio::join!(
                fencing,
                readiness,
                engine,
                supervising,
                reaping,
                retaining,
                syncing,
                listening
            );
            supervisor.lock().await.drain(shutdown.kill.clone()).await;
            reaper.sweep().await;
            lease_stop.cancel();
            http_stop.cancel();
            fenced
        };
        let (served, fenced, ()) = tokio::join!(
            async { server.wait().await.map_err(AppError::Serve) },
            stopping,
            leasing
        );
        drop((handle, reaper, notices));

        if let Err(e) = store.stop_incarnation(incarnation, clock.now()).await {
            tracing::warn!(error = %e, "could not record the stop of this incarnation");
        }
        if let Err(e) = store.close().await {
            tracing::warn!(error = %e, "closing the store failed");
        }
        match tokio::time::timeout(Duration::from_secs(10), writer).await {
            Ok(_) => {}
            Err(_) => tracing::error!("the database writer did not finish within 10s"),
        }
        tracing::info!("cronguard stopped");
        if fenced {
            return Err(AppError::Fenced);
        }
        served
    }
}
