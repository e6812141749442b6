//! `cpis-sync-server`: the command line of DESIGN.md §5 (init, serve, admin).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{Duration, Utc};
use clap::{Parser, Subcommand};
use cpis_protocol::mailbox::OVERDUE_AFTER_DAYS;
use cpis_protocol::{CouncilCode, CouncilInfo, DeviceId, RegionId, TrustCode};
use cpis_sync_server::clock::SystemClock;
use cpis_sync_server::config::Config;
use cpis_sync_server::server::{self, Server, ServerError};
use cpis_sync_server::store::{NewEnrolmentToken, Store, StoreError};
use cpis_sync_server::tokens;

/// CP-IS Edge central sync server: takes councils' flag lists, serves each ambulance region a
/// signed snapshot and deltas, enrols and revokes tablets, takes tablets' access events and
/// queues access notifications in council mailboxes.
///
/// Exit codes: 0 success, 2 bad input, 1 other failure.
#[derive(Debug, Parser)]
#[command(name = "cpis-sync-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new data dir: SQLite database, Ed25519 feed signing key, private TLS CA with a
    /// server certificate, device CA, and server.toml. Refuses an existing, non-empty dir.
    Init {
        /// Directory to create (must not exist, or be empty).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Host name or IP address the server certificate is valid for; repeat for several.
        /// Default: localhost and 127.0.0.1.
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
    },
    /// Serve HTTPS until SIGTERM or SIGINT (graceful shutdown). Configuration comes from
    /// DIR/server.toml, overridden by CPIS_* environment variables.
    Serve {
        /// An initialised data dir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:8443 (overrides server.toml and CPIS_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Administer trusts, regions, councils, tokens and devices. Safe while the server runs.
    Admin {
        /// An initialised data dir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: Admin,
    },
}

#[derive(Debug, Subcommand)]
enum Admin {
    /// Ambulance trusts.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Ambulance regions and their neighbour councils.
    #[command(subcommand)]
    Region(RegionCmd),
    /// Councils (the directory crews see) and their upload tokens.
    #[command(subcommand)]
    Council(CouncilCmd),
    /// Create an enrolment token for tablets of a trust in a region; printed once.
    EnrolmentToken {
        /// The trust's ODS code, e.g. RX9.
        #[arg(long, value_name = "ODS")]
        trust: TrustCode,
        /// The region the tablets will carry, e.g. EM.
        #[arg(long, value_name = "ID")]
        region: RegionId,
        /// How many tablets may enrol with it.
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: u32,
        /// How long it stays valid: a number with s, m, h or d (e.g. 30m, 24h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Enrolled tablets.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Council mailboxes of access notifications.
    #[command(subcommand)]
    Mailbox(MailboxCmd),
}

#[derive(Debug, Subcommand)]
enum MailboxCmd {
    /// Every council's mailbox: unacknowledged notifications, how many are overdue
    /// (unacknowledged for more than 5 days) and when the oldest was queued.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TrustCmd {
    /// Add an ambulance trust.
    Add {
        /// The trust's ODS code, e.g. RX9.
        #[arg(long, value_name = "ODS")]
        ods: TrustCode,
        /// The trust's name.
        #[arg(long, value_name = "NAME")]
        name: String,
    },
    /// List trusts.
    List,
}

#[derive(Debug, Subcommand)]
enum RegionCmd {
    /// Add a region; its scope is its own councils plus the neighbour councils named here.
    Add {
        /// Region id, e.g. EM (upper-case letters, digits, hyphens).
        #[arg(long, value_name = "ID")]
        id: RegionId,
        /// The region's name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// A council of another region whose flags this region also carries; repeatable.
        #[arg(long = "neighbour-council", value_name = "ODS")]
        neighbours: Vec<CouncilCode>,
    },
    /// Replace a region's neighbour councils (its epoch changes, tablets take a snapshot).
    SetNeighbours {
        /// Region id.
        #[arg(long, value_name = "ID")]
        id: RegionId,
        /// A neighbour council; repeatable; none clears the list.
        #[arg(long = "neighbour-council", value_name = "ODS")]
        neighbours: Vec<CouncilCode>,
    },
    /// List regions with their epochs and neighbour councils.
    List,
}

#[derive(Debug, Subcommand)]
enum CouncilCmd {
    /// Add a council to a region's directory.
    Add {
        /// The council's ODS code, e.g. E06000018.
        #[arg(long, value_name = "ODS")]
        ods: CouncilCode,
        /// The council's name as crews see it.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The region the council belongs to.
        #[arg(long, value_name = "ID")]
        region: RegionId,
        /// Out-of-hours (emergency duty team) phone number; required.
        #[arg(long, value_name = "PHONE")]
        emergency_phone: String,
        /// Office-hours phone number.
        #[arg(long, value_name = "PHONE")]
        office_phone: Option<String>,
    },
    /// Create a new upload token for a council and print it once (only its hash is kept).
    Token {
        /// The council's ODS code.
        #[arg(long, value_name = "ODS")]
        ods: CouncilCode,
    },
    /// List councils.
    List,
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// List enrolled tablets, newest first.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a tablet: it is refused from now on and told to erase its data.
    Revoke {
        /// The device id (UUID) shown by `device list`.
        #[arg(long, value_name = "ID")]
        device: DeviceId,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?} must be a number followed by s, m, h or d"))?;
    let d = match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" | "" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    if d <= Duration::zero() || d > Duration::days(365) {
        return Err("the ttl must be more than zero and at most 365d".into());
    }
    Ok(d)
}

