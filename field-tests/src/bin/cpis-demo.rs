//! `cpis-demo`: the end-to-end demo on embedded defaults (SQLite, loopback, synthetic
//! fixtures). It starts a real sync server, uploads a region of flags, enrols a tablet through
//! a fault proxy, syncs, cuts the network, looks numbers up, restores the network and shows
//! the notices arriving in the council's mailbox; then it stays up for the user to try the
//! agent's local API until Ctrl-C (or SIGTERM), and stops everything cleanly. The walkthrough
//! is [`cpis_field_tests::demo`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use cpis_field_tests::demo::{self, Options};

/// The CP-IS Edge demo: server, council uploads, a tablet, a network cut, lookups and the
/// council's notices, each step printed with its figures (time, bytes, counts).
///
/// Everything runs on 127.0.0.1 with the real cpis-sync-server and cpis-agent binaries,
/// built with cargo in the same profile as this binary when needed (or taken from
/// CPIS_FIELD_BIN_DIR). All files (fixtures, server data dir and log, council tokens, tablet
/// state and agent log) stay in --dir afterwards for inspection.
#[derive(Debug, Parser)]
#[command(name = "cpis-demo", version)]
struct Cli {
    /// Directory for everything the demo makes; must be new or empty [default: a new
    /// directory under the system's temp dir, printed at the start].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Flags in the demo region.
    #[arg(long, value_name = "N", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=2_000_000))]
    flags: u64,
    /// Seed of the synthetic data and of the numbers looked up [default: random, printed].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Loopback port of the sync server (0: pick a free one).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    server_port: u16,
    /// Loopback port of the agent's local API (0: pick a free one).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    agent_port: u16,
    /// Stop everything and exit after the walkthrough instead of staying up until Ctrl-C.
    #[arg(long)]
    no_wait: bool,
    /// Run the sync server as two replicas sharing a throw-away PostgreSQL cluster, behind
    /// HAProxy (both from Debian's packages, installed by scripts/ when missing), instead of
    /// one server on SQLite. --server-port is then the first replica's port.
    #[arg(long)]
    postgres: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cpis-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = Options {
        dir: cli.dir,
        flags: usize::try_from(cli.flags).context("--flags is too large")?,
        seed: cli.seed.unwrap_or_else(rand::random),
        server_port: cli.server_port,
        agent_port: cli.agent_port,
        postgres: cli.postgres,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        // Children are killed if the walkthrough fails (their handles are dropped).
        let mut demo = demo::run(&opts).await?;
        if !cli.no_wait {
            demo.wait_for_signal().await?;
        }
        demo.stop().await
    })
}
