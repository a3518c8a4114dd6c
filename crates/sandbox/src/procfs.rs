//! `/proc/<pid>/status` as host-privileged code reads it (the signal guard, the shim, DeltaCR): one
//! parser, bounded by what the kernel writes (the file is the kernel's, not the sandbox's).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use nix::unistd::Pid;

/// Errors reading `/proc` files.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {what}")]
    Parse { path: PathBuf, what: String },
}

impl From<ProcError> for io::Error {
    fn from(e: ProcError) -> io::Error {
        match e {
            ProcError::Read { source, .. } => source,
            parse => io::Error::new(io::ErrorKind::InvalidData, parse),
        }
    }
}

/// The fields of a task's `status` file.
#[derive(Debug, Clone)]
pub struct Status {
    path: PathBuf,
    fields: BTreeMap<String, String>,
}

impl Status {
    pub fn read(pid: Pid) -> Result<Status, ProcError> {
        Self::read_path(PathBuf::from(format!("/proc/{pid}/status")))
    }

    pub fn read_thread(pid: Pid, tid: Pid) -> Result<Status, ProcError> {
        Self::read_path(PathBuf::from(format!("/proc/{pid}/task/{tid}/status")))
    }

    fn read_path(path: PathBuf) -> Result<Status, ProcError> {
        let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path: path.clone(), source })?;
        let fields = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Ok(Status { path, fields })
    }

    pub fn get(&self, key: &str) -> Result<&str, ProcError> {
        self.fields.get(key).map(String::as_str).ok_or_else(|| self.error(format!("no {key}")))
    }

    /// Whitespace-separated decimal numbers of a field (e.g. `Uid`, `NSpid`).
    pub fn numbers(&self, key: &str) -> Result<Vec<i64>, ProcError> {
        self.get(key)?.split_whitespace().map(|n| n.parse().map_err(|_| self.error(format!("bad {key}")))).collect()
    }

    /// A hexadecimal field (e.g. `CapEff`, `SigBlk`).
    pub fn hex(&self, key: &str) -> Result<u64, ProcError> {
        u64::from_str_radix(self.get(key)?, 16).map_err(|_| self.error(format!("bad {key}")))
    }

    /// The last number of an `NS*` field: the id as seen in the innermost pid namespace.
    pub fn innermost(&self, key: &str) -> Result<i32, ProcError> {
        let v = self.numbers(key)?;
        v.last().map(|&n| n as i32).ok_or_else(|| self.error(format!("empty {key}")))
    }

    fn error(&self, what: String) -> ProcError {
        ProcError::Parse { path: self.path.clone(), what }
    }
}
