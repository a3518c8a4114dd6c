//! A sandbox's cgroup with real processes: limits, OOM accounting, freezer, kill and cleanup,
//! on whatever layout this host has (here: v1 memory/pids/cpu, cgroup2 freezer).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use sandbox::cgroup::{Cgroup, CgroupError, Limits};

/// A cgroup `deltabox-test-<pid>-<test>/sandbox`, removed with its parent when dropped (also when
/// the test fails), so nothing leaks into the host's hierarchies.
struct TestCgroup {
    parent: String,
    name: String,
}

impl TestCgroup {
    fn new(test: &str) -> TestCgroup {
        let parent = format!("deltabox-test-{}-{test}", std::process::id());
        TestCgroup { name: format!("{parent}/sandbox"), parent }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for name in [&self.name, &self.parent] {
            if let Err(err) = Cgroup::remove(name) {
                eprintln!("cleanup of {name}: {err}");
            }
        }
    }
}

/// Starts `sh -c script` waiting on its stdin, moves it into `cgroup`, then lets it run, so the
/// script and everything it forks run inside.
fn spawn_in(cgroup: &Cgroup, script: &str, uid: Option<u32>) -> Child {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!("read _ || exit 1\n{script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
    }
    let mut child = command.spawn().unwrap();
    cgroup.add_process(child.id() as i32).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child
}

/// Waits (up to a minute: the machine is shared) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(10));
    }
}

/// `true` when `pid` no longer exists or is a zombie.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let test = TestCgroup::new("forkbomb");
    let limits = Limits { pids: Some(24), ..Limits::default() };
    let cgroup = Cgroup::create(&test.name, &limits).unwrap();
    // Each process forks two copies of itself; run as nobody, as a sandbox user would be.
    let mut bomb = spawn_in(&cgroup, "b() { b & b & wait; }; b", Some(65534));
    eventually("the bomb hits the pids limit", || cgroup.pids_limit_hits().unwrap() > 0);
    assert!(cgroup.pids_current().unwrap() <= 24);
    assert!(cgroup.procs().unwrap().len() <= 24);
    // The host still forks.
    assert!(Command::new("/bin/true").status().unwrap().success());
    cgroup.destroy().unwrap();
    bomb.wait().unwrap();
}

#[test]
fn memory_limit_oom_kills_and_is_counted() {
    let test = TestCgroup::new("oom");
    let limits = Limits { memory_bytes: Some(32 << 20), ..Limits::default() };
    let cgroup = Cgroup::create(&test.name, &limits).unwrap();
    assert_eq!(cgroup.oom_kills().unwrap(), 0);
    // dd fills a 256 MiB buffer: far past the limit, and there is no swap to go to.
    let mut dd = spawn_in(&cgroup, "exec dd if=/dev/zero of=/dev/null bs=256M count=1", None);
    let status = dd.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(cgroup.oom_kills().unwrap() >= 1);
    cgroup.destroy().unwrap();
}

