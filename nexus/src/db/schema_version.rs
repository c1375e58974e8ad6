//! The schema version gate and the upgrade path.
//!
//! Nexus runs only against a database at exactly [`SCHEMA_VERSION`]; anything
//! else is refused at start-up with a message that says what to do
//! ([`check_version`]). `rack-dev db-upgrade` calls [`upgrade`], which
//! initializes an empty database from `dbinit.sql` or applies the missing
//! migrations in order, each in its own transaction.

use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

/// One step of `schema/migrations/`. Migration `number` brings the database to
/// version `number.0.0`.
pub struct Migration {
    pub number: u32,
    pub name: &'static str,
    pub up_sql: &'static str,
}

/// Every migration, oldest first. `migration_list_matches_directory` checks
/// this against `schema/migrations/`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        number: 1,
        name: "initial",
        up_sql: include_str!("../../../schema/migrations/0001-initial/up.sql"),
    },
    Migration {
        number: 2,
        name: "inventory",
        up_sql: include_str!("../../../schema/migrations/0002-inventory/up.sql"),
    },
    Migration {
        number: 3,
        name: "durability",
        up_sql: include_str!("../../../schema/migrations/0003-durability/up.sql"),
    },
    Migration {
        number: 4,
        name: "lifecycle",
        up_sql: include_str!("../../../schema/migrations/0004-lifecycle/up.sql"),
    },
];

/// The whole current schema.
pub const DBINIT_SQL: &str = include_str!("../../../schema/dbinit.sql");

/// The version this Nexus needs: that of the last migration.
pub const SCHEMA_VERSION: &str = "4.0.0";

const UPGRADE_HINT: &str = "rack-dev db-upgrade --database-url URL";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("the database has no schema (no db_metadata table); initialize it with `{UPGRADE_HINT}`")]
    Uninitialized,
    #[error(
        "the database schema is at version {found}, older than version {SCHEMA_VERSION} that this \
         Nexus needs; upgrade it with `{UPGRADE_HINT}` (applies {pending})"
    )]
    Older { found: String, pending: String },
    #[error(
        "the database schema is at version {found}, which this Nexus does not know (it knows \
         1.0.0 to {SCHEMA_VERSION}); a newer Nexus probably wrote it, so run that Nexus instead"
    )]
    Unknown { found: String },
}

/// Why reading or upgrading the schema failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("reading the schema version")]
    ReadVersion(#[source] diesel::result::Error),
    #[error("applying {step}")]
    Apply {
        step: String,
        #[source]
        source: diesel::result::Error,
    },
    #[error(
        "the schema version changed from {expected} to {found} while upgrading; another upgrade is running"
    )]
    Concurrent { expected: String, found: String },
}

/// What [`upgrade`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeOutcome {
    Initialized,
    Migrated { from: String, applied: Vec<String> },
    AlreadyCurrent,
}

fn migration_label(migration: &Migration) -> String {
    format!("{:04}-{}", migration.number, migration.name)
}

/// Accepts exactly [`SCHEMA_VERSION`]; explains anything else.
pub fn check_version(found: Option<&str>) -> Result<(), SchemaError> {
    let found = found.ok_or(SchemaError::Uninitialized)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    match pending_migrations(found) {
        Some(pending) => Err(SchemaError::Older {
            found: found.to_string(),
            pending: pending.iter().map(migration_label).collect::<Vec<_>>().join(", "),
        }),
        None => Err(SchemaError::Unknown { found: found.to_string() }),
    }
}

/// The migrations that bring a database at `found` to the current version, or
/// `None` if `found` is not a version any migration produced.
fn pending_migrations(found: &str) -> Option<&'static [Migration]> {
    let position = MIGRATIONS.iter().position(|m| version_of(m) == found)?;
    Some(&MIGRATIONS[position + 1..])
}

fn version_of(migration: &Migration) -> String {
    format!("{}.0.0", migration.number)
}

#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Nullable<Text>)]
    version: Option<String>,
}

/// The schema version recorded in the database; `None` if it has no schema.
pub async fn read_version(conn: &mut AsyncPgConnection) -> Result<Option<String>, diesel::result::Error> {
    // information_schema rather than to_regclass(): CockroachDB has the former.
    let rows: Vec<VersionRow> = diesel::sql_query(
        "SELECT (SELECT version FROM db_metadata WHERE singleton) AS version \
         FROM information_schema.tables \
         WHERE table_name = 'db_metadata' AND table_schema = current_schema()",
    )
    .load(conn)
    .await
    .or_else(|error| match error {
        // The subquery is planned even when the table is absent.
        diesel::result::Error::DatabaseError(_, ref info)
            if info.message().contains("db_metadata") && info.message().contains("does not exist") =>
        {
            Ok(Vec::new())
        }
        other => Err(other),
    })?;
    Ok(rows.into_iter().next().and_then(|row| row.version))
}

