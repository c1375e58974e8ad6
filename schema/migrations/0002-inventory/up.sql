-- Version 2.0.0: inventory collected from sled agents by the
-- inventory_collection background task.

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
