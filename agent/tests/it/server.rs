//! The real sync server, in process on 127.0.0.1, seeded through its store, with council
//! uploads over HTTPS: the agent is tested against what it will talk to in the field.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cpis_protocol::{CouncilInfo, NhsNumber};
use cpis_sync_server::clock::ManualClock;
use cpis_sync_server::config::Config;
use cpis_sync_server::server::{self, Server, ServerHandle};
use cpis_sync_server::store::{NewEnrolmentToken, Store as _};
use cpis_sync_server::tokens;
use tempfile::TempDir;

pub(crate) const REGION: &str = "EM";
pub(crate) const LEICS: &str = "E10000018";
pub(crate) const NOTTS: &str = "E10000024";

/// The n-th valid 999-prefixed NHS number.
pub(crate) fn nhs(n: u32) -> NhsNumber {
    let mut k = 0;
    let mut i = 0u32;
    loop {
        let d = format!("{i:06}");
        let mut nine = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
        for (j, c) in d.bytes().enumerate() {
            nine[3 + j] = c - b'0';
        }
        if let Some(num) = NhsNumber::complete(nine) {
            if k == n {
                return num;
            }
            k += 1;
        }
        i += 1;
    }
}

/// The first `count` valid 999-prefixed NHS numbers, in one pass.
pub(crate) fn nhs_range(count: u32) -> Vec<NhsNumber> {
    let mut out = Vec::with_capacity(count as usize);
    let mut i = 0u32;
    while out.len() < count as usize {
        let d = format!("{i:06}");
        let mut nine = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
        for (j, c) in d.bytes().enumerate() {
            nine[3 + j] = c - b'0';
        }
        if let Some(num) = NhsNumber::complete(nine) {
            out.push(num);
        }
        i += 1;
    }
    out
}

pub(crate) struct Env {
    pub(crate) _dir: TempDir,
    pub(crate) handle: ServerHandle,
    pub(crate) clock: ManualClock,
    pub(crate) ca: String,
    pub(crate) base: String,
    council_tokens: Vec<(String, String)>,
}

impl Env {
    /// A running server with trust ZA1, region EM and councils LEICS and NOTTS; its clock
    /// starts at `now`.
    pub(crate) async fn start(now: DateTime<Utc>) -> Env {
        Self::start_with(now, |_| {}).await
    }