/// Brings the database to [`SCHEMA_VERSION`].
pub async fn upgrade(conn: &mut AsyncPgConnection) -> Result<UpgradeOutcome, UpgradeError> {
    let Some(found) = read_version(conn).await.map_err(UpgradeError::ReadVersion)? else {
        in_transaction(conn, DBINIT_SQL)
            .await
            .map_err(|source| UpgradeError::Apply { step: "schema/dbinit.sql".into(), source })?;
        return Ok(UpgradeOutcome::Initialized);
    };
    let pending = pending_migrations(&found).ok_or_else(|| SchemaError::Unknown { found: found.clone() })?;
    if pending.is_empty() {
        return Ok(UpgradeOutcome::AlreadyCurrent);
    }
    let mut current = found.clone();
    let mut applied = Vec::new();
    for migration in pending {
        let label = migration_label(migration);
        let next = version_of(migration);
        // The version check and the bump are in the migration's transaction,
        // so two concurrent upgrades cannot both apply one step.
        let sql = format!(
            "{}\n;UPDATE db_metadata SET version = '{next}', time_modified = now() \
             WHERE singleton AND version = '{current}';",
            migration.up_sql
        );
        in_transaction(conn, &sql)
            .await
            .map_err(|source| UpgradeError::Apply { step: format!("migration {label}"), source })?;
        let now = read_version(conn).await.map_err(UpgradeError::ReadVersion)?;
        if now.as_deref() != Some(next.as_str()) {
            return Err(UpgradeError::Concurrent { expected: next, found: now.unwrap_or_default() });
        }
        applied.push(label);
        current = next;
    }
    Ok(UpgradeOutcome::Migrated { from: found, applied })
}

/// Applies the first migration only: what a database of the first release
/// looked like. For tests of the upgrade path.
pub async fn create_oldest(conn: &mut AsyncPgConnection) -> Result<(), diesel::result::Error> {
    in_transaction(conn, MIGRATIONS[0].up_sql).await
}

