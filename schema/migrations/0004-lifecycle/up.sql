-- Version 4.0.0: rack lifecycle and repository health (DESIGN §12).
-- - A sled's serial is unique among sleds in service only: an expunged
--   sled's serial may come back under a new id (repaired hardware).
-- - target_release: the rack's target releases, newest generation current.
-- - tuf_repo_health: each repository's replication health, as the last
--   replication activation (of any Nexus) found it.
-- - nexus_staged_artifact: which Nexus holds which artifact staged, so
--   that "no copy anywhere" can be judged across Nexus instances.
-- - bgtask_switch, bgtask_activation: the cluster-wide task switch and each
--   Nexus's last activation of each task.

ALTER TABLE sled DROP CONSTRAINT sled_serial_key;
CREATE UNIQUE INDEX sled_serial_in_service ON sled (serial) WHERE time_expunged IS NULL;

CREATE TABLE target_release (
    generation INT8 PRIMARY KEY CHECK (generation >= 1),
    tuf_repo_id UUID NOT NULL REFERENCES tuf_repo (id),
    time_requested TIMESTAMPTZ NOT NULL,
    requested_by TEXT NOT NULL
);

CREATE TABLE tuf_repo_health (
    tuf_repo_id UUID PRIMARY KEY REFERENCES tuf_repo (id),
    state TEXT NOT NULL CHECK (state IN ('replicating', 'replicated', 'degraded', 'lost')),
    generation INT8 NOT NULL,
    time_checked TIMESTAMPTZ NOT NULL,
    checked_by TEXT NOT NULL,
    -- Per artifact: its hash, id, the sleds holding it and their copies,
    -- and the Nexus instances holding it staged.
    artifacts JSONB NOT NULL
);

CREATE TABLE nexus_staged_artifact (
    nexus_id UUID NOT NULL,
    sha256 TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    time_staged TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (nexus_id, sha256)
);

CREATE TABLE bgtask_switch (
    name TEXT PRIMARY KEY,
    mode TEXT NOT NULL CHECK (mode IN ('enabled', 'manual', 'disabled')),
    changed_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    time_changed TIMESTAMPTZ NOT NULL
);

CREATE TABLE bgtask_activation (
    nexus_id UUID NOT NULL,
    name TEXT NOT NULL,
    iteration INT8 NOT NULL,
    reason TEXT NOT NULL,
    time_started TIMESTAMPTZ NOT NULL,
    -- NULL while the activation runs.
    time_done TIMESTAMPTZ,
    PRIMARY KEY (nexus_id, name)
);
