//! `cpis-demo --no-wait` end to end: the walkthrough runs on loopback within a bound and
//! prints each step's outcome — a flagged answer, a not-flagged answer, the reason an invalid
//! number is refused, and the notice arriving in the mailbox of the council whose flag was
//! shown — then stops everything cleanly.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// The whole walkthrough (debug build, 2,000 flags) must finish within this.
const BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_walks_through_every_step_and_stops_cleanly() {
    let dir = tempfile::TempDir::new().unwrap();
    let out_dir = dir.path().join("demo");
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_cpis-demo"))
        .args(["--no-wait", "--flags", "2000", "--seed"])
        .arg(cpis_field_tests::seed::pick().to_string())
        .arg("--dir")
        .arg(&out_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(BOUND, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("cpis-demo did not finish within {BOUND:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "cpis-demo failed ({}):\n{stderr}",
        out.status
    );
    eprintln!(
        "[demo] walkthrough in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
    };
    // Every step ran: the server served, uploads, enrolment, a snapshot, the cut and back.
    line("Server serving on https://127.0.0.1:");
    line("rows, ");
    assert!(line("Tablet enrolled through the proxy").contains("master key in a file (file:"));
    line("First sync (snapshot)");
    line("Network CUT");
    // Two lookups and one FHIR search recorded (the typo records nothing).
    assert!(line("while cut: outbox").contains("outbox 3 events pending"));
    line("Network RESTORED");
    assert!(line("Events uploaded").contains("outbox 0 pending"));

    // The three lookups.
    assert!(line("Lookup 999").ends_with("answer: FLAGGED"));
    assert!(stdout.lines().any(|l| l.ends_with("answer: NOT FLAGGED")));
    assert!(
        line("a typo in the last digit")
            .contains("400 nhs_number_check_digit_mismatch \"NHS number check digit is")
    );

    // The FHIR search of the same child: a searchset with its CareTeam(s).
    assert!(line("FHIR: GET /cpis/FHIR/R4/CareTeam").contains("Bundle searchset, total "));
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("CareTeam ") && l.contains("(active)"))
    );

    // Each council whose flag was shown got the notice (a child may be flagged by several).
    let councils: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains("Council: "))
        .filter_map(|l| {
            l.rsplit_once('(')
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(code, _)| code.to_owned())
        })
        .collect();
    assert!(!councils.is_empty());
    let flagged = line("Lookup 999")
        .split_once("Lookup ")
        .unwrap()
        .1
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let notices: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("notice for "))
        .collect();
    for council in &councils {
        assert!(
            notices
                .iter()
                .any(|n| n.contains(&format!("({council})")) && n.contains(&flagged)),
            "no notice for {flagged} at council {council} in {notices:?}"
        );
    }
    let expected = match councils.len() {
        1 => ": 1 notice".to_owned(),
        n => format!(": {n} notices"),
    };
    assert!(line("Council mailbox").contains(&expected), "{expected}");

    // The three pages answered and are listed, with where to sign in.
    assert!(line("Paramedic page: http://127.0.0.1:").contains("staff id once per shift"));
    assert!(line("Council inbox: https://").contains(".token"));
    let fleet = line("Trust fleet: https://");
    let token = fleet
        .split("the token in ")
        .nth(1)
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no token file in {fleet:?}"));
    assert!(
        std::fs::read_to_string(token)
            .unwrap()
            .starts_with("cpis_at_"),
        "{token}"
    );

    // Stopped cleanly, files kept.
    let stopped = line("Stopped in ");
    assert!(
        stopped.contains("agent stopped (exit status: 0), server stopped (exit status: 0)"),
        "{stopped}"
    );
    assert!(out_dir.join("server.log").is_file());
    assert!(out_dir.join("tablet").is_dir());
}
