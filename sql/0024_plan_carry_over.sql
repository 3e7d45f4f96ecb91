-- A delta plan's record is made whole by its own step, beside publishing (certsync.pipeline.carry_over):
-- copying the base plan's value results and unpublishable actions of the users it did not plan
-- again (190,000 results at 100,000 users) is not needed to publish, so publishing no longer waits
-- for it.
--   plan_users: the users a delta plan planned again (NULL for a full plan: every user); the copy
--     takes every other current user's rows from plan_base_run_id.
--   carried_at: when the record was made whole; a full plan is whole when it is saved, and finish
--     makes a delta plan's whole when carry_over did not run. A delta plan starts only from a base
--     whose record is whole.
ALTER TABLE certsync.sync_run ADD COLUMN plan_users uuid[];
ALTER TABLE certsync.sync_run ADD COLUMN carried_at timestamptz;
-- Plans saved before this migration copied in the plan's own transaction.
UPDATE certsync.sync_run SET carried_at = planned_at WHERE planned_at IS NOT NULL;
