//! The Cilium rules of DESIGN.md, as a pure decision over what an interface already carries.
//!
//! In: the backend we attach with, the names of TCX programs and the netlink BPF filters on
//! the interface. Out: go ahead, go ahead with a warning, or refuse (with the fix in the text).
//! Cilium's programs are recognised by their `cil_` name prefix.

use super::{Backend, tc::BpfFilter};

/// Prefix of every program Cilium loads (`cil_from_container`, `cil_to_container`, ...).
pub const CILIUM_PREFIX: &str = "cil_";

/// The fix named in every refusal.
pub const FIX: &str = "run `cilium config set bpf-filter-priority 2` (Cilium then attaches after priority 1), or start the collector with `--tc-backend tcx`";

/// What an interface carries before we attach.
#[derive(Debug, Default, Clone)]
pub struct Neighbours {
    /// Names of the programs on the interface's TCX ingress and egress chains.
    pub tcx_programs: Vec<String>,
    /// BPF filters on its clsact qdisc (netlink).
    pub netlink_filters: Vec<BpfFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// Proceed, but an operator should know.
    Warn(String),
    /// Do not attach: tracing here would run after Cilium or collide with it.
    Refuse(String),
}

pub fn judge(backend: Backend, iface: &str, n: &Neighbours) -> Verdict {
    let cil_tcx = n.tcx_programs.iter().any(|p| p.starts_with(CILIUM_PREFIX));
    let cil_prios: Vec<u16> = n
        .netlink_filters
        .iter()
        .filter(|f| f.name.starts_with(CILIUM_PREFIX))
        .map(|f| f.priority)
        .collect();
    match backend {
        // TCX programs run before every netlink filter, and we attach at the head of the
        // TCX chain, so Cilium's programs (TCX or netlink) always run after ours.
        Backend::Tcx => Verdict::Proceed,
        Backend::Netlink if cil_tcx => Verdict::Refuse(format!(
            "Cilium attaches its programs on {iface} with TCX, which runs before any netlink \
             filter: in netlink mode the collector would see packets only after Cilium. \
             Start the collector with `--tc-backend tcx`"
        )),
        Backend::Netlink if cil_prios.is_empty() => Verdict::Proceed,
        Backend::Netlink if cil_prios.iter().all(|&p| p == 1) => Verdict::Refuse(format!(
            "Cilium's filters on {iface} are all at netlink priority 1, where the collector must \
             attach; to fix, {FIX}"
        )),
        Backend::Netlink if cil_prios.contains(&1) => Verdict::Warn(format!(
            "Cilium's filters on {iface} use mixed netlink priorities {cil_prios:?}: those at \
             priority 1 may run before the collector's; to fix, {FIX}"
        )),
        Backend::Netlink => Verdict::Proceed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tc::Hook;
    use super::*;

    fn filter(name: &str, priority: u16, hook: Hook) -> BpfFilter {
        BpfFilter {
            hook,
            priority,
            name: name.into(),
        }
    }

    fn nl(filters: Vec<BpfFilter>) -> Neighbours {
        Neighbours {
            tcx_programs: vec![],
            netlink_filters: filters,
        }
    }

    #[test]
    fn netlink_refuses_when_all_cilium_filters_are_at_priority_1() {
        let n = nl(vec![
            filter("cil_from_container", 1, Hook::Ingress),
            filter("cil_to_container", 1, Hook::Egress),
        ]);
        let Verdict::Refuse(msg) = judge(Backend::Netlink, "lxc1", &n) else {
            panic!("expected a refusal");
        };
        assert!(
            msg.contains("cilium config set bpf-filter-priority 2"),
            "{msg}"
        );
        assert!(msg.contains("--tc-backend tcx"), "{msg}");
        assert!(msg.contains("lxc1"), "{msg}");
    }

    #[test]
    fn netlink_warns_on_mixed_priorities() {
        let n = nl(vec![
            filter("cil_from_container", 1, Hook::Ingress),
            filter("cil_to_container", 2, Hook::Egress),
        ]);
        assert!(matches!(
            judge(Backend::Netlink, "lxc1", &n),
            Verdict::Warn(_)
        ));
    }

    #[test]
    fn netlink_proceeds_when_cilium_is_behind_us_or_absent() {
        let n = nl(vec![filter("cil_from_container", 2, Hook::Ingress)]);
        assert_eq!(judge(Backend::Netlink, "lxc1", &n), Verdict::Proceed);
        let n = nl(vec![filter("other_prog", 1, Hook::Ingress)]);
        assert_eq!(judge(Backend::Netlink, "lxc1", &n), Verdict::Proceed);
    }

    #[test]
    fn netlink_refuses_when_cilium_uses_tcx() {
        let n = Neighbours {
            tcx_programs: vec!["cil_from_container".into()],
            netlink_filters: vec![],
        };
        let Verdict::Refuse(msg) = judge(Backend::Netlink, "lxc1", &n) else {
            panic!("expected a refusal");
        };
        assert!(msg.contains("--tc-backend tcx"), "{msg}");
    }

    #[test]
    fn tcx_always_proceeds() {
        let n = Neighbours {
            tcx_programs: vec!["cil_from_container".into()],
            netlink_filters: vec![filter("cil_from_container", 1, Hook::Ingress)],
        };
        assert_eq!(judge(Backend::Tcx, "lxc1", &n), Verdict::Proceed);
    }
}
