//! Several replicas on one PostgreSQL database, each serving its own copy of one data dir:
//! versions stay gap-free and in commit order under concurrent uploads through different
//! replicas, an enrolment token is used once however it is raced, a page session works and
//! ends on every replica, a tablet waiting on one replica hears of an upload through another,
//! and a replica that loses its database says so and recovers.
//!
//! Each test starts a throw-away PostgreSQL cluster of its own (scripts/postgres-start.sh),
//! which it stops and removes when it ends.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cpis_protocol::api::codes;
use cpis_protocol::{Change, FlagKey};
use cpis_sync_server::server;
use cpis_sync_server::store::Store as _;
use tempfile::TempDir;

use crate::feed::{delta, open_delta};
use crate::harness::*;
use crate::pages::Browser;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// A PostgreSQL cluster of this test's own, stopped and removed on drop.
pub struct Cluster {
    dir: TempDir,
    pub url: String,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = TempDir::new().unwrap();
        let out = std::process::Command::new("bash")
            .arg(script("postgres-start.sh"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres-start.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Cluster { dir, url }
    }

    /// Stops the server (`fast`: connections are cut, as when PostgreSQL restarts).
    pub fn stop(&self) {
        let status = std::process::Command::new("bash")
            .arg(script("postgres-stop.sh"))
            .arg(self.dir.path())
            .args(["--mode", "fast"])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        let out = std::process::Command::new("bash")
            .arg(script("postgres-start.sh"))
            .arg(self.dir.path())
            .arg("--restart")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script("postgres-stop.sh"))
            .arg(self.dir.path())
            .args(["--remove", "--mode", "immediate"])
            .output();
    }
}

/// Copies a data dir as `cp -a` would (modes kept).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::metadata(from).unwrap().permissions()).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A data dir initialised on a new database of `cluster`, and `n` replicas serving copies
/// of it.
pub async fn replicas(cluster: &Cluster, n: usize) -> Vec<Env> {
    replicas_with(cluster, n, |_| {}).await
}

/// [`replicas`], each configured by `tweak`.
pub async fn replicas_with(
    cluster: &Cluster,
    n: usize,
    tweak: impl Fn(&mut cpis_sync_server::config::Config),
) -> Vec<Env> {
    let first = TempDir::new().unwrap();
    let hostnames = ["localhost".to_owned(), "127.0.0.1".to_owned()];
    server::init_with(first.path(), &hostnames, Some(&cluster.url))
        .await
        .unwrap();
    let mut dirs = Vec::new();
    for _ in 1..n {
        let copy = TempDir::new().unwrap();
        copy_dir(first.path(), copy.path());
        dirs.push(copy);
    }
    let mut envs = vec![Env::serve(first, &tweak).await];
    for dir in dirs {
        envs.push(Env::serve(dir, &tweak).await);
    }
    envs
}

/// What a tablet holds: its version and its flags' keys.
#[derive(Default)]
struct Tablet {
    version: u64,
    flags: BTreeSet<FlagKey>,
}

/// Follows deltas through `env` until it answers 204 (at head); every delta must start
/// where the tablet is, so no version is skipped or seen out of order.
async fn sync(env: &Env, d: &Device, t: &mut Tablet) {
    loop {
        let r = delta(env, d, t.version).await;
        if r.status() == 204 {
            return;
        }
        let (meta, body) = open_delta(d, r).await;
        assert_eq!(
            meta.from_version, t.version,
            "a delta starts where the tablet is"
        );
        assert!(meta.to_version > t.version);
        let mut last = t.version;
        for vc in body.changes {
            assert!(vc.version > last, "changes come in version order");
            last = vc.version;
            match vc.change {
                Change::Upsert(f) => {
                    t.flags.insert(f.key());
                }
                Change::Remove(k) => {
                    t.flags.remove(&k);
                }
                Change::Contacts(_) => {}
            }
        }
        t.version = meta.to_version;
    }
}

/// Uploads of the n-th round.
const ROUNDS: u32 = 12;

