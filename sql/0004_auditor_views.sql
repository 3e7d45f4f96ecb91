-- Views for auditors and admins: per-item reasons, per-recipient outcomes, and expiring certificates.

-- Every certificate value of every run: selected for publishing, or the reason it was refused.
-- The user is shown as the directory had it in that run (its staging row), not as it is today.
CREATE VIEW certsync.value_verdicts AS
SELECT r.run_id, s.dag_id, s.airflow_run_id, s.logical_date,
       u.sam_account_name, u.mail, r.object_guid, r.attribute, encode(r.sha256, 'hex') AS sha256,
       r.selected, r.reason, r.rule, r.detail,
       v.subject, v.issuer, v.serial, v.not_before, v.not_after
FROM certsync.value_result r
JOIN certsync.sync_run s USING (run_id)
LEFT JOIN certsync.staging_user u ON u.run_id = r.run_id AND u.object_guid = r.object_guid
LEFT JOIN certsync.cert_verdict v
       ON v.sha256 = r.sha256 AND v.attribute = r.attribute AND v.trust_fingerprint = s.trust_fingerprint;

-- Every recipient a run planned to change (or could not), and what became of it.
CREATE VIEW certsync.recipient_outcomes AS
SELECT p.run_id, s.airflow_run_id, s.logical_date, p.primary_smtp, p.recipient_id, p.cmdlet,
       p.kind, p.state, p.reason,
       cardinality(p.user_certificate) AS user_certs, cardinality(p.user_smime_certificate) AS smime_blobs
FROM certsync.planned_action p
JOIN certsync.sync_run s USING (run_id);

-- Certificates Exchange Online holds (as last read) that expire within `horizon` of `at`, per recipient:
--   SELECT * FROM certsync.expiring_within(interval '30 days');
CREATE FUNCTION certsync.expiring_within(horizon interval, at timestamptz DEFAULT now())
RETURNS TABLE (primary_smtp text, attribute text, subject text, serial text, not_after timestamptz)
LANGUAGE sql STABLE AS $$
    WITH latest AS (
        SELECT trust_fingerprint FROM certsync.sync_run
        WHERE trust_fingerprint IS NOT NULL ORDER BY run_id DESC LIMIT 1
    ), held AS (
        SELECT e.primary_smtp, 'userCertificate' AS attribute, h AS sha256
        FROM certsync.exo_recipient e, unnest(e.user_certificate) AS h
        UNION ALL
        SELECT e.primary_smtp, 'userSMIMECertificate', h
        FROM certsync.exo_recipient e, unnest(e.user_smime_certificate) AS h
    )
    SELECT held.primary_smtp, held.attribute, v.subject, v.serial, v.not_after
    FROM held
    JOIN certsync.cert_verdict v ON v.sha256 = held.sha256 AND v.attribute = held.attribute
    JOIN latest ON v.trust_fingerprint = latest.trust_fingerprint
    WHERE v.not_after >= at AND v.not_after < at + horizon
    ORDER BY v.not_after, held.primary_smtp
$$;

GRANT SELECT ON certsync.value_verdicts, certsync.recipient_outcomes TO certsync_app, certsync_auditor;