/// An error the user can fix by changing the input: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

fn classify(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Conflict(_) | StoreError::Missing(_) => BadInput(e.to_string()).into(),
        other => other.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let bad_input = e.downcast_ref::<BadInput>().is_some()
                || matches!(
                    e.downcast_ref::<ServerError>(),
                    Some(ServerError::DataDirExists(_) | ServerError::NotInitialised(_))
                );
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            mut hostnames,
        } => {
            if hostnames.is_empty() {
                hostnames = vec!["localhost".into(), "127.0.0.1".into()];
            }
            server::init(&data_dir, &hostnames)?;
            println!("initialised {}", data_dir.display());
            println!(
                "  TLS CA certificate (give it to clients): {}",
                cpis_sync_server::pki::Pki::ca_cert_path(&data_dir).display()
            );
            println!(
                "  configuration: {}",
                data_dir.join("server.toml").display()
            );
            Ok(())
        }
        Command::Serve { data_dir, listen } => serve(&data_dir, listen).await,
        Command::Admin { data_dir, command } => admin(&data_dir, command).await,
    }
}

async fn serve(data_dir: &Path, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let mut config = Config::load(data_dir)?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let handle = Server::bind(data_dir, config, Arc::new(SystemClock)).await?;
    println!("listening on https://{}", handle.local_addr());
    let token = handle.shutdown_token();
    let signals = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
                () = token.cancelled() => {}
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    };
    signals.await?;
    tracing::info!("shutting down");
    handle.shutdown();
    handle.join().await?;
    Ok(())
}