/// `ods` uploads a list growing by three flags (subjects from `base`) [`ROUNDS`] times;
/// returns each receipt's version and counts itself `done`.
async fn upload_rounds(
    env: &Env,
    token: &str,
    ods: &str,
    base: u32,
    done: &AtomicUsize,
) -> Vec<u64> {
    let mut versions = Vec::new();
    for round in 1..=ROUNDS {
        let rows: Vec<(u32, &str, &str, &str)> = (0..round * 3)
            .map(|i| (base + i, "CPP", "2024-01-01", ""))
            .collect();
        let r = env.upload(token, ods, &csv(&rows)).await;
        assert_eq!(r.status(), 200);
        let receipt: serde_json::Value = r.json().await.unwrap();
        versions.push(receipt["version"].as_u64().unwrap());
    }
    done.fetch_add(1, Ordering::SeqCst);
    versions
}

#[tokio::test]
async fn uploads_through_two_replicas_get_consecutive_versions_and_every_tablet_gets_every_flag() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 2).await;
    let (a, b) = (&reps[0], &reps[1]);
    a.seed().await;
    let leics = a.council_token(LEICS).await;
    let notts = b.council_token(NOTTS).await;
    let mut tablets = Vec::new();
    for i in 0..4 {
        tablets.push((reps[i % 2].enrol(EM).await, Tablet::default()));
    }

    // Each council uploads a growing list 12 times, Leicestershire through one replica and
    // Nottinghamshire through the other, at the same moments, while the tablets sync in a
    // loop through both replicas in turn.
    let done = AtomicUsize::new(0);
    let syncing = async {
        let mut rounds = 0usize;
        while done.load(Ordering::SeqCst) < 2 {
            for (i, (d, t)) in tablets.iter_mut().enumerate() {
                let before = t.version;
                sync(&reps[(i + rounds) % 2], d, t).await;
                assert!(t.version >= before);
            }
            rounds += 1;
        }
        rounds
    };
    let (mut versions, from_b, rounds) = tokio::join!(
        upload_rounds(a, &leics, LEICS, 0, &done),
        upload_rounds(b, &notts, NOTTS, 1000, &done),
        syncing
    );
    versions.extend(from_b);

    // Every upload added three flags: versions are gap-free from 1 to the head.
    let head = a.store().head_version().await.unwrap();
    assert_eq!(
        head,
        u64::from(ROUNDS * 3 * 2),
        "one version per change, no gaps"
    );
    let changes = a
        .store()
        .region_changes(EM.parse().unwrap(), 0)
        .await
        .unwrap()
        .unwrap();
    let logged: Vec<u64> = changes.changes.iter().map(|c| c.version).collect();
    assert_eq!(logged, (1..=head).collect::<Vec<_>>());
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(
        versions.len(),
        (ROUNDS * 2) as usize,
        "every upload its own head"
    );

    // Every tablet, through either replica, ends with every flag of both councils.
    let mut expected = BTreeSet::new();
    for ods in [LEICS, NOTTS] {
        for f in a.store().council_flags(council(ods)).await.unwrap() {
            expected.insert(f.key());
        }
    }
    assert_eq!(expected.len(), (ROUNDS * 3 * 2) as usize);
    for (i, (d, t)) in tablets.iter_mut().enumerate() {
        sync(&reps[i % 2], d, t).await;
        sync(&reps[(i + 1) % 2], d, t).await;
        assert_eq!(t.version, head);
        assert_eq!(t.flags, expected, "tablet {i} holds every flag");
    }
    eprintln!("tablets synced {rounds} rounds while the uploads ran");
}

