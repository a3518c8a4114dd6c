//! Request and response bodies of the HTTP API (documented in docs/api.md).

use std::collections::BTreeMap;

use sandbox::spec::Network;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::catalog::CheckpointKind;
pub use crate::shim::proto::RollbackStats;

/// Error body of every failed request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ImportRequest {
    /// Path on the daemon's host: OCI layout dir/tar, `docker save` tar, rootfs dir or tarball.
    pub path: String,
    pub name: String,
}

/// One line of the import response stream (NDJSON).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImportEvent {
    Progress { stage: String, done_bytes: u64, total_bytes: u64 },
    Done { image: ImageView },
    Error { error: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageView {
    pub name: String,
    pub layers: Vec<String>,
    pub size: u64,
    pub format: String,
    pub source: String,
    pub created: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub image: String,
    /// Bytes, or a string such as "512M" or "2G" (binary units).
    #[serde(default, deserialize_with = "opt_size")]
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    /// Size of the sandbox's filesystem (what `df /` shows; the image's files count): bytes, or a
    /// string such as "10G". Forks of its checkpoints get the same.
    #[serde(default, deserialize_with = "opt_size")]
    pub disk: Option<u64>,
    /// Number of files (inodes) of the sandbox's filesystem.
    pub inodes: Option<u64>,
    /// Most memory the in-memory copies (templates) of its checkpoints may hold, for fast rollbacks: bytes,
    /// or a string such as "512M"; 0 keeps none once their images are written.
    #[serde(default, deserialize_with = "opt_size")]
    pub template_memory: Option<u64>,
    /// `none` (loopback only, the default), `nat` (its own address, the outside through NAT, under
    /// `egress`) or `host` (the host's own network: only if the daemon allows it).
    #[serde(default)]
    pub network: Network,
    /// What a `nat` sandbox may reach (and its forks, until changed).
    #[serde(default)]
    pub egress: EgressPolicy,
    /// Extra environment for every process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// What a sandbox in the `nat` network may reach beyond the defaults (public addresses yes; private,
/// loopback, reserved and multicast ranges no; the host, link-local addresses and other sandboxes never).
/// A destination in `allow_out` is reachable even when `deny_out` or the defaults deny it (E2B's rule);
/// `deny_out: ["0.0.0.0/0"]` cuts the sandbox off except for what `allow_out` lists. See docs/network.md.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default, deserialize_with = "destinations")]
    pub allow_out: Vec<Destination>,
    #[serde(default, deserialize_with = "destinations")]
    pub deny_out: Vec<Destination>,
}

/// One entry of an egress list: an IPv4 address or CIDR, or a host name — `example.com` (that name) or
/// `*.example.com` (its subdomains) — enforced through the daemon's DNS relay (docs/network.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Net(ipnet::Ipv4Net),
    Name(HostPattern),
}

/// A host name, lower case without the final dot; `wildcard` for `*.name` (subdomains of `name`, not `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    pub wildcard: bool,
    pub name: String,
}

impl HostPattern {
    /// Whether the DNS name `name` (any case, final dot or not) is one this pattern names.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            name.strip_suffix(&self.name).is_some_and(|rest| rest.ends_with('.') && rest.len() > 1)
        } else {
            name == self.name
        }
    }
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(item: &str) -> Result<Destination, String> {
        if let Ok(net) = item.parse::<ipnet::Ipv4Net>() {
            return Ok(Destination::Net(net.trunc()));
        }
        if let Ok(address) = item.parse::<std::net::Ipv4Addr>() {
            return Ok(Destination::Net(address.into()));
        }
        let (wildcard, name) = match item.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, item),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        // A name has a letter somewhere (so `10.0.0.0/33` or `1.2.3` is not taken for one).
        let valid = name.len() <= 253
            && name.split('.').all(label_ok)
            && name.bytes().any(|b| b.is_ascii_alphabetic())
            && !name.contains('/');
        if valid {
            Ok(Destination::Name(HostPattern { wildcard, name }))
        } else {
            Err(format!("{item:?} is not an IPv4 address, CIDR or host name"))
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Net(net) => write!(f, "{net}"),
            Destination::Name(HostPattern { wildcard: true, name }) => write!(f, "*.{name}"),
            Destination::Name(HostPattern { wildcard: false, name }) => write!(f, "{name}"),
        }
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Destination, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

fn destinations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Destination>, D::Error> {
    let max = crate::daemon::network::MAX_POLICY_ENTRIES;
    let items = Vec::<Destination>::deserialize(d)?;
    if items.len() > max {
        return Err(serde::de::Error::custom(format!("at most {max} destinations per list")));
    }
    Ok(items)
}

