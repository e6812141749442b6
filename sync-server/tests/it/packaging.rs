//! The Debian packages: builds `cpis-sync-server` and `cpis-agent` .deb files with cargo-deb
//! from the binaries already built for this test's profile (no release build), checks their
//! contents, control fields and maintainer scripts, and runs `systemd-analyze verify` on the
//! shipped units. The tools come from `packaging/install-tools.sh` (idempotent; installs
//! cargo-deb 3.8.0 and systemd if missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Variables cargo sets for a running test; they must not reach a nested cargo, whose build
/// scripts track some of them (a difference rebuilds dependencies).
fn set_by_cargo_for_tests(key: &str) -> bool {
    const EXACT: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    EXACT.contains(&key)
        || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || key.starts_with("CARGO_CFG_")
        || key.starts_with("__CARGO")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_tests) {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The target dir and cargo profile of this test executable (`<T>/<dir>/deps/it-…`).
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let target = profile_dir.parent().unwrap();
    assert!(
        target.join("CACHEDIR.TAG").exists(),
        "no cargo target dir above {} (cross builds are not supported here)",
        exe.display()
    );
    let dir = profile_dir.file_name().unwrap().to_str().unwrap();
    let profile = match dir {
        "debug" => "dev",
        other => other,
    };
    (target.to_owned(), profile.to_owned())
}

#[test]
fn both_debian_packages_hold_binaries_units_config_and_user() {
    let started = std::time::Instant::now();
    run(Command::new("sh")
        .arg(workspace().join("packaging/install-tools.sh"))
        .current_dir(workspace()));
    let (target, profile) = target_and_profile();
    // Under `cargo test --workspace` both binaries are already built: about a second.
    let mut build = cargo();
    build
        .args([
            "build",
            "--locked",
            "--bins",
            "-p",
            "cpis-sync-server",
            "-p",
            "cpis-agent",
        ])
        .arg("--target-dir")
        .arg(&target);
    if profile != "dev" {
        build.args(["--profile", &profile]);
    }
    run(&mut build);

    let out = tempfile::TempDir::new().unwrap();
    let mut debs = Vec::new();
    for package in ["cpis-sync-server", "cpis-agent"] {
        let built = run(cargo()
            .args([
                "deb",
                "-p",
                package,
                "--no-build",
                "--fast",
                "--profile",
                &profile,
            ])
            .arg("-o")
            .arg(out.path())
            .env("CARGO_TARGET_DIR", &target));
        let path = PathBuf::from(text(&built).trim().lines().last().unwrap().trim());
        assert!(
            path.exists(),
            "{package}: {} was not written",
            path.display()
        );
        debs.push((package, path));
    }

    let units = tempfile::TempDir::new().unwrap();
    for (package, deb) in &debs {
        let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(deb)));
        let mut expected = vec![
            format!("./usr/bin/{package}"),
            format!("./lib/systemd/system/{package}.service"),
            format!("./usr/lib/sysusers.d/{package}.conf"),
            format!("./usr/share/doc/{package}/PROVISIONING.md"),
        ];
        if *package == "cpis-sync-server" {
            expected.push("./etc/cpis/server.toml".into());
        }
        for path in &expected {
            assert!(
                listing.lines().any(|l| l.ends_with(path.as_str())),
                "{package}: {path} missing from\n{listing}"
            );
        }
        assert!(
            listing.lines().any(
                |l| l.starts_with("-rwxr-xr-x") && l.ends_with(&format!("./usr/bin/{package}"))
            ),
            "{package}: the binary is not executable"
        );

        let field = |name: &str| {
            text(&run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name)))
                .trim()
                .to_owned()
        };
        assert_eq!(field("Package"), *package);
        assert!(field("Depends").contains("adduser | systemd"));
        assert_eq!(field("Architecture"), "amd64");

        let control = out.path().join(format!("{package}-control"));
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
        let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
        assert!(postinst.contains(&format!("systemd-sysusers {package}.conf")));
        assert!(postinst.contains("adduser --system"));
        assert!(postinst.contains(&format!("/var/lib/{package}")));
        for script in ["prerm", "postrm"] {
            assert!(control.join(script).exists(), "{package}: no {script}");
        }
        if *package == "cpis-sync-server" {
            let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
            assert!(conffiles.contains("/etc/cpis/server.toml"));
        }

        // The shipped unit, with ExecStart pointing at the shipped binary (verify checks
        // that the command exists and is executable).
        let tree = out.path().join(format!("{package}-tree"));
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree));
        let unit =
            std::fs::read_to_string(tree.join(format!("lib/systemd/system/{package}.service")))
                .unwrap();
        for hardening in [
            "User=cpis",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "Restart=on-failure",
            &format!("StateDirectory={package}"),
        ] {
            assert!(unit.contains(hardening), "{package}: {hardening:?} missing");
        }
        let bin_dir = format!("{}/", tree.join("usr/bin").display());
        std::fs::write(
            units.path().join(format!("{package}.service")),
            unit.replace("/usr/bin/", &bin_dir),
        )
        .unwrap();
    }
    let server_unit =
        std::fs::read_to_string(units.path().join("cpis-sync-server.service")).unwrap();
    assert!(
        server_unit
            .contains("serve --data-dir /var/lib/cpis-sync-server --config /etc/cpis/server.toml")
    );

    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.path().join("cpis-sync-server.service"))
        .arg(units.path().join("cpis-agent.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        verify.status
    );
    eprintln!("packaging test took {:?}", started.elapsed());
}
