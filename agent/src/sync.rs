//! The sync driver and enrolment: does the network and disk work that [`crate::plan`]
//! decides, and verifies everything (through [`Agent`]) before it is applied; uploads the
//! outbox in batches; follows a signing-key rollover once when the feed stops verifying;
//! reports to the fleet view after a successful sync.

use std::path::Path;
use std::sync::Arc;

use cpis_protocol::ingest::MAX_BATCH_EVENTS;
use cpis_protocol::local::SyncResponse;
use cpis_protocol::{Checkpoint, DeltaMeta, EventBatch, VerifyError};

use crate::agent::{Agent, AgentError, Enrolment, TlsMaterial, lock};
use crate::clock::Clock;
use crate::net::{self, DeltaFetch, DeviceClient, NetError};
use crate::plan::{Action, Event, SyncPlan};

/// [`enrol_with_keystore`] with the master key in a file: for development and tests (the
/// command line chooses the TPM 2.0 where there is one).
pub async fn enrol(
    dir: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
    name: Option<String>,
    clock: Arc<dyn Clock>,
) -> Result<Agent, AgentError> {
    let file = cpis_protocol::KeyProtection::File;
    enrol_with_keystore(dir, server, ca_pem, token, name, file, clock).await
}

/// Enrols with the server (trusting only `ca_pem`) and writes a new state directory whose
/// master key `keystore` protects ([`crate::keystore::choose`] picks one). Nothing is
/// written unless the server accepts the token.
pub async fn enrol_with_keystore(
    dir: &Path,
    server: &str,
    ca_pem: &str,
    token: &str,
    name: Option<String>,
    keystore: cpis_protocol::KeyProtection,
    clock: Arc<dyn Clock>,
) -> Result<Agent, AgentError> {
    let sd = crate::agent::StateDir::new(dir);
    if sd.enrolment().exists() {
        return Err(AgentError::AlreadyEnrolled(format!(
            "{} already holds an enrolled device; run `cpis-agent wipe` first",
            dir.display()
        )));
    }
    let enrolled = net::enrol(server, ca_pem, token, name.clone()).await?;
    let r = enrolled.response;
    r.policy
        .validate()
        .map_err(|e| NetError::Protocol(format!("enrolment policy: {e}")))?;
    let enrolment = Enrolment {
        device_id: r.device_id,
        trust: r.trust,
        region: r.region,
        server: server.trim_end_matches('/').to_owned(),
        signing_key: r.signing_public_key,
        policy: r.policy,
        client_cert_expires_at: r.client_cert_expires_at,
        name,
    };
    let tls = TlsMaterial {
        ca_pem: ca_pem.to_owned(),
        cert_pem: r.client_cert_pem,
        key_pem: enrolled.key_pem,
    };
    Agent::create(dir, &enrolment, &tls, keystore, clock)
}

/// The device's mTLS client, from the state directory.
pub fn device_client(agent: &Agent) -> Result<DeviceClient, AgentError> {
    let sd = agent.state_dir();
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| AgentError::Io { path: p, source })
    };
    agent.check_not_shredded()?;
    Ok(DeviceClient::new(
        &agent.enrolment().server,
        &read(sd.ca())?,
        &read(sd.device_cert())?,
        &agent.device_key_pem()?,
    )?)
}

fn is_bad_signature(e: &AgentError) -> bool {
    matches!(
        e,
        AgentError::Verify(VerifyError::BadSignature)
            | AgentError::Net(NetError::Verify(VerifyError::BadSignature))
    )
}

/// Whether pending access events are still worth sending over the same connection after the
/// feed failed with `e`. Notices do not wait on trust in the feed (the server is
/// authenticated by TLS, and events are idempotent by event id) — except when the device was
/// revoked, when the server could not be reached or authenticated at all, or when it shed
/// the request (its `Retry-After` is to be honoured).
fn events_worth_sending(e: &AgentError, server_answered: bool) -> bool {
    match e {
        AgentError::Net(NetError::Revoked(_)) | AgentError::NotEnrolled(_) => false,
        AgentError::Net(NetError::Server {
            status: 429 | 503, ..
        }) => false,
        AgentError::Net(n) if n.retry_after().is_some() => false,
        AgentError::Net(NetError::Unreachable { .. } | NetError::Tls { .. }) => server_answered,
        _ => true,
    }
}