#[tokio::test]
async fn an_enrolment_token_raced_through_two_replicas_is_used_once() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 2).await;
    reps[0].seed().await;
    for round in 0..3 {
        let token = reps[round % 2].enrolment_token(EM, 1).await;
        let attempts = (0..8).map(|i| reps[i % 2].enrol_with(&token));
        let results = futures_util::future::join_all(attempts).await;
        let mut ok = 0;
        for (r, _) in results {
            match r.status().as_u16() {
                200 => ok += 1,
                403 => {
                    let body: cpis_protocol::api::ErrorBody = r.json().await.unwrap();
                    assert_eq!(body.error.code, codes::TOKEN_USED_UP);
                }
                s => panic!("unexpected {s}"),
            }
        }
        assert_eq!(ok, 1, "round {round}: one use, one tablet");
    }
    assert_eq!(reps[1].store().devices().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_page_session_signed_in_on_one_replica_works_and_ends_on_every_replica() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 2).await;
    let (a, b) = (&reps[0], &reps[1]);
    a.seed().await;
    let token = a.council_token(LEICS).await;
    let mut browser = Browser::new(a);
    let signed_in = browser.sign_in("/council", &token).await;
    assert_eq!(signed_in.status, 303);
    assert_eq!(browser.get("/council/inbox").await.status, 200);

    // The other replica knows the session and acts on it.
    browser.switch_to(b);
    let inbox = browser.get("/council/inbox").await;
    assert_eq!(inbox.status, 200, "signed in on the other replica too");
    let out = browser
        .post("/council/sign-out", &[("csrf", &inbox.csrf())])
        .await;
    assert_eq!(out.status, 303);

    // Signed out there: signed out here.
    browser.switch_to(a);
    let page = browser.get("/council/inbox").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/council");
}

#[tokio::test]
async fn a_replica_without_its_database_answers_503_and_serves_again_when_it_returns() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 2).await;
    let a = &reps[0];
    a.seed().await;
    let leics = a.council_token(LEICS).await;
    let d = a.enrol(EM).await;
    let r = a
        .upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    let mut t = Tablet::default();
    sync(a, &d, &mut t).await;
    assert_eq!(t.version, 1);

    cluster.stop();
    for env in &reps {
        let (status, body) = healthz(env).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("database unreachable"), "{body}");
    }
    // A request that needs the database is refused as retryable, never answered stale.
    let r = delta(a, &d, 0).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: cpis_protocol::api::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, codes::DATABASE_UNAVAILABLE);

    // A replica started while the database is away waits for it, saying why.
    let copy = TempDir::new().unwrap();
    copy_dir(a.dir.path(), copy.path());
    let late = Env::serve(copy, |_| {}).await;
    let (status, body) = healthz(&late).await;
    assert_eq!(status, 503);
    assert!(body.contains("not serving yet"), "{body}");

    cluster.restart();
    for env in reps.iter().chain(std::iter::once(&late)) {
        wait_healthy(env).await;
    }
    let r = a
        .upload(
            &leics,
            LEICS,
            &csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-02-01", "")]),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut t2 = Tablet::default();
    sync(&late, &d, &mut t2).await;
    assert_eq!(t2.version, 2);
    assert_eq!(t2.flags.len(), 2);
}

