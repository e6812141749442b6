//! Shared setup: a data dir, a running server with a manual clock, clients, enrolment.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::api::{EnrolRequest, EnrolResponse, paths};
use cpis_protocol::mailbox::{self, AckRequest, Notification, NotificationId, NotificationPage};
use cpis_protocol::{
    AccessEvent, CareSetting, CouncilCode, CouncilInfo, EventBatch, EventId, EventUploadAck,
    Freshness, LookupResult, NhsNumber, PlanType, RegionId, TrustCode,
};
use cpis_sync_server::clock::ManualClock;
use cpis_sync_server::config::Config;
use cpis_sync_server::server::{self, Server, ServerHandle};
use cpis_sync_server::store::{NewEnrolmentToken, Store};
use cpis_sync_server::tokens;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

pub const EM: &str = "EM";
pub const NW: &str = "NW";
/// Councils: two in EM, one in NW.
pub const LEICS: &str = "E10000018";
pub const NOTTS: &str = "E10000024";
pub const LANCS: &str = "E10000017";
pub const HEADER: &str = "nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n";

pub fn t0() -> DateTime<Utc> {
    "2025-06-01T12:00:00Z".parse().unwrap()
}

pub fn date(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

/// The n-th valid 999-prefixed NHS number.
pub fn nhs(n: u32) -> NhsNumber {
    let mut k = 0;
    let mut i = 0u32;
    loop {
        let d = format!("{:06}", i);
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

/// A CSV upload body from (nhs index, plan, start, end).
pub fn csv(rows: &[(u32, &str, &str, &str)]) -> String {
    let mut s = HEADER.to_owned();
    for (n, plan, start, end) in rows {
        s.push_str(&format!("{},{plan},{start},{end},,\n", nhs(*n)));
    }
    s
}

/// The PostgreSQL cluster the conformance run uses (`CPIS_TEST_DATABASE`, an admin URL set by
/// `scripts/test`); unset: every test runs on SQLite.
pub fn test_database() -> Option<String> {
    std::env::var("CPIS_TEST_DATABASE")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// An initialised data dir: on a new database of the `CPIS_TEST_DATABASE` cluster when it is
/// set, else on SQLite.
pub async fn init_dir() -> TempDir {
    let dir = TempDir::new().unwrap();
    let hostnames = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    match test_database() {
        Some(admin) => {
            let name = format!("cpis_t_{}", uuid::Uuid::now_v7().simple());
            let url = cpis_sync_server::store::postgres::create_database(&admin, &name)
                .await
                .unwrap();
            server::init_with(dir.path(), &hostnames, Some(&url))
                .await
                .unwrap();
        }
        None => server::init(dir.path(), &hostnames).unwrap(),
    }
    dir
}

pub struct Env {
    pub dir: TempDir,
    pub handle: Option<ServerHandle>,
    pub clock: ManualClock,
    pub ca: String,
    pub base: String,
}

pub struct Device {
    pub client: reqwest::Client,
    pub enrolment: EnrolResponse,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Env {
        let dir = init_dir().await;
        Self::serve(dir, tweak).await
    }

    /// A server whose manual clock starts at `now`.
    pub async fn start_at(now: DateTime<Utc>) -> Env {
        let dir = init_dir().await;
        Self::serve_at(dir, now, |_| {}).await
    }

    /// Serves an initialised data dir.
    pub async fn serve(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Env {
        Self::serve_at(dir, t0(), tweak).await
    }

    /// Serves an initialised data dir with the manual clock at `now`.
    pub async fn serve_at(
        dir: TempDir,
        now: DateTime<Utc>,
        tweak: impl FnOnce(&mut Config),
    ) -> Env {
        // The data dir's database (SQLite, or the PostgreSQL database `init_dir` made).
        let database_url = Config::load(dir.path()).unwrap().database_url;
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            database_url,
            ..Config::default()
        };
        tweak(&mut config);
        let clock = ManualClock::new(now);
        let handle = Server::bind(dir.path(), config, Arc::new(clock.clone()))
            .await
            .unwrap();
        let ca =
            std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(dir.path())).unwrap();
        let base = format!("https://localhost:{}", handle.local_addr().port());
        Env {
            dir,
            handle: Some(handle),
            clock,
            ca,
            base,
        }
    }

    pub fn store(&self) -> &cpis_sync_server::store::AnyStore {
        self.handle.as_ref().unwrap().store()
    }

    /// Adds trust RX9, regions EM and NW, councils LEICS and NOTTS (EM) and LANCS (NW).
    pub async fn seed(&self) {
        let s = self.store();
        s.add_trust("RX9".parse().unwrap(), "East Midlands Ambulance".into())
            .await
            .unwrap();
        s.add_region(EM.parse().unwrap(), "East Midlands".into(), vec![])
            .await
            .unwrap();
        s.add_region(NW.parse().unwrap(), "North West".into(), vec![])
            .await
            .unwrap();
        for (code, region) in [(LEICS, EM), (NOTTS, EM), (LANCS, NW)] {
            s.add_council(CouncilInfo {
                code: code.parse().unwrap(),
                name: format!("Council {code}"),
                region: region.parse().unwrap(),
                emergency_phone: "0116 000 0000".into(),
                office_phone: Some("0116 111 1111".into()),
            })
            .await
            .unwrap();
        }
    }

    pub async fn council_token(&self, ods: &str) -> String {
        let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
        self.store()
            .add_council_token(ods.parse().unwrap(), hash, t0(), None)
            .await
            .unwrap();
        token
    }

    pub async fn enrolment_token(&self, region: &str, uses: u32) -> String {
        let (token, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
        self.store()
            .add_enrolment_token(
                NewEnrolmentToken {
                    hash,
                    trust: "RX9".parse::<TrustCode>().unwrap(),
                    region: region.parse::<RegionId>().unwrap(),
                    uses,
                    expires_at: self.clock_now() + chrono::Duration::hours(24),
                },
                self.clock_now(),
            )
            .await
            .unwrap();
        token
    }

    pub fn clock_now(&self) -> DateTime<Utc> {
        use cpis_sync_server::clock::Clock as _;
        self.clock.now()
    }

    /// A client that trusts the CA and presents no certificate.
    pub fn client(&self) -> reqwest::Client {
        client(&self.ca, None)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn upload(&self, token: &str, ods: &str, body: &str) -> reqwest::Response {
        self.client()
            .post(self.url(&format!("/v1/councils/{ods}/uploads")))
            .bearer_auth(token)
            .header("content-type", "text/csv")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Enrols a device with a fresh key; returns a client presenting its certificate.
    pub async fn enrol(&self, region: &str) -> Device {
        let token = self.enrolment_token(region, 1).await;
        let (response, key_pem) = self.enrol_with(&token).await;
        assert_eq!(response.status(), 200);
        let enrolment: EnrolResponse = response.json().await.unwrap();
        let client = client(&self.ca, Some((&enrolment.client_cert_pem, &key_pem)));
        Device { client, enrolment }
    }

    pub async fn enrol_with(&self, token: &str) -> (reqwest::Response, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let response = self
            .client()
            .post(self.url(cpis_protocol::api::paths::ENROL))
            .json(&EnrolRequest {
                token: token.to_owned(),
                csr_pem: csr,
                name: Some("tablet 1".into()),
                agent_version: "test".into(),
            })
            .send()
            .await
            .unwrap();
        (response, key.serialize_pem())
    }

    pub async fn stop(mut self) -> TempDir {
        let handle = self.handle.take().unwrap();
        handle.shutdown();
        handle.join().await.unwrap();
        self.dir
    }
}

impl Device {
    /// An access event of this device, at `at`, for the n-th test NHS number; flagged by
    /// `councils` with `plans` when `councils` is not empty.
    pub fn event(
        &self,
        n: u32,
        at: DateTime<Utc>,
        councils: &[&str],
        plans: &[PlanType],
    ) -> AccessEvent {
        AccessEvent {
            event_id: EventId::new(),
            accessed_at: at,
            trust: self.enrolment.trust.clone(),
            device: self.enrolment.device_id,
            staff_id: Some("P0001".into()),
            nhs_number: nhs(n),
            result: if councils.is_empty() {
                LookupResult::NotFlagged
            } else {
                LookupResult::Flagged
            },
            plan_types: plans.to_vec(),
            councils: councils.iter().map(|c| council(c)).collect(),
            data_as_of: Some(at - chrono::Duration::hours(1)),
            freshness: Freshness::Fresh,
            setting: CareSetting::Ambulance,
            incident_ref: Some("INC-1".into()),
            unscheduled: true,
        }
    }

    /// Posts a batch of events.
    pub async fn post_events(&self, env: &Env, events: &[AccessEvent]) -> reqwest::Response {
        self.client
            .post(env.url(paths::EVENTS))
            .json(&EventBatch {
                events: events.to_vec(),
            })
            .send()
            .await
            .unwrap()
    }

    /// Posts a batch of events and expects `200`.
    pub async fn send_events(&self, env: &Env, events: &[AccessEvent]) -> EventUploadAck {
        let r = self.post_events(env, events).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

impl Env {
    /// One page of a council's mailbox.
    pub async fn list(
        &self,
        token: &str,
        ods: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> reqwest::Response {
        let mut url = self.url(&mailbox::notifications_path(ods));
        let mut sep = '?';
        if let Some(a) = after {
            url.push_str(&format!("{sep}after={a}"));
            sep = '&';
        }
        if let Some(l) = limit {
            url.push_str(&format!("{sep}limit={l}"));
        }
        self.client()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Every notification in a council's mailbox, following `next`.
    pub async fn mailbox(&self, token: &str, ods: &str) -> Vec<Notification> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let r = self.list(token, ods, after.as_deref(), Some(1000)).await;
            assert_eq!(r.status(), 200);
            let page: NotificationPage = r.json().await.unwrap();
            all.extend(page.notifications);
            match page.next {
                Some(n) => after = Some(n),
                None => return all,
            }
        }
    }

    /// Acknowledges ids in a council's mailbox.
    pub async fn ack(&self, token: &str, ods: &str, ids: &[NotificationId]) -> reqwest::Response {
        self.client()
            .post(self.url(&mailbox::ack_path(ods)))
            .bearer_auth(token)
            .json(&AckRequest { ids: ids.to_vec() })
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text, from its own plain-HTTP loopback listener.
    pub async fn metrics(&self) -> String {
        let (status, body) =
            plain_get(self.handle.as_ref().unwrap().metrics_addr(), "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The value of one sample line of a Prometheus text exposition.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub fn council(code: &str) -> CouncilCode {
    code.parse().unwrap()
}

/// A plain-HTTP/1.0 GET (the metrics listener): status and body.
pub async fn plain_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, body.to_owned())
}

/// A reqwest client (ring provider) trusting only `ca_pem`, optionally with a client cert.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .https_only(true)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
