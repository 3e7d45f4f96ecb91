-- Reading Exchange Online in full and delta modes (certsync.exchange.changes, certsync.store.recipients).
--
-- A full read replaces the run's snapshot of Exchange (certsync.exo_recipient) with every recipient.
-- A delta read asks Exchange only for the recipients whose WhenChangedUTC is at or after a bound:
-- the newest WhenChanged Exchange itself reported so far (never this host's clock), moved back by an
-- overlap for the minutes a write can stay invisible to reads. It copies the snapshot of base_run_id
-- and replaces the recipients it read. A recipient deleted in Exchange stays in a delta's snapshot
-- until the next full read (or until a write to it is answered "not found").
CREATE TABLE certsync.exo_read (
    run_id          bigint      PRIMARY KEY REFERENCES certsync.sync_run ON DELETE CASCADE,
    mode            text        NOT NULL CHECK (mode IN ('full', 'delta')),
    why             text        NOT NULL,  -- e.g. 'requested', 'no earlier read', 'filter refused ...'
    tenant          text        NOT NULL,  -- the endpoint and tenant id read: another one means full
    base_run_id     bigint,                -- a delta's base snapshot (no foreign key: retention)
    changed_since   timestamptz,           -- a delta's bound (NULL: full)
    newest_change   timestamptz,           -- newest WhenChanged known after this read (NULL: some
                                           -- recipient had none readable, so the next read is full)
    full_run_id     bigint      NOT NULL,  -- the full read this snapshot descends from
    full_read_at    timestamptz NOT NULL,
    read            integer     NOT NULL,  -- recipients Exchange returned
    recipients      integer     NOT NULL,  -- recipients in the run's snapshot after the merge
    read_at         timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE, DELETE ON certsync.exo_read TO certsync_app;
GRANT SELECT ON certsync.exo_read TO certsync_auditor;
