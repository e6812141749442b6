//! The real `cpis-agent` as child processes: a [`Tablet`] is a state directory the CLI works
//! on (enrol, sync, lookup and status with `--json`), a sync that can be killed part way, and
//! [`AgentDaemon`], the local API (`cpis-agent run`) on loopback.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use cpis_protocol::local::{LookupRequest, LookupResponse, StatusResponse, SyncResponse};
use cpis_protocol::{NhsNumber, PublicKey, SignedMessage, SnapshotMeta};

use super::process::{self, Cmd, Output, Running};
use super::{bins, http};

/// Default bound on one agent command (a sync over a slow link gets its own).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One tablet: an agent state directory, driven through the `cpis-agent` command line.
#[derive(Debug, Clone)]
pub struct Tablet {
    bin: PathBuf,
    state_dir: PathBuf,
    signing_key: Option<PublicKey>,
    timeout: Duration,
    /// Extra environment for every `cpis-agent` this tablet runs (e.g. `LD_PRELOAD`).
    envs: Vec<(OsString, OsString)>,
    /// A program (and its arguments) that `cpis-agent ARGS` is run under, if any.
    launcher: Vec<OsString>,
}

impl Tablet {
    /// A tablet on an existing state directory.
    pub fn at(state_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            bin: bins()?.agent.clone(),
            state_dir: state_dir.to_owned(),
            signing_key: None,
            timeout: COMMAND_TIMEOUT,
            envs: Vec::new(),
            launcher: Vec::new(),
        })
    }

    /// `cpis-agent enrol` against `server_url` (the server, or a proxy in front of it),
    /// trusting `ca`.
    pub async fn enrol(
        state_dir: &Path,
        server_url: &str,
        ca: &Path,
        token: &str,
    ) -> anyhow::Result<Self> {
        Self::enrol_with_timeout(state_dir, server_url, ca, token, COMMAND_TIMEOUT).await
    }

    /// [`Self::enrol`] with a bound other than [`COMMAND_TIMEOUT`] (slow links).
    pub async fn enrol_with_timeout(
        state_dir: &Path,
        server_url: &str,
        ca: &Path,
        token: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut tablet = Self::at(state_dir)?;
        let out = Cmd::new(&tablet.bin)
            .arg("enrol")
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--server", server_url])
            .arg("--ca")
            .arg(ca)
            .args(["--token", token, "--name", "field test tablet"])
            // A key file: the field tests must not leave NV indices in a real TPM of the
            // machine running them (the TPM keystore has its own tests, on swtpm).
            .args(["--keystore", "file"])
            .run(timeout)
            .await?;
        tablet.signing_key = out
            .lines()
            .find_map(|l| l.strip_prefix("Server signing key pinned:"))
            .and_then(|k| k.trim().parse().ok());
        Ok(tablet)
    }

    /// The same tablet with another bound on each command.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same tablet with `key=value` in the environment of every `cpis-agent` it runs
    /// (how the clock scenario preloads libfaketime: the product binary, its own clock code).
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The same tablet running `PROGRAM ARGS... cpis-agent ...` instead of `cpis-agent ...`
    /// (e.g. `unshare --mount` with a script that stages a reboot's boot id).
    pub fn with_launcher<I, S>(mut self, launcher: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.launcher = launcher.into_iter().map(Into::into).collect();
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The server signing key the agent pinned (as it printed at enrolment).
    pub fn signing_key(&self) -> Option<&PublicKey> {
        self.signing_key.as_ref()
    }

    fn cmd(&self, sub: &str) -> Cmd {
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => Cmd::new(program).args(args).arg(&self.bin),
            None => Cmd::new(&self.bin),
        };
        for (k, v) in &self.envs {
            cmd = cmd.env(k, v);
        }
        cmd.arg(sub).arg("--state-dir").arg(&self.state_dir)
    }

    /// `cpis-agent sync --json`, requiring success.
    pub async fn sync(&self) -> anyhow::Result<SyncResponse> {
        let out = self.try_sync().await?.ok()?;
        serde_json::from_str(&out).with_context(|| format!("reading sync --json: {out}"))
    }

    /// `cpis-agent sync --json`, whatever its outcome (a failed sync is not an error here).
    pub async fn try_sync(&self) -> anyhow::Result<Output> {
        self.cmd("sync").arg("--json").output(self.timeout).await
    }

    /// `cpis-agent sync` in the background, to be killed part way ([`Running::kill9`]).
    pub fn spawn_sync(&self) -> anyhow::Result<Running> {
        self.cmd("sync").spawn_quiet()
    }

    /// `cpis-agent lookup NHS --json`: the tablet's data, and for a miss the online national
    /// check when the server answers in time.
    pub async fn lookup(&self, nhs: &NhsNumber) -> anyhow::Result<LookupResponse> {
        self.lookup_with(nhs, &[]).await
    }

    /// `cpis-agent lookup NHS --json --offline`: the tablet's own data only.
    pub async fn lookup_offline(&self, nhs: &NhsNumber) -> anyhow::Result<LookupResponse> {
        self.lookup_with(nhs, &["--offline"]).await
    }

    async fn lookup_with(&self, nhs: &NhsNumber, extra: &[&str]) -> anyhow::Result<LookupResponse> {
        let out = self
            .cmd("lookup")
            .arg(nhs.to_string())
            .args(["--staff", "FIELD1", "--json"])
            .args(extra)
            .run(self.timeout)
            .await?;
        serde_json::from_str(&out).with_context(|| format!("reading lookup --json: {out}"))
    }

    /// `cpis-agent status --json`.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        let out = self.cmd("status").arg("--json").run(self.timeout).await?;
        serde_json::from_str(&out).with_context(|| format!("reading status --json: {out}"))
    }

    /// A copy of this tablet's state directory at `to` (same device, same keys): a way to
    /// replay the same starting point.
    pub fn copy_to(&self, to: &Path) -> anyhow::Result<Self> {
        copy_dir(&self.state_dir, to)?;
        Ok(Self {
            state_dir: to.to_owned(),
            ..self.clone()
        })
    }

    /// Replaces this tablet's state directory with a copy of `from`'s.
    pub fn reset_from(&self, from: &Tablet) -> anyhow::Result<()> {
        if self.state_dir.exists() {
            std::fs::remove_dir_all(&self.state_dir)
                .with_context(|| format!("removing {}", self.state_dir.display()))?;
        }
        copy_dir(&from.state_dir, &self.state_dir)
    }

    /// A mutual-TLS client authenticating as this tablet (its key and certificate from the
    /// state directory), for reading what the server serves it.
    pub fn device_http(&self) -> anyhow::Result<reqwest::Client> {
        let ca = self.state_dir.join("keys").join("ca.pem");
        let ca =
            std::fs::read_to_string(&ca).with_context(|| format!("reading {}", ca.display()))?;
        let (cert, key) = cpis_agent::agent::device_identity(&self.state_dir)
            .with_context(|| format!("reading the identity in {}", self.state_dir.display()))?;
        http::client(&ca, Some((&cert, &key)), COMMAND_TIMEOUT)
    }

    /// The server's current snapshot metadata for this tablet's region, fetched from
    /// `server_url` as this tablet and verified with the pinned signing key.
    pub async fn snapshot_meta(&self, server_url: &str) -> anyhow::Result<SnapshotMeta> {
        let key = self
            .signing_key
            .as_ref()
            .ok_or_else(|| anyhow!("the signing key printed at enrolment is not known"))?;
        let r = self
            .device_http()?
            .get(format!(
                "{server_url}{}",
                cpis_protocol::api::paths::SNAPSHOT
            ))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("snapshot metadata answered {}", r.status());
        }
        let signed = SignedMessage::from_bytes(&r.bytes().await?)?;
        Ok(signed.open::<SnapshotMeta>(key.verifying_key())?)
    }

    /// `cpis-agent run --listen ADDR` (port 0 allowed), waiting until its API answers.
    pub async fn run_api(&self, listen: SocketAddr) -> anyhow::Result<AgentDaemon> {
        let log = self.state_dir.with_extension("run.log");
        let from = process::file_len(&log);
        let mut child = self
            .cmd("run")
            .args(["--listen", &listen.to_string()])
            .spawn_logged(&log)?;
        let addr: SocketAddr = process::poll(
            "the agent's local API address",
            self.timeout,
            Duration::from_millis(25),
            || {
                let found = process::find_after(&log, from, "local API on http://");
                let exited = child.try_status().ok().flatten();
                async move {
                    match (found, exited) {
                        (Some(a), _) => Ok(Some(a)),
                        (None, Some(status)) => Err(anyhow!("cpis-agent run exited ({status})")),
                        (None, None) => Ok(None),
                    }
                }
            },
        )
        .await
        .with_context(|| process::tail(&log, 20))?
        // "local API on http://ADDR; background sync every N s"
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .context("reading the local API address")?;
        Ok(AgentDaemon {
            http: http::local_client(self.timeout)?,
            base: format!("http://{addr}"),
            child,
            log,
        })
    }
}

