//! The product never links SQLCipher or OpenSSL: `cargo tree` over the whole workspace
//! (normal and build dependencies, from the committed lock file, offline) names no OpenSSL
//! crate and no SQLCipher source, and `libsqlite3-sys` has no `sqlcipher` feature. The
//! SQLCipher benchmark lives in `bench-workspace/`, a workspace of its own, for this reason.
//! Skipped (with a note) when cargo is not available.

use std::process::Command;

const FORBIDDEN: &[&str] = &["openssl", "openssl-sys", "openssl-src", "sqlcipher-src"];

#[test]
fn workspace_links_no_openssl_or_sqlcipher() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = match Command::new(&cargo)
        .current_dir(&root)
        .args([
            "tree",
            "--workspace",
            "-e",
            "normal,build",
            "--locked",
            "--offline",
            "--prefix",
            "none",
            "--format",
            "{p} [{f}]",
        ])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: cannot run {cargo:?}: {e}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let mut sqlite_seen = false;
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(!FORBIDDEN.contains(&name), "the workspace links {line}");
        if name == "libsqlite3-sys" {
            sqlite_seen = true;
            assert!(
                line.contains("bundled") && !line.contains("sqlcipher"),
                "libsqlite3-sys must be plain bundled SQLite: {line}"
            );
        }
    }
    assert!(sqlite_seen, "libsqlite3-sys not in the tree:\n{tree}");
    // The benchmark workspace is excluded, so its features never unify with ours.
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(r#"exclude = ["bench-workspace"]"#));
}
