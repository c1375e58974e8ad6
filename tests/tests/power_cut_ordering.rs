//! What an answer acknowledged survives a power cut (DESIGN §10.6, §11),
//! checked in the system calls of the real `nexus` and `sled-agent` binaries,
//! which run under `strace`.
//!
//! A rename (or link) gives a file its name, but only the file's fsync makes
//! its bytes durable and only its directory's fsync makes the name durable.
//! Without the first, a power cut can leave the name on an empty or partial
//! file; without the second, the name can vanish. So each of these names must
//! be given to a file fsynced under its old name *before* the rename, and be
//! followed *after* the rename by an fsync of its directory:
//! - Nexus: each staged artifact (`<staging>/artifacts/<sha256>`), with both
//!   fsyncs before the database COMMIT that records the repository: an
//!   upload's 200 says its bytes are staged, and a recorded repository is
//!   never re-uploaded to restore them;
//! - Nexus: the operator token file (created with `link`, so that concurrent
//!   Nexus instances agree on one token);
//! - each sled agent: each artifact on each M.2 (`<m2>/artifacts/<sha256>`,
//!   from a temp file in `<m2>/artifacts/tmp/`) and each config ledger copy
//!   (`<m2>/artifact-config.g<generation>.json`).
//!
//! Nothing here cuts the power: the order in the trace is what a power cut
//! would expose. The checks demand at least one of each kind of name per
//! process (or M.2), so that a trace that misses the calls cannot pass.

use camino::{Utf8Path, Utf8PathBuf};
use integration_tests::binary;
use integration_tests::processes::{write_nexus_config, write_sled_config};
use integration_tests::rack::{holds_exactly, sled_view_at, wait_until};
use integration_tests::repos::{RepoFactory, upload};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Syncs, name changes, and the writes that carry PostgreSQL messages.
const TRACED_CALLS: &str = "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat,sendto,write,writev";

/// A PostgreSQL simple-query `COMMIT` message as strace prints it.
const COMMIT_MESSAGE: &str = r"Q\0\0\0\vCOMMIT\0";

/// The upload's insert: its Parse message carries the statement's text.
const REPO_INSERT: &str = r#"INSERT INTO \"tuf_repo\" "#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsyncs_renames_and_commits_happen_in_a_power_cut_safe_order() {
    require_strace();
    let db = test_harness::TestDatabase::new().await;
    let tempdir = camino_tempfile::tempdir().unwrap();
    // `-y` shows resolved paths, so the configs name resolved ones too.
    let dir = tempdir.path().canonicalize_utf8().unwrap();
    let nexus_dir = dir.join("nexus");
    std::fs::create_dir(&nexus_dir).unwrap();
    write_nexus_config(&nexus_dir, db.url(), |text| {
        // So that Nexus releases (deletes) its staged copies once both sleds
        // hold them: the test waits for the end of the whole hand-off.
        text.replace("min_sled_replication = 3", "min_sled_replication = 2")
            .replace("allow_fewer_sleds = false", "allow_fewer_sleds = true")
            .replace("followup_delay_millis = 1000", "followup_delay_millis = 100")
    });
    let nexus = Traced::start("nexus", &nexus_dir.join("config.toml"), &dir.join("nexus"), 2);
    let external = nexus.after("nexus external API: ").to_string();
    let internal = nexus.after("nexus internal API: ").to_string();
    let token = std::fs::read_to_string(nexus_dir.join("operator-token")).unwrap();

    let datastore = nexus::db::DataStore::connect(db.url(), &Default::default()).await.unwrap();
    let mut sleds = Vec::new();
    for index in 0..2 {
        let sled_dir = dir.join(format!("sled{index}"));
        std::fs::create_dir(&sled_dir).unwrap();
        let m2 = write_sled_config(&sled_dir, &internal);
        let sled = Traced::start("sled-agent", &sled_dir.join("config.toml"), &sled_dir, 2);
        let id: uuid::Uuid = sled.printed[0].split_whitespace().nth(1).unwrap().parse().unwrap();
        wait_until("the sled registers", Duration::from_secs(20), async || {
            datastore.sled_get(id).await.is_ok()
        })
        .await;
        sleds.push((sled, m2));
    }

    let factory = RepoFactory::new().await;
    integration_tests::external_client::authenticated(&external, &token)
        .trust_root_create(&factory.root_json())
        .await
        .unwrap();
    let zip = factory.build(&RepoFactory::spec("1.0.0", &[("a", 1 << 20), ("b", 1 << 20)], 1)).await;
    let (status, body) = upload(&external, Some(&token), &zip).await;
    assert_eq!(status, 200, "{body}");

    let wanted = datastore.tuf_artifact_config().await.unwrap();
    let internal_client = common::clients::nexus_internal::Client::new(&internal);
    let request = common::api::nexus_internal::BackgroundTasksActivateRequest {
        bgtask_names: ["tuf_artifact_replication".to_string()].into(),
    };
    let staged = nexus_dir.join("staging/artifacts");
    wait_until("both sleds hold the repository and Nexus released it", Duration::from_secs(30), async || {
        internal_client.bgtask_activate(&request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut done = std::fs::read_dir(&staged).unwrap().count() == 0;
        for (sled, _) in &sleds {
            done &= holds_exactly(&sled_view_at(sled.after("sled-agent API: ")).await, &wanted);
        }
        done
    })
    .await;

    let mut problems = Vec::new();
    for (sled, m2) in sleds {
        let trace = Trace::read(&sled.stop().await);
        problems.extend(check_sled(&trace, &m2).err());
    }
    let trace = Trace::read(&nexus.stop().await);
    problems.extend(check_nexus(&trace, &nexus_dir).err());
    if !problems.is_empty() {
        let kept = tempdir.keep();
        panic!("{}\n(the traces are kept in {kept})", problems.join("\n"));
    }
}

