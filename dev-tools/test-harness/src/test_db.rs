//! One database per test, cloned from a template in one server per process.
//!
//! The first test to ask starts the process's [`PgServer`] and builds the
//! template from `schema/dbinit.sql`; every test then gets its own database
//! with `CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY` (tens of
//! milliseconds). The server is stopped and its directory removed by an
//! `atexit` hook, which runs however the test binary exits, including after a
//! failed test.

use crate::pg::{PgServer, execute};
use common::error_chain;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

const DBINIT_SQL: &str = include_str!("../../../schema/dbinit.sql");
const TEMPLATE: &str = "rack_template";

/// Owned here rather than in the `OnceCell` so that the exit hook can take it.
static SERVER: Mutex<Option<PgServer>> = Mutex::new(None);
static SERVER_BASE: tokio::sync::OnceCell<Result<ServerUrls, String>> = tokio::sync::OnceCell::const_new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone)]
struct ServerUrls {
    admin: String,
    /// `postgresql://.../` to which a database name is appended.
    prefix: String,
}

/// A database of this test's own on the process's private server. Clones
/// name the same database (for several Nexus instances sharing it).
#[derive(Clone)]
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// A database with the current schema (`dbinit.sql`) applied.
    ///
    /// Panics with the cause if the server cannot be started: this is for
    /// tests.
    pub async fn new() -> TestDatabase {
        Self::create(Some(TEMPLATE)).await
    }

    /// A database with no schema at all, for tests of schema set-up and
    /// migrations.
    pub async fn empty() -> TestDatabase {
        Self::create(None).await
    }

    /// A database the caller created on a server of its own (on a
    /// [`crate::PgCluster`], say), for code that takes a `TestDatabase`.
    pub fn existing(name: &str, url: String) -> TestDatabase {
        TestDatabase { name: name.to_string(), url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn create(template: Option<&str>) -> TestDatabase {
        let urls = match SERVER_BASE.get_or_init(start_server).await {
            Ok(urls) => urls.clone(),
            Err(message) => panic!("test database server: {message}"),
        };
        let name = format!("test_{}_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed), rand::random::<u32>());
        let sql = match template {
            Some(template) => {
                format!("CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
            }
            None => format!("CREATE DATABASE {name}"),
        };
        execute(&urls.admin, &sql)
            .await
            .unwrap_or_else(|error| panic!("creating test database {name}: {}", error_chain(&error)));
        TestDatabase { url: format!("{}{name}", urls.prefix), name }
    }
}

async fn start_server() -> Result<ServerUrls, String> {
    let server = PgServer::start().await.map_err(|e| error_chain(&e))?;
    let urls = ServerUrls { admin: server.url("postgres"), prefix: server.url("") };
    *SERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
    // SAFETY: registering a plain extern "C" fn with atexit is always sound.
    unsafe { libc::atexit(stop_server_at_exit) };

    execute(&urls.admin, &format!("CREATE DATABASE {TEMPLATE}")).await.map_err(|e| error_chain(&e))?;
    execute(&format!("{}{TEMPLATE}", urls.prefix), DBINIT_SQL)
        .await
        .map_err(|e| format!("applying schema/dbinit.sql to the template: {}", error_chain(&e)))?;
    Ok(urls)
}

extern "C" fn stop_server_at_exit() {
    let server = SERVER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(server);
}
