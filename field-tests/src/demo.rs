//! The end-to-end demo behind `cpis-demo`: one command that starts a real `cpis-sync-server`
//! on loopback, uploads a region of synthetic flags from `cpis-fixtures`, enrols a tablet
//! (`cpis-agent`) through the fault proxy, syncs, cuts the network, looks numbers up through
//! the agent's local API, restores the network and shows the notices arriving in the
//! council's mailbox, printing each step with its figures. Afterwards it can stay up (the
//! binary waits for Ctrl-C or SIGTERM) so the user can try the local API by hand.
//!
//! Every child process is held in a [`Running`], which kills it when dropped: an error or a
//! panic anywhere leaves nothing behind.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, Utc};
use cpis_fixtures::{Config, Dataset};
use cpis_protocol::api::UploadReceipt;
use cpis_protocol::local::{LookupRequest, LookupResponse, StatusResponse, SyncResponse};
use cpis_protocol::mailbox::{self, Notification, NotificationPage};
use cpis_protocol::{CouncilCode, FlagRecord, LookupResult, NhsNumber, RegionId, TrustCode};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::harness::process::{self, Cmd, Running};
use crate::harness::{self, ADMIN_TIMEOUT, Bins, Tablet};
use crate::proxy::{Faults, Proxy, ProxyHandle};

/// How long `serve` and `run` may take to listen and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on each HTTP request the demo makes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the events may take to reach the server once the network is back.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// After this long without the background loop delivering, the demo asks for a sync.
const NUDGE_AFTER: Duration = Duration::from_secs(20);

/// What the demo is asked to do (the binary's command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// Where everything goes; `None`: a new directory under the system's temp dir.
    pub dir: Option<PathBuf>,
    /// Flags in the region.
    pub flags: usize,
    /// Seed of the synthetic data and of the numbers looked up.
    pub seed: u64,
    /// Loopback port of the sync server (0: a free one).
    pub server_port: u16,
    /// Loopback port of the agent's local API (0: a free one).
    pub agent_port: u16,
    /// Run the server as two replicas on a throw-away PostgreSQL cluster behind HAProxy
    /// instead of one server on SQLite.
    pub postgres: bool,
}

/// The demo after its walkthrough: the processes still running, to be stopped with
/// [`Demo::stop`] (or killed by dropping it).
#[derive(Debug)]
pub struct Demo {
    dir: PathBuf,
    server: Running,
    agent: Running,
    proxy: ProxyHandle,
    steps: Steps,
    /// With `--postgres`: the second replica, HAProxy and the cluster.
    replicas: Option<Replicas>,
}

/// The parts `--postgres` adds: a throw-away PostgreSQL cluster, a second replica serving a
/// copy of the data dir, and HAProxy in front of both. Dropping it stops HAProxy and removes
/// the cluster (the replica is killed with its handle).
#[derive(Debug)]
struct Replicas {
    second: Option<Running>,
    cluster_dir: PathBuf,
    haproxy_dir: PathBuf,
    stopped: bool,
}

/// A script of the repository's `scripts/` directory.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// Runs a script of `scripts/` and returns its stdout's last line.
async fn run_script(name: &str, args: &[&Path]) -> anyhow::Result<String> {
    let mut cmd = Cmd::new("bash").arg(script(name));
    for a in args {
        cmd = cmd.arg(a);
    }
    let out = cmd.run(START_TIMEOUT * 10).await?;
    Ok(out.lines().last().unwrap_or_default().trim().to_owned())
}

