//! The local API token and the enrolment token's source.
//!
//! The local API token lives in `STATE_DIR/api.token` (mode 0600, one line: `cpis_lt_` and 64
//! hex digits of OS randomness). `run` and `enrol` create it when it is missing; an ePR app on
//! the tablet reads it and sends `Authorization: Bearer <token>` to `/v1/*`. `run
//! --require-token` makes the token mandatory ([`LocalAuth::Required`]); without it a request
//! may leave the header out, but one that sends a wrong token is refused all the same
//! ([`LocalAuth::Checked`]), so a misconfigured app finds out at once. Tokens are compared in
//! constant time (an HMAC tag of each, checked with `verify_slice`). `wipe` (and a revoked
//! device's shred) destroys the file with the rest of the state.
//!
//! The enrolment token of `cpis-agent enrol` comes from exactly one of `--token`,
//! `--token-file FILE` (first line, trimmed) or `CPIS_ENROLMENT_TOKEN`
//! ([`enrolment_token`]): a token on the command line is visible in `ps` and shell history.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

/// File name of the local API token in the state directory.
pub const FILE_NAME: &str = "api.token";
/// Prefix of every local API token.
pub const PREFIX: &str = "cpis_lt_";
/// The environment variable that may hold the enrolment token.
pub const ENROLMENT_TOKEN_ENV: &str = "CPIS_ENROLMENT_TOKEN";

/// Where the local API token of a state directory lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Why the local API token could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum LocalTokenError {
    #[error("cannot read or write the local API token {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the local API token {0} is not one this agent made (expected `{PREFIX}` and 64 hex \
         digits); delete it and start the agent again to make a new one"
    )]
    Malformed(PathBuf),
    #[error(
        "the local API token {path} may be read or changed by any user (mode {mode:o}); \
         run `chmod 600 {path}`"
    )]
    WorldAccessible { path: PathBuf, mode: u32 },
}

/// The local API token. Its `Debug` does not show it.
#[derive(Clone)]
pub struct LocalToken {
    value: String,
    tag: Vec<u8>,
}

impl std::fmt::Debug for LocalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalToken(..)")
    }
}

fn tag(value: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"cpis-agent local api token")
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(value);
    m
}

impl LocalToken {
    fn from_value(value: String) -> Self {
        let tag = tag(value.as_bytes()).finalize().into_bytes().to_vec();
        Self { value, tag }
    }

    /// A fresh random token (not written anywhere).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_value(format!("{PREFIX}{}", hex::encode(bytes)))
    }

    /// The token as the ePR app sends it.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// Whether `presented` is this token, in time independent of its content and length.
    pub fn matches(&self, presented: &str) -> bool {
        tag(presented.as_bytes()).verify_slice(&self.tag).is_ok()
    }

    /// Reads `STATE_DIR/api.token`, or makes it (mode 0600) when it is missing. Two agents
    /// starting at once end up with the same token: the file is linked into place only if
    /// it does not exist yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, LocalTokenError> {
        let path = path(state_dir);
        match Self::load(&path) {
            Err(LocalTokenError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            r => return r,
        }
        let io = |source| LocalTokenError::Io {
            path: path.clone(),
            source,
        };
        let token = Self::generate();
        let tmp = state_dir.join(format!("{FILE_NAME}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            writeln!(f, "{}", token.value)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, &path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => {
                std::fs::File::open(state_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
                Ok(token)
            }
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(&path),
            Err(e) => Err(io(e)),
        }
    }

    /// Reads an existing token file; refuses one any user may read or one not made here.
    pub fn load(path: &Path) -> Result<Self, LocalTokenError> {
        let io = |source| LocalTokenError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                return Err(LocalTokenError::WorldAccessible {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = std::fs::read_to_string(path).map_err(io)?;
        let value = text.trim();
        let well_formed = value
            .strip_prefix(PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !well_formed {
            return Err(LocalTokenError::Malformed(path.to_owned()));
        }
        Ok(Self::from_value(value.to_owned()))
    }
}

/// How the local API treats `Authorization` on `/v1/*`.
#[derive(Debug, Clone, Default)]
pub enum LocalAuth {
    /// No token known: the header is not looked at (tests, and the API without `run`).
    #[default]
    Off,
    /// The token is optional, but a request that sends one must send this one.
    Checked(LocalToken),
    /// Every `/v1/*` request must send `Authorization: Bearer <token>` (`run --require-token`).
    Required(LocalToken),
}

/// Why a `/v1/*` request failed the token check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No `Authorization` header, and the token is required.
    Missing,
    /// An `Authorization` header that is not `Bearer` and this token.
    Invalid,
}

impl TokenRefusal {
    /// The error code the API answers with.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "local_token_required",
            Self::Invalid => "local_token_invalid",
        }
    }

    /// What the API says, in words.
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "this agent requires its local API token: send `Authorization: Bearer <token>` \
                 with the token from STATE_DIR/api.token"
            }
            Self::Invalid => {
                "the Authorization header does not hold this agent's local API token \
                 (STATE_DIR/api.token; it changes when the tablet is wiped and enrolled again)"
            }
        }
    }
}

