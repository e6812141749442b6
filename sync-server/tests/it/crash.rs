//! kill -9 of the real server binary in the middle of event ingest: after a restart and a
//! re-send of everything not acknowledged, the stored events are exactly the events sent,
//! each once, with exactly one notification per (event, owning council).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use cpis_protocol::api::{EnrolRequest, EnrolResponse, paths};
use cpis_protocol::{AccessEvent, CouncilInfo, EventBatch, EventId, EventUploadAck, PlanType};
use cpis_sync_server::server;
use cpis_sync_server::store::{NewEnrolmentToken, SqliteStore, Store};
use cpis_sync_server::tokens;

use crate::harness::*;

/// The server binary, killed when dropped.
struct Running {
    child: Child,
    base: String,
    /// Kept open so the server never writes to a closed pipe.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Running {
    fn start(dir: &Path) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "error")
            .env("CPIS_METRICS_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Running {
            child,
            base: format!("https://localhost:{port}"),
            _stdout: stdout,
        }
    }

    /// SIGKILL: no graceful shutdown, no flush.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BATCHES: usize = 40;
const PER_BATCH: usize = 50;
const IN_FLIGHT: usize = 4;
/// Acknowledged batches before the kill.
const KILL_AFTER: usize = 10;

async fn post(
    client: &reqwest::Client,
    base: &str,
    events: &[AccessEvent],
) -> Option<EventUploadAck> {
    let r = client
        .post(format!("{base}{}", paths::EVENTS))
        .json(&EventBatch {
            events: events.to_vec(),
        })
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json().await.ok()
}

