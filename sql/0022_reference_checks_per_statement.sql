-- The tables written in bulk check what they reference once per statement, not once per row.
--
-- A foreign key checks each row it inserts on its own, with a lookup of the referenced row. At
-- 100,000 users a run writes about 100,000 rows of its Exchange snapshot (exo_recipient), 190,000
-- value results (a delta plan copies its base's for the users it does not plan again), the actions,
-- and on a full read 250,000 staging rows; a first run also 190,000 values and verdicts, each naming
-- its certificate (cert_blob). Measured: 373 ms of the 637 ms of copying 37,810 value results went
-- to the key's checks, and a first extract at 100,000 users spent 3.7 s checking its values' blobs.
--
-- Instead: an AFTER INSERT trigger per statement looks up the new rows' references in one anti-join
-- and refuses the statement (foreign_key_violation, as the key did) when one does not exist; a row
-- trigger does the same for an UPDATE that changes a reference (nothing in certsync does); deleting
-- runs deletes their rows in these tables, as ON DELETE CASCADE did, and deleting a certificate
-- that a value or a verdict names is refused, as the key did.

CREATE FUNCTION certsync.check_references_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    missing text;  -- TG_ARGV: the column, the referenced table and its column
BEGIN
    EXECUTE format(
        'SELECT n.%1$I::text FROM new_rows n WHERE NOT EXISTS'
        ' (SELECT FROM certsync.%2$I p WHERE p.%3$I = n.%1$I) LIMIT 1', TG_ARGV[0], TG_ARGV[1], TG_ARGV[2])
    INTO missing;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'insert into certsync.% names %.% %, which does not exist',
            TG_TABLE_NAME, TG_ARGV[1], TG_ARGV[2], missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION certsync.check_reference_updated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT FROM certsync.%2$I p WHERE p.%3$I = ($1).%1$I)',
        TG_ARGV[0], TG_ARGV[1], TG_ARGV[2]) USING NEW INTO found;
    IF NOT found THEN
        RAISE EXCEPTION 'update of certsync.% names a % that does not exist', TG_TABLE_NAME, TG_ARGV[1]
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END
$$;

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('staging_user', 'run_id', 'sync_run', 'run_id'),
        ('staging_value', 'run_id', 'sync_run', 'run_id'),
        ('exo_recipient', 'seen_run_id', 'sync_run', 'run_id'),
        ('value_result', 'run_id', 'sync_run', 'run_id'),
        ('planned_action', 'run_id', 'sync_run', 'run_id'),
        ('source_value', 'sha256', 'cert_blob', 'sha256'),
        ('cert_verdict', 'sha256', 'cert_blob', 'sha256')) AS v(tab, col, parent, parent_col)
    LOOP
        EXECUTE format('ALTER TABLE certsync.%I DROP CONSTRAINT %I', t.tab, t.tab || '_' || t.col || '_fkey');
        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER INSERT ON certsync.%2$I REFERENCING NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION certsync.check_references_inserted(%3$L, %4$L, %5$L)',
            t.parent || '_exists', t.tab, t.col, t.parent, t.parent_col);
        EXECUTE format(
            'CREATE TRIGGER %1$I BEFORE UPDATE OF %3$I ON certsync.%2$I FOR EACH ROW'
            ' WHEN (OLD.%3$I IS DISTINCT FROM NEW.%3$I)'
            ' EXECUTE FUNCTION certsync.check_reference_updated(%3$L, %4$L, %5$L)',
            t.parent || '_still_exists', t.tab, t.col, t.parent, t.parent_col);
    END LOOP;
END
$$;

CREATE FUNCTION certsync.delete_rows_of_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM certsync.staging_user r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.staging_value r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.exo_recipient r USING old_runs o WHERE r.seen_run_id = o.run_id;
    DELETE FROM certsync.value_result r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.planned_action r USING old_runs o WHERE r.run_id = o.run_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER rows_of_runs_deleted AFTER DELETE ON certsync.sync_run REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.delete_rows_of_runs();

CREATE FUNCTION certsync.refuse_deleting_named_blobs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM old_blobs o WHERE EXISTS (SELECT FROM certsync.source_value v WHERE v.sha256 = o.sha256)
                                          OR EXISTS (SELECT FROM certsync.cert_verdict c WHERE c.sha256 = o.sha256)) THEN
        RAISE EXCEPTION 'a certificate deleted from certsync.cert_blob is still named by a value or a verdict'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER named_blobs_kept AFTER DELETE ON certsync.cert_blob REFERENCING OLD TABLE AS old_blobs
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_deleting_named_blobs();
