-- Deleting what bulk rows name waits for the transactions that insert such rows (0022, 0025).
--
-- A foreign key locks the row it finds (FOR KEY SHARE): a delete of that row waits for the
-- inserting transaction, then sees its rows. The per-statement checks look their references up
-- without locking them, so a run, certificate or user deleted while another transaction inserted
-- rows naming it could leave those rows naming nothing: each side checked before the other
-- committed. Locking the references instead would lock each of the 190,000 certificates a first
-- run's values name (one write per row, what the checks were made to save). These deletes are
-- rare (certsync deletes only users, in the merge that writes their values; an administrator the
-- rest), so the deleting side waits instead: SHARE ROW EXCLUSIVE on the tables that name what it
-- deletes waits for every transaction that has written into them and holds off new writers until
-- it ends. Its cascades and checks, each a statement with a new snapshot, then see their rows; an
-- insert held off checks its references after the delete committed.
--
-- That needs a new snapshot per statement: under REPEATABLE READ or SERIALIZABLE a statement sees
-- the transaction's first snapshot, so the inserts' checks and the deletes refuse to run there
-- (certsync itself writes only under READ COMMITTED).

CREATE FUNCTION certsync.require_read_committed(what text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION '% checks its references under READ COMMITTED only, not %',
            what, upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Run it in a READ COMMITTED transaction (PostgreSQL''s default).';
    END IF;
END
$$;

-- The deleting side: waits for the transactions that wrote into `tables` and holds off new ones.
CREATE FUNCTION certsync.wait_for_writers(what text, VARIADIC tables regclass[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM certsync.require_read_committed(what);
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', array_to_string(tables, ', '));
END
$$;

CREATE OR REPLACE FUNCTION certsync.check_references_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    missing text;  -- TG_ARGV: the column, the referenced table and its column, and 'few' or not
    new_keys text := 'new_rows';
BEGIN
    PERFORM certsync.require_read_committed(format('insert into certsync.%s', TG_TABLE_NAME));
    IF TG_ARGV[3] = 'few' THEN
        new_keys := format('(SELECT DISTINCT %1$I FROM new_rows)', TG_ARGV[0]);
    END IF;
    EXECUTE format(
        'SELECT n.%1$I::text FROM %4$s n WHERE NOT EXISTS'
        ' (SELECT FROM certsync.%2$I p WHERE p.%3$I = n.%1$I) LIMIT 1',
        TG_ARGV[0], TG_ARGV[1], TG_ARGV[2], new_keys)
    INTO missing;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'insert into certsync.% names %.% %, which does not exist',
            TG_TABLE_NAME, TG_ARGV[1], TG_ARGV[2], missing USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION certsync.check_reference_updated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    PERFORM certsync.require_read_committed(format('update of certsync.%s', TG_TABLE_NAME));
    EXECUTE format('SELECT EXISTS (SELECT FROM certsync.%2$I p WHERE p.%3$I = ($1).%1$I)',
        TG_ARGV[0], TG_ARGV[1], TG_ARGV[2]) USING NEW INTO found;
    IF NOT found THEN
        RAISE EXCEPTION 'update of certsync.% names a % that does not exist', TG_TABLE_NAME, TG_ARGV[1]
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END
$$;

-- A run's working rows are deleted with it (0022), and the rows that must outlive it refuse its
-- deletion (0025); each waits for the writers of the tables it reads. Triggers fire in name order,
-- so two deletes of runs take these locks in the same order.
CREATE OR REPLACE FUNCTION certsync.delete_rows_of_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM old_runs) THEN
        RETURN NULL;
    END IF;
    PERFORM certsync.wait_for_writers('delete from certsync.sync_run', 'certsync.staging_user',
        'certsync.staging_value', 'certsync.exo_recipient', 'certsync.value_result', 'certsync.planned_action');
    DELETE FROM certsync.staging_user r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.staging_value r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.exo_recipient r USING old_runs o WHERE r.seen_run_id = o.run_id;
    DELETE FROM certsync.value_result r USING old_runs o WHERE r.run_id = o.run_id;
    DELETE FROM certsync.planned_action r USING old_runs o WHERE r.run_id = o.run_id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION certsync.refuse_deleting_named_runs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM old_runs) THEN
        RETURN NULL;
    END IF;
    PERFORM certsync.wait_for_writers('delete from certsync.sync_run',
        'certsync.cert_blob', 'certsync.source_user', 'certsync.cert_verdict');
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

CREATE OR REPLACE FUNCTION certsync.refuse_deleting_named_blobs() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM old_blobs) THEN
        RETURN NULL;
    END IF;
    PERFORM certsync.wait_for_writers('delete from certsync.cert_blob', 'certsync.source_value', 'certsync.cert_verdict');
    IF EXISTS (SELECT FROM old_blobs o WHERE EXISTS (SELECT FROM certsync.source_value v WHERE v.sha256 = o.sha256)
                                          OR EXISTS (SELECT FROM certsync.cert_verdict c WHERE c.sha256 = o.sha256)) THEN
        RAISE EXCEPTION 'a certificate deleted from certsync.cert_blob is still named by a value or a verdict'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

-- The merge deletes gone users in the transaction that writes their values, one run at a time: the
-- lock waits for no writer of certsync's, only for an autovacuum of source_value, which PostgreSQL
-- cancels after deadlock_timeout. It is taken only when users are deleted.
CREATE OR REPLACE FUNCTION certsync.delete_values_of_users() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM old_users) THEN
        RETURN NULL;
    END IF;
    PERFORM certsync.wait_for_writers('delete from certsync.source_user', 'certsync.source_value');
    DELETE FROM certsync.source_value v USING old_users o WHERE v.object_guid = o.object_guid;
    RETURN NULL;
END
$$;
