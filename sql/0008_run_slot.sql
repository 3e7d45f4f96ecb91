-- The run slot: which run may work now, from its begin to its finish (one run at a time per database,
-- across the DAG, backfills, clears and the command line). DAG tasks are separate processes, so a
-- session lock cannot span a run: the slot is this one row, claimed by a run's begin when it is free
-- (or its holder is closed, or dead: no live lease and nothing else vouching for it) and released by
-- its finish. The per-stage advisory locks stay for mutual exclusion of stages.
CREATE TABLE certsync.run_slot (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    run_id     bigint      REFERENCES certsync.sync_run,
    claimed_at timestamptz
);
INSERT INTO certsync.run_slot (only_row) VALUES (true);

GRANT SELECT, UPDATE ON certsync.run_slot TO certsync_app;
GRANT SELECT ON certsync.run_slot TO certsync_auditor;