impl EgressPolicy {
    /// The addresses and CIDRs of `list` (`allow_out` or `deny_out`).
    pub fn nets(list: &[Destination]) -> Vec<ipnet::Ipv4Net> {
        list.iter().filter_map(|d| if let Destination::Net(n) = d { Some(*n) } else { None }).collect()
    }

    /// The host names of `list`.
    pub fn names(list: &[Destination]) -> Vec<HostPattern> {
        list.iter().filter_map(|d| if let Destination::Name(n) = d { Some(n.clone()) } else { None }).collect()
    }
}

/// `POST /v1/sandboxes/{id}/ports`: make the sandbox's TCP `port` reachable from the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub port: u16,
    /// Host address to listen on; 127.0.0.1 unless given (0.0.0.0 exposes it to the host's networks).
    #[serde(default = "localhost")]
    pub host_address: std::net::IpAddr,
    /// Host port; 0 (the default) lets the kernel choose.
    #[serde(default)]
    pub host_port: u16,
}

fn localhost() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

/// A sandbox port reachable from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub port: u16,
    pub host_address: std::net::IpAddr,
    pub host_port: u16,
}

/// `GET /v1/sandboxes/{id}/network`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkView {
    pub mode: Network,
    /// The sandbox's address and gateway (`nat` only).
    pub address: Option<std::net::Ipv4Addr>,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The host's end of its link (`nat` only).
    pub interface: Option<String>,
    pub egress: EgressPolicy,
    pub ports: Vec<PublishedPort>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxView {
    pub id: String,
    pub image: String,
    pub state: String,
    pub network: Network,
    /// Its own address in the `nat` network.
    pub address: Option<std::net::Ipv4Addr>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    pub disk: Option<u64>,
    pub inodes: Option<u64>,
    /// Most memory its checkpoints' templates may hold (None for a sandbox from before this budget).
    pub template_memory: Option<u64>,
    pub created: i64,
    /// Host uid/gid that is root inside.
    pub uid_base: Option<u32>,
    pub init_pid: Option<i32>,
    /// The checkpoint it was forked from.
    pub origin: Option<String>,
    /// The checkpoint its current state descends from.
    pub head: Option<String>,
    /// Set when `state` is "incompatible shim": the sandbox runs, but its supervisor speaks another
    /// protocol version than this daemon (an upgrade while it ran). It can be listed and deleted only.
    pub incompatible_shim: Option<IncompatibleShim>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncompatibleShim {
    pub shim_protocol: u32,
    pub daemon_protocol: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Checkpoint only the filesystem: processes keep running and are not captured (and a rollback to it
    /// restarts them). By default files and processes are checkpointed together.
    #[serde(default)]
    pub fs_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointView {
    pub id: String,
    /// The sandbox it was taken in.
    pub sandbox: String,
    pub parent: Option<String>,
    pub kind: CheckpointKind,
    pub created: i64,
    /// The pause the sandbox saw: freeze to thaw, as measured by its supervisor.
    pub pause_ms: f64,
    /// The checkpoint call's duration in the daemon: from the request's arrival until the checkpoint
    /// was recorded (the pause included; not the HTTP transfer, nor writing the process image).
    pub duration_ms: f64,
    /// What the checkpoint holds: "filesystem", and "processes" for a full checkpoint.
    pub covers: Vec<String>,
    /// What happened to the sandbox's processes.
    pub processes: String,
    /// Processes captured (full checkpoints).
    pub process_count: Option<usize>,
    /// Whether the checkpoint survives the sandbox's in-memory copies (a full checkpoint's process image
    /// is written right after the sandbox runs again).
    pub durable: bool,
    /// Why its process image could not be written (it never will be: rollbacks need its in-memory copies,
    /// which the sandbox may have lost, and forks fail). None while it is written or once it is.
    pub image_failure: Option<String>,
    /// Bytes it adds to the data directory's disk: its files' changes since its parent and, once
    /// durable, its process image (incremental too). None if they could not be measured.
    pub disk_bytes: Option<u64>,
    /// Bytes of memory its in-memory copies (templates, for a fast rollback) hold that nothing else
    /// shares, as last measured; 0 once dropped (a rollback then restores from the image). None for a
    /// filesystem checkpoint, and until first measured (within a second or so of the checkpoint).
    pub memory_bytes: Option<u64>,
    /// TCP connections to outside the sandbox that its processes had: they cannot go on after a
    /// rollback to it or in a fork of it, where the process finds each reset by its peer.
    pub reset_connections: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub checkpoint: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackView {
    pub sandbox: String,
    pub checkpoint: String,
    pub covers: Vec<String>,
    pub processes: String,
    /// The rollback call's duration in the daemon: from the request's arrival until the sandbox's new
    /// state was recorded (the pause included, and a wait for a process image being written).
    pub duration_ms: f64,
    #[serde(flatten)]
    pub stats: RollbackStats,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    #[serde(default = "one")]
    pub count: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Seconds (fractions allowed); the whole process group is killed when it expires.
    pub timeout: Option<f64>,
    /// Text given to the command on stdin.
    pub stdin: Option<String>,
    /// Base64 bytes given on stdin (instead of `stdin`).
    pub stdin_b64: Option<String>,
    /// Bytes kept per output stream (default 16 MiB); the rest is dropped and counted.
    pub max_output_bytes: Option<u64>,
    /// Stream NDJSON events instead of one JSON result.
    #[serde(default)]
    pub stream: bool,
    /// "utf8" (default; invalid bytes replaced) or "base64" for stdout/stderr.
    #[serde(default)]
    pub encoding: Encoding,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_dropped_bytes: u64,
    pub stderr_dropped_bytes: u64,
    pub duration_ms: f64,
}

/// One line of a streamed exec (NDJSON), and the text frames of the attach websocket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Started { pid: i32 },
    Stdout { data: String },
    Stderr { data: String },
    Exit(ExecResult),
    Error { error: String, message: String },
}

/// First text frame a client sends on the attach websocket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Terminal size; absent = pipes (stdout and stderr separate).
    pub tty: Option<TtySize>,
    pub timeout: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Text frames a client sends on the attach websocket after the request (stdin travels in binary frames).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AttachControl {
    Resize { rows: u16, cols: u16 },
    Eof,
    Signal { signal: i32 },
}

/// Binary websocket frames start with one of these bytes.
pub const FRAME_STDIN: u8 = 0;
pub const FRAME_STDOUT: u8 = 1;
pub const FRAME_STDERR: u8 = 2;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRunRequest {
    pub command: String,
    pub timeout: Option<f64>,
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<String>,
}

/// Parses sizes such as `1073741824`, `512k`, `512M`, `2G`, `1.5GiB` (binary units, case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (number, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("invalid size {text:?} (use e.g. 512M or 2G)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("invalid size {text:?}"));
    }
    let bytes = value * (1u64 << shift) as f64;
    // A float cast saturates: a size past 2^64 bytes would silently become "unlimited".
    if bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    Ok(bytes as u64)
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(b)) => Ok(Some(b)),
        Some(Size::Text(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        parse_size("lots").unwrap_err();
        parse_size("-1G").unwrap_err();
        parse_size("1e30").unwrap_err();
        parse_size("9999999999999999999999G").unwrap_err();
        assert_eq!(parse_size("16E").ok(), None);
        let r: CreateRequest = serde_json::from_str(r#"{"image":"x","memory":"1G"}"#).unwrap();
        assert_eq!(r.memory, Some(1 << 30));
        let r: CreateRequest = serde_json::from_str(r#"{"image":"x","memory":1024}"#).unwrap();
        assert_eq!(r.memory, Some(1024));
        serde_json::from_str::<CreateRequest>(r#"{"image":"x","bogus":1}"#).unwrap_err();
    }

    #[test]
    fn egress_policies_take_addresses_cidrs_and_host_names() {
        let p: EgressPolicy = serde_json::from_str(
            r#"{"allow_out":["1.2.3.4","10.1.2.3/8","PyPI.org.","*.github.com"],"deny_out":["0.0.0.0/0"]}"#,
        )
        .unwrap();
        let texts = |list: &[Destination]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(texts(&p.allow_out), ["1.2.3.4/32", "10.0.0.0/8", "pypi.org", "*.github.com"]);
        assert_eq!(texts(&p.deny_out), ["0.0.0.0/0"]);
        assert_eq!(EgressPolicy::nets(&p.allow_out).len(), 2);
        let names = EgressPolicy::names(&p.allow_out);
        assert!(names[0].matches("pypi.org.") && names[0].matches("PYPI.ORG") && !names[0].matches("x.pypi.org"));
        assert!(names[1].matches("api.github.com") && names[1].matches("a.b.github.com."));
        assert!(!names[1].matches("github.com") && !names[1].matches("evilgithub.com"));
        for bad in [
            r#"{"allow_out":["exa mple.com"]}"#,
            r#"{"deny_out":["1.2.3.4/33"]}"#,
            r#"{"deny_out":["::1"]}"#,
            r#"{"deny_out":["-a.com"]}"#,
            r#"{"deny_out":["1.2.3"]}"#,
            r#"{"deny_out":["*"]}"#,
        ] {
            serde_json::from_str::<EgressPolicy>(bad).unwrap_err();
        }
        let many = serde_json::json!({ "deny_out": vec!["1.1.1.1"; crate::daemon::network::MAX_POLICY_ENTRIES + 1] });
        serde_json::from_value::<EgressPolicy>(many).unwrap_err();
    }
}
