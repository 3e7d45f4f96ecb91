-- Roles. The application works as certsync_app, which may read and write working tables but only
-- read and append the audit log. Auditors read only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'certsync_app') THEN
        CREATE ROLE certsync_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'certsync_auditor') THEN
        CREATE ROLE certsync_auditor NOLOGIN;
    END IF;
END
$$;

-- The migrating user must be able to SET ROLE to the application role.
DO $$
BEGIN
    EXECUTE format('GRANT certsync_app, certsync_auditor TO %I', current_user);
END
$$;

GRANT USAGE ON SCHEMA certsync TO certsync_app, certsync_auditor;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA certsync TO certsync_app;
REVOKE UPDATE, DELETE, TRUNCATE ON certsync.audit_log FROM certsync_app;
GRANT SELECT ON ALL TABLES IN SCHEMA certsync TO certsync_auditor;
