-- The merge of a directory read writes only what differs (certsync.store.source): a full read
-- where nothing changed leaves the source view's rows alone instead of rewriting every one.
--
-- last_seen_run_id: the last run whose read found this entry new or different. Every entry of the
--   source view was returned by the latest full read (directory_watermark.last_full_run_id): a full
--   read drops the entries it did not return, whatever this column says.
-- changed_run_id: the last run whose read changed what the plan uses (mail, proxyAddresses,
--   userAccountControl, msExchRecipientTypeDetails or the certificate values); the plan of any
--   later run plans such a user again, and copies the others' results from the plan before.
COMMENT ON COLUMN certsync.source_user.last_seen_run_id IS
    'last run whose directory read found this entry new or different';
COMMENT ON COLUMN certsync.source_user.changed_run_id IS
    'last run whose directory read changed what the plan uses (addresses, account state, values)';

-- Nothing looks users up by last_seen_run_id any more (the full read's deletion detection is an
-- anti-join against the run's staging), and without the index an update of a changed user can
-- stay on its page (a HOT update).
DROP INDEX certsync.source_user_last_seen;
