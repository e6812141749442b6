//! The real `cpis-sync-server` as a child process: `init` (on SQLite, or on a PostgreSQL
//! database for replicas that each serve a copy of the data dir), the directory of trusts,
//! regions and councils added with `admin`, `serve` (waiting for `/healthz` over TLS),
//! SIGKILL and restart on the same data dir and address, graceful SIGTERM; council uploads
//! over HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use cpis_fixtures::Directory;
use cpis_protocol::api::UploadReceipt;
use cpis_protocol::mailbox::{
    self, AckRequest, AckResponse, Notification, NotificationId, NotificationPage,
};
use cpis_protocol::{CouncilCode, FlagRecord, RegionId, TrustCode};

use super::process::{self, Cmd, Running};
use super::{ADMIN_TIMEOUT, bins, http};

/// How long `serve` may take to answer `/healthz`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd server may take to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on each HTTPS request the harness makes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A sync server child process and its data dir. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    bin: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    env: Vec<(String, String)>,
    ca_pem: String,
    http: reqwest::Client,
    child: Option<Running>,
    starts: u32,
    port_busy: usize,
    /// The `/metrics` listener of the running `serve` (a loopback port of its own).
    metrics: Option<SocketAddr>,
}

impl ServerProcess {
    /// `init` in `data_dir` (which must not exist or be empty) for `localhost` and
    /// `127.0.0.1`, adds every trust, region (with its neighbour councils) and council of
    /// `directory`, then serves on `listen` (port 0: the system picks; restarts reuse it).
    pub async fn init_and_start(
        data_dir: &Path,
        listen: SocketAddr,
        directory: &Directory,
    ) -> anyhow::Result<Self> {
        Self::init_and_start_with_env(data_dir, listen, directory, &[]).await
    }

    /// [`Self::init_and_start`] with `CPIS_*` environment overrides for `serve`
    /// (e.g. `CPIS_MAX_CONCURRENT_REQUESTS`).
    pub async fn init_and_start_with_env(
        data_dir: &Path,
        listen: SocketAddr,
        directory: &Directory,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        init(data_dir, None).await?;
        let mut server = Self::stopped(data_dir, listen, env)?;
        server.add_directory(directory).await?;
        server.start().await?;
        Ok(server)
    }

    /// `init --database URL` in `data_dir` (which must not exist or be empty) for
    /// `localhost` and `127.0.0.1`: keys and certificates in `data_dir`, the schema in
    /// `database_url`, an existing empty PostgreSQL database. Nothing is served: every
    /// replica serves its own copy of `data_dir` ([`Self::start_existing`]).
    pub async fn init_with_database(data_dir: &Path, database_url: &str) -> anyhow::Result<()> {
        init(data_dir, Some(database_url)).await
    }

    /// `serve` on a data dir that is initialised already (e.g. a replica's copy of one made
    /// by [`Self::init_with_database`]), on `listen`, with `CPIS_*` environment overrides.
    pub async fn start_existing(
        data_dir: &Path,
        listen: SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut server = Self::stopped(data_dir, listen, env)?;
        server.start().await?;
        Ok(server)
    }

    /// The handle of a server on an initialised `data_dir`, not started.
    fn stopped(data_dir: &Path, listen: SocketAddr, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let ca_path = data_dir.join("tls-ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path)
            .with_context(|| format!("reading {}", ca_path.display()))?;
        Ok(Self {
            http: http::client(&ca_pem, None, REQUEST_TIMEOUT)?,
            bin: bins()?.server.clone(),
            log: log_path(data_dir),
            data_dir: data_dir.to_owned(),
            addr: listen,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ca_pem,
            child: None,
            starts: 0,
            port_busy: 0,
            metrics: None,
        })
    }

    /// Adds the directory's trusts, regions and councils with `admin` commands.
    pub async fn add_directory(&self, directory: &Directory) -> anyhow::Result<()> {
        for args in directory_commands(directory) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.admin(&args).await?;
        }
        Ok(())
    }

