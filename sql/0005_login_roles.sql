-- certsync logs in as certsync_app at run time (no SET ROLE from the owner's session), and auditors as
-- certsync_auditor. Passwords are set by `certsync db upgrade` from the configured connections, or by
-- the DBA; they never live in this file.
ALTER ROLE certsync_app LOGIN;
ALTER ROLE certsync_auditor LOGIN;

-- The run-time check that the schema is current reads the migration journal.
GRANT SELECT ON _yoyo_migration TO certsync_app, certsync_auditor;
