-- Two lookups every publish batch makes, kept from growing with the history (measured at 100,000
-- users: 67 ms and 55 ms per batch, about 30 s of PostgreSQL's time per run, growing with every run).
--
-- 1. A batch reads its pending actions by (run_id, batch). planned_action's key is (run_id,
--    action_no), so each batch scanned all of its run's actions.
CREATE INDEX planned_action_batch ON certsync.planned_action (run_id, batch, action_no);

-- 2. Before sending, a batch settles the intents nobody closed (a worker killed between its intent
--    and the answer). Finding them meant checking every intent ever written for a closing row.
--    certsync.open_intent names the intents not closed yet. It is derived from the audit log, not
--    part of it: the trigger below adds an intent when it is appended and removes it when its
--    outcome or settlement is, in the same transaction and under the chain's lock. The application
--    can only read it; what settles an intent is still the closing row in audit_log, checked
--    against the log itself (certsync.store.publishing.OPEN_INTENTS).
CREATE TABLE certsync.open_intent (
    seq bigint PRIMARY KEY,
    at  timestamptz NOT NULL
);

INSERT INTO certsync.open_intent (seq, at)
SELECT i.seq, i.at FROM certsync.audit_log i
WHERE i.phase = 'intent' AND NOT EXISTS (SELECT FROM certsync.audit_log c WHERE c.intent_seq = i.seq);

CREATE FUNCTION certsync.audit_track_open_intent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.phase = 'intent' THEN
        INSERT INTO certsync.open_intent (seq, at) VALUES (NEW.seq, NEW.at);
    ELSIF NEW.intent_seq IS NOT NULL THEN
        DELETE FROM certsync.open_intent WHERE seq = NEW.intent_seq;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION certsync.audit_track_open_intent() FROM PUBLIC;

-- AFTER the row is in: the chain trigger (BEFORE) has given it its seq.
CREATE TRIGGER audit_log_track_open_intent AFTER INSERT ON certsync.audit_log
    FOR EACH ROW EXECUTE FUNCTION certsync.audit_track_open_intent();
ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER audit_log_track_open_intent;

REVOKE ALL ON certsync.open_intent FROM certsync_app;
GRANT SELECT ON certsync.open_intent TO certsync_app, certsync_auditor;
