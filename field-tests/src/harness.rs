//! Runs the real binaries as child processes for the scenarios: [`bins`] finds (building
//! once if needed) `cpis-sync-server` and `cpis-agent`; [`ServerProcess`] runs the server
//! (init, directory, serve, SIGKILL, restart, SIGTERM) and gives council upload clients;
//! [`Tablet`] drives the agent's command line and [`AgentDaemon`] its local API.
//!
//! Every child has a time bound (a hung child fails the test instead of hanging CI) and is
//! killed when its handle is dropped. Logs of long-running children go to files next to
//! their directories (`<data-dir>.serve.log`, `<state-dir>.run.log`) and their tails are
//! quoted in failures.

mod agent;
mod bins;
mod http;
pub mod process;
mod server;

use std::time::Duration;

pub use agent::{AgentDaemon, COMMAND_TIMEOUT, Tablet, copy_dir};
pub use bins::{BIN_DIR_ENV, Bins, bins};
pub use http::{client as https_client, local_client};
pub use server::{
    CouncilClient, REQUEST_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT, ServerProcess, directory_commands,
};

/// Bound on one `init` or `admin` command.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