impl LocalAuth {
    /// Whether every request must carry the token (`run --require-token`).
    pub fn is_required(&self) -> bool {
        matches!(self, Self::Required(_))
    }

    /// Checks the value of the request's `Authorization` header (`None`: no header; a
    /// header that is not valid text counts as a wrong token).
    pub fn check(&self, authorization: Option<Option<&str>>) -> Result<(), TokenRefusal> {
        let (token, required) = match self {
            Self::Off => return Ok(()),
            Self::Checked(t) => (t, false),
            Self::Required(t) => (t, true),
        };
        let Some(header) = authorization else {
            return if required {
                Err(TokenRefusal::Missing)
            } else {
                Ok(())
            };
        };
        let presented = header.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        match presented {
            Some(p) if token.matches(p) => Ok(()),
            _ => Err(TokenRefusal::Invalid),
        }
    }
}

/// Why `enrol` has no enrolment token.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentTokenError {
    #[error(
        "no enrolment token: give exactly one of --token-file FILE, the environment variable \
         {ENROLMENT_TOKEN_ENV} or --token TOKEN"
    )]
    Missing,
    #[error(
        "the enrolment token was given {0}: give exactly one of --token-file FILE, the \
         environment variable {ENROLMENT_TOKEN_ENV} or --token TOKEN"
    )]
    Several(String),
    #[error("cannot read the enrolment token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the enrolment token file {0} is empty (its first line holds no token)")]
    EmptyFile(PathBuf),
    #[error("the enrolment token given by {0} is empty")]
    Empty(&'static str),
}

