//! Attach: puts the kernel programs onto pod interfaces and takes them off again.
//!
//! In: the loaded eBPF object and interface events (`links::LinkEvent`: an interface that
//! matches `--interfaces` appeared or went away). Out: classifiers at the head of both TC
//! hooks of every such interface (TCX, or netlink clsact + cls_bpf at priority 1), the TCP
//! state tracepoint, and an attach state per interface for `/metrics`.
//!
//! Lifecycle: at start, filters left by a killed earlier instance (recognised by program name)
//! are removed; on shutdown everything we attached is detached and clsact qdiscs that we
//! created are removed. TCX links are file descriptors of this process: the kernel drops them
//! when it exits, even on SIGKILL.

pub mod cilium;
pub mod links;
pub mod tc;
pub mod tracefs;

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TracePoint,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use rtnetlink::Handle;
use tracing::{info, warn};

use crate::{
    cli::TcBackendArg,
    metrics::{IfaceState, Metrics},
};
use cilium::{Neighbours, Verdict};
use tc::Hook;

/// Program names; also how a later start recognises leftovers of a killed instance.
pub const PROG_INGRESS: &str = "weft_tc_ingress";
pub const PROG_EGRESS: &str = "weft_tc_egress";
pub const PROG_SOCK_STATE: &str = "weft_sock_state";
/// Every classifier of ours starts with this (kernel program names are cut at 15 bytes).
pub const PROG_PREFIX: &str = "weft_tc_";
/// Netlink priority of our filters: before Cilium's when it is configured with priority 2.
pub const NETLINK_PRIORITY: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tcx,
    Netlink,
}

impl Backend {
    /// `auto` = TCX where the kernel has it (6.6 and later).
    pub fn resolve(arg: TcBackendArg) -> Backend {
        match arg {
            TcBackendArg::Tcx => Backend::Tcx,
            TcBackendArg::Netlink => Backend::Netlink,
            TcBackendArg::Auto if tcx_supported() => Backend::Tcx,
            TcBackendArg::Auto => Backend::Netlink,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Tcx => "tcx",
            Backend::Netlink => "netlink",
        }
    }
}

fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn prog_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => PROG_INGRESS,
        Hook::Egress => PROG_EGRESS,
    }
}

/// A network interface of this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    /// A veth or netkit device: the host side of a pod's interface.
    pub pod_side: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The Cilium rules forbid attaching here; the text names the fix.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// What we attached to one interface.
struct Attachment {
    name: String,
    links: Vec<(Hook, SchedClassifierLinkId)>,
    /// We added its clsact qdisc (netlink mode), so we remove it again.
    created_clsact: bool,
}

pub struct Attacher {
    ebpf: Ebpf,
    backend: Backend,
    rtnl: Handle,
    metrics: Arc<Metrics>,
    attached: HashMap<u32, Attachment>,
}

