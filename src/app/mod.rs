//! The application: built once, run until cancelled.
//!
//! [`App::build`] opens and migrates the database and binds the listener
//! (so a test can read the port before anything runs); [`App::run`] starts
//! the writer, reconciles what earlier incarnations left, and runs the
//! engine, the supervisor and the HTTP server until shutdown. Tests start
//! exactly what production starts.
//!
//! Ownership: `run` owns every long-lived task and awaits each one; none is
//! detached. The loops are declared in `parts` and owned by one
//! [`Loops`]; the shutdown order is the list of steps at the end of
//! [`App::run`].

mod parts;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::parts::Parts;
use crate::api;
use crate::clock::SharedClock;
use crate::cluster::Membership;
use crate::config::Config;
use crate::fault::Faults;
use crate::health::Health;
use crate::loops::Loops;
use crate::loops::Services;
use crate::metrics::Metrics;
use crate::orphans::Orphans;
use crate::run::Incarnation;
use crate::shutdown::Shutdown;
use crate::store::{JobChange, SqliteOptions, Store, StoreError, WriterTask};

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
    listener: TcpListener,
    services: Services,
    writer: WriterTask,
    changes: mpsc::UnboundedReceiver<JobChange>,
    /// For changes heard from other replicas (and re-plan requests).
    notices: mpsc::UnboundedSender<JobChange>,
    membership: Arc<Membership>,
    health: Arc<Health>,
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
        let orphans = Arc::new(Orphans::new(metrics.clone(), store.events().clone()));
        Ok(Self {
            config,
            listener,
            services: Services {
                store,
                clock,
                metrics: metrics.clone(),
            },
            writer,
            changes,
            notices,
            membership,
            health: Arc::new(Health::new()),
            orphans,
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

    /// Runs until `shutdown.stop` (or until another replica fences this
    /// one), then shuts down in order.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AppError> {
        let writer = tokio::spawn(
            self.writer.run(
                self.health
                    .heartbeat("store_writer", self.config.loop_stale_after),
                self.services.metrics.clone(),
            ),
        );
        let cx = parts::Cx {
            config: self.config,
            services: self.services,
            notices: self.notices,
            membership: self.membership,
            health: self.health,
            incarnation: self.incarnation,
            faults: self.faults,
            orphans: self.orphans,
        };
        let lease = cx.recover().await?;
        tracing::info!(incarnation = %cx.incarnation, addr = %self.listener.local_addr().map_err(AppError::Serve)?, "cronguard started");
        let Parts {
            router,
            streams,
            loops: main_loops,
            lease: lease_loops,
            supervisor,
            reaper,
        } = cx.assemble(self.changes, lease)?;
        // The HTTP server outlives the drain: while runs finish, `/readyz`
        // answers 503 (load balancers stop sending traffic) and the API
        // still answers reads.
        let http_stop = CancellationToken::new();
        let server = api::serve::spawn(
            self.listener.into_std().map_err(AppError::Serve)?,
            router,
            http_stop.clone(),
        )
        .map_err(AppError::Serve)?;
        let loops = Loops::new(
            cx.health.clone(),
            cx.services.metrics.clone(),
            cx.faults.clone(),
            cx.config.loop_stale_after,
        );
        let stop = shutdown.stop.clone();
        let running = loops.start(&stop, main_loops);
        // The lease is renewed until every run here is recorded: a
        // draining replica is alive, its runs are not orphans.
        let lease_stop = CancellationToken::new();
        let leasing = loops.start(&lease_stop, lease_loops);

        let fenced = cx.stopped_or_fenced(&stop).await;
        // 1. Readiness off; replicas hand their jobs over now, not when
        //    the lease expires.
        cx.leave().await;
        // 2. The engine stops firing; every other loop stops.
        running.join().await;
        // 3. Runs drain (grace, cancel, kill); no descendant outlives them.
        supervisor.lock().await.drain(shutdown.kill.clone()).await;
        reaper.sweep().await;
        drop((supervisor, reaper));
        // 4. The lease is released.
        lease_stop.cancel();
        leasing.join().await;
        // 5. HTTP stops (event streams end first: the server waits for
        //    every open response).
        streams.cancel();
        http_stop.cancel();
        let served = server.wait().await.map_err(AppError::Serve);
        // 6. The store records the stop, commits what is left and closes.
        cx.close(writer).await;
        tracing::info!("cronguard stopped");
        if fenced {
            return Err(AppError::Fenced);
        }
        served
    }
}
