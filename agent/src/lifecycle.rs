//! The device lifecycle, agent side (`cpis_protocol::lifecycle`): the report for the fleet
//! view after each sync, client-certificate renewal before expiry (a new key pair each time,
//! installed atomically), following a signed chain of feed signing-key rollovers, and
//! retiring a revoked device without losing its unsent notices ([`retire`]).

use chrono::{DateTime, Duration, Utc};

use cpis_protocol::PublicKey;
use cpis_protocol::lifecycle::DeviceReport;

use crate::agent::{Agent, AgentError};
use crate::net::{self, DeviceClient, NetError};

/// The server said this device is revoked (`reason`, its words). The one place that decides
/// what follows, whichever request learnt it:
///
/// 1. the revocation is recorded durably and the flags are shredded at once (lookups now
///    answer "not enrolled");
/// 2. the whole outbox is sent — the server takes access events from a revoked device, and
///    records them as sent after revocation — so no notice of a flagged child's lookup is
///    lost (DESIGN.md §2 rule 3);
/// 3. only when nothing is left to send is everything destroyed ([`Agent::shred`]).
///
/// When the outbox cannot be delivered now, it stays sealed and the answer is
/// [`AgentError::RevokedPending`]; every later sync goes straight back to step 2.
/// Returns the error the caller reports: `NotEnrolled` once wiped.
pub async fn retire(agent: &Agent, client: &DeviceClient, reason: &str) -> AgentError {
    if let Err(e) = agent.mark_revoked(reason) {
        return e;
    }
    let (sent, cause) = match crate::sync::upload_events(agent, client).await {
        Ok(sent) => (sent, None),
        Err(e) => {
            tracing::warn!("revoked: access notices not delivered yet: {e}");
            (0, Some(e.to_string()))
        }
    };
    let pending = match agent.outbox_counts() {
        Ok((pending, _)) => pending,
        Err(e) => return e,
    };
    if pending > 0 {
        return AgentError::RevokedPending {
            reason: reason.to_owned(),
            pending,
            cause: Some(cause.unwrap_or_else(|| "the server stored none of the last batch".into())),
        };
    }
    if let Err(e) = agent.shred() {
        tracing::error!("wiping the revoked device failed: {e}");
        return e;
    }
    tracing::warn!(sent, "revoked: outbox delivered, device wiped");
    AgentError::NotEnrolled(format!(
        "this device was revoked ({reason}); {sent} access notice(s) were delivered first, \
         then its data was shredded"
    ))
}

/// Renewal starts when less than this much of the certificate's life is left ...
const RENEW_FRACTION: i32 = 3;
/// ... or less than this, whichever is less.
const RENEW_MAX_LEFT_DAYS: i64 = 30;

/// Whether a certificate valid `not_before..not_after` should be renewed at `now`: when
/// less than a third of its lifetime, or 30 days, whichever is less, remains.
pub fn renewal_due(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let lifetime = not_after - not_before;
    let threshold = (lifetime / RENEW_FRACTION).min(Duration::days(RENEW_MAX_LEFT_DAYS));
    not_after - now < threshold
}

/// Validity and public key (DER of the SubjectPublicKeyInfo) of a certificate.
type CertInfo = (DateTime<Utc>, DateTime<Utc>, Vec<u8>);

fn cert_info(pem: &str) -> Result<CertInfo, NetError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| NetError::BadPem(format!("device certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| NetError::BadPem(format!("device certificate: {e}")))?;
    let ts = |t: x509_parser::time::ASN1Time| {
        DateTime::from_timestamp(t.timestamp(), 0)
            .ok_or_else(|| NetError::BadPem("certificate time out of range".into()))
    };
    Ok((
        ts(cert.validity().not_before)?,
        ts(cert.validity().not_after)?,
        cert.public_key().raw.to_vec(),
    ))
}

/// Renews the client certificate when due: a NEW key pair is made on the tablet, its CSR is
/// sent over mutual TLS with the current certificate, and the new key and certificate
/// replace the old ones atomically ([`Agent::install_identity`]). On any failure the old
/// ones stay. Returns whether it renewed.
pub async fn renew_if_due(agent: &Agent, client: &DeviceClient) -> Result<bool, AgentError> {
    let sd = agent.state_dir();
    let path = sd.device_cert();
    let pem = std::fs::read_to_string(&path).map_err(|source| AgentError::Io {
        path: path.clone(),
        source,
    })?;
    let (not_before, not_after, _) = cert_info(&pem)?;
    if !renewal_due(not_before, not_after, agent.clock().now()) {
        return Ok(false);
    }
    let (key_pem, csr) = net::new_key_and_csr()?;
    let resp = client.renew(&csr).await?;
    let (_, new_after, new_spki) = cert_info(&resp.client_cert_pem)?;
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| NetError::Protocol(format!("reading the new key: {e}")))?;
    if new_spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
        return Err(NetError::Protocol(
            "the renewed certificate is not for the key this tablet just made".into(),
        )
        .into());
    }
    if new_after < not_after {
        return Err(NetError::Protocol(
            "the renewed certificate expires before the current one".into(),
        )
        .into());
    }
    agent.install_identity(&key_pem, &resp.client_cert_pem, new_after)?;
    tracing::info!(expires = %new_after, "client certificate renewed");
    Ok(true)
}

/// Sends the device report for the fleet view.
pub async fn report(agent: &Agent, client: &DeviceClient) -> Result<(), AgentError> {
    let st = agent.state()?;
    let (pending, aside) = agent.outbox_counts()?;
    let r = DeviceReport {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        data_epoch: st.data.map(|d| d.0),
        data_version: st.data.map(|d| d.1),
        data_as_of: st.data_as_of,
        outbox_pending: pending,
        outbox_set_aside: aside,
        client_cert_expires_at: Some(agent.enrolment().client_cert_expires_at),
        reported_at: agent.clock().now(),
        key_protection: Some(agent.key_protection()),
    };
    client.report(&r).await?;
    Ok(())
}

/// Fetches the key chain and follows it from the pinned key; pins the newest key it leads
/// to. `None` when it leads nowhere new. A chain that does not verify changes nothing.
pub async fn follow_key_rollover(
    agent: &Agent,
    client: &DeviceClient,
) -> Result<Option<PublicKey>, AgentError> {
    let chain = client.key_chain().await?;
    agent.follow_rollover(&chain)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_year_long_certificate_renews_in_its_last_30_days() {
        let (nb, na) = (t("2026-01-01T00:00:00Z"), t("2027-01-01T00:00:00Z"));
        assert!(!renewal_due(nb, na, t("2026-12-01T00:00:00Z")));
        assert!(renewal_due(nb, na, t("2026-12-03T00:00:00Z")));
    }

    #[test]
    fn a_short_certificate_renews_in_its_last_third() {
        let (nb, na) = (t("2026-01-01T00:00:00Z"), t("2026-01-31T00:00:00Z"));
        assert!(!renewal_due(nb, na, t("2026-01-20T00:00:00Z")));
        assert!(renewal_due(nb, na, t("2026-01-21T01:00:00Z")));
        // Expired already: due.
        assert!(renewal_due(nb, na, t("2026-02-05T00:00:00Z")));
    }
}
