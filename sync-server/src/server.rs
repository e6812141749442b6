//! Creating a data dir (`init`) and running the server (`serve`): `Server::bind` returns a
//! handle with `local_addr()`, `shutdown()` and `join()`, so tests run it in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{CONFIG_FILE, Config, ConfigError, DATABASE_FILE};
use crate::feed::Feed;
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::pki::{Pki, PkiError};
use crate::store::postgres::PoolOptions;
use crate::store::{AnyStore, LogRetention, PostgresStore, SqliteStore, Store, StoreError};

/// Why the server could not be set up or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{} already exists and is not empty; refusing to overwrite a data dir", .0.display())]
    DataDirExists(PathBuf),
    #[error("{} is not an initialised data dir (no {DATABASE_FILE}, and server.toml names no database_url); run `cpis-sync-server init` first", .0.display())]
    NotInitialised(PathBuf),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTPS: {0}")]
    Serve(std::io::Error),
    #[error("a server task failed: {0}")]
    Task(String),
    /// Another `serve` holds the SQLite data dir (SQLite allows one writing server).
    #[error(
        "{} is already being served by another cpis-sync-server ({holder}); a SQLite data dir \
         takes one `serve` at a time: stop that one first, or run several replicas on \
         PostgreSQL",
        dir.display()
    )]
    AlreadyServing { dir: PathBuf, holder: String },
}

/// The lock a `serve` holds on its SQLite data dir for as long as it runs: an exclusive
/// advisory lock on `DIR/serve.lock`, which names its holder. The kernel drops it when the
/// process ends, however it ends, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub struct ServeLock {
    _file: std::fs::File,
}

/// The lock file of a data dir.
pub const SERVE_LOCK_FILE: &str = "serve.lock";

impl ServeLock {
    /// Takes the data dir's lock, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, ServerError> {
        use std::io::{Read as _, Seek as _, Write as _};
        let path = data_dir.join(SERVE_LOCK_FILE);
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| ServerError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening the serve lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(ServerError::AlreadyServing {
                    dir: data_dir.to_owned(),
                    holder: if holder.is_empty() {
                        "a process that has not yet said who it is".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io("locking the serve lock")(e));
            }
        }
        let who = format!(
            "pid {} since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(who.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(io("writing the serve lock"))?;
        Ok(Self { _file: file })
    }
}

/// Creates a data dir on SQLite: keys and certificates, `server.toml` and the migrated
/// database. Refuses a path that exists and is not empty.
pub fn init(data_dir: &Path, hostnames: &[String]) -> Result<(), ServerError> {
    refuse_used_dir(data_dir)?;
    create_dir(data_dir, hostnames, None)?;
    SqliteStore::open(&data_dir.join(DATABASE_FILE))?;
    Ok(())
}

/// Creates a data dir; with `database` (a PostgreSQL URL) the schema is created in that
/// existing database, which must answer and must not hold one already (each further replica
/// copies this data dir instead). Nothing is written when either check fails, and the data
/// dir is removed again when the schema cannot be created.
pub async fn init_with(
    data_dir: &Path,
    hostnames: &[String],
    database: Option<&str>,
) -> Result<(), ServerError> {
    let Some(url) = database else {
        return init(data_dir, hostnames);
    };
    refuse_used_dir(data_dir)?;
    let store = PostgresStore::new(url, PoolOptions::default())?;
    store.refuse_initialised().await.map_err(|e| match e {
        StoreError::Unavailable(why) => StoreError::Unavailable(format!(
            "cannot reach {}: {why}; nothing was created",
            store.shown_url()
        )),
        other => other,
    })?;
    create_dir(data_dir, hostnames, Some(url))?;
    if let Err(e) = store.migrate().await {
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(e.into());
    }
    Ok(())
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError {
    let path = path.to_owned();
    move |source| ServerError::Io {
        action,
        path,
        source,
    }
}

fn refuse_used_dir(data_dir: &Path) -> Result<(), ServerError> {
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir).map_err(io_error("reading", data_dir))?;
        if entries.next().is_some() {
            return Err(ServerError::DataDirExists(data_dir.to_owned()));
        }
    }
    Ok(())
}

/// The data dir with its keys, certificates and `server.toml`.
fn create_dir(
    data_dir: &Path,
    hostnames: &[String],
    database: Option<&str>,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(data_dir).map_err(io_error("creating", data_dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("securing", data_dir))?;
    }
    Pki::create(data_dir, hostnames)?;
    let config_path = data_dir.join(CONFIG_FILE);
    std::fs::write(&config_path, Config::file_for(database))
        .map_err(io_error("writing", &config_path))?;
    Ok(())
}

