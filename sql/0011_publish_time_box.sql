-- A time-boxed publish (certsync_config publish_time_box_s) stops sending when its time is up and
-- leaves the actions it did not send as 'deferred': not failed, not lost. Plans are state-based, so
-- the next run plans them again (additions first, then replacements, then removals).
ALTER TABLE certsync.planned_action DROP CONSTRAINT planned_action_state_check;
ALTER TABLE certsync.planned_action ADD CONSTRAINT planned_action_state_check
    CHECK (state IN ('pending', 'published', 'failed', 'conflict', 'skipped', 'dry_run', 'deferred'));