impl Attacher {
    /// Loads the classifiers and the tracepoint program and attaches the tracepoint.
    pub fn new(
        mut ebpf: Ebpf,
        backend: Backend,
        rtnl: Handle,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        for name in [PROG_INGRESS, PROG_EGRESS] {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        let tp: &mut TracePoint = ebpf
            .program_mut(PROG_SOCK_STATE)
            .ok_or_else(|| anyhow!("{PROG_SOCK_STATE} missing from the eBPF object"))?
            .try_into()?;
        tp.load().context("loading the sock state tracepoint")?;
        tp.attach("sock", "inet_sock_set_state")
            .context("attaching sock/inet_sock_set_state (is tracefs mounted?)")?;
        metrics.set_backend(backend.as_str());
        Ok(Self {
            ebpf,
            backend,
            rtnl,
            metrics,
            attached: HashMap::new(),
        })
    }

    /// Run-time totals of the classifiers and the tracepoint program: (program, time spent,
    /// runs). Zero unless BPF run-time statistics are enabled (`--bpf-stats`).
    pub fn program_stats(&self) -> Vec<(&'static str, Duration, u64)> {
        [PROG_INGRESS, PROG_EGRESS, PROG_SOCK_STATE]
            .into_iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, info.run_time(), info.run_count()))
            })
            .collect()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn attached_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.attached.values().map(|a| a.name.clone()).collect();
        v.sort();
        v
    }

    /// ifindex → name of every interface we are attached to.
    pub fn ifnames(&self) -> HashMap<u32, String> {
        self.attached
            .iter()
            .map(|(i, a)| (*i, a.name.clone()))
            .collect()
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    /// Attaches both classifiers to `iface`, or explains why not.
    pub async fn attach(&mut self, iface: &Iface) -> Result<(), AttachError> {
        if self.attached.contains_key(&iface.index) {
            return Ok(());
        }
        let result = self.try_attach(iface).await;
        let state = match &result {
            Ok(()) => IfaceState::Attached,
            Err(AttachError::Refused(_)) => IfaceState::Refused,
            Err(AttachError::Failed(_)) => IfaceState::Failed,
        };
        self.metrics.set_iface(&iface.name, state);
        result
    }

    async fn try_attach(&mut self, iface: &Iface) -> Result<(), AttachError> {
        let neighbours = self.neighbours(iface).await?;
        match cilium::judge(self.backend, &iface.name, &neighbours) {
            Verdict::Proceed => {}
            Verdict::Warn(msg) => warn!(interface = %iface.name, "{msg}"),
            Verdict::Refuse(msg) => return Err(AttachError::Refused(msg)),
        }
        let mut att = Attachment {
            name: iface.name.clone(),
            links: Vec::new(),
            created_clsact: false,
        };
        if self.backend == Backend::Netlink && !tc::has_clsact(&self.rtnl, iface.index).await? {
            aya::programs::tc::qdisc_add_clsact(&iface.name)
                .with_context(|| format!("adding a clsact qdisc to {}", iface.name))?;
            att.created_clsact = true;
        }
        for hook in Hook::BOTH {
            let options = match self.backend {
                Backend::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
                Backend::Netlink => TcAttachOptions::Netlink(NlOptions {
                    priority: NETLINK_PRIORITY,
                    ..Default::default()
                }),
            };
            let attached = classifier(&mut self.ebpf, prog_name(hook))
                .and_then(|p| {
                    p.attach_with_options(&iface.name, hook.aya(), options)
                        .map_err(anyhow::Error::from)
                })
                .with_context(|| {
                    format!(
                        "attaching {} to {} {} ({})",
                        prog_name(hook),
                        iface.name,
                        hook.as_str(),
                        self.backend.as_str()
                    )
                });
            match attached {
                Ok(id) => att.links.push((hook, id)),
                Err(e) => {
                    self.undo(att, true).await;
                    return Err(e.into());
                }
            }
        }
        info!(interface = %iface.name, ifindex = iface.index, backend = self.backend.as_str(), "attached");
        self.attached.insert(iface.index, att);
        Ok(())
    }

    /// What already sits on `iface`'s TC hooks.
    async fn neighbours(&self, iface: &Iface) -> anyhow::Result<Neighbours> {
        let mut n = Neighbours {
            netlink_filters: tc::bpf_filters(&self.rtnl, iface.index).await?,
            ..Default::default()
        };
        if tcx_supported() {
            for hook in Hook::BOTH {
                let (_, progs) = SchedClassifier::query_tcx(&iface.name, hook.aya())
                    .with_context(|| format!("querying the TCX chain of {}", iface.name))?;
                n.tcx_programs.extend(
                    progs
                        .iter()
                        .filter_map(|p| p.name_as_str().map(str::to_owned)),
                );
            }
        }
        Ok(n)
    }

    /// Forgets `ifindex`; `gone` = the interface no longer exists (nothing to detach).
    pub async fn detach(&mut self, ifindex: u32, gone: bool) {
        if let Some(att) = self.attached.remove(&ifindex) {
            info!(interface = %att.name, gone, "detaching");
            self.metrics.remove_iface(&att.name);
            self.undo(att, !gone).await;
        }
    }

    /// Detaches the links of `att`; if `live`, also removes a clsact qdisc we created when
    /// nothing else is left on it.
    async fn undo(&mut self, att: Attachment, live: bool) {
        for (hook, id) in att.links {
            let Ok(prog) = classifier(&mut self.ebpf, prog_name(hook)) else {
                continue;
            };
            if live {
                if let Err(e) = prog.detach(id) {
                    warn!(interface = %att.name, hook = hook.as_str(), "detach failed: {e}");
                }
            } else if let Ok(link) = prog.take_link(id) {
                // The interface is gone and with it the attachment; dropping the handle only
                // releases our side.
                drop(link);
            }
        }
        if live && att.created_clsact {
            self.remove_clsact_if_empty(&att.name).await;
        }
    }

    async fn remove_clsact_if_empty(&self, name: &str) {
        let Ok(index) = links::ifindex(name) else {
            return;
        };
        match tc::bpf_filters(&self.rtnl, index).await {
            Ok(f) if f.is_empty() => {
                if let Err(e) = tc::delete_clsact(&self.rtnl, index).await {
                    warn!(interface = name, "removing our clsact qdisc failed: {e:#}");
                }
            }
            Ok(f) => info!(
                interface = name,
                others = f.len(),
                "leaving the clsact qdisc we created: other filters use it now"
            ),
            Err(e) => warn!(interface = name, "listing filters failed: {e:#}"),
        }
    }

    /// Detaches everything (SIGTERM/SIGINT).
    pub async fn shutdown(mut self) {
        let indices: Vec<u32> = self.attached.keys().copied().collect();
        for index in indices {
            self.detach(index, false).await;
        }
        // Dropping `self.ebpf` detaches the tracepoint and unloads the programs.
    }
}

/// Removes what a killed earlier instance left behind on `ifaces`: netlink filters named
/// `weft_tc_*`, and the clsact qdisc they were on when nothing else uses it.
/// Returns the number of filters removed.
pub async fn remove_stale(rtnl: &Handle, ifaces: &[Iface]) -> usize {
    let mut removed = 0;
    for iface in ifaces {
        let Ok(filters) = tc::bpf_filters(rtnl, iface.index).await else {
            continue;
        };
        let ours: Vec<_> = filters
            .iter()
            .filter(|f| f.name.starts_with(PROG_PREFIX))
            .collect();
        if ours.is_empty() {
            continue;
        }
        // One call removes every filter of that name on the hook.
        let mut by_name: Vec<(Hook, &str)> =
            ours.iter().map(|f| (f.hook, f.name.as_str())).collect();
        by_name.sort_by_key(|(h, n)| (h.as_str(), *n));
        by_name.dedup();
        for (hook, name) in by_name {
            match aya::programs::tc::qdisc_detach_program(&iface.name, hook.aya(), name) {
                Ok(()) => removed += 1,
                Err(e) => {
                    warn!(interface = %iface.name, filter = name, "stale filter not removed: {e}")
                }
            }
        }
        if ours.len() == filters.len() {
            // Only our filters were on it: the killed instance most likely created it.
            if let Err(e) = tc::delete_clsact(rtnl, iface.index).await {
                warn!(interface = %iface.name, "stale clsact qdisc not removed: {e:#}");
            }
        }
        info!(interface = %iface.name, filters = ours.len(), "removed leftovers of an earlier instance");
    }
    removed
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("{name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}
