//! The harness builds real clusters of network namespaces: Service calls across nodes and on
//! one node reach the backends without SNAT, and nothing of a run is left after drop, or after
//! its owner was killed.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc, ServiceSpec};

const DEMO_APP: &str = env!("CARGO_BIN_EXE_weft-demo-app");

fn pod(name: &str, workload: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "demo".into(),
        workload: workload.into(),
    }
}

fn node(name: &str, pods: Vec<PodSpec>) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        pods,
    }
}

fn backend_service() -> ServiceSpec {
    ServiceSpec {
        name: "backend".into(),
        namespace: "demo".into(),
        port: 80,
        target_port: 8080,
        workload: "backend".into(),
    }
}

/// Starts `weft-demo-app serve` in a pod and waits until it listens.
fn start_backend(cluster: &Cluster, pod: &str) -> Proc {
    let server = cluster
        .spawn(
            cluster.pod(pod).netns(),
            Command::new(DEMO_APP).args(["serve", "--listen", "0.0.0.0:8080", "--name", pod]),
        )
        .expect("spawn server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stdout_text().contains("\"listening\"") {
        assert!(
            Instant::now() < deadline,
            "server in {pod} did not start: {}",
            server.stderr_text()
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "server exited: {}",
            server.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Runs `weft-demo-app load` in `netns` and returns its JSON summary; fails the test if it
/// fails or does not finish.
fn run_load(
    cluster: &Cluster,
    netns: &str,
    url: &str,
    requests: u32,
    extra: &[&str],
) -> serde_json::Value {
    let load = cluster
        .spawn(
            netns,
            Command::new(DEMO_APP)
                .args([
                    "load",
                    "--url",
                    url,
                    "--requests",
                    &requests.to_string(),
                    "--concurrency",
                    "4",
                    "--timeout-s",
                    "30",
                ])
                .args(extra),
        )
        .expect("spawn load");
    let status = load
        .wait_timeout(Duration::from_secs(40))
        .unwrap()
        .expect("load did not finish");
    let out = load.stdout_text();
    assert!(
        status.success(),
        "load failed: {out}\n{}",
        load.stderr_text()
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("summary {out:?}: {e}"))
}

/// The peer IPs of the requests a demo server logged.
fn request_peers(server: &Proc) -> Vec<Ipv4Addr> {
    server
        .stdout_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .map(|v| {
            let peer = v["peer"].as_str().expect("peer").to_string();
            let ip = peer.rsplit_once(':').expect("ip:port").0;
            ip.parse().expect("peer ip")
        })
        .collect()
}

/// Nothing named after the run remains: namespaces, links in this namespace, nft tables,
/// run directory.
fn assert_run_gone(prefix: &str) {
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.starts_with(prefix)),
        "namespaces of {prefix} left: {netns:?}"
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(prefix), "links of {prefix} left:\n{links}");
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(
        !tables.contains(prefix),
        "nft tables of {prefix} left:\n{tables}"
    );
    assert!(
        !std::path::Path::new("/run/weft-harness")
            .join(prefix)
            .exists(),
        "run directory of {prefix} left"
    );
}

#[test]
fn service_call_across_nodes_reaches_backend_without_snat_and_drop_removes_everything() {
    let spec = ClusterSpec {
        nodes: vec![
            node("node-a", vec![pod("client-0", "client")]),
            node("node-b", vec![pod("backend-0", "backend")]),
        ],
        services: vec![backend_service()],
    };
    let cluster = Cluster::up(&spec).expect("cluster up");
    let prefix = cluster.prefix().to_string();
    let client = cluster.pod("client-0");
    let backend = cluster.pod("backend-0");
    assert_eq!(client.node(), "node-a");
    assert_eq!(backend.node(), "node-b");
    assert!(client.host_veth().starts_with("veth") && client.host_veth().len() <= 15);
    let cluster_ip = cluster.service("backend").cluster_ip();
    assert_eq!(cluster.service("backend").backends(), &[backend.ip()]);

    let server = start_backend(&cluster, "backend-0");
    let url = format!("http://{cluster_ip}:80/api/items");
    let summary = run_load(&cluster, client.netns(), &url, 100, &[]);
    assert_eq!(summary["ok"], 100, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");

    let peers = request_peers(&server);
    assert_eq!(peers.len(), 100, "server saw {} requests", peers.len());
    assert!(
        peers.iter().all(|&ip| ip == client.ip()),
        "server saw peers other than the client pod {}: {peers:?}",
        client.ip()
    );

    // The host-side veth lives in the node namespace, on the node's bridge.
    let veth = Command::new("ip")
        .args([
            "-n",
            cluster.node("node-a").netns(),
            "-o",
            "link",
            "show",
            client.host_veth(),
        ])
        .output()
        .unwrap();
    assert!(
        veth.status.success(),
        "{}",
        String::from_utf8_lossy(&veth.stderr)
    );
    assert!(String::from_utf8_lossy(&veth.stdout).contains("master cni0"));

    // run_in puts a thread into the pod: a raw TCP connect to the ClusterIP works from there.
    let local = cluster.run_in(client.netns(), || {
        let s = std::net::TcpStream::connect((cluster_ip, 80)).expect("connect from pod");
        s.local_addr().unwrap().ip()
    });
    assert_eq!(local, client.ip());

    // IPv4 only: no IPv6 address (not even link-local) in pods or on the host-side veth.
    for (ns, dev) in [
        (client.netns(), "eth0"),
        (cluster.node("node-a").netns(), client.host_veth()),
    ] {
        let v6 = Command::new("ip")
            .args(["-n", ns, "-6", "addr", "show", "dev", dev])
            .output()
            .unwrap();
        assert!(v6.status.success());
        assert_eq!(String::from_utf8_lossy(&v6.stdout), "", "{ns} {dev}");
    }

    let inventory: serde_yaml::Value = serde_yaml::from_str(&cluster.inventory_yaml()).unwrap();
    assert_eq!(inventory["pods"].as_sequence().unwrap().len(), 2);
    assert_eq!(inventory["pods"][1]["name"], "backend-0");
    assert_eq!(inventory["pods"][1]["node"], "node-b");
    assert_eq!(
        inventory["pods"][1]["ip"],
        backend.ip().to_string().as_str()
    );
    assert_eq!(
        inventory["services"][0]["cluster_ip"],
        cluster_ip.to_string().as_str()
    );
    assert_eq!(inventory["services"][0]["ports"][0]["target_port"], 8080);
    assert_eq!(
        inventory["nodes"][0]["ip"],
        cluster.node("node-a").underlay_ip().to_string().as_str()
    );
    let inventory = cluster.inventory_yaml();
    assert!(inventory.contains(&format!(
        "{{name: client-0, namespace: demo, workload: client, node: node-a, ip: {}}}",
        client.ip()
    )));
    assert!(inventory.contains(&format!(
        "cluster_ip: {cluster_ip}, ports: [{{port: 80, target_port: 8080}}]"
    )));
    assert!(inventory.contains(&format!(
        "{{name: node-b, ip: {}}}",
        cluster.node("node-b").underlay_ip()
    )));

    let server_pid = server.pid();
    drop(cluster); // kills the server too, although its Proc is still alive
    assert!(
        !std::path::Path::new(&format!("/proc/{server_pid}/ns")).exists()
            || server.try_wait().unwrap().is_some()
    );
    drop(server);
    assert_run_gone(&prefix);
}

#[test]
fn service_call_to_a_backend_on_the_same_node_works() {
    let spec = ClusterSpec {
        nodes: vec![node(
            "node-a",
            vec![pod("client-0", "client"), pod("backend-0", "backend")],
        )],
        services: vec![backend_service()],
    };
    let cluster = Cluster::up(&spec).expect("cluster up");
    let client = cluster.pod("client-0");
    let server = start_backend(&cluster, "backend-0");
    let url = format!(
        "http://{}:80/local",
        cluster.service("backend").cluster_ip()
    );
    let summary = run_load(&cluster, client.netns(), &url, 100, &[]);
    assert_eq!(summary["ok"], 100, "{summary}");
    let peers = request_peers(&server);
    assert_eq!(peers.len(), 100);
    assert!(peers.iter().all(|&ip| ip == client.ip()), "{peers:?}");
}

#[test]
fn service_balances_over_backends_on_both_nodes_and_control_reaches_it() {
    let spec = ClusterSpec {
        nodes: vec![
            node(
                "node-a",
                vec![pod("client-0", "client"), pod("backend-0", "backend")],
            ),
            node("node-b", vec![pod("backend-1", "backend")]),
        ],
        services: vec![backend_service()],
    };
    let cluster = Cluster::up(&spec).expect("cluster up");
    let client = cluster.pod("client-0");
    let servers = [
        start_backend(&cluster, "backend-0"),
        start_backend(&cluster, "backend-1"),
    ];
    let url = format!(
        "http://{}:80/spread",
        cluster.service("backend").cluster_ip()
    );
    let summary = run_load(&cluster, client.netns(), &url, 200, &["--no-keepalive"]);
    assert_eq!(summary["ok"], 200, "{summary}");
    let counts: Vec<usize> = servers.iter().map(|s| request_peers(s).len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
    assert!(
        counts.iter().all(|&c| c > 0),
        "one backend got nothing: {counts:?}"
    );
    for server in &servers {
        assert!(request_peers(server).iter().all(|&ip| ip == client.ip()));
    }

    // The control namespace (where a stitcher runs) reaches Services and pods on every node.
    let summary = run_load(&cluster, cluster.control_netns(), &url, 20, &[]);
    assert_eq!(summary["ok"], 20, "{summary}");
    let control_peers: usize = servers
        .iter()
        .map(|s| {
            request_peers(s)
                .iter()
                .filter(|&&ip| ip == cluster.control_ip())
                .count()
        })
        .sum();
    assert_eq!(control_peers, 20);
}

#[test]
fn a_panicking_test_still_removes_its_cluster_and_keeps_its_logs() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let spec = ClusterSpec {
            nodes: vec![node("node-a", vec![pod("doomed-0", "doomed")])],
            services: vec![backend_service()],
        };
        let cluster = Cluster::up(&spec).expect("cluster up");
        *prefix.lock().unwrap() = cluster.prefix().to_string();
        let _sleeper = cluster
            .spawn(
                cluster.pod("doomed-0").netns(),
                Command::new("sleep").arg("300"),
            )
            .expect("spawn sleep");
        panic!("the test fails while the cluster is up");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    let run_dir = std::path::Path::new("/run/weft-harness").join(&prefix);
    let logs = std::fs::read_dir(run_dir.join("logs"))
        .expect("logs kept")
        .count();
    assert_eq!(logs, 2, "stdout and stderr of the one process");
    assert!(
        !run_dir.join("owner").exists(),
        "a kept run must not look live"
    );
    std::fs::remove_dir_all(&run_dir).unwrap();
    assert_run_gone(&prefix);
}

/// Not a test of its own: the body of the child process that the stale-run tests kill.
#[test]
#[ignore = "helper: run by the stale-run tests in a child process"]
fn stale_child_helper() {
    if std::env::var_os("WEFT_HARNESS_STALE_CHILD").is_none() {
        return;
    }
    let spec = ClusterSpec {
        nodes: vec![node("node-a", vec![pod("orphan-0", "orphan")])],
        services: vec![],
    };
    let cluster = Cluster::up(&spec).expect("cluster up");
    let sleeper = cluster
        .spawn(
            cluster.pod("orphan-0").netns(),
            Command::new("sleep").arg("300"),
        )
        .expect("spawn sleep");
    // The PID is `ip netns exec`'s until it has entered the namespace and exec'd `sleep`:
    // report it only then, or a cleaner that starts at once finds nothing in the namespace
    // and the sleeper outlives it (seen once under load).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{}/comm", sleeper.pid()))
        .is_ok_and(|c| c.trim() != "sleep")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("CHILD {} {}", cluster.prefix(), sleeper.pid());
    // Wait to be killed; bounded so a lost parent cannot leave it running forever.
    std::thread::sleep(Duration::from_secs(120));
}

/// Runs the helper in a child process, returns (prefix, pid of its `sleep`) once its cluster
/// is up, then SIGKILLs and reaps it, leaving its cluster behind.
fn killed_run() -> (String, i32) {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stale_child_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEFT_HARNESS_STALE_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // libtest prints the test name on the same line first.
        .find_map(|l| l.split_once("CHILD ").map(|(_, rest)| rest.to_string()));
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line.expect("child did not report its cluster");
    let mut parts = line.split_whitespace();
    let prefix = parts.next().unwrap().to_string();
    let sleeper: i32 = parts.next().unwrap().parse().unwrap();
    assert!(
        std::path::Path::new(&format!("/run/netns/{prefix}-pod-orphan-0")).exists(),
        "the killed run left no namespace to clean"
    );
    assert!(std::path::Path::new(&format!("/proc/{sleeper}")).exists());
    (prefix, sleeper)
}

fn assert_process_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']));
        if !running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} of the killed run still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cleanup_stale_removes_a_killed_run() {
    let (prefix, sleeper) = killed_run();
    weft_harness::cleanup_stale();
    assert_run_gone(&prefix);
    assert_process_gone(sleeper);
}

#[test]
fn cluster_up_removes_a_killed_run_first() {
    let (prefix, sleeper) = killed_run();
    let spec = ClusterSpec {
        nodes: vec![node("node-a", vec![])],
        services: vec![],
    };
    let cluster = Cluster::up(&spec).expect("cluster up");
    assert_ne!(cluster.prefix(), prefix);
    assert_run_gone(&prefix);
    assert_process_gone(sleeper);
}
