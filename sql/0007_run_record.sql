-- What a run was asked to do and by whom, and how it ended: the record an operator reads after an outage.
-- date_source: the run's time is its logical date, or (manual runs without one) the time it was queued.
-- run_type / triggered_by: Airflow's run type (scheduled, manual, backfill, asset_triggered) and user, or
-- the command line and its OS user. allow_mass_removal: the removal threshold was lifted for this run.
ALTER TABLE certsync.sync_run
    ADD COLUMN date_source        text    NOT NULL DEFAULT 'logical_date'
                                  CHECK (date_source IN ('logical_date', 'run_after')),
    ADD COLUMN run_type           text,
    ADD COLUMN triggered_by       text,
    ADD COLUMN allow_mass_removal boolean NOT NULL DEFAULT false,
    ADD COLUMN closed_by_run_id   bigint  REFERENCES certsync.sync_run,
    ADD COLUMN attempts           integer NOT NULL DEFAULT 1;

-- 'abandoned': the run's process died and nothing was left running it; the next run closed it.
-- 'superseded' is kept in the set so that this file and the one that adds it apply in either order.
ALTER TABLE certsync.sync_run DROP CONSTRAINT IF EXISTS sync_run_state_check;
ALTER TABLE certsync.sync_run ADD CONSTRAINT sync_run_state_check
    CHECK (state IN ('running', 'succeeded', 'failed', 'abandoned', 'superseded'));
