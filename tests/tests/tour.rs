//! The README's 5-minute tour, run as written: `rack-dev run-all` as a
//! subprocess, then every operator command through `bash -c`, with
//! `target/debug` on PATH (the tour's `cargo build` and `export PATH` lines
//! are what this test's own build and environment provide). Then SIGINT, and
//! nothing may be left: no child process, no run directory, no database.

use integration_tests::binary;
use integration_tests::processes::processes_mentioning;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The lines of the fenced block that follows `<!-- tour:NAME -->`.
fn tour_block(readme: &str, name: &str) -> Vec<String> {
    let marker = format!("<!-- tour:{name} -->");
    let start = readme.find(&marker).unwrap_or_else(|| panic!("README.md has no {marker}"));
    let block = &readme[start..];
    let body = block.split("```sh\n").nth(1).unwrap().split("```").next().unwrap();
    body.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Interrupts run-all if the test ends early (a failed assertion), so that a
/// failing test leaves no rack running; run-all then stops and cleans up.
struct InterruptOnDrop(Option<u32>);

impl InterruptOnDrop {
    /// The test interrupts run-all itself from here on.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
    }
}

#[test]
fn the_readme_tour_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let rack_lines = tour_block(&readme, "rack");
    let run_all =
        rack_lines.iter().find(|line| line.starts_with("rack-dev run-all")).expect("the tour runs run-all");
    assert!(
        rack_lines
            .iter()
            .all(|l| l == run_all || l.starts_with("cargo build") || l.starts_with("export PATH"))
    );
    let operator_lines = tour_block(&readme, "operator");

    let bin_dir: PathBuf = binary("rack-dev").parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let scratch = tempfile::tempdir().unwrap();
    let discovery = scratch.path().join("current.json");
    let command = |line: &str| {
        let mut command = Command::new("bash");
        command
            .args(["-c", line])
            .current_dir(scratch.path())
            .env("PATH", &path)
            .env("RACK_DEV_CURRENT", &discovery)
            .env_remove("RUST_BACKTRACE")
            .env_remove("OMDB_NEXUS_URL")
            .env_remove("OMDB_DB_URL")
            .env_remove("RACK_NEXUS_URL")
            .env_remove("RACK_TOKEN");
        command
    };

    let mut rack = command(run_all).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut guard = InterruptOnDrop(Some(rack.id()));
    let mut banner = BufReader::new(rack.stdout.take().unwrap()).lines();
    let mut run_dir = None;
    let mut database_dir = None;
    for line in banner.by_ref() {
        let line = line.unwrap();
        if let Some(dir) = line.trim().strip_prefix("run directory:") {
            run_dir = Some(PathBuf::from(dir.trim()));
        }
        if let Some(log) = line.trim().strip_prefix("database log:") {
            database_dir = Some(Path::new(log.trim()).parent().unwrap().to_path_buf());
        }
        if line.starts_with("Ready.") {
            break;
        }
    }
    let run_dir = run_dir.expect("run-all prints its run directory");
    let database_dir = database_dir.expect("run-all prints where the database lives");

    for line in &operator_lines {
        // validate fails while copies are still landing: the tour says to
        // run it again.
        let retry_until =
            Instant::now() + Duration::from_secs(if line.contains("validate") { 60 } else { 0 });
        loop {
            let output = command(line).output().unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            if output.status.success() {
                println!("$ {line}\n{stdout}");
                if line.contains("validate") {
                    assert!(
                        !stdout.contains("OLD") && !stdout.contains("BAD") && !stdout.contains("ERROR"),
                        "{stdout}"
                    );
                    assert_eq!(stdout.matches(" OK ").count(), 4, "four sleds OK: {stdout}");
                }
                break;
            }
            assert!(
                Instant::now() < retry_until,
                "`{line}` failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // After the prune, 1.0.0 is marked pruned.
    let list = command("rack-dev repo list").output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let pruned_line = list.lines().find(|l| l.trim_start().starts_with("1.0.0")).unwrap();
    let times =
        pruned_line.split_whitespace().filter(|word| word.ends_with('Z') && word.contains('T')).count();
    assert_eq!(times, 2, "1.0.0 has an upload and a prune time: {list}");

    assert!(!processes_mentioning(run_dir.to_str().unwrap()).is_empty(), "the rack's processes run");
    guard.disarm();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(rack.id() as i32, libc::SIGINT) };
    let status = rack.wait().unwrap();
    assert!(status.success(), "run-all exited with {status}");
    assert!(banner.any(|line| line.unwrap().starts_with("stopped")));
    let leftovers = processes_mentioning(run_dir.to_str().unwrap());
    assert!(leftovers.is_empty(), "processes outlived run-all: {leftovers:?}");
    assert!(processes_mentioning(database_dir.to_str().unwrap()).is_empty(), "PostgreSQL outlived run-all");
    assert!(!run_dir.exists(), "{} was left behind", run_dir.display());
    assert!(!database_dir.exists(), "{} was left behind", database_dir.display());
    assert!(!discovery.exists(), "the discovery file was left behind");
}

/// A child of run-all that dies is reported by name, the rest of the rack is
/// stopped, and run-all exits non-zero with nothing left behind.
#[test]
fn run_all_reports_a_crashed_child_and_stops_the_rest() {
    let scratch = tempfile::tempdir().unwrap();
    let mut rack = Command::new(binary("rack-dev"))
        .args(["run-all", "--sleds", "2"])
        .env("RACK_DEV_CURRENT", scratch.path().join("current.json"))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = InterruptOnDrop(Some(rack.id()));
    let mut banner = BufReader::new(rack.stdout.take().unwrap()).lines();
    let mut run_dir = None;
    for line in banner.by_ref() {
        let line = line.unwrap();
        if let Some(dir) = line.trim().strip_prefix("run directory:") {
            run_dir = Some(dir.trim().to_string());
        }
        if line.starts_with("Ready.") {
            break;
        }
    }
    let run_dir = run_dir.unwrap();
    let victim = processes_mentioning(&format!("{run_dir}/sled-1/config.toml"));
    assert_eq!(victim.len(), 1, "{victim:?}");
    let pid: i32 = victim[0].split(':').next().unwrap().parse().unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };

    let status = rack.wait().unwrap();
    guard.disarm();
    assert!(!status.success(), "run-all must fail when a child crashes");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut rack.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("sled-1 exited unexpectedly"), "{stderr}");
    assert!(processes_mentioning(&run_dir).is_empty(), "the rest of the rack was stopped");
    assert!(!Path::new(&run_dir).exists(), "{run_dir} was removed");
}

