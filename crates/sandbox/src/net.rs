//! A sandbox's own network (the `nat` mode): a veth pair whose one end, [`SANDBOX_INTERFACE`], is created
//! directly in the sandbox's network namespace, and whose other end stays on the host with the sandbox's
//! gateway address. The shim makes the pair ([`create_link`]), init configures its end from inside
//! ([`configure_sandbox_end`]); the daemon's firewall rules and NAT apply to the host's end by its name
//! (docs/network.md).

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeader, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkHeader, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::slot::{HostSlot, SlotError};
use crate::spec::NatAddress;

/// The name of the sandbox's end of its link, inside its network namespace.
pub const SANDBOX_INTERFACE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot {what}")]
    Kernel {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's answer to \"{0}\" was not understood")]
    Answer(String),
}

/// Prefix of the host ends' names: `dbx<sandbox id>`.
pub const HOST_INTERFACE_PREFIX: &str = "dbx";

/// The name of the host's end of sandbox `id`'s link (known before the link exists: rules keyed by it can
/// be in place before the sandbox runs).
pub fn host_interface(id: &str) -> String {
    format!("{HOST_INTERFACE_PREFIX}{id}")
}

/// A sandbox's addresses, reserved host-wide: slot `n` of the NAT subnet is its `n`-th /30, whose first
/// address is the host's end (the gateway) and second the sandbox's. Every daemon of the host shares the
/// slots (one directory of locks), so sandboxes of different daemons never share an address. The host's
/// end is named after the sandbox (not the slot): rules keyed by it never outlive it onto another sandbox.
pub struct NatSlot {
    pub host: HostLink,
    pub sandbox: NatAddress,
    lock: HostSlot,
}

impl NatSlot {
    /// Reserves a slot for sandbox `id` (at most 12 bytes: a link name has at most 15).
    pub fn reserve(dir: &std::path::Path, subnet: ipnet::Ipv4Net, id: &str) -> Result<NatSlot, SlotError> {
        let count = 1u32 << (32 - u32::from(subnet.prefix_len().min(30))) >> 2;
        let lock = HostSlot::reserve(dir, count, None)?;
        let network = u32::from(subnet.network()) + 4 * lock.number;
        let gateway = Ipv4Addr::from(network + 1);
        let host = HostLink { name: host_interface(id), address: gateway, prefix_len: 30 };
        let sandbox = NatAddress { address: Ipv4Addr::from(network + 2), gateway, prefix_len: 30 };
        Ok(NatSlot { host, sandbox, lock })
    }

    /// The descriptor that holds the reservation; a process that inherits it keeps the slot reserved.
    pub fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.lock.lock_fd()
    }
}

/// The host's end of a sandbox's link.
#[derive(Debug, Clone)]
pub struct HostLink {
    /// Its name on the host (at most 15 bytes).
    pub name: String,
    /// Its address: the sandbox's gateway.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

/// Creates the veth pair of `link`: its host end named `link.name`, up, with `link.address`; the other end
/// [`SANDBOX_INTERFACE`] in the network namespace of the process `pid` (the sandbox's init), down and
/// without an address for init to configure.
pub fn create_link(link: &HostLink, pid: i32) -> Result<(), NetError> {
    let mut rtnl = Rtnl::open()?;
    let veth = || {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(SANDBOX_INTERFACE.into()));
        peer.attributes.push(LinkAttribute::NetNsPid(pid as u32));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(link.name.clone()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        RouteNetlinkMessage::NewLink(msg)
    };
    rtnl.request(veth(), NLM_F_CREATE | NLM_F_EXCL, || format!("create the veth pair {}", link.name))?;
    let index = index_of(&link.name)?;
    rtnl.add_address(index, &link.name, link.address, link.prefix_len)?;
    rtnl.set_up(index, &link.name)
}

/// From inside the sandbox's network namespace (init, before the sandbox runs anything): gives
/// [`SANDBOX_INTERFACE`] its address, brings it up and routes everything through the gateway.
pub fn configure_sandbox_end(nat: &NatAddress) -> Result<(), NetError> {
    let mut rtnl = Rtnl::open()?;
    let index = index_of(SANDBOX_INTERFACE)?;
    rtnl.add_address(index, SANDBOX_INTERFACE, nat.address, nat.prefix_len)?;
    rtnl.set_up(index, SANDBOX_INTERFACE)?;
    let mut route = RouteMessage::default();
    route.header = RouteHeader {
        address_family: AddressFamily::Inet,
        table: RouteHeader::RT_TABLE_MAIN,
        protocol: RouteProtocol::Boot,
        kind: RouteType::Unicast,
        ..Default::default()
    };
    route.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(nat.gateway)));
    route.attributes.push(RouteAttribute::Oif(index));
    rtnl.request(RouteNetlinkMessage::NewRoute(route), NLM_F_CREATE | NLM_F_EXCL, || {
        format!("route through {}", nat.gateway)
    })
}

fn index_of(name: &str) -> Result<u32, NetError> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| NetError::Kernel { what: format!("find the link {name}"), source: e.into() })
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
struct Rtnl(Socket);

impl Rtnl {
    fn open() -> Result<Rtnl, NetError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetError::Socket)?;
        socket.bind_auto().map_err(NetError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(NetError::Socket)?;
        Ok(Rtnl(socket))
    }

    fn add_address(&mut self, index: u32, name: &str, address: Ipv4Addr, prefix_len: u8) -> Result<(), NetError> {
        let mut msg = AddressMessage::default();
        msg.header = AddressHeader { family: AddressFamily::Inet, prefix_len, index, ..Default::default() };
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(address)));
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(address)));
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL, || {
            format!("give {name} the address {address}/{prefix_len}")
        })
    }

    fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.header = LinkHeader { index, flags: LinkFlags::Up, change_mask: LinkFlags::Up, ..Default::default() };
        self.request(RouteNetlinkMessage::SetLink(msg), 0, || format!("bring {name} up"))
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, what: impl FnOnce() -> String) -> Result<(), NetError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        // An acknowledgement is a header plus the error code and our request's header (an error echoes the
        // request too: far less than a page).
        let mut answer = vec![0u8; 8192];
        let answered = self.0.send(&buf, 0).and_then(|_| self.0.recv(&mut &mut answer[..], 0));
        let acked = answered.map(|n| match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n]) {
            Ok(NetlinkMessage { payload: NetlinkPayload::Error(e), .. }) => Some(e.code.map(|_| e.to_io())),
            _ => None,
        });
        match acked {
            Ok(Some(None)) => Ok(()),
            Ok(None) => Err(NetError::Answer(what())),
            Ok(Some(Some(e))) | Err(e) => Err(NetError::Kernel { what: what(), source: e }),
        }
    }
}
