-- Planner statistics for the tables a plan reads, refreshed when a stage has just rewritten them.
--
-- A first run (or a full re-validation) writes hundreds of thousands of rows into source_user,
-- source_value and cert_verdict, and plans seconds later, before autovacuum has analyzed them. Without
-- statistics PostgreSQL took the plan's verdict join for a few rows and joined it by a nested loop:
-- measured at 100,000 users, 87 s for each 5,000 rows the plan read, against 25 s for the whole plan
-- once the tables had been analyzed.
--
-- Only the owner may ANALYZE, so the application calls this SECURITY DEFINER function as a delta
-- plan begins (a full plan reads users by key ranges and verdicts by key, which needs no statistics;
-- certsync.pipeline says why it leaves the ANALYZE to autovacuum). It analyzes only a table never
-- analyzed, or with more rows changed since its last analysis than autovacuum's default threshold
-- would allow (50 rows plus a tenth of the table), so a delta plan after a delta run, which changes
-- a few rows, analyzes nothing. It returns the tables it analyzed.
CREATE FUNCTION certsync.refresh_plan_statistics() RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stale text;
BEGIN
    FOR stale IN
        SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
        WHERE s.schemaname = 'certsync'
          AND s.relname IN ('source_user', 'source_value', 'cert_verdict', 'exo_recipient')
          AND (c.reltuples < 0 OR s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0))
        ORDER BY s.relname
    LOOP
        EXECUTE format('ANALYZE certsync.%I', stale);
        RETURN NEXT stale;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION certsync.refresh_plan_statistics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION certsync.refresh_plan_statistics() TO certsync_app;
