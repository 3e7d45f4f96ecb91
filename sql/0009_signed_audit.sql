-- Signed audit rows: the writer signs every row with an Ed25519 key held outside the database.
--
-- Until now the chain was computed by a trigger: anyone who could switch the triggers off (or
-- redefine certsync.audit_row_text and certsync.audit_chain_breaks) could rewrite the history and
-- re-hash it so that the database's own check said intact. From this migration on:
--   * the writer (certsync, holding the key from the connection certsync_audit_signing) chooses
--     seq, at and prev_hash under the chain's advisory lock, hashes a canonical encoding of the row
--     (certsync/audit/encoding.py: typed, length-prefixed fields, including prev_hash and key_id) and
--     signs that hash; the row carries row_hash, key_id and signature;
--   * a key row (phase 'key') records in the chain itself each key that signs from then on: its
--     public key, signed by the new key and, when the old key was available, endorsed by it;
--   * `certsync audit verify` reads the raw columns, recomputes every hash and signature in Python
--     and checks them against signed checkpoints kept outside the database. No view, function or
--     trigger of this schema is trusted by it.
-- Rows written before this migration keep their database-made hashes; the verifier recomputes
-- them in Python, and the first key row's signature covers the last of them (and so all of them).

ALTER TABLE certsync.audit_log
    ADD COLUMN key_id          text,   -- the key that signed the row ('ed25519:' + 16 hex digits)
    ADD COLUMN signature       bytea,  -- Ed25519 over the row hash
    ADD COLUMN public_key      bytea,  -- key rows: the raw 32-byte public key that signs from here on
    ADD COLUMN key_endorsement bytea;  -- key rows: the previous key's signature over the row hash

-- Key rows belong to the run that wrote them, but to no recipient or request.
ALTER TABLE certsync.audit_log
    ALTER COLUMN object_guid DROP NOT NULL,
    ALTER COLUMN recipient_id DROP NOT NULL,
    ALTER COLUMN primary_smtp DROP NOT NULL,
    ALTER COLUMN cmdlet DROP NOT NULL,
    ALTER COLUMN action DROP NOT NULL,
    ALTER COLUMN user_certificate DROP NOT NULL,
    ALTER COLUMN user_smime_certificate DROP NOT NULL,
    ALTER COLUMN attempt DROP NOT NULL,
    ALTER COLUMN client_request_id DROP NOT NULL;

-- NOT VALID as in 0006: binds every new row, while rows from before keep their shape.
ALTER TABLE certsync.audit_log DROP CONSTRAINT audit_log_phase_shape;
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

-- The writer looks up the chain's current key on every append.
CREATE INDEX audit_log_keys ON certsync.audit_log (seq) WHERE phase = 'key';

-- The insert trigger no longer computes anything: it keeps the chain linear (a row must extend the
-- current head: the next seq, the head's hash) and refuses unsigned rows. It cannot check the
-- signature; the verifier does.
CREATE OR REPLACE FUNCTION certsync.audit_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last_seq  bigint;
    last_hash bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('certsync.audit_log'));
    SELECT seq, row_hash INTO last_seq, last_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1;
    IF NEW.signature IS NULL OR NEW.key_id IS NULL THEN
        RAISE EXCEPTION 'audit rows are signed by their writer: an unsigned row is refused'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.seq IS DISTINCT FROM coalesce(last_seq, 0) + 1
       OR NEW.prev_hash IS DISTINCT FROM coalesce(last_hash, '\x'::bytea) THEN
        RAISE EXCEPTION 'audit row % does not extend the chain head %', NEW.seq, coalesce(last_seq, 0)
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;

-- A quick look from inside the database (links and sequence only; for unsigned rows from before
-- 0009 also the recomputed hash). It is a convenience: whoever controls the database controls
-- this view too. The authority is `certsync audit verify` with the public key and a checkpoint.
CREATE OR REPLACE VIEW certsync.audit_chain_breaks AS
WITH chain AS (
    SELECT a.seq, a.prev_hash, a.row_hash, a.signature,
           lag(a.row_hash) OVER (ORDER BY a.seq) AS expected_prev,
           lag(a.seq) OVER (ORDER BY a.seq) AS prev_seq,
           CASE WHEN a.signature IS NULL
                THEN sha256(a.prev_hash || convert_to(certsync.audit_row_text(a), 'UTF8')) END AS recomputed
    FROM certsync.audit_log a
)
SELECT seq,
       CASE WHEN seq <> coalesce(prev_seq, 0) + 1 THEN 'sequence_gap'
            WHEN prev_hash <> coalesce(expected_prev, '\x'::bytea) THEN 'broken_link'
            ELSE 'altered_row' END AS problem
FROM chain
WHERE seq <> coalesce(prev_seq, 0) + 1
   OR prev_hash <> coalesce(expected_prev, '\x'::bytea)
   OR (signature IS NULL AND row_hash <> recomputed);

-- The keys that signed the chain, in order, for auditors.
CREATE VIEW certsync.audit_keys AS
SELECT seq, at, key_id, encode(public_key, 'base64') AS public_key, key_endorsement IS NOT NULL AS endorsed,
       run_id, dag_id, airflow_run_id
FROM certsync.audit_log
WHERE phase = 'key';

GRANT SELECT ON certsync.audit_keys TO certsync_app, certsync_auditor;