async fn healthz(env: &Env) -> (u16, String) {
    let r = env.client().get(env.url("/healthz")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits (up to a minute: the retry backoff grows to 30 s) until `/healthz` answers 200.
async fn wait_healthy(env: &Env) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = healthz(env).await;
        if status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unhealthy after a minute: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_signing_key_rolled_over_on_one_replica_signs_on_every_replica() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 2).await;
    let (a, b) = (&reps[0], &reps[1]);
    a.seed().await;
    let d = b.enrol(EM).await;
    let pinned = d.enrolment.signing_public_key;
    let rolled = cpis_sync_server::keys::roll(a.dir.path(), a.store(), a.clock_now())
        .await
        .unwrap();
    assert_eq!(rolled.previous, pinned);
    assert!(
        !b.dir
            .path()
            .join("feed-signing-keys")
            .join(format!("{}.pem", rolled.next))
            .exists(),
        "the other replica's copy never saw the new key's file"
    );
    // Within the key re-check interval each replica signs with the new key.
    for env in [a, b] {
        env.clock.advance(chrono::Duration::seconds(
            cpis_sync_server::keys::KEY_RECHECK.num_seconds() + 1,
        ));
        let r = d
            .client
            .get(env.url(cpis_protocol::api::paths::CHECKPOINT))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let signed = cpis_protocol::SignedMessage::from_bytes(&r.bytes().await.unwrap()).unwrap();
        signed
            .open::<cpis_protocol::Checkpoint>(rolled.next.verifying_key())
            .expect("signed by the rolled-over key");
    }
    // A replica restarted from its copy signs with the new key too.
    let dir = reps.into_iter().nth(1).unwrap().stop().await;
    let again = Env::serve(dir, |_| {}).await;
    let r = d
        .client
        .get(again.url(cpis_protocol::api::paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    let signed = cpis_protocol::SignedMessage::from_bytes(&r.bytes().await.unwrap()).unwrap();
    signed
        .open::<cpis_protocol::Checkpoint>(rolled.next.verifying_key())
        .expect("signed by the rolled-over key after a restart");
}

/// PostgreSQL 15's client programs (scripts/install-postgres.sh installs them).
fn pg_tool(name: &str) -> PathBuf {
    Path::new("/usr/lib/postgresql/15/bin").join(name)
}

#[tokio::test]
async fn a_dump_restored_into_a_new_cluster_serves_the_same_head_version() {
    let cluster = Cluster::start();
    let reps = replicas(&cluster, 1).await;
    let a = &reps[0];
    a.seed().await;
    let leics = a.council_token(LEICS).await;
    let d = a.enrol(EM).await;
    for round in 1..=3u32 {
        let rows: Vec<(u32, &str, &str, &str)> = (0..round * 4)
            .map(|i| (i, "CPP", "2024-01-01", ""))
            .collect();
        assert_eq!(a.upload(&leics, LEICS, &csv(&rows)).await.status(), 200);
    }
    let head = a.store().head_version().await.unwrap();
    let mut before = Tablet::default();
    sync(a, &d, &mut before).await;

    // The backup PROVISIONING.md describes: pg_dump's custom format, restored with
    // pg_restore into an empty database of a new cluster.
    let dump = TempDir::new().unwrap();
    let file = dump.path().join("cpis.dump");
    let out = std::process::Command::new(pg_tool("pg_dump"))
        .args(["--format=custom", "--file"])
        .arg(&file)
        .arg(&cluster.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = Cluster::start();
    let out = std::process::Command::new(pg_tool("pg_restore"))
        .args(["--no-owner", "--exit-on-error", "--dbname"])
        .arg(&fresh.url)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A replica's copy of the data dir, pointed at the restored database.
    let copy = TempDir::new().unwrap();
    copy_dir(a.dir.path(), copy.path());
    let url = fresh.url.clone();
    let restored = Env::serve(copy, move |c| c.database_url = Some(url)).await;
    assert_eq!(restored.store().head_version().await.unwrap(), head);
    let mut after = Tablet::default();
    sync(&restored, &d, &mut after).await;
    assert_eq!(
        after.version, head,
        "the restored replica serves the same head"
    );
    assert_eq!(after.flags, before.flags);
    // The tablet already at the head is told so by the restored replica.
    assert_eq!(delta(&restored, &d, head).await.status(), 204);
}

#[tokio::test]
async fn a_tablet_waiting_on_one_replica_hears_of_an_upload_through_another() {
    let cluster = Cluster::start();
    // Heads re-read only every minute: PostgreSQL's notification must wake replica b.
    let envs = replicas_with(&cluster, 2, |c| c.live_recheck_millis = 60_000).await;
    let (a, b) = (&envs[0], &envs[1]);
    a.seed().await;
    let leics = a.council_token(LEICS).await;
    let d = b.enrol(EM).await;
    let head = b
        .store()
        .region_head(EM.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    let held = crate::live::wait(b, &d, head.epoch, head.version, 30);
    let upload = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = a
            .upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
            .await;
        assert_eq!(r.status(), 200);
    };
    let (r, ()) = tokio::join!(held, upload);
    let cp = crate::live::answered(&d, r).await;
    let took = started.elapsed();
    assert!(
        cp.head_version > head.version,
        "answered with the upload's head"
    );
    assert!(
        took < Duration::from_secs(20),
        "woken by the notification, not the 30 s wait nor the 60 s re-read: {took:?}"
    );
    for env in envs {
        env.stop().await;
    }
}
