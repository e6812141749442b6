//! The TPM 2.0 keystore (cargo feature `tpm2`), over Debian's libtss2 through `tss-esapi`.
//!
//! The device master key is rebuilt at every start from two random secrets, and needs both:
//! * the *sealed secret*, in a keyed-hash object sealed under a storage primary key of the
//!   TPM's owner hierarchy. Its blobs (in `keys/master.tpm2`) load only into the TPM that
//!   made them, because the primary key is derived from that TPM's own storage seed: a copy
//!   of the state directory on another machine opens nothing;
//! * the *NV secret*, in an NV index of that TPM. The wipe undefines the index. Flash keeps
//!   old blocks, so a copy of the disk taken before the wipe still holds the sealed blobs —
//!   but without the index, even with the same TPM, it no longer rebuilds the key.
//!
//! The secret leaves the TPM through a session salted with the primary key, with response
//! encryption, so it does not cross the bus in the clear. The TPM is reached through a TCTI:
//! the environment variable `CPIS_TPM2_TCTI` (for instance `swtpm:host=127.0.0.1,port=2321`),
//! by default `device:/dev/tpmrm0`, the kernel's resource manager. It is deliberately not
//! read from the state directory: a TCTI names a library to load (and `cmd:` a command to
//! run), which must not come from a file the data lives beside.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use tss_esapi::Context;
use tss_esapi::attributes::{
    NvIndexAttributesBuilder, ObjectAttributesBuilder, SessionAttributesBuilder,
};
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType};
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, EccPoint, KeyedHashScheme, MaxNvBuffer, NvPublicBuilder, Private, Public,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall as _, UnMarshall as _};
use zeroize::Zeroizing;

use cpis_protocol::KeyProtection;

use crate::keystore::{
    KEY_LEN, KeyError, Keystore, MasterKey, TPM2_KEY_FILE, shred_file, write_private,
};

/// Environment variable naming the TCTI of the TPM to use.
pub const TCTI_ENV: &str = "CPIS_TPM2_TCTI";
/// The TCTI used when [`TCTI_ENV`] is not set: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The first NV index handle of the owner's range, and how many follow it.
const NV_OWNER_FIRST: u32 = 0x0100_0000;
const NV_OWNER_COUNT: u32 = 0x0040_0000;
/// What the two secrets are combined into.
const KEY_LABEL: &[u8] = b"cpis-edge-agent/tpm2-master-key/v1";
const RECORD_FORMAT: u32 = 1;

/// The TCTI to use: [`TCTI_ENV`], else [`DEFAULT_TCTI`].
pub fn tcti() -> String {
    std::env::var(TCTI_ENV)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_TCTI.to_owned())
}

/// Whether a TPM 2.0 answers at `tcti` (it is asked for its manufacturer).
pub fn probe(tcti: &str) -> Result<(), KeyError> {
    let mut ctx = context(tcti)?;
    ctx.get_tpm_property(PropertyTag::Manufacturer)
        .map_err(|e| fail(tcti, "reading its properties", e))?;
    Ok(())
}

/// What `keys/master.tpm2` holds; nothing in it is secret without the TPM.
#[derive(Debug, Serialize, Deserialize)]
struct KeyRecord {
    format: u32,
    /// The NV index holding the NV secret.
    nv_index: u32,
    /// The sealed object's TPM2B_PUBLIC, marshalled, in hex.
    public: String,
    /// Its TPM2B_PRIVATE (encrypted by the TPM under its storage primary key), in hex.
    private: String,
}

/// The master key sealed by a TPM 2.0, with part of it in an NV index (see the module).
#[derive(Debug, Clone)]
pub struct Tpm2Keystore {
    path: PathBuf,
    tcti: String,
}