async fn in_transaction(conn: &mut AsyncPgConnection, sql: &str) -> Result<(), diesel::result::Error> {
    conn.batch_execute("BEGIN").await?;
    match conn.batch_execute(sql).await {
        Ok(()) => conn.batch_execute("COMMIT").await,
        Err(error) => {
            // The error that matters is the migration's; a failed rollback
            // leaves the connection broken, and the caller drops it.
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_list_matches_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema/migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        on_disk.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(migration_label).collect();
        assert_eq!(listed, on_disk, "MIGRATIONS and schema/migrations/ disagree");
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.number as usize, index + 1, "migration numbers must be 1, 2, 3, ...");
        }
        assert_eq!(SCHEMA_VERSION, version_of(MIGRATIONS.last().unwrap()));
        assert!(
            DBINIT_SQL.contains(&format!("'{SCHEMA_VERSION}'")),
            "dbinit.sql must record version {SCHEMA_VERSION}"
        );
    }

    #[test]
    fn check_version_explains_each_mismatch() {
        assert_eq!(check_version(Some(SCHEMA_VERSION)), Ok(()));
        let uninitialized = check_version(None).unwrap_err().to_string();
        assert!(uninitialized.contains("no schema") && uninitialized.contains(UPGRADE_HINT));
        let older = check_version(Some("1.0.0")).unwrap_err().to_string();
        assert!(older.contains("1.0.0") && older.contains(SCHEMA_VERSION), "{older}");
        assert!(older.contains("0002-inventory") && older.contains(UPGRADE_HINT), "{older}");
        let unknown = check_version(Some("99.0.0")).unwrap_err().to_string();
        assert!(unknown.contains("99.0.0") && unknown.contains("does not know"), "{unknown}");
    }

    use crate::db::datastore::PoolConfig;
    use crate::db::{DataStore, DataStoreError};
    use diesel_async::AsyncConnection;
    use test_harness::TestDatabase;

    #[derive(QueryableByName)]
    struct Item {
        #[diesel(sql_type = Text)]
        item: String,
    }

    /// Tables, columns (type, nullability, default), indexes and constraints,
    /// one line each, sorted.
    async fn schema_snapshot(conn: &mut AsyncPgConnection) -> Vec<String> {
        let items: Vec<Item> = diesel::sql_query(
            "SELECT 'table ' || table_name AS item FROM information_schema.tables \
               WHERE table_schema = 'public' \
             UNION ALL SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type \
               || ' nullable=' || is_nullable || ' default=' || coalesce(column_default, '-') \
               FROM information_schema.columns WHERE table_schema = 'public' \
             UNION ALL SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes \
               WHERE schemaname = 'public' \
             UNION ALL SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ': ' \
               || pg_get_constraintdef(oid) FROM pg_constraint \
               WHERE connamespace = 'public'::regnamespace \
             UNION ALL SELECT 'version ' || version FROM db_metadata \
             UNION ALL SELECT 'generation ' || generation FROM tuf_generation \
             ORDER BY 1",
        )
        .load(conn)
        .await
        .unwrap();
        items.into_iter().map(|row| row.item).collect()
    }

    async fn connect(db: &TestDatabase) -> AsyncPgConnection {
        AsyncPgConnection::establish(db.url()).await.unwrap()
    }

    #[tokio::test]
    async fn migrations_match_dbinit() {
        let from_dbinit = TestDatabase::empty().await;
        let mut conn = connect(&from_dbinit).await;
        assert_eq!(upgrade(&mut conn).await.unwrap(), UpgradeOutcome::Initialized);
        let expected = schema_snapshot(&mut conn).await;

        let from_migrations = TestDatabase::empty().await;
        let mut conn = connect(&from_migrations).await;
        create_oldest(&mut conn).await.unwrap();
        assert_eq!(read_version(&mut conn).await.unwrap().as_deref(), Some("1.0.0"));
        let outcome = upgrade(&mut conn).await.unwrap();
        assert_eq!(
            outcome,
            UpgradeOutcome::Migrated {
                from: "1.0.0".into(),
                applied: vec!["0002-inventory".into(), "0003-durability".into(), "0004-lifecycle".into()]
            }
        );
        let actual = schema_snapshot(&mut conn).await;

        assert!(expected.contains(&"table inv_m2".to_string()), "{expected:#?}");
        assert!(expected.iter().any(|line| line.starts_with("index tuf_artifact_by_sha256")));
        assert!(expected.contains(&format!("version {SCHEMA_VERSION}")));
        let missing: Vec<_> = expected.iter().filter(|line| !actual.contains(line)).collect();
        let extra: Vec<_> = actual.iter().filter(|line| !expected.contains(line)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "dbinit.sql and the migrations disagree.\nonly in dbinit.sql: {missing:#?}\nonly after migrations: {extra:#?}"
        );
        assert_eq!(upgrade(&mut conn).await.unwrap(), UpgradeOutcome::AlreadyCurrent);
    }

    #[tokio::test]
    async fn nexus_refuses_a_database_at_another_version() {
        let db = TestDatabase::empty().await;
        let config = PoolConfig::default();
        let refusal = |error: DataStoreError| match error {
            DataStoreError::Schema(schema) => schema,
            other => panic!("expected a schema refusal, got {other:?}"),
        };

        let error = refusal(DataStore::connect(db.url(), &config).await.err().unwrap());
        assert_eq!(error, SchemaError::Uninitialized);

        let mut conn = connect(&db).await;
        create_oldest(&mut conn).await.unwrap();
        let error = refusal(DataStore::connect(db.url(), &config).await.err().unwrap());
        assert!(matches!(&error, SchemaError::Older { found, .. } if found == "1.0.0"), "{error:?}");
        assert!(error.to_string().contains("rack-dev db-upgrade"), "{error}");

        conn.batch_execute("UPDATE db_metadata SET version = '7.0.0'").await.unwrap();
        let error = refusal(DataStore::connect(db.url(), &config).await.err().unwrap());
        assert!(matches!(&error, SchemaError::Unknown { found } if found == "7.0.0"), "{error:?}");
        let error = upgrade(&mut conn).await.unwrap_err();
        assert!(error.to_string().contains("7.0.0"), "{error}");

        conn.batch_execute("UPDATE db_metadata SET version = '1.0.0'").await.unwrap();
        upgrade(&mut conn).await.unwrap();
        DataStore::connect(db.url(), &config).await.unwrap();
    }
}
