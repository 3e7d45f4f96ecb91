-- The keys that bulk rows name a run, a certificate or a user by never change (0022, 0025).
--
-- A foreign key refused changing a key that rows still named. The per-statement checks look at the
-- naming rows only: changing sync_run.run_id, cert_blob.sha256 or source_user.object_guid left
-- every row naming the old key naming nothing. These keys are identities (a run's number, a
-- certificate's SHA-256, the directory's objectGUID) that certsync never changes, so a change is
-- refused outright, named or not: no lookup of the naming rows, and no race with their writers.

CREATE FUNCTION certsync.refuse_changing_key() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'certsync.%.% is a key other rows name, and never changes', TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'foreign_key_violation';
END
$$;

CREATE TRIGGER run_id_kept BEFORE UPDATE OF run_id ON certsync.sync_run FOR EACH ROW
    WHEN (OLD.run_id IS DISTINCT FROM NEW.run_id) EXECUTE FUNCTION certsync.refuse_changing_key('run_id');
CREATE TRIGGER sha256_kept BEFORE UPDATE OF sha256 ON certsync.cert_blob FOR EACH ROW
    WHEN (OLD.sha256 IS DISTINCT FROM NEW.sha256) EXECUTE FUNCTION certsync.refuse_changing_key('sha256');
CREATE TRIGGER object_guid_kept BEFORE UPDATE OF object_guid ON certsync.source_user FOR EACH ROW
    WHEN (OLD.object_guid IS DISTINCT FROM NEW.object_guid)
    EXECUTE FUNCTION certsync.refuse_changing_key('object_guid');
