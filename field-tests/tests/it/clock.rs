//! The tablet's clock jumped 30 days forward or 2 days back, with the real `cpis-agent` binary
//! run under Debian's libfaketime (`LD_PRELOAD`, `FAKETIME=+29d|+30d|-2d`; installed by
//! `scripts/install-faketime.sh` when missing). libfaketime moves the wall clock the agent
//! reads (`clock_gettime(CLOCK_REALTIME)`, hence `SystemTime`, rustls' certificate checks and
//! the checkpoint expiry check) but not `/proc/uptime` and the kernel boot id, which are file
//! reads: the agent's boot clock stays true, as it does when a user changes a tablet's date.
//! `FAKETIME_DONT_FAKE_MONOTONIC=1` keeps the monotonic clock (tokio's timers) true as well.
//!
//! The freshness rule under test (DESIGN.md §2 rule 2, `agent/src/freshness.rs`): within the
//! boot of the last verification the age of the data is the boot clock's real elapsed time
//! since it, plus how old the checkpoint was at verification by the tablet's clock (about
//! zero here); the wall clock and the high-water mark are not used, so a clock moved either
//! way changes nothing. After a reboot the rule is the conservative one: the largest of
//! `now − as_of`, `now − verified_local` and `high_water − verified_local`, where the
//! high-water mark holds the best estimate of the true time at each lookup (not a jumped wall
//! clock). The server's policy is made short (fresh 3 s, expiry 1 day; wipe 30 days as by
//! default) so that real seconds matter. Each freshness assertion marked "[wall]" would fail
//! if the agent judged age by its wall clock (`now − as_of`, `now − verified_local`).
//!
//! Three scenarios: the clock 30 days ahead (no wipe, real-time age, `clock_ahead`, the sync
//! refused yet the notices delivered), then put right (`cpis-agent` commands with
//! `FAKETIME`); 2 days back, a sync, the clock put right, and staged reboots
//! (`scripts/as-rebooted.sh` under `unshare --mount`, when the machine allows it); and the
//! clock moved back and forth under a running `cpis-agent run` (`FAKETIME_TIMESTAMP_FILE`,
//! re-read at every call with `FAKETIME_NO_CACHE=1`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cpis_field_tests::harness::process::Cmd;
use cpis_field_tests::harness::{ADMIN_TIMEOUT, Tablet, bins};
use cpis_protocol::local::LookupResponse;
use cpis_protocol::mailbox::Notification;
use cpis_protocol::{EventId, Freshness, LookupResult, NhsNumber};

use crate::common::{self, Field, Notices};

const FLAGS: usize = 400;
const FRESH_SECS: u64 = 3;
const EXPIRY_SECS: u64 = 86_400;
const DAY: u64 = 86_400;
/// The default wipe age, which the scenario keeps.
const WIPE_SECS: u64 = 30 * DAY;

/// Where libfaketime is, installed by the repository's script when missing.
fn libfaketime() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-faketime.sh");
        let out = std::process::Command::new("sh")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        PathBuf::from(path.lines().last().unwrap_or_default())
    })
}

/// The same tablet with its wall clock moved by `offset` (libfaketime syntax: `+30d`, `-2d`).
fn with_clock(tablet: &Tablet, offset: &str) -> Tablet {
    tablet
        .clone()
        .with_env("LD_PRELOAD", libfaketime())
        .with_env("FAKETIME", offset)
        .with_env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
}

fn has_warning(answer: &LookupResponse, code: &str) -> bool {
    answer.warnings.iter().any(|w| w.code == code)
}

