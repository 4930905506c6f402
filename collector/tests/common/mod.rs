//! Helpers shared by the collector's acceptance tests: clusters, the collector process, its
//! metrics, a tiny HTTP/1.1 server and client (std only), helper BPF classifiers built with
//! clang, and views of the TC state of an interface.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use weft_harness::{Cluster, ClusterSpec, NodeSpec, PodSpec, Proc, ServiceSpec};

pub const COLLECTOR: &str = env!("CARGO_BIN_EXE_weft-collector");
/// Inside each node's own network namespace, so a fixed port cannot collide.
pub const METRICS_ADDR: &str = "127.0.0.1:9401";
pub const SERVER_PORT: u16 = 8080;

pub fn pod(name: &str, workload: &str) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "demo".into(),
        workload: workload.into(),
    }
}

pub fn node(name: &str, pods: Vec<PodSpec>) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        pods,
    }
}

/// One node `a` with a client pod and a server pod.
pub fn one_node() -> Cluster {
    Cluster::up(&ClusterSpec {
        nodes: vec![node(
            "a",
            vec![pod("client", "client"), pod("server", "server")],
        )],
        services: vec![],
    })
    .expect("cluster up")
}

/// Nodes `a` (client pod) and `b` (backend pod) and a Service `backend` (80 → 8080).
pub fn two_nodes() -> Cluster {
    Cluster::up(&ClusterSpec {
        nodes: vec![
            node("a", vec![pod("client", "client")]),
            node("b", vec![pod("backend", "backend")]),
        ],
        services: vec![ServiceSpec {
            name: "backend".into(),
            namespace: "demo".into(),
            port: 80,
            target_port: SERVER_PORT,
            workload: "backend".into(),
        }],
    })
    .expect("cluster up")
}

/// A one-node cluster ([`one_node`]) with its collector running and the test server
/// listening in pod `server`. Fields drop in order: the server, the collector, the cluster.
pub struct TracedNode {
    _server: HttpServer,
    pub collector: Proc,
    /// The node's network namespace (where the collector and its metrics are).
    pub node: String,
    /// The test server's address in pod `server`.
    pub server: SocketAddr,
    pub cluster: Cluster,
}

/// Starts [`TracedNode`]: the collector with `args` (after `--node-name` and the rest that
/// [`start_collector`] passes).
pub fn traced_node(args: &[&str]) -> TracedNode {
    let cluster = one_node();
    let node = cluster.node("a").netns().to_owned();
    let pod = cluster.pod("server");
    let collector = start_collector(&cluster, &node, args);
    let _server = start_http_server(pod.netns());
    let server = server_addr(pod.ip(), SERVER_PORT);
    TracedNode {
        _server,
        collector,
        node,
        server,
        cluster,
    }
}