#[tokio::test]
async fn kill_9_mid_ingest_loses_and_duplicates_nothing() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().join("data");
    server::init(&dir, &["localhost".into()]).unwrap();
    let now = Utc::now();
    let (enrol_token, leics_token, notts_token) = {
        let store = SqliteStore::open(&dir.join("cpis.db")).unwrap();
        store
            .add_trust("RX9".parse().unwrap(), "East Midlands Ambulance".into())
            .await
            .unwrap();
        store
            .add_region(EM.parse().unwrap(), "East Midlands".into(), vec![])
            .await
            .unwrap();
        for code in [LEICS, NOTTS] {
            store
                .add_council(CouncilInfo {
                    code: council(code),
                    name: format!("Council {code}"),
                    region: EM.parse().unwrap(),
                    emergency_phone: "0116 000 0000".into(),
                    office_phone: None,
                })
                .await
                .unwrap();
        }
        let mut council_tokens = Vec::new();
        for code in [LEICS, NOTTS] {
            let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
            store
                .add_council_token(council(code), hash, now, None)
                .await
                .unwrap();
            council_tokens.push(token);
        }
        let (token, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
        store
            .add_enrolment_token(
                NewEnrolmentToken {
                    hash,
                    trust: "RX9".parse().unwrap(),
                    region: EM.parse().unwrap(),
                    uses: 1,
                    expires_at: now + chrono::Duration::hours(1),
                },
                now,
            )
            .await
            .unwrap();
        (token, council_tokens.remove(0), council_tokens.remove(0))
    };
    let ca = std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(&dir)).unwrap();

    let mut server = Running::start(&dir);
    let http = client(&ca, None);
    // Leicestershire flags subjects 1-20 (CPP), Nottinghamshire 1-10 (LAC).
    let rows: Vec<(u32, &str, &str, &str)> =
        (1..=20).map(|n| (n, "CPP", "2024-01-01", "")).collect();
    let lac: Vec<(u32, &str, &str, &str)> =
        (1..=10).map(|n| (n, "LAC", "2024-01-01", "")).collect();
    for (token, ods, body) in [
        (&leics_token, LEICS, csv(&rows)),
        (&notts_token, NOTTS, csv(&lac)),
    ] {
        let r = http
            .post(format!("{}/v1/councils/{ods}/uploads", server.base))
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let enrolment: EnrolResponse = http
        .post(format!("{}{}", server.base, paths::ENROL))
        .json(&EnrolRequest {
            token: enrol_token,
            csr_pem: csr,
            name: None,
            agent_version: "crash-test".into(),
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device = Device {
        client: client(
            &ca,
            Some((&enrolment.client_cert_pem, &key.serialize_pem())),
        ),
        enrolment,
    };

    // 2,000 events over 30 subjects: 1-10 flagged by both councils, 11-20 by Leicestershire,
    // 21-30 not flagged.
    let mut expected: BTreeMap<&str, BTreeSet<EventId>> = BTreeMap::new();
    let batches: Vec<Vec<AccessEvent>> = (0..BATCHES)
        .map(|b| {
            (0..PER_BATCH)
                .map(|i| {
                    let n = ((b * PER_BATCH + i) % 30) as u32 + 1;
                    let (councils, plans): (&[&str], &[PlanType]) = match n {
                        1..=10 => (&[LEICS, NOTTS], &[PlanType::Cpp, PlanType::Lac]),
                        11..=20 => (&[LEICS], &[PlanType::Cpp]),
                        _ => (&[], &[]),
                    };
                    let e = device.event(n, now, councils, plans);
                    for c in councils {
                        expected.entry(c).or_default().insert(e.event_id);
                    }
                    e
                })
                .collect()
        })
        .collect();
    let sent: BTreeSet<EventId> = batches.iter().flatten().map(|e| e.event_id).collect();
    assert_eq!(sent.len(), BATCHES * PER_BATCH);

    // Post with several batches in flight; SIGKILL the server once some are acknowledged.
    let acked: Arc<Mutex<BTreeSet<EventId>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let batches = Arc::new(batches);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (client, base) = (device.client.clone(), server.base.clone());
        let (acked, next, batches, tx) = (acked.clone(), next.clone(), batches.clone(), tx.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(batch) = batches.get(i) else { return };
                match post(&client, &base, batch).await {
                    Some(ack) => {
                        assert!(ack.rejected.is_empty());
                        acked.lock().unwrap().extend(ack.stored);
                        let _ = tx.send(());
                    }
                    // The server died under this request: what it stored is unknown.
                    None => return,
                }
            }
        });
    }
    drop(tx);
    for _ in 0..KILL_AFTER {
        rx.recv().await.unwrap();
    }
    server.kill9();
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let before_restart = acked.lock().unwrap().clone();
    // Everything acknowledged survived the kill (committed with synchronous=FULL before the
    // answer); some more may be stored whose answer never arrived.
    {
        let store = SqliteStore::open(&dir.join("cpis.db")).unwrap();
        let on_disk: BTreeSet<EventId> = store.event_ids().await.unwrap().into_iter().collect();
        assert!(
            before_restart.is_subset(&on_disk),
            "an acknowledged event was lost"
        );
        eprintln!(
            "after kill -9: {} events acknowledged, {} on disk, of {} sent",
            before_restart.len(),
            on_disk.len(),
            sent.len()
        );
    }
    assert!(before_restart.len() >= KILL_AFTER * PER_BATCH);
    assert!(before_restart.len() < sent.len(), "the kill came part way");

    // Restart; re-send everything not acknowledged (and one acknowledged batch, as a tablet
    // whose acknowledgement was lost would).
    let server = Running::start(&dir);
    let pending: Vec<AccessEvent> = batches
        .iter()
        .flatten()
        .filter(|e| !before_restart.contains(&e.event_id))
        .cloned()
        .collect();
    for chunk in pending.chunks(500).chain(std::iter::once(&batches[0][..])) {
        let ack = post(&device.client, &server.base, chunk).await.unwrap();
        assert_eq!(ack.stored.len(), chunk.len());
        acked.lock().unwrap().extend(ack.stored);
    }
    assert_eq!(*acked.lock().unwrap(), sent);

    // Every notice in the right mailbox, exactly once.
    let env_like = |base: &str, token: &str, ods: &str| {
        let (http, base, token, ods) = (
            http.clone(),
            base.to_owned(),
            token.to_owned(),
            ods.to_owned(),
        );
        async move {
            let mut all = Vec::new();
            let mut after = String::new();
            loop {
                let page: cpis_protocol::mailbox::NotificationPage = http
                    .get(format!(
                        "{base}/v1/councils/{ods}/notifications?limit=1000&after={after}"
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                all.extend(page.notifications.into_iter().map(|n| n.event_id));
                match page.next {
                    Some(n) => after = n,
                    None => return all,
                }
            }
        }
    };
    for (ods, token) in [(LEICS, &leics_token), (NOTTS, &notts_token)] {
        let got = env_like(&server.base, token, ods).await;
        let unique: BTreeSet<EventId> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "{ods}: a notice appears twice");
        assert_eq!(&unique, &expected[ods], "{ods}: notices lost or misplaced");
    }
    drop(server);

    // The stored set equals the sent set, each event once in the audit log.
    let store = SqliteStore::open(&dir.join("cpis.db")).unwrap();
    let stored: Vec<EventId> = store.event_ids().await.unwrap();
    assert_eq!(stored.len(), sent.len());
    assert_eq!(stored.into_iter().collect::<BTreeSet<_>>(), sent);
    for id in sent.iter().step_by(7) {
        let audit = store.audit_entries(*id).await.unwrap();
        let stored_entries = audit.iter().filter(|a| a.action == "event_stored").count();
        assert_eq!(stored_entries, 1);
    }
}

#[test]
fn a_second_serve_on_the_same_sqlite_dir_is_refused_naming_the_first_and_a_kill_frees_it() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().join("data");
    server::init(&dir, &["localhost".into()]).unwrap();
    let mut first = Running::start(&dir);
    let pid = first.child.id();
    let second = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("CPIS_METRICS_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("is already being served by another cpis-sync-server (pid ")
            && stderr.contains(&format!("pid {pid} since")),
        "{stderr}"
    );
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    // The first one still serves; once it is killed (no clean exit), the dir is free again.
    first.kill9();
    let again = Running::start(&dir);
    assert!(again.base.starts_with("https://localhost:"));
}
