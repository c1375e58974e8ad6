//! Test and development infrastructure.
//!
//! - [`pg`]: a private PostgreSQL server in a temp directory. `rack-dev
//!   db-run` and `rack-dev run-all` run one in the foreground; tests get one
//!   per test process.
//! - [`PgCluster`]: a private primary and synchronous standbys, for
//!   `rack-dev run-all --db-standbys` and failover tests.
//! - [`TestDatabase`]: a fresh database for one test, cloned from a template
//!   that was created once per process from `schema/dbinit.sql`.

mod cluster;
pub mod pg;
mod test_db;

pub use cluster::{
    MemberView, PgCluster, Role, ServerAddress, StandbyPosition, promote_furthest_along, standby_positions,
};
pub use pg::{PgError, PgServer};
pub use test_db::TestDatabase;
