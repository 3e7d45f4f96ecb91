-- A second closing row for one intent is refused under a constraint name of its own.
--
-- Two publish tasks of a run can both find an intent open and both read back its request; the one
-- that records its settlement second is refused by audit_pairing (0014) and leaves the intent to the
-- first. certsync told that refusal from others by its message text. Each refusal now names its
-- rule (the error's constraint name, which no rewording changes): audit_log_closed_once, the name
-- of the unique index that enforced it before 0014, and audit_log_pairing, the trigger's. The
-- checks are 0014's, unchanged; the search_path is pinned, as the later guards' are, so an
-- inserting session's search_path cannot change what the function's names resolve to.

CREATE OR REPLACE FUNCTION certsync.audit_pairing() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.phase IN ('outcome', 'settlement') AND NOT EXISTS (
        SELECT FROM certsync.audit_log i
        WHERE i.seq = NEW.intent_seq AND i.phase = 'intent' AND i.run_id = NEW.run_id
          AND i.client_request_id = NEW.client_request_id AND i.recipient_id = NEW.recipient_id
    ) THEN
        RAISE EXCEPTION 'audit row % does not close an intent of request %', NEW.phase, NEW.client_request_id
            USING ERRCODE = 'integrity_constraint_violation', CONSTRAINT = 'audit_log_pairing';
    END IF;
    IF NEW.intent_seq IS NOT NULL AND EXISTS (
        SELECT FROM certsync.audit_log c WHERE c.intent_seq = NEW.intent_seq
    ) THEN
        RAISE EXCEPTION 'intent % is already closed', NEW.intent_seq
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'audit_log_closed_once';
    END IF;
    RETURN NEW;
END
$$;