/// A server with a short freshness policy, a tablet enrolled and synced, the flagged numbers
/// it holds and a number nobody flags.
async fn setup(scenario: &str) -> (Field, Tablet, Vec<NhsNumber>, NhsNumber, Notices) {
    // Installing libfaketime first: a failure names the script.
    eprintln!("[{scenario}] libfaketime at {}", libfaketime().display());
    let seed = common::seed(scenario);
    let mut field = Field::start(seed, FLAGS).await;
    let config = field.server.data_dir().join("server.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let short = text
        .replace("fresh_secs = 86400", &format!("fresh_secs = {FRESH_SECS}"))
        .replace(
            "expiry_secs = 604800",
            &format!("expiry_secs = {EXPIRY_SECS}"),
        );
    assert!(
        short.contains(&format!("fresh_secs = {FRESH_SECS}\n"))
            && short.contains(&format!("expiry_secs = {EXPIRY_SECS}\n"))
            && short.contains(&format!("wipe_secs = {WIPE_SECS}\n")),
        "server.toml's policy is not the default one: {text}"
    );
    std::fs::write(&config, short).unwrap();
    field.server.stop().await.unwrap();
    field.server.start().await.unwrap();
    let tablet = field.enrol("tablet", &field.server.base_url()).await;
    let flagged = field.sample_flagged(3);
    let expected = field.expected();
    let nobody = *cpis_fixtures::test_nhs_numbers()
        .iter()
        .rev()
        .find(|n| !expected.flagged.contains(n))
        .unwrap();
    (field, tablet, flagged, nobody, Notices::default())
}

/// The notifications councils hold for these events (read before they are acknowledged).
async fn notices_for(field: &Field, events: &[EventId]) -> Vec<Notification> {
    let mut out = Vec::new();
    for council in field.councils.values() {
        out.extend(
            council
                .notifications()
                .await
                .unwrap()
                .into_iter()
                .filter(|n| events.contains(&n.event_id)),
        );
    }
    out
}

/// Checks an age against the real seconds since the sync: at most those seconds (plus one for
/// rounding), and a freshness that matches it under the short policy — never `expired`.
/// [wall] — with the wall clock days away, an agent judging by it would be days out.
fn by_real_time(answer_age: u64, freshness: Freshness, since_sync: Duration, what: &str) {
    let real = since_sync.as_secs() + 1;
    assert!(
        answer_age <= real,
        "{what}: age {answer_age} s, {real} s of real time since the sync"
    );
    let want = if answer_age <= FRESH_SECS {
        Freshness::Fresh
    } else {
        Freshness::Stale
    };
    assert_eq!(freshness, want, "{what}: age {answer_age} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_30_days_ahead_ages_the_data_by_real_time() {
    let (mut field, tablet, flagged, nobody, mut notices) = setup("clock-ahead").await;
    let seed = field.seed;
    let started = Instant::now();
    let synced = tablet.sync().await.unwrap();
    let synced_at = Instant::now();
    let version = synced.version;
    let as_of = synced.data_as_of.unwrap();
    let subjects = field.expected().subjects();

    // True clock, just verified: fresh.
    let first = tablet.lookup_offline(&flagged[0]).await.unwrap();
    notices.record(&first);
    assert_eq!(first.result, LookupResult::Flagged, "seed {seed}");
    assert_eq!(first.freshness, Freshness::Fresh, "seed {seed}");

    // The server out of reach; the tablet clock 30 days ahead (the wipe age by the wall
    // clock). Same boot: the boot clock knows only seconds have passed — the data is judged
    // by them, nothing is wiped, a miss is still `not_flagged`, and the answer warns about
    // the clock. [wall]
    field.server.stop().await.unwrap();
    let ahead30 = with_clock(&tablet, "+30d");
    let a = ahead30.lookup_offline(&flagged[1]).await.unwrap();
    notices.record(&a);
    assert_eq!(a.result, LookupResult::Flagged, "seed {seed}");
    let age = a.data_age_secs.unwrap();
    by_real_time(age, a.freshness, synced_at.elapsed(), "+30 d");
    assert_eq!(a.data_as_of, Some(as_of), "seed {seed}");
    let ahead_warning = a
        .warnings
        .iter()
        .find(|w| w.code == "clock_ahead")
        .unwrap_or_else(|| panic!("no clock_ahead warning: {:?}", a.warnings));
    assert!(
        ahead_warning.message.contains("30 days ahead"),
        "{ahead_warning:?}"
    );
    let miss = ahead30.lookup_offline(&nobody).await.unwrap();
    notices.record(&miss);
    assert_eq!(miss.result, LookupResult::NotFlagged, "seed {seed}");
    by_real_time(
        miss.data_age_secs.unwrap(),
        miss.freshness,
        synced_at.elapsed(),
        "+30 d miss",
    );
    let st = ahead30.status().await.unwrap();
    assert_eq!(
        (st.version, st.subjects),
        (version, subjects),
        "nothing wiped 30 days ahead in the same boot (seed {seed})"
    );
    // Real seconds pass: stale by them (the age moves with real time, not stuck at zero).
    if let Some(wait) = Duration::from_secs(FRESH_SECS + 1).checked_sub(synced_at.elapsed()) {
        tokio::time::sleep(wait).await;
    }
    let later = ahead30.lookup_offline(&flagged[2]).await.unwrap();
    notices.record(&later);
    let age_later = later.data_age_secs.unwrap();
    assert_eq!(later.freshness, Freshness::Stale, "seed {seed}");
    assert!(age_later > FRESH_SECS, "age {age_later} s (seed {seed})");
    by_real_time(
        age_later,
        later.freshness,
        synced_at.elapsed(),
        "+30 d later",
    );

    // The clock put back right: the same real-time age, no clock warning. [wall]
    let back = tablet.lookup_offline(&nobody).await.unwrap();
    notices.record(&back);
    assert_eq!(back.result, LookupResult::NotFlagged, "seed {seed}");
    by_real_time(
        back.data_age_secs.unwrap(),
        back.freshness,
        synced_at.elapsed(),
        "clock right",
    );
    assert!(
        !has_warning(&back, "clock_ahead") && !has_warning(&back, "clock_behind"),
        "{:?}",
        back.warnings
    );

    // The server back, the clock 30 days ahead again: TLS is fine (the server certificate
    // is valid for 10 years) but the checkpoint (valid 24 h) is expired by the tablet's clock,
    // so the feed is refused (freeze protection, rule 5), naming the clock as the likely
    // cause. The access events still go, over the same connection.
    field.server.start().await.unwrap();
    let lookups = notices.lookups as u64;
    assert_eq!(
        tablet.status().await.unwrap().outbox_pending,
        lookups,
        "seed {seed}"
    );
    let received_from = Utc::now() - chrono::Duration::seconds(1);
    let out = ahead30.try_sync().await.unwrap();
    let received_to = Utc::now() + chrono::Duration::seconds(1);
    assert!(
        !out.success(),
        "a sync 30 days ahead succeeded (seed {seed})"
    );
    assert!(
        out.stderr.contains("checkpoint expired at")
            && out
                .stderr
                .contains("the tablet clock looks 30 days ahead of the server's time"),
        "sync 30 days ahead: {}",
        out.stderr
    );
    let error_line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert_eq!(
        error_line.matches("the checkpoint expired at").count(),
        1,
        "the error printed once: {}",
        out.stderr
    );
    eprintln!(
        "[clock-ahead] sync with the clock 30 days ahead: exit {:?}: {}",
        out.code(),
        out.stderr.trim()
    );
    let st = tablet.status().await.unwrap();
    assert_eq!(
        (st.version, st.subjects, st.outbox_pending),
        (version, subjects, 0),
        "feed refused, data kept, every event sent (seed {seed})"
    );
    // At the councils already: every flagged lookup's notice, the ones made 30 days ahead
    // carrying the tablet's claimed time, marked clock_suspect, with the server's receipt
    // time beside it; the one made on a true clock is not suspect.
    let flagged_events = [first.event_id, a.event_id, later.event_id];
    let seen = notices_for(&field, &flagged_events).await;
    let delivered_ahead = seen.len();
    assert_eq!(delivered_ahead, notices.owed(), "{seen:?} (seed {seed})");
    let within = |t: DateTime<Utc>| received_from <= t && t <= received_to;
    let ahead = seen.iter().find(|n| n.event_id == a.event_id).unwrap();
    let honest = seen.iter().find(|n| n.event_id == first.event_id).unwrap();
    assert!(
        ahead.clock_suspect && within(ahead.received_at),
        "{ahead:?}"
    );
    assert!(
        ahead.accessed_at - ahead.received_at
            >= chrono::Duration::days(30) - chrono::Duration::minutes(1),
        "{ahead:?}"
    );
    assert!(
        !honest.clock_suspect && within(honest.received_at),
        "{honest:?}"
    );
    assert!(honest.accessed_at <= honest.received_at, "{honest:?}");

    // The clock corrected: the sync works, the data is fresh again, nothing left to send.
    let again = tablet.sync().await.unwrap();
    assert!(again.version >= Some(field.head), "seed {seed}");
    assert_eq!(again.events_sent, 0, "seed {seed}");
    let fresh = tablet.lookup_offline(&flagged[2]).await.unwrap();
    notices.record(&fresh);
    assert_eq!(
        (fresh.result, fresh.freshness),
        (LookupResult::Flagged, Freshness::Fresh),
        "seed {seed}"
    );
    tablet.sync().await.unwrap();
    let delivered = notices
        .check_delivered(&field, "after the clock jump")
        .await;
    assert_eq!(delivered, notices.owed(), "seed {seed}");
    eprintln!(
        "[clock-ahead] +30 d, same boot: age {age} s then {age_later} s (real time), not wiped, \
         clock_ahead warned; clock right: same age; sync 30 d ahead refused (checkpoint \
         expired, the clock named) but {lookups} events sent and {delivered_ahead} notices \
         delivered (the +30 d ones clock_suspect, accessed_at {} vs received_at {}); clock corrected: v{:?}, fresh; \
         {delivered} notices once each; {:?}",
        ahead.accessed_at,
        ahead.received_at,
        again.version,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_2_days_back_never_makes_the_data_fresher() {
    let (field, tablet, flagged, nobody, mut notices) = setup("clock-back").await;
    let seed = field.seed;
    let started = Instant::now();
    let synced = tablet.sync().await.unwrap();
    let synced_at = Instant::now();
    let version = synced.version;
    let as_of = synced.data_as_of.unwrap();

    // Real time passes beyond the fresh age, then the clock goes 2 days back. The boot clock
    // (same boot) still counts the real seconds: stale, not fresh. [wall]
    tokio::time::sleep(Duration::from_secs(FRESH_SECS + 1)).await;
    let behind = with_clock(&tablet, "-2d");
    let b = behind.lookup_offline(&flagged[0]).await.unwrap();
    let real = synced_at.elapsed().as_secs();
    notices.record(&b);
    assert_eq!(b.result, LookupResult::Flagged, "seed {seed}");
    assert_eq!(b.freshness, Freshness::Stale, "seed {seed}");
    let age = b.data_age_secs.unwrap();
    assert!(
        (FRESH_SECS + 1..=real + 1).contains(&age),
        "age {age} s, {real} s after the sync, clock 2 days back (seed {seed})"
    );
    assert!(has_warning(&b, "data_stale"), "{:?}", b.warnings);
    assert!(has_warning(&b, "clock_behind"), "{:?}", b.warnings);
    assert_eq!(b.data_as_of, Some(as_of), "seed {seed}");
    let st = behind.status().await.unwrap();
    assert_eq!(st.freshness, Freshness::Stale, "seed {seed}");
    let miss = behind.lookup_offline(&nobody).await.unwrap();
    notices.record(&miss);
    assert_eq!(miss.result, LookupResult::NotFlagged, "seed {seed}");

    // A sync 2 days back against a server certificate issued just now: `init` back-dates it
    // by one day only, so the tablet finds it not yet valid and the TLS handshake fails. The
    // data stays as it was.
    let out = behind.try_sync().await.unwrap();
    assert!(!out.success(), "seed {seed}");
    assert!(
        out.stderr.contains("NotValidYet") || out.stderr.contains("not valid yet"),
        "sync 2 days back against a new certificate: {}",
        out.stderr
    );
    eprintln!(
        "[clock-back] sync 2 days back, server certificate issued today: exit {:?}: {}",
        out.code(),
        out.stderr.trim()
    );
    let st = behind.status().await.unwrap();
    assert_eq!((st.version, st.data_as_of), (version, Some(as_of)));

    // A server certificate issued a week ago, as in service: the product's own
    // `admin tls rotate-server-cert` run with its clock 7 days back.
    Cmd::new(&bins().unwrap().server)
        .arg("admin")
        .arg("--data-dir")
        .arg(field.server.data_dir())
        .args(["tls", "rotate-server-cert"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", "-7d")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .run(ADMIN_TIMEOUT)
        .await
        .unwrap();
    // A new verified checkpoint still counts, 2 days back: the data is as of the server's
    // new time, and fresh again. (The running server presents the new certificate from its
    // next handshake.)
    let resynced = behind.sync().await.unwrap();
    let resynced_at = Instant::now();
    assert!(resynced.data_as_of.unwrap() > as_of, "seed {seed}");
    assert_eq!(resynced.events_sent, notices.lookups as u64, "seed {seed}");
    let f = behind.lookup_offline(&flagged[1]).await.unwrap();
    notices.record(&f);
    assert_eq!(f.freshness, Freshness::Fresh, "seed {seed}");
    assert!(f.data_age_secs.unwrap() <= resynced_at.elapsed().as_secs() + 1);

    // The clock put right, 2 days forward, same boot: data verified while the tablet clock
    // was 2 days behind is as old as the real seconds since that sync (the boot clock), not
    // 2 days (`now − verified_local`), and the clock, now right, is not reported as ahead.
    // [wall]
    let right = tablet.lookup_offline(&nobody).await.unwrap();
    notices.record(&right);
    assert_eq!(right.result, LookupResult::NotFlagged, "seed {seed}");
    let age_right = right.data_age_secs.unwrap();
    by_real_time(
        age_right,
        right.freshness,
        resynced_at.elapsed(),
        "clock put right after a sync 2 days back",
    );
    assert!(
        !has_warning(&right, "clock_ahead") && !has_warning(&right, "clock_behind"),
        "{:?}",
        right.warnings
    );
    let fixed = tablet.sync().await.unwrap();
    assert!(fixed.data_as_of > resynced.data_as_of, "seed {seed}");
    let f = tablet.lookup_offline(&flagged[2]).await.unwrap();
    notices.record(&f);
    assert_eq!(f.freshness, Freshness::Fresh, "seed {seed}");

    // Reboots (staged): after a jump 30 days ahead within the boot, a reboot with the clock
    // 2 days back — the high-water mark (the true time of the last lookup, not the jumped
    // wall clock) holds the age; then a reboot with the clock 2 days ahead — no boot clock to
    // compare, so the conservative rule: 2 days older. [wall]
    let reboot = reboot_case(&field, &tablet, &flagged, &mut notices).await;

    // What the council sees: a lookup made 2 days back carries the tablet's time, 2 days
    // before the server received it; the server marks only clocks ahead (or before 2024) as
    // suspect, so it is not marked: received_at, the server's clock, is the bound.
    tablet.sync().await.unwrap();
    let seen = notices_for(&field, &[b.event_id]).await;
    let n = &seen[0];
    assert!(!n.clock_suspect, "{n:?}");
    let lag = n.received_at - n.accessed_at;
    assert!(
        lag >= chrono::Duration::days(2)
            && lag <= chrono::Duration::days(2) + chrono::Duration::minutes(2),
        "{n:?}"
    );
    let delivered = notices
        .check_delivered(&field, "after the clock jump")
        .await;
    assert_eq!(delivered, notices.owed(), "seed {seed}");
    eprintln!(
        "[clock-back] −2 d: stale at {age} s (boot clock), sync refused by TLS (certificate \
         issued today: not yet valid), sync done with a week-old certificate: fresh; clock \
         put right: {:?} at {age_right} s (real time); reboot: {reboot}; {delivered} \
         notices once each (the −2 d one received {lag} after its tablet time, not \
         clock_suspect); {:?}",
        right.freshness,
        started.elapsed()
    );
}

/// The reboot case, when this machine lets the test stage one (root, `unshare --mount`):
/// returns what happened.
async fn reboot_case(
    field: &Field,
    tablet: &Tablet,
    flagged: &[NhsNumber],
    notices: &mut Notices,
) -> String {
    let seed = field.seed;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/as-rebooted.sh");
    let boot_id = field.path("reboot.boot_id");
    let uptime = field.path("reboot.uptime");
    std::fs::write(&boot_id, "0b0b0b0b-0000-4000-8000-000000000001\n").unwrap();
    std::fs::write(&uptime, "5.00 5.00\n").unwrap();
    let launcher = [
        "unshare".into(),
        "--mount".into(),
        "sh".into(),
        script.into_os_string(),
        boot_id.into_os_string(),
        uptime.into_os_string(),
    ];
    let probe = Cmd::new("unshare")
        .args(launcher[1..].iter())
        .arg("true")
        .output(Duration::from_secs(10))
        .await;
    match probe {
        Ok(o) if o.success() => {}
        other => {
            let why = match other {
                Ok(o) => o.stderr.trim().to_owned(),
                Err(e) => format!("{e:#}"),
            };
            eprintln!("[clock-back] reboot case NOT RUN: cannot stage a reboot here ({why})");
            return "not run (no unshare --mount here)".into();
        }
    }
    let synced = tablet.sync().await.unwrap();
    let synced_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(FRESH_SECS + 1)).await;
    // A lookup with the clock jumped 30 days ahead, same boot: judged by real time, and it
    // sets the high-water mark at the true time (verification + boot clock)...
    let jumped = with_clock(tablet, "+30d")
        .lookup_offline(&flagged[0])
        .await
        .unwrap();
    notices.record(&jumped);
    let hw_age = synced_at.elapsed().as_secs();
    assert_eq!(jumped.result, LookupResult::Flagged, "seed {seed}");
    by_real_time(
        jumped.data_age_secs.unwrap(),
        jumped.freshness,
        synced_at.elapsed(),
        "+30 d before a reboot",
    );
    // ... then the tablet reboots with its clock 2 days back: the boot clock no longer
    // compares, the high-water mark holds — stale at about the age of that lookup, neither
    // fresh (the wall clock) nor wiped (a high-water mark poisoned by the jump).
    let rebooted = with_clock(tablet, "-2d").with_launcher(launcher.clone());
    let r = rebooted.lookup_offline(&flagged[1]).await.unwrap();
    notices.record(&r);
    let age = r.data_age_secs.unwrap();
    assert_eq!(r.data_as_of, synced.data_as_of, "seed {seed}");
    assert_eq!(
        (r.result, r.freshness),
        (LookupResult::Flagged, Freshness::Stale),
        "seed {seed}"
    );
    assert!(
        (FRESH_SECS + 1..=hw_age + 1).contains(&age),
        "age {age} s after a reboot 2 days back, the high-water mark at {hw_age} s (seed {seed})"
    );
    // A reboot with the clock 2 days ahead: the conservative rule, 2 days older: expired.
    let ahead = with_clock(tablet, "+2d").with_launcher(launcher);
    let e = ahead.lookup_offline(&flagged[2]).await.unwrap();
    notices.record(&e);
    let age_ahead = e.data_age_secs.unwrap();
    let real = synced_at.elapsed().as_secs() + 2;
    assert_eq!(
        (e.result, e.freshness),
        (LookupResult::Flagged, Freshness::Expired),
        "seed {seed}"
    );
    assert!(
        (2 * DAY..=2 * DAY + real).contains(&age_ahead),
        "age {age_ahead} s after a reboot 2 days ahead, {real} s after the sync (seed {seed})"
    );
    format!(
        "+30 d same boot judged by real time; rebooted −2 d: stale at {age} s (high-water \
         mark); rebooted +2 d: expired at {age_ahead} s (conservative)"
    )
}

/// Sets the wall clock of agents reading `file` (libfaketime's `FAKETIME_TIMESTAMP_FILE`,
/// re-read at every call): written whole, then renamed into place.
fn set_clock(file: &Path, offset: &str) {
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, format!("{offset}\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_moved_under_a_running_agent() {
    let (mut field, tablet, flagged, _nobody, mut notices) = setup("clock-run").await;
    let seed = field.seed;
    let started = Instant::now();
    // `cpis-agent run` (local API and background loop) with a clock the test moves while it
    // runs; its monotonic clock (tokio's timers) stays true.
    let clock = field.path("clock.faketime");
    set_clock(&clock, "+0");
    let daemon_tablet = tablet
        .clone()
        .with_env("LD_PRELOAD", libfaketime())
        .with_env("FAKETIME_TIMESTAMP_FILE", &clock)
        .with_env("FAKETIME_NO_CACHE", "1")
        .with_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let mut daemon = daemon_tablet
        .run_api("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Its first sync (the loop starts with one).
    let first = cpis_field_tests::harness::process::poll(
        "the running agent's first sync",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let d = &daemon;
            async move {
                let st = d.status().await?;
                Ok(st.last_sync_success.and(st.version).map(|_| st))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log_tail(20)));
    let verified_by = Instant::now();
    assert_eq!(first.freshness, Freshness::Fresh, "seed {seed}");

    // Real seconds pass, then the clock goes 2 days back under the running agent: stale by
    // its boot clock. [wall]
    tokio::time::sleep(Duration::from_secs(FRESH_SECS + 1)).await;
    set_clock(&clock, "-2d");
    let st = daemon.status().await.unwrap();
    assert_eq!(st.freshness, Freshness::Stale, "seed {seed}");
    assert!(st.data_age_secs.unwrap() > FRESH_SECS, "seed {seed}");
    assert!(
        st.warnings.iter().any(|w| w.code == "clock_behind"),
        "{:?}",
        st.warnings
    );
    let behind = daemon.lookup(&flagged[0].to_string()).await.unwrap();
    notices.record(&behind);
    assert_eq!(
        (behind.result, behind.freshness),
        (LookupResult::Flagged, Freshness::Stale),
        "seed {seed}"
    );
    assert!(
        behind.data_age_secs.unwrap() <= verified_by.elapsed().as_secs() + 1,
        "seed {seed}"
    );

    // 30 days ahead under the running agent, the server reachable: the same boot, so the
    // data is judged by real time — kept, not expired, a flagged number answered from the
    // tablet's own data — and the API warns that the clock is ahead. [wall]
    set_clock(&clock, "+30d");
    let st = daemon.status().await.unwrap();
    assert_eq!(
        (st.version, st.subjects),
        (first.version, first.subjects),
        "nothing wiped 30 days ahead (seed {seed})"
    );
    by_real_time(
        st.data_age_secs.unwrap(),
        st.freshness,
        verified_by.elapsed(),
        "status under run, +30 d",
    );
    assert!(
        st.warnings.iter().any(|w| w.code == "clock_ahead"),
        "{:?}",
        st.warnings
    );
    let ahead = daemon.lookup(&flagged[1].to_string()).await.unwrap();
    notices.record(&ahead);
    assert_eq!(ahead.result, LookupResult::Flagged, "{ahead:?}");
    assert!(
        !ahead.flags.is_empty() && ahead.data_as_of == first.data_as_of,
        "answered from the tablet's data: {ahead:?}"
    );
    by_real_time(
        ahead.data_age_secs.unwrap(),
        ahead.freshness,
        verified_by.elapsed(),
        "lookup under run, +30 d",
    );
    assert!(has_warning(&ahead, "clock_ahead"), "{:?}", ahead.warnings);
    // Its syncs are refused at the checkpoint's expiry, naming the clock; the access events
    // are sent all the same.
    let refused = daemon.sync().await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("checkpoint expired at")
            && format!("{refused:#}").contains("the tablet clock looks 30 days ahead"),
        "sync 30 days ahead: {refused:#}"
    );
    let st = daemon.status().await.unwrap();
    assert_eq!(
        (st.version, st.subjects, st.outbox_pending),
        (first.version, first.subjects, 0),
        "feed refused, data kept, events sent (seed {seed})"
    );

    // The clock right again: a sync is accepted and the data is fresh again. (The loop's own
    // retry may get there first: then this sync finds the data up to date.)
    set_clock(&clock, "+0");
    let again = daemon.sync().await.unwrap();
    assert!(again.version >= Some(field.head), "{again:?} (seed {seed})");
    let st = daemon.status().await.unwrap();
    assert_eq!(st.subjects, field.expected().subjects(), "seed {seed}");
    let fresh = daemon.lookup(&flagged[2].to_string()).await.unwrap();
    notices.record(&fresh);
    assert_eq!(
        (fresh.result, fresh.freshness),
        (LookupResult::Flagged, Freshness::Fresh),
        "seed {seed}"
    );
    daemon.sync().await.unwrap();
    let status = daemon.stop().await.unwrap();
    assert!(status.success(), "cpis-agent run stopped with {status}");
    let delivered = notices
        .check_delivered(&field, "after the clock moves")
        .await;
    assert_eq!(delivered, notices.owed(), "seed {seed}");
    field.server.stop().await.unwrap();
    eprintln!(
        "[clock-run] under cpis-agent run: −2 d stale (boot clock), +30 d kept and judged by \
         real time (clock_ahead warned), syncs refused ({refused}) with the events sent, clock \
         right: synced to v{:?}, fresh; {delivered} notices once each; {:?}",
        again.version,
        started.elapsed()
    );
}
