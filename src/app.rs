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

use crate::action::ActionPolicy;
use crate::api::{self, ApiContext, HttpLimits};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::engine::Engine;
use crate::executor::{Executor, ExecutorConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::run::Incarnation;
use crate::shutdown::Shutdown;
use crate::store::WriterTask;
use crate::store::{JobChange, SqliteOptions, Store, StoreError};
use crate::supervisor::{Supervisor, SupervisorConfig, TaskContext};

/// Threshold after which the engine's heartbeat counts as stale.
pub const ENGINE_STALE_AFTER: Duration = Duration::from_secs(10);

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
}

/// A built application, ready to run.
pub struct App {
    config: Config,
    clock: SharedClock,
    listener: TcpListener,
    store: Store,
    writer: WriterTask,
    changes: mpsc::UnboundedReceiver<JobChange>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    incarnation: Incarnation,
}

impl App {
    /// Opens (creating and migrating) the database and binds the listener.
    pub async fn build(config: Config, clock: SharedClock) -> Result<Self, AppError> {
        let (tx, changes) = mpsc::unbounded_channel();
        let mut options = SqliteOptions::new(config.database.clone());
        options.synchronous = config.sqlite_synchronous;
        let (store, writer) = Store::open(&options, tx).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self {
            config,
            clock,
            listener,
            store,
            writer,
            changes,
            health: Arc::new(Health::new()),
            metrics: Arc::new(Metrics::new()),
            incarnation: Incarnation::new(),
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
            mut changes,
            health,
            metrics,
            incarnation,
        } = self;
        let writer = tokio::spawn(writer.run());

        store.register_incarnation(incarnation, clock.now()).await?;
        crate::orphans::reconcile_previous_incarnations(&store, incarnation, clock.now()).await?;
        health.set_recovered();
        tracing::info!(%incarnation, addr = %listener.local_addr().map_err(AppError::Serve)?, "cronguard started");

        let executor = Executor::new(
            ExecutorConfig {
                commands_enabled: config.enable_command_jobs,
                output_tail_bytes: config.output_tail_bytes,
            },
            store.clone(),
            clock.clone(),
        )?;
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
        let engine_beat = health.heartbeat("engine", ENGINE_STALE_AFTER);
        let mut engine = Engine::new(
            store.clone(),
            clock.clone(),
            handle.clone(),
            health.clone(),
            engine_beat,
            config.engine_tick,
        );
        let ctx = Arc::new(ApiContext {
            store: store.clone(),
            supervisor: handle,
            clock: clock.clone(),
            health: health.clone(),
            metrics,
            actions: ActionPolicy {
                commands_enabled: config.enable_command_jobs,
            },
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
        let server = {
            let health = health.clone();
            let stop = stop.clone();
            axum::serve(listener, router).with_graceful_shutdown(async move {
                stop.cancelled().await;
                health.set_shutting_down();
            })
        };
        let engine_task = async {
            while let Err(e) = engine.run(&mut changes, &stop).await {
                tracing::error!(error = %e, "engine failed; reloading in 1s");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        };
        let supervise = supervisor.run(stop.clone(), shutdown.kill.clone());
        let (served, (), ()) = tokio::join!(
            async { server.await.map_err(AppError::Serve) },
            engine_task,
            supervise
        );
        drop(engine);

        if let Err(e) = store.stop_incarnation(incarnation, clock.now()).await {
            tracing::warn!(error = %e, "could not record the stop of this incarnation");
        }
        drop(store);
        match tokio::time::timeout(Duration::from_secs(10), writer).await {
            Ok(_) => {}
            Err(_) => tracing::error!("the database writer did not finish within 10s"),
        }
        tracing::info!("cronguard stopped");
        served
    }
}
