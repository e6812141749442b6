//! Partial snapshot downloads, sealed at rest (DESIGN §2 rule 6: a compressed body is still
//! plaintext, so not one byte of it is written to disk in the clear).
//!
//! One file, `downloads/snapshot.sealed`:
//!
//! ```text
//! magic "CPISDL\0\x01"
//! u32 LE n, seal(signed metadata envelope, AAD = "download\0header")      n bytes
//! u32 LE n, seal(body bytes [0, k),        AAD = "download\0chunk\0" ‖ id ‖ 0u64 LE)
//! u32 LE n, seal(body bytes [k, 2k),       AAD = "download\0chunk\0" ‖ id ‖ 1u64 LE)
//! ...
//! ```
//!
//! Sealing is XChaCha20-Poly1305 under the `download` subkey (random 24-byte nonce per
//! chunk); `id` is SHA-256 of the signed metadata envelope, so a chunk only opens at its own
//! index in its own download: chunks cannot be reordered, dropped from the middle or moved
//! between downloads. Chunks hold [`CHUNK`] bytes of body except the last one written before
//! an interruption, which holds what had arrived.
//!
//! On open, the header must hold the identical signed metadata (otherwise the download starts
//! again), and the chunks are read in order until the first one that is cut short (a crash
//! mid-write) or does not open; the file is truncated there. The resume offset is the number
//! of body bytes in the chunks that opened.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::keystore::{KeyError, Sealer};

/// Body bytes per sealed chunk.
pub const CHUNK: usize = 64 * 1024;
/// Name of the sealed partial download inside the downloads directory.
pub const FILE_NAME: &str = "snapshot.sealed";
const MAGIC: &[u8; 8] = b"CPISDL\0\x01";
const HEADER_AAD: &[u8] = b"download\0header";
/// Ceiling on one sealed record (header or chunk) read back from disk.
const MAX_RECORD: usize = 1024 * 1024;

/// Why a partial download could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("download file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing a download chunk: {0}")]
    Seal(#[from] KeyError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn chunk_aad(id: &[u8; 32], index: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(15 + 32 + 8);
    aad.extend_from_slice(b"download\0chunk\0");
    aad.extend_from_slice(id);
    aad.extend_from_slice(&index.to_le_bytes());
    aad
}

/// Splits one length-prefixed record off the front of `rest`; `None` if it is cut short.
fn record(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let len_bytes: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let body = rest.get(4..4 + len)?;
    Some((body, &rest[4 + len..]))
}