#[test]
fn freeze_stops_and_thaw_resumes_a_counting_process() {
    let test = TestCgroup::new("freeze");
    let cgroup = Cgroup::create(&test.name, &Limits::default()).unwrap();
    let dir = tempfile_dir("freeze");
    let counter = dir.join("counter");
    let script = format!("i=0; while :; do i=$((i+1)); echo $i > {}; done", counter.display());
    let mut child = spawn_in(&cgroup, &script, None);
    let read = || std::fs::read_to_string(&counter).unwrap_or_default();
    let count = || read().trim().parse::<u64>().unwrap_or(0);
    eventually("the process counts", || count() > 10);
    assert!(cgroup.memory_usage().unwrap() > 0);
    assert_eq!(cgroup.procs().unwrap(), vec![child.id() as i32]);

    for _ in 0..3 {
        cgroup.freeze().unwrap();
        let frozen_at = read();
        sleep(Duration::from_millis(200));
        assert_eq!(read(), frozen_at, "a frozen process kept counting");
        // Freezing twice is fine.
        cgroup.freeze().unwrap();
        cgroup.thaw().unwrap();
        let before = count();
        eventually("the thawed process counts again", || count() > before);
    }
    cgroup.destroy().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kill_all_and_destroy_leave_nothing() {
    let test = TestCgroup::new("destroy");
    let limits = Limits { memory_bytes: Some(256 << 20), pids: Some(64), cpus: Some(0.5) };
    let cgroup = Cgroup::create(&test.name, &limits).unwrap();
    // Background jobs, an orphaned grandchild and a shell that ignores SIGTERM.
    let mut child = spawn_in(&cgroup, "trap '' TERM; sleep 1000 & sleep 1000 & (sleep 1000 &); sleep 1000", None);
    eventually("all processes started", || cgroup.procs().unwrap().len() >= 5);
    let pids = cgroup.procs().unwrap();
    // A frozen cgroup is killed too, and left thawed: a new process runs to its end.
    cgroup.freeze().unwrap();
    cgroup.kill_all().unwrap();
    assert!(cgroup.procs().unwrap().is_empty());
    child.wait().unwrap();
    for pid in &pids {
        eventually("killed processes are reaped", || is_gone(*pid));
    }
    let mut after = spawn_in(&cgroup, "exit 3", None);
    eventually("a process started after kill_all exits", || after.try_wait().unwrap().is_some());
    assert_eq!(after.wait().unwrap().code(), Some(3));
    cgroup.destroy().unwrap();
    assert!(matches!(Cgroup::open(&test.name), Err(CgroupError::NotFound { .. })));
    assert!(Cgroup::list_children(&test.parent).unwrap().is_empty());
}

#[test]
fn destroy_kills_running_processes() {
    let test = TestCgroup::new("destroy-running");
    let cgroup = Cgroup::create(&test.name, &Limits::default()).unwrap();
    let mut child = spawn_in(&cgroup, "sleep 1000 & exec sleep 1000", None);
    eventually("both sleeps run", || cgroup.procs().unwrap().len() == 2);
    let pids = cgroup.procs().unwrap();
    cgroup.destroy().unwrap();
    child.wait().unwrap();
    for pid in pids {
        eventually("killed processes are reaped", || is_gone(pid));
    }
    assert!(matches!(Cgroup::open(&test.name), Err(CgroupError::NotFound { .. })));
}

#[test]
fn cpu_limit_throttles_a_busy_loop() {
    let test = TestCgroup::new("cpu");
    let limits = Limits { cpus: Some(0.1), ..Limits::default() };
    let cgroup = Cgroup::create(&test.name, &limits).unwrap();
    let mut child = spawn_in(&cgroup, "while :; do :; done", None);
    let stat = cpu_stat_path(child.id());
    let throttled = || {
        let stat = std::fs::read_to_string(&stat).unwrap();
        stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).map(|n| n.trim().parse::<u64>().unwrap()).unwrap()
    };
    eventually("the busy loop is throttled", || throttled() > 0);
    cgroup.destroy().unwrap();
    child.wait().unwrap();
}

/// The `cpu.stat` file of the cpu cgroup `pid` is in, found from /proc like an operator would.
fn cpu_stat_path(pid: u32) -> std::path::PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1_cpu = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let options = after.strip_prefix("cgroup cgroup ")?;
        options.split(',').any(|o| o == "cpu").then(|| before.split(' ').nth(4).unwrap().to_owned())
    });
    let (root, path) = match v1_cpu {
        Some(root) => {
            let path = cgroups.lines().find_map(|l| {
                let (_, rest) = l.split_once(':')?;
                let (controllers, path) = rest.split_once(':')?;
                controllers.split(',').any(|c| c == "cpu").then_some(path)
            });
            (root, path.unwrap().to_owned())
        }
        None => {
            let root = mountinfo
                .lines()
                .find_map(|l| {
                    let (before, after) = l.split_once(" - ")?;
                    after.starts_with("cgroup2 ").then(|| before.split(' ').nth(4).unwrap().to_owned())
                })
                .unwrap();
            let path = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            (root, path.to_owned())
        }
    };
    std::path::Path::new(&root).join(path.trim_start_matches('/')).join("cpu.stat")
}

#[test]
fn open_reattaches_and_mistakes_get_clear_errors() {
    let test = TestCgroup::new("open");
    let cgroup = Cgroup::create(&test.name, &Limits::default()).unwrap();
    let mut child = spawn_in(&cgroup, "exec sleep 1000", None);
    drop(cgroup);

    let reopened = Cgroup::open(&test.name).unwrap();
    assert_eq!(reopened.name(), test.name);
    assert_eq!(reopened.procs().unwrap(), vec![child.id() as i32]);
    assert_eq!(Cgroup::list_children(&test.parent).unwrap(), vec![test.name.clone()]);
    assert!(matches!(Cgroup::create(&test.name, &Limits::default()), Err(CgroupError::AlreadyExists { .. })));
    // The parent has a child cgroup: destroying it would kill a sandbox.
    assert!(matches!(Cgroup::remove(&test.parent), Err(CgroupError::HasChildren { .. })));
    assert!(matches!(Cgroup::open(&format!("{}/missing", test.parent)), Err(CgroupError::NotFound { .. })));
    for bad in ["../escape", "/abs", "a//b", "with space"] {
        assert!(matches!(Cgroup::open(bad), Err(CgroupError::InvalidName { .. })));
    }
    let too_small = Limits { memory_bytes: Some(1), ..Limits::default() };
    let err = Cgroup::create(&format!("{}/small", test.parent), &too_small).unwrap_err();
    assert!(matches!(err, CgroupError::InvalidLimit { .. }), "{err}");

    reopened.destroy().unwrap();
    child.wait().unwrap();
}

fn tempfile_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("deltabox-cgroup-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
