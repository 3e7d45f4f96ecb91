-- How each run's plan was made (certsync.store.planning):
--   plan_scope 'full': every user of the source view was planned;
--   plan_scope 'delta': only the users whose directory entry, certificate verdicts, Exchange
--     recipient, recipient claim or unfinished action changed since the plan of plan_base_run_id;
--     every other user's value results and unpublishable actions (conflicts, users without a
--     recipient) were carried over from that plan unchanged.
-- plan_policy is the account policy the plan applied: a delta plan needs its base's policy.
-- plan_contested lists the recipients more than one user matched (the first claim wins): a delta
-- plan plans every user of these again, since a claim can move when one of them changed.
-- plan_base_run_id is no foreign key: retention may delete the base run's record later.
ALTER TABLE certsync.sync_run ADD COLUMN plan_scope text CHECK (plan_scope IN ('full', 'delta'));
ALTER TABLE certsync.sync_run ADD COLUMN plan_base_run_id bigint;
ALTER TABLE certsync.sync_run ADD COLUMN plan_policy text;
ALTER TABLE certsync.sync_run ADD COLUMN plan_contested text[];
ALTER TABLE certsync.sync_run ADD COLUMN planned_users integer;
