//! Server configuration: `server.toml` in the data dir (written by `init`), with defaults for
//! every field and `CPIS_*` environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cpis_protocol::Policy;
use serde::{Deserialize, Serialize};

/// The configuration file's name inside the data dir.
pub const CONFIG_FILE: &str = "server.toml";
/// The database file's name inside the data dir.
pub const DATABASE_FILE: &str = "cpis.db";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {name}={value:?} is not valid: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid policy: {0}")]
    Policy(&'static str),
    #[error("council_overdue_hours must be at least 1")]
    OverdueHours,
}

/// Everything `serve` needs besides the data dir's keys and database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`CPIS_LISTEN`).
    pub listen: SocketAddr,
    /// Address of the plain-HTTP Prometheus listener serving only `/metrics`
    /// (`CPIS_METRICS_LISTEN`); loopback by default. `/metrics` is never on `listen`.
    pub metrics_listen: SocketAddr,
    /// How long a client may take to send a request's headers (HTTP/1.1), in seconds
    /// (`CPIS_HEADER_READ_TIMEOUT_SECS`).
    pub header_read_timeout_secs: u64,
    /// How long a request may take from its headers to the response's headers, reading its
    /// body included, in seconds; beyond it `408` (`CPIS_REQUEST_TIMEOUT_SECS`). A response
    /// body (a snapshot) then streams at the client's pace.
    pub request_timeout_secs: u64,
    /// Largest accepted request body (council uploads), in bytes (`CPIS_MAX_UPLOAD_BYTES`).
    pub max_upload_bytes: usize,
    /// Largest accepted event batch body, in bytes (`CPIS_MAX_EVENT_BATCH_BYTES`); larger: 413.
    pub max_event_batch_bytes: usize,
    /// Requests handled at once before new ones are shed with 503 (`CPIS_MAX_CONCURRENT_REQUESTS`).
    pub max_concurrent_requests: usize,
    /// How long a signed checkpoint stays valid, in seconds (`CPIS_CHECKPOINT_TTL_SECS`).
    pub checkpoint_ttl_secs: u64,
    /// Change-log entries older than this many days are pruned (`CPIS_CHANGE_LOG_DAYS`).
    pub change_log_days: u64,
    /// At most this many change-log versions are kept (`CPIS_CHANGE_LOG_MAX_VERSIONS`).
    pub change_log_max_versions: u64,
    /// How often retention purge and change-log pruning run, in seconds.
    pub maintenance_interval_secs: u64,
    /// zstd level for feed bodies (1–19).
    pub zstd_level: i32,
    /// Memory bound of the snapshot cache, in bytes (`CPIS_SNAPSHOT_CACHE_BYTES`).
    pub snapshot_cache_bytes: usize,
    /// Validity of device client certificates, in days.
    pub device_cert_days: u32,
    /// The council inbox page marks a notice overdue once it has waited longer than this
    /// many hours unacknowledged (`CPIS_COUNCIL_OVERDUE_HOURS`; at least 1). The default,
    /// 120 (5 days), is the API's `overdue`.
    pub council_overdue_hours: u64,
    /// The PostgreSQL database every replica shares, `postgres://USER[:PASSWORD]@HOST:PORT/DB`
    /// (`CPIS_DATABASE_URL`); absent: SQLite, `cpis.db` in the data dir (one `serve`).
    pub database_url: Option<String>,
    /// Connections a replica keeps to PostgreSQL at most (`CPIS_DATABASE_MAX_CONNECTIONS`).
    pub database_max_connections: usize,
    /// Seconds a request waits for a PostgreSQL connection before the database counts as
    /// unreachable and the request gets 503 (`CPIS_DATABASE_TIMEOUT_SECS`).
    pub database_timeout_secs: u64,
    /// Longest a tablet's waiting checkpoint request is held before it is answered with an
    /// unchanged head, in seconds; 0 turns the live feed off (the route answers 404 and
    /// tablets poll) (`CPIS_LIVE_WAIT_MAX_SECS`). Keep it under any proxy's idle cut-off.
    pub live_wait_max_secs: u64,
    /// How often the region heads are re-read when no write has hinted at a change, in
    /// milliseconds: the bound on how late a waiting tablet hears of a change made where no
    /// hint reaches this replica (`CPIS_LIVE_RECHECK_MILLIS`).
    pub live_recheck_millis: u64,
    /// Waiting checkpoint requests held at once; beyond it `503` and the tablet polls
    /// (`CPIS_LIVE_MAX_WAITING`). They are never counted as work by the shedder.
    pub live_max_waiting: usize,
    /// Freshness policy sent in every checkpoint.
    pub policy: PolicyConfig,
    /// How requests beyond what the server can serve are turned away (see `shed`).
    pub load_shedding: SheddingConfig,
}

