-- The audit log: one row per publish attempt, append-only and hash-chained.
-- Each row's hash covers its content and the previous row's hash, over a gap-free sequence,
-- so removing, inserting or altering any row breaks the chain (see certsync.audit_chain_breaks).

CREATE TABLE certsync.audit_log (
    seq               bigint      PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    run_id            bigint      NOT NULL REFERENCES certsync.sync_run,
    dag_id            text        NOT NULL,
    airflow_run_id    text        NOT NULL,
    object_guid       uuid        NOT NULL,
    recipient_id      text        NOT NULL,
    primary_smtp      text        NOT NULL,
    cmdlet            text        NOT NULL,
    action            text        NOT NULL,
    user_certificate       bytea[] NOT NULL,
    user_smime_certificate bytea[] NOT NULL,
    attempt           integer     NOT NULL,
    outcome           text        NOT NULL CHECK (outcome IN ('accepted', 'conflict', 'rejected', 'failed')),
    http_status       integer,
    error_code        text,
    detail            text,
    client_request_id uuid        NOT NULL,
    prev_hash         bytea       NOT NULL,
    row_hash          bytea       NOT NULL
);

-- A retried publish continues its attempt count per run and recipient; auditors ask per address.
CREATE INDEX audit_log_run_recipient ON certsync.audit_log (run_id, recipient_id);
CREATE INDEX audit_log_smtp ON certsync.audit_log (lower(primary_smtp), seq);

-- The canonical text a row's hash covers: a JSON array, so no field can bleed into the next.
CREATE FUNCTION certsync.audit_row_text(r certsync.audit_log) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_array(
        r.seq, to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        r.run_id, r.dag_id, r.airflow_run_id, r.object_guid, r.recipient_id, r.primary_smtp,
        r.cmdlet, r.action,
        (SELECT coalesce(jsonb_agg(encode(h, 'hex') ORDER BY n), '[]')
           FROM unnest(r.user_certificate) WITH ORDINALITY AS u(h, n)),
        (SELECT coalesce(jsonb_agg(encode(h, 'hex') ORDER BY n), '[]')
           FROM unnest(r.user_smime_certificate) WITH ORDINALITY AS u(h, n)),
        r.attempt, r.outcome, r.http_status, r.error_code, r.detail, r.client_request_id
    )::text
$$;

-- Chains each new row to the last one. The advisory lock serialises writers (parallel publish
-- tasks) until commit, which keeps the sequence gap-free and the chain linear.
CREATE FUNCTION certsync.audit_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last certsync.audit_log;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('certsync.audit_log'));
    SELECT * INTO last FROM certsync.audit_log ORDER BY seq DESC LIMIT 1;
    NEW.seq := coalesce(last.seq, 0) + 1;
    NEW.at := clock_timestamp();
    NEW.prev_hash := coalesce(last.row_hash, '\x'::bytea);
    NEW.row_hash := sha256(NEW.prev_hash || convert_to(certsync.audit_row_text(NEW), 'UTF8'));
    RETURN NEW;
END
$$;

CREATE FUNCTION certsync.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'certsync.% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.audit_chain();
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON certsync.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_change();
-- ENABLE ALWAYS: the guards fire even with session_replication_role = replica.
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update;
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;

-- Rows whose stored hashes do not match a recomputation, or whose sequence has a gap.
-- An empty result means the chain is intact.
CREATE VIEW certsync.audit_chain_breaks AS
WITH chain AS (
    SELECT a.seq, a.prev_hash, a.row_hash,
           lag(a.row_hash) OVER (ORDER BY a.seq) AS expected_prev,
           lag(a.seq) OVER (ORDER BY a.seq) AS prev_seq,
           sha256(a.prev_hash || convert_to(certsync.audit_row_text(a), 'UTF8')) AS recomputed
    FROM certsync.audit_log a
)
SELECT seq,
       CASE WHEN seq <> coalesce(prev_seq, 0) + 1 THEN 'sequence_gap'
            WHEN prev_hash <> coalesce(expected_prev, '\x'::bytea) THEN 'broken_link'
            ELSE 'altered_row' END AS problem
FROM chain
WHERE seq <> coalesce(prev_seq, 0) + 1
   OR prev_hash <> coalesce(expected_prev, '\x'::bytea)
   OR row_hash <> recomputed;
