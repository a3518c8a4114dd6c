//! The `nat` network's rules in the host's nftables: one table, `inet deltabox`, shared by every daemon of
//! the host (sandbox links are reserved host-wide, see `sandbox::net::NatSlot`). The table's chains are
//! made once and hold the defaults every sandbox gets, so a sandbox with the default policy costs no rule
//! and no call at all. A sandbox with a policy of its own has a chain (`p<id>`, reached from the shared
//! `egress` chain through the `policies` map by the name of its link, `dbx<id>`) and a set of the addresses
//! its allowed host names resolved to (`r<id>`), rewritten whole (flushed and refilled in one transaction)
//! whenever its policy changes. Link names are unique per sandbox, never reused, so what a crashed daemon
//! left behind can never apply to another sandbox. docs/network.md explains each rule.
//!
//! Rules are handed to `nft -f -` as text: nftables' own language, readable in docs and in `nft list
//! ruleset`, and atomic per call. Everything in it that comes from a request is a parsed address, printed
//! back by us, never the request's text.

use std::io::Write;
use std::process::{Command, Stdio};

use super::EgressPolicy;

const TABLE: &str = "inet deltabox";

/// Never reachable from a sandbox, whatever its policy: link-local addresses (cloud metadata services
/// among them). The daemons' NAT subnets (other sandboxes) are added to the same set.
const NEVER: &[&str] = &["169.254.0.0/16"];

/// Not reachable unless a sandbox's policy allows them: private, shared, loopback, reserved and multicast
/// ranges (RFC 1918, 6598, 5735, 6890).
const INTERNAL: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft (install nftables; setup.sh does)")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

/// Names an empty chain of the table: the version of its rules. A table without it (made by another
/// version of DeltaBox) is made again.
const VERSION_MARK: &str = "rules_v1";

/// The shared table: created when missing (the first daemon to start) or of another version, then given
/// this daemon's subnet. Holding the table's lock file while checking keeps two daemons starting at once
/// from both creating it.
pub fn install(subnet: ipnet::Ipv4Net, lock_dir: &std::path::Path) -> Result<(), FirewallError> {
    std::fs::create_dir_all(lock_dir).map_err(FirewallError::Spawn)?;
    let lock = std::fs::File::create(lock_dir.join("nftables.lock")).map_err(FirewallError::Spawn)?;
    lock.lock().map_err(FirewallError::Spawn)?;
    let listed = |what: &[&str]| {
        Command::new("nft")
            .arg("list")
            .args(what)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .map_err(FirewallError::Spawn)
    };
    let mut rules = String::new();
    if !listed(&["chain", "inet", "deltabox", VERSION_MARK])? {
        if listed(&["table", "inet", "deltabox"])? {
            tracing::warn!("the nftables table inet deltabox is of another DeltaBox version: making it again");
            rules.push_str(&format!("delete table {TABLE}\n"));
        }
        rules.push_str(&base_table());
    }
    rules.push_str(&format!("add element {TABLE} never {{ {subnet} }}\n"));
    rules.push_str(&format!("add element {TABLE} nat_sources {{ {subnet} }}\n"));
    apply(&rules)
}

fn base_table() -> String {
    let prefix = sandbox::net::HOST_INTERFACE_PREFIX;
    format!(
        r#"table {TABLE} {{
    set never {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {never} }} }}
    set internal {{ type ipv4_addr; flags interval; elements = {{ {internal} }} }}
    set nat_sources {{ type ipv4_addr; flags interval; auto-merge; }}
    map policies {{ type ifname : verdict; }}
    chain {VERSION_MARK} {{
    }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{prefix}*" fib saddr . iif oif missing drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{prefix}*" jump egress
        oifname "{prefix}*" ct state established,related accept
        oifname "{prefix}*" drop
    }}
    chain egress {{
        meta nfproto ipv6 jump refuse
        ip daddr @never jump refuse
        iifname vmap @policies
        ip daddr @internal jump refuse
        accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{prefix}*" ct state established,related accept
        iifname "{prefix}*" meta l4proto {{ tcp, udp }} th dport 53 fib daddr . iif type local accept
        iifname "{prefix}*" jump refuse
    }}
    chain refuse {{
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @nat_sources oifname != "{prefix}*" masquerade
    }}
}}
"#,
        never = NEVER.join(", "),
        internal = INTERNAL.join(", "),
    )
}