/// Load shedding beyond `max_concurrent_requests`: the 503 `Retry-After` spread and the
/// per-device rate limit (429). See the `shed` module for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SheddingConfig {
    /// Longest `Retry-After` of a 503, in seconds (`CPIS_SHED_RETRY_AFTER_MAX_SECS`).
    pub retry_after_max_secs: u64,
    /// Requests a device regains per minute; 0 turns the per-device limit off
    /// (`CPIS_DEVICE_REQUESTS_PER_MINUTE`).
    pub device_requests_per_minute: u32,
    /// Requests a device may make in a burst (`CPIS_DEVICE_BURST`).
    pub device_burst: u32,
    /// Devices whose rate is tracked at once (memory bound, about 100 bytes each)
    /// (`CPIS_MAX_TRACKED_DEVICES`).
    pub max_tracked_devices: usize,
    /// Requests handled at once that carry no credential the server knows (sign-in pages,
    /// enrolment, bad or missing bearer tokens), apart from `max_concurrent_requests`, so
    /// they can never starve tablets or signed-in councils (`CPIS_ANONYMOUS_CONCURRENT_REQUESTS`).
    pub anonymous_concurrent_requests: usize,
    /// Online confirmations (`/v1/device/confirm`) a device regains per minute; beyond its
    /// burst: 429 (`CPIS_CONFIRM_PER_DEVICE_PER_MINUTE`). A stolen certificate cannot use
    /// the national set as an oracle.
    pub confirm_per_device_per_minute: u32,
    /// Online confirmations a device may make in a burst (`CPIS_CONFIRM_BURST`).
    pub confirm_burst: u32,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        Self {
            retry_after_max_secs: 60,
            device_requests_per_minute: 600,
            device_burst: 1200,
            max_tracked_devices: 200_000,
            anonymous_concurrent_requests: 64,
            confirm_per_device_per_minute: 4,
            confirm_burst: 4,
        }
    }
}

/// The freshness policy, in seconds (protocol defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub fresh_secs: u64,
    pub expiry_secs: u64,
    pub wipe_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            fresh_secs: p.fresh_secs,
            expiry_secs: p.expiry_secs,
            wipe_secs: p.wipe_secs,
        }
    }
}

impl PolicyConfig {
    /// The policy as sent on the wire.
    pub fn policy(&self) -> Policy {
        Policy {
            fresh_secs: self.fresh_secs,
            expiry_secs: self.expiry_secs,
            wipe_secs: self.wipe_secs,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            header_read_timeout_secs: 10,
            request_timeout_secs: 120,
            max_upload_bytes: 32 * 1024 * 1024,
            max_event_batch_bytes: 1024 * 1024,
            max_concurrent_requests: 1024,
            checkpoint_ttl_secs: 24 * 3600,
            change_log_days: 30,
            change_log_max_versions: 10_000_000,
            maintenance_interval_secs: 3600,
            zstd_level: 9,
            snapshot_cache_bytes: 256 * 1024 * 1024,
            device_cert_days: 365,
            council_overdue_hours: 24 * cpis_protocol::mailbox::OVERDUE_AFTER_DAYS as u64,
            database_url: None,
            database_max_connections: 16,
            database_timeout_secs: 5,
            live_wait_max_secs: 25,
            live_recheck_millis: 1000,
            live_max_waiting: 50_000,
            policy: PolicyConfig::default(),
            load_shedding: SheddingConfig::default(),
        }
    }
}

