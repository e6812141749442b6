//! Lookup benchmark: plaintext SQLite against SQLCipher (default cipher settings, a random
//! 256-bit passphrase given with `PRAGMA key`) on the same 200k flags, schema, probe set
//! and access pattern as the plaintext floor of `cargo bench -p cpis-agent --bench lookup`.
//!
//! Both tables are built by this binary with the SQLCipher-enabled library (an unkeyed
//! database is plain SQLite), so the ratio is measured against the floor of this run. The
//! agent's encrypted store is measured by the agent's own benchmark (that crate links plain
//! `bundled` SQLite and must never link SQLCipher); `run.sh` prints all three side by side.
//!
//! Output: human-readable lines, then `RESULT <name> p50_us=<f> p99_us=<f>` lines and
//! `RESULT build ...` (plaintext and SQLCipher build times) for `run.sh` and `benchmarks.sh`. `CPIS_BENCH_FLAGS` changes the number of flags (default 200000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use cpis_protocol::{FlagRecord, NhsNumber};
use rand::seq::SliceRandom as _;
use rand::{RngCore as _, SeedableRng as _};
use rusqlite::Connection;

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Opens (and, with `key`, keys) a database with the same pragmas as the agent's floor.
fn open(path: &Path, key: Option<&str>) -> Connection {
    let conn = Connection::open(path).unwrap();
    if let Some(k) = key {
        // A passphrase: SQLCipher derives the page key with its default KDF (PBKDF2-HMAC-
        // SHA512, 256000 iterations) once per open. Page size, HMAC and KDF are defaults.
        conn.pragma_update(None, "key", k).unwrap();
    }
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .unwrap();
    conn
}

/// The plaintext floor's schema: one row per flag, indexed by NHS number.
fn build(conn: &Connection, flags: &[FlagRecord]) {
    conn.execute_batch(
        "CREATE TABLE flags (nhs INTEGER NOT NULL, council TEXT NOT NULL, plan TEXT NOT NULL,
           start_date TEXT NOT NULL, end_date TEXT, dob TEXT, local_id TEXT);",
    )
    .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT INTO flags VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .unwrap();
        for f in flags {
            ins.execute(rusqlite::params![
                f.nhs_number.as_u64() as i64,
                f.council.as_str(),
                f.plan_type.as_str(),
                f.start_date.to_string(),
                f.end_date.map(|d| d.to_string()),
                f.date_of_birth.map(|d| d.to_string()),
                f.local_id,
            ])
            .unwrap();
        }
    }
    tx.execute_batch("CREATE INDEX flags_nhs ON flags (nhs);")
        .unwrap();
    tx.commit().unwrap();
}

