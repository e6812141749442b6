//! Headless Chromium for the browser tests: installs the tools if missing
//! (`field-tests/browser/install.sh`), starts `chromedriver` on a free loopback port, opens a
//! WebDriver session (fantoccini, plain HTTP to chromedriver) on Debian's `/usr/bin/chromium`
//! with a fresh profile, and gives the flows what they need: pages, keys, screenshots kept as
//! artefacts, viewport emulation (200% zoom, portrait tablet) and an axe-core audit.
//!
//! Every Chromium process started for a session is killed when its [`Browser`] is dropped
//! (found by the session's own `--user-data-dir`), and chromedriver with it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use cpis_field_tests::harness::process::{self, Cmd, Running};
use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tempfile::TempDir;

/// Debian's Chromium and its WebDriver.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Directory for screenshots; default `<cargo target dir>/browser-artefacts`.
pub(crate) const ARTEFACTS_ENV: &str = "CPIS_ARTEFACTS_DIR";
/// How long chromedriver may take to listen and Chromium to open a session.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on loading a page and on a script (axe-core) in the page.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the install script (a fresh machine downloads Chromium: ~100 MB).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
/// Screenshots stop this far down a page (CSS pixels).
const SHOT_MAX_HEIGHT: f64 = 6000.0;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

fn axe_path() -> PathBuf {
    browser_dir().join("node_modules/axe-core/axe.min.js")
}

/// Runs `install.sh` once per test process if Chromium, chromedriver or axe-core is
/// missing; prints how long it took.
pub(crate) async fn ensure_tools() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = LOCK.lock().await;
    if DONE.get().is_none() {
        let missing: Vec<String> = [PathBuf::from(CHROMIUM), CHROMEDRIVER.into(), axe_path()]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let result = if missing.is_empty() {
            eprintln!("[browser] tools present: {CHROMIUM}, {CHROMEDRIVER}, axe-core");
            Ok(())
        } else {
            let script = browser_dir().join("install.sh");
            eprintln!(
                "[browser] missing {}: running {}",
                missing.join(", "),
                script.display()
            );
            let started = Instant::now();
            let out = Cmd::new("sh").arg(&script).output(INSTALL_TIMEOUT).await;
            if let Ok(o) = &out {
                // The script's own lines: what it installed and the versions now present.
                for line in o.stderr.lines().filter(|l| l.starts_with("install.sh:")) {
                    eprintln!("[browser] {line}");
                }
            }
            eprintln!(
                "[browser] install.sh took {:.1} s",
                started.elapsed().as_secs_f64()
            );
            out.and_then(|o| o.ok().map(drop))
                .map_err(|e| format!("{} failed: {e:#}", script.display()))
        };
        let _ = DONE.set(result);
    }
    DONE.get()
        .cloned()
        .unwrap_or_else(|| Err("install state lost".into()))
        .map_err(|e| anyhow!(e))
}

/// Where screenshots go: `$CPIS_ARTEFACTS_DIR`, else `browser-artefacts` in the cargo
/// target dir this test runs from (`<target>/<profile>/deps/browser-…`).
pub(crate) fn artefacts_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(ARTEFACTS_ENV) {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_owned()))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(std::env::temp_dir)
        .join("browser-artefacts")
}