fn env_parse<T: std::str::FromStr>(
    name: &'static str,
    get: &dyn Fn(&str) -> Option<String>,
    target: &mut T,
) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Some(value) = get(name) {
        *target = value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
            name,
            value: value.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

impl Config {
    /// Loads `server.toml` from the data dir (defaults when absent), then the environment.
    pub fn load(data_dir: &Path) -> Result<Self, ConfigError> {
        Self::load_from(&data_dir.join(CONFIG_FILE), true)
    }

    /// Loads the given file (which must exist; `serve --config FILE`), then the environment.
    pub fn load_file(path: &Path) -> Result<Self, ConfigError> {
        Self::load_from(path, false)
    }

    fn load_from(path: &Path, missing_ok: bool) -> Result<Self, ConfigError> {
        let path = path.to_owned();
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source,
            })?,
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.apply_env(&|name| std::env::var(name).ok())?;
        config
            .policy
            .policy()
            .validate()
            .map_err(ConfigError::Policy)?;
        if config.council_overdue_hours == 0 {
            return Err(ConfigError::OverdueHours);
        }
        Ok(config)
    }

    /// Applies `CPIS_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        env_parse("CPIS_LISTEN", get, &mut self.listen)?;
        if let Some(url) = get("CPIS_DATABASE_URL") {
            let url = url.trim();
            self.database_url = (!url.is_empty()).then(|| url.to_owned());
        }
        env_parse(
            "CPIS_DATABASE_MAX_CONNECTIONS",
            get,
            &mut self.database_max_connections,
        )?;
        env_parse(
            "CPIS_DATABASE_TIMEOUT_SECS",
            get,
            &mut self.database_timeout_secs,
        )?;
        env_parse("CPIS_METRICS_LISTEN", get, &mut self.metrics_listen)?;
        env_parse("CPIS_LIVE_WAIT_MAX_SECS", get, &mut self.live_wait_max_secs)?;
        env_parse(
            "CPIS_LIVE_RECHECK_MILLIS",
            get,
            &mut self.live_recheck_millis,
        )?;
        env_parse("CPIS_LIVE_MAX_WAITING", get, &mut self.live_max_waiting)?;
        env_parse(
            "CPIS_HEADER_READ_TIMEOUT_SECS",
            get,
            &mut self.header_read_timeout_secs,
        )?;
        env_parse(
            "CPIS_REQUEST_TIMEOUT_SECS",
            get,
            &mut self.request_timeout_secs,
        )?;
        env_parse("CPIS_MAX_UPLOAD_BYTES", get, &mut self.max_upload_bytes)?;
        env_parse(
            "CPIS_MAX_EVENT_BATCH_BYTES",
            get,
            &mut self.max_event_batch_bytes,
        )?;
        env_parse(
            "CPIS_MAX_CONCURRENT_REQUESTS",
            get,
            &mut self.max_concurrent_requests,
        )?;
        env_parse(
            "CPIS_CHECKPOINT_TTL_SECS",
            get,
            &mut self.checkpoint_ttl_secs,
        )?;
        env_parse("CPIS_CHANGE_LOG_DAYS", get, &mut self.change_log_days)?;
        env_parse(
            "CPIS_CHANGE_LOG_MAX_VERSIONS",
            get,
            &mut self.change_log_max_versions,
        )?;
        env_parse(
            "CPIS_SNAPSHOT_CACHE_BYTES",
            get,
            &mut self.snapshot_cache_bytes,
        )?;
        env_parse(
            "CPIS_COUNCIL_OVERDUE_HOURS",
            get,
            &mut self.council_overdue_hours,
        )?;
        let shed = &mut self.load_shedding;
        env_parse(
            "CPIS_SHED_RETRY_AFTER_MAX_SECS",
            get,
            &mut shed.retry_after_max_secs,
        )?;
        env_parse(
            "CPIS_DEVICE_REQUESTS_PER_MINUTE",
            get,
            &mut shed.device_requests_per_minute,
        )?;
        env_parse("CPIS_DEVICE_BURST", get, &mut shed.device_burst)?;
        env_parse(
            "CPIS_MAX_TRACKED_DEVICES",
            get,
            &mut shed.max_tracked_devices,
        )?;
        env_parse(
            "CPIS_ANONYMOUS_CONCURRENT_REQUESTS",
            get,
            &mut shed.anonymous_concurrent_requests,
        )?;
        env_parse(
            "CPIS_CONFIRM_PER_DEVICE_PER_MINUTE",
            get,
            &mut shed.confirm_per_device_per_minute,
        )?;
        env_parse("CPIS_CONFIRM_BURST", get, &mut shed.confirm_burst)?;
        Ok(())
    }

    /// The file `init` writes: every setting with its default, commented.
    pub fn default_file() -> String {
        Self::file_for(None)
    }

    /// The file `init --database URL` writes (`None`: SQLite, as [`Config::default_file`]).
    pub fn file_for(database_url: Option<&str>) -> String {
        let d = Config::default();
        let database = match database_url {
            Some(url) => format!("database_url = {}", toml::Value::String(url.to_owned())),
            None => "# database_url = \"postgres://cpis@db.example.nhs.uk:5432/cpis\"".to_owned(),
        };
        let p = d.policy;
        format!(
            "# CP-IS Edge sync server configuration. Every setting is optional; the values\n\
             # shown are the defaults. Environment variables (CPIS_LISTEN, ...) override them.\n\
             \n\
             # Address to listen on (HTTPS only). CPIS_LISTEN\n\
             listen = \"{listen}\"\n\
             # The PostgreSQL database every replica shares (each replica runs `serve` on its\n\
             # own copy of this data dir); absent, SQLite in cpis.db here. CPIS_DATABASE_URL\n\
             {database}\n\
             # Connections each replica keeps to it at most, and seconds a request waits for one\n\
             # before the database counts as unreachable (503). CPIS_DATABASE_MAX_CONNECTIONS,\n\
             # CPIS_DATABASE_TIMEOUT_SECS\n\
             database_max_connections = {dmc}\n\
             database_timeout_secs = {dts}\n\
             # Prometheus /metrics (plain HTTP; per-council mailbox counts): keep it on loopback\n\
             # or a private monitoring network, never the public one. CPIS_METRICS_LISTEN\n\
             metrics_listen = \"{metrics}\"\n\
             # Seconds a client may take to send a request's headers, and to send its body\n\
             # and be answered (408 after). CPIS_HEADER_READ_TIMEOUT_SECS, CPIS_REQUEST_TIMEOUT_SECS\n\
             header_read_timeout_secs = {hrt}\n\
             request_timeout_secs = {rt}\n\
             # Largest accepted request body in bytes; larger uploads get 413. CPIS_MAX_UPLOAD_BYTES\n\
             max_upload_bytes = {mub}\n\
             # Largest access-event batch body in bytes (at most 500 events a batch); larger\n\
             # gets 413. CPIS_MAX_EVENT_BATCH_BYTES\n\
             max_event_batch_bytes = {mebb}\n\
             # Requests in flight before new ones are shed with 503 + Retry-After (/healthz and\n\
             # /metrics are never shed). CPIS_MAX_CONCURRENT_REQUESTS\n\
             max_concurrent_requests = {mcr}\n\
             # Lifetime of a signed checkpoint in seconds.\n\
             checkpoint_ttl_secs = {ttl}\n\
             # Deltas can be served from versions up to this many days old (older: 410).\n\
             change_log_days = {days}\n\
             change_log_max_versions = {maxv}\n\
             # Retention purge and change-log pruning interval in seconds.\n\
             maintenance_interval_secs = {mi}\n\
             zstd_level = {z}\n\
             snapshot_cache_bytes = {scb}\n\
             device_cert_days = {dcd}\n\
             # The council inbox page marks notices unacknowledged for longer than this many\n\
             # hours as overdue (120 = 5 days, as the API's `overdue`). CPIS_COUNCIL_OVERDUE_HOURS\n\
             council_overdue_hours = {coh}\n\
             # Live feed: a tablet's waiting checkpoint request is answered as soon as its\n\
             # region's head moves, else after live_wait_max_secs (0: off, tablets only poll);\n\
             # heads re-read every live_recheck_millis when no write hinted; at most\n\
             # live_max_waiting held at once (beyond: 503, the tablet polls).\n\
             # CPIS_LIVE_WAIT_MAX_SECS, CPIS_LIVE_RECHECK_MILLIS, CPIS_LIVE_MAX_WAITING\n\
             live_wait_max_secs = {lwm}\n\
             live_recheck_millis = {lrm}\n\
             live_max_waiting = {lmw}\n\
             \n\
             [policy]\n\
             fresh_secs = {fresh}\n\
             expiry_secs = {expiry}\n\
             wipe_secs = {wipe}\n\
             \n\
             [load_shedding]\n\
             # A 503's Retry-After is a random 1..=N seconds, N = requests shed per request\n\
             # admitted in the last second, capped here. CPIS_SHED_RETRY_AFTER_MAX_SECS\n\
             retry_after_max_secs = {ramax}\n\
             # Per device (client certificate): a burst of device_burst requests, refilled at\n\
             # device_requests_per_minute; beyond it 429 + Retry-After. 0 per minute: no limit.\n\
             # CPIS_DEVICE_REQUESTS_PER_MINUTE, CPIS_DEVICE_BURST\n\
             device_requests_per_minute = {drpm}\n\
             device_burst = {db}\n\
             # Devices tracked at once (memory bound). CPIS_MAX_TRACKED_DEVICES\n\
             max_tracked_devices = {mtd}\n\
             # Requests in flight with no known credential (sign-in, enrolment, bad tokens), on\n\
             # their own so they never starve tablets or councils. CPIS_ANONYMOUS_CONCURRENT_REQUESTS\n\
             anonymous_concurrent_requests = {acr}\n\
             # Online confirmations per device: a burst, refilled per minute; beyond it 429.\n\
             # CPIS_CONFIRM_PER_DEVICE_PER_MINUTE, CPIS_CONFIRM_BURST\n\
             confirm_per_device_per_minute = {cpm}\n\
             confirm_burst = {cb}\n",
            listen = d.listen,
            dmc = d.database_max_connections,
            dts = d.database_timeout_secs,
            metrics = d.metrics_listen,
            hrt = d.header_read_timeout_secs,
            rt = d.request_timeout_secs,
            mub = d.max_upload_bytes,
            mebb = d.max_event_batch_bytes,
            mcr = d.max_concurrent_requests,
            ttl = d.checkpoint_ttl_secs,
            days = d.change_log_days,
            maxv = d.change_log_max_versions,
            mi = d.maintenance_interval_secs,
            z = d.zstd_level,
            scb = d.snapshot_cache_bytes,
            dcd = d.device_cert_days,
            coh = d.council_overdue_hours,
            lwm = d.live_wait_max_secs,
            lrm = d.live_recheck_millis,
            lmw = d.live_max_waiting,
            fresh = p.fresh_secs,
            expiry = p.expiry_secs,
            wipe = p.wipe_secs,
            ramax = d.load_shedding.retry_after_max_secs,
            drpm = d.load_shedding.device_requests_per_minute,
            db = d.load_shedding.device_burst,
            mtd = d.load_shedding.max_tracked_devices,
            acr = d.load_shedding.anonymous_concurrent_requests,
            cpm = d.load_shedding.confirm_per_device_per_minute,
            cb = d.load_shedding.confirm_burst,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_round_trips() {
        let parsed: Config = toml::from_str(&Config::default_file()).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(&|n| (n == "CPIS_LISTEN").then(|| "127.0.0.1:9000".to_owned()))
            .unwrap();
        assert_eq!(c.listen.port(), 9000);
        let err = c
            .apply_env(&|n| (n == "CPIS_CHANGE_LOG_DAYS").then(|| "x".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("CPIS_CHANGE_LOG_DAYS"));
    }

    #[test]
    fn load_shedding_env_overrides() {
        let mut c = Config::default();
        let env = |n: &str| {
            match n {
                "CPIS_SHED_RETRY_AFTER_MAX_SECS" => Some("7"),
                "CPIS_DEVICE_REQUESTS_PER_MINUTE" => Some("30"),
                "CPIS_DEVICE_BURST" => Some("6"),
                "CPIS_MAX_TRACKED_DEVICES" => Some("99"),
                "CPIS_ANONYMOUS_CONCURRENT_REQUESTS" => Some("5"),
                "CPIS_CONFIRM_PER_DEVICE_PER_MINUTE" => Some("2"),
                "CPIS_CONFIRM_BURST" => Some("3"),
                _ => None,
            }
            .map(str::to_owned)
        };
        c.apply_env(&env).unwrap();
        assert_eq!(
            c.load_shedding,
            SheddingConfig {
                retry_after_max_secs: 7,
                device_requests_per_minute: 30,
                device_burst: 6,
                max_tracked_devices: 99,
                anonymous_concurrent_requests: 5,
                confirm_per_device_per_minute: 2,
                confirm_burst: 3,
            }
        );
        let err = c
            .apply_env(&|n| (n == "CPIS_DEVICE_BURST").then(|| "lots".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("CPIS_DEVICE_BURST"));
    }
}