    /// Runs `cpis-sync-server admin --data-dir DIR ARGS...`; returns its stdout.
    pub async fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        Cmd::new(&self.bin)
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .run(ADMIN_TIMEOUT)
            .await
    }

    /// A new upload token for a council.
    pub async fn council_token(&self, ods: &CouncilCode) -> anyhow::Result<String> {
        Ok(self
            .admin(&["council", "token", "--ods", ods.as_str()])
            .await?
            .trim()
            .to_owned())
    }

    /// A council's HTTPS client with a new upload token.
    pub async fn council(&self, ods: &CouncilCode) -> anyhow::Result<CouncilClient> {
        Ok(CouncilClient {
            http: self.http.clone(),
            base: self.base_url(),
            ods: ods.clone(),
            token: self.council_token(ods).await?,
        })
    }

    /// A new enrolment token for `uses` tablets of `trust` in `region`, valid 24 hours.
    pub async fn enrolment_token(
        &self,
        trust: &TrustCode,
        region: &RegionId,
        uses: u32,
    ) -> anyhow::Result<String> {
        Ok(self
            .admin(&[
                "enrolment-token",
                "--trust",
                trust.as_str(),
                "--region",
                region.as_str(),
                "--uses",
                &uses.to_string(),
                "--ttl",
                "24h",
            ])
            .await?
            .trim()
            .to_owned())
    }

    /// Starts `serve` (if not running) and waits for `/healthz`. A restart comes back on the
    /// same port, which an outgoing connection of another process (the fleet scenario runs
    /// thousands) may hold for a moment as its local port: only that is retried, every
    /// 0.5 s for at most 10 s, and each retry counted ([`ServerProcess::port_busy`]).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            match self.start_once().await {
                Err(e)
                    if self.addr.port() != 0
                        && tries < 20
                        && format!("{e:#}").contains("Address already in use") =>
                {
                    tries += 1;
                    self.port_busy += 1;
                    eprintln!(
                        "[server] port {} is taken, retrying: {e:#}",
                        self.addr.port()
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    /// Restarts that waited for the port to be free.
    pub fn port_busy(&self) -> usize {
        self.port_busy
    }

    async fn start_once(&mut self) -> anyhow::Result<()> {
        if self.is_running()? {
            return Ok(());
        }
        self.starts += 1;
        let from = process::file_len(&self.log);
        let mut cmd = Cmd::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.addr.to_string());
        // Every server of a test on its own metrics port (the default is a fixed one).
        if !self.env.iter().any(|(k, _)| k == "CPIS_METRICS_LISTEN") {
            cmd = cmd.env("CPIS_METRICS_LISTEN", "127.0.0.1:0");
        }
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        self.child = Some(cmd.spawn_logged(&self.log)?);
        if self.addr.port() == 0 {
            let log = self.log.clone();
            let line = wait_until(&mut self.child, &self.log, "the listening address", || {
                let found = process::find_after(&log, from, "listening on https://");
                async move { Ok(found) }
            })
            .await?;
            self.addr = line
                .parse()
                .with_context(|| format!("reading the listening address from {line:?}"))?;
        }
        let (http, url) = (self.http.clone(), self.base_url());
        wait_until(&mut self.child, &self.log, "/healthz", || {
            let (http, url) = (http.clone(), url.clone());
            async move { Ok(healthz(&http, &url).await.ok().map(|_| ())) }
        })
        .await?;
        // `serve` prints the line just after it starts answering: under load /healthz can
        // answer first, so wait for the line too.
        let log = self.log.clone();
        let line = wait_until(&mut self.child, &self.log, "where /metrics is", || {
            let found = process::find_after(&log, from, "metrics on http://");
            async move { Ok(found) }
        })
        .await
        .context("the server did not say where /metrics is")?;
        self.metrics = Some(
            line.trim_end_matches("/metrics")
                .parse()
                .with_context(|| format!("reading the metrics address from {line:?}"))?,
        );
        Ok(())
    }

    /// The running server's `/metrics` text (from its own loopback listener).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let addr = self.metrics.context("the server is not running")?;
        let r = http::local_client(REQUEST_TIMEOUT)?
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .context("GET /metrics")?;
        anyhow::ensure!(r.status() == 200, "GET /metrics answered {}", r.status());
        r.text().await.context("reading /metrics")
    }

    /// SIGKILL: no shutdown, no flushing; the data dir is left as the crash left it.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill9().await?;
        }
        Ok(())
    }

    /// SIGKILL (if running), then `serve` again on the same data dir and address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9().await?;
        self.start().await
    }

    /// SIGTERM and wait for a graceful exit.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the server is not running");
        };
        child.signal("TERM").await?;
        child.wait(STOP_TIMEOUT).await
    }

    /// True while the `serve` child runs.
    pub fn is_running(&mut self) -> anyhow::Result<bool> {
        match &mut self.child {
            None => Ok(false),
            Some(c) => Ok(c.try_status()?.is_none()),
        }
    }

    /// One `GET /healthz`; returns how long it took.
    pub async fn healthz(&self) -> anyhow::Result<Duration> {
        healthz(&self.http, &self.base_url()).await
    }

    /// The address it serves on.
    /// The running `serve`'s process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Running::pid)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The TLS CA certificate tablets must trust (`--ca`).
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("tls-ca.pem")
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// An HTTPS client trusting the server's CA.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// How many times `serve` was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The end of the server's log (stdout and stderr of every `serve`).
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail(&self.log, lines)
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// `cpis-sync-server init --data-dir DIR` for `localhost` and `127.0.0.1`, on SQLite in the
/// data dir or, with `database_url`, on that PostgreSQL database.
async fn init(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = Cmd::new(&bins()?.server)
        .arg("init")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--hostname", "localhost", "--hostname", "127.0.0.1"]);
    if let Some(url) = database_url {
        cmd = cmd.args(["--database", url]);
    }
    cmd.run(ADMIN_TIMEOUT).await?;
    Ok(())
}