impl Replicas {
    /// Stops HAProxy, the second replica and the cluster; says how the replica stopped.
    async fn stop(&mut self) -> Option<Stopped> {
        let second = match self.second.as_mut() {
            Some(child) => Some(stop_child(child).await),
            None => None,
        };
        self.shutdown();
        second
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = std::process::Command::new("bash")
            .arg(script("haproxy-stop.sh"))
            .arg(&self.haproxy_dir)
            .output();
        let _ = std::process::Command::new("bash")
            .arg(script("postgres-stop.sh"))
            .arg(&self.cluster_dir)
            .arg("--remove")
            .output();
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Numbered steps printed on stdout, with the time since the start.
#[derive(Debug)]
struct Steps {
    n: u32,
    started: Instant,
}

impl Steps {
    fn new() -> Self {
        Self {
            n: 0,
            started: Instant::now(),
        }
    }

    /// Prints the next numbered step.
    fn step(&mut self, text: impl AsRef<str>) {
        self.n += 1;
        println!(
            "{:>2}. [{:>5.1} s] {}",
            self.n,
            self.started.elapsed().as_secs_f64(),
            text.as_ref()
        );
    }

    /// Prints a detail line under the current step.
    fn detail(&self, text: impl AsRef<str>) {
        println!("              {}", text.as_ref());
    }
}

/// Runs the walkthrough; returns with the server, proxy and agent still up.
pub async fn run(opts: &Options) -> anyhow::Result<Demo> {
    let mut steps = Steps::new();
    // Ports first, so that a port in use is reported before any work.
    check_port_free(opts.server_port, "--server-port")?;
    check_port_free(opts.agent_port, "--agent-port")?;
    let dir = prepare_dir(opts.dir.as_deref())?;
    println!(
        "CP-IS Edge demo: everything on 127.0.0.1, files in {}",
        dir.display()
    );
    println!();

    // 1. Binaries.
    let profile = build_profile();
    if let Some(profile) = &profile {
        println!(
            "    Checking the cpis-sync-server and cpis-agent binaries (cargo build --locked, \
             {profile}; the first run builds them, which takes a few minutes)..."
        );
    }
    let t = Instant::now();
    let bins = locate_bins()?;
    steps.step(format!(
        "Binaries ready in {} ({}): cpis-sync-server and cpis-agent in {}",
        secs(t.elapsed()),
        profile.unwrap_or_else(|| "found".to_owned()),
        bins.server
            .parent()
            .map_or_else(|| "?".into(), |p| p.display().to_string()),
    ));

    // 2. Fixtures.
    let t = Instant::now();
    let today = Utc::now().date_naive();
    let config = Config::new(opts.seed, today)
        .with_regions(2)
        .with_councils(8);
    let directory = cpis_fixtures::Directory::generate(&config)
        .context("generating the directory of trusts, regions and councils")?;
    let region = directory
        .regions
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the fixtures have no region"))?;
    let dataset = Dataset::generate_region(&config, &region.id, opts.flags)
        .context("generating the region's flags")?;
    let fixtures_dir = dir.join("fixtures");
    let written = dataset
        .write_dir(&fixtures_dir)
        .with_context(|| format!("writing the fixtures to {}", fixtures_dir.display()))?;
    let stats = dataset.stats();
    steps.step(format!(
        "Synthetic flags for region {} ({}) as of {today}: {} flags ({} CPP, {} LAC, {} UCPP, {} ended) in {}; {} CSV files, {} in {}",
        region.id,
        region.name,
        count(stats.flags as u64),
        count(stats.cpp as u64),
        count(stats.lac as u64),
        count(stats.ucpp as u64),
        count(stats.ended as u64),
        secs(t.elapsed()),
        written.files,
        bytes(written.bytes),
        fixtures_dir.display(),
    ));
    let neighbours: Vec<String> = region
        .neighbour_councils
        .iter()
        .map(|c| council_label(&directory, c))
        .collect();
    steps.detail(format!(
        "councils of the region: {}; neighbours carried: {}; seed {}",
        region
            .councils
            .iter()
            .map(|c| council_label(&directory, c))
            .collect::<Vec<_>>()
            .join(", "),
        if neighbours.is_empty() {
            "none".to_owned()
        } else {
            neighbours.join(", ")
        },
        opts.seed,
    ));

    // 3. init (with --postgres: on a throw-away PostgreSQL cluster).
    let data_dir = dir.join("server");
    let t = Instant::now();
    let cluster_dir = dir.join("postgres");
    // Stops HAProxy and removes the cluster however the demo ends (see `Replicas`).
    let mut replicas = opts.postgres.then(|| Replicas {
        second: None,
        cluster_dir: cluster_dir.clone(),
        haproxy_dir: dir.join("haproxy"),
        stopped: false,
    });
    let database = if opts.postgres {
        let url = run_script("postgres-start.sh", &[&cluster_dir])
            .await
            .context("starting a throw-away PostgreSQL cluster (scripts/postgres-start.sh)")?;
        steps.step(format!(
            "PostgreSQL cluster started in {}: {url} (scripts/postgres-start.sh; removed when the demo stops)",
            secs(t.elapsed())
        ));
        Some(url)
    } else {
        None
    };
    let t = Instant::now();
    let mut init = Cmd::new(&bins.server)
        .arg("init")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--hostname", "localhost", "--hostname", "127.0.0.1"]);
    if let Some(url) = &database {
        init = init.args(["--database", url.as_str()]);
    }
    init.run(ADMIN_TIMEOUT).await?;
    steps.step(format!(
        "Server data dir initialised in {}: {} ({}, feed signing key, TLS CA and certificate, device CA)",
        secs(t.elapsed()),
        data_dir.display(),
        if database.is_some() {
            "the schema in that PostgreSQL database"
        } else {
            "SQLite"
        }
    ));

    // 4. The directory and council tokens.
    let admin = Admin {
        bin: bins.server.clone(),
        data_dir: data_dir.clone(),
    };
    let t = Instant::now();
    let commands = admin.add_directory(&directory).await?;
    let carried: Vec<CouncilCode> = region
        .councils
        .iter()
        .chain(&region.neighbour_councils)
        .cloned()
        .collect();
    let tokens_dir = dir.join("tokens");
    std::fs::create_dir_all(&tokens_dir)
        .with_context(|| format!("creating {}", tokens_dir.display()))?;
    let mut councils = Vec::new();
    for code in &carried {
        let token = admin
            .run(&["council", "token", "--ods", code.as_str()])
            .await?
            .trim()
            .to_owned();
        let path = tokens_dir.join(format!("{code}.token"));
        std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
        councils.push(CouncilAuth {
            code: code.clone(),
            token,
            token_path: path,
        });
    }
    steps.step(format!(
        "Directory added with {} admin commands in {}: {} trusts, {} regions, {} councils; {} council upload tokens in {}",
        commands,
        secs(t.elapsed()),
        directory.trusts.len(),
        directory.regions.len(),
        directory.councils.len(),
        councils.len(),
        tokens_dir.display(),
    ));

    // 5. serve.
    let t = Instant::now();
    let ca_path = data_dir.join("tls-ca.pem");
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading {}", ca_path.display()))?;
    let https = harness::https_client(&ca_pem, None, REQUEST_TIMEOUT)?;
    let server_log = dir.join("server.log");
    let (server, mut server_addr) =
        start_server(bins, &data_dir, opts.server_port, &server_log, &https).await?;
    let mut base = format!("https://127.0.0.1:{}", server_addr.port());
    steps.step(format!(
        "Server serving on {base} in {} (/healthz answered over TLS); log {}",
        secs(t.elapsed()),
        server_log.display()
    ));
    if let Some(parts) = replicas.as_mut() {
        // A second replica on its own copy of the data dir, and HAProxy in front of both:
        // from here on every client talks to HAProxy.
        let t = Instant::now();
        let second_dir = dir.join("server-2");
        Cmd::new("cp")
            .arg("-a")
            .arg(&data_dir)
            .arg(&second_dir)
            .run(ADMIN_TIMEOUT)
            .await?;
        let second_log = dir.join("server-2.log");
        let (second, second_addr) = start_server(bins, &second_dir, 0, &second_log, &https).await?;
        parts.second = Some(second);
        let haproxy_dir = parts.haproxy_dir.clone();
        let first = PathBuf::from(server_addr.to_string());
        let other = PathBuf::from(second_addr.to_string());
        let frontend = run_script("haproxy-start.sh", &[&haproxy_dir, &first, &other])
            .await
            .context("starting HAProxy (scripts/haproxy-start.sh)")?;
        server_addr = frontend
            .parse()
            .with_context(|| format!("haproxy-start.sh printed {frontend:?}, not an address"))?;
        base = format!("https://127.0.0.1:{}", server_addr.port());
        wait_healthy(&https, &base).await?;
        steps.step(format!(
            "Second replica on https://{second_addr} (a copy of the data dir, log {}), and HAProxy on {base} in front of both (TCP, TLS passed through) in {}; everything below goes through HAProxy",
            second_log.display(),
            secs(t.elapsed())
        ));
    }

    // 6. Uploads.
    let t = Instant::now();
    let mut sent = 0u64;
    let mut head = 0u64;
    steps.step("Councils upload their full lists over HTTPS (bearer token, text/csv):");
    for c in &councils {
        let empty = Vec::new();
        let list = dataset.flags_by_council.get(&c.code).unwrap_or(&empty);
        let tu = Instant::now();
        let (receipt, body_len) = upload(&https, &base, c, list).await?;
        sent += body_len;
        head = head.max(receipt.version);
        steps.detail(format!(
            "{}: {} rows, {} added -> version {}, {}, {} sent",
            council_label(&directory, &c.code),
            count(receipt.counts.rows),
            count(receipt.counts.added),
            count(receipt.version),
            secs(tu.elapsed()),
            bytes(body_len),
        ));
    }
    steps.detail(format!(
        "{} uploads, {} of CSV, in {}; the region is at version {}",
        councils.len(),
        bytes(sent),
        secs(t.elapsed()),
        count(head)
    ));

    // 7. Enrolment token.
    let t = Instant::now();
    let enrolment_token = enrolment_token(&admin, &region.trust, &region.id).await?;
    // And trust IT's sign-in for the fleet page.
    let fleet_token = admin
        .run(&["trust", "token", "--trust", region.trust.as_str()])
        .await?
        .trim()
        .to_owned();
    let fleet_token_path = tokens_dir.join(format!("{}.fleet.token", region.trust));
    std::fs::write(&fleet_token_path, &fleet_token)
        .with_context(|| format!("writing {}", fleet_token_path.display()))?;
    steps.step(format!(
        "Enrolment token for one tablet of trust {} in region {} (valid 24 h), and the trust's fleet-page token in {}, in {}",
        region.trust,
        region.id,
        fleet_token_path.display(),
        secs(t.elapsed())
    ));

    // 8. Proxy.
    let proxy = Proxy::start_seeded(server_addr, Faults::none(), opts.seed)
        .await
        .context("starting the fault proxy")?;
    let proxy_url = format!("https://127.0.0.1:{}", proxy.local_addr().port());
    steps.step(format!(
        "Fault proxy on {} -> {base} (the tablet's network; a clean link for now)",
        proxy.local_addr()
    ));

    // 9. Enrol.
    let state_dir = dir.join("tablet");
    let t = Instant::now();
    let before = proxy.stats();
    let tablet = Tablet::enrol(&state_dir, &proxy_url, &ca_path, &enrolment_token)
        .await
        .context("enrolling the tablet")?;
    let after = proxy.stats();
    let status = tablet.status().await?;
    steps.step(format!(
        "Tablet enrolled through the proxy in {}: device {}, {} down / {} up; state dir {}; \
         master key in a file ({}: a real tablet enrols with --keystore tpm2)",
        secs(t.elapsed()),
        status.device,
        bytes(after.bytes_down - before.bytes_down),
        bytes(after.bytes_up - before.bytes_up),
        state_dir.display(),
        status.key_protection
    ));

    // 10. Sync.
    let t = Instant::now();
    let before = proxy.stats();
    let synced: SyncResponse = tablet.sync().await.context("the tablet's first sync")?;
    let after = proxy.stats();
    let status = tablet.status().await?;
    steps.step(format!(
        "First sync ({}) in {}: version {}, {} subjects from {} councils, {} down through the proxy ({} up)",
        synced.action,
        secs(t.elapsed()),
        synced.version.map_or_else(|| "none".into(), count),
        count(status.subjects),
        status.councils.len(),
        bytes(after.bytes_down - before.bytes_down),
        bytes(after.bytes_up - before.bytes_up),
    ));

    // 11. run.
    let t = Instant::now();
    let run_started = Utc::now();
    let agent_log = dir.join("agent.log");
    let (agent, agent_addr) = start_agent(bins, &state_dir, opts.agent_port, &agent_log).await?;
    let local = LocalApi {
        http: harness::local_client(REQUEST_TIMEOUT)?,
        base: format!("http://{agent_addr}"),
    };
    // The loop syncs once at start: let it finish before cutting the network.
    let first_loop_sync = wait_for(Duration::from_secs(30), || async {
        let s = local.status().await?;
        Ok(s.last_sync_success
            .filter(|at| *at >= run_started)
            .map(|_| ()))
    })
    .await
    .is_ok();
    steps.step(format!(
        "Agent running (cpis-agent run) with its local API on {} in {}; {}; log {}",
        local.base,
        secs(t.elapsed()),
        if first_loop_sync {
            "its background loop synced through the proxy"
        } else {
            "its background loop has not synced yet"
        },
        agent_log.display()
    ));

    // 12. Cut.
    proxy
        .set_faults(Faults {
            refuse: true,
            blackhole: true,
            ..Faults::none()
        })
        .await
        .context("cutting the network")?;
    let cut_at = Instant::now();
    steps.step(
        "Network CUT: the proxy refuses new connections and open ones carry nothing either way",
    );

    // 13–15. Lookups.
    let (flagged_nhs, not_flagged_nhs, invalid) = pick_numbers(&dataset, &region.id, opts.seed)?;
    let t = Instant::now();
    let (flagged, n) = local.lookup(&flagged_nhs.spaced()).await?;
    let flagged = flagged.map_err(|e| anyhow!("looking up {flagged_nhs}: {e}"))?;
    steps.step(format!(
        "Lookup {} (POST /v1/lookups) in {}, {} answer: {}",
        flagged_nhs.spaced(),
        ms(t.elapsed()),
        bytes(n),
        answer_word(flagged.result)
    ));
    print_answer(&steps, &flagged);
    if flagged.result != LookupResult::Flagged {
        bail!(
            "{} is in the uploaded lists but the agent answered {}",
            flagged_nhs,
            answer_word(flagged.result)
        );
    }

    let t = Instant::now();
    let (clear, n) = local.lookup(&not_flagged_nhs.to_string()).await?;
    let clear = clear.map_err(|e| anyhow!("looking up {not_flagged_nhs}: {e}"))?;
    steps.step(format!(
        "Lookup {} in {}, {} answer: {}",
        not_flagged_nhs,
        ms(t.elapsed()),
        bytes(n),
        answer_word(clear.result)
    ));
    print_answer(&steps, &clear);

    let t = Instant::now();
    let (bad, n) = local.lookup(&invalid).await?;
    match bad {
        Ok(r) => bail!(
            "the invalid number {invalid} was answered {}",
            answer_word(r.result)
        ),
        Err(e) => {
            steps.step(format!(
                "Lookup {invalid} (a typo in the last digit) in {}, {} answer: {e}; nothing recorded",
                ms(t.elapsed()),
                bytes(n),
            ));
        }
    }

    // The same child through the national CP-IS FHIR R4 interface, as an ePR asks it.
    let t = Instant::now();
    let (bundle, n) = local.fhir_care_team(&flagged_nhs.to_string()).await?;
    let teams: Vec<String> = bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["resource"]["resourceType"] == "CareTeam")
                .map(|e| {
                    let r = &e["resource"];
                    format!(
                        "CareTeam {} ({}) from {}, {}",
                        r["category"][0]["coding"][0]["code"]
                            .as_str()
                            .unwrap_or("?"),
                        r["status"].as_str().unwrap_or("?"),
                        r["period"]["start"].as_str().unwrap_or("?"),
                        r["managingOrganization"][0]["display"]
                            .as_str()
                            .unwrap_or("?"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    steps.step(format!(
        "FHIR: GET /cpis/FHIR/R4/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{} \
         (IsUnscheduledAccessEvent: false, so recorded without a council notice) in {}, {}: \
         Bundle searchset, total {}",
        flagged_nhs,
        ms(t.elapsed()),
        bytes(n),
        bundle["total"]
    ));
    for team in &teams {
        steps.detail(team.clone());
    }
    if teams.is_empty() {
        bail!("the FHIR CareTeam search found no CareTeam for {flagged_nhs}");
    }

    // 16. The outbox holds the events while the network is down.
    let failures_before = local.status().await?.consecutive_failures;
    let status = wait_for(Duration::from_secs(8), || async {
        let s = local.status().await?;
        Ok((s.consecutive_failures > failures_before).then_some(s))
    })
    .await;
    let status = match status {
        Ok(s) => s,
        Err(_) => local.status().await?,
    };
    steps.step(format!(
        "Status (GET /v1/status) while cut: outbox {} events pending; data {} ({})",
        status.outbox_pending,
        status.freshness.as_str(),
        age(status.data_age_secs),
    ));
    steps.detail(background_line(&status));
    if status.outbox_pending == 0 {
        bail!("the outbox is empty while the network is cut");
    }

    // 17. Restore.
    proxy
        .set_faults(Faults::none())
        .await
        .context("restoring the network")?;
    let restored = Instant::now();
    steps.step(format!("Network RESTORED after {}", secs(cut_at.elapsed())));

    // 18. Delivery.
    let before = proxy.stats();
    let mut nudged = false;
    let delivered = loop {
        let s = local.status().await?;
        if s.outbox_pending == 0 {
            break s;
        }
        if restored.elapsed() >= DELIVERY_TIMEOUT {
            bail!(
                "the agent still holds {} events {} after the network came back; last error: {}",
                s.outbox_pending,
                secs(DELIVERY_TIMEOUT),
                s.last_sync_error.as_deref().unwrap_or("none")
            );
        }
        if !nudged && restored.elapsed() >= NUDGE_AFTER {
            nudged = true;
            // Ask for a sync now; its outcome shows in the status polled above.
            let _ = local.sync().await;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = proxy.stats();
    steps.step(format!(
        "Events uploaded {} after the network came back ({}): outbox {} pending; {} down / {} up through the proxy",
        secs(restored.elapsed()),
        if nudged {
            "after a POST /v1/sync"
        } else {
            "by the agent's background loop"
        },
        delivered.outbox_pending,
        bytes(after.bytes_down - before.bytes_down),
        bytes(after.bytes_up - before.bytes_up),
    ));

    // 19. The council's mailbox.
    let owed: BTreeSet<CouncilCode> = flagged
        .flags
        .iter()
        .map(|f| f.council.ods.clone())
        .collect();
    let t = Instant::now();
    let mut listed = 0u64;
    let mut notices: Vec<(CouncilCode, Notification)> = Vec::new();
    for code in &owed {
        let auth = councils
            .iter()
            .find(|c| &c.code == code)
            .ok_or_else(|| anyhow!("no upload token for council {code}"))?;
        let (found, n) = wait_for(Duration::from_secs(20), || async {
            let (list, n) = mailbox_list(&https, &base, auth).await?;
            Ok(list
                .iter()
                .any(|x| x.event_id == flagged.event_id)
                .then_some((list, n)))
        })
        .await
        .with_context(|| format!("waiting for the notice in council {code}'s mailbox"))?;
        listed += n;
        notices.extend(found.into_iter().map(|x| (code.clone(), x)));
    }
    steps.step(format!(
        "Council mailbox (GET /v1/councils/{{ods}}/notifications, bearer token) in {}, {}: {} notice{}",
        ms(t.elapsed()),
        bytes(listed),
        notices.len(),
        if notices.len() == 1 { "" } else { "s" }
    ));
    for (code, x) in &notices {
        let delay = (x.received_at - x.accessed_at).num_milliseconds() as f64 / 1000.0;
        steps.detail(format!(
            "notice for {}: NHS number {}, {}, looked up by {} ({}), accessed {}, received {} ({delay:.1} s later)",
            council_label(&directory, code),
            x.nhs_number.spaced(),
            x.plan_types
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            x.organisation.name,
            x.organisation.ods,
            time_of(x.accessed_at),
            time_of(x.received_at),
        ));
    }

    let mailbox_council = councils
        .iter()
        .find(|c| owed.contains(&c.code))
        .or(councils.first());
    print_try_it(
        &local,
        ServerAccess {
            base: &base,
            ca: &ca_path,
            https: &https,
        },
        mailbox_council,
        &fleet_token_path,
        &flagged_nhs,
        &dir,
    )
    .await;

    Ok(Demo {
        dir,
        server,
        agent,
        proxy,
        steps,
        replicas,
    })
}

impl Demo {
    /// Waits until Ctrl-C or SIGTERM (or a child exits by itself).
    pub async fn wait_for_signal(&mut self) -> anyhow::Result<()> {
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            #[cfg(unix)]
            let terminated = term.recv();
            #[cfg(not(unix))]
            let terminated = std::future::pending::<Option<()>>();
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    r.context("listening for Ctrl-C")?;
                    println!();
                    println!("Ctrl-C: stopping.");
                    return Ok(());
                }
                _ = terminated => {
                    println!("SIGTERM: stopping.");
                    return Ok(());
                }
                _ = tick.tick() => {
                    for (name, child) in [("server", &mut self.server), ("agent", &mut self.agent)] {
                        if let Some(status) = child.try_status()? {
                            println!("The {name} exited by itself ({status}): stopping.");
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Stops the agent, the proxy and the server (SIGTERM, a bounded wait, then SIGKILL) and
    /// prints how each stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let t = Instant::now();
        let agent = stop_child(&mut self.agent).await;
        self.proxy.shutdown().await;
        let server = stop_child(&mut self.server).await;
        let second = match self.replicas.as_mut() {
            Some(r) => match r.stop().await {
                Some(stopped) => format!(", second replica {}", stopped.describe()),
                None => String::new(),
            },
            None => String::new(),
        };
        self.steps.step(format!(
            "Stopped in {}: agent {}, server {}{second}. Files kept in {}",
            secs(t.elapsed()),
            agent.describe(),
            server.describe(),
            self.dir.display()
        ));
        match (agent, server) {
            (Stopped::Cleanly(_), Stopped::Cleanly(_)) => Ok(()),
            (a, s) => bail!(
                "not everything stopped cleanly: agent {}, server {}",
                a.describe(),
                s.describe()
            ),
        }
    }
}

/// How a child ended.
#[derive(Debug)]
enum Stopped {
    /// Exited after SIGTERM (or had already exited, e.g. on the terminal's Ctrl-C).
    Cleanly(ExitStatus),
    /// Did not exit in time, or exited badly.
    Badly(String),
}

impl Stopped {
    fn describe(&self) -> String {
        match self {
            Self::Cleanly(s) => format!("stopped ({s})"),
            Self::Badly(why) => why.clone(),
        }
    }
}

async fn stop_child(child: &mut Running) -> Stopped {
    // A Ctrl-C on the terminal reaches the children too: they may be stopping already.
    match child.try_status() {
        Ok(Some(status)) => return judge(status),
        Ok(None) => {}
        Err(e) => return Stopped::Badly(format!("{e:#}")),
    }
    if let Err(e) = child.signal("TERM").await {
        // It may have exited between the check and the signal.
        if let Ok(Some(status)) = child.try_status() {
            return judge(status);
        }
        return Stopped::Badly(format!("{e:#}"));
    }
    match child.wait(STOP_TIMEOUT).await {
        Ok(status) => judge(status),
        Err(e) => Stopped::Badly(format!("{e:#}")),
    }
}

fn judge(status: ExitStatus) -> Stopped {
    // Exit 0, or the signal it was asked to stop on.
    if status.success() || status.code().is_none() {
        Stopped::Cleanly(status)
    } else {
        Stopped::Badly(format!("exited with {status}"))
    }
}

/// A council's upload token.
#[derive(Debug, Clone)]
struct CouncilAuth {
    code: CouncilCode,
    token: String,
    token_path: PathBuf,
}

/// `cpis-sync-server admin --data-dir DIR ...`.
#[derive(Debug)]
struct Admin {
    bin: PathBuf,
    data_dir: PathBuf,
}

impl Admin {
    async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        Cmd::new(&self.bin)
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .run(ADMIN_TIMEOUT)
            .await
    }

    /// Adds every trust, region (with its neighbour councils) and council; returns how many
    /// commands it ran.
    async fn add_directory(&self, directory: &cpis_fixtures::Directory) -> anyhow::Result<usize> {
        let commands = harness::directory_commands(directory);
        for args in &commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.run(&args).await?;
        }
        Ok(commands.len())
    }
}

async fn enrolment_token(
    admin: &Admin,
    trust: &TrustCode,
    region: &RegionId,
) -> anyhow::Result<String> {
    Ok(admin
        .run(&[
            "enrolment-token",
            "--trust",
            trust.as_str(),
            "--region",
            region.as_str(),
            "--uses",
            "1",
            "--ttl",
            "24h",
        ])
        .await?
        .trim()
        .to_owned())
}

/// The agent's loopback API.
#[derive(Debug)]
struct LocalApi {
    http: reqwest::Client,
    base: String,
}

impl LocalApi {
    /// `GET /cpis/FHIR/R4/CareTeam` for scheduled care: the searchset Bundle and its size.
    async fn fhir_care_team(&self, nhs: &str) -> anyhow::Result<(serde_json::Value, u64)> {
        let r = self
            .http
            .get(format!(
                "{}/cpis/FHIR/R4/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number%7C{nhs}",
                self.base
            ))
            .header("IsUnscheduledAccessEvent", "false")
            .header("TraceID", "INC-DEMO-FHIR")
            .send()
            .await
            .context("GET /cpis/FHIR/R4/CareTeam from the agent")?;
        let status = r.status();
        let text = r.text().await.context("reading the FHIR answer")?;
        if !status.is_success() {
            bail!("the FHIR CareTeam search answered {status}: {text}");
        }
        let n = text.len() as u64;
        Ok((
            serde_json::from_str(&text).with_context(|| format!("reading {text}"))?,
            n,
        ))
    }

    /// `POST /v1/lookups`: the answer, or the error's code and message for a `4xx`; and the
    /// answer's size.
    async fn lookup(&self, nhs: &str) -> anyhow::Result<(Result<LookupResponse, String>, u64)> {
        let r = self
            .http
            .post(format!("{}/v1/lookups", self.base))
            .json(&LookupRequest {
                nhs_number: nhs.to_owned(),
                staff_id: Some("DEMO1".into()),
                incident_ref: Some("INC-DEMO".into()),
            })
            .send()
            .await
            .context("POST /v1/lookups to the agent")?;
        let status = r.status();
        let text = r.text().await.context("reading the lookup answer")?;
        let n = text.len() as u64;
        if status.is_success() {
            let answer = serde_json::from_str(&text).with_context(|| format!("reading {text}"))?;
            return Ok((Ok(answer), n));
        }
        if status.is_client_error() {
            let reason = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    let e = v.get("error")?;
                    Some(format!(
                        "{} {} \"{}\"",
                        status.as_u16(),
                        e.get("code")?.as_str()?,
                        e.get("message")?.as_str()?
                    ))
                })
                .unwrap_or_else(|| format!("{status} {text}"));
            return Ok((Err(reason), n));
        }
        bail!("the agent answered {status}: {text}")
    }

    /// `GET /v1/status`.
    async fn status(&self) -> anyhow::Result<StatusResponse> {
        let r = self
            .http
            .get(format!("{}/v1/status", self.base))
            .send()
            .await
            .context("GET /v1/status from the agent")?;
        json(r).await
    }

    /// `POST /v1/sync`.
    async fn sync(&self) -> anyhow::Result<SyncResponse> {
        let r = self
            .http
            .post(format!("{}/v1/sync", self.base))
            .send()
            .await
            .context("POST /v1/sync to the agent")?;
        json(r).await
    }
}

async fn json<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> anyhow::Result<T> {
    let status = r.status();
    let text = r.text().await.context("reading the answer")?;
    if !status.is_success() {
        bail!("answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("reading {text}"))
}

/// Uploads a council's full list; returns the receipt and the bytes sent.
async fn upload(
    https: &reqwest::Client,
    base: &str,
    council: &CouncilAuth,
    list: &[FlagRecord],
) -> anyhow::Result<(UploadReceipt, u64)> {
    let mut url = format!("{base}/v1/councils/{}/uploads", council.code);
    if list.is_empty() {
        url.push_str("?allow_empty=true");
    }
    let body = cpis_fixtures::council_csv_bytes(list);
    let n = body.len() as u64;
    let r = https
        .post(url)
        .bearer_auth(&council.token)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .with_context(|| format!("uploading council {}'s list", council.code))?;
    let receipt = json(r)
        .await
        .with_context(|| format!("council {}'s upload", council.code))?;
    Ok((receipt, n))
}

/// Every unacknowledged notice of a council, and the bytes the listing took.
async fn mailbox_list(
    https: &reqwest::Client,
    base: &str,
    council: &CouncilAuth,
) -> anyhow::Result<(Vec<Notification>, u64)> {
    let mut all = Vec::new();
    let mut n = 0u64;
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let mut url = format!(
            "{base}{}?limit={}",
            mailbox::notifications_path(council.code.as_str()),
            mailbox::MAX_LIMIT
        );
        if let Some(cursor) = &after {
            url.push_str("&after=");
            url.push_str(cursor);
        }
        let r = https
            .get(url)
            .bearer_auth(&council.token)
            .send()
            .await
            .with_context(|| format!("listing council {}'s mailbox", council.code))?;
        let status = r.status();
        let text = r.text().await.context("reading the mailbox page")?;
        n += text.len() as u64;
        if !status.is_success() {
            bail!(
                "council {}'s mailbox answered {status}: {text}",
                council.code
            );
        }
        let page: NotificationPage =
            serde_json::from_str(&text).with_context(|| format!("reading {text}"))?;
        all.extend(page.notifications);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok((all, n)),
        }
    }
    bail!(
        "council {}'s mailbox did not end within 100 pages",
        council.code
    )
}

/// Starts `serve` and waits until `/healthz` answers; returns the child and its address.
async fn start_server(
    bins: &Bins,
    data_dir: &Path,
    port: u16,
    log: &Path,
    https: &reqwest::Client,
) -> anyhow::Result<(Running, SocketAddr)> {
    let from = process::file_len(log);
    let mut child = Cmd::new(&bins.server)
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        // A port of its own for /metrics, so the demo never clashes with a server already
        // on the default one.
        .env("CPIS_METRICS_LISTEN", "127.0.0.1:0")
        .spawn_logged(log)?;
    let addr = wait_for_line(&mut child, log, from, "listening on https://", "the server").await?;
    let url = format!("https://127.0.0.1:{}/healthz", addr.port());
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(r) = https.get(&url).send().await
            && r.status().is_success()
        {
            return Ok((child, addr));
        }
        if let Some(status) = child.try_status()? {
            bail!(
                "the server exited ({status}) before /healthz answered; log {}:\n{}",
                log.display(),
                process::tail(log, 20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the server did not answer /healthz within {}; log {}:\n{}",
                secs(START_TIMEOUT),
                log.display(),
                process::tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `base`'s `/healthz` answers 200.
async fn wait_healthy(https: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let url = format!("{base}/healthz");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(r) = https.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer 200 within {}", secs(START_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `cpis-agent run` and waits until it prints its local API's address.
async fn start_agent(
    bins: &Bins,
    state_dir: &Path,
    port: u16,
    log: &Path,
) -> anyhow::Result<(Running, SocketAddr)> {
    let from = process::file_len(log);
    let mut child = Cmd::new(&bins.agent)
        .arg("run")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        // A port of its own for /metrics, so the demo never clashes with a server already
        // on the default one.
        .env("CPIS_METRICS_LISTEN", "127.0.0.1:0")
        .spawn_logged(log)?;
    let addr = wait_for_line(&mut child, log, from, "local API on http://", "the agent").await?;
    Ok((child, addr))
}

/// Waits for the child to log `marker` followed by an address; fails (quoting the log) if
/// it exits first or takes longer than [`START_TIMEOUT`].
async fn wait_for_line(
    child: &mut Running,
    log: &Path,
    from: u64,
    marker: &str,
    what: &str,
) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(rest) = process::find_after(log, from, marker) {
            // "127.0.0.1:PORT" possibly followed by "; ..." or more words.
            let addr = rest
                .split(|c: char| c == ';' || c.is_whitespace())
                .next()
                .unwrap_or_default();
            return addr
                .parse()
                .with_context(|| format!("reading {what}'s address from {rest:?}"));
        }
        if let Some(status) = child.try_status()? {
            bail!(
                "{what} exited ({status}) before listening; log {}:\n{}",
                log.display(),
                process::tail(log, 20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} did not start listening within {}; log {}:\n{}",
                secs(START_TIMEOUT),
                log.display(),
                process::tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `check` every 200 ms until it yields, for at most `timeout`.
async fn wait_for<T, F, Fut>(timeout: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    process::poll("a condition", timeout, Duration::from_millis(200), check).await
}

/// The binaries, with a clear error when they cannot be found or built.
fn locate_bins() -> anyhow::Result<&'static Bins> {
    harness::bins().with_context(|| {
        format!(
            "cpis-demo runs the real cpis-sync-server and cpis-agent binaries, building them \
             with cargo when needed: run it from the workspace with \
             `cargo run --release --locked -p cpis-field-tests --bin cpis-demo`, or set {}=DIR \
             to a directory holding both",
            harness::BIN_DIR_ENV
        )
    })
}

/// Which build profile the binaries come from (the running binary's own), or `None` when
/// they come from [`harness::BIN_DIR_ENV`] or this binary is not in a cargo target dir.
fn build_profile() -> Option<String> {
    if std::env::var_os(harness::BIN_DIR_ENV).is_some() {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // <target>/<profile>/ or <target>/<triple>/<profile>/; the target dir holds CACHEDIR.TAG.
    let in_target = dir
        .ancestors()
        .skip(1)
        .take(2)
        .any(|d| d.join("CACHEDIR.TAG").exists());
    let profile = dir.file_name()?.to_string_lossy().into_owned();
    in_target.then(|| format!("{profile} profile"))
}

/// Fails with a clear message when a fixed port is taken.
fn check_port_free(port: u16, option: &str) -> anyhow::Result<()> {
    if port == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {port} on 127.0.0.1 is in use ({option} {port}): choose another, or 0 for a free one"
        ),
        Err(e) => Err(anyhow!(e).context(format!("checking that 127.0.0.1:{port} is free"))),
    }
}

/// The directory for this run: the given one (created, must be empty) or a new one under
/// the system's temp dir.
fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_owned(),
        None => std::env::temp_dir().join(format!(
            "cpis-demo-{}-{}",
            Utc::now().format("%Y%m%d-%H%M%S"),
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let used = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_some();
    if used {
        bail!(
            "{} is not empty: give --dir a new or empty directory",
            dir.display()
        );
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    Ok(dir)
}

/// A flagged number of the region's own councils, a valid number that is not flagged, and
/// an invalid one (the not-flagged number with its check digit changed), chosen by `seed`.
fn pick_numbers(
    dataset: &Dataset,
    region: &RegionId,
    seed: u64,
) -> anyhow::Result<(NhsNumber, NhsNumber, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let flags = dataset.region_flags(region);
    if flags.is_empty() {
        bail!("the region has no flags (--flags must be at least 1)");
    }
    let flagged = flags[rng.gen_range(0..flags.len())].nhs_number;
    let held: BTreeSet<NhsNumber> = dataset.flags().map(|f| f.nhs_number).collect();
    let clear = (0..10_000)
        .find_map(|_| {
            let mut nine = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
            for d in &mut nine[3..] {
                *d = rng.gen_range(0..10);
            }
            NhsNumber::complete(nine).filter(|n| !held.contains(n))
        })
        .ok_or_else(|| anyhow!("no unflagged test number found"))?;
    let digits = clear.to_string();
    let (head, last) = digits.split_at(9);
    let last: u32 = last.parse().context("reading a check digit")?;
    let invalid = format!("{head}{}", (last + 1) % 10);
    Ok((flagged, clear, invalid))
}

fn print_answer(steps: &Steps, a: &LookupResponse) {
    for f in &a.flags {
        steps.detail(format!(
            "{} ({}) from {}{}",
            f.plan_type.as_str(),
            f.plan_type.description(),
            f.start_date,
            match (f.end_date, f.ended) {
                (Some(end), true) => format!(" — ENDED {end}"),
                (Some(end), false) => format!(" — ACTIVE, ends {end}"),
                (None, _) => " — ACTIVE".to_owned(),
            }
        ));
        steps.detail(format!(
            "  Council: {} ({}); emergency: {}{}",
            f.council.name,
            f.council.ods,
            f.council.emergency_phone,
            f.council
                .office_phone
                .as_ref()
                .map_or_else(String::new, |p| format!("; office: {p}")),
        ));
    }
    steps.detail(format!(
        "Data as of {} ({}, {}); coverage: region {}, {} councils ({})",
        a.data_as_of.map_or_else(|| "never".to_owned(), time_of),
        a.freshness.as_str().to_uppercase(),
        age(a.data_age_secs),
        a.coverage.region,
        a.coverage.councils.len(),
        a.coverage
            .councils
            .iter()
            .map(|c| c.ods.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let national = match &a.national {
        Some(n) => format!(
            "national check: {} across {} councils",
            answer_word(n.result),
            n.councils_covered
        ),
        None => "no national check (server not reached): the answer covers the region".to_owned(),
    };
    let warnings = if a.warnings.is_empty() {
        String::new()
    } else {
        format!(
            "; warnings: {}",
            a.warnings
                .iter()
                .map(|w| w.code.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    steps.detail(format!(
        "Access recorded: event {}; {national}{warnings}",
        a.event_id
    ));
}

fn background_line(s: &StatusResponse) -> String {
    let mut line = format!(
        "background sync: {} failed attempt{} in a row",
        s.consecutive_failures,
        if s.consecutive_failures == 1 { "" } else { "s" }
    );
    if let Some(e) = &s.last_sync_error {
        line.push_str(&format!("; last error: {e}"));
    }
    if let Some(next) = s.next_sync_at {
        line.push_str(&format!("; next attempt {}", time_of(next)));
    }
    line
}

/// The server as the demo's own clients reach it.
struct ServerAccess<'a> {
    base: &'a str,
    ca: &'a Path,
    https: &'a reqwest::Client,
}

async fn print_try_it(
    local: &LocalApi,
    server: ServerAccess<'_>,
    council: Option<&CouncilAuth>,
    fleet_token: &Path,
    flagged: &NhsNumber,
    dir: &Path,
) {
    let ServerAccess { base, ca, https } = server;
    println!();
    println!("Try it yourself (server, proxy and agent stay up until Ctrl-C):");
    println!(
        "  curl -s -X POST {}/v1/lookups -H 'content-type: application/json' -d '{{\"nhs_number\":\"{}\",\"staff_id\":\"P123\"}}'",
        local.base,
        flagged.spaced()
    );
    println!("  curl -s {}/v1/status", local.base);
    println!("  curl -s -X POST {}/v1/sync", local.base);
    println!("  curl -s --cacert {} {base}/healthz", ca.display());
    if let Some(c) = council {
        println!(
            "  curl -s --cacert {} -H \"Authorization: Bearer $(cat {})\" {base}{}",
            ca.display(),
            c.token_path.display(),
            mailbox::notifications_path(c.code.as_str())
        );
    }
    // The pages, each listed only when it answers.
    println!("In a browser:");
    if has_page(&local.http, &format!("{}/", local.base)).await {
        println!(
            "  Paramedic page: {}/ (staff id once per shift, then an NHS number, e.g. {})",
            local.base,
            flagged.spaced()
        );
    }
    let trust_ca = format!(
        "the server's certificate is from the demo's own CA: accept it, or trust {}",
        ca.display()
    );
    if let Some(c) = council
        && has_page(https, &format!("{base}/council")).await
    {
        println!(
            "  Council inbox: {base}/council (sign in with the token in {}; {trust_ca})",
            c.token_path.display()
        );
    }
    if has_page(https, &format!("{base}/fleet")).await {
        println!(
            "  Trust fleet: {base}/fleet (sign in with the token in {})",
            fleet_token.display()
        );
    }
    println!(
        "  Logs: {}, {}; fixtures, tokens, server data and tablet state under {}",
        dir.join("server.log").display(),
        dir.join("agent.log").display(),
        dir.display()
    );
}

/// Whether `GET url` answers an HTML page.
async fn has_page(http: &reqwest::Client, url: &str) -> bool {
    match http.get(url).send().await {
        Ok(r) => {
            r.status().is_success()
                && r.headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/html"))
        }
        Err(_) => false,
    }
}

fn council_label(directory: &cpis_fixtures::Directory, code: &CouncilCode) -> String {
    directory
        .council(code)
        .map_or_else(|| code.to_string(), |c| format!("{} ({code})", c.name))
}

fn answer_word(r: LookupResult) -> &'static str {
    match r {
        LookupResult::Flagged => "FLAGGED",
        LookupResult::NotFlagged => "NOT FLAGGED",
        LookupResult::Unknown => "UNKNOWN",
    }
}

fn time_of(t: DateTime<Utc>) -> String {
    t.format("%H:%M:%S%.3f UTC").to_string()
}

fn age(secs: Option<u64>) -> String {
    match secs {
        None => "no data".to_owned(),
        Some(s) if s < 120 => format!("{s} s old"),
        Some(s) => format!("{} min old", s / 60),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Bytes in B, KB or MB (powers of 1000).
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        _ => format!("{:.2} MB", n as f64 / 1e6),
    }
}

/// A count with thousands separators.
fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_read_plainly() {
        assert_eq!(super::count(20_000), "20,000");
        assert_eq!(super::count(999), "999");
        assert_eq!(super::bytes(1_234), "1.2 KB");
        assert_eq!(super::bytes(512), "512 B");
    }
}
