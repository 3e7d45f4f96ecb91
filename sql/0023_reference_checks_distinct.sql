-- A statement's reference check (0022) looks each distinct run up once. Without statistics on a
-- transition table, PostgreSQL probed sync_run once per new row: 190,000 lookups of the same run
-- for a delta plan's copied value results (0.24 s of a 2 s copy at 100,000 users; 0.05 s now).
-- The certificates that values and verdicts name are nearly all distinct: they keep one probe per
-- row (collecting them first cost 0.15 s more).
CREATE OR REPLACE FUNCTION certsync.check_references_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    missing text;  -- TG_ARGV: the column, the referenced table and its column, and 'few' or not
    new_keys text := 'new_rows';
BEGIN
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

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('staging_user', 'run_id'),
        ('staging_value', 'run_id'),
        ('exo_recipient', 'seen_run_id'),
        ('value_result', 'run_id'),
        ('planned_action', 'run_id')) AS v(tab, col)
    LOOP
        EXECUTE format('DROP TRIGGER sync_run_exists ON certsync.%I', t.tab);
        EXECUTE format(
            'CREATE TRIGGER sync_run_exists AFTER INSERT ON certsync.%1$I REFERENCING NEW TABLE AS new_rows'
            ' FOR EACH STATEMENT EXECUTE FUNCTION certsync.check_references_inserted(%2$L, %3$L, %4$L, %5$L)',
            t.tab, t.col, 'sync_run', 'run_id', 'few');
    END LOOP;
END
$$;
