//! Parsing of the /proc files DeltaCR reads: maps/smaps, status, stat, task lists, children, fd links and
//! fdinfo. Paths are host paths (`/proc/<host pid>`), read by the tracer.

use std::fs;
use std::path::PathBuf;

use nix::unistd::Pid;

pub use sandbox::procfs::{ProcError, Status};

fn read_string(path: PathBuf) -> Result<String, ProcError> {
    fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
}

fn parse_err(path: PathBuf, what: impl Into<String>) -> ProcError {
    ProcError::Parse { path, what: what.into() }
}

/// `/proc/<pid>` (or `/proc/<pid>/task/<tid>` when `tid` is given).
pub fn dir(pid: Pid) -> PathBuf {
    PathBuf::from(format!("/proc/{}", pid.as_raw()))
}

fn task_dir(pid: Pid, tid: Pid) -> PathBuf {
    PathBuf::from(format!("/proc/{}/task/{}", pid.as_raw(), tid.as_raw()))
}

/// One line of /proc/PID/maps plus the `VmFlags` of smaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path column: a file path, `[heap]`, `[stack]`, `[vdso]`, ... or empty for anonymous memory.
    pub name: String,
    /// Two-letter flags from smaps' `VmFlags` (e.g. `gd` for grows-down); empty when read from maps.
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

fn parse_map_line(line: &str) -> Option<MapEntry> {
    // "start-end perms offset dev inode   name"
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    if perms.len() < 4 {
        return None;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode,
        name,
        vm_flags: Vec::new(),
    })
}

/// The mappings of a process with their smaps `VmFlags`.
pub fn smaps(pid: Pid) -> Result<Vec<MapEntry>, ProcError> {
    let path = dir(pid).join("smaps");
    let text = read_string(path.clone())?;
    parse_smaps(&path, &text)
}

/// Parses the text of an smaps file (`path` names it in errors).
pub fn parse_smaps(path: &std::path::Path, text: &str) -> Result<Vec<MapEntry>, ProcError> {
    let path = path.to_path_buf();
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let last = out.last_mut().ok_or_else(|| parse_err(path.clone(), "VmFlags before a mapping"))?;
            last.vm_flags = flags.split_whitespace().map(str::to_string).collect();
        } else if line.as_bytes().first().is_some_and(u8::is_ascii_hexdigit)
            && line.split(' ').next().is_some_and(|f| f.contains('-'))
        {
            out.push(parse_map_line(line).ok_or_else(|| parse_err(path.clone(), format!("bad line {line:?}")))?);
        }
    }
    Ok(out)
}

/// The mappings of a process (without `VmFlags`; cheaper than [`smaps`]).
pub fn maps(pid: Pid) -> Result<Vec<MapEntry>, ProcError> {
    let path = dir(pid).join("maps");
    let text = read_string(path.clone())?;
    text.lines().map(|l| parse_map_line(l).ok_or_else(|| parse_err(path.clone(), format!("bad line {l:?}")))).collect()
}

/// The fields of /proc/PID/stat after `comm` (field 3 `state` is index 0 of `rest`).
#[derive(Debug, Clone)]
pub struct Stat {
    pub comm: String,
    rest: Vec<String>,
}

impl Stat {
    pub fn read(pid: Pid) -> Result<Stat, ProcError> {
        let path = dir(pid).join("stat");
        let text = read_string(path.clone())?;
        let open = text.find('(').ok_or_else(|| parse_err(path.clone(), "no ("))?;
        let close = text.rfind(')').ok_or_else(|| parse_err(path.clone(), "no )"))?;
        Ok(Stat {
            comm: text[open + 1..close].to_string(),
            rest: text[close + 1..].split_whitespace().map(str::to_string).collect(),
        })
    }
    /// Field number `n` as numbered in proc(5) (1 = pid, 2 = comm, 3 = state, ...).
    pub fn field(&self, n: usize) -> u64 {
        self.rest.get(n - 3).and_then(|s| s.parse::<i64>().ok()).map_or(0, |v| v as u64)
    }
    pub fn state(&self) -> char {
        self.rest.first().and_then(|s| s.chars().next()).unwrap_or('?')
    }
}

/// The numeric names in a directory (task ids, fd numbers), sorted.
fn numeric_entries(path: PathBuf) -> Result<Vec<i32>, ProcError> {
    let rd = fs::read_dir(&path).map_err(|source| ProcError::Read { path: path.clone(), source })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|source| ProcError::Read { path: path.clone(), source })?;
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// Thread ids (host pids) of a process.
pub fn tasks(pid: Pid) -> Result<Vec<Pid>, ProcError> {
    Ok(numeric_entries(dir(pid).join("task"))?.into_iter().map(Pid::from_raw).collect())
}

