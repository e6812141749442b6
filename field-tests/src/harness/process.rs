//! Child processes with bounds: a command run to completion within a timeout (killed if it
//! overruns), long-running children logging to a file and killed when dropped, signals, and
//! bounded polling of a condition.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tokio::process::{Child, Command};

/// A command line, printable in error messages.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs to completion, capturing output; a run longer than `timeout` is killed and is an
    /// error.
    pub async fn output(&self, timeout: Duration) -> anyhow::Result<Output> {
        let child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {self}"))?;
        // Dropping the future on timeout drops the child, which kills it (kill_on_drop).
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("{self} did not finish within {timeout:?} (killed)"))?
            .with_context(|| format!("waiting for {self}"))?;
        Ok(Output {
            command: self.to_string(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs to completion and requires success; returns stdout.
    pub async fn run(&self, timeout: Duration) -> anyhow::Result<String> {
        self.output(timeout).await?.ok()
    }

    /// Starts in the background with stdout and stderr appended to `log`. The child is
    /// killed (SIGKILL) when the returned value is dropped.
    pub fn spawn_logged(&self, log: &Path) -> anyhow::Result<Running> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = file
            .try_clone()
            .context("duplicating the log file handle")?;
        let child = self
            .command()
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {self}"))?;
        Ok(Running {
            child,
            what: self.to_string(),
        })
    }

    /// Starts in the background with output discarded; killed when dropped.
    pub fn spawn_quiet(&self) -> anyhow::Result<Running> {
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {self}"))?;
        Ok(Running {
            child,
            what: self.to_string(),
        })
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.program.file_name().map_or_else(
            || self.program.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        write!(f, "`{name}")?;
        for a in &self.args {
            let a = a.to_string_lossy();
            // Secrets (tokens) are not printed.
            if a.starts_with("cpis_") {
                write!(f, " <token>")?;
            } else {
                write!(f, " {a}")?;
            }
        }
        write!(f, "`")
    }
}

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout if the command succeeded, else an error with its exit status and stderr.
    pub fn ok(self) -> anyhow::Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(anyhow!(
                "{} failed ({}): {}",
                self.command,
                self.status,
                self.stderr.trim()
            ))
        }
    }
}

/// A background child, killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Running {
    child: Child,
    what: String,
}

impl Running {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.what))
    }

    /// SIGKILL, then reap. Returns `true` if it was still running when killed.
    pub async fn kill9(&mut self) -> anyhow::Result<bool> {
        if self.try_status()?.is_some() {
            return Ok(false);
        }
        // Fails only if it exited in the meantime.
        let _ = self.child.start_kill();
        self.wait(Duration::from_secs(10)).await?;
        Ok(true)
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) with the system's `kill` command.
    pub async fn signal(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.what);
        };
        Cmd::new("kill")
            .args(["-s", name, &pid.to_string()])
            .run(Duration::from_secs(10))
            .await
            .with_context(|| format!("sending SIG{name} to {}", self.what))?;
        Ok(())
    }

    /// Waits for it to exit, at most `timeout` (then it is killed and that is an error).
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for {}", self.what)),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                bail!("{} did not exit within {timeout:?} (killed)", self.what)
            }
        }
    }

    pub fn describe(&self) -> &str {
        &self.what
    }
}

/// Polls `check` every `every` until it returns `Some`, for at most `timeout`.
pub async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The last `lines` lines of a log file (for failure messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The length of a file now (0 if it does not exist), to read only what comes after.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The first line after byte `from` of `path` containing `marker`, and what follows the
/// marker on that line.
pub fn find_after(path: &Path, from: u64, marker: &str) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let start = usize::try_from(from).ok()?.min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim().to_owned()))
}