impl Tpm2Keystore {
    /// The keystore of a state directory, on the TPM that [`tcti`] names.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("keys").join(TPM2_KEY_FILE),
            tcti: tcti(),
        }
    }

    fn read_record(&self) -> Result<KeyRecord, KeyError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::Missing),
            Err(source) => {
                return Err(KeyError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let record: KeyRecord = serde_json::from_slice(&bytes)
            .map_err(|e| KeyError::Damaged(format!("{}: {e}", self.path.display())))?;
        if record.format != RECORD_FORMAT {
            return Err(KeyError::Damaged(format!(
                "{}: format {} (this agent reads format {RECORD_FORMAT})",
                self.path.display(),
                record.format
            )));
        }
        Ok(record)
    }

    fn not_this_tpm(&self, message: String) -> KeyError {
        KeyError::NotThisTpm {
            tcti: self.tcti.clone(),
            message,
        }
    }

    /// Unseals the loaded object and reads the NV index, through the encrypting session.
    fn read_secrets(
        &self,
        ctx: &mut Context,
        session: AuthSession,
        object: KeyHandle,
        nv_index: u32,
    ) -> Result<(Secret, Secret), KeyError> {
        let tcti = self.tcti.as_str();
        let unsealed = ctx
            .execute_with_session(Some(session), |c| c.unseal(object.into()))
            .map_err(|e| self.not_this_tpm(format!("the sealed key does not unseal: {e}")))?;
        let sealed_secret = Zeroizing::new(unsealed.value().to_vec());
        if !nv_defined(ctx, tcti, nv_index)? {
            return Err(self.not_this_tpm(format!(
                "its NV index {nv_index:#010x} is not defined on this TPM"
            )));
        }
        let handle = nv_handle(ctx, tcti, nv_index)?;
        let nv = ctx
            .execute_with_session(Some(session), |c| {
                c.nv_read(NvAuth::Owner, handle, KEY_LEN as u16, 0)
            })
            .map_err(|e| fail(tcti, "reading the NV index", e))?;
        Ok((sealed_secret, Zeroizing::new(nv.value().to_vec())))
    }
}

/// A secret read from the TPM, wiped from memory when dropped.
type Secret = Zeroizing<Vec<u8>>;

impl Keystore for Tpm2Keystore {
    fn protection(&self) -> KeyProtection {
        KeyProtection::Tpm2
    }

    fn create(&self) -> Result<MasterKey, KeyError> {
        if self.path.exists() {
            return Err(KeyError::Damaged(format!(
                "{} already exists; wipe the tablet before enrolling again",
                self.path.display()
            )));
        }
        let tcti = self.tcti.as_str();
        let mut ctx = context(tcti)?;
        let sealed_secret = random_secret();
        let nv_secret = random_secret();
        let sensitive = SensitiveData::try_from(sealed_secret.to_vec())
            .map_err(|e| fail(tcti, "preparing the sealed object", e))?;
        let template = sealed_object_template().map_err(|e| fail(tcti, "a sealed object", e))?;
        let primary = primary(&mut ctx, tcti)?;
        let created = ctx
            .execute_with_nullauth_session(|c| {
                c.create(primary, template, None, Some(sensitive), None, None)
            })
            .map_err(|e| fail(tcti, "sealing the key", e))?;
        let index = define_nv_secret(&mut ctx, tcti, &nv_secret)?;
        let record = KeyRecord {
            format: RECORD_FORMAT,
            nv_index: index,
            public: hex::encode(
                created
                    .out_public
                    .marshall()
                    .map_err(|e| fail(tcti, "storing the sealed object", e))?,
            ),
            private: hex::encode(created.out_private.value()),
        };
        let written = serde_json::to_vec_pretty(&record)
            .map_err(|e| KeyError::Damaged(e.to_string()))
            .and_then(|json| {
                write_private(&self.path, &json).map_err(|source| KeyError::Io {
                    path: self.path.clone(),
                    source,
                })
            });
        if let Err(e) = written {
            // Leave no orphan index behind on the TPM.
            let _ = undefine_nv(&mut ctx, tcti, index);
            return Err(e);
        }
        Ok(MasterKey::combine(
            &sealed_secret[..],
            &nv_secret[..],
            KEY_LABEL,
        ))
    }

