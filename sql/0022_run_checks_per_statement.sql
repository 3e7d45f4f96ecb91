-- The tables every run fills in bulk check that the run they name exists once per statement, not
-- once per row.
--
-- A foreign key checks each row it inserts on its own, with a lookup of sync_run. At 100,000 users
-- a run writes about 100,000 rows of its Exchange snapshot (exo_recipient), 190,000 value results
-- (a delta plan copies its base's for the users it does not plan again), the actions, and on a full
-- read 250,000 staging rows. Measured on a copy of 37,810 value results: 373 ms of the 637 ms the
-- INSERT took went to the foreign key's checks.
--
-- Instead: an AFTER INSERT trigger per statement looks the new rows' runs up in one anti-join, and
-- refuses the statement (foreign_key_violation, as the key did) when one does not exist; a row
-- trigger does the same for an UPDATE that changes a row's run (nothing in certsync does); and
-- deleting runs deletes their rows in these tables, as ON DELETE CASCADE did.

CREATE FUNCTION certsync.check_runs_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    missing bigint;
BEGIN
    EXECUTE format(
        'SELECT n.%1$I FROM new_rows n WHERE NOT EXISTS'
        ' (SELECT FROM certsync.sync_run s WHERE s.run_id = n.%1$I) LIMIT 1', TG_ARGV[0])
    INTO missing;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'insert into certsync.% names run %, which does not exist', TG_TABLE_NAME, missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION certsync.check_run_updated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    run bigint;
BEGIN
    EXECUTE format('SELECT ($1).%I', TG_ARGV[0]) USING NEW INTO run;
    IF NOT EXISTS (SELECT FROM certsync.sync_run s WHERE s.run_id = run) THEN
        RAISE EXCEPTION 'update of certsync.% names run %, which does not exist', TG_TABLE_NAME, run
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
        ('staging_user', 'run_id'), ('staging_value', 'run_id'), ('exo_recipient', 'seen_run_id'),
        ('value_result', 'run_id'), ('planned_action', 'run_id')) AS v(tab, col)
    LOOP
        EXECUTE format('ALTER TABLE certsync.%I DROP CONSTRAINT %I', t.tab, t.tab || '_' || t.col || '_fkey');
        EXECUTE format(
            'CREATE TRIGGER runs_exist AFTER INSERT ON certsync.%I REFERENCING NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION certsync.check_runs_inserted(%L)', t.tab, t.col);
        EXECUTE format(
            'CREATE TRIGGER run_exists BEFORE UPDATE OF %1$I ON certsync.%2$I FOR EACH ROW'
            ' WHEN (OLD.%1$I IS DISTINCT FROM NEW.%1$I) EXECUTE FUNCTION certsync.check_run_updated(%1$L)',
            t.col, t.tab);
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
