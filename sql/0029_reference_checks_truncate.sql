-- Truncating a table that bulk rows name is refused while those rows remain (0022, 0025), as it was
-- with the foreign keys: TRUNCATE deletes no row one by one, so the delete triggers never see it.
--
-- cert_blob (named by source_value and cert_verdict) and source_user (named by source_value) lost
-- their last keys to the per-statement checks, so TRUNCATE of either alone left every value and
-- verdict naming nothing. A run cannot be truncated anyway: the audit log still names it by a key,
-- and the audit log refuses TRUNCATE.
--
-- The check runs after the command's last truncation, as PostgreSQL fires AFTER TRUNCATE triggers:
-- a command that truncates the named table and the tables naming it together passes, as with the
-- keys. TRUNCATE holds ACCESS EXCLUSIVE on the table until it commits, and an insert's reference
-- check reads that table: a writer that checked before waits to commit before the truncation, whose
-- check then sees its rows; a writer that checks after waits, then finds the table empty.

CREATE FUNCTION certsync.refuse_truncating_named() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    naming text;  -- TG_ARGV: the tables whose rows name this one's
    found boolean;
BEGIN
    PERFORM certsync.require_read_committed(format('truncate of certsync.%s', TG_TABLE_NAME));
    FOREACH naming IN ARRAY TG_ARGV LOOP
        EXECUTE format('SELECT EXISTS (SELECT FROM certsync.%I)', naming) INTO found;
        IF found THEN
            RAISE EXCEPTION 'truncating certsync.% leaves the rows of certsync.% naming what it held',
                TG_TABLE_NAME, naming
                USING ERRCODE = 'foreign_key_violation',
                      HINT = format('Truncate certsync.%s in the same command.', naming);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER named_blobs_kept_whole AFTER TRUNCATE ON certsync.cert_blob
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_truncating_named('source_value', 'cert_verdict');
CREATE TRIGGER named_users_kept_whole AFTER TRUNCATE ON certsync.source_user
    FOR EACH STATEMENT EXECUTE FUNCTION certsync.refuse_truncating_named('source_value');
