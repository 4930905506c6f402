//! The Kubernetes source against a fake API server that speaks the real list and watch
//! protocol (tests/support/fake_apiserver.rs): names follow pods, Services and owners as
//! they change, at the time of each request, through disconnects and 410 Gone.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::fake_apiserver::{
    ENDPOINTSLICES, FakeApiServer, JOBS, NODES, PODS, REPLICASETS, SERVICES,
};
use weft_stitcher::metrics::Registry;
use weft_stitcher::resolve::{CacheConfig, Identity, KubeOptions, KubeResolver, PeerKind, Resolve};

const SEC: u64 = 1_000_000_000;
const DEADLINE: Duration = Duration::from_secs(15);

fn now_nanos() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)).unwrap_or(0)
}

/// The time the tests' requests happen: a little after the objects they create, whose
/// creationTimestamp (whole seconds) the fake sets to when they were created.
fn request_time() -> u64 {
    now_nanos() + 2 * SEC
}

fn rfc3339(nanos: u64) -> String {
    let secs = i64::try_from(nanos / SEC).expect("time fits");
    chrono::DateTime::from_timestamp(secs, 0)
        .expect("valid time")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("valid socket address")
}

/// A pod as the API serves it: running, with an IP, started at `started` (Unix nanos).
fn pod(ns: &str, name: &str, ip: &str, started: u64, owner: Option<(&str, &str)>) -> Value {
    let mut p = json!({
        "metadata": {
            "name": name,
            "namespace": ns,
            "creationTimestamp": rfc3339(started),
            "labels": {"app": name},
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.10.0.1",
            "startTime": rfc3339(started),
        },
    });
    if let Some((kind, owner)) = owner {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": if kind == "ReplicaSet" { "apps/v1" } else { "batch/v1" },
            "kind": kind,
            "name": owner,
            "uid": format!("uid-of-{owner}"),
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    p
}

fn owned(ns: &str, name: &str, owner_kind: &str, owner: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-of-{name}"),
            "ownerReferences": [{
                "apiVersion": if owner_kind == "Deployment" { "apps/v1" } else { "batch/v1" },
                "kind": owner_kind,
                "name": owner,
                "uid": format!("uid-of-{owner}"),
                "controller": true,
            }],
        },
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {}},
    })
}

fn service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            "selector": {"app": name},
        },
    })
}

struct Harness {
    api: FakeApiServer,
    registry: Registry,
    resolver: KubeResolver,
}

async fn start() -> Harness {
    start_on(FakeApiServer::start().await).await
}

/// Starts the resolver against `api` (which may already hold objects).
async fn start_on(api: FakeApiServer) -> Harness {
    let h = start_unsynced(api).await;
    assert!(
        h.resolver.wait_synced(DEADLINE).await,
        "every kind listed within {DEADLINE:?}; requests: {:?}",
        h.api.requests()
    );
    h
}

async fn start_unsynced(api: FakeApiServer) -> Harness {
    let registry = Registry::new();
    let opts = KubeOptions {
        deleted_grace: Duration::from_secs(2),
        cache: CacheConfig::default(),
    };
    let resolver = KubeResolver::start_with(api.client(), &registry, opts)
        .await
        .expect("resolver starts");
    Harness {
        api,
        registry,
        resolver,
    }
}

impl Harness {
    fn at(&self, a: &str, t: u64) -> Identity {
        self.resolver.resolve(addr(a), t)
    }

    fn pod_at(&self, a: &str, t: u64) -> Option<String> {
        self.at(a, t).meta.and_then(|m| m.pod.clone())
    }

    fn counter(&self, name: &str) -> u64 {
        self.registry.snapshot().get(name).copied().unwrap_or(0)
    }