/// The enrolment token from exactly one source: `flag` (`--token`), `env`
/// (`CPIS_ENROLMENT_TOKEN`) or `file` (`--token-file`, first line, trimmed).
pub fn enrolment_token(
    flag: Option<String>,
    env: Option<String>,
    file: Option<&Path>,
) -> Result<String, EnrolmentTokenError> {
    let given: Vec<&str> = [
        flag.as_ref().map(|_| "--token"),
        env.as_ref().map(|_| ENROLMENT_TOKEN_ENV),
        file.map(|_| "--token-file"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        return Err(EnrolmentTokenError::Several(format!(
            "by {}",
            given.join(" and by ")
        )));
    }
    let (token, source) = match (flag, env, file) {
        (Some(t), _, _) => (t, "--token"),
        (_, Some(t), _) => (t, ENROLMENT_TOKEN_ENV),
        (_, _, Some(path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| EnrolmentTokenError::Read {
                    path: path.to_owned(),
                    source,
                })?;
            let first = text.lines().next().unwrap_or("").trim();
            if first.is_empty() {
                return Err(EnrolmentTokenError::EmptyFile(path.to_owned()));
            }
            return Ok(first.to_owned());
        }
        _ => return Err(EnrolmentTokenError::Missing),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(EnrolmentTokenError::Empty(source));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_private_stable_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalToken::load_or_create(dir.path()).unwrap();
        assert!(t.as_str().starts_with(PREFIX));
        assert_eq!(t.as_str().len(), PREFIX.len() + 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The second start reads the same token; no temporary file is left.
        let again = LocalToken::load_or_create(dir.path()).unwrap();
        assert_eq!(again.as_str(), t.as_str());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        assert!(t.matches(again.as_str()));
        assert!(!t.matches(LocalToken::generate().as_str()));
        assert!(!t.matches(""));
        assert!(!format!("{t:?}").contains(t.as_str()));
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_or_foreign_token_files_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        LocalToken::load_or_create(dir.path()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalToken::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, LocalTokenError::WorldAccessible { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::write(&p, "hunter2\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = LocalToken::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, LocalTokenError::Malformed(_)), "{e}");
    }

    #[test]
    fn auth_decisions() {
        let t = LocalToken::generate();
        let right = format!("Bearer {}", t.as_str());
        let lower = format!("bearer {}", t.as_str());
        let wrong = format!("Bearer {}", LocalToken::generate().as_str());
        let req = LocalAuth::Required(t.clone());
        assert_eq!(req.check(None), Err(TokenRefusal::Missing));
        assert_eq!(req.check(Some(Some(&wrong))), Err(TokenRefusal::Invalid));
        assert_eq!(req.check(Some(None)), Err(TokenRefusal::Invalid));
        assert_eq!(
            req.check(Some(Some(&format!("Basic {}", t.as_str())))),
            Err(TokenRefusal::Invalid)
        );
        assert_eq!(
            req.check(Some(Some(t.as_str()))),
            Err(TokenRefusal::Invalid)
        );
        assert_eq!(req.check(Some(Some(&right))), Ok(()));
        assert_eq!(req.check(Some(Some(&lower))), Ok(()));
        let opt = LocalAuth::Checked(t);
        assert_eq!(opt.check(None), Ok(()));
        assert_eq!(opt.check(Some(Some(&right))), Ok(()));
        assert_eq!(opt.check(Some(Some(&wrong))), Err(TokenRefusal::Invalid));
        assert_eq!(LocalAuth::Off.check(Some(Some(&wrong))), Ok(()));
    }

    #[test]
    fn enrolment_token_comes_from_exactly_one_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  cpis_et_abc  \nsecond line\n").unwrap();
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            enrolment_token(None, None, Some(&file)).unwrap(),
            "cpis_et_abc"
        );
        assert_eq!(enrolment_token(None, s(" e "), None).unwrap(), "e");
        assert_eq!(enrolment_token(s("f"), None, None).unwrap(), "f");

        let e = enrolment_token(None, None, None).unwrap_err();
        let m = e.to_string();
        for choice in ["--token-file", "--token TOKEN", ENROLMENT_TOKEN_ENV] {
            assert!(m.contains(choice), "{m}");
        }
        let e = enrolment_token(s("f"), s("e"), Some(&file)).unwrap_err();
        assert!(
            e.to_string()
                .contains("by --token and by CPIS_ENROLMENT_TOKEN and by --token-file"),
            "{e}"
        );
        let e = enrolment_token(None, s("e"), Some(&file)).unwrap_err();
        assert!(matches!(e, EnrolmentTokenError::Several(_)), "{e}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n\n").unwrap();
        let e = enrolment_token(None, None, Some(&empty)).unwrap_err();
        assert!(e.to_string().contains(&empty.display().to_string()), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = enrolment_token(None, None, Some(&dir.path().join("missing"))).unwrap_err();
        assert!(matches!(e, EnrolmentTokenError::Read { .. }), "{e}");
        let e = enrolment_token(None, s(" "), None).unwrap_err();
        assert!(e.to_string().contains(ENROLMENT_TOKEN_ENV), "{e}");
    }
}
