//! Counters for everything the stitcher does and everything it loses.
//!
//! One [`Registry`] per process; stages take named [`Counter`] handles at start-up and
//! bump them lock-free. `/metrics` (Prometheus text) and the Query API's `Stats` read
//! the same registry, so both always agree.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

/// A monotonically increasing counter, or a gauge when set.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Entry {
    help: &'static str,
    counter: Counter,
}

/// Named counters. Names are dotted (`join.matched`); Prometheus names are derived
/// (`weft_stitcher_join_matched`).
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<RwLock<BTreeMap<String, Entry>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter named `name`, created on first use. Call at start-up, not per event.
    pub fn counter(&self, name: &str, help: &'static str) -> Counter {
        if let Some(e) = self.entries.read().get(name) {
            return e.counter.clone();
        }
        self.entries
            .write()
            .entry(name.to_string())
            .or_insert_with(|| Entry {
                help,
                counter: Counter::default(),
            })
            .counter
            .clone()
    }

    /// Every counter's current value, by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.entries
            .read()
            .iter()
            .map(|(k, e)| (k.clone(), e.counter.get()))
            .collect()
    }

    /// Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        for (name, e) in self.entries.read().iter() {
            let prom = format!("weft_stitcher_{}", name.replace(['.', '-'], "_"));
            out.push_str(&format!(
                "# HELP {prom} {}\n# TYPE {prom} gauge\n{prom} {}\n",
                e.help,
                e.counter.get()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_shared_by_name_and_rendered() {
        let r = Registry::new();
        let a = r.counter("join.matched", "halves joined");
        let b = r.counter("join.matched", "halves joined");
        a.inc();
        b.add(2);
        assert_eq!(r.snapshot()["join.matched"], 3);
        assert!(
            r.render_prometheus()
                .contains("weft_stitcher_join_matched 3\n")
        );
    }
}