/// Children (host pids) of all threads of a process.
pub fn children(pid: Pid) -> Result<Vec<Pid>, ProcError> {
    let mut out = Vec::new();
    for tid in tasks(pid)? {
        let text = read_string(task_dir(pid, tid).join("children"))?;
        out.extend(text.split_whitespace().filter_map(|s| s.parse().ok()).map(Pid::from_raw));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Open fd numbers of a process.
pub fn fds(pid: Pid) -> Result<Vec<i32>, ProcError> {
    numeric_entries(dir(pid).join("fd"))
}

/// The target of a magic link such as /proc/PID/fd/N, /proc/PID/cwd or /proc/PID/exe.
pub fn link(pid: Pid, name: &str) -> Result<String, ProcError> {
    let path = dir(pid).join(name);
    let target = fs::read_link(&path).map_err(|source| ProcError::Read { path: path.clone(), source })?;
    target.into_os_string().into_string().map_err(|_| parse_err(path, "target is not UTF-8"))
}

/// The `key: value` lines of /proc/PID/fdinfo/FD (multi-valued keys such as epoll's `tfd` are kept in order).
#[derive(Debug, Clone)]
pub struct FdInfo {
    path: PathBuf,
    pub lines: Vec<(String, String)>,
}

impl FdInfo {
    pub fn read(pid: Pid, fd: i32) -> Result<FdInfo, ProcError> {
        let path = dir(pid).join(format!("fdinfo/{fd}"));
        let text = read_string(path.clone())?;
        let lines = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(FdInfo { path, lines })
    }
    pub fn get(&self, key: &str) -> Result<&str, ProcError> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| parse_err(self.path.clone(), format!("no {key}")))
    }
    pub fn pos(&self) -> Result<u64, ProcError> {
        self.get("pos")?.parse().map_err(|_| parse_err(self.path.clone(), "bad pos"))
    }
    /// The `flags` field (octal `O_*` flags of the open file description, plus O_CLOEXEC of the fd).
    pub fn flags(&self) -> Result<i32, ProcError> {
        i32::from_str_radix(self.get("flags")?, 8).map_err(|_| parse_err(self.path.clone(), "bad flags"))
    }
}

/// The contents of /proc/PID/auxv as 64-bit words.
pub fn auxv(pid: Pid) -> Result<Vec<u64>, ProcError> {
    let path = dir(pid).join("auxv");
    let bytes = fs::read(&path).map_err(|source| ProcError::Read { path, source })?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// A thread's name (`/proc/PID/task/TID/comm`, without the newline).
pub fn thread_comm(pid: Pid, tid: Pid) -> Result<String, ProcError> {
    Ok(read_string(task_dir(pid, tid).join("comm"))?.trim_end_matches('\n').to_string())
}

/// Reads a small integer file such as /proc/PID/oom_score_adj.
pub fn read_int(pid: Pid, name: &str) -> Result<i64, ProcError> {
    let path = dir(pid).join(name);
    let text = read_string(path.clone())?;
    text.trim().parse().map_err(|_| parse_err(path, "not an integer"))
}

/// Writes a small integer file such as /proc/PID/oom_score_adj.
pub fn write_int(pid: Pid, name: &str, value: i64) -> Result<(), ProcError> {
    let path = dir(pid).join(name);
    fs::write(&path, value.to_string()).map_err(|source| ProcError::Read { path, source })
}

/// Resource limits (soft, hard) in RLIMIT_* order from /proc/PID/limits (readable without the
/// CAP_SYS_RESOURCE that prlimit(2) on a process of another uid needs); "unlimited" is RLIM_INFINITY.
pub fn limits(pid: Pid) -> Result<Vec<(u64, u64)>, ProcError> {
    let path = dir(pid).join("limits");
    let text = read_string(path.clone())?;
    let value = |w: &str| -> Result<u64, ProcError> {
        if w == "unlimited" {
            Ok(u64::MAX)
        } else {
            w.parse().map_err(|_| parse_err(path.clone(), format!("bad limit {w:?}")))
        }
    };
    let mut out = Vec::new();
    // The name column is 26 characters wide; then soft, hard and (optional) units.
    for line in text.lines().skip(1) {
        let rest = line.get(26..).ok_or_else(|| parse_err(path.clone(), format!("short line {line:?}")))?;
        let mut words = rest.split_whitespace();
        let (Some(soft), Some(hard)) = (words.next(), words.next()) else {
            return Err(parse_err(path.clone(), format!("bad line {line:?}")));
        };
        out.push((value(soft)?, value(hard)?));
    }
    Ok(out)
}

/// True when the process is in job-control stop: state T, or (frozen by the cgroup freezer, which
/// shows as D) waiting in do_signal_stop.
pub fn job_control_stopped(pid: Pid) -> bool {
    match Stat::read(pid) {
        Ok(s) if s.state() == 'T' => true,
        Ok(_) => fs::read_to_string(dir(pid).join("wchan")).is_ok_and(|w| w.trim() == "do_signal_stop"),
        Err(_) => false,
    }
}

/// A user namespace's id map as a reader in an ancestor namespace sees it (`/proc/PID/uid_map`).
pub struct IdMap {
    /// (first id inside, first id outside, count)
    ranges: Vec<(u32, u32, u32)>,
}

/// The id the kernel shows for ids without a mapping.
const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    /// Reads `uid_map` or `gid_map` of process `pid`.
    pub fn read(pid: Pid, file: &str) -> Result<IdMap, ProcError> {
        let path = dir(pid).join(file);
        let text = read_string(path.clone())?;
        let mut ranges = Vec::new();
        for line in text.lines() {
            let v: Vec<u32> = line.split_whitespace().filter_map(|n| n.parse().ok()).collect();
            match v[..] {
                [inside, outside, count] => ranges.push((inside, outside, count)),
                _ => return Err(ProcError::Parse { path, what: format!("id map line {line:?}") }),
            }
        }
        Ok(IdMap { ranges })
    }

    /// The id outside the namespace of inside id `id`.
    pub fn outer(&self, id: u32) -> u32 {
        self.ranges
            .iter()
            .find(|(inside, _, count)| id >= *inside && id - inside < *count)
            .map_or(OVERFLOW_ID, |(inside, outside, _)| outside + (id - inside))
    }

    /// The id inside the namespace of outside id `id`.
    pub fn inner(&self, id: u32) -> u32 {
        self.ranges
            .iter()
            .find(|(_, outside, count)| id >= *outside && id - outside < *count)
            .map_or(OVERFLOW_ID, |(inside, outside, _)| inside + (id - outside))
    }
}
