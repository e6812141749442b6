//! A software TPM 2.0 (Debian's swtpm) for the tests, started by the project's own script
//! (`scripts/swtpm-start.sh`, which installs swtpm when missing) in a temporary directory
//! and stopped when dropped. Each one is a new TPM with its own seeds.

use std::process::Command;

pub(crate) struct Swtpm {
    dir: tempfile::TempDir,
    /// The TCTI to reach it (`swtpm:host=127.0.0.1,port=N`), for `CPIS_TPM2_TCTI`.
    pub(crate) tcti: String,
}

impl Swtpm {
    pub(crate) fn start() -> Swtpm {
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/swtpm-start.sh");
        let out = Command::new("sh")
            .arg(script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "swtpm-start.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tcti = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(tcti.starts_with("swtpm:host=127.0.0.1,port="), "{tcti}");
        Swtpm { dir, tcti }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("swtpm.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}
