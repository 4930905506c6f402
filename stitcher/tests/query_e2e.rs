//! The Query API end to end on real traffic: a 3-node cluster in network namespaces
//! (weft-harness), a collector on every node shipping to a real `weft-stitcher`
//! (static inventory) in the control namespace, demo apps calling
//! `client → frontend → backend` through Services, and the real grpcurl asking the
//! stitcher. Every expected figure follows from the requests sent.
//!
//! Needs root (namespaces, eBPF) and the binaries `weft-collector` and
//! `weft-demo-app` of the workspace build (`weft_harness::binaries`: built if missing or
//! stale, or given as `WEFT_COLLECTOR_BIN`, `WEFT_DEMO_APP_BIN`).

mod query_common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc, ServiceSpec};

use query_common::grpc::{grpcurl, num, strings};

const PORT: u16 = 8080;
/// Inside the control namespace / each node's namespace: fixed ports cannot collide.
const STITCHER_PORT: u16 = 9400;
const COLLECTOR_METRICS: &str = "127.0.0.1:9401";
const REQUESTS: u64 = 50;
/// The backend answers every 5th request with 500.
const ERROR_EVERY: u64 = 5;
/// (pod = workload, node), in call order.
const CHAIN: [(&str, &str); 3] = [("client", "n1"), ("frontend", "n2"), ("backend", "n3")];

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// grpcurl inside the control namespace against the stitcher.
struct Grpcurl {
    netns: String,
    grpcurl: PathBuf,
}

impl Grpcurl {
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&self.grpcurl)
            .args(["-plaintext", "-max-time", "20", "-connect-timeout", "5"])
            .args(args.iter().take_while(|a| **a != "--"))
            .arg(format!("127.0.0.1:{STITCHER_PORT}"))
            .args(args.iter().skip_while(|a| **a != "--").skip(1))
            .output()
            .expect("run grpcurl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn call(&self, method: &str, data: &str) -> Value {
        let (ok, out, err) = self.run(&["-emit-defaults", "-d", data, "--", method]);
        assert!(ok, "grpcurl {method} {data}: {err}{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: {e}: {out}"))
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let stats = self.call("weft.v1.Query/Stats", "{}");
        stats["counters"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), num(v))).collect())
            .unwrap_or_default()
    }
}

fn start_collector(cluster: &Cluster, bin: &PathBuf, node: &str, url: &str) -> Proc {
    let proc = cluster
        .spawn(
            cluster.node(node).netns(),
            Command::new(bin)
                .args(["--node-name", node, "--stitcher", url])
                .args(["--metrics-listen", COLLECTOR_METRICS, "--log", "info"]),
        )
        .expect("spawn collector");
    wait_for(
        &format!("collector {node} running"),
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = proc.try_wait() {
                panic!("collector {node} exited {status}: {}", proc.stderr_text());
            }
            proc.stderr_text().contains("running")
        },
    );
    proc
}