async fn admin(data_dir: &Path, command: Admin) -> anyhow::Result<()> {
    let store = server::open_store(data_dir)?;
    let now = Utc::now();
    match command {
        Admin::Trust(TrustCmd::Add { ods, name }) => {
            store
                .add_trust(ods.clone(), name.clone())
                .await
                .map_err(classify)?;
            println!("added trust {ods} ({name})");
        }
        Admin::Trust(TrustCmd::List) => {
            for t in store.trusts().await? {
                println!("{}\t{}", t.code, t.name);
            }
        }
        Admin::Region(RegionCmd::Add {
            id,
            name,
            neighbours,
        }) => {
            store
                .add_region(id.clone(), name.clone(), neighbours.clone())
                .await
                .map_err(classify)?;
            let n: Vec<String> = neighbours.iter().map(ToString::to_string).collect();
            println!(
                "added region {id} ({name}); neighbour councils: [{}]",
                n.join(", ")
            );
        }
        Admin::Region(RegionCmd::SetNeighbours { id, neighbours }) => {
            let r = store
                .set_region_neighbours(id, neighbours)
                .await
                .map_err(classify)?;
            let n: Vec<String> = r.neighbours.iter().map(ToString::to_string).collect();
            println!(
                "region {} now has neighbour councils [{}], epoch {}",
                r.id,
                n.join(", "),
                r.epoch
            );
        }
        Admin::Region(RegionCmd::List) => {
            for r in store.regions().await? {
                let n: Vec<String> = r.neighbours.iter().map(ToString::to_string).collect();
                println!(
                    "{}\t{}\tepoch {}\tneighbours [{}]",
                    r.id,
                    r.name,
                    r.epoch,
                    n.join(", ")
                );
            }
        }
        Admin::Council(CouncilCmd::Add {
            ods,
            name,
            region,
            emergency_phone,
            office_phone,
        }) => {
            if emergency_phone.trim().is_empty() {
                return Err(BadInput("--emergency-phone must not be empty".into()).into());
            }
            store
                .add_council(CouncilInfo {
                    code: ods.clone(),
                    name: name.clone(),
                    region: region.clone(),
                    emergency_phone: emergency_phone.trim().to_owned(),
                    office_phone: office_phone
                        .map(|p| p.trim().to_owned())
                        .filter(|p| !p.is_empty()),
                })
                .await
                .map_err(classify)?;
            println!("added council {ods} ({name}) to region {region}");
        }
        Admin::Council(CouncilCmd::Token { ods }) => {
            let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
            store
                .add_council_token(ods.clone(), hash, now)
                .await
                .map_err(classify)?;
            eprintln!("upload token for council {ods} (shown once; only its hash is kept):");
            println!("{token}");
        }
        Admin::Council(CouncilCmd::List) => {
            for c in store.councils().await? {
                println!(
                    "{}\t{}\tregion {}\temergency {}\toffice {}",
                    c.code,
                    c.name,
                    c.region,
                    c.emergency_phone,
                    c.office_phone.as_deref().unwrap_or("-")
                );
            }
        }
        Admin::EnrolmentToken {
            trust,
            region,
            uses,
            ttl,
        } => {
            if uses == 0 {
                return Err(BadInput("--uses must be at least 1".into()).into());
            }
            let (token, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
            let expires_at = now + ttl;
            store
                .add_enrolment_token(
                    NewEnrolmentToken {
                        hash,
                        trust: trust.clone(),
                        region: region.clone(),
                        uses,
                        expires_at,
                    },
                    now,
                )
                .await
                .map_err(classify)?;
            eprintln!(
                "enrolment token for trust {trust}, region {region}: {uses} use(s), expires \
                 {expires_at} (shown once):"
            );
            println!("{token}");
        }
        Admin::Device(DeviceCmd::List { json }) => {
            let devices = store.devices().await?;
            if json {
                let list: Vec<serde_json::Value> = devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "device_id": d.id,
                            "trust": d.trust,
                            "region": d.region,
                            "name": d.name,
                            "agent_version": d.agent_version,
                            "enrolled_at": d.enrolled_at,
                            "last_seen": d.last_seen,
                            "client_cert_expires_at": d.cert_expires_at,
                            "revoked_at": d.revoked_at,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "devices": list }))?
                );
            } else {
                println!("DEVICE\tTRUST\tREGION\tNAME\tENROLLED\tLAST SEEN\tSTATUS");
                for d in devices {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        d.id,
                        d.trust,
                        d.region,
                        d.name.as_deref().unwrap_or("-"),
                        d.enrolled_at.format("%Y-%m-%d %H:%M"),
                        d.last_seen.map_or_else(
                            || "never".to_owned(),
                            |t| t.format("%Y-%m-%d %H:%M").to_string()
                        ),
                        if d.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
        }
        Admin::Mailbox(MailboxCmd::List { json }) => {
            let overdue_before = now - Duration::days(OVERDUE_AFTER_DAYS);
            let stats = store.mailbox_stats(overdue_before).await?;
            if json {
                let list: Vec<serde_json::Value> = stats
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "council": m.council,
                            "name": m.name,
                            "pending": m.pending,
                            "overdue": m.overdue,
                            "oldest_pending": m.oldest_pending,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "mailboxes": list }))?
                );
            } else {
                println!("COUNCIL\tNAME\tPENDING\tOVERDUE\tOLDEST PENDING");
                for m in stats {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        m.council,
                        m.name,
                        m.pending,
                        m.overdue,
                        m.oldest_pending.map_or_else(
                            || "-".to_owned(),
                            |t| t.format("%Y-%m-%d %H:%M").to_string()
                        )
                    );
                }
            }
        }
        Admin::Device(DeviceCmd::Revoke { device }) => {
            let changed = store.revoke_device(device, now).await.map_err(classify)?;
            if changed {
                println!(
                    "revoked device {device}; it will be told to erase its data at next contact"
                );
            } else {
                println!("device {device} was already revoked");
            }
        }
    }
    Ok(())
}
