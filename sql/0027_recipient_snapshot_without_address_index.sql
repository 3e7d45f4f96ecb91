-- The Exchange snapshot (certsync.exo_recipient) loses its index on lower(primary_smtp). No
-- statement of certsync reads it: the plan matches users to recipients in memory, and every read
-- of the snapshot names its run (the primary key leads with seen_run_id). Each run writes a whole
-- snapshot, about 90,000 rows at 100,000 users: by COPY after a full read, by INSERT ... SELECT of
-- the unchanged recipients after a delta read. With this index that INSERT took 0.88-1.17 s, without
-- it 0.55 s. Auditors look addresses up in the history, audit_log, whose own index on
-- lower(primary_smtp) stays.
DROP INDEX certsync.exo_recipient_smtp;