fn require_strace() {
    if let Err(error) = Command::new("strace").arg("-V").stdout(Stdio::null()).output() {
        panic!("cannot run strace ({error}): run dev-tools/install-prerequisites, which installs it");
    }
}

/// A binary running under `strace`, both in a process group of their own that
/// is killed as a whole: nothing outlives the test.
struct Traced {
    strace: Child,
    trace: Utf8PathBuf,
    /// The first lines the binary printed.
    printed: Vec<String>,
}

impl Traced {
    /// Writes the trace to `<base>.trace` and the binary's (and strace's)
    /// stderr to `<base>.stderr`.
    fn start(program: &str, config: &Utf8Path, base: &Utf8Path, lines: usize) -> Traced {
        let trace = base.with_extension("trace");
        let stderr_path = base.with_extension("stderr");
        let mut strace = Command::new("strace")
            // -y: the path of each fd; -qq: no attach and exit messages;
            // -s: enough of each buffer to see a COMMIT behind other messages.
            .args(["-f", "-y", "-qq", "--seccomp-bpf", "-s", "256", "-e", TRACED_CALLS, "-o"])
            .arg(&trace)
            .arg(binary(program))
            .arg("--config")
            .arg(config)
            // It would override the database URL of the config.
            .env_remove("DATABASE_URL")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(strace.stdout.take().unwrap());
        let mut printed = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.is_empty() {
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("{program} under strace exited before it started:\n{stderr}");
            }
            printed.push(line.trim().to_string());
        }
        // Keep draining so the binary never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Traced { strace, trace, printed }
    }

    fn after(&self, prefix: &str) -> &str {
        self.printed
            .iter()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.printed))
    }

    /// Stops the binary with SIGTERM and returns the trace's path. strace
    /// (which blocks fatal signals when it writes to a file) passes the signal
    /// on and exits with its tracee, having written the whole trace.
    async fn stop(mut self) -> Utf8PathBuf {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.strace.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "strace writing {} did not exit after SIGTERM", self.trace);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.trace.clone()
    }

    fn signal(&self, signal: libc::c_int) {
        // The group's id is strace's pid, not reused while strace is unreaped.
        unsafe { libc::killpg(self.strace.id() as libc::pid_t, signal) };
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if matches!(self.strace.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.strace.wait();
        }
    }
}

/// Nexus: the staged artifacts (before the upload's COMMIT) and the operator
/// token file. The test uploads one repository, so every rename into the
/// staging area belongs to that upload.
fn check_nexus(trace: &Trace, nexus_dir: &Utf8Path) -> Result<(), String> {
    let staging = nexus_dir.join("staging/artifacts");
    let token = nexus_dir.join("operator-token");
    let commit = trace.upload_commit()?;
    let (mut staged, mut tokens) = (0, 0);
    for (call, from, to) in trace.names() {
        if Utf8Path::new(&to).parent() == Some(staging.as_path()) {
            trace.check_durably_named(call, &from, &staging, Some(commit))?;
            staged += 1;
        } else if Utf8Path::new(&to) == token {
            trace.check_durably_named(call, &from, nexus_dir, None)?;
            tokens += 1;
        }
    }
    if staged == 0 {
        return Err(format!("{}: no rename into {}: the upload was not traced", trace.file, staging));
    }
    if tokens == 0 {
        return Err(format!("{}: {} was never created: its creation was not traced", trace.file, token));
    }
    Ok(())
}

