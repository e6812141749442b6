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
use clap::{CommandFactory as _, Parser, Subcommand};

use std::time::Duration;

use cpis_agent::background::LoopConfig;
use cpis_agent::local_token::{self, LocalAuth, LocalToken};
use cpis_agent::service::{RunConfig, Service};
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
        /// Enrolment token from `cpis-sync-server admin enrolment-token`. Prefer
        /// --token-file or the environment variable CPIS_ENROLMENT_TOKEN: a token on the
        /// command line shows in `ps` and in shell history. Exactly one of the three.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// File whose first line is the enrolment token (surrounding spaces removed).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// A name for this device, shown to trust IT.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Where the device master key is kept: `tpm2` seals it with the tablet's TPM 2.0
        /// (a copy of the disk opens nothing, and a wipe cannot be undone from one); `file`
        /// keeps it in a 0600 file, which protects nothing without full-disk encryption.
        /// Default: tpm2 when a TPM answers, else file with a warning. The TPM is reached
        /// through the TCTI in CPIS_TPM2_TCTI (default device:/dev/tpmrm0).
        #[arg(long, value_name = "tpm2|file")]
        keystore: Option<cpis_protocol::KeyProtection>,
    },
    /// Run the agent: the local API on loopback (POST /v1/lookups, GET /v1/status,
    /// POST /v1/sync), the paramedic page (open http://127.0.0.1:7411/ in the tablet's
    /// browser) and the background sync loop, until Ctrl-C or SIGTERM.
    ///
    /// The loop syncs at start, then every --sync-interval-secs (plus up to a fifth more at
    /// random), a few seconds after a lookup leaves access events to send, on POST /v1/sync,
    /// as soon as the server answers again after an outage, and as soon as the region's data
    /// changes (the live feed: one waiting request held while the server answers). Failures back off
    /// exponentially with full jitter up to --backoff-max-secs, and a server's Retry-After
    /// is honoured. After each sync it reports to the fleet view and renews the client
    /// certificate when due; a revoked device shreds itself and then answers every lookup
    /// with 503 not_enrolled. A miss is checked nationally when the server answers within
    /// --confirm-timeout-ms.
    Run {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Loopback address to listen on; non-loopback addresses are refused.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7411")]
        listen: SocketAddr,
        /// Seconds between background syncs while all is well.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 900,
            env = "CPIS_SYNC_INTERVAL_SECS",
            value_parser = clap::value_parser!(u64).range(10..)
        )]
        sync_interval_secs: u64,
        /// Cap of the backoff between failed attempts, in seconds.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 900,
            env = "CPIS_BACKOFF_MAX_SECS",
            value_parser = clap::value_parser!(u64).range(2..)
        )]
        backoff_max_secs: u64,
        /// Longest wait for the online national check of a miss, in milliseconds.
        #[arg(
            long,
            value_name = "MS",
            default_value_t = 1500,
            env = "CPIS_CONFIRM_TIMEOUT_MS"
        )]
        confirm_timeout_ms: u64,
        /// Never check misses nationally (answers cover the tablet's region only).
        #[arg(long)]
        no_confirm: bool,
        /// Do not hold the live feed's waiting checkpoint request: hear of changes only at
        /// the background syncs. By default, while the server answers, the tablet holds one
        /// request that the server answers as soon as the region's data changes.
        #[arg(long)]
        no_live: bool,
        /// Make every /v1/* request send `Authorization: Bearer <token>`, the token in
        /// STATE_DIR/api.token (made when missing, mode 0600). Without it the token is
        /// optional, but a wrong one is refused. The paramedic page is not affected.
        #[arg(long)]
        require_token: bool,
    },
    /// Sync once now: checkpoint, then a delta or a snapshot (with a progress bar on a
    /// terminal), then send pending access events, then report to the fleet view.
    ///
    /// If the feed no longer verifies under the pinned signing key, the server's signed key
    /// chain is followed from the pinned key and the sync retried once. A revoked device
    /// shreds its data and exits 3.
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
    ///
    /// A miss in the tablet's regional data is checked nationally with the server when it
    /// answers within --confirm-timeout-ms; otherwise the regional answer is shown with the
    /// councils it covers. Exit codes: 0 answered, 2 invalid NHS number, 3 not enrolled or
    /// wiped, 1 other failure.
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
        /// Longest wait for the online national check of a miss, in milliseconds.
        #[arg(
            long,
            value_name = "MS",
            default_value_t = 1500,
            env = "CPIS_CONFIRM_TIMEOUT_MS"
        )]
        confirm_timeout_ms: u64,
        /// Answer from the tablet's data only (no national check).
        #[arg(long)]
        offline: bool,
    },
    /// Show the device, its data's version, age and freshness, sync history, the background
    /// loop's next attempt and failures, the outbox (waiting and set aside) and the client
    /// certificate's expiry.
    Status {
        /// State directory of an enrolled device.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Print the status as JSON (the same document as GET /v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Crypto-shred this tablet's data: destroy the master key first, then every file.
    ///
    /// Unsent access events are destroyed with it; sync first if the tablet has a
    /// connection.
    Wipe {
        /// State directory to wipe.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<AgentError>() {
        Some(AgentError::InvalidNhsNumber(_)) => 2,
        Some(AgentError::NotEnrolled(_) | AgentError::RevokedPending { .. }) => 3,
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
                // The TPM library's own error records repeat what our errors say.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tss_esapi=off")),
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
            token_file,
            name,
            keystore,
        } => {
            let env = std::env::var(local_token::ENROLMENT_TOKEN_ENV).ok();
            let token = match local_token::enrolment_token(token, env, token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    use clap::error::ErrorKind;
                    let kind = match e {
                        local_token::EnrolmentTokenError::Missing => {
                            ErrorKind::MissingRequiredArgument
                        }
                        local_token::EnrolmentTokenError::Several(_) => ErrorKind::ArgumentConflict,
                        _ => ErrorKind::ValueValidation,
                    };
                    // Exit 2 (bad option), with the usage line of `enrol`.
                    let mut cmd = Cli::command();
                    cmd.build();
                    match cmd.find_subcommand_mut("enrol") {
                        Some(enrol) => enrol.error(kind, e).exit(),
                        None => cmd.error(kind, e).exit(),
                    }
                }
            };
            let ca_pem = std::fs::read_to_string(&ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            // Before the token is spent: a requested TPM that does not answer fails here.
            let (keystore, warning) = cpis_agent::keystore::choose(keystore)
                .context("--keystore tpm2: no usable TPM 2.0; nothing was enrolled")?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            let agent = runtime()?.block_on(cpis_agent::sync::enrol_with_keystore(
                &state_dir,
                &server,
                &ca_pem,
                &token,
                name,
                keystore,
                clock(),
            ))?;
            LocalToken::load_or_create(&state_dir)?;
            let e = agent.enrolment();
            println!(
                "Enrolled device {} for trust {} in region {}.\nServer signing key pinned: {}\n\
                 Device master key: {}.\n\
                 Client certificate valid until {}.\nLocal API token (for the ePR app): {}\n\
                 Next: cpis-agent sync --state-dir {}",
                e.device_id,
                e.trust,
                e.region,
                e.signing_key,
                format_args!("{} ({keystore})", keystore.describe()),
                e.client_cert_expires_at.format("%Y-%m-%d %H:%M UTC"),
                local_token::path(&state_dir).display(),
                state_dir.display()
            );
            Ok(())
        }
        Command::Run {
            state_dir,
            listen,
            sync_interval_secs,
            backoff_max_secs,
            confirm_timeout_ms,
            no_confirm,
            no_live,
            require_token,
        } => {
            let agent = Arc::new(Agent::open(&state_dir, clock())?);
            let token = LocalToken::load_or_create(&state_dir)?;
            let auth = if require_token {
                LocalAuth::Required(token)
            } else {
                LocalAuth::Checked(token)
            };
            let mut sync = LoopConfig::default();
            sync.schedule.interval = Duration::from_secs(sync_interval_secs);
            sync.schedule.interval_jitter = Duration::from_secs(sync_interval_secs / 5);
            sync.schedule.backoff_max = Duration::from_secs(backoff_max_secs);
            sync.schedule.live = !no_live;
            let cfg = RunConfig {
                listen,
                sync,
                confirm_bound: (!no_confirm).then(|| Duration::from_millis(confirm_timeout_ms)),
            };
            runtime()?.block_on(async move {
                let service = Service::start_with(agent, cfg, auth).await?;
                eprintln!(
                    "cpis-agent: local API on http://{addr}; paramedic page on http://{addr}/; \
                     background sync every {sync_interval_secs} s{live}; local API token in \
                     {token} ({required})",
                    addr = service.local_addr(),
                    live = if no_live {
                        " (live feed off)"
                    } else {
                        " and at once when the region's data changes (live feed)"
                    },
                    token = local_token::path(&state_dir).display(),
                    required = if require_token {
                        "required"
                    } else {
                        "optional"
                    },
                );
                let cancel = service.cancel_token();
                let signals = tokio::spawn(async move {
                    stop_signal().await;
                    cancel.cancel();
                });
                let r = service.join().await.context("running the agent");
                signals.abort();
                r
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
            confirm_timeout_ms,
            offline,
        } => {
            // Validate before opening anything: bad input changes nothing.
            nhs_number
                .parse::<cpis_protocol::NhsNumber>()
                .map_err(AgentError::from)?;
            let agent = Agent::open(&state_dir, clock())?;
            let (r, event) = agent.lookup_recorded(LookupInput {
                nhs_number: &nhs_number,
                staff_id: staff,
                incident_ref: incident,
            })?;
            let r = if offline {
                r
            } else {
                let bound = Duration::from_millis(confirm_timeout_ms);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?
                    .block_on(cpis_agent::confirm::confirm_miss(&agent, r, &event, bound))
                    .0
            };
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
                println!(
                    "Next sync:     {}",
                    s.next_sync_at
                        .map_or("not scheduled (background loop not running)".into(), |t| {
                            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                        })
                );
                if s.consecutive_failures > 0 {
                    println!("Failures:      {} in a row", s.consecutive_failures);
                }
                println!(
                    "Outbox:        {} access events waiting, {} set aside (refused by the server)",
                    s.outbox_pending, s.outbox_set_aside
                );
                println!(
                    "Certificate:   valid until {}",
                    when(Some(s.client_cert_expires_at))
                );
                println!(
                    "Master key:    {} ({})",
                    s.key_protection.describe(),
                    s.key_protection
                );
                for w in &s.warnings {
                    println!("WARNING: {}", w.message);
                }
            }
            Ok(())
        }
        Command::Wipe { state_dir } => {
            // Never silently: say how many notices the wipe destroys unsent.
            let unsent = Agent::open(&state_dir, clock())
                .and_then(|a| a.outbox_counts())
                .map_or(0, |(pending, _)| pending);
            Agent::wipe(&state_dir)?;
            println!(
                "Wiped {}: the device key was destroyed and the data files removed.",
                state_dir.display()
            );
            if unsent > 0 {
                eprintln!(
                    "warning: {unsent} access notice(s) not yet sent to the server were destroyed \
                     with it (sync first, when the tablet has a connection, to deliver them)"
                );
            }
            Ok(())
        }
    }
}

/// Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
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
    if let Some(n) = &r.national {
        let _ = writeln!(
            out,
            "National check: {} across {} councils at {}",
            match n.result {
                LookupResult::Flagged => "FLAGGED",
                LookupResult::NotFlagged => "NOT FLAGGED",
                LookupResult::Unknown => "UNKNOWN",
            },
            n.councils_covered,
            n.checked_at.format("%Y-%m-%d %H:%M UTC")
        );
    }
    if !r.recent_contacts.is_empty() {
        let _ = writeln!(out, "Recent contacts (newest first):");
        for c in &r.recent_contacts {
            let _ = writeln!(
                out,
                "  {} — {} ({}), {}",
                c.date,
                c.organisation.name,
                c.organisation.ods,
                match c.setting {
                    cpis_protocol::CareSetting::Ambulance => "ambulance",
                    cpis_protocol::CareSetting::EmergencyDepartment => "emergency department",
                    cpis_protocol::CareSetting::UrgentTreatmentCentre => "urgent treatment centre",
                    cpis_protocol::CareSetting::Other => "other setting",
                }
            );
        }
    }
    for w in &r.warnings {
        let _ = writeln!(out, "WARNING: {}", w.message);
    }
    let _ = writeln!(out, "Access recorded: event {}", r.event_id);
    out
}
