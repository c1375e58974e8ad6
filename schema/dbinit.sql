-- The whole current schema (version 2.0.0). A fresh database is created from
-- this file alone; an existing one is brought here by migrations/. The test
-- `migrations_match_dbinit` checks that both roads lead to the same schema.

CREATE TABLE db_metadata (
    singleton BOOL PRIMARY KEY CHECK (singleton),
    version TEXT NOT NULL,
    time_modified TIMESTAMPTZ NOT NULL
);

CREATE TABLE sled (
    id UUID PRIMARY KEY,
    time_created TIMESTAMPTZ NOT NULL,
    time_modified TIMESTAMPTZ NOT NULL,
    serial TEXT NOT NULL,
    ip TEXT NOT NULL,
    port INT4 NOT NULL CHECK (port BETWEEN 1 AND 65535),
    repo_depot_port INT4 NOT NULL CHECK (repo_depot_port BETWEEN 1 AND 65535),
    time_expunged TIMESTAMPTZ
);

-- A serial is unique among sleds in service; an expunged sled's serial may
-- come back under a new id.
CREATE UNIQUE INDEX sled_serial_in_service ON sled (serial) WHERE time_expunged IS NULL;

CREATE TABLE tuf_repo (
    id UUID PRIMARY KEY,
    time_created TIMESTAMPTZ NOT NULL,
    sha256 TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    system_version TEXT NOT NULL,
    file_name TEXT NOT NULL,
    time_pruned TIMESTAMPTZ,
    -- The latest upload (insert, re-upload or unprune): the pruner's order.
    time_last_uploaded TIMESTAMPTZ NOT NULL,
    CONSTRAINT tuf_repo_sha256_key UNIQUE (sha256),
    CONSTRAINT tuf_repo_system_version_key UNIQUE (system_version)
);

CREATE INDEX tuf_repo_by_time_created ON tuf_repo (time_created, id);
CREATE INDEX tuf_repo_by_time_last_uploaded ON tuf_repo (time_last_uploaded, id);

CREATE TABLE tuf_artifact (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size INT8 NOT NULL CHECK (size >= 0),
    time_created TIMESTAMPTZ NOT NULL,
    generation_added INT8 NOT NULL CHECK (generation_added >= 1),
    CONSTRAINT tuf_artifact_name_version_kind_key UNIQUE (name, version, kind)
);

CREATE INDEX tuf_artifact_by_sha256 ON tuf_artifact (sha256);

CREATE TABLE tuf_repo_artifact (
    tuf_repo_id UUID NOT NULL REFERENCES tuf_repo (id),
    tuf_artifact_id UUID NOT NULL REFERENCES tuf_artifact (id),
    PRIMARY KEY (tuf_repo_id, tuf_artifact_id)
);

CREATE INDEX tuf_repo_artifact_by_artifact ON tuf_repo_artifact (tuf_artifact_id);

CREATE TABLE tuf_trust_root (
    id UUID PRIMARY KEY,
    time_created TIMESTAMPTZ NOT NULL,
    time_deleted TIMESTAMPTZ,
    root_role JSONB NOT NULL
);

CREATE TABLE tuf_generation (
    singleton BOOL PRIMARY KEY CHECK (singleton),
    generation INT8 NOT NULL CHECK (generation >= 1)
);

INSERT INTO tuf_generation (singleton, generation) VALUES (TRUE, 1);

CREATE TABLE inv_collection (
    id UUID PRIMARY KEY,
    time_started TIMESTAMPTZ NOT NULL,
    time_done TIMESTAMPTZ NOT NULL,
    collector TEXT NOT NULL
);

CREATE INDEX inv_collection_by_time_started ON inv_collection (time_started);

CREATE TABLE inv_sled (
    inv_collection_id UUID NOT NULL REFERENCES inv_collection (id),
    sled_id UUID NOT NULL,
    time_collected TIMESTAMPTZ NOT NULL,
    -- NULL when the sled agent could not be reached; error says why.
    artifact_generation INT8,
    error TEXT,
    -- Damaged config ledger copies the sled reported, one per line.
    ledger_damage TEXT,
    PRIMARY KEY (inv_collection_id, sled_id)
);

CREATE TABLE inv_m2 (
    inv_collection_id UUID NOT NULL REFERENCES inv_collection (id),
    sled_id UUID NOT NULL,
    slot INT4 NOT NULL CHECK (slot >= 0),
    state TEXT NOT NULL CHECK (state IN ('healthy', 'failed', 'removed')),
    used_bytes INT8 NOT NULL CHECK (used_bytes >= 0),
    quota_bytes INT8 NOT NULL CHECK (quota_bytes >= 0),
    PRIMARY KEY (inv_collection_id, sled_id, slot)
);

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

INSERT INTO db_metadata (singleton, version, time_modified)
    VALUES (TRUE, '4.0.0', now());