/// The store of an initialised data dir, as its configuration names it: PostgreSQL when
/// `database_url` is set (nothing is connected yet), else SQLite in the data dir.
pub fn open_store(data_dir: &Path, config: &Config) -> Result<AnyStore, ServerError> {
    if let Some(url) = &config.database_url {
        if !data_dir.join(CONFIG_FILE).exists() {
            return Err(ServerError::NotInitialised(data_dir.to_owned()));
        }
        return Ok(AnyStore::Postgres(PostgresStore::new(
            url,
            PoolOptions {
                max_connections: config.database_max_connections,
                wait: std::time::Duration::from_secs(config.database_timeout_secs.max(1)),
            },
        )?));
    }
    let db = data_dir.join(DATABASE_FILE);
    if !db.exists() {
        return Err(ServerError::NotInitialised(data_dir.to_owned()));
    }
    Ok(AnyStore::Sqlite(SqliteStore::open(&db)?))
}

/// The running server.
#[derive(Debug)]
pub struct Server;

/// A running server's handle.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), ServerError>>,
    store: AnyStore,
    /// Held while the server runs on SQLite (one `serve` per SQLite data dir).
    _lock: Option<ServeLock>,
}

impl Server {
    /// Loads the data dir's keys and database, binds `config.listen` and starts serving.
    pub async fn bind(
        data_dir: &Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<ServerHandle, ServerError> {
        let store = open_store(data_dir, &config)?;
        let lock = match store {
            AnyStore::Sqlite(_) => Some(ServeLock::acquire(data_dir)?),
            AnyStore::Postgres(_) => None,
        };
        let pki = Arc::new(Pki::load(data_dir)?);
        let tls = pki.server_tls_config()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
        let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.metrics_listen,
                source,
            })?;
        let metrics_addr = metrics_listener.local_addr().map_err(ServerError::Serve)?;
        if !metrics_addr.ip().is_loopback() {
            tracing::warn!(%metrics_addr, "/metrics is served beyond loopback: keep that network private");
        }
        // The key chain, not the key file, decides which key signs (see `keys`). SQLite
        // answers at once; PostgreSQL may not be reachable yet: until it is, the key file's key
        // is held but nothing is served (see `ready`).
        let database = Arc::new(DatabaseState::default());
        let signing_key = match &store {
            AnyStore::Sqlite(_) => {
                let key = crate::keys::current_key(data_dir, &store).await?;
                database.set_ready();
                key
            }
            AnyStore::Postgres(_) => {
                crate::pki::read_signing_key(&data_dir.join(crate::pki::FEED_SIGNING_KEY_FILE))?
            }
        };
        let feed = Feed::new(
            signing_key,
            config.policy.policy(),
            Duration::seconds(i64::try_from(config.checkpoint_ttl_secs).unwrap_or(i64::MAX / 2)),
            config.zstd_level,
            config.snapshot_cache_bytes,
        );
        let shutdown = CancellationToken::new();
        let live = crate::live::Heads::new(
            shutdown.clone(),
            crate::live::recheck(config.live_recheck_millis),
            config.live_max_waiting,
        );
        let app = Arc::new(App {
            store: store.clone(),
            data_dir: data_dir.to_owned(),
            feed,
            pki,
            clock,
            metrics: Arc::new(Metrics::new()),
            config,
            database,
            live,
        });
        let router = http::router(app.clone());
        let metrics_router = http::metrics_router(app.clone());
        let options = crate::tls::ServeOptions {
            header_read_timeout: std::time::Duration::from_secs(
                app.config.header_read_timeout_secs.max(1),
            ),
            ..crate::tls::ServeOptions::default()
        };
        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        tasks.spawn(async move {
            crate::tls::serve_with_options(listener, tls, router, token, options)
                .await
                .map_err(ServerError::Serve)
        });
        let token = shutdown.clone();
        tasks.spawn(async move {
            tracing::info!(%metrics_addr, "serving /metrics (plain HTTP)");
            axum::serve(metrics_listener, metrics_router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .map_err(ServerError::Serve)
        });
        if !app.database.is_ready() {
            // Most starts find the database answering: serve at once. Otherwise keep trying
            // in the background while `/healthz` says why nothing is served.
            match become_ready(&app).await {
                Ok(()) => {}
                Err(ServerError::Store(e @ StoreError::SchemaTooNew { .. })) => {
                    return Err(ServerError::Store(e));
                }
                Err(e) => {
                    let problem = format!("database {}: {e}", database_shown(&app.store));
                    tracing::error!("{problem}; nothing is served until it answers; retrying");
                    app.database.set_problem(problem);
                    let token = shutdown.clone();
                    tasks.spawn(connect(app.clone(), token));
                }
            }
        }
        let token = shutdown.clone();
        let watched = app.clone();
        tasks.spawn(async move {
            crate::live::watch_heads(watched, token).await;
            Ok(())
        });
        let token = shutdown.clone();
        tasks.spawn(maintenance(app, token));
        tracing::info!(%local_addr, "cpis-sync-server started");
        Ok(ServerHandle {
            local_addr,
            metrics_addr,
            shutdown,
            tasks,
            store,
            _lock: lock,
        })
    }
}

