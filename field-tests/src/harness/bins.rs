//! Finding (and if need be building) the real `cpis-sync-server` and `cpis-agent` binaries.
//!
//! Cargo builds a dependency's binaries for an integration test only with unstable artifact
//! dependencies, and `CARGO_BIN_EXE_*` only names the test's own package's binaries. So the
//! first scenario to need them runs, once per test process,
//!
//! ```text
//! $CARGO build --locked -p cpis-sync-server -p cpis-agent --bins --target-dir <T> [--release|--profile P] [--target TRIPLE]
//! ```
//!
//! from the workspace root, with the target dir, profile and target triple read from where
//! the test executable itself lives (`<T>/[TRIPLE/]<profile>/deps/it-…`), and uses the
//! binaries from `<T>/[TRIPLE/]<profile>/`. Under `cargo test --workspace` they are already
//! up to date and this takes about a second. `CPIS_FIELD_BIN_DIR=/some/dir` skips the build
//! and uses the binaries found there (e.g. installed packages).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context as _, anyhow, bail};

/// Environment variable naming a directory that holds both binaries (no build then).
pub const BIN_DIR_ENV: &str = "CPIS_FIELD_BIN_DIR";

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    pub server: PathBuf,
    pub agent: PathBuf,
}

static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();

/// The binaries, built on first use (concurrent callers wait for the one build).
pub fn bins() -> anyhow::Result<&'static Bins> {
    BINS.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the binaries under test are not available: {e}"))
}

fn in_dir(dir: &Path) -> anyhow::Result<Bins> {
    let exe = |name: &str| {
        let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!("{} does not exist", p.display()))
        }
    };
    Ok(Bins {
        server: exe("cpis-sync-server")?,
        agent: exe("cpis-agent")?,
    })
}

/// Environment variables cargo sets when it runs a test (not user configuration such as
/// `CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_BUILD_*` or `CARGO_PROFILE_*`).
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

fn locate_or_build() -> anyhow::Result<Bins> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return in_dir(Path::new(&dir)).with_context(|| format!("{BIN_DIR_ENV} is set"));
    }
    let exe = std::env::current_exe().context("finding the test executable")?;
    let mut profile_dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", profile_dir.display()))?;
    }
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("cannot read the profile from {}", profile_dir.display()))?;
    let above = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", profile_dir.display()))?;
    // <T>/<profile> or <T>/<triple>/<profile>; the target dir root holds CACHEDIR.TAG.
    let (target_dir, triple) = if above.join("CACHEDIR.TAG").exists() {
        (above, None)
    } else {
        match above.parent() {
            Some(root) if root.join("CACHEDIR.TAG").exists() => (root, above.file_name()),
            _ => bail!(
                "cannot find the cargo target directory above {} (set {BIN_DIR_ENV})",
                exe.display()
            ),
        }
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("the field-tests package has no parent directory"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = std::process::Command::new(&cargo);
    // The variables cargo sets for the running test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR,
    // OUT_DIR, ...) must not reach the build: build scripts track some of them
    // (`rerun-if-env-changed`, e.g. ring's), and a difference would rebuild half the
    // dependency tree here and again in the next ordinary build.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_by_cargo_for_tests) {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace)
        .args(["build", "--locked", "--bins"])
        .args(["-p", "cpis-sync-server", "-p", "cpis-agent"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(triple) = triple {
        cmd.arg("--target").arg(triple);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        bail!(
            "`cargo build -p cpis-sync-server -p cpis-agent --bins` failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    in_dir(profile_dir)
}
