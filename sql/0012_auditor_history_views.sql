-- Views for the questions auditors ask of the history (all read-only; certsync_auditor may read them).
-- They are built from the audit log (what Exchange Online accepted, when, from which run) and the
-- verdicts; the signed log stays the evidence (`certsync audit verify`), these are the ways to read it.

-- What certsync got Exchange Online to accept, per recipient: each accepted outcome (or a lost answer
-- settled as applied by reading the recipient back) sets the recipient's values until the next one.
CREATE VIEW certsync.published_states AS
SELECT a.seq, a.at, a.run_id, a.airflow_run_id, a.recipient_id, a.primary_smtp, a.cmdlet, a.action,
       a.user_certificate, a.user_smime_certificate,
       lead(a.at) OVER w AS until, lead(a.seq) OVER w AS until_seq,
       row_number() OVER w AS state_no
FROM certsync.audit_log a
WHERE (a.phase = 'outcome' AND a.outcome = 'accepted')
   OR (a.phase = 'settlement' AND a.outcome = 'applied')
   OR (a.phase IS NULL AND a.outcome = 'accepted')
WINDOW w AS (PARTITION BY a.recipient_id ORDER BY a.seq);

-- A recipient's certificate timeline: each value it held, as a validity range of time (upper bound
-- open while still held), the run and audit row that put it there and the one that took it away,
-- and the certificate's facts from its newest verdict.
--   SELECT attribute, serial, subject, held FROM certsync.recipient_certificate_timeline
--   WHERE lower(primary_smtp) = 'anna.smith@corp.example.test' AND held @> timestamptz '2026-06-01';
CREATE VIEW certsync.recipient_certificate_timeline AS
WITH held AS (
    SELECT s.*, 'userCertificate' AS attribute, h AS sha256
    FROM certsync.published_states s, unnest(s.user_certificate) AS h
    UNION ALL
    SELECT s.*, 'userSMIMECertificate', h
    FROM certsync.published_states s, unnest(s.user_smime_certificate) AS h
), islands AS (  -- consecutive states holding the same value are one stretch
    SELECT held.*,
           state_no - row_number() OVER (PARTITION BY recipient_id, attribute, sha256 ORDER BY state_no) AS island
    FROM held
), stretches AS (
    SELECT recipient_id, attribute, sha256, island,
           min(at) AS held_from, min(seq) AS from_seq,
           (array_agg(until ORDER BY state_no DESC))[1] AS held_until,
           (array_agg(until_seq ORDER BY state_no DESC))[1] AS until_seq,
           (array_agg(primary_smtp ORDER BY state_no DESC))[1] AS primary_smtp,
           (array_agg(run_id ORDER BY state_no))[1] AS added_by_run_id,
           (array_agg(airflow_run_id ORDER BY state_no))[1] AS added_by_airflow_run_id
    FROM islands
    GROUP BY recipient_id, attribute, sha256, island
)
SELECT st.recipient_id, st.primary_smtp, st.attribute, encode(st.sha256, 'hex') AS sha256,
       tstzrange(st.held_from, st.held_until) AS held,
       st.added_by_run_id, st.added_by_airflow_run_id, st.from_seq AS added_by_seq,
       removed.run_id AS removed_by_run_id, st.until_seq AS removed_by_seq,
       v.subject, v.issuer, v.serial, v.not_before, v.not_after
FROM stretches st
LEFT JOIN certsync.audit_log removed ON removed.seq = st.until_seq
LEFT JOIN LATERAL (
    SELECT c.subject, c.issuer, c.serial, c.not_before, c.not_after FROM certsync.cert_verdict c
    WHERE c.sha256 = st.sha256 AND c.attribute = st.attribute ORDER BY c.checked_at DESC LIMIT 1
) v ON true;

-- A certificate's history across recipients (a value moved between users, or shared):
--   SELECT * FROM certsync.certificate_history WHERE serial = '4d2f...' ORDER BY lower(held);
CREATE VIEW certsync.certificate_history AS
SELECT sha256, serial, subject, issuer, not_after, primary_smtp, recipient_id, attribute, held,
       added_by_run_id, removed_by_run_id
FROM certsync.recipient_certificate_timeline;

-- Every value a run refused, with its reason code, the rule and the detail, and who it belonged to.
CREATE VIEW certsync.refusals AS
SELECT run_id, airflow_run_id, logical_date, sam_account_name, mail, attribute, sha256, reason, rule,
       detail, subject, issuer, serial, not_after
FROM certsync.value_verdicts
WHERE NOT selected;

-- Every run: who started it and how, its overrides, how it ended, and what it changed.
CREATE VIEW certsync.run_outcomes AS
SELECT r.run_id, r.dag_id, r.airflow_run_id, r.logical_date, r.date_source, r.mode, r.run_type,
       r.triggered_by, r.dry_run, r.allow_mass_removal, r.state, r.started_at, r.finished_at,
       r.closed_by_run_id, r.attempts,
       (SELECT coalesce(sum(value::int), 0) FROM jsonb_each_text(r.summary -> 'actions')
         WHERE key LIKE '%:published') AS published,
       (SELECT coalesce(sum(value::int), 0) FROM jsonb_each_text(r.summary -> 'failed_by_reason')) AS failed,
       r.summary -> 'failed_by_reason' AS failed_by_reason,
       r.summary -> 'not_published_by_reason' AS not_published_by_reason,
       (r.summary -> 'audit_checkpoint' ->> 'seq')::bigint AS audit_checkpoint_seq
FROM certsync.sync_run r;

-- Certificates Exchange Online holds (as last read) that expire within 30 days (other windows:
-- certsync.expiring_within(interval '...')).
CREATE VIEW certsync.expiring_soon AS
SELECT * FROM certsync.expiring_within(interval '30 days');

GRANT SELECT ON certsync.published_states, certsync.recipient_certificate_timeline,
    certsync.certificate_history, certsync.refusals, certsync.run_outcomes, certsync.expiring_soon
    TO certsync_app, certsync_auditor;
