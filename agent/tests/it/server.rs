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
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = TempDir::new().unwrap();
        server::init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
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
            s.add_council_token(code.parse().unwrap(), hash, now)
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

    pub(crate) fn now(&self) -> DateTime<Utc> {
        use cpis_sync_server::clock::Clock as _;
        self.clock.now()
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
