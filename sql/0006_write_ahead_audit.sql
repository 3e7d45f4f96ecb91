-- Write-ahead publish auditing, runs kept apart, and superseded runs.
--
-- 1. Every Set-* is written to the audit log twice: an `intent` row that commits before the request
--    leaves, and one closing row after it: an `outcome` (Exchange answered) or a `settlement` (the
--    answer was lost - killed worker, client timeout, database gone - and the recipient was read back
--    from Exchange to decide whether the write was applied).
--
--    The rows stay in certsync.audit_log, told apart by `phase`, rather than in a second table:
--    one hash chain, one head to keep outside the database, one verifier and one place for auditors to
--    read "what was about to be sent, and what became of it" in order. A second chained table would
--    need its own head and could be cut or reordered against the first without either chain noticing.
--    Rows written before this migration have no phase (one row per attempt, request and answer
--    together); their hash text is unchanged, so the existing chain still verifies.
--
-- 2. The Exchange snapshot is kept per run (it was one table for everyone), so one run's plan never
--    diffs against another run's reading.
--
-- 3. Verdicts are kept per check time (they were overwritten in place), so a backfill validating at
--    an older time never replaces the verdict a newer run plans with; the plan and the auditor views
--    pick the verdict valid at the run's logical date.
--
-- 4. A run older than one that already planned or published is marked `superseded` and publishes
--    nothing.

-- ---------------------------------------------------------------- runs
ALTER TABLE certsync.sync_run DROP CONSTRAINT sync_run_state_check;
ALTER TABLE certsync.sync_run ADD CONSTRAINT sync_run_state_check
    CHECK (state IN ('running', 'succeeded', 'failed', 'superseded'));

