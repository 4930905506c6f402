//! Reading and cleaning the netlink TC state of an interface (rtnetlink): which BPF filters sit
//! on its clsact hooks (name, priority), whether it has a clsact qdisc, and removing one.
//! aya attaches and detaches our own filters; this module is for what aya cannot show.

use futures::TryStreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};

/// Which clsact hook a filter or program sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    pub fn aya(self) -> aya::programs::TcAttachType {
        match self {
            Hook::Ingress => aya::programs::TcAttachType::Ingress,
            Hook::Egress => aya::programs::TcAttachType::Egress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// A cls_bpf filter on a clsact hook, as `tc filter show` would list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub hook: Hook,
    pub priority: u16,
    /// The name the loader gave (`TCA_BPF_NAME`), e.g. `cil_from_container` or `weft_tc_ingress`.
    pub name: String,
}

/// The BPF filters on both clsact hooks of `ifindex` (empty when there is no clsact qdisc).
pub async fn bpf_filters(handle: &Handle, ifindex: u32) -> anyhow::Result<Vec<BpfFilter>> {
    let mut out = Vec::new();
    for hook in Hook::BOTH {
        let req = handle.traffic_filter(ifindex as i32).get();
        let req = match hook {
            Hook::Ingress => req.ingress(),
            Hook::Egress => req.egress(),
        };
        let mut stream = Box::pin(req.execute());
        loop {
            match stream.try_next().await {
                Ok(Some(msg)) => out.extend(bpf_filter_of(hook, &msg)),
                Ok(None) => break,
                // No clsact qdisc: nothing attached through netlink.
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::EINVAL || e.raw_code() == -libc::ENOENT =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(out)
}

fn bpf_filter_of(hook: Hook, msg: &TcMessage) -> Option<BpfFilter> {
    let priority = (msg.header.info >> 16) as u16;
    msg.attributes.iter().find_map(|attr| match attr {
        TcAttribute::Options(opts) => opts.iter().find_map(|opt| match opt {
            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(BpfFilter {
                hook,
                priority,
                name: name.clone(),
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// Whether `ifindex` has a clsact qdisc.
pub async fn has_clsact(handle: &Handle, ifindex: u32) -> anyhow::Result<bool> {
    let mut stream = Box::pin(handle.qdisc().get().index(ifindex as i32).execute());
    while let Some(msg) = stream.try_next().await? {
        let kind_is_clsact = msg
            .attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"));
        if msg.header.index == ifindex as i32 && kind_is_clsact {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes the clsact qdisc of `ifindex` (and with it every filter on it).
pub async fn delete_clsact(handle: &Handle, ifindex: u32) -> anyhow::Result<()> {
    let mut req = handle.qdisc().del(ifindex as i32);
    let msg = req.message_mut();
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    req.execute().await?;
    Ok(())
}