/// How long an address a host name of `allow_out` resolved to stays allowed after its last packet (or its
/// resolution): active connections never expire; the next resolution allows it again.
const RESOLVED_TIMEOUT: &str = "1h";

/// Gives the sandbox on link `interface` the egress `policy`; replaces what it had, the addresses its
/// allowed host names resolved to included (they are allowed again at their next resolution). The default
/// policy needs nothing of its own: [`remove`] then.
pub fn set_policy(interface: &str, policy: &EgressPolicy) -> Result<(), FirewallError> {
    if *policy == EgressPolicy::default() {
        return remove(interface);
    }
    let (chain, resolved) = names_of(interface);
    let mut rules = format!(
        "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}\n\
         add set {TABLE} {resolved} {{ type ipv4_addr; flags dynamic, timeout; timeout {RESOLVED_TIMEOUT}; }}\n\
         flush set {TABLE} {resolved}\n"
    );
    let (allow, deny) = (EgressPolicy::nets(&policy.allow_out), EgressPolicy::nets(&policy.deny_out));
    if !allow.is_empty() {
        rules.push_str(&format!("add rule {TABLE} {chain} ip daddr {{ {} }} accept\n", list(&allow)));
    }
    rules
        .push_str(&format!("add rule {TABLE} {chain} ip daddr @{resolved} update @{resolved} {{ ip daddr }} accept\n"));
    if !deny.is_empty() {
        rules.push_str(&format!("add rule {TABLE} {chain} ip daddr {{ {} }} jump refuse\n", list(&deny)));
    }
    // Returning, the packet meets the defaults (private ranges refused, the rest accepted).
    rules.push_str(&format!("add element {TABLE} policies {{ \"{interface}\" : jump {chain} }}\n"));
    apply(&rules)
}

/// Allows the sandbox on link `interface` to reach `addresses`, which an allowed host name resolved to.
pub fn allow_resolved(interface: &str, addresses: &[std::net::Ipv4Addr]) -> Result<(), FirewallError> {
    let elements = addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    apply(&format!("add element {TABLE} {} {{ {elements} }}\n", names_of(interface).1))
}

/// Removes what the sandbox on link `interface` has of its own, if anything (the defaults apply to it
/// then). Each object is made before it is deleted, so the transaction succeeds whatever was there.
pub fn remove(interface: &str) -> Result<(), FirewallError> {
    let (chain, resolved) = names_of(interface);
    apply(&format!(
        "add chain {TABLE} {chain}\nflush chain {TABLE} {chain}\n\
         add set {TABLE} {resolved} {{ type ipv4_addr; flags dynamic, timeout; timeout {RESOLVED_TIMEOUT}; }}\n\
         add element {TABLE} policies {{ \"{interface}\" : jump {chain} }}\n\
         delete element {TABLE} policies {{ \"{interface}\" }}\n\
         delete chain {TABLE} {chain}\ndelete set {TABLE} {resolved}\n"
    ))
}

/// `dbx<id>` → (`p<id>`, `r<id>`): the sandbox's chain, and its set of resolved addresses.
fn names_of(interface: &str) -> (String, String) {
    let id = interface.trim_start_matches(sandbox::net::HOST_INTERFACE_PREFIX);
    (format!("p{id}"), format!("r{id}"))
}

fn list(nets: &[ipnet::Ipv4Net]) -> String {
    nets.iter()
        .map(|n| if n.prefix_len() == 32 { n.addr().to_string() } else { n.to_string() })
        .collect::<Vec<_>>()
        .join(", ")
}

fn apply(rules: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    child.stdin.take().expect("piped stdin").write_all(rules.as_bytes()).map_err(FirewallError::Spawn)?;
    let out = child.wait_with_output().map_err(FirewallError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}
