-- The audit log partitioned by month, so that old months can be taken out whole (`certsync audit
-- detach`) while what remains still verifies.
--
-- Partition key: `at`, the time the writer took from the database's clock under the chain's lock.
-- A month is a range of `at` in UTC ([first day 00:00, first day of the next month 00:00)). The
-- writer takes the time after the lock, so `at` rises with `seq` and each month holds one
-- contiguous stretch of the chain; `certsync audit detach` checks this before it cuts (a clock that
-- stepped back across a month's end would make it refuse, never cut the chain in the wrong place).
--
-- What changes for the keys and constraints (PostgreSQL requires a unique key of a partitioned
-- table to contain the partition key):
--   * the primary key is (seq, at). That `seq` alone is unique and gap-free is kept by the insert
--     trigger (certsync.audit_chain: a row must carry the head's seq + 1 and the head's hash, under
--     the chain's advisory lock), and, as before, proved by `certsync audit verify`;
--   * "an intent is closed once" was a unique index on intent_seq; it is now checked by the
--     pairing trigger under the same lock, and audit_log_closed_once stays as a plain index for
--     that check and for the publish_requests view;
--   * the foreign keys to sync_run (run_id, settled_by_run_id) are kept: a run's record lives as
--     long as audit rows that name it. Once the months holding a run's rows are dropped, the run's
--     record can be deleted; runs are no longer held for ever. No table refers to audit_log by a
--     foreign key (intent_seq is checked by the trigger), so detaching a month breaks no reference.
--
-- Partitions are made by certsync.audit_log_ensure_partitions(), owned by the schema owner and run
-- with its rights (SECURITY DEFINER), which the application calls at the start of every run for
-- this month and the next. The application cannot create, drop or own a partition itself. A row
-- whose month has no partition (a clock far off, or no run for a month) lands in
-- certsync.audit_log_default and is kept: a publish never fails for a missing partition.
--
-- Cuts: `certsync audit detach --before YYYY-MM [--drop]`, run by the owner with the signing key,
-- verifies the whole log, requires a signed checkpoint at or after the last row it takes out,
-- exports every month it takes out (a file that verifies offline on its own), signs a `cut` at the
-- last row of each month and records it in certsync.audit_cut, then detaches (or drops) the month.
-- The verifier accepts missing rows before the first remaining row only when a signed cut at the row
-- before says so; a month missing anywhere else is a gap and is named.
--
-- The existing rows are copied into the new table unchanged (same seq, at, hashes and signatures),
-- so the chain verifies as before.

LOCK TABLE certsync.audit_log IN ACCESS EXCLUSIVE MODE;

-- ---------------------------------------------------------------- what depends on the old table
DROP VIEW certsync.certificate_history;
DROP VIEW certsync.recipient_certificate_timeline;
DROP VIEW certsync.published_states;
DROP VIEW certsync.publish_requests;
DROP VIEW certsync.audit_keys;
DROP VIEW certsync.audit_chain_breaks;
DROP FUNCTION certsync.audit_row_text(certsync.audit_log);

ALTER TABLE certsync.audit_log RENAME TO audit_log_unpartitioned;
-- Index names are per schema: the old table's go, so the new table's keep the names auditors know.
ALTER INDEX certsync.audit_log_pkey RENAME TO audit_log_unpartitioned_pkey;
DROP INDEX certsync.audit_log_closed_once;
DROP INDEX certsync.audit_log_intents;
DROP INDEX certsync.audit_log_keys;
DROP INDEX certsync.audit_log_run_recipient;
DROP INDEX certsync.audit_log_smtp;

-- ---------------------------------------------------------------- the partitioned table
CREATE TABLE certsync.audit_log (
    seq               bigint      NOT NULL,
    at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    run_id            bigint      NOT NULL,
    dag_id            text        NOT NULL,
    airflow_run_id    text        NOT NULL,
    object_guid       uuid,
    recipient_id      text,
    primary_smtp      text,
    cmdlet            text,
    action            text,
    user_certificate       bytea[],
    user_smime_certificate bytea[],
    attempt           integer,
    outcome           text,
    http_status       integer,
    error_code        text,
    detail            text,
    client_request_id uuid,
    prev_hash         bytea       NOT NULL,
    row_hash          bytea       NOT NULL,
    phase             text,
    intent_seq        bigint,
    action_no         integer,
    task_try          integer,
    settled_by_run_id bigint,
    key_id            text,
    signature         bytea,
    public_key        bytea,
    key_endorsement   bytea,
    PRIMARY KEY (seq, at)
) PARTITION BY RANGE (at);

CREATE TABLE certsync.audit_log_default PARTITION OF certsync.audit_log DEFAULT;

CREATE INDEX audit_log_run_recipient ON certsync.audit_log (run_id, recipient_id);
CREATE INDEX audit_log_smtp ON certsync.audit_log (lower(primary_smtp), seq);
CREATE INDEX audit_log_closed_once ON certsync.audit_log (intent_seq) WHERE intent_seq IS NOT NULL;
CREATE INDEX audit_log_intents ON certsync.audit_log (seq) WHERE phase = 'intent';
CREATE INDEX audit_log_keys ON certsync.audit_log (seq) WHERE phase = 'key';

-- One month's partition, named audit_log_YYYY_MM, made with the owner's rights. Returns its name,
-- or NULL when it cannot be made now (its rows already sit in the default partition, or the table
-- is busy for more than a few seconds): the caller carries on, and the default partition takes
-- the rows.
CREATE FUNCTION certsync.audit_log_ensure_partition(month date) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' AS $$
DECLARE
    first_day timestamp   := date_trunc('month', month::timestamp);
    lo        timestamptz := first_day AT TIME ZONE 'UTC';
    hi        timestamptz := (first_day + interval '1 month') AT TIME ZONE 'UTC';
    name      text        := 'audit_log_' || to_char(first_day, 'YYYY_MM');
BEGIN
    IF to_regclass('certsync.' || name) IS NOT NULL THEN
        RETURN name;  -- made before (or detached by the operator: never made again)
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('certsync.audit_log partitions'));
    IF to_regclass('certsync.' || name) IS NOT NULL THEN
        RETURN name;
    END IF;
    IF EXISTS (SELECT FROM certsync.audit_log_default WHERE at >= lo AND at < hi) THEN
        RAISE NOTICE 'audit rows of % are in certsync.audit_log_default; no partition made', name;
        RETURN NULL;
    END IF;
    BEGIN
        EXECUTE format('CREATE TABLE certsync.%I PARTITION OF certsync.audit_log FOR VALUES FROM (%L) TO (%L)',
                       name, lo, hi);
    EXCEPTION WHEN lock_not_available THEN
        RAISE NOTICE 'certsync.audit_log is busy; partition % not made now', name;
        RETURN NULL;
    END;
    RETURN name;
END
$$;

-- This month's and next month's partitions (the application calls it as each run begins; it takes
-- no argument, so the application can make no other month's partition).
CREATE FUNCTION certsync.audit_log_ensure_partitions() RETURNS SETOF text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT certsync.audit_log_ensure_partition((now() AT TIME ZONE 'UTC')::date)
    UNION ALL
    SELECT certsync.audit_log_ensure_partition(((now() AT TIME ZONE 'UTC') + interval '1 month')::date)
$$;

REVOKE ALL ON FUNCTION certsync.audit_log_ensure_partition(date) FROM PUBLIC;
REVOKE ALL ON FUNCTION certsync.audit_log_ensure_partitions() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION certsync.audit_log_ensure_partitions() TO certsync_app;

-- A partition for every month the old table has rows in, up to next month.
DO $$
BEGIN
    PERFORM certsync.audit_log_ensure_partition(month::date)
    FROM generate_series(
        date_trunc('month', coalesce((SELECT min(at) FROM certsync.audit_log_unpartitioned), now()) AT TIME ZONE 'UTC'),
        date_trunc('month', greatest(now(), (SELECT max(at) FROM certsync.audit_log_unpartitioned)) AT TIME ZONE 'UTC')
            + interval '1 month',
        interval '1 month'
    ) AS month;
END
$$;

INSERT INTO certsync.audit_log
SELECT seq, at, run_id, dag_id, airflow_run_id, object_guid, recipient_id, primary_smtp, cmdlet, action,
       user_certificate, user_smime_certificate, attempt, outcome, http_status, error_code, detail,
       client_request_id, prev_hash, row_hash, phase, intent_seq, action_no, task_try, settled_by_run_id,
       key_id, signature, public_key, key_endorsement
FROM certsync.audit_log_unpartitioned
ORDER BY seq;

DROP TABLE certsync.audit_log_unpartitioned;

-- Added after the old table is gone, so that they keep their names.
ALTER TABLE certsync.audit_log ADD FOREIGN KEY (run_id) REFERENCES certsync.sync_run;
ALTER TABLE certsync.audit_log ADD FOREIGN KEY (settled_by_run_id) REFERENCES certsync.sync_run (run_id);

-- As in 0009: binding every new row, while rows from before keep their shape.
ALTER TABLE certsync.audit_log ADD CONSTRAINT audit_log_phase_shape CHECK (phase IS NOT NULL AND (
    (phase = 'key' AND public_key IS NOT NULL AND length(public_key) = 32 AND object_guid IS NULL)
    OR (phase <> 'key' AND public_key IS NULL AND key_endorsement IS NULL
        AND object_guid IS NOT NULL AND recipient_id IS NOT NULL AND primary_smtp IS NOT NULL
        AND cmdlet IS NOT NULL AND action IS NOT NULL AND user_certificate IS NOT NULL
        AND user_smime_certificate IS NOT NULL AND attempt IS NOT NULL AND client_request_id IS NOT NULL
        AND task_try IS NOT NULL AND (
            (phase = 'intent' AND outcome IS NULL AND intent_seq IS NULL)
            OR (phase = 'outcome' AND outcome IN ('accepted', 'conflict', 'rejected', 'failed')
                AND intent_seq IS NOT NULL)
            OR (phase = 'settlement' AND outcome IN ('applied', 'not_applied')
                AND intent_seq IS NOT NULL AND settled_by_run_id IS NOT NULL)))
)) NOT VALID;
ALTER TABLE certsync.audit_log ADD CONSTRAINT audit_log_signed CHECK (
    key_id IS NOT NULL AND length(signature) = 64 AND length(row_hash) = 32 AND length(prev_hash) IN (0, 32)
) NOT VALID;

-- ---------------------------------------------------------------- guards (the functions of 0002/0006/0009)
-- A closing row must close an intent of the same request and recipient, and only once. The chain
-- trigger (which fires first: triggers fire in name order) holds the chain's lock, so two closings
-- of one intent cannot pass this check together.
CREATE OR REPLACE FUNCTION certsync.audit_pairing() RETURNS trigger
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
    IF NEW.intent_seq IS NOT NULL AND EXISTS (
        SELECT FROM certsync.audit_log c WHERE c.intent_seq = NEW.intent_seq
    ) THEN
        RAISE EXCEPTION 'intent % is already closed', NEW.intent_seq
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.audit_chain();
CREATE TRIGGER audit_log_pairing BEFORE INSERT ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.audit_pairing();
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON certsync.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_change();
-- ENABLE ALWAYS: the guards fire even with session_replication_role = replica (row triggers are
-- cloned onto every partition, made now or later).
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_pairing;
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update;
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;

-- ---------------------------------------------------------------- the views and function, as before
CREATE FUNCTION certsync.audit_row_text(r certsync.audit_log) RETURNS text
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

-- A convenience from inside the database, as in 0009 (the authority is `certsync audit verify`).
-- After a cut the first remaining row links to the cut, not to a row here: it is not listed.
CREATE VIEW certsync.audit_chain_breaks AS
WITH chain AS (
    SELECT a.seq, a.prev_hash, a.row_hash, a.signature,
           coalesce(lag(a.row_hash) OVER (ORDER BY a.seq),
                    CASE WHEN a.seq = 1 THEN '\x'::bytea ELSE a.prev_hash END) AS expected_prev,
           coalesce(lag(a.seq) OVER (ORDER BY a.seq), a.seq - 1) AS prev_seq,
           CASE WHEN a.signature IS NULL
                THEN sha256(a.prev_hash || convert_to(certsync.audit_row_text(a), 'UTF8')) END AS recomputed
    FROM certsync.audit_log a
)
SELECT seq,
       CASE WHEN seq <> prev_seq + 1 THEN 'sequence_gap'
            WHEN prev_hash <> expected_prev THEN 'broken_link'
            ELSE 'altered_row' END AS problem
FROM chain
WHERE seq <> prev_seq + 1
   OR prev_hash <> expected_prev
   OR (signature IS NULL AND row_hash <> recomputed);

CREATE VIEW certsync.audit_keys AS
SELECT seq, at, key_id, encode(public_key, 'base64') AS public_key, key_endorsement IS NOT NULL AS endorsed,
       run_id, dag_id, airflow_run_id
FROM certsync.audit_log
WHERE phase = 'key';

CREATE VIEW certsync.publish_requests AS
SELECT i.seq AS intent_seq, i.at AS intended_at, i.run_id, i.dag_id, i.airflow_run_id, i.task_try,
       i.primary_smtp, i.recipient_id, i.cmdlet, i.action, i.attempt, i.client_request_id,
       cardinality(i.user_certificate) AS user_certs, cardinality(i.user_smime_certificate) AS smime_blobs,
       c.phase AS closed_by, c.at AS closed_at, c.outcome, c.http_status, c.error_code, c.detail,
       c.settled_by_run_id
FROM certsync.audit_log i
LEFT JOIN certsync.audit_log c ON c.intent_seq = i.seq
WHERE i.phase = 'intent';

CREATE VIEW certsync.published_states AS
SELECT a.seq, a.at, a.run_id, a.airflow_run_id, a.recipient_id, a.primary_smtp, a.cmdlet, a.action,
       a.user_certificate, a.user_smime_certificate,
       lead(a.at) OVER w AS until, lead(a.seq) OVER w AS until_seq,
       row_number() OVER w AS state_no
FROM certsync.audit_log a
WHERE (a.phase = 'outcome' AND a.outcome = 'accepted')
   OR (a.phase = 'settlement' AND a.outcome = 'applied')
   OR (a.phase IS NULL AND a.outcome = 'accepted')
WINDOW w AS (PARTITION BY a.recipient_id ORDER BY a.seq);

CREATE VIEW certsync.recipient_certificate_timeline AS
WITH held AS (
    SELECT s.*, 'userCertificate' AS attribute, h AS sha256
    FROM certsync.published_states s, unnest(s.user_certificate) AS h
    UNION ALL
    SELECT s.*, 'userSMIMECertificate', h
    FROM certsync.published_states s, unnest(s.user_smime_certificate) AS h
), islands AS (
    SELECT held.*,
           state_no - row_number() OVER (PARTITION BY recipient_id, attribute, sha256 ORDER BY state_no) AS island
    FROM held
), stretches AS (
    SELECT recipient_id, attribute, sha256, island,
           min(at) AS held_from, min(seq) AS from_seq,
           (array_agg(until ORDER BY state_no DESC))[1] AS held_until,
           (array_agg(until_seq ORDER BY state_no DESC))[1] AS until_seq,
           (array_agg(primary_smtp ORDER BY state_no DESC))[1] AS primary_smtp,
           (array_agg(run_id ORDER BY state_no))[1] AS added_by_run_id,
           (array_agg(airflow_run_id ORDER BY state_no))[1] AS added_by_airflow_run_id
    FROM islands
    GROUP BY recipient_id, attribute, sha256, island
)
SELECT st.recipient_id, st.primary_smtp, st.attribute, encode(st.sha256, 'hex') AS sha256,
       tstzrange(st.held_from, st.held_until) AS held,
       st.added_by_run_id, st.added_by_airflow_run_id, st.from_seq AS added_by_seq,
       removed.run_id AS removed_by_run_id, st.until_seq AS removed_by_seq,
       v.subject, v.issuer, v.serial, v.not_before, v.not_after
FROM stretches st
LEFT JOIN certsync.audit_log removed ON removed.seq = st.until_seq
LEFT JOIN LATERAL (
    SELECT c.subject, c.issuer, c.serial, c.not_before, c.not_after FROM certsync.cert_verdict c
    WHERE c.sha256 = st.sha256 AND c.attribute = st.attribute ORDER BY c.checked_at DESC LIMIT 1
) v ON true;

CREATE VIEW certsync.certificate_history AS
SELECT sha256, serial, subject, issuer, not_after, primary_smtp, recipient_id, attribute, held,
       added_by_run_id, removed_by_run_id
FROM certsync.recipient_certificate_timeline;

-- ---------------------------------------------------------------- cuts and verifications
-- Every month taken out of the audit log: the rows it held, the hash the remaining chain starts
-- from (last_hash, which the next row's prev_hash must equal), the checkpoint that vouched for the
-- rows when they were taken out, and the signed cut (the same JSON as in the checkpoint file and
-- the month's export header). The verifier trusts the cut by its signature only.
CREATE TABLE certsync.audit_cut (
    month            date        PRIMARY KEY,     -- first day of the month taken out
    partition_name   text        NOT NULL,
    action           text        NOT NULL CHECK (action IN ('detached', 'dropped')),
    row_count        bigint      NOT NULL,
    first_seq        bigint,                      -- NULL for a month without rows
    last_seq         bigint,
    first_prev_hash  bytea,
    last_hash        bytea,
    active_key       text,                        -- the chain's key in force at last_seq
    vouched_by_seq   bigint,                      -- the signed checkpoint at or after last_seq
    vouched_by_head  bytea,
    export_sha256    text,                        -- of the month's export file
    cut              jsonb,                       -- the signed cut
    done_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    done_by          text        NOT NULL DEFAULT current_user
);

-- The verify_audit task's record of each verification: what it covered, how long it took, and a
-- mark signed with the audit key at the head it verified. The next run verifies from the newest
-- mark whose signature holds (incremental); a full verification starts from the first row.
CREATE TABLE certsync.audit_verification (
    verification_no  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    verified_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    mode             text        NOT NULL CHECK (mode IN ('full', 'incremental')),
    from_seq         bigint,
    to_seq           bigint,
    row_count        bigint      NOT NULL,
    seconds          double precision NOT NULL,
    mark             jsonb       NOT NULL
);

-- ---------------------------------------------------------------- grants, as before
GRANT SELECT, INSERT ON certsync.audit_log TO certsync_app;
GRANT SELECT ON certsync.audit_log TO certsync_auditor;
GRANT SELECT ON certsync.audit_chain_breaks, certsync.audit_keys, certsync.publish_requests,
    certsync.published_states, certsync.recipient_certificate_timeline, certsync.certificate_history
    TO certsync_app, certsync_auditor;
GRANT SELECT ON certsync.audit_cut TO certsync_app, certsync_auditor;
GRANT SELECT, INSERT ON certsync.audit_verification TO certsync_app;
GRANT SELECT ON certsync.audit_verification TO certsync_auditor;