/// Whether the database has answered since the start, and what is wrong while it has not.
#[derive(Debug, Default)]
pub struct DatabaseState {
    ready: std::sync::atomic::AtomicBool,
    problem: std::sync::Mutex<Option<String>>,
}

impl DatabaseState {
    /// True once the schema is up to date and the key chain read: the server may serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        if let Ok(mut p) = self.problem.lock() {
            *p = None;
        }
    }

    fn set_problem(&self, problem: String) {
        if let Ok(mut p) = self.problem.lock() {
            *p = Some(problem);
        }
    }

    /// Why the server is not serving yet, in words (`/healthz`, the 503 of every route).
    pub fn why_not_ready(&self) -> String {
        self.problem
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .unwrap_or_else(|| "the server is starting".to_owned())
    }
}

/// Waits for PostgreSQL with backoff (0.5 s doubling to 30 s, for as long as it takes), then
/// brings the schema up to date, reads the key chain and lets the server serve.
async fn connect(app: Arc<App<AnyStore>>, shutdown: CancellationToken) -> Result<(), ServerError> {
    use backon::BackoffBuilder as _;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(500))
        .with_max_delay(std::time::Duration::from_secs(30))
        .without_max_times()
        .with_jitter()
        .build();
    let shown = database_shown(&app.store);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delays.next().unwrap_or(std::time::Duration::from_secs(30))) => {}
        }
        match become_ready(&app).await {
            Ok(()) => {
                tracing::info!(database = %shown, "database reached; serving");
                return Ok(());
            }
            Err(ServerError::Store(e @ StoreError::SchemaTooNew { .. })) => {
                return Err(ServerError::Store(e));
            }
            Err(e) => {
                let problem = format!("database {shown}: {e}");
                tracing::error!("{problem}; nothing is served until it answers; retrying");
                app.database.set_problem(problem);
            }
        }
    }
}

/// Brings the schema up to date, reads the key chain and marks the server ready.
async fn become_ready(app: &App<AnyStore>) -> Result<(), ServerError> {
    if let AnyStore::Postgres(pg) = &app.store {
        pg.migrate().await?;
    }
    let key = crate::keys::current_key(&app.data_dir, &app.store).await?;
    app.feed.set_key(key);
    app.database.set_ready();
    Ok(())
}

/// The database, for messages (a PostgreSQL URL without its password, or the SQLite file).
fn database_shown(store: &AnyStore) -> String {
    match store {
        AnyStore::Postgres(pg) => pg.shown_url().to_owned(),
        AnyStore::Sqlite(s) => s.path().display().to_string(),
    }
}

/// Runs retention purge and change-log pruning now and then every interval.
async fn maintenance(
    app: Arc<App<AnyStore>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let interval = std::time::Duration::from_secs(app.config.maintenance_interval_secs.max(1));
    loop {
        if !app.database.is_ready() {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
            }
        }
        if let Err(e) = maintain(&app).await {
            tracing::error!(error = %e, "maintenance failed; will retry");
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// One round of maintenance: purge flags past retention, prune the change log, drop the
/// recent contacts of subjects no longer flagged.
pub async fn maintain<S: Store>(app: &App<S>) -> Result<(), StoreError> {
    let now = app.clock.now();
    let purged = app.store.purge_expired(now.date_naive(), now).await?;
    app.metrics.purged_flags.inc_by(purged);
    if purged > 0 {
        app.live.hint();
    }
    let days = i64::try_from(app.config.change_log_days).unwrap_or(i64::MAX / 86_400 / 2);
    let pruned = app
        .store
        .prune_change_log(LogRetention {
            keep_since: now - Duration::days(days),
            max_versions: app.config.change_log_max_versions,
        })
        .await?;
    // Contacts of subjects no council flags any more serve no one: drop them.
    let contacts = app.store.purge_orphan_contacts().await?;
    app.store.purge_page_sessions(now).await?;
    if purged > 0 || pruned > 0 || contacts > 0 {
        tracing::info!(purged, pruned, contacts, "maintenance");
    }
    Ok(())
}

impl ServerHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of the `/metrics` listener (plain HTTP).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The server's store (tests and tools).
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Asks every task to stop (graceful: in-flight requests finish).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token cancelled when the server stops; cancel it to stop the server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for every task; the first failure stops the others and is returned.
    pub async fn join(mut self) -> Result<(), ServerError> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined
                .map_err(|e| ServerError::Task(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = outcome {
                self.shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            } else {
                // One task ending (e.g. on shutdown) ends the others too.
                self.shutdown.cancel();
            }
        }
        result
    }
}
