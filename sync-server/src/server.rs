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
use crate::store::{LogRetention, SqliteStore, Store, StoreError};

/// Why the server could not be set up or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{} already exists and is not empty; refusing to overwrite a data dir", .0.display())]
    DataDirExists(PathBuf),
    #[error("{} is not an initialised data dir ({DATABASE_FILE} is missing); run `cpis-sync-server init` first", .0.display())]
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

/// Creates a data dir: keys and certificates, `server.toml` and the migrated database.
/// Refuses a path that exists and is not empty.
pub fn init(data_dir: &Path, hostnames: &[String]) -> Result<(), ServerError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| ServerError::Io {
            action,
            path,
            source,
        }
    };
    if data_dir.exists() {
        let mut entries = std::fs::read_dir(data_dir).map_err(io("reading", data_dir))?;
        if entries.next().is_some() {
            return Err(ServerError::DataDirExists(data_dir.to_owned()));
        }
    }
    std::fs::create_dir_all(data_dir).map_err(io("creating", data_dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("securing", data_dir))?;
    }
    Pki::create(data_dir, hostnames)?;
    let config_path = data_dir.join(CONFIG_FILE);
    std::fs::write(&config_path, Config::default_file()).map_err(io("writing", &config_path))?;
    SqliteStore::open(&data_dir.join(DATABASE_FILE))?;
    Ok(())
}

/// Opens the database of an initialised data dir.
pub fn open_store(data_dir: &Path) -> Result<SqliteStore, ServerError> {
    let db = data_dir.join(DATABASE_FILE);
    if !db.exists() {
        return Err(ServerError::NotInitialised(data_dir.to_owned()));
    }
    Ok(SqliteStore::open(&db)?)
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
    store: SqliteStore,
    /// Held while the server runs (one `serve` per SQLite data dir).
    _lock: ServeLock,
}

impl Server {
    /// Loads the data dir's keys and database, binds `config.listen` and starts serving.
    pub async fn bind(
        data_dir: &Path,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<ServerHandle, ServerError> {
        let store = open_store(data_dir)?;
        let lock = ServeLock::acquire(data_dir)?;
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
        // The key chain, not the key file, decides which key signs (see `keys`).
        let signing_key = crate::keys::current_key(data_dir, &store).await?;
        let feed = Feed::new(
            signing_key,
            config.policy.policy(),
            Duration::seconds(i64::try_from(config.checkpoint_ttl_secs).unwrap_or(i64::MAX / 2)),
            config.zstd_level,
            config.snapshot_cache_bytes,
        );
        let app = Arc::new(App {
            store: store.clone(),
            data_dir: data_dir.to_owned(),
            feed,
            pki,
            clock,
            metrics: Arc::new(Metrics::new()),
            config,
        });
        let router = http::router(app.clone());
        let metrics_router = http::metrics_router(app.clone());
        let options = crate::tls::ServeOptions {
            header_read_timeout: std::time::Duration::from_secs(
                app.config.header_read_timeout_secs.max(1),
            ),
            ..crate::tls::ServeOptions::default()
        };
        let shutdown = CancellationToken::new();
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

/// Runs retention purge and change-log pruning now and then every interval.
async fn maintenance(
    app: Arc<App<SqliteStore>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let interval = std::time::Duration::from_secs(app.config.maintenance_interval_secs.max(1));
    loop {
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
    pub fn store(&self) -> &SqliteStore {
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