/// `cpis-agent run`: the loopback API. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct AgentDaemon {
    child: Running,
    http: reqwest::Client,
    base: String,
    log: PathBuf,
}

impl AgentDaemon {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `POST /v1/lookups`.
    pub async fn lookup(&self, nhs: &str) -> anyhow::Result<LookupResponse> {
        let r = self
            .http
            .post(format!("{}/v1/lookups", self.base))
            .json(&LookupRequest {
                nhs_number: nhs.to_owned(),
                staff_id: Some("FIELD1".into()),
                incident_ref: None,
            })
            .send()
            .await?;
        Self::json(r).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        Self::json(
            self.http
                .get(format!("{}/v1/status", self.base))
                .send()
                .await?,
        )
        .await
    }

    /// `POST /v1/sync`.
    pub async fn sync(&self) -> anyhow::Result<SyncResponse> {
        Self::json(
            self.http
                .post(format!("{}/v1/sync", self.base))
                .send()
                .await?,
        )
        .await
    }

    async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> anyhow::Result<T> {
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("agent API answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("reading {text}"))
    }

    /// SIGKILL.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill9().await.map(|_| ())
    }

    /// SIGINT (what `run` stops on) and wait.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.child.signal("INT").await?;
        self.child.wait(Duration::from_secs(20)).await
    }

    /// The end of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail(&self.log, lines)
    }
}

/// Copies a directory tree (files and folders only).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