    fn load(&self) -> Result<MasterKey, KeyError> {
        let record = self.read_record()?;
        let tcti = self.tcti.as_str();
        let public = hex::decode(&record.public)
            .ok()
            .and_then(|b| Public::unmarshall(&b).ok())
            .ok_or_else(|| KeyError::Damaged(format!("{}: public part", self.path.display())))?;
        let private = hex::decode(&record.private)
            .ok()
            .and_then(|b| Private::try_from(b).ok())
            .ok_or_else(|| KeyError::Damaged(format!("{}: private part", self.path.display())))?;
        // The context lives for this call only: on every path, tss-esapi flushes the primary,
        // the loaded object and the session when it drops, so a failed unseal leaves nothing
        // loaded in the TPM.
        let mut ctx = context(tcti)?;
        let primary = primary(&mut ctx, tcti)?;
        let object = ctx
            .execute_with_nullauth_session(|c| c.load(primary, private, public))
            .map_err(|e| self.not_this_tpm(format!("the sealed key does not load: {e}")))?;
        let session = encrypting_session(&mut ctx, tcti, primary)?;
        let (sealed_secret, nv_secret) =
            self.read_secrets(&mut ctx, session, object, record.nv_index)?;
        if nv_secret.len() != KEY_LEN || sealed_secret.len() != KEY_LEN {
            return Err(self.not_this_tpm("the secrets have the wrong length".into()));
        }
        Ok(MasterKey::combine(&sealed_secret, &nv_secret, KEY_LABEL))
    }

    fn destroy(&self) -> Result<(), KeyError> {
        let record = match self.read_record() {
            Ok(r) => Some(r),
            Err(KeyError::Missing) => return Ok(()),
            Err(KeyError::Damaged(why)) => {
                // Without the record the index is unknown; the sealed half goes with the file.
                tracing::warn!(
                    "destroying a damaged TPM key record ({why}): its NV index is unknown"
                );
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(record) = record {
            let tcti = self.tcti.as_str();
            let mut ctx = context(tcti)?;
            if nv_defined(&mut ctx, tcti, record.nv_index)? {
                undefine_nv(&mut ctx, tcti, record.nv_index)?;
            }
        }
        shred_file(&self.path).map_err(|source| KeyError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn random_secret() -> Zeroizing<[u8; KEY_LEN]> {
    let mut s = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(&mut s[..]);
    s
}

fn fail(tcti: &str, what: &str, e: tss_esapi::Error) -> KeyError {
    KeyError::Tpm {
        tcti: tcti.to_owned(),
        message: format!("{what}: {e}"),
    }
}

fn context(tcti: &str) -> Result<Context, KeyError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| KeyError::Tpm {
        tcti: tcti.to_owned(),
        message: format!("not a TCTI configuration ({e}); set {TCTI_ENV}"),
    })?;
    Context::new(conf).map_err(|e| fail(tcti, "cannot reach the TPM", e))
}

/// The owner hierarchy's storage primary key (ECC P-256, AES-128-CFB). It is derived from
/// the TPM's storage seed, so the same template gives the same key on the same TPM only.
fn primary(ctx: &mut Context, tcti: &str) -> Result<KeyHandle, KeyError> {
    let public = (|| {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()?;
        PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_restricted_decryption_key(
                    SymmetricDefinitionObject::AES_128_CFB,
                    EccCurve::NistP256,
                )
                .build()?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
    })()
    .map_err(|e| fail(tcti, "the primary key template", e))?;
    ctx.execute_with_nullauth_session(|c| {
        c.create_primary(Hierarchy::Owner, public, None, None, None, None)
    })
    .map(|r| r.key_handle)
    .map_err(|e| fail(tcti, "making the storage primary key (owner hierarchy)", e))
}

/// A keyed-hash object that only holds data: unsealed with the (empty) object password,
/// bound to this TPM and this parent.
fn sealed_object_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_user_with_auth(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Default::default())
        .build()
}

/// An HMAC session salted with `primary`, encrypting responses (the unsealed secret).
fn encrypting_session(
    ctx: &mut Context,
    tcti: &str,
    primary: KeyHandle,
) -> Result<AuthSession, KeyError> {
    let session = ctx
        .start_auth_session(
            Some(primary),
            None,
            None,
            SessionType::Hmac,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| fail(tcti, "starting a salted session", e))?
        .ok_or_else(|| KeyError::Tpm {
            tcti: tcti.to_owned(),
            message: "the TPM started no session".into(),
        })?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    ctx.tr_sess_set_attributes(session, attributes, mask)
        .map_err(|e| fail(tcti, "setting the session's attributes", e))?;
    Ok(session)
}

/// Whether the NV index `index` is defined.
fn nv_defined(ctx: &mut Context, tcti: &str, index: u32) -> Result<bool, KeyError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, index, 1)
        .map_err(|e| fail(tcti, "listing NV indices", e))?;
    Ok(match data {
        CapabilityData::Handles(list) => list.iter().any(|h| u32::from(*h) == index),
        _ => false,
    })
}