-- ---------------------------------------------------------------- audit log
ALTER TABLE certsync.audit_log
    ADD COLUMN phase text,              -- intent | outcome | settlement; NULL only before this migration
    ADD COLUMN intent_seq bigint,        -- the intent an outcome or settlement closes (checked on insert)
    ADD COLUMN action_no integer,       -- the planned_action (run_id, action_no) the row is about
    ADD COLUMN task_try integer,        -- the task try that wrote the row (Airflow's try number; CLI 1)
    ADD COLUMN settled_by_run_id bigint REFERENCES certsync.sync_run (run_id);  -- who read back

ALTER TABLE certsync.audit_log ALTER COLUMN outcome DROP NOT NULL;
ALTER TABLE certsync.audit_log DROP CONSTRAINT audit_log_outcome_check;
-- NOT VALID: enforced for every new row, while the rows before this migration keep their shape.
ALTER TABLE certsync.audit_log ADD CONSTRAINT audit_log_phase_shape CHECK (phase IS NOT NULL AND (
    (phase = 'intent' AND outcome IS NULL AND intent_seq IS NULL AND task_try IS NOT NULL)
    OR (phase = 'outcome' AND outcome IN ('accepted', 'conflict', 'rejected', 'failed')
        AND intent_seq IS NOT NULL AND task_try IS NOT NULL)
    OR (phase = 'settlement' AND outcome IN ('applied', 'not_applied')
        AND intent_seq IS NOT NULL AND settled_by_run_id IS NOT NULL AND task_try IS NOT NULL)
)) NOT VALID;

-- An intent is closed once: a second outcome for the same request cannot be recorded.
CREATE UNIQUE INDEX audit_log_closed_once ON certsync.audit_log (intent_seq) WHERE intent_seq IS NOT NULL;
-- The open intents are looked up at the start of every publish and snapshot.
CREATE INDEX audit_log_intents ON certsync.audit_log (seq) WHERE phase = 'intent';

-- The hash covers the new columns for new rows; rows without a phase hash exactly as before.
CREATE OR REPLACE FUNCTION certsync.audit_row_text(r certsync.audit_log) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN r.phase IS NULL THEN base::text
                ELSE (base || jsonb_build_array(r.phase, r.intent_seq, r.action_no, r.task_try,
                                                r.settled_by_run_id))::text END
    FROM (SELECT jsonb_build_array(
        r.seq, to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        r.run_id, r.dag_id, r.airflow_run_id, r.object_guid, r.recipient_id, r.primary_smtp,
        r.cmdlet, r.action,
        (SELECT coalesce(jsonb_agg(encode(h, 'hex') ORDER BY n), '[]')
           FROM unnest(r.user_certificate) WITH ORDINALITY AS u(h, n)),
        (SELECT coalesce(jsonb_agg(encode(h, 'hex') ORDER BY n), '[]')
           FROM unnest(r.user_smime_certificate) WITH ORDINALITY AS u(h, n)),
        r.attempt, r.outcome, r.http_status, r.error_code, r.detail, r.client_request_id
    ) AS base) b
$$;

-- A closing row must close an intent of the same request and recipient.
CREATE FUNCTION certsync.audit_pairing() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.phase IN ('outcome', 'settlement') AND NOT EXISTS (
        SELECT FROM certsync.audit_log i
        WHERE i.seq = NEW.intent_seq AND i.phase = 'intent' AND i.run_id = NEW.run_id
          AND i.client_request_id = NEW.client_request_id AND i.recipient_id = NEW.recipient_id
    ) THEN
        RAISE EXCEPTION 'audit row % does not close an intent of request %', NEW.phase, NEW.client_request_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_pairing BEFORE INSERT ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.audit_pairing();
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_pairing;

-- Each Set-* with its intent and what became of it (one row per request), for auditors.
CREATE VIEW certsync.publish_requests AS
SELECT i.seq AS intent_seq, i.at AS intended_at, i.run_id, i.dag_id, i.airflow_run_id, i.task_try,
       i.primary_smtp, i.recipient_id, i.cmdlet, i.action, i.attempt, i.client_request_id,
       cardinality(i.user_certificate) AS user_certs, cardinality(i.user_smime_certificate) AS smime_blobs,
       c.phase AS closed_by, c.at AS closed_at, c.outcome, c.http_status, c.error_code, c.detail,
       c.settled_by_run_id
FROM certsync.audit_log i
LEFT JOIN certsync.audit_log c ON c.intent_seq = i.seq
WHERE i.phase = 'intent';

-- ---------------------------------------------------------------- the Exchange snapshot, per run
ALTER TABLE certsync.exo_recipient DROP CONSTRAINT exo_recipient_pkey;
ALTER TABLE certsync.exo_recipient ADD PRIMARY KEY (seen_run_id, recipient_id);
ALTER TABLE certsync.exo_recipient DROP CONSTRAINT exo_recipient_seen_run_id_fkey;
ALTER TABLE certsync.exo_recipient ADD CONSTRAINT exo_recipient_seen_run_id_fkey
    FOREIGN KEY (seen_run_id) REFERENCES certsync.sync_run ON DELETE CASCADE;

-- ---------------------------------------------------------------- verdicts, per check time
ALTER TABLE certsync.cert_verdict DROP CONSTRAINT cert_verdict_pkey;
ALTER TABLE certsync.cert_verdict ADD PRIMARY KEY (sha256, attribute, trust_fingerprint, checked_at);

-- The verdict on a value that holds at `at`: made at or before it, and not yet run out.
CREATE FUNCTION certsync.verdict_at(value_sha256 bytea, value_attribute text, fingerprint text, at timestamptz)
RETURNS SETOF certsync.cert_verdict
LANGUAGE sql STABLE AS $$
    SELECT * FROM certsync.cert_verdict c
    WHERE c.sha256 = value_sha256 AND c.attribute = value_attribute AND c.trust_fingerprint = fingerprint
      AND c.checked_at <= at AND (c.valid_until IS NULL OR at < c.valid_until)
    ORDER BY c.checked_at DESC
    LIMIT 1
$$;

CREATE OR REPLACE VIEW certsync.value_verdicts AS
SELECT r.run_id, s.dag_id, s.airflow_run_id, s.logical_date,
       u.sam_account_name, u.mail, r.object_guid, r.attribute, encode(r.sha256, 'hex') AS sha256,
       r.selected, r.reason, r.rule, r.detail,
       v.subject, v.issuer, v.serial, v.not_before, v.not_after
FROM certsync.value_result r
JOIN certsync.sync_run s USING (run_id)
LEFT JOIN certsync.staging_user u ON u.run_id = r.run_id AND u.object_guid = r.object_guid
LEFT JOIN LATERAL certsync.verdict_at(r.sha256, r.attribute, s.trust_fingerprint, s.logical_date) v ON true;

-- As in 0004, over the newest snapshot and each value's newest verdict.
CREATE OR REPLACE FUNCTION certsync.expiring_within(horizon interval, at timestamptz DEFAULT now())
RETURNS TABLE (primary_smtp text, attribute text, subject text, serial text, not_after timestamptz)
LANGUAGE sql STABLE AS $$
    WITH latest AS (
        SELECT trust_fingerprint FROM certsync.sync_run
        WHERE trust_fingerprint IS NOT NULL ORDER BY run_id DESC LIMIT 1
    ), snapshot AS (
        SELECT * FROM certsync.exo_recipient
        WHERE seen_run_id = (SELECT max(seen_run_id) FROM certsync.exo_recipient)
    ), held AS (
        SELECT e.primary_smtp, 'userCertificate' AS attribute, h AS sha256
        FROM snapshot e, unnest(e.user_certificate) AS h
        UNION ALL
        SELECT e.primary_smtp, 'userSMIMECertificate', h
        FROM snapshot e, unnest(e.user_smime_certificate) AS h
    )
    SELECT held.primary_smtp, held.attribute, v.subject, v.serial, v.not_after
    FROM held
    CROSS JOIN latest
    JOIN LATERAL (
        SELECT c.subject, c.serial, c.not_after FROM certsync.cert_verdict c
        WHERE c.sha256 = held.sha256 AND c.attribute = held.attribute
          AND c.trust_fingerprint = latest.trust_fingerprint
        ORDER BY c.checked_at DESC LIMIT 1
    ) v ON true
    WHERE v.not_after >= at AND v.not_after < at + horizon
    ORDER BY v.not_after, held.primary_smtp
$$;

-- ---------------------------------------------------------------- grants
-- The audit log stays insert/select only for the application (its grants are per table and unchanged).
GRANT SELECT ON certsync.publish_requests TO certsync_app, certsync_auditor;