/// A sled agent: the artifacts and config ledger copies on each M.2.
fn check_sled(trace: &Trace, m2_dirs: &[Utf8PathBuf]) -> Result<(), String> {
    for m2 in m2_dirs {
        let artifacts = m2.join("artifacts");
        let tmp = artifacts.join("tmp");
        let (mut stored, mut ledgers) = (0, 0);
        for (call, from, to) in trace.names() {
            let to = Utf8Path::new(&to);
            let name = to.file_name().unwrap_or_default();
            if to.parent() == Some(artifacts.as_path()) && is_sha256(name) {
                if Utf8Path::new(&from).parent() != Some(tmp.as_path()) {
                    return Err(trace.problem(call, &format!("an artifact renamed from outside {tmp}")));
                }
                trace.check_durably_named(call, &from, &artifacts, None)?;
                stored += 1;
            } else if to.parent() == Some(m2.as_path()) && is_ledger_name(name) {
                trace.check_durably_named(call, &from, m2, None)?;
                ledgers += 1;
            }
        }
        if stored == 0 || ledgers == 0 {
            return Err(format!(
                "{}: {stored} artifact and {ledgers} ledger renames on {}: the replication was not traced",
                trace.file, m2
            ));
        }
    }
    Ok(())
}

fn is_sha256(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_ledger_name(name: &str) -> bool {
    let digits = name.strip_prefix("artifact-config.g").and_then(|rest| rest.strip_suffix(".json"));
    digits.is_some_and(|digits| digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// One traced system call that returned.
#[derive(Debug)]
struct Call {
    /// Lines (1-based) of its entry and of its return: they differ when
    /// another thread's call came in between.
    entered: usize,
    returned: usize,
    name: String,
    args: Vec<String>,
    result: String,
    /// The call as traced (both halves joined), for messages.
    text: String,
}

impl Call {
    fn succeeded(&self) -> bool {
        self.result.split_whitespace().next().is_some_and(|value| value.parse::<u64>().is_ok())
    }

    /// The path of the file whose data (fsync or fdatasync) this made durable.
    fn synced(&self) -> Option<&str> {
        let synced = matches!(self.name.as_str(), "fsync" | "fdatasync") && self.succeeded();
        synced.then(|| fd_path(self.args.first()?)).flatten()
    }

    /// The directory whose entries this made durable: only fsync does.
    fn synced_dir(&self) -> Option<&str> {
        if self.name == "fsync" { self.synced() } else { None }
    }

    /// A successful rename or link: the old and the new name.
    fn named(&self) -> Option<(String, String)> {
        if !self.succeeded() {
            return None;
        }
        let args = &self.args;
        match self.name.as_str() {
            "rename" | "link" if args.len() == 2 => Some((unquote(&args[0])?, unquote(&args[1])?)),
            "renameat" | "renameat2" | "linkat" if args.len() >= 4 => {
                Some((resolve(&args[0], &args[1])?, resolve(&args[2], &args[3])?))
            }
            _ => None,
        }
    }

    /// A successful send: the fd's path (`socket:[inode]`) and the buffer.
    fn sent(&self) -> Option<(&str, &str)> {
        let sent = matches!(self.name.as_str(), "sendto" | "write" | "writev") && self.succeeded();
        sent.then(|| Some((fd_path(self.args.first()?)?, self.args.get(1)?.as_str()))).flatten()
    }
}

/// `12</some/path>` (`-y`) → `/some/path`
fn fd_path(arg: &str) -> Option<&str> {
    arg.split_once('<')?.1.strip_suffix('>')
}

/// A path argument: a C string as strace prints it.
fn unquote(arg: &str) -> Option<String> {
    let inner = arg.strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.replace(r#"\""#, "\"").replace(r"\\", r"\"))
}

/// A path relative to a directory fd (`AT_FDCWD</cwd>` or `5</dir>`).
fn resolve(dirfd: &str, path: &str) -> Option<String> {
    let path = unquote(path)?;
    if path.starts_with('/') {
        return Some(path);
    }
    Some(Utf8Path::new(fd_path(dirfd)?).join(path).into_string())
}

struct Trace {
    file: Utf8PathBuf,
    calls: Vec<Call>,
}

impl Trace {
    fn read(file: &Utf8Path) -> Trace {
        let text = std::fs::read_to_string(file).unwrap_or_else(|error| panic!("reading {file}: {error}"));
        Trace { file: file.to_owned(), calls: parse_trace(&text) }
    }

    fn problem(&self, call: &Call, problem: &str) -> String {
        format!("{}:{}: {problem}\n    {}", self.file, call.entered, call.text)
    }

    /// Every rename and link: the call, the old name and the new one.
    fn names(&self) -> impl Iterator<Item = (&Call, String, String)> {
        self.calls.iter().filter_map(|call| call.named().map(|(from, to)| (call, from, to)))
    }

    /// Checks that the file `call` named had been fsynced under its old
    /// name `from` before, and that `dir` was fsynced after it (and before
    /// `commit`, if the name must be durable before a database COMMIT).
    fn check_durably_named(
        &self,
        call: &Call,
        from: &str,
        dir: &Utf8Path,
        commit: Option<&Call>,
    ) -> Result<(), String> {
        if !self.calls.iter().any(|sync| sync.synced() == Some(from) && sync.returned < call.entered) {
            return Err(self.problem(call, &format!("named before {from} was fsynced")));
        }
        let limit = commit.map_or(usize::MAX, |commit| commit.entered);
        let dir_synced = self.calls.iter().any(|sync| {
            sync.synced_dir().map(Utf8Path::new) == Some(dir)
                && sync.entered > call.returned
                && sync.returned < limit
        });
        match commit {
            _ if dir_synced => Ok(()),
            None => Err(self.problem(call, &format!("no fsync of {dir} after this"))),
            Some(commit) => Err(self.problem(
                call,
                &format!(
                    "no fsync of {dir} after this and before the COMMIT at line {}: {}",
                    commit.entered, commit.text
                ),
            )),
        }
    }

    /// The COMMIT that recorded the uploaded repository: the first on the
    /// database connection that sent the repository's insert, after it.
    /// (Other transactions commit meanwhile on other connections.)
    fn upload_commit(&self) -> Result<&Call, String> {
        let (insert, socket) = self
            .calls
            .iter()
            .find_map(|call| {
                call.sent().filter(|(_, data)| data.contains(REPO_INSERT)).map(|(fd, _)| (call, fd))
            })
            .ok_or_else(|| format!("{}: no {REPO_INSERT} sent to the database", self.file))?;
        self.calls
            .iter()
            .filter(|call| call.entered > insert.returned)
            .find(|call| call.sent().is_some_and(|(fd, data)| fd == socket && data.contains(COMMIT_MESSAGE)))
            .ok_or_else(|| self.problem(insert, &format!("no COMMIT on {socket} after this")))
    }
}

/// Parses the output of `strace -f`: each line starts with a thread id; a
/// call that another thread's interrupted is split into `name(args
/// <unfinished ...>` and `<... name resumed>rest = result` on its thread.
/// Signals, exits and calls that never returned are left out.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut unfinished: HashMap<&str, (usize, &str)> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let Some((tid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        let (entered, whole) = if let Some(start) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(tid, (number, start));
            continue;
        } else if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = resumed.split_once(" resumed>") else { continue };
            let Some((entered, start)) = unfinished.remove(tid) else { continue };
            (entered, format!("{start}{tail}"))
        } else {
            (number, rest.to_string())
        };
        if let Some(call) = parse_call(&whole, entered, number) {
            calls.push(Call { text: format!("{tid} {whole}"), ..call });
        }
    }
    // In the order they started, as the checks' "first" means.
    calls.sort_by_key(|call| call.entered);
    calls
}