/// One sync: checkpoint, then deltas or a snapshot as planned, then pending events, then a
/// device report (whose failure never fails the sync). When the feed part fails after the
/// server answered (a checkpoint refused as expired, a bad signature, a connection cut
/// mid-transfer…), pending access events are still sent over the same connection before the
/// feed's error is returned (see `events_worth_sending`). A revoked device delivers its
/// outbox, then shreds its state directory ([`crate::lifecycle::retire`]). When the feed
/// fails with a bad signature under the pinned key, the key chain
/// is fetched and followed from the pinned key; if it leads to a new key, that key is
/// pinned and the sync retried once.
pub async fn sync_once(
    agent: &Agent,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<SyncResponse, AgentError> {
    sync_feed_and_events(agent, progress)
        .await
        .map(|s| s.response)
}

/// A sync whose feed is in, and what became of the pending access events.
#[derive(Debug)]
pub struct Synced {
    pub response: SyncResponse,
    /// Why pending events were not all sent (they stay in the outbox). The background loop
    /// retries soon — after the server's `Retry-After` when it shed the upload — rather than
    /// leaving notices waiting for the next poll.
    pub events_error: Option<AgentError>,
}

/// [`sync_once`], also telling why pending access events could not be sent. A device the
/// server said is revoked (now, or at an earlier sync) is handed to
/// [`crate::lifecycle::retire`]: flags shredded, outbox delivered, then wiped.
pub async fn sync_feed_and_events(
    agent: &Agent,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Synced, AgentError> {
    let client = match device_client(agent) {
        Ok(client) => client,
        Err(e) => {
            agent.record_sync(Err(e.to_string()))?;
            return Err(e);
        }
    };
    if let Some(reason) = agent.revoked_reason() {
        return Err(crate::lifecycle::retire(agent, &client, &reason).await);
    }
    let result = feed_then_events(agent, &client, progress).await;
    // Revoked while sending events: revoked all the same.
    let result = match result {
        Ok(Synced {
            events_error: Some(AgentError::Net(NetError::Revoked(msg))),
            ..
        }) => Err(AgentError::Net(NetError::Revoked(msg))),
        other => other,
    };
    let result = match result {
        Err(AgentError::Net(NetError::Revoked(msg))) => {
            return Err(crate::lifecycle::retire(agent, &client, &msg).await);
        }
        Err(e) => Err(e),
        Ok(r) => {
            if let Err(e) = crate::lifecycle::report(agent, &client).await {
                tracing::warn!("device report not sent: {e}");
            }
            Ok(r)
        }
    };
    agent.record_sync(result.as_ref().map(|_| ()).map_err(|e| e.to_string()))?;
    result
}

/// The feed (following a key rollover once), then pending events; when the feed fails after
/// the server answered, pending events are still sent over the same connection.
async fn feed_then_events(
    agent: &Agent,
    client: &DeviceClient,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Synced, AgentError> {
    let mut answered = false;
    let first = run(agent, client, progress, &mut answered).await;
    let outcome = match first {
        Err(e) if is_bad_signature(&e) => {
            match crate::lifecycle::follow_key_rollover(agent, client).await {
                Ok(Some(key)) => {
                    tracing::warn!(%key, "feed signing key rolled over; pinned the new key");
                    run(agent, client, progress, &mut answered).await
                }
                Ok(None) => Err(e),
                Err(chain) => {
                    tracing::warn!("key chain not followed: {chain}");
                    Err(e)
                }
            }
        }
        other => other,
    };
    if let Err(feed) = &outcome
        && events_worth_sending(feed, answered)
    {
        match upload_events(agent, client).await {
            Ok(n) => {
                tracing::warn!("the feed failed ({feed}); {n} access events sent all the same")
            }
            Err(AgentError::Net(NetError::Revoked(msg))) => {
                return Err(AgentError::Net(NetError::Revoked(msg)));
            }
            Err(e) => {
                tracing::warn!("the feed failed ({feed}); access events not sent either: {e}")
            }
        }
    }
    outcome
}

/// An expired checkpoint, explained by the tablet clock when it is well ahead of the
/// checkpoint's server time (the likely cause: the server signs a checkpoint for every poll).
fn expired_checkpoint(
    agent: &Agent,
    signed: &cpis_protocol::SignedMessage,
    error: VerifyError,
) -> AgentError {
    let now = agent.clock.now();
    let Ok(cp) = signed.open::<Checkpoint>(agent.pinned_key().verifying_key()) else {
        return AgentError::Verify(error);
    };
    let ahead = (now - cp.server_time).num_seconds();
    if now >= cp.expires_at && ahead > 600 {
        AgentError::ClockAhead {
            error,
            ahead: crate::lookup::human_offset(ahead.unsigned_abs()),
        }
    } else {
        AgentError::Verify(error)
    }
}

/// The feed part of a sync, then pending events. `answered` is set once the server has
/// answered the checkpoint request.
async fn run(
    agent: &Agent,
    client: &DeviceClient,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
    answered: &mut bool,
) -> Result<Synced, AgentError> {
    let signed = client.checkpoint().await?;
    *answered = true;
    let cp = match agent.accept_checkpoint(&signed) {
        Err(AgentError::Verify(e @ VerifyError::Expired { .. })) => {
            return Err(expired_checkpoint(agent, &signed, e));
        }
        other => other?,
    };
    let (mut plan, mut action) = SyncPlan::new(agent.position()?.data, cp.checkpoint());
    let mut what = "up_to_date";
    let vk = *agent.enrolment().signing_key.verifying_key();
    let downloads = agent.state_dir().downloads();
    loop {
        action = match action {
            Action::Done => break,
            Action::FetchDelta { from } => {
                let fetched = client
                    .delta(from, |s| Ok(s.open::<DeltaMeta>(&vk)?.body))
                    .await?;
                match fetched {
                    DeltaFetch::UpToDate => plan.on(Event::DeltaUpToDate),
                    DeltaFetch::Gone => plan.on(Event::DeltaGone),
                    DeltaFetch::Body { signed, body } => {
                        let meta = agent.apply_delta(&cp, &signed, &body)?;
                        what = "delta";
                        plan.on(Event::DeltaApplied {
                            to: meta.to_version,
                        })
                    }
                }
            }
            Action::FetchSnapshot => {
                let mut attempt = 0;
                let (signed, meta, body) = loop {
                    attempt += 1;
                    let signed = client.snapshot_meta().await?;
                    let meta = agent.check_snapshot_meta(&cp, &signed)?;
                    match client
                        .snapshot_body(
                            &signed,
                            meta.epoch,
                            meta.version,
                            &meta.body,
                            &downloads,
                            &agent.keys.download,
                            progress,
                        )
                        .await
                    {
                        Ok(body) => break (signed, meta, body),
                        Err(NetError::Server { status: 410, .. }) if attempt < 3 => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                let applied = agent.apply_snapshot(&cp, &signed, &body);
                DeviceClient::clear_downloads(&downloads);
                applied?;
                what = "snapshot";
                plan.on(Event::SnapshotApplied {
                    epoch: meta.epoch,
                    version: meta.version,
                })
            }
        };
    }
    // The feed is in; events failing to go is not a failed sync of the data (they stay in
    // the outbox, and `status` and lookups warn about a backlog).
    let (events_sent, events_error) = match upload_events(agent, client).await {
        Ok(n) => (n, None),
        Err(e) => {
            tracing::warn!("access events not sent this time: {e}");
            (0, Some(e))
        }
    };
    let st = agent.state()?;
    Ok(Synced {
        response: SyncResponse {
            action: what.into(),
            epoch: st.data.map(|d| d.0),
            version: st.data.map(|d| d.1),
            data_as_of: st.data_as_of,
            events_sent,
        },
        events_error,
    })
}

/// Sends pending events in batches of at most [`MAX_BATCH_EVENTS`]; deletes the ones the
/// server's acknowledgement lists as stored (only those), and sets aside the ones it rejected
/// for good (kept sealed, counted, never re-sent). Returns how many were stored.
pub async fn upload_events(agent: &Agent, client: &DeviceClient) -> Result<u64, AgentError> {
    let mut sent = 0u64;
    loop {
        let pending = lock(&agent.outbox).pending(&agent.keys, MAX_BATCH_EVENTS)?;
        if pending.is_empty() {
            lock(&agent.outbox).checkpoint()?;
            return Ok(sent);
        }
        let batch = EventBatch {
            events: pending.iter().map(|(_, e)| e.clone()).collect(),
        };
        let ack = client.upload_events(&batch).await?;
        let stored: std::collections::HashSet<_> = ack.stored.iter().collect();
        let rejected: std::collections::HashSet<_> =
            ack.rejected.iter().map(|r| &r.event_id).collect();
        let mut done = Vec::new();
        let mut aside = Vec::new();
        for (seq, e) in &pending {
            if stored.contains(&e.event_id) {
                done.push(*seq);
            } else if rejected.contains(&e.event_id) {
                aside.push(*seq);
            }
        }
        for r in &ack.rejected {
            tracing::warn!(event = %r.event_id, code = %r.code, "server rejected an event for good; set aside: {}", r.message);
        }
        if done.is_empty() && aside.is_empty() {
            return Ok(sent);
        }
        sent += done.len() as u64;
        let mut outbox = lock(&agent.outbox);
        outbox.remove(&done)?;
        outbox.set_aside(&aside)?;
    }
}