    /// Polls `cond` until it holds or the deadline passes.
    async fn eventually(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not within {DEADLINE:?}; requests: {:#?}",
                self.api.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the resolver has a watch open on every kind.
    async fn watching(&self) {
        let start = Instant::now();
        for kind in [PODS, SERVICES, NODES, ENDPOINTSLICES, REPLICASETS, JOBS] {
            while self.api.open_watches(kind) == 0 {
                assert!(start.elapsed() < DEADLINE, "no watch on {}", kind.kind);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn reused_pod_ip_resolves_to_the_pod_that_held_it_at_the_time() {
    let h = start().await;
    let ip = "10.244.1.9";
    let a_started = now_nanos() - 600 * SEC;
    h.api
        .apply(PODS, pod("demo", "batch-a", ip, a_started, None));
    let during_a = a_started + 60 * SEC;
    h.eventually("pod a resolves", |h| {
        h.pod_at("10.244.1.9:8080", during_a).as_deref() == Some("batch-a")
    })
    .await;
    let id = h.at("10.244.1.9:8080", during_a);
    assert_eq!(id.kind, PeerKind::Pod);
    assert_eq!(id.name(), "batch-a.demo");

    h.api.delete(PODS, "demo", "batch-a");
    // Deleted: gone for times after its grace period (2 s in this test) …
    h.eventually("pod a ended", |h| {
        h.at("10.244.1.9:8080", now_nanos() + 5 * SEC).kind == PeerKind::External
    })
    .await;
    // … but still named for requests made while it lived.
    assert_eq!(
        h.pod_at("10.244.1.9:8080", during_a).as_deref(),
        Some("batch-a")
    );

    // Its address goes to a new pod.
    let b_started = now_nanos() + SEC;
    h.api
        .apply(PODS, pod("demo", "batch-b", ip, b_started, None));
    let during_b = b_started + 2 * SEC;
    h.eventually("pod b resolves", |h| {
        h.pod_at("10.244.1.9:8080", during_b).as_deref() == Some("batch-b")
    })
    .await;
    // Requests timestamped before the reuse still name the pod that held the IP then.
    assert_eq!(
        h.pod_at("10.244.1.9:8080", during_a).as_deref(),
        Some("batch-a")
    );
    let b = h.at("10.244.1.9:8080", during_b).meta.expect("pod b meta");
    assert_ne!(
        b.pod_uid,
        h.at("10.244.1.9:8080", during_a).meta.expect("a").pod_uid,
        "two pods, two UIDs"
    );
    // Before either pod existed the address is nobody's.
    assert_eq!(
        h.at("10.244.1.9:8080", a_started - 10 * SEC).kind,
        PeerKind::External
    );
}

#[tokio::test]
async fn completed_job_pod_frees_its_ip_while_its_object_remains() {
    let h = start().await;
    let started = now_nanos() - 300 * SEC;
    let finished = started + 100 * SEC;
    let mut done = pod(
        "demo",
        "report-1-x",
        "10.244.2.3",
        started,
        Some(("Job", "report-1")),
    );
    done["status"]["phase"] = json!("Succeeded");
    done["status"]["containerStatuses"] = json!([{
        "name": "app", "ready": false, "restartCount": 0, "image": "app:1", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "finishedAt": rfc3339(finished)}},
    }]);
    h.api.apply(PODS, done);
    h.api
        .apply(JOBS, owned("demo", "report-1", "CronJob", "report"));
    let during = started + 50 * SEC;
    h.eventually("job pod named by its CronJob", |h| {
        h.at("10.244.2.3:1", during).workload() == Some("report")
    })
    .await;
    let m = h.at("10.244.2.3:1", during).meta.expect("meta");
    assert_eq!(m.workload_kind, "CronJob");
    // After completion plus grace, the address is free although the pod object is still listed.
    assert_eq!(
        h.at("10.244.2.3:1", finished + 10 * SEC).kind,
        PeerKind::External
    );
}

#[tokio::test]
async fn cluster_ip_resolves_to_its_service_and_backends_know_it() {
    let h = start().await;
    let t = request_time();
    h.api
        .apply(SERVICES, service("demo", "backend", "10.96.0.20"));
    h.api.apply(
        PODS,
        pod("demo", "backend-0", "10.244.1.7", t - 60 * SEC, None),
    );
    h.api.apply(
        ENDPOINTSLICES,
        json!({
            "metadata": {
                "name": "backend-abcde",
                "namespace": "demo",
                "labels": {"kubernetes.io/service-name": "backend"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }),
    );
    h.eventually("service resolves", |h| {
        h.at("10.96.0.20:80", t).kind == PeerKind::Service
    })
    .await;
    let s = h.at("10.96.0.20:80", t);
    assert_eq!(s.name(), "backend.demo");
    assert_eq!(
        s.meta.as_ref().and_then(|m| m.service.as_deref()),
        Some("backend")
    );
    h.eventually("backend pod knows its service", |h| {
        h.at("10.244.1.7:8080", t)
            .meta
            .is_some_and(|m| m.service.as_deref() == Some("backend"))
    })
    .await;
    assert_eq!(h.at("10.244.1.7:8080", t).kind, PeerKind::Pod);
    // An address nobody holds stays an IP and is counted.
    let before = h.counter("resolve.unresolved");
    let ext = h.at("203.0.113.5:443", t);
    assert_eq!(
        (ext.kind, ext.name()),
        (PeerKind::External, "203.0.113.5".to_string())
    );
    assert_eq!(h.counter("resolve.unresolved"), before + 1);
}

#[tokio::test]
async fn pod_of_a_replicaset_of_a_deployment_resolves_to_the_deployment() {
    let h = start().await;
    let t = request_time();
    // The pod arrives before its ReplicaSet: named by the ReplicaSet until it is known.
    h.api.apply(
        PODS,
        pod(
            "shop",
            "web-6d4b8-x2kq",
            "10.244.3.4",
            t - 30 * SEC,
            Some(("ReplicaSet", "web-6d4b8")),
        ),
    );
    h.eventually("pod named by its replicaset", |h| {
        h.at("10.244.3.4:8080", t).workload() == Some("web-6d4b8")
    })
    .await;
    h.api
        .apply(REPLICASETS, owned("shop", "web-6d4b8", "Deployment", "web"));
    h.eventually("pod named by its deployment", |h| {
        h.at("10.244.3.4:8080", t).workload() == Some("web")
    })
    .await;
    let m = h.at("10.244.3.4:8080", t).meta.expect("meta");
    assert_eq!(m.workload_kind, "Deployment");
    assert_eq!(m.namespace, "shop");
    assert_eq!(m.pod.as_deref(), Some("web-6d4b8-x2kq"));
    assert_eq!(m.node.as_deref(), Some("node-a"));
}

#[tokio::test]
async fn host_network_pod_resolves_by_declared_port_else_node() {
    let h = start().await;
    let t = request_time();
    h.api.apply(
        NODES,
        json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "10.10.0.1"},
                {"type": "Hostname", "address": "node-a"},
            ]},
        }),
    );
    let mut agent = pod(
        "kube-system",
        "exporter-abc",
        "10.10.0.1",
        t - 60 * SEC,
        Some(("DaemonSet", "exporter")),
    );
    agent["spec"]["hostNetwork"] = json!(true);
    agent["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9100, "protocol": "TCP"}]);
    h.api.apply(PODS, agent);
    h.eventually("host-network pod resolves on its port", |h| {
        h.at("10.10.0.1:9100", t).workload() == Some("exporter")
    })
    .await;
    assert_eq!(h.at("10.10.0.1:9100", t).kind, PeerKind::Pod);
    let other = h.at("10.10.0.1:22", t);
    assert_eq!(
        (other.kind, other.name()),
        (PeerKind::Node, "node-a".to_string())
    );
}

#[tokio::test]
async fn watch_cut_mid_stream_recovers_without_losing_changes_made_meanwhile() {
    let h = start().await;
    let t = request_time();
    h.api
        .apply(PODS, pod("demo", "stays", "10.244.5.1", t - 60 * SEC, None));
    h.api
        .apply(PODS, pod("demo", "goes", "10.244.5.2", t - 60 * SEC, None));
    h.eventually("initial pods", |h| {
        h.pod_at("10.244.5.1:1", t).is_some() && h.pod_at("10.244.5.2:1", t).is_some()
    })
    .await;
    h.watching().await;
    let requests_before = h.api.requests().len();
    assert_eq!(h.counter("resolve.watch.errors"), 0);

    // The API goes away mid-stream; while it is away, one pod is deleted and one created.
    h.api.stop();
    h.api.delete(PODS, "demo", "goes");
    h.api.apply(
        PODS,
        pod("demo", "arrives", "10.244.5.3", t - 5 * SEC, None),
    );
    // Lookups do not wait for the API: what was known is answered at once.
    let asked = Instant::now();
    assert_eq!(h.pod_at("10.244.5.1:1", t).as_deref(), Some("stays"));
    assert!(asked.elapsed() < Duration::from_millis(100));
    h.eventually("the resolver retried while the API was down", |h| {
        h.counter("resolve.watch.errors") > 0
    })
    .await;
    h.api.restart().await;

    h.eventually("the pod created during the cut resolves", |h| {
        h.pod_at("10.244.5.3:1", t).as_deref() == Some("arrives")
    })
    .await;
    h.eventually("the pod deleted during the cut ends", |h| {
        h.at("10.244.5.2:1", now_nanos() + 5 * SEC).kind == PeerKind::External
    })
    .await;
    assert_eq!(
        h.pod_at("10.244.5.2:1", t - 10 * SEC).as_deref(),
        Some("goes"),
        "still named for its lifetime"
    );
    assert_eq!(h.pod_at("10.244.5.1:1", t).as_deref(), Some("stays"));
    // The history was still there: the watch resumed from its resourceVersion, no relist.
    let pods_resumed = h.api.requests()[requests_before..].iter().any(|r| {
        r.starts_with("GET /api/v1/pods?")
            && r.contains("watch=true")
            && r.contains("resourceVersion=")
    });
    assert!(pods_resumed, "pods watch resumed: {:#?}", h.api.requests());
}

#[tokio::test]
async fn expired_resource_version_410_relists_and_catches_up() {
    let h = start().await;
    let t = request_time();
    h.api
        .apply(PODS, pod("demo", "old-1", "10.244.6.1", t - 60 * SEC, None));
    h.api
        .apply(SERVICES, service("demo", "gone-svc", "10.96.6.6"));
    h.eventually("initial state", |h| {
        h.pod_at("10.244.6.1:1", t).is_some() && h.at("10.96.6.6:80", t).kind == PeerKind::Service
    })
    .await;
    h.watching().await;
    let relists_before = h.counter("resolve.watch.relists");

    // Cut, change, and compact: the resourceVersions the watches hold are now too old.
    h.api.break_connections();
    h.api.set_available(false);
    h.api.delete(PODS, "demo", "old-1");
    h.api.delete(SERVICES, "demo", "gone-svc");
    h.api
        .apply(PODS, pod("demo", "new-1", "10.244.6.2", t - 5 * SEC, None));
    h.api.compact();
    h.api.set_available(true);

    h.eventually("relisted after 410", |h| {
        h.counter("resolve.watch.relists") > relists_before
    })
    .await;
    h.eventually("the pod created during the outage resolves", |h| {
        h.pod_at("10.244.6.2:1", t).as_deref() == Some("new-1")
    })
    .await;
    h.eventually("objects deleted during the outage end", |h| {
        let later = now_nanos() + 5 * SEC;
        h.at("10.244.6.1:1", later).kind == PeerKind::External
            && h.at("10.96.6.6:80", later).kind == PeerKind::External
    })
    .await;
    assert!(h.counter("resolve.watch.deleted_while_disconnected") >= 2);
    let requests = h.api.requests();
    let relisted = requests
        .iter()
        .rev()
        .any(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch="));
    assert!(relisted, "a fresh list of pods: {requests:#?}");
}

#[tokio::test]
async fn expired_watch_mid_stream_410_relists() {
    let h = start().await;
    let t = request_time();
    h.api
        .apply(PODS, pod("demo", "p1", "10.244.7.1", t - 60 * SEC, None));
    h.eventually("p1", |h| h.pod_at("10.244.7.1:1", t).is_some())
        .await;
    h.watching().await;
    let relists_before = h.counter("resolve.watch.relists");
    // The API's watch cache fell behind: an ERROR 410 event on the open stream.
    h.api.compact();
    h.api.expire_watches(PODS);
    h.eventually("relisted after a 410 event", |h| {
        h.counter("resolve.watch.relists") > relists_before
    })
    .await;
    // Changes after the relist flow again.
    h.api
        .apply(PODS, pod("demo", "p2", "10.244.7.2", t - 5 * SEC, None));
    h.eventually("p2 after relist", |h| {
        h.pod_at("10.244.7.2:1", t).as_deref() == Some("p2")
    })
    .await;
    assert_eq!(
        h.pod_at("10.244.7.1:1", t).as_deref(),
        Some("p1"),
        "relist kept what still exists"
    );
}

#[tokio::test]
async fn bookmarks_let_a_quiet_watch_resume_after_compaction() {
    let h = start().await;
    let t = request_time();
    h.api.apply(NODES, json!({"metadata": {"name": "node-q"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.10.9.9"}]}}));
    h.eventually("node", |h| h.at("10.10.9.9:22", t).kind == PeerKind::Node)
        .await;
    h.watching().await;
    // Other kinds move the resourceVersion on; the nodes watch stays quiet.
    for i in 0..5 {
        h.api.apply(
            SERVICES,
            service("demo", &format!("s{i}"), &format!("10.96.9.{i}")),
        );
    }
    h.eventually("services seen", |h| {
        h.at("10.96.9.4:80", t).kind == PeerKind::Service
    })
    .await;
    let relists_before = h.counter("resolve.watch.relists");
    let requests_before = h.api.requests().len();
    // The bookmark and then the end of the stream travel in order on the same watch.
    h.api.bookmark();
    h.api.compact();
    h.api.close_watches(NODES);
    h.eventually("nodes watch reopened", |h| h.api.open_watches(NODES) > 0)
        .await;
    let since: Vec<String> = h.api.requests()[requests_before..].to_vec();
    let node_lists = since
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && !r.contains("watch="))
        .count();
    assert_eq!(
        node_lists, 0,
        "resumed from the bookmark, no relist: {since:#?}"
    );
    assert_eq!(h.counter("resolve.watch.relists"), relists_before);
}

#[tokio::test]
async fn initial_list_pages_through_continue_tokens() {
    let api = FakeApiServer::start().await;
    let t = request_time();
    // More than kube's page size (500): the list arrives in pages.
    for i in 0..1100u32 {
        let ip = format!("10.245.{}.{}", i / 250, i % 250 + 1);
        api.apply(PODS, pod("bulk", &format!("p{i}"), &ip, t - 60 * SEC, None));
    }
    let h = start_on(api).await;
    assert_eq!(h.pod_at("10.245.0.1:1", t).as_deref(), Some("p0"));
    assert_eq!(h.pod_at("10.245.4.100:1", t).as_deref(), Some("p1099"));
    let pages = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("continue="))
        .count();
    assert_eq!(
        pages,
        2,
        "1100 pods in pages of 500: {:#?}",
        h.api.requests()
    );
    assert_eq!(h.counter("resolve.objects.pods"), 1100);
}

#[tokio::test]
async fn unusable_addresses_are_counted_not_guessed() {
    let h = start().await;
    let t = request_time();
    let mut bad = pod("demo", "odd", "10.244.8.1", t - 60 * SEC, None);
    bad["status"]["podIPs"] = json!([{"ip": "10.244.8"}, {"ip": "10.244.8.2"}]);
    h.api.apply(PODS, bad);
    h.eventually("the usable address resolves", |h| {
        h.pod_at("10.244.8.2:1", t).as_deref() == Some("odd")
    })
    .await;
    assert_eq!(h.counter("resolve.objects_skipped"), 1);
    // A slice without its Service's name label cannot name anything: counted too.
    h.api.apply(
        ENDPOINTSLICES,
        json!({
            "metadata": {"name": "orphan", "namespace": "demo"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.7"]}],
        }),
    );
    h.eventually("orphan slice counted", |h| {
        h.counter("resolve.objects_skipped") == 2
    })
    .await;
    assert_eq!(h.at("192.0.2.7:80", t).kind, PeerKind::External);
}

#[tokio::test]
async fn a_kind_forbidden_by_rbac_leaves_the_others_working() {
    let api = FakeApiServer::start().await;
    api.forbid(JOBS);
    let t = request_time();
    api.apply(PODS, pod("demo", "web-0", "10.244.9.1", t - 60 * SEC, None));
    let h = start_unsynced(api).await;
    h.eventually("pods resolve without jobs", |h| {
        h.pod_at("10.244.9.1:1", t).as_deref() == Some("web-0")
    })
    .await;
    h.eventually("the refusal is counted", |h| {
        h.counter("resolve.watch.errors") > 0
    })
    .await;
    assert!(!h.resolver.is_synced(), "jobs were never listed");
    let forbidden = h
        .api
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /apis/batch/v1/jobs?"));
    assert!(forbidden);
}