/// One `GET {base}/healthz`; returns how long it took.
async fn healthz(http: &reqwest::Client, base: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let r = http.get(format!("{base}/healthz")).send().await?;
    if !r.status().is_success() {
        bail!("/healthz answered {}", r.status());
    }
    Ok(started.elapsed())
}

/// Polls `check` until it yields, failing early (with the log) if the child exits.
async fn wait_until<T, F, Fut>(
    child: &mut Option<Running>,
    log: &Path,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if let Some(c) = child
            && let Some(status) = c.try_status()?
        {
            *child = None;
            bail!(
                "the server exited ({status}) before {what}; log {}:\n{}",
                log.display(),
                process::tail(log, 30)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the server did not answer {what} within {START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                process::tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn log_path(data_dir: &Path) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map_or_else(|| "server".into(), |n| n.to_os_string());
    name.push(".serve.log");
    data_dir.with_file_name(name)
}

/// A council's upload client (bearer token).
#[derive(Debug, Clone)]
pub struct CouncilClient {
    http: reqwest::Client,
    base: String,
    ods: CouncilCode,
    token: String,
}

impl CouncilClient {
    pub fn ods(&self) -> &CouncilCode {
        &self.ods
    }

    /// The same council, with the same token, talking to `base` instead (e.g.
    /// `https://127.0.0.1:PORT` of a load balancer in front of several replicas).
    pub fn via(&self, base: &str) -> CouncilClient {
        CouncilClient {
            base: base.to_owned(),
            ..self.clone()
        }
    }

    /// Uploads the council's full list; `Ok` only for a `200` receipt.
    pub async fn upload(&self, flags: &[FlagRecord]) -> anyhow::Result<UploadReceipt> {
        if let Some(other) = flags.iter().find(|f| f.council != self.ods) {
            bail!(
                "a flag of council {} in council {}'s upload",
                other.council,
                self.ods
            );
        }
        let mut url = format!("{}/v1/councils/{}/uploads", self.base, self.ods);
        if flags.is_empty() {
            url.push_str("?allow_empty=true");
        }
        let r = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .header("content-type", "text/csv")
            .body(cpis_fixtures::council_csv_bytes(flags))
            .send()
            .await
            .with_context(|| format!("uploading council {}'s list", self.ods))?;
        let status = r.status();
        let text = r.text().await.context("reading the upload answer")?;
        if !status.is_success() {
            return Err(anyhow!(
                "upload for {} answered {status}: {}",
                self.ods,
                text.chars().take(500).collect::<String>()
            ));
        }
        serde_json::from_str(&text).context("reading the upload receipt")
    }

    /// One page of the council's unacknowledged notifications.
    pub async fn notifications_page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<NotificationPage> {
        let mut url = format!(
            "{}{}?limit={limit}",
            self.base,
            mailbox::notifications_path(self.ods.as_str())
        );
        if let Some(cursor) = after {
            url.push_str("&after=");
            url.push_str(cursor);
        }
        let r = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("listing council {}'s notifications", self.ods))?;
        json(r).await
    }

    /// Every unacknowledged notification, following the cursor to the end.
    pub async fn notifications(&self) -> anyhow::Result<Vec<Notification>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        // Bounded: 1,000 pages of the largest size.
        for _ in 0..1_000 {
            let page = self
                .notifications_page(cursor.as_deref(), mailbox::MAX_LIMIT)
                .await?;
            all.extend(page.notifications);
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(all),
            }
        }
        bail!(
            "council {}'s mailbox did not end within 1,000 pages",
            self.ods
        )
    }

    /// Acknowledges notifications; returns how many left the mailbox now.
    pub async fn ack(&self, ids: &[NotificationId]) -> anyhow::Result<u64> {
        let mut acknowledged = 0;
        for chunk in ids.chunks(mailbox::MAX_LIMIT as usize) {
            let r = self
                .http
                .post(format!(
                    "{}{}",
                    self.base,
                    mailbox::ack_path(self.ods.as_str())
                ))
                .bearer_auth(&self.token)
                .json(&AckRequest {
                    ids: chunk.to_vec(),
                })
                .send()
                .await
                .with_context(|| format!("acknowledging council {}'s notifications", self.ods))?;
            acknowledged += json::<AckResponse>(r).await?.acknowledged;
        }
        Ok(acknowledged)
    }
}

