//! `cpis-agent`: the command line of DESIGN.md §5.
//!
//! Exit codes: 0 success, 2 bad input (invalid NHS number, bad option), 3 not enrolled or
//! wiped, 1 any other failure.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use cpis_agent::api::LocalApi;
use cpis_agent::{Agent, AgentError, Clock, LookupInput, SystemClock};
use cpis_protocol::local::LookupResponse;
use cpis_protocol::{Freshness, LookupResult};

/// CP-IS Edge tablet agent: offline child-protection flag lookups with honest freshness.
#[derive(Debug, Parser)]
#[command(name = "cpis-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol this tablet with a sync server using a one-time enrolment token.
    ///
    /// Makes the device key pair and master key, trusts only the CA given by --ca for the
    /// server, and stores the client certificate, region, trust, the server's signing key and
    /// the policy (sealed) in the state directory.
    Enrol {
        /// State directory to create (must not hold an enrolled device).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Sync server base URL, e.g. https://sync.example.org:8443
        #[arg(long, value_name = "URL")]
        server: String,
        /// PEM file of the CA that issued the server's TLS certificate (the only CA trusted).
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
        /// Enrolment token from `cpis-sync-server admin enrolment-token`.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "CPIS_ENROLMENT_TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// A name for this device, shown to trust IT.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Serve the local API on loopback (POST /v1/lookups, GET /v1/status, POST /v1/sync).
    Run {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Loopback address to listen on; non-loopback addresses are refused.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7411")]
        listen: SocketAddr,
    },
    /// Sync once now: checkpoint, then a delta or a snapshot (with a progress bar on a
    /// terminal), then send pending access events.
    Sync {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Print the result as JSON (the same document as POST /v1/sync).
        #[arg(long)]
        json: bool,
    },
    /// Look up an NHS number (9434765919, 943 476 5919 or 943-476-5919). The access is
    /// recorded durably before the answer is shown.
    Lookup {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// The NHS number to look up.
        #[arg(value_name = "NHS_NUMBER")]
        nhs_number: String,
        /// Staff id of the person looking up (recorded in the access event).
        #[arg(long, value_name = "ID")]
        staff: Option<String>,
        /// Incident reference (recorded in the access event).
        #[arg(long, value_name = "REF")]
        incident: Option<String>,
        /// Print the answer as JSON (the same document as POST /v1/lookups).
        #[arg(long)]
        json: bool,
    },
    /// Show the device, its data's version, age and freshness, sync history and outbox.
    Status {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Print the status as JSON (the same document as GET /v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Crypto-shred this tablet's data: destroy the master key first, then every file.
    Wipe {
        /// State directory to wipe.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<AgentError>() {
        Some(AgentError::InvalidNhsNumber(_)) => 2,
        Some(AgentError::NotEnrolled(_)) => 3,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CPIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enrol {
            state_dir,
            server,
            ca,
            token,
            name,
        } => {
            let ca_pem = std::fs::read_to_string(&ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            let agent = runtime()?.block_on(cpis_agent::sync::enrol(
                &state_dir,
                &server,
                &ca_pem,
                &token,
                name,
                clock(),
            ))?;
            let e = agent.enrolment();
            println!(
                "Enrolled device {} for trust {} in region {}.\nServer signing key pinned: {}\n\
                 Client certificate valid until {}.\nNext: cpis-agent sync --state-dir {}",
                e.device_id,
                e.trust,
                e.region,
                e.signing_key,
                e.client_cert_expires_at.format("%Y-%m-%d %H:%M UTC"),
                state_dir.display()
            );
            Ok(())
        }
        Command::Run { state_dir, listen } => {
            let agent = Arc::new(Agent::open(&state_dir, clock())?);
            runtime()?.block_on(async move {
                let api = LocalApi::bind(agent, listen).await?;
                eprintln!("cpis-agent: local API on http://{}", api.local_addr());
                let stop = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                tokio::select! {
                    r = api_join(api) => r,
                    () = stop => Ok(()),
                }
            })
        }
        Command::Sync { state_dir, json } => {
            let agent = Agent::open(&state_dir, clock())?;
            let bar = std::io::stderr().is_terminal().then(|| {
                let pb = indicatif::ProgressBar::new(0);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "snapshot {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                pb
            });
            let progress = |done: u64, total: u64| {
                if let Some(pb) = &bar {
                    pb.set_length(total);
                    pb.set_position(done);
                }
            };
            let r = runtime()?.block_on(cpis_agent::sync::sync_once(&agent, &progress));
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            let r = r?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let what = match r.action.as_str() {
                    "snapshot" => "installed a snapshot",
                    "delta" => "applied changes",
                    _ => "already up to date",
                };
                println!(
                    "Sync done: {what}; version {}; data as of {}; {} access events sent.",
                    r.version.map_or("none".into(), |v| v.to_string()),
                    r.data_as_of.map_or("never".into(), |t| t
                        .format("%Y-%m-%d %H:%M UTC")
                        .to_string()),
                    r.events_sent
                );
            }
            Ok(())
        }
        Command::Lookup {
            state_dir,
            nhs_number,
            staff,
            incident,
            json,
        } => {
            // Validate before opening anything: bad input changes nothing.
            nhs_number
                .parse::<cpis_protocol::NhsNumber>()
                .map_err(AgentError::from)?;
            let agent = Agent::open(&state_dir, clock())?;
            let r = agent.lookup(LookupInput {
                nhs_number: &nhs_number,
                staff_id: staff,
                incident_ref: incident,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", human_lookup(&r));
            }
            Ok(())
        }
        Command::Status { state_dir, json } => {
            let agent = Agent::open(&state_dir, clock())?;
            let s = agent.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or("never".to_string(), |t| {
                        t.format("%Y-%m-%d %H:%M UTC").to_string()
                    })
                };
                println!("Device:        {} (trust {})", s.device, s.trust);
                println!("Server:        {}", s.server);
                println!("Region:        {}", s.region);
                println!(
                    "Data:          {}",
                    match (s.epoch, s.version) {
                        (Some(e), Some(v)) =>
                            format!("epoch {e}, version {v}, {} subjects", s.subjects),
                        _ => "none installed".into(),
                    }
                );
                println!(
                    "Data as of:    {} ({}{})",
                    when(s.data_as_of),
                    s.freshness.as_str().to_uppercase(),
                    s.data_age_secs
                        .map_or(String::new(), |a| format!(", {} old", age(a)))
                );
                println!("Councils:      {}", s.councils.len());
                println!(
                    "Last sync:     attempt {}, success {}",
                    when(s.last_sync_attempt),
                    when(s.last_sync_success)
                );
                if let Some(e) = &s.last_sync_error {
                    println!("Last error:    {e}");
                }
                println!("Outbox:        {} access events waiting", s.outbox_pending);
                for w in &s.warnings {
                    println!("WARNING: {}", w.message);
                }
            }
            Ok(())
        }
        Command::Wipe { state_dir } => {
            Agent::wipe(&state_dir)?;
            println!(
                "Wiped {}: the device key was destroyed and the data files removed.",
                state_dir.display()
            );
            Ok(())
        }
    }
}

async fn api_join(api: LocalApi) -> anyhow::Result<()> {
    api.join().await.context("serving the local API")
}

fn age(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else {
        format!("{m} min")
    }
}

/// The plain, unambiguous text answer.
fn human_lookup(r: &LookupResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let nhs = &r.nhs_number;
    let spaced = if nhs.len() == 10 {
        format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..])
    } else {
        nhs.clone()
    };
    let headline = match r.result {
        LookupResult::Flagged => "FLAGGED",
        LookupResult::NotFlagged => "NOT FLAGGED",
        LookupResult::Unknown => "UNKNOWN",
    };
    let _ = writeln!(out, "NHS number {spaced}: {headline}");
    match r.result {
        LookupResult::Flagged => {
            for f in &r.flags {
                let status = match (f.end_date, f.ended) {
                    (Some(end), true) => format!("ENDED {end}"),
                    (Some(end), false) => format!("ends {end}"),
                    (None, _) => "ACTIVE".into(),
                };
                let _ = writeln!(
                    out,
                    "  {} ({}) from {} — {}",
                    f.plan_type,
                    f.plan_type.description(),
                    f.start_date,
                    status
                );
                let _ = writeln!(
                    out,
                    "    Council: {} ({}); emergency: {}{}",
                    f.council.name,
                    f.council.ods,
                    if f.council.emergency_phone.is_empty() {
                        "unknown"
                    } else {
                        &f.council.emergency_phone
                    },
                    f.council
                        .office_phone
                        .as_ref()
                        .map_or(String::new(), |p| format!("; office: {p}"))
                );
            }
        }
        LookupResult::NotFlagged => {
            let _ = writeln!(
                out,
                "  No flag held for this number in the councils covered below."
            );
        }
        LookupResult::Unknown => {
            let _ = writeln!(
                out,
                "  Cannot say: the data is too old or missing to rule out a flag."
            );
        }
    }
    let fresh = match r.freshness {
        Freshness::Fresh => "FRESH",
        Freshness::Stale => "STALE",
        Freshness::Expired => "EXPIRED",
    };
    let _ = writeln!(
        out,
        "Data as of: {} ({}{})",
        r.data_as_of.map_or("no data".into(), |t| t
            .format("%Y-%m-%d %H:%M UTC")
            .to_string()),
        fresh,
        r.data_age_secs
            .map_or(String::new(), |a| format!(", {} old", age(a)))
    );
    let names: Vec<String> = r
        .coverage
        .councils
        .iter()
        .map(|c| format!("{} ({})", c.name, c.ods))
        .collect();
    let _ = writeln!(
        out,
        "Coverage: region {}: {}",
        r.coverage.region,
        if names.is_empty() {
            "no councils".into()
        } else {
            names.join(", ")
        }
    );
    for w in &r.warnings {
        let _ = writeln!(out, "WARNING: {}", w.message);
    }
    let _ = writeln!(out, "Access recorded: event {}", r.event_id);
    out
}
