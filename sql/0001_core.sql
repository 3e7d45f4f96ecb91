-- certsync core schema: runs, staging, the persistent source view, verdicts, plan, published state.
-- Applied in file-name order by the migration tool (yoyo); never edit a file that has shipped.

CREATE SCHEMA IF NOT EXISTS certsync;

-- One row per DAG run (or CLI run). The natural key makes "begin" idempotent under retries and clears.
CREATE TABLE certsync.sync_run (
    run_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dag_id          text        NOT NULL,
    airflow_run_id  text        NOT NULL,
    logical_date    timestamptz NOT NULL,
    mode            text        NOT NULL CHECK (mode IN ('full', 'delta')),
    dry_run         boolean     NOT NULL,
    trust_fingerprint text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    planned_at      timestamptz,  -- set when the run's plan is saved: from then on it holds a full view
    finished_at     timestamptz,
    state           text        NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'succeeded', 'failed')),
    summary         jsonb,
    UNIQUE (dag_id, airflow_run_id)
);

-- Staging: exactly what the directory returned for one run, loaded with COPY.
CREATE TABLE certsync.staging_user (
    run_id           bigint  NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    object_guid      uuid    NOT NULL,
    dn               text    NOT NULL,
    sam_account_name text    NOT NULL,
    display_name     text,
    mail             text,
    proxy_addresses  text[]  NOT NULL DEFAULT '{}',
    user_account_control integer NOT NULL,
    usn_changed      bigint  NOT NULL,
    PRIMARY KEY (run_id, object_guid)
);

CREATE TABLE certsync.staging_value (
    run_id      bigint  NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    object_guid uuid    NOT NULL,
    attribute   text    NOT NULL CHECK (attribute IN ('userCertificate', 'userSMIMECertificate')),
    ordinal     integer NOT NULL,
    sha256      bytea   NOT NULL,
    value       bytea   NOT NULL,
    PRIMARY KEY (run_id, object_guid, attribute, ordinal)
);

-- Directory entries a run could not read as users, with the reason (the run went on without them).
CREATE TABLE certsync.staging_rejected (
    run_id  bigint NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    dn      text   NOT NULL,
    reason  text   NOT NULL
);

-- Content-addressed certificate values: each distinct value is stored (and validated) once.
CREATE TABLE certsync.cert_blob (
    sha256        bytea   PRIMARY KEY CHECK (length(sha256) = 32),
    value         bytea   NOT NULL,
    first_run_id  bigint  NOT NULL REFERENCES certsync.sync_run
);

-- The persistent source view: the directory as of the last committed merge.
CREATE TABLE certsync.source_user (
    object_guid      uuid    PRIMARY KEY,
    dn               text    NOT NULL,
    sam_account_name text    NOT NULL,
    display_name     text,
    mail             text,
    proxy_addresses  text[]  NOT NULL DEFAULT '{}',
    user_account_control integer NOT NULL,
    usn_changed      bigint  NOT NULL,
    last_seen_run_id bigint  NOT NULL REFERENCES certsync.sync_run,
    changed_run_id   bigint  NOT NULL REFERENCES certsync.sync_run
);

CREATE TABLE certsync.source_value (
    object_guid uuid    NOT NULL REFERENCES certsync.source_user ON DELETE CASCADE,
    attribute   text    NOT NULL,
    sha256      bytea   NOT NULL REFERENCES certsync.cert_blob,
    ordinal     integer NOT NULL,
    PRIMARY KEY (object_guid, attribute, sha256)
);

-- Verdicts on a value, independent of its owner, cached per trust configuration.
-- valid_until says until when the verdict holds; past it, the value is checked again.
CREATE TABLE certsync.cert_verdict (
    sha256            bytea       NOT NULL REFERENCES certsync.cert_blob,
    attribute         text        NOT NULL,
    trust_fingerprint text        NOT NULL,
    ok                boolean     NOT NULL,
    reason            text,
    rule              text,
    detail            text        NOT NULL,
    subject           text,
    issuer            text,
    serial            text,
    not_before        timestamptz,
    not_after         timestamptz,
    valid_until       timestamptz,
    emails            text[]      NOT NULL DEFAULT '{}',
    checked_run_id    bigint      NOT NULL REFERENCES certsync.sync_run,
    checked_at        timestamptz NOT NULL,
    PRIMARY KEY (sha256, attribute, trust_fingerprint),
    CHECK (ok = (reason IS NULL))
);

-- The recipients Exchange Online holds, and their certificates (as hashes), as last read by a run.
-- The plan diffs against these, so values put there by anyone else are corrected too.
CREATE TABLE certsync.exo_recipient (
    recipient_id        text    PRIMARY KEY,   -- ExternalDirectoryObjectId, else Guid
    primary_smtp        text    NOT NULL,
    recipient_type      text    NOT NULL,      -- RecipientTypeDetails
    is_dir_synced       boolean NOT NULL,
    is_cloud_managed    boolean NOT NULL,
    user_certificate       bytea[] NOT NULL DEFAULT '{}',  -- sha256 of each value Exchange holds
    user_smime_certificate bytea[] NOT NULL DEFAULT '{}',
    seen_run_id         bigint  NOT NULL REFERENCES certsync.sync_run
);
CREATE INDEX exo_recipient_smtp ON certsync.exo_recipient (lower(primary_smtp));

-- Per run, per user value: the verdict including the owner-specific checks (e-mail match, selection).
CREATE TABLE certsync.value_result (
    run_id      bigint NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    object_guid uuid   NOT NULL,
    attribute   text   NOT NULL,
    sha256      bytea  NOT NULL,
    selected    boolean NOT NULL,
    reason      text,
    rule        text,
    detail      text   NOT NULL,
    PRIMARY KEY (run_id, object_guid, attribute, sha256),
    CHECK (selected = (reason IS NULL))
);

-- The plan: one row per action of a run (a recipient to change, or a user that cannot be served).
-- action_no numbers a run's actions; re-planning a run keeps the rows that reached a final state.
CREATE TABLE certsync.planned_action (
    run_id          bigint  NOT NULL REFERENCES certsync.sync_run ON DELETE CASCADE,
    action_no       integer NOT NULL,
    object_guid     uuid    NOT NULL,
    recipient_id    text,
    primary_smtp    text,
    cmdlet          text,
    kind            text    NOT NULL CHECK (kind IN ('add', 'replace', 'remove', 'conflict', 'no_recipient')),
    user_certificate      bytea[] NOT NULL DEFAULT '{}',  -- desired sha256 list, newest first
    user_smime_certificate bytea[] NOT NULL DEFAULT '{}',
    batch           integer NOT NULL DEFAULT 0,
    state           text    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'published', 'failed', 'conflict', 'skipped', 'dry_run')),
    reason          text,
    PRIMARY KEY (run_id, action_no)
);
CREATE INDEX planned_action_recipient ON certsync.planned_action (run_id, recipient_id);

-- What certsync last got Exchange Online to accept, per recipient and attribute (ordered sha256 lists).
CREATE TABLE certsync.published_state (
    recipient_id           text        PRIMARY KEY,
    object_guid            uuid        NOT NULL,
    user_certificate       bytea[]     NOT NULL DEFAULT '{}',
    user_smime_certificate bytea[]     NOT NULL DEFAULT '{}',
    run_id                 bigint      NOT NULL REFERENCES certsync.sync_run,
    logical_date           timestamptz NOT NULL,
    published_at           timestamptz NOT NULL
);