fn framed(sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + sealed.len());
    // A sealed record is at most CHUNK plus 40 bytes, or an envelope of a few hundred bytes.
    out.extend_from_slice(
        &u32::try_from(sealed.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(sealed);
    out
}

/// An open partial download of one signed snapshot.
#[derive(Debug)]
pub struct SealedDownload {
    path: PathBuf,
    file: File,
    sealer: Sealer,
    id: [u8; 32],
    /// Length of the magic and sealed header.
    header_len: u64,
    /// Index of the next chunk to seal.
    next_index: u64,
    /// Body bytes held in sealed chunks on disk.
    sealed_len: u64,
    /// Body bytes received but not sealed yet (less than one chunk).
    pending: Vec<u8>,
}

impl SealedDownload {
    /// Opens the partial download of the snapshot described by `envelope` (the signed
    /// metadata, as bytes) in `dir`, or starts a new one. Returns it and the body bytes
    /// already held (those of the chunks that open, in order). Anything else in `dir` — a
    /// download of other metadata, files of an older layout — is removed.
    pub fn open(
        dir: &Path,
        sealer: &Sealer,
        envelope: &[u8],
    ) -> Result<(Self, Vec<u8>), DownloadError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        let path = dir.join(FILE_NAME);
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name() != FILE_NAME {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        fs::remove_dir_all(&p)
                    } else {
                        fs::remove_file(&p)
                    };
                }
            }
        }
        let id: [u8; 32] = Sha256::digest(envelope).into();
        let existing = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let file = opts.open(&path).map_err(io(&path))?;
        let mut dl = Self {
            path,
            file,
            sealer: sealer.clone(),
            id,
            header_len: 0,
            next_index: 0,
            sealed_len: 0,
            pending: Vec::new(),
        };
        let mut body = Vec::new();
        match dl.resume(&existing, envelope, &mut body) {
            Some(valid_end) => {
                dl.file.set_len(valid_end).map_err(io(&dl.path))?;
                dl.file
                    .seek(SeekFrom::Start(valid_end))
                    .map_err(io(&dl.path))?;
            }
            None => {
                body.clear();
                dl.start(envelope)?;
            }
        }
        Ok((dl, body))
    }

    /// Reads back a previous download of the same envelope: the end of its last valid chunk,
    /// or `None` if the file is not one (missing, other metadata, damaged header).
    fn resume(&mut self, bytes: &[u8], envelope: &[u8], body: &mut Vec<u8>) -> Option<u64> {
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (sealed_header, mut rest) = record(rest)?;
        if self.sealer.open(sealed_header, HEADER_AAD).ok()? != envelope {
            return None;
        }
        self.header_len = (bytes.len() - rest.len()) as u64;
        let mut end = self.header_len;
        while let Some((sealed, after)) = record(rest) {
            let Ok(plain) = self
                .sealer
                .open(sealed, &chunk_aad(&self.id, self.next_index))
            else {
                break;
            };
            body.extend_from_slice(&plain);
            self.next_index += 1;
            self.sealed_len += plain.len() as u64;
            end += (rest.len() - after.len()) as u64;
            rest = after;
        }
        Some(end)
    }

    /// Truncates the file and writes a new header (index 0, nothing held).
    fn start(&mut self, envelope: &[u8]) -> Result<(), DownloadError> {
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&framed(&self.sealer.seal(envelope, HEADER_AAD)?));
        self.file.set_len(0).map_err(io(&self.path))?;
        self.file.seek(SeekFrom::Start(0)).map_err(io(&self.path))?;
        self.file.write_all(&head).map_err(io(&self.path))?;
        self.file.sync_all().map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        self.header_len = head.len() as u64;
        self.next_index = 0;
        self.sealed_len = 0;
        self.pending.clear();
        Ok(())
    }

    /// Body bytes held (sealed or pending): where a resumed request starts.
    pub fn len(&self) -> u64 {
        self.sealed_len + self.pending.len() as u64
    }

    /// Whether no body byte is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Discards every body byte held (the server sent the whole body again), keeping the
    /// header.
    pub fn restart(&mut self) -> Result<(), DownloadError> {
        self.pending.clear();
        self.file.set_len(self.header_len).map_err(io(&self.path))?;
        self.file
            .seek(SeekFrom::Start(self.header_len))
            .map_err(io(&self.path))?;
        self.next_index = 0;
        self.sealed_len = 0;
        Ok(())
    }

    /// Appends body bytes; every full [`CHUNK`] is sealed and written.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<(), DownloadError> {
        while !bytes.is_empty() {
            let take = (CHUNK - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == CHUNK {
                self.seal_pending()?;
            }
        }
        Ok(())
    }

    fn seal_pending(&mut self) -> Result<(), DownloadError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let sealed = self
            .sealer
            .seal(&self.pending, &chunk_aad(&self.id, self.next_index))?;
        self.file
            .write_all(&framed(&sealed))
            .map_err(io(&self.path))?;
        self.next_index += 1;
        self.sealed_len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Seals what is pending (a short chunk) and makes the file durable, so the next
    /// attempt resumes from [`Self::len`]. Called when the body is complete and when the
    /// transfer is interrupted.
    pub fn flush(&mut self) -> Result<(), DownloadError> {
        self.seal_pending()?;
        self.file.sync_all().map_err(io(&self.path))
    }

    /// Removes the downloads directory (after an install, a rejection or an oversize body).
    pub fn remove_all(dir: &Path) {
        let _ = fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::MasterKey;

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn write(dir: &Path, sealer: &Sealer, env: &[u8], data: &[u8], pieces: usize) -> u64 {
        let (mut dl, held) = SealedDownload::open(dir, sealer, env).unwrap();
        assert!(held.is_empty());
        for part in data.chunks(data.len().div_ceil(pieces).max(1)) {
            dl.append(part).unwrap();
        }
        dl.flush().unwrap();
        dl.len()
    }

    #[test]
    fn resumes_what_was_written_and_holds_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().derive();
        let data = body(3 * CHUNK + 1234);
        assert_eq!(
            write(dir.path(), &keys.download, b"env-1", &data, 7),
            data.len() as u64
        );
        let file = fs::read(dir.path().join(FILE_NAME)).unwrap();
        for w in data.chunks(64) {
            assert!(!file.windows(w.len()).any(|x| x == w));
        }
        assert!(!file.windows(5).any(|x| x == b"env-1"));
        let (mut dl, held) = SealedDownload::open(dir.path(), &keys.download, b"env-1").unwrap();
        assert_eq!(held, data);
        assert_eq!(dl.len(), data.len() as u64);
        // A short chunk in the middle (an interruption) is fine: appending continues after it.
        dl.append(b"more").unwrap();
        dl.flush().unwrap();
        let (_, held) = SealedDownload::open(dir.path(), &keys.download, b"env-1").unwrap();
        assert_eq!(&held[data.len()..], b"more");
    }

    #[test]
    fn torn_final_chunk_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().derive();
        let data = body(2 * CHUNK + 500);
        write(dir.path(), &keys.download, b"env", &data, 3);
        let path = dir.path().join(FILE_NAME);
        let full = fs::metadata(&path).unwrap().len();
        // Cut into the last chunk (500 bytes + 44 of framing and tag), and into its length.
        for cut in [full - 1, full - 300, full - 542] {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let (dl, held) = SealedDownload::open(dir.path(), &keys.download, b"env").unwrap();
            assert_eq!(held, data[..2 * CHUNK]);
            assert_eq!(dl.len(), 2 * CHUNK as u64);
            drop(dl);
            // The torn tail was truncated away; rewrite the last chunk for the next cut.
            let (mut dl, _) = SealedDownload::open(dir.path(), &keys.download, b"env").unwrap();
            dl.append(&data[2 * CHUNK..]).unwrap();
            dl.flush().unwrap();
        }
        // A flipped bit in the second chunk keeps only the first.
        let mut bytes = fs::read(&path).unwrap();
        let second = bytes.len() - 544 - 100;
        bytes[second] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let (_, held) = SealedDownload::open(dir.path(), &keys.download, b"env").unwrap();
        assert_eq!(held, data[..CHUNK]);
    }

    #[test]
    fn chunks_cannot_be_reordered_or_moved_between_downloads() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().derive();
        let data = body(3 * CHUNK);
        write(dir.path(), &keys.download, b"env-a", &data, 3);
        let path = dir.path().join(FILE_NAME);
        let bytes = fs::read(&path).unwrap();
        let rec = 4 + 24 + CHUNK + 16;
        let chunks_at = bytes.len() - 3 * rec;
        // Swap chunks 0 and 1: nothing opens.
        let mut swapped = bytes.clone();
        swapped[chunks_at..chunks_at + 2 * rec].rotate_left(rec);
        fs::write(&path, &swapped).unwrap();
        let (dl, held) = SealedDownload::open(dir.path(), &keys.download, b"env-a").unwrap();
        assert!(held.is_empty() && dl.is_empty());
        drop(dl);
        // Chunks of download A after the header of download B (same key): none opens.
        write(dir.path(), &keys.download, b"env-b", &body(10), 1);
        let b_bytes = fs::read(&path).unwrap();
        let b_header = b_bytes.len() - (4 + 24 + 10 + 16);
        let mut mixed = b_bytes[..b_header].to_vec();
        mixed.extend_from_slice(&bytes[chunks_at..]);
        fs::write(&path, &mixed).unwrap();
        let (_, held) = SealedDownload::open(dir.path(), &keys.download, b"env-b").unwrap();
        assert!(held.is_empty());
        // Another device's key, or other signed metadata: the download starts again.
        write(dir.path(), &keys.download, b"env-a", &data, 3);
        let other = MasterKey::generate().derive();
        let (_, held) = SealedDownload::open(dir.path(), &other.download, b"env-a").unwrap();
        assert!(held.is_empty());
        write(dir.path(), &keys.download, b"env-a", &data, 3);
        let (_, held) = SealedDownload::open(dir.path(), &keys.download, b"env-c").unwrap();
        assert!(held.is_empty());
    }

    #[test]
    fn restart_and_stray_files() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKey::generate().derive();
        // A plaintext part file of the older layout goes on open.
        fs::write(dir.path().join("snapshot-1-9.part"), b"old plaintext").unwrap();
        write(dir.path(), &keys.download, b"env", &body(CHUNK + 5), 2);
        assert!(!dir.path().join("snapshot-1-9.part").exists());
        let (mut dl, held) = SealedDownload::open(dir.path(), &keys.download, b"env").unwrap();
        assert_eq!(held.len(), CHUNK + 5);
        dl.restart().unwrap();
        dl.append(b"abc").unwrap();
        dl.flush().unwrap();
        let (_, held) = SealedDownload::open(dir.path(), &keys.download, b"env").unwrap();
        assert_eq!(held, b"abc");
        SealedDownload::remove_all(dir.path());
        assert!(!dir.path().exists());
    }
}