/// `run-all --db-standbys 1`: the banner names a primary and a standby, each
/// with its own port and directory; the database URL lists both and asks for
/// the read-write one; omdb reads through that URL; SIGINT removes both.
#[test]
fn run_all_with_a_standby_prints_both_servers_and_cleans_up_both() {
    let scratch = tempfile::tempdir().unwrap();
    let mut rack = Command::new(binary("rack-dev"))
        .args(["run-all", "--sleds", "1", "--db-standbys", "1"])
        .env("RACK_DEV_CURRENT", scratch.path().join("current.json"))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = InterruptOnDrop(Some(rack.id()));
    let mut lines = Vec::new();
    // Closed after the banner: run-all must still stop cleanly.
    for line in BufReader::new(rack.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let ready = line.starts_with("Ready.");
        lines.push(line);
        if ready {
            break;
        }
    }
    let banner = lines.join("\n");
    let server = |name: &str| -> (String, u16, PathBuf) {
        let at = lines
            .iter()
            .position(|line| line.trim().starts_with(&format!("database {name}:")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{banner}"));
        // "database pg1:    synchronous standby on 127.0.0.1:PORT"
        let described = lines[at].split_once(':').unwrap().1.trim();
        let (role, address) = described.rsplit_once(" on ").unwrap_or_else(|| panic!("{banner}"));
        let port = address.rsplit(':').next().unwrap().parse().unwrap();
        let dir = lines[at + 1].trim().strip_prefix("dir ").unwrap_or_else(|| panic!("{banner}"));
        (role.to_string(), port, PathBuf::from(dir))
    };
    let (primary_role, primary_port, primary_dir) = server("pg0");
    let (standby_role, standby_port, standby_dir) = server("pg1");
    assert_eq!(
        (primary_role.as_str(), standby_role.as_str()),
        ("primary", "synchronous standby"),
        "{banner}"
    );
    assert_ne!(primary_port, standby_port);
    assert!(primary_dir.is_dir() && standby_dir.is_dir() && primary_dir != standby_dir, "{banner}");
    let url = lines
        .iter()
        .find_map(|line| line.trim().strip_prefix("database:"))
        .unwrap_or_else(|| panic!("{banner}"))
        .trim()
        .to_string();
    assert!(
        url.contains(&format!(":{primary_port},")) && url.contains(&format!(":{standby_port}/")),
        "{url}"
    );
    assert!(url.ends_with("target_session_attrs=read-write"), "{url}");
    assert!(banner.contains("rack-dev db-promote"), "the banner says how to fail over:\n{banner}");

    let omdb = Command::new(binary("omdb")).args(["db", "tuf-repos", "--db-url", &url]).output().unwrap();
    assert!(omdb.status.success(), "{}", String::from_utf8_lossy(&omdb.stderr));

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(rack.id() as i32, libc::SIGINT) };
    guard.disarm();
    assert!(rack.wait().unwrap().success());
    for dir in [&primary_dir, &standby_dir] {
        assert!(!dir.exists(), "{} was removed", dir.display());
        assert!(processes_mentioning(&dir.display().to_string()).is_empty(), "{} stopped", dir.display());
    }
}