    /// [`Env::start`] with the server's configuration changed by `configure`.
    pub(crate) async fn start_with(now: DateTime<Utc>, configure: impl FnOnce(&mut Config)) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = TempDir::new().unwrap();
        server::init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        configure(&mut config);
        let clock = ManualClock::new(now);
        let handle = Server::bind(dir.path(), config, Arc::new(clock.clone()))
            .await
            .unwrap();
        let ca =
            std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(dir.path())).unwrap();
        let base = format!("https://127.0.0.1:{}", handle.local_addr().port());
        let s = handle.store();
        s.add_trust("ZA1".parse().unwrap(), "Test Ambulance Trust".into())
            .await
            .unwrap();
        s.add_region(REGION.parse().unwrap(), "East Midlands".into(), vec![])
            .await
            .unwrap();
        let mut council_tokens = Vec::new();
        for (code, name) in [
            (LEICS, "Leicestershire Test Council"),
            (NOTTS, "Nottinghamshire Test Council"),
        ] {
            s.add_council(CouncilInfo {
                code: code.parse().unwrap(),
                name: name.into(),
                region: REGION.parse().unwrap(),
                emergency_phone: "0116 496 0000".into(),
                office_phone: Some("0116 496 0001".into()),
            })
            .await
            .unwrap();
            let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
            s.add_council_token(code.parse().unwrap(), hash, now, None)
                .await
                .unwrap();
            council_tokens.push((code.to_owned(), token));
        }
        Env {
            _dir: dir,
            handle,
            clock,
            ca,
            base,
            council_tokens,
        }
    }

    /// Adds a region with one council (and its token).
    pub(crate) async fn add_region_with_council(&mut self, region: &str, code: &str, name: &str) {
        let s = self.handle.store();
        s.add_region(region.parse().unwrap(), format!("Region {region}"), vec![])
            .await
            .unwrap();
        s.add_council(CouncilInfo {
            code: code.parse().unwrap(),
            name: name.into(),
            region: region.parse().unwrap(),
            emergency_phone: "01772 000 000".into(),
            office_phone: None,
        })
        .await
        .unwrap();
        let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
        s.add_council_token(code.parse().unwrap(), hash, self.now(), None)
            .await
            .unwrap();
        self.council_tokens.push((code.to_owned(), token));
    }

    /// Every notification in a council's mailbox, over HTTPS with the council's token,
    /// following `next`.
    pub(crate) async fn mailbox(&self, ods: &str) -> Vec<cpis_protocol::mailbox::Notification> {
        let token = &self
            .council_tokens
            .iter()
            .find(|(c, _)| c == ods)
            .unwrap()
            .1;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(cpis_agent::net::tls_config(&self.ca, None).unwrap())
            .build()
            .unwrap();
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!(
                "{}{}?limit=1000",
                self.base,
                cpis_protocol::mailbox::notifications_path(ods)
            );
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let r = client.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let page: cpis_protocol::mailbox::NotificationPage = r.json().await.unwrap();
            all.extend(page.notifications);
            match page.next {
                Some(n) => after = Some(n),
                None => return all,
            }
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        use cpis_sync_server::clock::Clock as _;
        self.clock.now()
    }

    /// A tablet enrolled (system clock) in `dir` against `base` (this server, or a proxy in
    /// front of it) with a one-use token.
    pub(crate) async fn enrol_agent(&self, base: &str, dir: &std::path::Path) -> cpis_agent::Agent {
        let token = self.enrolment_token(1, chrono::Duration::hours(1)).await;
        cpis_agent::sync::enrol(
            dir,
            base,
            &self.ca,
            &token,
            None,
            std::sync::Arc::new(cpis_agent::SystemClock),
        )
        .await
        .unwrap()
    }

    pub(crate) async fn enrolment_token(&self, uses: u32, ttl: chrono::Duration) -> String {
        let (token, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
        self.handle
            .store()
            .add_enrolment_token(
                NewEnrolmentToken {
                    hash,
                    trust: "ZA1".parse().unwrap(),
                    region: REGION.parse().unwrap(),
                    uses,
                    expires_at: self.now() + ttl,
                },
                self.now(),
            )
            .await
            .unwrap();
        token
    }

    /// Uploads a council's full list: (number, plan, start, end).
    pub(crate) async fn upload(&self, ods: &str, rows: &[(NhsNumber, &str, &str, &str)]) {
        let mut body =
            String::from("nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n");
        for (n, plan, start, end) in rows {
            body.push_str(&format!("{n},{plan},{start},{end},,\n"));
        }
        let token = &self
            .council_tokens
            .iter()
            .find(|(c, _)| c == ods)
            .unwrap()
            .1;
        let client = cpis_agent::net::tls_config(&self.ca, None).unwrap();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(client)
            .build()
            .unwrap();
        let resp = client
            .post(format!("{}/v1/councils/{ods}/uploads", self.base))
            .bearer_auth(token)
            .header("content-type", "text/csv")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
}

/// The signed metadata and body of the region's current snapshot, fetched with the agent's
/// own identity (through whatever address it enrolled with) into a scratch directory.
pub(crate) async fn current_snapshot(
    agent: &cpis_agent::Agent,
) -> (cpis_protocol::SnapshotMeta, Vec<u8>) {
    let client = cpis_agent::sync::device_client(agent).unwrap();
    let signed = client.snapshot_meta().await.unwrap();
    let meta: cpis_protocol::SnapshotMeta = signed
        .open(agent.enrolment().signing_key.verifying_key())
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let sealer = cpis_agent::keystore::MasterKey::generate()
        .derive()
        .download
        .clone();
    let body = client
        .snapshot_body(
            &signed,
            meta.epoch,
            meta.version,
            &meta.body,
            scratch.path(),
            &sealer,
            &|_, _| {},
        )
        .await
        .unwrap();
    meta.body.verify(&body).unwrap();
    (meta, body)
}

/// Reads a Prometheus counter of the server (0 when absent): the first sample whose line
/// starts with `name{` and contains every label in `labels`.
pub(crate) async fn metric(env: &Env, name: &str, labels: &[&str]) -> u64 {
    // `/metrics` is on its own plain-HTTP loopback listener.
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(cpis_agent::net::tls_config(&env.ca, None).unwrap())
        .build()
        .unwrap();
    let text = client
        .get(format!("http://{}/metrics", env.handle.metrics_addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

/// `count` upload rows with seeded random NHS numbers (distinct), plan types and dates: a
/// body that compresses like real data. Starts fall in the five years before `today`; every
/// fifth plan ended within the last 300 days (inside the 12-month retention).
pub(crate) fn random_rows(
    seed: u64,
    count: usize,
    today: chrono::NaiveDate,
) -> Vec<(NhsNumber, &'static str, String, String)> {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::with_capacity(count);
    while rows.len() < count {
        let mut nine = [0u8; 9];
        for d in &mut nine {
            *d = rng.gen_range(0..10);
        }
        nine[0] = rng.gen_range(4..10);
        let Some(n) = NhsNumber::complete(nine) else {
            continue;
        };
        if !seen.insert(n) {
            continue;
        }
        let i = rows.len();
        let (start, end) = if i % 5 == 0 {
            let end = today - chrono::Duration::days(rng.gen_range(1..300));
            (
                end - chrono::Duration::days(rng.gen_range(30..900)),
                end.to_string(),
            )
        } else {
            let start = today - chrono::Duration::days(rng.gen_range(1..1800));
            (start, String::new())
        };
        rows.push((n, ["CPP", "LAC", "UCPP"][i % 3], start.to_string(), end));
    }
    rows
}

/// Lancashire: a council of region NW, outside the tablets' region EM.
pub(crate) const LANCS: &str = "E10000017";

/// Adds region NW with Lancashire; flags nhs(0) (CPP, Leicestershire: the tablet's region)
/// and nhs(7) (LAC from 2025-03-01, Lancashire: found only by the national check).
pub(crate) async fn with_another_region(env: &mut Env) {
    env.add_region_with_council("NW", LANCS, "Lancashire Test Council")
        .await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    env.upload(LANCS, &[(nhs(7), "LAC", "2025-03-01", "")])
        .await;
}

/// `cpis-agent run` in this process for `agent`: a loop that sends events 100 ms after a
/// lookup and backs off for at most 1 s, and the national check of a miss (10 s bound).
/// Returns once the first sync has installed data.
pub(crate) async fn run_quick(
    agent: std::sync::Arc<cpis_agent::Agent>,
) -> cpis_agent::service::Service {
    use std::time::Duration;
    let mut sync = cpis_agent::background::LoopConfig::default();
    sync.schedule.interval = Duration::from_secs(3600);
    sync.schedule.soon = Duration::from_millis(100);
    sync.schedule.backoff_min = Duration::from_millis(200);
    sync.schedule.backoff_max = Duration::from_secs(1);
    let svc = cpis_agent::service::Service::start(
        agent.clone(),
        cpis_agent::service::RunConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            sync,
            confirm_bound: Some(Duration::from_secs(10)),
        },
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.status().unwrap().version.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no first sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc
}
