//! `cpis-agent run` as a service that tests can start and stop: the local API and the
//! background sync loop, each a task of one `JoinSet` under one cancellation token. The
//! first task to fail stops the rest; the loop ending by itself (the device was revoked and
//! wiped) leaves the API up, answering `503 not_enrolled`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::api::{ApiError, ApiOptions, LocalApi};
use crate::background::{AgentWorker, LoopConfig, SyncHandle, drive};
use crate::local_token::LocalAuth;

/// How `run` is set up.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    pub listen: SocketAddr,
    pub sync: LoopConfig,
    /// Bound of the online national check; `None` disables it.
    pub confirm_bound: Option<Duration>,
}

/// A running agent service.
#[derive(Debug)]
pub struct Service {
    addr: SocketAddr,
    handle: SyncHandle,
    cancel: CancellationToken,
    tasks: JoinSet<std::io::Result<()>>,
}

impl Service {
    /// Binds the local API and starts the loop (which syncs at once).
    pub async fn start(agent: Arc<Agent>, cfg: RunConfig) -> Result<Self, ApiError> {
        Self::start_with(agent, cfg, LocalAuth::Off).await
    }

    /// [`Service::start`] with the local API token check of `/v1/*` (`cpis-agent run`).
    pub async fn start_with(
        agent: Arc<Agent>,
        cfg: RunConfig,
        auth: LocalAuth,
    ) -> Result<Self, ApiError> {
        let (handle, requests) = SyncHandle::channel();
        let api = LocalApi::bind_with(
            agent.clone(),
            cfg.listen,
            ApiOptions {
                sync: Some(handle.clone()),
                confirm_bound: cfg.confirm_bound,
                auth,
            },
        )
        .await?;
        let addr = api.local_addr();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let c = cancel.clone();
        tasks.spawn(async move {
            c.cancelled().await;
            api.shutdown().await
        });
        let c = cancel.clone();
        tasks.spawn(async move {
            drive(cfg.sync, AgentWorker::new(agent), requests, c).await;
            Ok(())
        });
        Ok(Self {
            addr,
            handle,
            cancel,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Triggers and manual requests for the loop.
    pub fn sync_handle(&self) -> SyncHandle {
        self.handle.clone()
    }

    /// Cancelling it stops everything.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs until cancelled or a task fails (which cancels the others); then waits for all.
    pub async fn join(mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        while let Some(r) = self.tasks.join_next().await {
            let r = r.map_err(std::io::Error::other).and_then(|r| r);
            if let Err(e) = r {
                self.cancel.cancel();
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Stops the API (finishing requests in flight) and the loop, and waits.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.cancel.cancel();
        self.join().await
    }
}