/// A Chromium session driven through its own chromedriver.
#[derive(Debug)]
pub(crate) struct Browser {
    client: Option<Client>,
    /// Killed on drop (field order: after the client).
    driver: Running,
    profile: TempDir,
    log: PathBuf,
    artefacts: PathBuf,
    shots: usize,
    axe: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium (1280x800). Screenshots of the flow go to
    /// `<artefacts root>/<flow>/` (emptied first).
    pub(crate) async fn start(flow: &str, scratch: &Path) -> anyhow::Result<Self> {
        ensure_tools().await?;
        let axe = std::fs::read_to_string(axe_path())
            .with_context(|| format!("reading {}", axe_path().display()))?;
        let artefacts = artefacts_root().join(flow);
        let _ = std::fs::remove_dir_all(&artefacts);
        std::fs::create_dir_all(&artefacts)
            .with_context(|| format!("creating {}", artefacts.display()))?;
        let profile = TempDir::new().context("creating a Chromium profile dir")?;
        let log = scratch.join(format!("chromedriver-{flow}.log"));
        let from = process::file_len(&log);
        let mut driver = Cmd::new(CHROMEDRIVER).arg("--port=0").spawn_logged(&log)?;
        let port: u16 = process::poll(
            "chromedriver to listen",
            START_TIMEOUT,
            Duration::from_millis(25),
            || {
                let found = process::find_after(&log, from, "started successfully on port");
                let exited = driver.try_status().ok().flatten();
                async move {
                    match (found, exited) {
                        (Some(p), _) => Ok(Some(p)),
                        (None, Some(status)) => Err(anyhow!("chromedriver exited ({status})")),
                        (None, None) => Ok(None),
                    }
                }
            },
        )
        .await
        .with_context(|| process::tail(&log, 20))?
        .trim_end_matches('.')
        .parse()
        .context("reading chromedriver's port")?;

        let mut caps = Capabilities::new();
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    "--window-size=1280,800",
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            START_TIMEOUT,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .map_err(|_| anyhow!("no Chromium session within {START_TIMEOUT:?}"))?
        .with_context(|| format!("opening a Chromium session\n{}", process::tail(&log, 20)))?;
        let browser = Self {
            client: Some(client),
            driver,
            profile,
            log,
            artefacts,
            shots: 0,
            axe,
        };
        browser
            .client()?
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                Some(PAGE_TIMEOUT),
                Some(PAGE_TIMEOUT),
                Some(Duration::ZERO),
            ))
            .await?;
        Ok(browser)
    }

    pub(crate) fn client(&self) -> anyhow::Result<&Client> {
        self.client
            .as_ref()
            .ok_or_else(|| anyhow!("session closed"))
    }

    /// Ends the session (Chromium quits) and chromedriver.
    pub(crate) async fn close(mut self) -> anyhow::Result<()> {
        if let Some(c) = self.client.take() {
            c.close().await.context("closing the Chromium session")?;
        }
        self.driver.kill9().await?;
        Ok(())
    }

    pub(crate) async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client()?
            .goto(url)
            .await
            .with_context(|| format!("loading {url}"))
    }

    /// The first element matching a CSS selector (an error naming it if none).
    pub(crate) async fn find(&self, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
        let url = self.url().await.unwrap_or_default();
        self.client()?
            .find(Locator::Css(css))
            .await
            .with_context(|| format!("no element `{css}` on {url}"))
    }

    /// Every element matching a CSS selector.
    pub(crate) async fn find_all(
        &self,
        css: &str,
    ) -> anyhow::Result<Vec<fantoccini::elements::Element>> {
        Ok(self.client()?.find_all(Locator::Css(css)).await?)
    }

    /// Whether an element matching the selector exists.
    pub(crate) async fn exists(&self, css: &str) -> anyhow::Result<bool> {
        Ok(!self.find_all(css).await?.is_empty())
    }

    /// The visible text of the first element matching the selector.
    pub(crate) async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self.find(css).await?.text().await?)
    }

    /// An attribute of the first element matching the selector.
    pub(crate) async fn attr(&self, css: &str, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self.find(css).await?.attr(name).await?)
    }

    pub(crate) async fn url(&self) -> anyhow::Result<String> {
        Ok(self.client()?.current_url().await?.to_string())
    }

    /// Runs JavaScript in the page; returns its result.
    pub(crate) async fn js(&self, script: &str) -> anyhow::Result<Value> {
        Ok(self.client()?.execute(script, vec![]).await?)
    }

    /// The HTTP status the current page was served with (Navigation Timing).
    pub(crate) async fn status(&self) -> anyhow::Result<u64> {
        self.js("return performance.getEntriesByType('navigation')[0].responseStatus;")
            .await?
            .as_u64()
            .ok_or_else(|| anyhow!("the page's response status is unknown"))
    }

    /// Presses keys on whatever has focus, as a keyboard does (WebDriver actions).
    pub(crate) async fn press(&self, keys: &[Key]) -> anyhow::Result<()> {
        let mut seq = KeyActions::new("keyboard".into());
        for k in keys {
            let c = char::from(*k);
            seq = seq
                .then(KeyAction::Down { value: c })
                .then(KeyAction::Up { value: c });
        }
        self.client()?.perform_actions(seq).await?;
        Ok(())
    }

    /// Types text on whatever has focus, key by key.
    pub(crate) async fn type_text(&self, text: &str) -> anyhow::Result<()> {
        let mut seq = KeyActions::new("keyboard".into());
        for c in text.chars() {
            seq = seq
                .then(KeyAction::Down { value: c })
                .then(KeyAction::Up { value: c });
        }
        self.client()?.perform_actions(seq).await?;
        Ok(())
    }

    /// The `id` of the element that has focus (empty if none has one).
    pub(crate) async fn focused_id(&self) -> anyhow::Result<String> {
        Ok(self
            .js("return document.activeElement ? document.activeElement.id : '';")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Takes focus away from every element (as if the page had just been opened without
    /// autofocus), so that Tab starts from the top of the document.
    pub(crate) async fn blur(&self) -> anyhow::Result<()> {
        self.js("if (document.activeElement) document.activeElement.blur(); window.getSelection().removeAllRanges();")
            .await?;
        Ok(())
    }

    /// Presses Tab until the element with `id` has focus (at most `max` presses); returns
    /// how many presses it took.
    pub(crate) async fn tab_to(&self, id: &str, max: usize) -> anyhow::Result<usize> {
        for n in 0..=max {
            if self.focused_id().await? == id {
                return Ok(n);
            }
            self.press(&[Key::Tab]).await?;
        }
        bail!("#{id} did not get focus after {max} presses of Tab")
    }

    /// The text of the page's `role="alert"` elements (empty if none).
    pub(crate) async fn alert(&self) -> anyhow::Result<String> {
        let mut out = Vec::new();
        for e in self.find_all("[role=alert]").await? {
            out.push(e.text().await?.trim().to_owned());
        }
        Ok(out.join(" / "))
    }

    /// Marks the current document, so that [`Self::wait_new_page`] can tell when the next
    /// one has replaced it.
    pub(crate) async fn mark_page(&self) -> anyhow::Result<()> {
        self.js("document.documentElement.setAttribute('data-test-old', '1');")
            .await?;
        Ok(())
    }

    /// Waits until a document other than the marked one has loaded.
    pub(crate) async fn wait_new_page(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        while Instant::now() < deadline {
            let done = self
                .js("return document.readyState === 'complete' && \
                     !document.documentElement.hasAttribute('data-test-old');")
                .await
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if done {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "no new page within {PAGE_TIMEOUT:?} (still {})",
            self.url().await.unwrap_or_default()
        )
    }

    /// Does `action` (a click or key press that navigates) and waits for the new page.
    pub(crate) async fn navigating<F, Fut>(&self, action: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        self.mark_page().await?;
        action().await?;
        self.wait_new_page().await
    }

    /// Clicks the first element matching the selector and waits for the page it leads to.
    pub(crate) async fn click_to_page(&self, css: &str) -> anyhow::Result<()> {
        let el = self.find(css).await?;
        self.navigating(|| async move { Ok(el.click().await?) })
            .await
            .with_context(|| format!("after clicking `{css}`"))
    }

    /// The whole visible text of the page.
    pub(crate) async fn page_text(&self) -> anyhow::Result<String> {
        self.text("body").await
    }

    /// Saves a PNG of the whole page (beyond the viewport, up to [`SHOT_MAX_HEIGHT`] CSS
    /// pixels) as `<artefacts>/<NN>-<name>.png`; prints its path.
    pub(crate) async fn screenshot(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        // The whole width of the window: capturing beyond the viewport lays the page out
        // without its vertical scroll bar, so the content is as wide as the window.
        let metrics = self.cdp("Page.getLayoutMetrics", json!({})).await?;
        let inner = self.js("return window.innerWidth;").await?.as_f64();
        let (w, h) = (
            inner.unwrap_or(1280.0),
            metrics["cssContentSize"]["height"]
                .as_f64()
                .unwrap_or(800.0),
        );
        let shot = self
            .cdp(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": w, "height": h.min(SHOT_MAX_HEIGHT), "scale": 1 },
                }),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .context("decoding the screenshot")?;
        self.shots += 1;
        let path = self.artefacts.join(format!("{:02}-{name}.png", self.shots));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[browser] screenshot {}", path.display());
        Ok(path)
    }

    /// Emulates a viewport of `width`x`height` CSS pixels at `scale` device pixels each
    /// (1280x800 at 200% zoom is 640x400 at scale 2), through the DevTools protocol.
    pub(crate) async fn emulate(&self, width: u32, height: u32, scale: f64) -> anyhow::Result<()> {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": scale, "mobile": false }),
        )
        .await
        .map(drop)
    }

    /// Back to the window's own 1280x800 viewport.
    pub(crate) async fn reset_emulation(&self) -> anyhow::Result<()> {
        self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
            .await
            .map(drop)
    }

    /// A DevTools protocol command; returns its result.
    async fn cdp(&self, cmd: &str, params: Value) -> anyhow::Result<Value> {
        self.client()?
            .issue_cmd(Cdp {
                cmd: cmd.to_owned(),
                params,
            })
            .await
            .with_context(|| format!("DevTools command {cmd}"))
    }

    /// `(scrollWidth, clientWidth)` of the document: a horizontal scroll bar when the first
    /// exceeds the second.
    pub(crate) async fn widths(&self) -> anyhow::Result<(u64, u64)> {
        let v = self
            .js("const e = document.documentElement; return [e.scrollWidth, e.clientWidth];")
            .await?;
        match (v[0].as_u64(), v[1].as_u64()) {
            (Some(s), Some(c)) => Ok((s, c)),
            _ => bail!("unexpected widths {v}"),
        }
    }

    /// The page at 200% zoom (1280x800 seen at 200%: 640x400 CSS pixels at scale 2), on an
    /// 800x1280 portrait tablet and back at 1280x800: the document's widths in each, with a
    /// screenshot of the first two (`<state>-200pc`, `<state>-portrait`).
    pub(crate) async fn layouts(&mut self, state: &str) -> anyhow::Result<Vec<Layout>> {
        let mut out = Vec::new();
        for (label, w, h, scale) in [("200pc", 640, 400, 2.0), ("portrait", 800, 1280, 1.0)] {
            self.emulate(w, h, scale).await?;
            let (scroll_width, client_width) = self.widths().await?;
            let screenshot = self.screenshot(&format!("{state}-{label}")).await?;
            out.push(Layout {
                label,
                scroll_width,
                client_width,
                screenshot,
            });
        }
        self.reset_emulation().await?;
        let (scroll_width, client_width) = self.widths().await?;
        out.push(Layout {
            label: "1280x800",
            scroll_width,
            client_width,
            screenshot: PathBuf::new(),
        });
        Ok(out)
    }

    /// Runs axe-core on the page; fails listing every violation in full if there is any.
    pub(crate) async fn audit(&self, state: &str) -> anyhow::Result<()> {
        let client = self.client()?;
        client
            .execute(&self.axe, vec![])
            .await
            .context("injecting axe-core")?;
        let violations = client
            .execute_async(
                "const done = arguments[arguments.length - 1];\
                 axe.run(document, { resultTypes: ['violations'] })\
                   .then(r => done(r.violations), e => done({ error: String(e) }));",
                vec![],
            )
            .await
            .context("running axe-core")?;
        if let Some(e) = violations.get("error") {
            bail!("axe-core failed on {state}: {e}");
        }
        let list = violations.as_array().cloned().unwrap_or_default();
        if !list.is_empty() {
            bail!(
                "axe-core: {} violation(s) on {state} ({}):\n{}",
                list.len(),
                self.url().await.unwrap_or_default(),
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
        }
        eprintln!("[browser] axe-core: no violations on {state}");
        Ok(())
    }

    /// After a failure: a screenshot and the page's address and text, printed.
    pub(crate) async fn dump_failure(&mut self) {
        let url = self.url().await.unwrap_or_default();
        let text = self.page_text().await.unwrap_or_default();
        let shot = self.screenshot("failure").await;
        eprintln!(
            "[browser] failed on {url} (screenshot {shot:?}); page text:\n{text}\n\
             chromedriver log:\n{}",
            self.log_tail()
        );
    }

    /// The end of chromedriver's log (for failures).
    pub(crate) fn log_tail(&self) -> String {
        process::tail(&self.log, 20)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's processes carry this session's own profile dir on their command line.
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == marker.as_bytes())
            {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

/// The document's widths in one viewport: a horizontal scroll bar when `scroll_width`
/// exceeds `client_width`.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) label: &'static str,
    pub(crate) scroll_width: u64,
    pub(crate) client_width: u64,
    pub(crate) screenshot: PathBuf,
}

/// A DevTools protocol command through chromedriver (`POST /session/{id}/goog/cdp/execute`).
#[derive(Debug)]
struct Cdp {
    cmd: String,
    params: Value,
}

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "cmd": self.cmd, "params": self.params }).to_string()),
        )
    }
}