/// A JSON body of a successful answer, or an error quoting the status and body.
async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> anyhow::Result<T> {
    let status = r.status();
    let text = r.text().await.context("reading the answer")?;
    if !status.is_success() {
        bail!(
            "answered {status}: {}",
            text.chars().take(500).collect::<String>()
        );
    }
    serde_json::from_str(&text).with_context(|| format!("reading {text}"))
}

/// The `admin` arguments that add every trust, region (with its neighbour councils) and
/// council of `directory`, in that order.
pub fn directory_commands(directory: &Directory) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for t in &directory.trusts {
        out.push(args(&[
            "trust",
            "add",
            "--ods",
            t.code.as_str(),
            "--name",
            &t.name,
        ]));
    }
    for r in &directory.regions {
        let mut a = args(&["region", "add", "--id", r.id.as_str(), "--name", &r.name]);
        for n in &r.neighbour_councils {
            a.extend(args(&["--neighbour-council", n.as_str()]));
        }
        out.push(a);
    }
    for c in &directory.councils {
        let mut a = args(&[
            "council",
            "add",
            "--ods",
            c.code.as_str(),
            "--name",
            &c.name,
            "--region",
            c.region.as_str(),
            "--emergency-phone",
            &c.emergency_phone,
        ]);
        if let Some(office) = &c.office_phone {
            a.extend(args(&["--office-phone", office.as_str()]));
        }
        out.push(a);
    }
    out
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}
