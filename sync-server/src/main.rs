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
use cpis_sync_server::store::{NewEnrolmentToken, Store, StoreError, enrolment_token_id};
use cpis_sync_server::{keys, pki, tokens};

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
    /// Create a new data dir: Ed25519 feed signing key, private TLS CA with a server
    /// certificate, device CA, server.toml, and the database: SQLite in the data dir, or with
    /// --database the schema in an existing PostgreSQL database. Refuses an existing,
    /// non-empty dir, and a database that already holds a schema.
    ///
    /// Several replicas on one PostgreSQL database: init once, then give every replica its own
    /// copy of the data dir (`cp -a`) and run `serve` on each.
    Init {
        /// Directory to create (must not exist, or be empty).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Host name or IP address the server certificate is valid for; repeat for several.
        /// Default: localhost and 127.0.0.1.
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
        /// An existing, empty PostgreSQL database shared by every replica, recorded in
        /// server.toml (CPIS_DATABASE_URL overrides it later).
        #[arg(long, value_name = "postgres://USER@HOST:PORT/DB")]
        database: Option<String>,
    },
    /// Serve HTTPS until SIGTERM or SIGINT (graceful shutdown).
    ///
    /// Configuration comes from DIR/server.toml (or --config FILE), overridden by CPIS_*
    /// environment variables. A new server certificate (`admin tls rotate-server-cert`) is
    /// picked up at the next TLS handshake, a rolled-over signing key (`admin signing-key
    /// roll`) within 10 seconds; neither needs a restart.
    Serve {
        /// An initialised data dir (database, keys, certificates).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Read the configuration from FILE (which must exist) instead of DIR/server.toml,
        /// e.g. /etc/cpis/server.toml in the Debian package.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 0.0.0.0:8443 (overrides server.toml and CPIS_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Administer trusts, regions, councils, tokens, devices, keys and certificates.
    ///
    /// Opens the data dir's database directly; safe while the server runs.
    Admin {
        /// An initialised data dir.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The server's configuration file, if not DIR/server.toml (`device list` judges data
        /// age against its policy).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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
    /// Create an enrolment token for tablets of a trust in a region (printed once, with its
    /// id); `list` and `revoke` manage the tokens already made.
    EnrolmentToken(EnrolmentTokenArgs),
    /// Enrolled tablets.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Council mailboxes of access notifications.
    #[command(subcommand)]
    Mailbox(MailboxCmd),
    /// The Ed25519 key that signs checkpoints, snapshots and deltas.
    #[command(subcommand)]
    SigningKey(SigningKeyCmd),
    /// The server's TLS certificate and the certificate authorities.
    #[command(subcommand)]
    Tls(TlsCmd),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EnrolmentTokenArgs {
    #[command(subcommand)]
    command: Option<EnrolmentTokenCmd>,
    /// The trust's ODS code, e.g. RX9.
    #[arg(long, value_name = "ODS", required = true)]
    trust: Option<TrustCode>,
    /// The region the tablets will carry, e.g. EM.
    #[arg(long, value_name = "ID", required = true)]
    region: Option<RegionId>,
    /// How many tablets may enrol with it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    uses: u32,
    /// How long it stays valid: a number with s, m, h or d (e.g. 30m, 24h, 7d; at most 365d).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
}

#[derive(Debug, Subcommand)]
enum EnrolmentTokenCmd {
    /// List enrolment tokens (never the secrets): id, trust, region, uses left, expiry,
    /// state (live, used up, expired, revoked).
    List {
        /// Print JSON (`{"enrolment_tokens":[...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrolment token: tablets can no longer enrol with it (`401
    /// enrolment_token_revoked`). Tablets already enrolled are not affected.
    Revoke {
        /// The token's id, as printed when it was made and by `enrolment-token list`.
        #[arg(long, value_name = "ID")]
        token_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SigningKeyCmd {
    /// Roll the feed signing key over to a new one, without re-enrolling tablets.
    ///
    /// Makes a new Ed25519 key, signs "the next key is NEW" with the current key, adds that
    /// to the key chain tablets fetch (GET /v1/device/keys), archives the old key under
    /// DIR/feed-signing-keys/ (never deleted) and makes the new key current. A running
    /// server signs with the new key within 10 seconds; tablets follow the chain from the
    /// key they pinned at enrolment.
    Roll,
    /// Show the current signing key and every rollover.
    Show,
}

#[derive(Debug, Subcommand)]
enum TlsCmd {
    /// Issue a new server certificate (and key) from the existing TLS CA.
    ///
    /// Tablets keep working: they trust the CA, not the certificate. The files are replaced
    /// atomically and a running server presents the new certificate from its next TLS
    /// handshake, without a restart. The certificate is valid for 10 years.
    RotateServerCert {
        /// Host name or IP address the certificate is valid for; repeat for several
        /// (localhost and 127.0.0.1 are always added). Default: the names of the current
        /// certificate.
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
    },
    /// Show the TLS CA, server certificate and device CA with their names and expiries, and
    /// the tablets' client certificates that expire soonest.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
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
    /// Create a new admin token for a trust's fleet page (/fleet) and print it once (only
    /// its hash is kept). It shows and revokes that trust's tablets only.
    Token {
        /// The trust's ODS code, e.g. RX9.
        #[arg(long, value_name = "CODE")]
        trust: TrustCode,
        /// Make it expire after this long (e.g. 90d, 12h; at most 365d). Default: valid
        /// until revoked.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
    },
    /// Revoke every admin token of a trust: each is refused from now on (`401
    /// token_revoked`) and every fleet-page session signed in with one ends at once.
    RevokeTokens {
        /// The trust's ODS code, e.g. RX9.
        #[arg(long, value_name = "CODE")]
        trust: TrustCode,
    },
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
    /// Earlier tokens stay valid: revoke them with `revoke-tokens` first to replace them.
    Token {
        /// The council's ODS code.
        #[arg(long, value_name = "ODS")]
        ods: CouncilCode,
        /// Make it expire after this long (e.g. 90d, 12h; at most 365d). Default: valid
        /// until revoked.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
    },
    /// Revoke every token of a council: each is refused from now on on every route (`401
    /// token_revoked`) and every inbox-page session signed in with one ends at once.
    RevokeTokens {
        /// The council's ODS code.
        #[arg(long, value_name = "ODS")]
        ods: CouncilCode,
    },
    /// List councils.
    List,
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// The fleet view: every tablet with its last contact, agent version, data version and
    /// age, outbox depth and certificate expiry.
    ///
    /// Sorted with the stalest data first and revoked tablets last. STATUS is `ok`, `stale`
    /// (data older than the policy's fresh age), `EXPIRED` (older than its expiry age:
    /// lookups answer "unknown"), `WIPE-AGE` (older than its wipe age: the tablet has erased
    /// its data by itself), `no-report` (the agent has not reported yet) or `revoked`.
    /// DATA AGE is the server's time now minus the server time of the tablet's data.
    List {
        /// Print JSON (`{"devices":[...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a tablet: it is refused from now on and told to erase its data at its next
    /// contact.
    Revoke {
        /// The device id (UUID) shown by `device list`.
        #[arg(long, value_name = "ID")]
        device: DeviceId,
    },
}

/// The DNS names and addresses of the current server certificate.
fn current_server_names(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    let status = pki::certificate_status(data_dir)?;
    Ok(status
        .into_iter()
        .find(|c| c.file == pki::SERVER_CERT_FILE)
        .map(|c| {
            c.names
                .into_iter()
                .filter(|n| !n.starts_with("CN="))
                .collect()
        })
        .unwrap_or_default())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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
        return Err("the duration must be more than zero and at most 365d".into());
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
                    Some(
                        ServerError::DataDirExists(_)
                            | ServerError::NotInitialised(_)
                            | ServerError::Store(StoreError::Config(_) | StoreError::Conflict(_))
                    )
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
            database,
        } => {
            if hostnames.is_empty() {
                hostnames = vec!["localhost".into(), "127.0.0.1".into()];
            }
            server::init_with(&data_dir, &hostnames, database.as_deref()).await?;
            println!("initialised {}", data_dir.display());
            match &database {
                Some(url) => println!(
                    "  database: {} (PostgreSQL; every replica serves a copy of this data dir)",
                    cpis_sync_server::store::postgres::redact_url(url)
                ),
                None => println!(
                    "  database: {} (SQLite)",
                    data_dir.join("cpis.db").display()
                ),
            }
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
        Command::Serve {
            data_dir,
            config,
            listen,
        } => serve(&data_dir, config.as_deref(), listen).await,
        Command::Admin {
            data_dir,
            config,
            command,
        } => admin(&data_dir, config.as_deref(), command).await,
    }
}

fn load_config(data_dir: &Path, config: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(file) => Config::load_file(file)?,
        None => Config::load(data_dir)?,
    })
}

async fn serve(
    data_dir: &Path,
    config: Option<&Path>,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let mut config = load_config(data_dir, config)?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let handle = Server::bind(data_dir, config, Arc::new(SystemClock)).await?;
    println!("listening on https://{}", handle.local_addr());
    println!("metrics on http://{}/metrics", handle.metrics_addr());
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

async fn admin(data_dir: &Path, config: Option<&Path>, command: Admin) -> anyhow::Result<()> {
    let store = server::open_store(data_dir, &load_config(data_dir, config)?)?;
    let now = Utc::now();
    match command {
        Admin::Trust(TrustCmd::Add { ods, name }) => {
            store
                .add_trust(ods.clone(), name.clone())
                .await
                .map_err(classify)?;
            println!("added trust {ods} ({name})");
        }
        Admin::Trust(TrustCmd::Token { trust, expires }) => {
            let (token, hash) = tokens::new_secret(tokens::TRUST_ADMIN_PREFIX);
            let expires_at = expires.map(|d| now + d);
            store
                .add_trust_admin_token(trust.clone(), hash, now, expires_at)
                .await
                .map_err(classify)?;
            eprintln!(
                "fleet page admin token for trust {trust}, {} (shown once; only its hash is kept):",
                validity(expires_at)
            );
            println!("{token}");
        }
        Admin::Trust(TrustCmd::RevokeTokens { trust }) => {
            let n = store
                .revoke_trust_admin_tokens(trust.clone(), now)
                .await
                .map_err(classify)?;
            println!(
                "revoked {n} admin token(s) of trust {trust}; their fleet-page sessions are signed out"
            );
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
        Admin::Council(CouncilCmd::Token { ods, expires }) => {
            let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
            let expires_at = expires.map(|d| now + d);
            store
                .add_council_token(ods.clone(), hash, now, expires_at)
                .await
                .map_err(classify)?;
            eprintln!(
                "upload token for council {ods}, {} (shown once; only its hash is kept):",
                validity(expires_at)
            );
            println!("{token}");
        }
        Admin::Council(CouncilCmd::RevokeTokens { ods }) => {
            let n = store
                .revoke_council_tokens(ods.clone(), now)
                .await
                .map_err(classify)?;
            println!(
                "revoked {n} token(s) of council {ods}; its inbox-page sessions are signed out"
            );
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
        Admin::EnrolmentToken(EnrolmentTokenArgs {
            command: Some(EnrolmentTokenCmd::List { json }),
            ..
        }) => print_enrolment_tokens(&store, now, json).await?,
        Admin::EnrolmentToken(EnrolmentTokenArgs {
            command: Some(EnrolmentTokenCmd::Revoke { token_id }),
            ..
        }) => {
            let id = token_id.trim().to_ascii_lowercase();
            if store
                .revoke_enrolment_token(id.clone(), now)
                .await
                .map_err(classify)?
            {
                println!("revoked enrolment token {id}; no tablet can enrol with it now");
            } else {
                println!("enrolment token {id} was already revoked");
            }
        }
        Admin::EnrolmentToken(EnrolmentTokenArgs {
            command: None,
            trust,
            region,
            uses,
            ttl,
        }) => {
            let (Some(trust), Some(region)) = (trust, region) else {
                return Err(BadInput("--trust and --region are required".into()).into());
            };
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
                "enrolment token {} for trust {trust}, region {region}: {uses} use(s), expires \
                 {} (shown once):",
                enrolment_token_id(&hash),
                expires_at.format("%Y-%m-%d %H:%M UTC")
            );
            println!("{token}");
        }
        Admin::Device(DeviceCmd::List { json }) => {
            let policy = load_config(data_dir, config)?.policy.policy();
            print_fleet(&store, &policy, now, json).await?;
        }
        Admin::SigningKey(SigningKeyCmd::Roll) => {
            let rolled = keys::roll(data_dir, &store, now).await?;
            println!("rolled the feed signing key over");
            println!(
                "  previous key: {} (archived in {})",
                rolled.previous,
                rolled.previous_archived.display()
            );
            println!("  current key:  {}", rolled.next);
            println!(
                "a running server signs with the new key within {} seconds; tablets follow the \
                 key chain to it at their next sync",
                keys::KEY_RECHECK.num_seconds()
            );
        }
        Admin::SigningKey(SigningKeyCmd::Show) => {
            let current = keys::current_key(data_dir, &store).await?;
            println!("current key: {}", cpis_protocol::PublicKey::from(&current));
            let chain = store.key_rollovers().await?;
            if chain.is_empty() {
                println!("no rollovers: the key made by init signs the feed");
            }
            for r in chain {
                println!(
                    "{}  {} -> {}",
                    r.rollover.issued_at.format("%Y-%m-%d %H:%M:%S"),
                    r.rollover.previous,
                    r.rollover.next
                );
            }
        }
        Admin::Tls(TlsCmd::RotateServerCert { mut hostnames }) => {
            if hostnames.is_empty() {
                hostnames = current_server_names(data_dir)?;
            }
            let expires_at =
                pki::rotate_server_certificate(data_dir, &hostnames).map_err(|e| match e {
                    pki::PkiError::InvalidHostname { .. } => BadInput(e.to_string()).into(),
                    other => anyhow::Error::from(other),
                })?;
            println!(
                "issued a new server certificate for [{}] from the existing TLS CA, valid until {}",
                hostnames.join(", "),
                expires_at.format("%Y-%m-%d")
            );
            println!(
                "a running server presents it from its next TLS handshake; tablets need no change"
            );
        }
        Admin::Tls(TlsCmd::Status { json }) => {
            let certs = pki::certificate_status(data_dir)?;
            let devices = store.devices().await?;
            let mut active: Vec<_> = devices.iter().filter(|d| d.revoked_at.is_none()).collect();
            active.sort_by_key(|d| d.cert_expires_at);
            let soon = now + Duration::days(30);
            if json {
                let list: Vec<serde_json::Value> = certs
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "file": c.file, "role": c.role, "names": c.names,
                            "expires_at": c.expires_at,
                        })
                    })
                    .collect();
                let clients: Vec<serde_json::Value> = active
                    .iter()
                    .map(|d| serde_json::json!({"device_id": d.id, "client_cert_expires_at": d.cert_expires_at}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "certificates": list,
                        "client_certificates": clients,
                    }))?
                );
            } else {
                println!("FILE\tEXPIRES\tWHAT\tNAMES");
                for c in certs {
                    println!(
                        "{}\t{}\t{}\t{}",
                        c.file,
                        c.expires_at.format("%Y-%m-%d %H:%M"),
                        c.role,
                        c.names.join(", ")
                    );
                }
                let expiring = active.iter().filter(|d| d.cert_expires_at < soon).count();
                println!(
                    "client certificates: {} active tablets; {} expire within 30 days \
                     (agents renew them before expiry)",
                    active.len(),
                    expiring
                );
                if let Some(first) = active.first() {
                    println!(
                        "  soonest: {} expires {}",
                        first.id,
                        first.cert_expires_at.format("%Y-%m-%d %H:%M")
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

/// How long a new bearer token is valid, in words.
fn validity(expires_at: Option<chrono::DateTime<Utc>>) -> String {
    expires_at.map_or_else(
        || "valid until revoked".to_owned(),
        |t| format!("expires {}", t.format("%Y-%m-%d %H:%M UTC")),
    )
}

/// `admin enrolment-token list`: every token (never its secret) as a table or JSON.
async fn print_enrolment_tokens(
    store: &impl Store,
    now: chrono::DateTime<Utc>,
    json: bool,
) -> anyhow::Result<()> {
    let list = store.enrolment_tokens().await?;
    let state = |t: &cpis_sync_server::store::EnrolmentTokenInfo| {
        if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at <= now {
            "expired"
        } else if t.uses_left == 0 {
            "used-up"
        } else {
            "live"
        }
    };
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|t| {
                serde_json::json!({
                    "id": t.id,
                    "trust": t.trust,
                    "region": t.region,
                    "uses_left": t.uses_left,
                    "created_at": t.created_at,
                    "expires_at": t.expires_at,
                    "revoked_at": t.revoked_at,
                    "state": state(t),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "enrolment_tokens": rows }))?
        );
        return Ok(());
    }
    println!("ID\tTRUST\tREGION\tUSES LEFT\tCREATED\tEXPIRES\tSTATE");
    for t in &list {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            t.id,
            t.trust,
            t.region,
            t.uses_left,
            t.created_at.format("%Y-%m-%d %H:%M"),
            t.expires_at.format("%Y-%m-%d %H:%M"),
            state(t)
        );
    }
    Ok(())
}

/// `admin device list`: the fleet view as a table or JSON.
async fn print_fleet(
    store: &impl Store,
    policy: &cpis_protocol::Policy,
    now: chrono::DateTime<Utc>,
    json: bool,
) -> anyhow::Result<()> {
    use cpis_sync_server::fleet::{self, format_age, printable};
    let rows = fleet::view(store.fleet().await?, policy, now);
    let fmt = |t: Option<chrono::DateTime<Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M").to_string(),
        )
    };
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let d = &r.entry.device;
                let rep = r.entry.report.as_ref().map(|s| &s.report);
                serde_json::json!({
                    "device_id": d.id,
                    "name": d.name,
                    "trust": d.trust,
                    "region": d.region,
                    "enrolled_at": d.enrolled_at,
                    "last_seen": r.last_seen,
                    "agent_version": d.agent_version,
                    "key_protection": rep.and_then(|p| p.key_protection),
                    "data_epoch": rep.and_then(|p| p.data_epoch),
                    "data_version": rep.and_then(|p| p.data_version),
                    "data_as_of": rep.and_then(|p| p.data_as_of),
                    "data_age_secs": r.data_age.map(|a| a.num_seconds()),
                    "status": r.status.as_str(),
                    "data_past_expiry": matches!(r.status, fleet::DataStatus::Expired | fleet::DataStatus::PastWipeAge),
                    "outbox_pending": rep.map(|p| p.outbox_pending),
                    "outbox_set_aside": rep.map(|p| p.outbox_set_aside),
                    "reported_at": rep.map(|p| p.reported_at),
                    "report_received_at": r.entry.report.as_ref().map(|s| s.received_at),
                    "client_cert_expires_at": d.cert_expires_at,
                    "revoked_at": d.revoked_at,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "devices": list }))?
        );
        return Ok(());
    }
    println!(
        "DEVICE\tNAME\tTRUST\tREGION\tSTATUS\tDATA AGE\tDATA VERSION\tOUTBOX (PENDING/SET ASIDE)\tAGENT\tKEYS\tLAST SEEN\tENROLLED\tCERT EXPIRES\tREVOKED"
    );
    let expired = rows
        .iter()
        .filter(|r| {
            matches!(
                r.status,
                fleet::DataStatus::Expired | fleet::DataStatus::PastWipeAge
            )
        })
        .count();
    for r in &rows {
        let d = &r.entry.device;
        let rep = r.entry.report.as_ref().map(|s| &s.report);
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            d.id,
            printable(d.name.as_deref().unwrap_or("-")),
            d.trust,
            d.region,
            r.status.as_str(),
            r.data_age.map_or_else(|| "-".to_owned(), format_age),
            rep.and_then(|p| p.data_epoch.zip(p.data_version))
                .map_or_else(|| "-".to_owned(), |(e, v)| format!("{e}/{v}")),
            rep.map_or_else(
                || "-".to_owned(),
                |p| format!("{}/{}", p.outbox_pending, p.outbox_set_aside)
            ),
            printable(&d.agent_version),
            rep.and_then(|p| p.key_protection)
                .map_or("-", cpis_protocol::KeyProtection::as_str),
            r.last_seen.map_or_else(
                || "never".to_owned(),
                |t| t.format("%Y-%m-%d %H:%M").to_string()
            ),
            d.enrolled_at.format("%Y-%m-%d %H:%M"),
            d.cert_expires_at.format("%Y-%m-%d"),
            fmt(d.revoked_at),
        );
    }
    if expired > 0 {
        eprintln!(
            "warning: {expired} tablet(s) hold data past the expiry age ({}): their lookups answer \"unknown\"",
            format_age(chrono::Duration::seconds(
                i64::try_from(policy.expiry_secs).unwrap_or(i64::MAX / 1000)
            ))
        );
    }
    let key_files = rows
        .iter()
        .filter(|r| r.entry.device.revoked_at.is_none())
        .filter(|r| {
            r.entry
                .report
                .as_ref()
                .and_then(|s| s.report.key_protection)
                == Some(cpis_protocol::KeyProtection::File)
        })
        .count();
    if key_files > 0 {
        eprintln!(
            "warning: {key_files} active tablet(s) keep their keys in a file (KEYS file), not \
             sealed by a TPM: safe only with full-disk encryption; re-enrol with --keystore tpm2"
        );
    }
    Ok(())
}