/// `name(arg, arg) = result`
fn parse_call(text: &str, entered: usize, returned: usize) -> Option<Call> {
    let (name, args) = text.split_once('(')?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let (args, rest) = split_args(args)?;
    let result = rest.trim_start().strip_prefix('=')?.trim().to_string();
    Some(Call { entered, returned, name: name.to_string(), args, result, text: String::new() })
}

/// Splits arguments at the commas outside strings, brackets and `-y`'s
/// `<path>`, up to the closing parenthesis; returns them and what follows.
fn split_args(text: &str) -> Option<(Vec<String>, &str)> {
    let mut args = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    for (at, c) in text.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' | '<' => depth += 1,
            ')' if depth == 0 => {
                let last = text[start..at].trim();
                if !last.is_empty() {
                    args.push(last.to_string());
                }
                return Some((args, &text[at + 1..]));
            }
            ')' | ']' | '}' | '>' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                args.push(text[start..at].trim().to_string());
                start = at + 1;
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod parser_tests {
    use super::*;

    /// Threads 7 and 8 interleave; the staging directory's fsync is split by
    /// another thread's send; the COMMIT follows another message.
    const NEXUS: &str = r#"7 fsync(11</n/.operator-token.tmp-1>) = 0
7 linkat(AT_FDCWD</cwd>, "/n/.operator-token.tmp-1", AT_FDCWD</cwd>, "/n/operator-token", 0) = 0
7 fsync(11</n>)  = 0
8 sendto(9<socket:[5]>, "Q\0\0\0'BEGIN ISOLATION LEVEL SERIALIZABLE\0", 40, MSG_NOSIGNAL, NULL, 0) = 40
8 sendto(9<socket:[5]>, "Q\0\0\0\vCOMMIT\0", 12, MSG_NOSIGNAL, NULL, 0) = 12
7 fsync(19</n/staging/uploads/u/repo/targets/x, y>) = 0
7 renameat2(AT_FDCWD</n/staging/uploads/u/repo/targets>, "x, y", AT_FDCWD</cwd>, "/n/staging/artifacts/ab", 0) = 0
7 fsync(19</n/staging/artifacts> <unfinished ...>
8 write(6<socket:[5]>, "P\0\0\0\307s35\0INSERT INTO \"tuf_repo\" (\"id\")", 40 <unfinished ...>
7 <... fsync resumed>) = 0
8 <... write resumed>) = 40
--- SIGCHLD {si_signo=SIGCHLD} ---
8 writev(6<socket:[5]>, [{iov_base="C\0\0\0\tSs38\0S\0\0\0\4Q\0\0\0\vCOMMIT\0", iov_len=27}], 1) = 27
7 rename("/n/x", "/n/staging/artifacts/cd") = -1 ENOENT (No such file or directory)
"#;

    #[test]
    fn the_parser_joins_split_calls_and_resolves_paths() {
        let calls = parse_trace(NEXUS);
        assert_eq!(calls.len(), 11, "{calls:#?}");
        let names: Vec<_> = calls.iter().filter_map(Call::named).collect();
        assert_eq!(
            names,
            [
                ("/n/.operator-token.tmp-1".to_string(), "/n/operator-token".to_string()),
                ("/n/staging/uploads/u/repo/targets/x, y".to_string(), "/n/staging/artifacts/ab".to_string()),
            ]
        );
        let dir_sync = calls.iter().find(|call| call.synced_dir() == Some("/n/staging/artifacts")).unwrap();
        assert_eq!((dir_sync.entered, dir_sync.returned), (8, 10));
        assert_eq!(calls[5].synced(), Some("/n/staging/uploads/u/repo/targets/x, y"));
        let trace = Trace { file: "nexus.trace".into(), calls };
        let commit = trace.upload_commit().unwrap();
        assert_eq!((commit.name.as_str(), commit.entered), ("writev", 13));
        check_nexus(&trace, Utf8Path::new("/n")).unwrap();
    }

    #[test]
    fn the_checks_name_the_call_out_of_order() {
        // The staging directory synced only after the COMMIT.
        let late = NEXUS
            .replace("7 fsync(19</n/staging/artifacts> <unfinished ...>\n", "")
            .replace("7 <... fsync resumed>) = 0\n", "")
            + "7 fsync(19</n/staging/artifacts>) = 0\n";
        let trace = Trace { file: "nexus.trace".into(), calls: parse_trace(&late) };
        let error = check_nexus(&trace, Utf8Path::new("/n")).unwrap_err();
        assert!(
            error.starts_with(
                "nexus.trace:7: no fsync of /n/staging/artifacts after this and before the COMMIT at line 11"
            ),
            "{error}"
        );
        // The data not synced before the rename.
        let unsynced = NEXUS.replace("7 fsync(19</n/staging/uploads/u/repo/targets/x, y>) = 0\n", "");
        let trace = Trace { file: "nexus.trace".into(), calls: parse_trace(&unsynced) };
        let error = check_nexus(&trace, Utf8Path::new("/n")).unwrap_err();
        assert!(error.contains("named before /n/staging/uploads/u/repo/targets/x, y was fsynced"), "{error}");
    }

    #[test]
    fn a_sled_trace_without_ledger_renames_is_refused() {
        let sled = r#"3 fsync(9</m/artifacts/tmp/t>) = 0
3 rename("/m/artifacts/tmp/t", "/m/artifacts/0000000000000000000000000000000000000000000000000000000000000000") = 0
3 fsync(9</m/artifacts>) = 0
"#;
        let trace = Trace { file: "sled.trace".into(), calls: parse_trace(sled) };
        let error = check_sled(&trace, &[Utf8PathBuf::from("/m")]).unwrap_err();
        assert!(error.contains("1 artifact and 0 ledger renames on /m"), "{error}");
    }
}
