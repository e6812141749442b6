//! The command line: `init` refuses an existing data dir; `admin` works while serving.

use std::process::{Command, Output};

use cpis_protocol::api::UploadReceipt;

use crate::harness::*;

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = bin(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn init_refuses_an_existing_dir_and_admin_works_while_serving() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap();
    ok(&["init", "--data-dir", d, "--hostname", "localhost"]);
    assert!(dir.join("server.toml").exists());
    let again = bin(&["init", "--data-dir", d]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    // Serve the data dir in-process while the binary administers it.
    let tempdir = tempfile::TempDir::new_in(tmp.path()).unwrap();
    std::fs::remove_dir(tempdir.path()).unwrap();
    std::fs::rename(&dir, tempdir.path()).unwrap();
    let d = tempdir.path().to_str().unwrap().to_owned();
    let env = Env::serve(tempdir, |_| {}).await;

    let a = |rest: &[&str]| {
        let mut args = vec!["admin", "--data-dir", d.as_str()];
        args.extend_from_slice(rest);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |rest: &[&str]| {
        let args = a(rest);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs)
    };
    run(&[
        "trust",
        "add",
        "--ods",
        "RX9",
        "--name",
        "East Midlands Ambulance",
    ]);
    run(&[
        "region",
        "add",
        "--id",
        "EM",
        "--name",
        "East Midlands",
        "--neighbour-council",
        LANCS,
    ]);
    run(&[
        "council",
        "add",
        "--ods",
        LEICS,
        "--name",
        "Leicestershire",
        "--region",
        "EM",
        "--emergency-phone",
        "0116 305 0005",
        "--office-phone",
        "0116 305 0500",
    ]);
    let token = run(&["council", "token", "--ods", LEICS]).trim().to_owned();
    assert!(token.starts_with("cpis_ct_"));

    let r = env
        .upload(&token, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    let receipt: UploadReceipt = r.json().await.unwrap();
    assert_eq!(receipt.counts.added, 1);

    let et = run(&[
        "enrolment-token",
        "--trust",
        "RX9",
        "--region",
        "EM",
        "--uses",
        "2",
        "--ttl",
        "1h",
    ]);
    let et = et.trim().to_owned();
    assert!(et.starts_with("cpis_et_"));
    // The manual clock is at t0 while the CLI uses the wall clock: enrol via the API uses t0,
    // which is before the token's expiry.
    let (r, _) = env.enrol_with(&et).await;
    assert_eq!(r.status(), 200);

    // Enrolment tokens are listed by id (never the secret) and can be revoked by it.
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["enrolment-token", "list", "--json"])).unwrap();
    let tokens = listed["enrolment_tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{listed}");
    let token_id = tokens[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(token_id.len(), 16);
    assert_eq!(tokens[0]["uses_left"], 1);
    assert_eq!(tokens[0]["state"], "live");
    assert!(
        !listed.to_string().contains(&et),
        "the secret is never listed"
    );
    let table = run(&["enrolment-token", "list"]);
    assert!(
        table.contains(&token_id) && table.contains("live"),
        "{table}"
    );
    assert!(run(&["enrolment-token", "revoke", "--token-id", &token_id]).contains("revoked"));
    let (r, _) = env.enrol_with(&et).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<cpis_protocol::api::ErrorBody>()
            .await
            .unwrap()
            .error
            .code,
        cpis_protocol::api::codes::ENROLMENT_TOKEN_REVOKED
    );
    assert!(run(&["enrolment-token", "list"]).contains("revoked"));
    assert!(
        run(&["enrolment-token", "revoke", "--token-id", &token_id]).contains("already revoked")
    );
    let unknown = bin(&a(&[
        "enrolment-token",
        "revoke",
        "--token-id",
        "0123456789abcdef",
    ])
    .iter()
    .map(String::as_str)
    .collect::<Vec<_>>());
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("does not exist"));
    // The token's id is printed when it is made.
    let made = bin(&a(&["enrolment-token", "--trust", "RX9", "--region", "EM"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(made.status.success());
    let said = String::from_utf8_lossy(&made.stderr);
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["enrolment-token", "list", "--json"])).unwrap();
    let newest = listed["enrolment_tokens"][0]["id"].as_str().unwrap();
    assert!(said.contains(newest), "{said}");

    let listed = run(&["device", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let id = v["devices"][0]["device_id"].as_str().unwrap().to_owned();
    assert_eq!(v["devices"][0]["region"], "EM");
    assert!(run(&["device", "revoke", "--device", &id]).contains("revoked"));
    let listed = run(&["device", "list"]);
    assert!(listed.contains("revoked"));

    // Bad input exits 2 with a message.
    let bad = bin(&a(&["trust", "add", "--ods", "rx9", "--name", "x"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(bad.status.code(), Some(2));
    let dup = bin(&a(&["trust", "add", "--ods", "RX9", "--name", "x"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(dup.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let missing = bin(&a(&["council", "token", "--ods", "E99999999"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(missing.status.code(), Some(2));
    env.stop().await;
}

#[test]
fn every_command_has_help_describing_it_and_each_option() {
    let commands: &[&[&str]] = &[
        &["init"],
        &["serve"],
        &["admin"],
        &["admin", "trust", "add"],
        &["admin", "region", "set-neighbours"],
        &["admin", "council", "add"],
        &["admin", "enrolment-token"],
        &["admin", "enrolment-token", "list"],
        &["admin", "enrolment-token", "revoke"],
        &["admin", "council", "token"],
        &["admin", "council", "revoke-tokens"],
        &["admin", "trust", "token"],
        &["admin", "trust", "revoke-tokens"],
        &["admin", "device", "list"],
        &["admin", "device", "revoke"],
        &["admin", "mailbox", "list"],
        &["admin", "signing-key", "roll"],
        &["admin", "signing-key", "show"],
        &["admin", "tls", "rotate-server-cert"],
        &["admin", "tls", "status"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let help = ok(&args);
        assert!(
            !help.lines().next().unwrap_or("").starts_with("Usage"),
            "{command:?} has no description"
        );
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("--") && !line.contains("--help") {
                let next = lines.get(i + 1).map_or("", |l| l.trim());
                assert!(!next.is_empty(), "{command:?}: {line} is not described");
            }
        }
    }
}