/// Starts the collector in `netns` and waits until it runs (or exits).
pub fn start_collector(cluster: &Cluster, netns: &str, args: &[&str]) -> Proc {
    let proc = spawn_collector(cluster, netns, args);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let err = proc.stderr_text();
        if err.contains("running") {
            return proc;
        }
        if let Some(status) = proc.try_wait().unwrap() {
            panic!("collector exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "collector did not start: {err}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn spawn_collector(cluster: &Cluster, netns: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(COLLECTOR);
    cmd.args(["--metrics-listen", METRICS_ADDR, "--log", "info"])
        .args(args)
        .env_remove("WEFT_STITCHER");
    cluster.spawn(netns, &mut cmd).expect("spawn collector")
}

/// `GET path` on `addr` from inside `netns`; the body of a 200 response.
pub fn http_get(cluster: &Cluster, netns: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let path = path.to_owned();
    cluster.run_in(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // One write: `write!` would send the pieces as separate segments.
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    })
}

/// The value of one metric line (`name{labels}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> u64 {
    gauge(text, series).map_or(0, |v| v as u64)
}

/// A kernel counter (`weft_ebpf_common::Counter::name`) as the collector exports it.
pub fn kernel_counter(text: &str, counter: &str) -> u64 {
    metric(
        text,
        &format!(r#"weft_collector_kernel_events_total{{counter="{counter}"}}"#),
    )
}

/// The value of one metric line as a float (gauges in seconds); `None` when absent.
pub fn gauge(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

pub fn scrape(cluster: &Cluster, netns: &str) -> String {
    http_get(cluster, netns, METRICS_ADDR, "/metrics").expect("scrape /metrics")
}

/// A minimal HTTP/1.1 server (keep-alive aware) on `0.0.0.0:SERVER_PORT` in `netns`, in a
/// background thread until the returned guard is dropped.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the test server waits before it answers a path under `/slow/`.
pub const SLOW_RESPONSE: Duration = Duration::from_millis(30);

pub fn start_http_server(netns: &str) -> HttpServer {
    start_http_server_at(netns, server_addr(Ipv4Addr::UNSPECIFIED, SERVER_PORT))
}

/// The test server of [`start_http_server`], listening on `listen` (an IPv6 address, say).
pub fn start_http_server_at(netns: &str, listen: SocketAddr) -> HttpServer {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = netns.to_owned();
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        enter_netns(&netns);
        let l = TcpListener::bind(listen).expect("bind server");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let mut workers = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    workers.push(std::thread::spawn(move || serve_conn(s)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        drop(l);
        for w in workers {
            let _ = w.join();
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    HttpServer {
        stop,
        thread: Some(thread),
    }
}

/// Enters `netns` on the current thread (network namespaces are per thread).
pub fn enter_netns(netns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{netns}")).expect("open netns");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn serve_conn(s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.to_ascii_lowercase().starts_with("connection: close") {
                close = true;
            }
            if h == "\r\n" {
                break;
            }
        }
        if request_line.contains(" /slow/") {
            std::thread::sleep(SLOW_RESPONSE);
        }
        let status = if request_line.contains("/missing") {
            "404 Not Found"
        } else {
            "200 OK"
        };
        let body = format!("hello {}", request_line.split(' ').nth(1).unwrap_or(""));
        let conn = if close { "close" } else { "keep-alive" };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Sends `paths` as GETs to `addr` from inside `netns`: one keep-alive connection for all,
/// or (keep_alive = false) one connection per request. Returns the status codes.
pub fn http_requests(
    cluster: &Cluster,
    netns: &str,
    addr: SocketAddr,
    paths: &[String],
    keep_alive: bool,
) -> Vec<u16> {
    let paths = paths.to_vec();
    cluster.run_in(netns, move || {
        let mut statuses = Vec::new();
        let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
        for p in &paths {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let r = BufReader::new(s.try_clone().unwrap());
                conn = Some((s, r));
            }
            let (s, r) = conn.as_mut().unwrap();
            let c = if keep_alive { "keep-alive" } else { "close" };
            // One write, so the request line starts a segment with the whole head.
            let req = format!("GET {p} HTTP/1.1\r\nHost: backend\r\nConnection: {c}\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            statuses.push(read_response(r));
            if !keep_alive {
                conn = None;
            }
        }
        statuses
    })
}

/// Reads one response (head and `Content-Length` body) and returns its status.
pub fn read_response(r: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if h == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    status
}

/// Raw bytes to `addr` (garbage, truncated requests, other protocols); ignores the answer.
pub fn send_raw(cluster: &Cluster, netns: &str, addr: SocketAddr, chunks: &[Vec<u8>]) {
    let chunks = chunks.to_vec();
    cluster.run_in(netns, move || {
        for c in &chunks {
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                let _ = s.write_all(c);
                let _ = s.shutdown(std::net::Shutdown::Write);
                s.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
    })
}

pub fn server_addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

// ---------------------------------------------------------------------------------------
// Helper BPF classifiers (C, clang-22 -target bpf), loaded with aya.

const HELPERS_C: &str = r#"
/* Self-contained: no kernel headers needed. */
typedef unsigned int __u32;
typedef unsigned long long __u64;
struct __sk_buff;
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_FUNC_map_lookup_elem 1
#define SEC(n) __attribute__((section(n), used))
struct bpf_map_def { unsigned int type, key_size, value_size, max_entries, map_flags; };
struct bpf_map_def SEC("maps") wt_count = { BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0 };
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *) BPF_FUNC_map_lookup_elem;
/* Counts every packet; TC_ACT_UNSPEC: the chain goes on. */
SEC("classifier") int wt_counter(struct __sk_buff *skb) {
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&wt_count, &k);
    if (v) __sync_fetch_and_add(v, 1);
    return -1;
}
/* Named like Cilium's program: only its name matters to the collector. */
SEC("classifier") int cil_from_container(struct __sk_buff *skb) { return -1; }
char _license[] SEC("license") = "GPL";
"#;

/// Builds the helper object once per test process.
pub fn helper_object() -> Vec<u8> {
    static OBJ: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    OBJ.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("helpers.c");
        let obj = dir.path().join("helpers.o");
        std::fs::write(&src, HELPERS_C).unwrap();
        let out = Command::new("clang-22")
            .args(["-target", "bpf", "-O2", "-g", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .expect("run clang-22");
        assert!(
            out.status.success(),
            "clang: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&obj).unwrap()
    })
    .clone()
}

/// How a helper classifier is attached.
#[derive(Debug, Clone, Copy)]
pub enum HelperAttach {
    /// TCX, at the tail of the chain.
    TcxLast,
    /// Netlink clsact at this priority (adds the qdisc if needed).
    Netlink(u16),
}

/// A helper program attached in a node netns, held by a thread living in that namespace
/// (aya and netlink act in the calling thread's namespace). Dropping it detaches.
pub struct Helper {
    tx: std::sync::mpsc::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Cmd {
    Count(std::sync::mpsc::Sender<u64>),
    Stop,
}

impl Helper {
    pub fn attach(
        netns: &str,
        iface: &str,
        prog: &str,
        how: HelperAttach,
        hooks: &[TcAttachType],
    ) -> Helper {
        let (tx, rx) = std::sync::mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (netns, iface, prog, hooks) = (
            netns.to_owned(),
            iface.to_owned(),
            prog.to_owned(),
            hooks.to_vec(),
        );
        let thread = std::thread::spawn(move || {
            enter_netns(&netns);
            let attached = (|| -> anyhow::Result<aya::Ebpf> {
                let mut ebpf = aya::Ebpf::load(&helper_object())?;
                let p: &mut SchedClassifier = ebpf
                    .program_mut(&prog)
                    .ok_or_else(|| anyhow::anyhow!("no {prog}"))?
                    .try_into()?;
                p.load()?;
                for hook in &hooks {
                    let opts = match how {
                        HelperAttach::TcxLast => aya::programs::tc::TcAttachOptions::TcxOrder(
                            aya::programs::LinkOrder::last(),
                        ),
                        HelperAttach::Netlink(priority) => {
                            let _ = aya::programs::tc::qdisc_add_clsact(&iface);
                            aya::programs::tc::TcAttachOptions::Netlink(
                                aya::programs::tc::NlOptions {
                                    priority,
                                    ..Default::default()
                                },
                            )
                        }
                    };
                    p.attach_with_options(&iface, *hook, opts)?;
                }
                Ok(ebpf)
            })();
            let ebpf = match attached {
                Ok(e) => {
                    ready_tx.send(Ok(())).unwrap();
                    e
                }
                Err(e) => {
                    ready_tx.send(Err(format!("{e:#}"))).unwrap();
                    return;
                }
            };
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    Cmd::Count(reply) => {
                        let n = ebpf
                            .map("wt_count")
                            .and_then(|m| aya::maps::Array::<_, u64>::try_from(m).ok())
                            .and_then(|a| a.get(&0, 0).ok())
                            .unwrap_or(0);
                        let _ = reply.send(n);
                    }
                    Cmd::Stop => break,
                }
            }
            drop(ebpf);
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("helper thread")
            .expect("attach helper program");
        Helper {
            tx,
            thread: Some(thread),
        }
    }

    /// Packets counted by `wt_counter`.
    pub fn count(&self) -> u64 {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(Cmd::Count(tx)).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// What sits on an interface's TC hooks.

/// Names of the programs on the TCX ingress and egress chains of `iface`.
pub fn tcx_programs(cluster: &Cluster, netns: &str, iface: &str) -> Vec<String> {
    let iface = iface.to_owned();
    cluster.run_in(netns, move || {
        let mut names = Vec::new();
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&iface, hook) {
                names.extend(
                    progs
                        .iter()
                        .filter_map(|p| p.name_as_str().map(str::to_owned)),
                );
            }
        }
        names
    })
}

/// `tc filter show` of both clsact hooks.
pub fn tc_filters(netns: &str, iface: &str) -> String {
    let mut out = String::new();
    for hook in ["ingress", "egress"] {
        let o = Command::new("tc")
            .args(["-n", netns, "filter", "show", "dev", iface, hook])
            .output()
            .expect("tc");
        out.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    out
}

pub fn has_clsact(netns: &str, iface: &str) -> bool {
    let o = Command::new("tc")
        .args(["-n", netns, "qdisc", "show", "dev", iface])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&o.stdout).contains("clsact")
}

pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(name)
}
