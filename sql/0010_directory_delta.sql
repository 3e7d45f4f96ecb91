-- Directory extraction in full and delta modes (certsync.directory, certsync.store.source).
--
-- USNs are numbered per domain controller: a watermark is only meaningful against the DC that issued
-- it (its NTDS Settings object, dsServiceName, and its database's invocationId) and for the scope it
-- was read with. Any difference and the next read is a full one.

-- The watermark: the highestCommittedUSN read before the last committed read, for one scope and DC.
-- It is updated only in the transaction that merges what it covers, so a killed run leaves the old
-- one in place and the next run reads those changes again.
CREATE TABLE certsync.directory_watermark (
    only_row          boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    scope_key         text        NOT NULL,  -- sha256 of the server, base DNs, filter and group
    scope             text        NOT NULL,  -- the same in words, for people
    dc_service_name   text        NOT NULL,  -- rootDSE dsServiceName of the DC that answered
    invocation_id     uuid        NOT NULL,  -- that DC's database identity (changes on restore)
    highest_usn       bigint      NOT NULL CHECK (highest_usn >= 0),
    run_id            bigint      NOT NULL REFERENCES certsync.sync_run,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_full_run_id  bigint      NOT NULL REFERENCES certsync.sync_run,
    last_full_at      timestamptz NOT NULL
);

-- What each run's extract did: which mode and why, from which DC, which USN range it covered.
CREATE TABLE certsync.directory_read (
    run_id          bigint      PRIMARY KEY REFERENCES certsync.sync_run ON DELETE CASCADE,
    mode            text        NOT NULL CHECK (mode IN ('full', 'delta')),
    why             text        NOT NULL,  -- e.g. 'requested', 'no watermark', 'another DC answered'
    dc_service_name text        NOT NULL,
    invocation_id   uuid        NOT NULL,
    from_usn        bigint,                -- exclusive lower bound of a delta read (NULL: full)
    to_usn          bigint      NOT NULL,  -- highestCommittedUSN read before the search
    changed         integer     NOT NULL,  -- entries read in scope
    deleted         integer     NOT NULL,  -- users gone: tombstones (delta) or absent (full)
    left_scope      integer     NOT NULL,  -- users that moved out of the scope
    read_at         timestamptz NOT NULL DEFAULT now()
);

-- Users a run found gone from the scope, and why: 'deleted' (a tombstone, or nowhere in the domain)
-- or 'left_scope' (still in the directory but no longer matching the base DNs, filter or group).
CREATE TABLE certsync.staging_gone (
    run_id      bigint NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    object_guid uuid   NOT NULL,
    reason      text   NOT NULL CHECK (reason IN ('deleted', 'left_scope')),
    PRIMARY KEY (run_id, object_guid)
);

-- The users whose certificates certsync withdrew because they left the source, kept so that the plan
-- can say why (and, with left_scope = keep, leave their recipients alone).
CREATE TABLE certsync.source_gone (
    object_guid uuid        PRIMARY KEY,
    reason      text        NOT NULL CHECK (reason IN ('deleted', 'left_scope')),
    run_id      bigint      NOT NULL REFERENCES certsync.sync_run,
    gone_at     timestamptz NOT NULL DEFAULT now()
);

-- msExchRecipientTypeDetails (Exchange's schema extension): shared, room and equipment mailboxes
-- have disabled accounts by design, and their certificates stay published.
ALTER TABLE certsync.staging_user ADD COLUMN recipient_type_details bigint;
ALTER TABLE certsync.source_user ADD COLUMN recipient_type_details bigint;
CREATE INDEX source_user_last_seen ON certsync.source_user (last_seen_run_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON certsync.directory_watermark, certsync.directory_read,
    certsync.staging_gone, certsync.source_gone TO certsync_app;
GRANT SELECT ON certsync.directory_watermark, certsync.directory_read, certsync.staging_gone,
    certsync.source_gone TO certsync_auditor;

-- A delta run stages only the users that changed, but plans (and records a result for) every user
-- of the source view: show the others as the source view has them.
CREATE OR REPLACE VIEW certsync.value_verdicts AS
SELECT r.run_id, s.dag_id, s.airflow_run_id, s.logical_date,
       coalesce(u.sam_account_name, cu.sam_account_name) AS sam_account_name,
       CASE WHEN u.object_guid IS NOT NULL THEN u.mail ELSE cu.mail END AS mail,
       r.object_guid, r.attribute, encode(r.sha256, 'hex') AS sha256,
       r.selected, r.reason, r.rule, r.detail,
       v.subject, v.issuer, v.serial, v.not_before, v.not_after
FROM certsync.value_result r
JOIN certsync.sync_run s USING (run_id)
LEFT JOIN certsync.staging_user u ON u.run_id = r.run_id AND u.object_guid = r.object_guid
LEFT JOIN certsync.source_user cu ON u.object_guid IS NULL AND cu.object_guid = r.object_guid
LEFT JOIN LATERAL certsync.verdict_at(r.sha256, r.attribute, s.trust_fingerprint, s.logical_date) v ON true;
