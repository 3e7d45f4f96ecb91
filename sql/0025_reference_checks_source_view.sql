-- The source view, the certificates and the verdicts check what they reference once per statement
-- too (as 0022 did for the working tables).
--
-- A first extract at 100,000 users writes 100,000 users, 183,000 values and 183,000 certificates,
-- and its validation 183,000 verdicts; each of their foreign keys looked its reference up once per
-- row. Measured on that first extract: 1.5 s checking the certificates' run and 1.6 s checking the
-- values' user, of about 15 s merging.
--
-- Replaced:
-- * source_value.object_guid -> source_user (ON DELETE CASCADE): deleting users deletes their values
--   with one statement, as the cascade did;
-- * cert_blob.first_run_id, source_user.last_seen_run_id and changed_run_id, and
--   cert_verdict.checked_run_id -> sync_run (NO ACTION): deleting a run any of them names is refused,
--   as the keys did. certsync never deletes a run (retention deletes only its working rows).

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('source_value', 'object_guid', 'source_user', 'object_guid', 'many', 'source_user_exists'),
        ('cert_blob', 'first_run_id', 'sync_run', 'run_id', 'few', 'first_run_exists'),
        ('source_user', 'last_seen_run_id', 'sync_run', 'run_id', 'few', 'last_seen_run_exists'),
        ('source_user', 'changed_run_id', 'sync_run', 'run_id', 'few', 'changed_run_exists'),
        ('cert_verdict', 'checked_run_id', 'sync_run', 'run_id', 'few', 'checked_run_exists'))
        AS v(tab, col, parent, parent_col, distinct_keys, name)
    LOOP
        EXECUTE format('ALTER TABLE certsync.%I DROP CONSTRAINT %I', t.tab, t.tab || '_' || t.col || '_fkey');
        EXECUTE format(
            'CREATE TRIGGER %1$I AFTER INSERT ON certsync.%2$I REFERENCING NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION certsync.check_references_inserted(%3$L, %4$L, %5$L, %6$L)',
            t.name, t.tab, t.col, t.parent, t.parent_col, t.distinct_keys);
        EXECUTE format(
            'CREATE TRIGGER %1$I BEFORE UPDATE OF %3$I ON certsync.%2$I FOR EACH ROW'
            ' WHEN (OLD.%3$I IS DISTINCT FROM NEW.%3$I)'
            ' EXECUTE FUNCTION certsync.check_reference_updated(%3$L, %4$L, %5$L)',
            replace(t.name, '_exists', '_still_exists'), t.tab, t.col, t.parent, t.parent_col);
    END LOOP;
END
$$;

CREATE FUNCTION certsync.delete_values_of_users() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM certsync.source_value v USING old_users o WHERE v.object_guid = o.object_guid;
    RETURN NULL;
END
$$;

CREATE TRIGGER values_of_users_deleted AFTER DELETE ON certsync.source_user REFERENCING OLD TABLE AS old_users
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.delete_values_of_users();

CREATE FUNCTION certsync.refuse_deleting_named_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM old_runs o
               WHERE EXISTS (SELECT FROM certsync.cert_blob b WHERE b.first_run_id = o.run_id)
                  OR EXISTS (SELECT FROM certsync.source_user s
                             WHERE s.last_seen_run_id = o.run_id OR s.changed_run_id = o.run_id)
                  OR EXISTS (SELECT FROM certsync.cert_verdict c WHERE c.checked_run_id = o.run_id)) THEN
        RAISE EXCEPTION 'a run deleted from certsync.sync_run is still named by a certificate, a user or a verdict'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER named_runs_kept AFTER DELETE ON certsync.sync_run REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_deleting_named_runs();
