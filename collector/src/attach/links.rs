//! Which interfaces to trace, and following them as pods come and go.
//!
//! In: rtnetlink link dumps and `RTNLGRP_LINK` notifications of this network namespace.
//! Out: `LinkEvent`s for interfaces whose names match `--interfaces` (a renamed interface
//! that stops matching is reported as removed).

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup};

use super::Iface;

/// Interface-name globs from `--interfaces`.
#[derive(Debug, Clone)]
pub struct InterfaceFilter {
    set: GlobSet,
}

impl InterfaceFilter {
    pub fn new(globs: &[String]) -> anyhow::Result<Self> {
        let mut b = GlobSetBuilder::new();
        for g in globs.iter().map(|g| g.trim()).filter(|g| !g.is_empty()) {
            b.add(Glob::new(g).map_err(|e| anyhow::anyhow!("bad interface glob {g:?}: {e}"))?);
        }
        Ok(Self { set: b.build()? })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// Traced: a pod's host-side device (veth or netkit) whose name matches. Bridges such as
    /// `cni0` match `cni*` too, but routed pod traffic crosses them after the pod's veth:
    /// tracing both would report every exchange twice.
    pub fn traces(&self, iface: &Iface) -> bool {
        iface.pod_side && self.matches(&iface.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link exists with this name (new, changed or renamed).
    Present(Iface),
    /// The link with this index is gone.
    Gone(u32),
}

/// The ifindex of `name` in this network namespace.
pub fn ifindex(name: &str) -> std::io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(std::io::Error::from)
}

fn iface_of(msg: &LinkMessage) -> Option<Iface> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    let pod_side = msg.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth | InfoKind::Netkit))),
        _ => false,
    });
    Some(Iface {
        index: msg.header.index,
        name,
        pod_side,
    })
}

/// Whether a link notification describes the device itself. A bridge port's state
/// change (for example to forwarding, 15 s after a pod's veth joins the bridge) comes
/// as an `AF_BRIDGE` message without link info; read as a device description it would
/// look like a non-veth and detach a live pod, and its `DelLink` only means the port
/// left the bridge, not that the device is gone.
fn describes_the_device(msg: &LinkMessage) -> bool {
    msg.header.interface_family != AddressFamily::Bridge
        && msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkInfo(_)))
}

/// Every interface of this network namespace.
pub async fn list(handle: &Handle) -> anyhow::Result<Vec<Iface>> {
    let mut out = Vec::new();
    let mut links = Box::pin(handle.link().get().execute());
    while let Some(msg) = links.try_next().await? {
        out.extend(iface_of(&msg));
    }
    Ok(out)
}

/// Link notifications. Subscribe before listing so that nothing falls between the two.
pub struct LinkWatcher {
    messages: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl LinkWatcher {
    pub fn subscribe() -> anyhow::Result<Self> {
        let (conn, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
        tokio::spawn(conn);
        Ok(Self { messages })
    }

    /// The next link event; `None` when the netlink socket closed.
    pub async fn next(&mut self) -> Option<LinkEvent> {
        loop {
            let (msg, _) = self.messages.next().await?;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
                    if describes_the_device(&link) =>
                {
                    if let Some(iface) = iface_of(&link) {
                        return Some(LinkEvent::Present(iface));
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                    if link.header.interface_family != AddressFamily::Bridge =>
                {
                    return Some(LinkEvent::Gone(link.header.index));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_message(family: AddressFamily, info: Option<InfoKind>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.interface_family = family;
        msg.header.index = 7;
        msg.attributes
            .push(LinkAttribute::IfName("vethwft0-1".into()));
        if let Some(kind) = info {
            msg.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        msg
    }

    #[test]
    fn bridge_port_notifications_do_not_describe_the_device() {
        // What the kernel sends when the pod's bridge port turns forwarding.
        assert!(!describes_the_device(&link_message(
            AddressFamily::Bridge,
            None
        )));
        assert!(!describes_the_device(&link_message(
            AddressFamily::Unspec,
            None
        )));
        let veth = link_message(AddressFamily::Unspec, Some(InfoKind::Veth));
        assert!(describes_the_device(&veth));
        assert!(iface_of(&veth).is_some_and(|i| i.pod_side && i.index == 7));
    }

    #[test]
    fn default_globs_match_cni_veths_only() {
        let f = InterfaceFilter::new(
            &crate::cli::DEFAULT_INTERFACES
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        for yes in ["veth1a2b", "lxc12345", "cali0abc", "cni0", "eni9", "gke77"] {
            assert!(f.matches(yes), "{yes}");
        }
        for no in ["eth0", "lo", "cilium_host", "vxlan.calico", "docker0"] {
            assert!(!f.matches(no), "{no}");
        }
    }

    #[test]
    fn bad_glob_is_an_error() {
        assert!(InterfaceFilter::new(&["veth[".into()]).is_err());
    }
}