/// The floor's read path: point query by NHS number, rows decoded into `FlagRecord`s.
fn lookup(conn: &Connection, n: NhsNumber) -> Vec<FlagRecord> {
    let mut st = conn
        .prepare_cached(
            "SELECT council, plan, start_date, end_date, dob, local_id FROM flags WHERE nhs = ?1",
        )
        .unwrap();
    st.query_map([n.as_u64() as i64], |r| {
        Ok(FlagRecord {
            council: r.get::<_, String>(0)?.parse().unwrap(),
            nhs_number: n,
            plan_type: r.get::<_, String>(1)?.parse().unwrap(),
            start_date: r.get::<_, String>(2)?.parse().unwrap(),
            end_date: r.get::<_, Option<String>>(3)?.map(|s| s.parse().unwrap()),
            date_of_birth: r.get::<_, Option<String>>(4)?.map(|s| s.parse().unwrap()),
            local_id: r.get(5)?,
        })
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn main() {
    let n: usize = std::env::var("CPIS_BENCH_FLAGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    // The same rows and probes as the agent's benchmark (same seed, region and draw order).
    let seed = 2026;
    let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
    let config = cpis_fixtures::Config::new(seed, day);
    let dir0 = cpis_fixtures::Directory::generate(&config).unwrap();
    let region = dir0.regions[0].id.clone();
    let ds = cpis_fixtures::Dataset::generate_region(&config, &region, n).unwrap();
    let flags: Vec<FlagRecord> = ds.flags().cloned().collect();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut subjects: Vec<NhsNumber> = flags.iter().map(|f| f.nhs_number).collect();
    subjects.dedup();
    let mut probes: Vec<NhsNumber> = subjects
        .choose_multiple(&mut rng, 20_000)
        .copied()
        .collect();
    let mut i = 0u32;
    while probes.len() < 25_000 {
        i += 1;
        let d = format!("{:06}", 900_000 + i);
        let mut nine = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
        for (j, c) in d.bytes().enumerate() {
            nine[3 + j] = c - b'0';
        }
        if let Some(x) = NhsNumber::complete(nine) {
            probes.push(x);
        }
    }
    probes.shuffle(&mut rng);

    let version: String = {
        let c = Connection::open_in_memory().unwrap();
        c.query_row("PRAGMA cipher_version", [], |r| r.get(0))
            .unwrap()
    };
    println!(
        "sqlcipher benchmark: {} flags, seed {seed}, SQLCipher {version}, SQLite {}",
        flags.len(),
        rusqlite::version()
    );

    let tmp = tempfile::tempdir().unwrap();
    let plain_path = tmp.path().join("plain.db");
    let cipher_path = tmp.path().join("cipher.db");
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let passphrase = hex::encode(raw);

    let t = Instant::now();
    let plain = open(&plain_path, None);
    build(&plain, &flags);
    let plain_build = t.elapsed();
    let t = Instant::now();
    let cipher = open(&cipher_path, Some(&passphrase));
    build(&cipher, &flags);
    let cipher_build = t.elapsed();
    // A fresh connection, as a tablet would open the store: pays the KDF once.
    drop(cipher);
    let t = Instant::now();
    let cipher = open(&cipher_path, Some(&passphrase));
    let count: i64 = cipher
        .query_row("SELECT count(*) FROM flags", [], |r| r.get(0))
        .unwrap();
    let cipher_open = t.elapsed();
    assert_eq!(count as usize, flags.len());
    let settings: Vec<String> = [
        "cipher_page_size",
        "kdf_iter",
        "cipher_hmac_algorithm",
        "cipher_kdf_algorithm",
    ]
    .iter()
    .map(|p| {
        let v: String = cipher
            .query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
            .unwrap();
        format!("{p}={v}")
    })
    .collect();
    println!(
        "sqlcipher: built in {:.0} ms; open + key + first query {:.0} ms; {}",
        cipher_build.as_secs_f64() * 1e3,
        cipher_open.as_secs_f64() * 1e3,
        settings.join(" ")
    );

    // The SQLCipher file really is encrypted: no SQLite header, no council code in clear.
    let bytes = std::fs::read(&cipher_path).unwrap();
    assert!(!bytes.starts_with(b"SQLite format 3"));
    let code = flags[0].council.as_str().as_bytes().to_vec();
    assert!(
        !contains(&bytes, &code),
        "council code in clear in SQLCipher file"
    );
    assert!(contains(&std::fs::read(&plain_path).unwrap(), &code));

    // Same answers.
    for p in probes.iter().take(2_000) {
        let mut a = lookup(&plain, *p);
        let mut b = lookup(&cipher, *p);
        a.sort();
        b.sort();
        assert_eq!(a, b);
    }
    // Warm up both, then interleave rounds so neither gets a warmer cache.
    let mut t_plain = Vec::with_capacity(probes.len());
    let mut t_cipher = Vec::with_capacity(probes.len());
    for round in 0..2 {
        for p in &probes {
            let t = Instant::now();
            std::hint::black_box(lookup(&plain, *p));
            let d1 = t.elapsed();
            let t = Instant::now();
            std::hint::black_box(lookup(&cipher, *p));
            let d2 = t.elapsed();
            if round == 1 {
                t_plain.push(d1);
                t_cipher.push(d2);
            }
        }
    }
    let (p50p, p99p) = (pct(t_plain.clone(), 0.5), pct(t_plain, 0.99));
    let (p50c, p99c) = (pct(t_cipher.clone(), 0.5), pct(t_cipher, 0.99));
    println!(
        "lookup, plaintext SQLite (floor):  p50 {:7.1} µs  p99 {:7.1} µs",
        us(p50p),
        us(p99p)
    );
    println!(
        "lookup, SQLCipher:                 p50 {:7.1} µs  p99 {:7.1} µs   ratio p50 {:.2}x  p99 {:.2}x",
        us(p50c),
        us(p99c),
        us(p50c) / us(p50p),
        us(p99c) / us(p99p)
    );
    println!(
        "RESULT plaintext p50_us={:.2} p99_us={:.2}",
        us(p50p),
        us(p99p)
    );
    println!(
        "RESULT sqlcipher p50_us={:.2} p99_us={:.2}",
        us(p50c),
        us(p99c)
    );
    println!(
        "RESULT build plaintext_ms={:.0} sqlcipher_ms={:.0} sqlcipher_open_ms={:.0}",
        plain_build.as_secs_f64() * 1e3,
        cipher_build.as_secs_f64() * 1e3,
        cipher_open.as_secs_f64() * 1e3
    );
}
