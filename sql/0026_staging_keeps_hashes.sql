-- Staging keeps each value's SHA-256 only: the extract stores a certificate cert_blob does not hold
-- yet as soon as its page is read (certsync.store.source.stage_users), so the merge no longer copies
-- certificates out of staging. A full read of 100,000 unchanged users wrote 240 MB of certificates
-- into staging_value each time, only for the merge to find them all in cert_blob already.
ALTER TABLE certsync.staging_value DROP COLUMN value;
