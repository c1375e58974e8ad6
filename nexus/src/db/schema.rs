//! Diesel's picture of `schema/dbinit.sql`. Kept by hand; the datastore tests
//! run every query against the real schema, so a mismatch fails them.

diesel::table! {
    db_metadata (singleton) {
        singleton -> Bool,
        version -> Text,
        time_modified -> Timestamptz,
    }
}

diesel::table! {
    sled (id) {
        id -> Uuid,
        time_created -> Timestamptz,
        time_modified -> Timestamptz,
        serial -> Text,
        ip -> Text,
        port -> Int4,
        repo_depot_port -> Int4,
        time_expunged -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    tuf_repo (id) {
        id -> Uuid,
        time_created -> Timestamptz,
        sha256 -> Text,
        system_version -> Text,
        file_name -> Text,
        time_pruned -> Nullable<Timestamptz>,
        time_last_uploaded -> Timestamptz,
    }
}

diesel::table! {
    tuf_artifact (id) {
        id -> Uuid,
        name -> Text,
        version -> Text,
        kind -> Text,
        sha256 -> Text,
        size -> Int8,
        time_created -> Timestamptz,
        generation_added -> Int8,
    }
}

diesel::table! {
    tuf_repo_artifact (tuf_repo_id, tuf_artifact_id) {
        tuf_repo_id -> Uuid,
        tuf_artifact_id -> Uuid,
    }
}

diesel::table! {
    tuf_trust_root (id) {
        id -> Uuid,
        time_created -> Timestamptz,
        time_deleted -> Nullable<Timestamptz>,
        root_role -> Jsonb,
    }
}

diesel::table! {
    tuf_generation (singleton) {
        singleton -> Bool,
        generation -> Int8,
    }
}

diesel::joinable!(tuf_repo_artifact -> tuf_repo (tuf_repo_id));
diesel::joinable!(tuf_repo_artifact -> tuf_artifact (tuf_artifact_id));
diesel::allow_tables_to_appear_in_same_query!(tuf_repo, tuf_artifact, tuf_repo_artifact);

diesel::table! {
    inv_collection (id) {
        id -> Uuid,
        time_started -> Timestamptz,
        time_done -> Timestamptz,
        collector -> Text,
    }
}

diesel::table! {
    inv_sled (inv_collection_id, sled_id) {
        inv_collection_id -> Uuid,
        sled_id -> Uuid,
        time_collected -> Timestamptz,
        artifact_generation -> Nullable<Int8>,
        error -> Nullable<Text>,
        ledger_damage -> Nullable<Text>,
    }
}

diesel::table! {
    inv_m2 (inv_collection_id, sled_id, slot) {
        inv_collection_id -> Uuid,
        sled_id -> Uuid,
        slot -> Int4,
        state -> Text,
        used_bytes -> Int8,
        quota_bytes -> Int8,
    }
}

diesel::table! {
    target_release (generation) {
        generation -> Int8,
        tuf_repo_id -> Uuid,
        time_requested -> Timestamptz,
        requested_by -> Text,
    }
}

diesel::table! {
    tuf_repo_health (tuf_repo_id) {
        tuf_repo_id -> Uuid,
        state -> Text,
        generation -> Int8,
        time_checked -> Timestamptz,
        checked_by -> Text,
        artifacts -> Jsonb,
    }
}

diesel::table! {
    nexus_staged_artifact (nexus_id, sha256) {
        nexus_id -> Uuid,
        sha256 -> Text,
        time_staged -> Timestamptz,
    }
}

diesel::table! {
    bgtask_switch (name) {
        name -> Text,
        mode -> Text,
        changed_by -> Text,
        reason -> Text,
        time_changed -> Timestamptz,
    }
}

diesel::table! {
    bgtask_activation (nexus_id, name) {
        nexus_id -> Uuid,
        name -> Text,
        iteration -> Int8,
        reason -> Text,
        time_started -> Timestamptz,
        time_done -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(target_release -> tuf_repo (tuf_repo_id));
diesel::joinable!(tuf_repo_health -> tuf_repo (tuf_repo_id));
diesel::allow_tables_to_appear_in_same_query!(target_release, tuf_repo_health, tuf_repo);