#[test]
fn grpcurl_answers_match_real_traffic() {
    let grpcurl_bin = grpcurl();
    let collector_bin = weft_harness::binaries::path("weft-collector").expect("weft-collector");
    let demo_app = weft_harness::binaries::path("weft-demo-app").expect("weft-demo-app");
    let stitcher_bin = env!("CARGO_BIN_EXE_weft-stitcher");

    let cluster = Cluster::up(&ClusterSpec {
        nodes: CHAIN
            .iter()
            .map(|(pod, node)| NodeSpec {
                name: (*node).into(),
                pods: vec![PodSpec {
                    name: (*pod).into(),
                    namespace: "demo".into(),
                    workload: (*pod).into(),
                }],
            })
            .collect(),
        services: CHAIN[1..]
            .iter()
            .map(|(pod, _)| ServiceSpec {
                name: (*pod).into(),
                namespace: "demo".into(),
                port: 80,
                target_port: PORT,
                workload: (*pod).into(),
            })
            .collect(),
    })
    .expect("cluster up");
    let inventory = cluster.run_dir().join("inventory.yaml");
    std::fs::write(&inventory, cluster.inventory_yaml()).expect("write inventory");

    let stitcher = cluster
        .spawn(
            cluster.control_netns(),
            Command::new(stitcher_bin)
                .args(["--listen", &format!("0.0.0.0:{STITCHER_PORT}")])
                .args(["--metrics-listen", "127.0.0.1:9402"])
                .args(["--kubernetes", "off", "--trace-idle", "1s"])
                .arg("--inventory")
                .arg(&inventory),
        )
        .expect("spawn stitcher");
    let q = Grpcurl {
        netns: cluster.control_netns().to_string(),
        grpcurl: grpcurl_bin,
    };
    wait_for("stitcher serving", Duration::from_secs(30), || {
        if let Ok(Some(status)) = stitcher.try_wait() {
            panic!("stitcher exited {status}: {}", stitcher.stderr_text());
        }
        q.run(&["--", "list"]).0
    });
    let (_, services, _) = q.run(&["--", "list"]);
    assert!(services.lines().any(|l| l == "weft.v1.Query"), "{services}");
    let (ok, described, err) = q.run(&["--", "describe", "weft.v1.Query"]);
    assert!(
        ok && described.contains("rpc ServiceMap"),
        "{err}{described}"
    );

    let url = format!("http://{}:{STITCHER_PORT}", cluster.control_ip());
    let _collectors: Vec<Proc> = CHAIN
        .iter()
        .map(|(_, node)| start_collector(&cluster, &collector_bin, node, &url))
        .collect();
    wait_for("3 collectors connected", Duration::from_secs(30), || {
        let cols = q.call("weft.v1.Query/ListCollectors", "{}");
        cols["collectors"]
            .as_array()
            .is_some_and(|c| c.iter().filter(|c| c["connected"] == true).count() == 3)
    });

    // Demo servers: client → frontend → backend, each call through the next Service.
    let mut servers = Vec::new();
    for (i, (pod, _)) in CHAIN.iter().enumerate() {
        let mut cmd = Command::new(&demo_app);
        cmd.args([
            "serve",
            "--listen",
            &format!("0.0.0.0:{PORT}"),
            "--name",
            pod,
        ]);
        if let Some((next, _)) = CHAIN.get(i + 1) {
            let svc = cluster.service(next);
            let path = if *next == "frontend" {
                "/f/{n}"
            } else {
                "/b/{n}"
            };
            cmd.arg("--call")
                .arg(format!("http://{}:{}{path}", svc.cluster_ip(), svc.port()));
        } else {
            cmd.args(["--error-every", &ERROR_EVERY.to_string()]);
        }
        servers.push(
            cluster
                .spawn(cluster.pod(pod).netns(), &mut cmd)
                .expect("serve"),
        );
    }
    for (pod, _) in CHAIN {
        let addr = SocketAddr::from((cluster.pod(pod).ip(), PORT));
        wait_for(&format!("{pod} listening"), Duration::from_secs(10), || {
            cluster.run_in(cluster.node("n1").netns(), move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
    }

    // The traffic: REQUESTS sequential GETs from node n1 to the client pod.
    let load = cluster
        .spawn(
            cluster.node("n1").netns(),
            Command::new(&demo_app).args([
                "load",
                "--url",
                &format!("http://{}:{PORT}/e", cluster.pod("client").ip()),
                "--requests",
                &REQUESTS.to_string(),
                "--timeout-s",
                "60",
                "--allow-http-errors",
            ]),
        )
        .expect("load");
    let status = load
        .wait_timeout(Duration::from_secs(70))
        .expect("wait load")
        .expect("load finished");
    assert!(status.success(), "load: {}", load.stdout_text());

    // Per request: loader → client (SERVER, no client half: the loader is no pod),
    // client → frontend and frontend → backend (CLIENT + SERVER each): 5 spans.
    let spans = 5 * REQUESTS;
    wait_for("every span stored", Duration::from_secs(60), || {
        q.counters().get("store.spans").copied().unwrap_or(0) >= spans
    });
    std::thread::sleep(Duration::from_millis(1500));
    let c = q.counters();
    assert_eq!(c["store.spans"], spans, "{c:?}");
    assert_eq!(c["store.traces"], REQUESTS, "{c:?}");
    assert_eq!(c["ingest.exchanges"], spans, "{c:?}");
    assert_eq!(c["store.late_merged"], 0, "{c:?}");

    // ListTraces: one trace per request, rooted at the client pod.
    let list = q.call("weft.v1.Query/ListTraces", r#"{"limit": 1000}"#);
    let traces = list["traces"].as_array().expect("traces");
    assert_eq!(traces.len() as u64, REQUESTS);
    for t in traces {
        assert_eq!(t["spanCount"], 5, "{t}");
        assert_eq!(t["rootService"], "client.demo", "{t}");
        assert_eq!(t["rootName"], "GET /e", "{t}");
        assert_eq!(
            strings(&t["services"]),
            vec!["backend.demo", "client.demo", "frontend.demo"]
        );
    }
    let errors = q.call(
        "weft.v1.Query/ListTraces",
        r#"{"error_only": true, "limit": 1000}"#,
    );
    assert_eq!(
        errors["traces"].as_array().map(Vec::len),
        Some((REQUESTS / ERROR_EVERY) as usize),
        "{errors}"
    );
    let through_backend = q.call(
        "weft.v1.Query/ListTraces",
        r#"{"service": "backend", "namespace": "demo", "limit": 1000}"#,
    );
    assert_eq!(
        through_backend["traces"].as_array().map(Vec::len),
        Some(REQUESTS as usize)
    );

    // GetTrace: the chain of one request, with how each parent was found.
    let id = traces[0]["traceId"].as_str().expect("trace id");
    let got = q.call(
        "weft.v1.Query/GetTrace",
        &format!(r#"{{"trace_id": "{id}"}}"#),
    );
    let spans_of: Vec<&Value> = got["spans"].as_array().expect("spans").iter().collect();
    assert_eq!(spans_of.len(), 5);
    let by_id: HashMap<&str, &Value> = spans_of
        .iter()
        .map(|s| (s["spanId"].as_str().unwrap(), *s))
        .collect();
    let mut links: Vec<(String, String)> = spans_of
        .iter()
        .map(|s| {
            (
                s["side"].as_str().unwrap().to_string(),
                s["link"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    links.sort();
    assert_eq!(
        links,
        vec![
            ("SIDE_CLIENT".to_string(), "timing".to_string()),
            ("SIDE_CLIENT".to_string(), "timing".to_string()),
            ("SIDE_SERVER".to_string(), String::new()),
            ("SIDE_SERVER".to_string(), "join".to_string()),
            ("SIDE_SERVER".to_string(), "join".to_string()),
        ],
        "{got}"
    );
    for s in &spans_of {
        let parent = s["parentSpanId"].as_str().unwrap();
        if !parent.is_empty() {
            assert!(by_id.contains_key(parent), "parent in the trace: {got}");
        }
        if s["link"] == "join" {
            assert_eq!(by_id[parent]["path"], s["path"], "{got}");
            assert_eq!(s["server"]["kind"], "pod");
        }
    }

    // ServiceMap: three edges, each with one request per request sent; the backend's
    // injected errors on the frontend → backend edge.
    let map = q.call("weft.v1.Query/ServiceMap", "{}");
    let edges = map["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 3, "{map}");
    let edge = |client: Option<&str>, server: &str| {
        edges
            .iter()
            .find(|e| client.is_none_or(|c| e["client"] == c) && e["server"] == server)
            .unwrap_or_else(|| panic!("no edge to {server}: {map}"))
    };
    let into_client = edge(None, "client.demo");
    assert_eq!(num(&into_client["requests"]), REQUESTS);
    let to_frontend = edge(Some("client.demo"), "frontend.demo");
    assert_eq!(num(&to_frontend["requests"]), REQUESTS);
    let to_backend = edge(Some("frontend.demo"), "backend.demo");
    assert_eq!(num(&to_backend["requests"]), REQUESTS);
    assert_eq!(num(&to_backend["errors"]), REQUESTS / ERROR_EVERY);
    for e in edges {
        let (p50, p99) = (num(&e["latencyP50Nanos"]), num(&e["latencyP99Nanos"]));
        assert!(p50 > 0 && p50 <= p99, "{e}");
    }

    // ListCollectors: three connected collectors; each saw what its node's pods did.
    let cols = q.call("weft.v1.Query/ListCollectors", "{}");
    let cols = cols["collectors"].as_array().expect("collectors");
    assert_eq!(cols.len(), 3);
    let exchanges: BTreeMap<String, u64> = cols
        .iter()
        .map(|c| {
            (
                c["nodeName"].as_str().unwrap().to_string(),
                num(&c["exchanges"]),
            )
        })
        .collect();
    // n1: the client pod's SERVER half and its call's CLIENT half; n2 likewise for the
    // frontend; n3: the backend's SERVER half.
    assert_eq!(
        exchanges,
        BTreeMap::from([
            ("n1".to_string(), 2 * REQUESTS),
            ("n2".to_string(), 2 * REQUESTS),
            ("n3".to_string(), REQUESTS),
        ])
    );
    for c in cols {
        assert_eq!(c["connected"], true, "{c}");
        assert!(!c["tcBackend"].as_str().unwrap_or("").is_empty(), "{c}");
        assert!(!strings(&c["interfaces"]).is_empty(), "{c}");
    }
    drop(servers);
}
