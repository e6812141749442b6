-- The PostgreSQL schema of the sync server (migration 1): the same tables as the SQLite
-- backend's migrations 1 to 5, plus page sessions. Times are whole seconds since the epoch
-- (event, notification, contact and audit times: milliseconds), dates ISO text, hashes bytea,
-- as in SQLite. Codes and ids compare bytewise (COLLATE "C"), whatever the database's locale.

CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value BIGINT NOT NULL);
-- head_version: the change log's head. Every transaction that takes versions locks this row
-- first (SELECT … FOR UPDATE) and holds it to commit, so versions are gap-free and become
-- visible in version order on every replica.
-- notification_id: the id of the newest notification, taken the same way, so a council's
-- mailbox ids are visible in id order (a paging client never skips one).
INSERT INTO meta (key, value) VALUES ('head_version', 0), ('notification_id', 0);

CREATE TABLE trusts (
    code TEXT COLLATE "C" PRIMARY KEY, name TEXT NOT NULL, created_at BIGINT NOT NULL
);
CREATE TABLE regions (
    id TEXT COLLATE "C" PRIMARY KEY, name TEXT NOT NULL, epoch BIGINT NOT NULL
);
CREATE TABLE region_neighbours (
    region TEXT COLLATE "C" NOT NULL REFERENCES regions(id), council TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (region, council)
);
CREATE TABLE councils (
    code TEXT COLLATE "C" PRIMARY KEY, name TEXT NOT NULL,
    region TEXT COLLATE "C" NOT NULL REFERENCES regions(id),
    emergency_phone TEXT NOT NULL, office_phone TEXT, log_floor BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX councils_region ON councils(region);
CREATE TABLE council_tokens (
    hash BYTEA PRIMARY KEY, council TEXT COLLATE "C" NOT NULL REFERENCES councils(code),
    created_at BIGINT NOT NULL, expires_at BIGINT, revoked_at BIGINT
);
CREATE INDEX council_tokens_council ON council_tokens(council);
CREATE TABLE flags (
    council TEXT COLLATE "C" NOT NULL REFERENCES councils(code), nhs_number BIGINT NOT NULL,
    plan_type TEXT COLLATE "C" NOT NULL, start_date TEXT NOT NULL, end_date TEXT,
    date_of_birth TEXT, local_id TEXT, version BIGINT NOT NULL,
    PRIMARY KEY (council, nhs_number, plan_type)
);
CREATE INDEX flags_end ON flags(end_date) WHERE end_date IS NOT NULL;
CREATE INDEX flags_nhs ON flags(nhs_number);
CREATE TABLE changes (
    version BIGINT PRIMARY KEY, council TEXT COLLATE "C" NOT NULL, nhs_number BIGINT NOT NULL,
    plan_type TEXT COLLATE "C" NOT NULL, op TEXT NOT NULL, start_date TEXT, end_date TEXT,
    date_of_birth TEXT, local_id TEXT, reason TEXT NOT NULL, recorded_at BIGINT NOT NULL
);
CREATE INDEX changes_council ON changes(council, version);
CREATE INDEX changes_nhs ON changes(nhs_number, council);
CREATE TABLE uploads (
    id TEXT COLLATE "C" PRIMARY KEY, council TEXT COLLATE "C" NOT NULL,
    received_at BIGINT NOT NULL, rows BIGINT NOT NULL, added BIGINT NOT NULL,
    updated BIGINT NOT NULL, ended BIGINT NOT NULL, removed BIGINT NOT NULL,
    unchanged BIGINT NOT NULL, version BIGINT NOT NULL
);
CREATE TABLE enrolment_tokens (
    seq BIGSERIAL UNIQUE, hash BYTEA PRIMARY KEY,
    trust TEXT COLLATE "C" NOT NULL REFERENCES trusts(code),
    region TEXT COLLATE "C" NOT NULL REFERENCES regions(id), uses_left BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT
);
CREATE TABLE devices (
    id TEXT COLLATE "C" PRIMARY KEY, trust TEXT COLLATE "C" NOT NULL,
    region TEXT COLLATE "C" NOT NULL, name TEXT, agent_version TEXT NOT NULL,
    cert_expires_at BIGINT NOT NULL, enrolled_at BIGINT NOT NULL, last_seen BIGINT,
    revoked_at BIGINT
);
CREATE INDEX devices_trust ON devices(trust);
CREATE TABLE events (
    event_id TEXT COLLATE "C" PRIMARY KEY, device TEXT COLLATE "C" NOT NULL,
    trust TEXT COLLATE "C" NOT NULL, trust_name TEXT NOT NULL, nhs_number BIGINT NOT NULL,
    result TEXT NOT NULL, accessed_at BIGINT NOT NULL, received_at BIGINT NOT NULL,
    source TEXT NOT NULL, body TEXT NOT NULL, clock_suspect BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX events_device ON events(device);
CREATE TABLE notifications (
    id BIGINT PRIMARY KEY, event_id TEXT COLLATE "C" NOT NULL REFERENCES events(event_id),
    council TEXT COLLATE "C" NOT NULL REFERENCES councils(code), plan_types TEXT NOT NULL,
    created_at BIGINT NOT NULL, acked_at BIGINT,
    UNIQUE (event_id, council)
);
CREATE INDEX notifications_pending ON notifications(council, id) WHERE acked_at IS NULL;
CREATE TABLE contacts (
    nhs_number BIGINT NOT NULL, event_id TEXT COLLATE "C" NOT NULL, accessed_at BIGINT NOT NULL,
    trust TEXT COLLATE "C" NOT NULL, trust_name TEXT NOT NULL, setting TEXT NOT NULL,
    PRIMARY KEY (nhs_number, event_id)
);
CREATE INDEX contacts_recent ON contacts(nhs_number, accessed_at DESC, event_id DESC);
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, action TEXT NOT NULL,
    event_id TEXT COLLATE "C", device TEXT, council TEXT, detail TEXT
);
CREATE INDEX audit_event ON audit_log(event_id) WHERE event_id IS NOT NULL;
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE device_reports (
    device TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(id), body TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE TABLE key_rollovers (
    seq BIGSERIAL PRIMARY KEY, previous TEXT NOT NULL, next TEXT NOT NULL UNIQUE,
    issued_at BIGINT NOT NULL, signed BYTEA NOT NULL,
    -- The new private key sealed with the data dir's key-wrap key (see keys.rs).
    sealed_next BYTEA
);
CREATE TABLE upload_attempts (
    seq BIGSERIAL PRIMARY KEY, council TEXT COLLATE "C" NOT NULL, received_at BIGINT NOT NULL,
    upload_id TEXT, message TEXT, error_count BIGINT NOT NULL DEFAULT 0, errors TEXT
);
CREATE INDEX upload_attempts_council ON upload_attempts(council, seq);
CREATE TABLE trust_admin_tokens (
    hash BYTEA PRIMARY KEY, trust TEXT COLLATE "C" NOT NULL REFERENCES trusts(code),
    created_at BIGINT NOT NULL, expires_at BIGINT, revoked_at BIGINT
);
CREATE INDEX trust_admin_tokens_trust ON trust_admin_tokens(trust);
-- Page sessions: the SHA-256 of the cookie's value (a dump holds no live session).
CREATE TABLE page_sessions (
    id_hash BYTEA PRIMARY KEY, kind TEXT NOT NULL, who TEXT NOT NULL, csrf TEXT NOT NULL,
    expires_at BIGINT NOT NULL, flash TEXT
);
CREATE INDEX page_sessions_expiry ON page_sessions(expires_at);
