//! The private server's lifetime, observed from outside: these tests run this
//! same test binary as a child process that starts a server and then fails or
//! is killed, and check what is left behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_harness::{PgServer, TestDatabase};

const CHILD_MODE: &str = "TEST_HARNESS_CHILD_MODE";

/// Where a child's server lives: its directory and its postmaster pid.
struct ChildServer {
    dir: PathBuf,
    postmaster: i32,
}

/// The body of the child process. Does nothing unless the parent set
/// `TEST_HARNESS_CHILD_MODE`.
#[tokio::test]
#[ignore = "run by the lifecycle tests as a child process"]
async fn child_process() {
    let Ok(mode) = std::env::var(CHILD_MODE) else {
        return;
    };
    let _db = TestDatabase::new().await;
    let dir = own_server_dir(std::process::id()).expect("the server directory exists while it runs");
    let postmaster = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    println!("SERVER {} {}", dir.display(), postmaster.lines().next().unwrap());
    match mode.as_str() {
        "panic" => panic!("this test fails on purpose"),
        _ => std::thread::sleep(Duration::from_secs(120)),
    }
}

fn own_server_dir(pid: u32) -> Option<PathBuf> {
    std::fs::read_dir(std::env::temp_dir()).unwrap().flatten().map(|entry| entry.path()).find(|path| {
        path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("rack-pg-{pid}-")))
    })
}

fn spawn_child(mode: &str) -> (std::process::Child, ChildServer) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        let line = line.unwrap();
        // libtest prints the test's name on the same line first.
        if let Some((_, rest)) = line.split_once("SERVER ") {
            let (dir, pid) = rest.split_once(' ').unwrap();
            return (child, ChildServer { dir: dir.into(), postmaster: pid.parse().unwrap() });
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the child process never reported its server");
}

fn is_alive(pid: i32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_failing_test_process_stops_its_server_and_removes_its_directory() {
    let (mut child, server) = spawn_child("panic");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child's test was meant to fail");
    assert!(!is_alive(server.postmaster), "postmaster {} outlived its test process", server.postmaster);
    assert!(!server.dir.exists(), "{} was left behind", server.dir.display());
}

#[tokio::test]
async fn a_killed_test_process_leaves_nothing_that_breaks_the_next_run() {
    let (mut child, server) = spawn_child("hang");
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel kills the server when its owner dies (PR_SET_PDEATHSIG).
    wait_until("the orphaned server exits", || !is_alive(server.postmaster));
    assert!(server.dir.exists(), "a killed process cannot clean up its directory");

    // The next server start reaps the leftover and works.
    let mut next = PgServer::start().await.unwrap();
    assert!(!server.dir.exists(), "{} was not reaped", server.dir.display());
    let (client, connection) =
        tokio_postgres::connect(&next.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT 1 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let dir: &Path = next.dir();
    let dir = dir.to_path_buf();
    next.stop();
    assert!(!dir.exists());
}