fn nv_handle(ctx: &mut Context, tcti: &str, index: u32) -> Result<NvIndexHandle, KeyError> {
    let tpm_handle = NvIndexTpmHandle::new(index).map_err(|e| fail(tcti, "an NV index", e))?;
    let object: ObjectHandle = ctx
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
        .map_err(|e| fail(tcti, "opening the NV index", e))?;
    Ok(NvIndexHandle::from(object))
}

/// Defines a new owner NV index at a free handle of the owner's range, holding `secret`.
fn define_nv_secret(
    ctx: &mut Context,
    tcti: &str,
    secret: &[u8; KEY_LEN],
) -> Result<u32, KeyError> {
    let mut index = None;
    for _ in 0..16 {
        let candidate = NV_OWNER_FIRST + rand::rngs::OsRng.next_u32() % NV_OWNER_COUNT;
        if !nv_defined(ctx, tcti, candidate)? {
            index = Some(candidate);
            break;
        }
    }
    let index = index.ok_or_else(|| KeyError::Tpm {
        tcti: tcti.to_owned(),
        message: "no free NV index found in the owner range".into(),
    })?;
    let public = (|| {
        let attributes = NvIndexAttributesBuilder::new()
            .with_owner_write(true)
            .with_owner_read(true)
            .with_no_da(true)
            .build()?;
        NvPublicBuilder::new()
            .with_nv_index(NvIndexTpmHandle::new(index)?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attributes)
            .with_data_area_size(KEY_LEN)
            .build()
    })()
    .map_err(|e| fail(tcti, "the NV index template", e))?;
    let handle = ctx
        .execute_with_nullauth_session(|c| c.nv_define_space(Provision::Owner, None, public))
        .map_err(|e| fail(tcti, "defining the NV index (owner hierarchy)", e))?;
    let data = MaxNvBuffer::try_from(secret.to_vec()).map_err(|e| fail(tcti, "NV data", e))?;
    if let Err(e) =
        ctx.execute_with_nullauth_session(|c| c.nv_write(NvAuth::Owner, handle, data, 0))
    {
        let _ =
            ctx.execute_with_nullauth_session(|c| c.nv_undefine_space(Provision::Owner, handle));
        return Err(fail(tcti, "writing the NV index", e));
    }
    Ok(index)
}

fn undefine_nv(ctx: &mut Context, tcti: &str, index: u32) -> Result<(), KeyError> {
    let handle = nv_handle(ctx, tcti, index)?;
    ctx.execute_with_nullauth_session(|c| c.nv_undefine_space(Provision::Owner, handle))
        .map_err(|e| fail(tcti, "undefining the NV index", e))
}
