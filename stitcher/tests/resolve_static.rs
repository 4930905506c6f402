//! The static inventory source: parsing, errors that point at the field, lookups, and the
//! lookup cache. `bench_lookups` (ignored) prints lookup costs:
//! `cargo test --release -p weft-stitcher --test resolve_static -- --ignored --nocapture`.

use std::net::SocketAddr;
use std::time::Instant;

use weft_stitcher::metrics::Registry;
use weft_stitcher::resolve::state::PodRecord;
use weft_stitcher::resolve::{CacheConfig, Inventory, PeerKind, Resolve, StaticInventory};

const DESIGN_EXAMPLE: &str = r#"
pods:
  - {name: frontend-0, namespace: demo, workload: frontend, node: node-a, ip: 10.244.1.9}
services:
  - {name: backend, namespace: demo, cluster_ip: 10.96.0.20, ports: [{port: 80, target_port: 8080}]}
nodes:
  - {name: node-a, ip: 10.10.0.1}
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("valid socket address")
}

fn parse_err(yaml: &str) -> String {
    match Inventory::parse(yaml) {
        Ok(inv) => panic!("expected an error, parsed {inv:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn design_example_resolves_pods_services_nodes_and_keeps_the_rest_ips() {
    let registry = Registry::new();
    let r = StaticInventory::from_yaml(DESIGN_EXAMPLE, CacheConfig::default(), &registry)
        .expect("the DESIGN.md example parses");
    let t = 1_700_000_000_000_000_000;

    let pod = r.resolve(addr("10.244.1.9:37450"), t);
    assert_eq!(pod.kind, PeerKind::Pod);
    assert_eq!(pod.name(), "frontend.demo");
    let m = pod.meta.as_deref().expect("pod meta");
    assert_eq!(m.pod.as_deref(), Some("frontend-0"));
    assert_eq!(m.node.as_deref(), Some("node-a"));
    assert_eq!(m.workload_kind, "Deployment");
    assert_eq!(
        pod.to_string(),
        "10.244.1.9 as frontend.demo:37450",
        "printer form"
    );

    let svc = r.resolve(addr("10.96.0.20:80"), t);
    assert_eq!(
        (svc.kind, svc.name()),
        (PeerKind::Service, "backend.demo".into())
    );

    let node = r.resolve(addr("10.10.0.1:10250"), t);
    assert_eq!((node.kind, node.name()), (PeerKind::Node, "node-a".into()));

    let ext = r.resolve(addr("[2001:db8::1]:443"), t);
    assert_eq!(
        (ext.kind, ext.name()),
        (PeerKind::External, "2001:db8::1".into())
    );
    assert!(ext.meta.is_none());

    let counters = registry.snapshot();
    assert_eq!(counters["resolve.lookups"], 4);
    assert_eq!(counters["resolve.unresolved"], 1);
    assert_eq!(counters["resolve.objects.pods"], 1);
    assert_eq!(counters["resolve.objects.services"], 1);
    assert_eq!(counters["resolve.objects.nodes"], 1);
}

#[test]
fn optional_fields_workload_kind_and_host_network_ports() {
    let yaml = r#"
pods:
  - {name: db-0, namespace: data, workload: db, workload_kind: StatefulSet, ip: 10.244.2.2}
  - {name: lonely, namespace: data, ip: 10.244.2.3}
  - {name: exporter-x, namespace: mon, workload: exporter, workload_kind: DaemonSet, node: node-b, ip: 10.10.0.2, host_network: true, ports: [9100]}
nodes:
  - {name: node-b, ip: 10.10.0.2}
"#;
    let r =
        StaticInventory::from_yaml(yaml, CacheConfig::default(), &Registry::new()).expect("parses");
    let db = r.resolve(addr("10.244.2.2:5432"), 1);
    assert_eq!(
        db.meta.as_ref().map(|m| m.workload_kind.as_str()),
        Some("StatefulSet")
    );
    let lonely = r.resolve(addr("10.244.2.3:1"), 1);
    assert_eq!(lonely.name(), "lonely.data");
    assert_eq!(
        lonely.meta.as_ref().map(|m| m.workload_kind.as_str()),
        Some("Pod")
    );
    let exporter = r.resolve(addr("10.10.0.2:9100"), 1);
    assert_eq!(
        (exporter.kind, exporter.name()),
        (PeerKind::Pod, "exporter.mon".into())
    );
    let node = r.resolve(addr("10.10.0.2:22"), 1);
    assert_eq!((node.kind, node.name()), (PeerKind::Node, "node-b".into()));
}

#[test]
fn errors_name_the_field_and_where_it_is() {
    let e = parse_err("pods:\n  - {name: a, namespace: demo, ip: 10.0.0.300}\n");
    assert!(e.contains("pods[0].ip"), "{e}");
    assert!(e.contains("line 2"), "{e}");

    let e = parse_err("pods:\n  - {name: a, namespace: demo}\n");
    assert!(
        e.contains("pods[0]") && e.contains("missing field `ip`"),
        "{e}"
    );

    let e = parse_err("nodes:\n  - {name: n, ip: 10.0.0.1, zone: z}\n");
    assert!(
        e.contains("nodes[0]") && e.contains("unknown field `zone`"),
        "{e}"
    );

    let e = parse_err("pod:\n  - {name: a}\n");
    assert!(e.contains("unknown field `pod`"), "{e}");

    let e = parse_err(
        "services:\n  - {name: s, namespace: d, cluster_ip: 10.96.0.1, ports: [{port: 70000}]}\n",
    );
    assert!(e.contains("services[0].ports[0].port"), "{e}");

    let e = parse_err("pods: [\n");
    assert!(e.contains("line"), "{e}");
}

#[test]
fn semantic_errors_name_the_entries() {
    let e = parse_err(
        "pods:\n  - {name: a, namespace: d, ip: 10.0.0.1}\n  - {name: b, namespace: d, ip: 10.0.0.1}\n",
    );
    assert!(
        e.contains("pods[1] (d/b).ip") && e.contains("pods[0] (d/a).ip"),
        "{e}"
    );

    let e = parse_err(
        "pods:\n  - {name: a, namespace: d, ip: 10.0.0.1}\nservices:\n  - {name: s, namespace: d, cluster_ip: 10.0.0.1}\n",
    );
    assert!(e.contains("services[0] (d/s).cluster_ip"), "{e}");

    let e = parse_err("pods:\n  - {name: '', namespace: d, ip: 10.0.0.1}\n");
    assert!(e.contains("pods[0].name: must not be empty"), "{e}");

    let e = parse_err("pods:\n  - {name: h, namespace: d, ip: 10.0.0.1, host_network: true}\n");
    assert!(e.contains("pods[0] (d/h).ports"), "{e}");
}

#[test]
fn from_file_reads_and_reports_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("inventory.yaml");
    std::fs::write(&good, DESIGN_EXAMPLE).expect("write");
    let r =
        StaticInventory::from_file(&good, CacheConfig::default(), &Registry::new()).expect("reads");
    assert_eq!(r.resolve(addr("10.244.1.9:1"), 1).name(), "frontend.demo");

    let missing = dir.path().join("absent.yaml");
    let e = StaticInventory::from_file(&missing, CacheConfig::default(), &Registry::new())
        .err()
        .map(|e| format!("{e:#}"))
        .expect("missing file is an error");
    assert!(e.contains("absent.yaml"), "{e}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "nodes:\n  - {name: n}\n").expect("write");
    let e = StaticInventory::from_file(&bad, CacheConfig::default(), &Registry::new())
        .err()
        .map(|e| format!("{e:#}"))
        .expect("bad file is an error");
    assert!(e.contains("bad.yaml") && e.contains("nodes[0]"), "{e}");
}

#[test]
fn lookups_are_cached_across_ports_and_within_a_time_bucket() {
    let registry = Registry::new();
    let r = StaticInventory::from_yaml(DESIGN_EXAMPLE, CacheConfig::default(), &registry)
        .expect("parses");
    let t = 5_000_000_000;
    let a = r.resolve(addr("10.244.1.9:40000"), t);
    let b = r.resolve(addr("10.244.1.9:40001"), t + 1_000);
    // Same names, each with its own address.
    assert_eq!(a.meta, b.meta);
    assert_eq!(b.addr.port(), 40001);
    let c = registry.snapshot();
    assert_eq!((c["resolve.cache.misses"], c["resolve.cache.hits"]), (1, 1));
    // Another second is another bucket.
    r.resolve(addr("10.244.1.9:40002"), t + 2_000_000_000);
    assert_eq!(registry.snapshot()["resolve.cache.misses"], 2);
}

#[test]
#[ignore = "benchmark: prints figures"]
fn bench_lookups() {
    let mut yaml = String::from("pods:\n");
    for i in 0..10_000u32 {
        yaml.push_str(&format!(
            "  - {{name: p{i}, namespace: ns{}, workload: w{}, ip: 10.{}.{}.{}}}\n",
            i % 50,
            i % 500,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    let registry = Registry::new();
    let r = StaticInventory::from_yaml(&yaml, CacheConfig::default(), &registry).expect("parses");
    let n = 1_000_000u64;
    let t0 = 1_700_000_000_000_000_000u64;
    for (label, spread) in [
        ("hot (1k addresses, cached)", 1_000u64),
        ("cold (every lookup a new second)", 0),
    ] {
        let start = Instant::now();
        for i in 0..n {
            let ip = (i % 1_000) as u32;
            let a = SocketAddr::from((
                [10, 0, (ip >> 8) as u8, ip as u8],
                30_000 + (i % 20_000) as u16,
            ));
            let t = if spread > 0 {
                t0
            } else {
                t0 + i * 1_000_000_000
            };
            std::hint::black_box(r.resolve(a, t));
        }
        let el = start.elapsed();
        println!(
            "{label}: {n} lookups in {el:?}: {:.0} ns/lookup, {:.2} M lookups/s",
            el.as_nanos() as f64 / n as f64,
            n as f64 / el.as_secs_f64() / 1e6
        );
    }
    let c = registry.snapshot();
    println!(
        "cache hits {} misses {}",
        c["resolve.cache.hits"], c["resolve.cache.misses"]
    );

    // Two reader threads while a writer changes a pod every millisecond (each change
    // invalidates the cache, as watch events do).
    let stop = std::sync::atomic::AtomicBool::new(false);
    let per_thread = 1_000_000u64;
    let (el, writes) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut writes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                r.update_if(|st| {
                    st.apply_pod(PodRecord {
                        key: "churn".into(),
                        uid: None,
                        namespace: "churn".into(),
                        name: format!("churn-{writes}"),
                        node: None,
                        ips: vec![[10, 99, 0, 1].into()],
                        host_network: false,
                        ports: vec![],
                        owner: None,
                        from: 0,
                        until: None,
                    })
                });
                writes += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            writes
        });
        let start = Instant::now();
        let readers: Vec<_> = (0..2u64)
            .map(|k| {
                let r = &r;
                s.spawn(move || {
                    for i in 0..per_thread {
                        let ip = ((i + k * 7) % 1_000) as u32;
                        let a = SocketAddr::from(([10, 0, (ip >> 8) as u8, ip as u8], 40_000));
                        std::hint::black_box(r.resolve(a, t0 + (i / 100_000) * 1_000_000_000));
                    }
                })
            })
            .collect();
        for h in readers {
            h.join().expect("reader");
        }
        let el = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (el, writer.join().expect("writer"))
    });
    println!(
        "2 readers + 1 writer ({writes} changes, ~1/ms): {} lookups in {el:?}: {:.2} M lookups/s total",
        2 * per_thread,
        (2 * per_thread) as f64 / el.as_secs_f64() / 1e6
    );
}
