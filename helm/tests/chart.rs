//! Chart tests: the real `helm` lints and renders `helm/weft` with several value sets,
//! `kubernetes-validate` checks every rendered object against the Kubernetes OpenAPI schemas,
//! and the parsed objects are checked for what the collector and the stitcher need: the
//! collector's privileges, mounts, host network and node identity; the wiring from the
//! collector's `--stitcher` URL to the stitcher's Service and container; the resolver's
//! read-only RBAC.
//!
//! Tools come from `helm/install-tools.sh` (never downloaded here): helm at `$WEFT_HELM` or
//! `<repo>/.tools/bin/helm`, kubernetes-validate at `$WEFT_KUBERNETES_VALIDATE` or on `PATH`.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Kubernetes versions the rendered manifests are validated against: the chart's minimum
/// (`kubeVersion` in Chart.yaml) and the newest kubernetes-validate ships schemas for.
const KUBE_VERSIONS: [&str; 2] = ["1.27.0", "1.35.0"];
/// Release and namespace of most renders; the wiring test uses others, to catch hard-coding.
const RELEASE: &str = "weft";
const NAMESPACE: &str = "weft-system";

const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

// ---------------------------------------------------------------------------------------------
// Tools and paths

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("helm/ has a parent")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm/weft")
}

fn values_file(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/values")
        .join(format!("{name}.yaml"));
    assert!(path.is_file(), "missing value set {}", path.display());
    path
}

fn helm_binary() -> PathBuf {
    let path = std::env::var_os("WEFT_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin/helm"));
    assert!(
        path.is_file(),
        "helm not found at {}: run helm/install-tools.sh (it installs helm v4 at \
         <repo>/.tools/bin/helm), or point WEFT_HELM at a helm binary",
        path.display()
    );
    path
}

fn kubernetes_validate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_KUBERNETES_VALIDATE") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubernetes-validate"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "kubernetes-validate not found on PATH: run helm/install-tools.sh (it pip-installs \
             kubernetes-validate), or set WEFT_KUBERNETES_VALIDATE"
        )
    })
}

/// Runs helm with private config/cache/data directories, so tests neither read nor write the
/// user's helm state and never reach a cluster.
fn run_helm(args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("temp dir for helm");
    Command::new(helm_binary())
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .output()
        .expect("run helm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `-f <file>` arguments for value sets, as owned strings.
fn values_args(value_sets: &[&str]) -> Vec<String> {
    value_sets
        .iter()
        .flat_map(|name| ["-f".to_string(), values_file(name).display().to_string()])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Rendering and validation

/// One `helm template` output, validated and parsed.
struct Rendered {
    objects: Vec<Value>,
}

struct RenderOptions<'a> {
    release: &'a str,
    namespace: &'a str,
    value_sets: &'a [&'a str],
    set: &'a [&'a str],
}

impl Default for RenderOptions<'_> {
    fn default() -> Self {
        RenderOptions {
            release: RELEASE,
            namespace: NAMESPACE,
            value_sets: &[],
            set: &[],
        }
    }
}

fn template_args(opts: &RenderOptions) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "template".into(),
        opts.release.into(),
        chart_dir().display().to_string(),
        "--namespace".into(),
        opts.namespace.into(),
        "--kube-version".into(),
        KUBE_VERSIONS[1].into(),
    ];
    args.extend(values_args(opts.value_sets));
    for s in opts.set {
        args.push("--set".into());
        args.push((*s).into());
    }
    args
}

/// Renders the chart, validates every object with kubernetes-validate (strict, for each
/// version in `KUBE_VERSIONS`) and parses the objects.
fn render(opts: RenderOptions) -> Rendered {
    let args = template_args(&opts);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_helm(&arg_refs);
    assert!(
        out.status.success(),
        "helm {} failed:\n{}",
        args.join(" "),
        text(&out.stderr)
    );
    let manifest = text(&out.stdout);
    let objects = parse_objects(&manifest);
    assert!(!objects.is_empty(), "helm rendered no objects");
    validate_with_kubernetes_validate(&manifest, &objects);
    Rendered { objects }
}

fn parse_objects(manifest: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifest)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Kinds kubernetes-validate has no schema for (CRDs); they are checked by the tests instead.
fn is_custom_resource(obj: &Value) -> bool {
    str_at(obj, &["apiVersion"]).starts_with("monitoring.coreos.com/")
}

fn validate_with_kubernetes_validate(manifest: &str, objects: &[Value]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, manifest).expect("write rendered manifest");
    for version in KUBE_VERSIONS {
        let out = Command::new(kubernetes_validate_binary())
            .arg("--strict")
            .arg("--kubernetes-version")
            .arg(version)
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "kubernetes-validate {version} rejected the manifests:\n{report}"
        );
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            let expected_warning = line.starts_with("WARN")
                && line.contains("Couldn't find schema for kind ServiceMonitor");
            assert!(
                line.starts_with("INFO") || expected_warning,
                "kubernetes-validate {version}: unexpected output line: {line}"
            );
        }
        // Every built-in object must have been validated, not skipped.
        for obj in objects.iter().filter(|o| !is_custom_resource(o)) {
            let what = format!(
                "passed for resource {}/{}",
                str_at(obj, &["kind"]).to_lowercase(),
                str_at(obj, &["metadata", "name"])
            );
            assert!(
                report.contains(&what),
                "kubernetes-validate {version} did not report `{what}`:\n{report}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the objects

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, key| &v[*key])
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path).as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    seq_at(v, path)
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

fn port_number(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|n| u16::try_from(n).ok())
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| str_at(o, &["kind"]) == kind)
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {kind}, found {}",
            found.len()
        );
        found[0]
    }

    fn named(&self, kind: &str, name: &str, namespace: &str) -> Option<&Value> {
        self.all(kind).into_iter().find(|o| {
            str_at(o, &["metadata", "name"]) == name
                && str_at(o, &["metadata", "namespace"]) == namespace
        })
    }

    fn collector(&self) -> &Value {
        self.one("DaemonSet")
    }

    fn stitcher(&self) -> &Value {
        self.one("Deployment")
    }
}

fn pod_spec(workload: &Value) -> &Value {
    at(workload, &["spec", "template", "spec"])
}

/// The single container of a workload.
fn container(workload: &Value) -> &Value {
    let containers = seq_at(pod_spec(workload), &["containers"]);
    assert_eq!(containers.len(), 1, "expected one container");
    &containers[0]
}

fn args(workload: &Value) -> Vec<String> {
    strings_at(container(workload), &["args"])
}

/// The value of `--flag=value` in a container's args (the chart always uses `=`).
fn flag(workload: &Value, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    args(workload)
        .iter()
        .rev() // later flags win, as with clap
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
}

fn listen_port(workload: &Value, name: &str) -> u16 {
    let addr = flag(workload, name).unwrap_or_else(|| panic!("{name} missing"));
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    port.parse()
        .unwrap_or_else(|_| panic!("{name}={addr} has no port"))
}

/// Resolves a port reference (number or container port name) to a container port number.
fn container_port(workload: &Value, port_ref: &Value) -> u16 {
    if let Some(n) = port_number(port_ref) {
        return n;
    }
    let name = port_ref.as_str().expect("a port is a number or a name");
    seq_at(container(workload), &["ports"])
        .iter()
        .find(|p| str_at(p, &["name"]) == name)
        .and_then(|p| port_number(&p["containerPort"]))
        .unwrap_or_else(|| panic!("container has no port named {name}"))
}

/// Mount path -> (host path, read-only) for the hostPath volumes of a workload.
fn host_mounts(workload: &Value) -> BTreeMap<String, (String, bool)> {
    let volumes: BTreeMap<&str, &Value> = seq_at(pod_spec(workload), &["volumes"])
        .iter()
        .map(|v| (str_at(v, &["name"]), v))
        .collect();
    seq_at(container(workload), &["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let volume = volumes
                .get(str_at(m, &["name"]))
                .unwrap_or_else(|| panic!("mount of unknown volume {:?}", m["name"]));
            let host = str_at(volume, &["hostPath", "path"]);
            (!host.is_empty()).then(|| {
                let read_only = at(m, &["readOnly"]).as_bool().unwrap_or(false);
                (
                    str_at(m, &["mountPath"]).to_string(),
                    (host.to_string(), read_only),
                )
            })
        })
        .collect()
}

/// Whether a label selector (a `matchLabels` or Service `selector` mapping) matches labels.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(selector), Some(labels)) = (selector.as_mapping(), labels.as_mapping()) else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(workload: &Value) -> &Value {
    at(workload, &["spec", "template", "metadata", "labels"])
}

fn security_context(workload: &Value) -> &Value {
    at(container(workload), &["securityContext"])
}

fn is_privileged(workload: &Value) -> bool {
    at(security_context(workload), &["privileged"])
        .as_bool()
        .unwrap_or(false)
}

fn added_capabilities(workload: &Value) -> BTreeSet<String> {
    strings_at(security_context(workload), &["capabilities", "add"])
        .into_iter()
        .collect()
}

fn set_of(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What the stitcher's resolver reads, as (API group, resource), derived from its source: the
/// kinds it starts watchers for (`spawn_watch::<Kind>`) and the k8s_openapi modules they are
/// imported from. A kind added there fails the RBAC check until the chart grants it.
fn resolver_resources() -> BTreeSet<(String, String)> {
    let path = repo_root().join("stitcher/src/resolve/kube.rs");
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    // `use k8s_openapi::api::<module>::v1::{A, B};` -> kind -> API group.
    let mut group_of = BTreeMap::new();
    for line in source.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("use k8s_openapi::api::") else {
            continue;
        };
        let Some((module, kinds)) = rest.split_once("::v1::") else {
            continue;
        };
        let group = match module {
            "core" => "",
            "apps" | "batch" => module,
            "discovery" => "discovery.k8s.io",
            other => panic!("k8s_openapi module {other}: add its API group to this table"),
        };
        for kind in kinds
            .trim_end_matches(';')
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
        {
            group_of.insert(kind.trim().to_string(), group.to_string());
        }
    }
    let watched: BTreeSet<(String, String)> = source
        .split("spawn_watch::<")
        .skip(1)
        .map(|rest| {
            let kind = &rest[..rest.find('>').expect("closing >")];
            let group = group_of
                .get(kind)
                .unwrap_or_else(|| panic!("resolver watches {kind}, imported from where?"));
            // Every kind the resolver uses pluralises with an "s" (pods, endpointslices, jobs).
            (group.clone(), format!("{}s", kind.to_lowercase()))
        })
        .collect();
    assert!(
        watched.contains(&(String::new(), "pods".to_string())),
        "no watched kinds found in {} (spawn_watch::<Kind> renamed?)",
        path.display()
    );
    watched
}

// ---------------------------------------------------------------------------------------------
// Checks shared by several value sets

/// What every rendering of the collector must satisfy, privileged or not.
fn check_collector_basics(r: &Rendered) {
    let ds = r.collector();
    let spec = pod_spec(ds);
    assert_eq!(
        spec["hostNetwork"],
        Value::Bool(true),
        "collector needs hostNetwork"
    );
    assert_eq!(
        str_at(spec, &["dnsPolicy"]),
        "ClusterFirstWithHostNet",
        "with hostNetwork the collector must still resolve the stitcher Service"
    );
    assert_eq!(spec["hostPID"], Value::Bool(false), "hostPID is not needed");
    assert_eq!(spec["automountServiceAccountToken"], Value::Bool(false));

    // Node identity from the downward API, handed to --node-name.
    let env = seq_at(container(ds), &["env"]);
    let node_name = env
        .iter()
        .find(|e| str_at(e, &["name"]) == "WEFT_NODE_NAME")
        .expect("WEFT_NODE_NAME env");
    assert_eq!(
        str_at(node_name, &["valueFrom", "fieldRef", "fieldPath"]),
        "spec.nodeName"
    );
    assert_eq!(
        flag(ds, "--node-name").as_deref(),
        Some("$(WEFT_NODE_NAME)")
    );

    // Host mounts: BTF read-only, tracefs, and nothing else than these and bpffs.
    let mounts = host_mounts(ds);
    assert_eq!(
        mounts.get("/sys/kernel/btf"),
        Some(&("/sys/kernel/btf".to_string(), true)),
        "BTF must be mounted read-only from the host"
    );
    assert_eq!(
        mounts.get("/sys/kernel/tracing"),
        Some(&("/sys/kernel/tracing".to_string(), true)),
        "the host's tracefs must be mounted (read-only is enough to attach)"
    );
    let allowed = set_of(&["/sys/fs/bpf", "/sys/kernel/btf", "/sys/kernel/tracing"]);
    for (path, (host, _)) in &mounts {
        assert!(
            allowed.contains(host),
            "unexpected host mount {host} at {path}"
        );
        assert_eq!(path, host, "host paths are mounted at the same place");
    }
    assert_eq!(
        security_context(ds)["readOnlyRootFilesystem"],
        Value::Bool(true)
    );

    // Probes on /healthz of the port the collector serves metrics on.
    let metrics = listen_port(ds, "--metrics-listen");
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = at(container(ds), &[probe, "httpGet"]);
        assert_eq!(str_at(get, &["path"]), "/healthz", "{probe} path");
        assert_eq!(container_port(ds, &get["port"]), metrics, "{probe} port");
    }

    // Runs on every node: tolerates every taint.
    let tolerations = seq_at(spec, &["tolerations"]);
    assert!(
        tolerations
            .iter()
            .any(|t| str_at(t, &["operator"]) == "Exists" && t["key"].is_null()),
        "collector must tolerate every taint: {tolerations:?}"
    );
    for kind in ["requests", "limits"] {
        assert!(
            at(container(ds), &["resources", kind])
                .as_mapping()
                .is_some_and(|m| !m.is_empty()),
            "collector resources.{kind}"
        );
    }
}

/// The collector's least-privilege security context (every non-opt-in value set).
fn check_collector_unprivileged(r: &Rendered, expected_caps: &[&str]) {
    let ds = r.collector();
    let sc = security_context(ds);
    assert!(!is_privileged(ds), "collector must not be privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(strings_at(sc, &["capabilities", "drop"]), vec!["ALL"]);
    assert_eq!(added_capabilities(ds), set_of(expected_caps));
}

const DEFAULT_CAPS: [&str; 4] = ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"];

/// The collector's `--stitcher` URL leads to the stitcher: the URL names the Service (name and
/// namespace) and one of its ports; that port's target is the container port the stitcher's
/// `--listen` binds, and the Service selects the stitcher's pods. Returns the Service.
fn check_stitcher_wiring(r: &Rendered) -> &Value {
    let url = flag(r.collector(), "--stitcher").expect("collector has --stitcher");
    let authority = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("--stitcher={url} is not plaintext http"))
        .trim_end_matches('/');
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("--stitcher={url} has no port"));
    let port: u16 = port.parse().expect("numeric port");
    let (svc_name, rest) = host.split_once('.').expect("service.namespace.svc");
    let svc_namespace = rest
        .strip_suffix(".svc")
        .unwrap_or_else(|| panic!("--stitcher={url}: host is not <service>.<namespace>.svc"));

    let svc = r
        .named("Service", svc_name, svc_namespace)
        .unwrap_or_else(|| panic!("--stitcher={url} names no rendered Service"));
    let svc_port = seq_at(svc, &["spec", "ports"])
        .iter()
        .find(|p| port_number(&p["port"]) == Some(port))
        .unwrap_or_else(|| panic!("Service {svc_name} does not expose port {port}"));

    let stitcher = r.stitcher();
    assert_eq!(str_at(stitcher, &["metadata", "namespace"]), svc_namespace);
    let target = container_port(stitcher, &svc_port["targetPort"]);
    assert_eq!(
        target,
        listen_port(stitcher, "--listen"),
        "the Service's port {port} must reach the stitcher's gRPC listener"
    );

    let selector = at(svc, &["spec", "selector"]);
    assert!(
        selects(selector, pod_labels(stitcher)),
        "the Service {svc_name} must select the stitcher's pods"
    );
    assert!(
        !selects(selector, pod_labels(r.collector())),
        "the stitcher Service also selects the collectors"
    );
    svc
}

/// The stitcher Deployment: --kubernetes, probes on its own ports, metrics port on the Service.
fn check_stitcher_basics(r: &Rendered) {
    let svc = check_stitcher_wiring(r);
    let st = r.stitcher();
    assert_eq!(
        flag(st, "--kubernetes").as_deref(),
        Some("on"),
        "the stitcher's resolver watches the API"
    );
    let grpc = listen_port(st, "--listen");
    let metrics = listen_port(st, "--metrics-listen");
    assert_eq!(
        container_port(
            st,
            &at(container(st), &["readinessProbe", "grpc", "port"]).clone()
        ),
        grpc,
        "readiness: gRPC health on the gRPC port"
    );
    let live = at(container(st), &["livenessProbe", "httpGet"]);
    assert_eq!(str_at(live, &["path"]), "/healthz");
    assert_eq!(container_port(st, &live["port"]), metrics);
    assert!(
        seq_at(svc, &["spec", "ports"])
            .iter()
            .any(|p| container_port(st, &p["targetPort"]) == metrics),
        "the stitcher Service exposes the metrics port"
    );
    assert_eq!(at(st, &["spec", "replicas"]).as_u64(), Some(1));
    assert!(!is_privileged(st));
    assert_eq!(
        strings_at(security_context(st), &["capabilities", "drop"]),
        vec!["ALL"]
    );
}

/// The ClusterRole grants get/list/watch on exactly the resolver's kinds, and it is bound to
/// the stitcher's ServiceAccount only.
fn check_rbac(r: &Rendered) {
    let role = r.one("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in seq_at(role, &["rules"]) {
        let verbs: BTreeSet<String> = strings_at(rule, &["verbs"]).into_iter().collect();
        assert_eq!(verbs, set_of(&READ_VERBS), "rule {rule:?}: verbs");
        assert!(
            rule["nonResourceURLs"].is_null(),
            "rule {rule:?}: nonResourceURLs"
        );
        assert!(
            rule["resourceNames"].is_null(),
            "rule {rule:?}: resourceNames"
        );
        for group in strings_at(rule, &["apiGroups"]) {
            for resource in strings_at(rule, &["resources"]) {
                assert!(
                    !group.contains('*') && !resource.contains('*') && !resource.contains('/'),
                    "rule {rule:?}: wildcards or subresources"
                );
                assert!(
                    granted.insert((group.clone(), resource)),
                    "rule {rule:?}: granted twice"
                );
            }
        }
    }
    let expected = resolver_resources();
    assert_eq!(
        granted, expected,
        "ClusterRole must cover exactly the resolver's kinds"
    );
    for kind in ["Role", "RoleBinding"] {
        assert!(r.all(kind).is_empty(), "no {kind} expected");
    }

    let binding = r.one("ClusterRoleBinding");
    assert_eq!(
        str_at(binding, &["roleRef", "name"]),
        str_at(role, &["metadata", "name"])
    );
    assert_eq!(str_at(binding, &["roleRef", "kind"]), "ClusterRole");
    let subjects = seq_at(binding, &["subjects"]);
    assert_eq!(subjects.len(), 1, "bound to the stitcher only");
    let st = r.stitcher();
    assert_eq!(str_at(&subjects[0], &["kind"]), "ServiceAccount");
    assert_eq!(
        str_at(&subjects[0], &["name"]),
        str_at(pod_spec(st), &["serviceAccountName"])
    );
    assert_eq!(
        str_at(&subjects[0], &["namespace"]),
        str_at(st, &["metadata", "namespace"])
    );
    // The collector has no API access: its account is not the bound one.
    assert_ne!(
        str_at(pod_spec(r.collector()), &["serviceAccountName"]),
        str_at(&subjects[0], &["name"])
    );
}

fn check_all_defaults_independent(r: &Rendered) {
    check_collector_basics(r);
    check_stitcher_basics(r);
    check_rbac(r);
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn lint_is_clean_in_strict_mode_for_every_value_set() {
    let chart = chart_dir().display().to_string();
    let sets: [&[&str]; 6] = [
        &[],
        &["netlink"],
        &["jaeger"],
        &["tempo"],
        &["privileged"],
        &["minimal-privileges"],
    ];
    for set in sets {
        let mut args: Vec<String> = vec![
            "lint".into(),
            "--strict".into(),
            "--kube-version".into(),
            KUBE_VERSIONS[1].into(),
            chart.clone(),
        ];
        args.extend(values_args(set));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_helm(&arg_refs);
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "helm lint {set:?} failed:\n{report}");
        assert!(report.contains("0 chart(s) failed"), "{report}");
        for bad in ["[WARNING]", "[ERROR]"] {
            assert!(!report.contains(bad), "helm lint {set:?}:\n{report}");
        }
    }
}

#[test]
fn default_values_render_valid_least_privilege_manifests() {
    let r = render(RenderOptions::default());
    check_all_defaults_independent(&r);
    check_collector_unprivileged(&r, &DEFAULT_CAPS);
    assert_eq!(
        host_mounts(r.collector()).get("/sys/fs/bpf"),
        Some(&("/sys/fs/bpf".to_string(), false)),
        "bpffs is mounted by default"
    );
    let ds = r.collector();
    assert_eq!(flag(ds, "--tc-backend").as_deref(), Some("auto"));
    assert_eq!(flag(ds, "--print").as_deref(), Some("off"));
    assert_eq!(
        flag(ds, "--interfaces"),
        None,
        "default: the collector's own patterns"
    );
    assert_eq!(
        flag(r.stitcher(), "--otlp-endpoint"),
        None,
        "no OTLP by default"
    );
    assert!(
        r.all("ServiceMonitor").is_empty(),
        "ServiceMonitor is opt-in"
    );
}

#[test]
fn netlink_value_set_selects_netlink_and_interfaces() {
    let r = render(RenderOptions {
        value_sets: &["netlink"],
        ..Default::default()
    });
    check_all_defaults_independent(&r);
    check_collector_unprivileged(&r, &DEFAULT_CAPS);
    let ds = r.collector();
    assert_eq!(flag(ds, "--tc-backend").as_deref(), Some("netlink"));
    assert_eq!(flag(ds, "--interfaces").as_deref(), Some("lxc*,cali*"));
    assert_eq!(flag(ds, "--print").as_deref(), Some("text"));
}

#[test]
fn jaeger_value_set_exports_otlp_to_jaeger() {
    let r = render(RenderOptions {
        value_sets: &["jaeger"],
        ..Default::default()
    });
    check_all_defaults_independent(&r);
    check_collector_unprivileged(&r, &DEFAULT_CAPS);
    let st = r.stitcher();
    assert_eq!(
        flag(st, "--otlp-endpoint").as_deref(),
        Some("http://jaeger-collector.observability.svc:4317")
    );
    assert_eq!(flag(st, "--print").as_deref(), Some("json"));
}

#[test]
fn privileged_only_when_opted_in() {
    let r = render(RenderOptions {
        value_sets: &["privileged"],
        ..Default::default()
    });
    check_all_defaults_independent(&r);
    let ds = r.collector();
    assert!(
        is_privileged(ds),
        "collector.privileged=true must run privileged"
    );
    assert!(
        security_context(ds)["allowPrivilegeEscalation"].is_null(),
        "privileged with allowPrivilegeEscalation=false is rejected by the API server"
    );
    assert!(
        !is_privileged(r.stitcher()),
        "the stitcher is never privileged"
    );

    // Every other value set keeps the collector unprivileged.
    for set in ["netlink", "jaeger", "tempo", "minimal-privileges"] {
        let other = render(RenderOptions {
            value_sets: &[set],
            ..Default::default()
        });
        assert!(!is_privileged(other.collector()), "{set}: privileged");
    }
}

#[test]
fn sys_admin_and_bpffs_can_be_turned_off() {
    let r = render(RenderOptions {
        value_sets: &["minimal-privileges"],
        ..Default::default()
    });
    check_all_defaults_independent(&r);
    check_collector_unprivileged(&r, &["BPF", "PERFMON", "NET_ADMIN"]);
    assert_eq!(host_mounts(r.collector()).get("/sys/fs/bpf"), None);

    let extra = render(RenderOptions {
        set: &["collector.extraCapabilities={SYS_RESOURCE}"],
        ..Default::default()
    });
    check_collector_unprivileged(
        &extra,
        &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"],
    );
}

#[test]
fn collector_stitcher_url_follows_release_and_namespace() {
    // Other names than the defaults: the URL must be derived, not hard-coded.
    let r = render(RenderOptions {
        release: "tracing",
        namespace: "observability",
        set: &["stitcher.grpcPort=19400"],
        ..Default::default()
    });
    let svc = check_stitcher_wiring(&r);
    assert_eq!(str_at(svc, &["metadata", "namespace"]), "observability");
    check_all_defaults_independent(&r);

    // An explicit collector.stitcher overrides the Service URL.
    let external = render(RenderOptions {
        set: &["collector.stitcher=http://stitcher.example.internal:9400"],
        ..Default::default()
    });
    assert_eq!(
        flag(external.collector(), "--stitcher").as_deref(),
        Some("http://stitcher.example.internal:9400")
    );
}

#[test]
fn extra_args_come_last_so_they_override() {
    let r = render(RenderOptions {
        set: &[
            "collector.extraArgs={--print=json}",
            "stitcher.extraArgs={--trace-idle=5s}",
        ],
        ..Default::default()
    });
    assert_eq!(
        args(r.collector()).last().map(String::as_str),
        Some("--print=json")
    );
    assert_eq!(flag(r.collector(), "--print").as_deref(), Some("json"));
    assert_eq!(flag(r.stitcher(), "--trace-idle").as_deref(), Some("5s"));
}

#[test]
fn service_monitors_scrape_metrics_ports_of_rendered_services() {
    let r = render(RenderOptions {
        value_sets: &["tempo"],
        ..Default::default()
    });
    check_all_defaults_independent(&r);
    assert_eq!(
        flag(r.stitcher(), "--otlp-endpoint").as_deref(),
        Some("http://tempo.observability.svc:4317")
    );
    let monitors = r.all("ServiceMonitor");
    assert_eq!(
        monitors.len(),
        2,
        "one for the stitcher, one for the collectors"
    );
    let mut scraped = BTreeSet::new();
    for sm in monitors {
        assert_eq!(str_at(sm, &["metadata", "labels", "release"]), "prometheus");
        let selector = at(sm, &["spec", "selector", "matchLabels"]);
        let services: Vec<&Value> = r
            .all("Service")
            .into_iter()
            .filter(|svc| selects(selector, at(svc, &["metadata", "labels"])))
            .collect();
        assert_eq!(services.len(), 1, "{sm:?} must select one Service");
        let svc = services[0];
        let endpoint_port = str_at(&seq_at(sm, &["spec", "endpoints"])[0], &["port"]);
        let svc_port = seq_at(svc, &["spec", "ports"])
            .iter()
            .find(|p| str_at(p, &["name"]) == endpoint_port)
            .expect("ServiceMonitor endpoint names a Service port");
        // That Service port reaches the --metrics-listen port of the pods it selects.
        let workloads: Vec<&Value> = [r.stitcher(), r.collector()]
            .into_iter()
            .filter(|w| selects(at(svc, &["spec", "selector"]), pod_labels(w)))
            .collect();
        assert_eq!(workloads.len(), 1, "Service {svc:?} selects one workload");
        let workload = workloads[0];
        assert_eq!(
            container_port(workload, &svc_port["targetPort"]),
            listen_port(workload, "--metrics-listen")
        );
        scraped.insert(str_at(workload, &["kind"]).to_string());
    }
    assert_eq!(scraped, set_of(&["DaemonSet", "Deployment"]));
}

#[test]
fn notes_print_the_grpcurl_commands_for_the_rendered_service() {
    let out = run_helm(&[
        "install",
        RELEASE,
        &chart_dir().display().to_string(),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        "--output",
        "json",
        "-f",
        &values_file("jaeger").display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "helm install --dry-run: {}",
        text(&out.stderr)
    );
    let release: serde_json::Value = serde_json::from_slice(&out.stdout).expect("release JSON");
    let notes = release["info"]["notes"].as_str().expect("notes");
    let manifest = release["manifest"].as_str().expect("manifest");
    let r = Rendered {
        objects: parse_objects(manifest),
    };
    let svc = check_stitcher_wiring(&r);
    let name = str_at(svc, &["metadata", "name"]);
    let port = listen_port(r.stitcher(), "--listen");
    let svc_port = seq_at(svc, &["spec", "ports"])
        .iter()
        .find(|p| container_port(r.stitcher(), &p["targetPort"]) == port)
        .and_then(|p| port_number(&p["port"]))
        .expect("gRPC port on the Service");
    for line in [
        format!("kubectl -n {NAMESPACE} port-forward svc/{name} {svc_port}"),
        format!("grpcurl -plaintext localhost:{svc_port} list"),
        format!(
            "grpcurl -plaintext -d '{{\"limit\":5}}' localhost:{svc_port} weft.v1.Query/ListTraces"
        ),
        "exported over OTLP/gRPC to http://jaeger-collector.observability.svc:4317".to_string(),
    ] {
        assert!(notes.contains(&line), "NOTES.txt lacks `{line}`:\n{notes}");
    }
    // Every method NOTES.txt tells users to call exists in the Query contract.
    let proto = std::fs::read_to_string(repo_root().join("proto/weft/v1/query.proto"))
        .expect("read query.proto");
    assert!(proto.contains("package weft.v1;") && proto.contains("service Query"));
    let methods: Vec<&str> = notes
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("weft.v1.Query/"))
        .collect();
    assert!(methods.contains(&"ListTraces"));
    for method in methods {
        assert!(
            proto.contains(&format!("rpc {method}(")),
            "NOTES.txt calls weft.v1.Query/{method}, which query.proto lacks"
        );
    }
}

#[test]
fn schema_rejects_invalid_values() {
    // (value set, the path helm must name in its error)
    let cases = [
        ("invalid-tc-backend", "/collector/tcBackend"),
        ("invalid-print", "/stitcher/print"),
        ("invalid-unknown-key", "tcbackend"),
        ("invalid-otlp-endpoint", "/stitcher/otlp/endpoint"),
        ("invalid-privileged", "/collector/privileged"),
        ("invalid-capability", "/collector/extraCapabilities/0"),
        ("invalid-port", "/stitcher/grpcPort"),
    ];
    for (set, path) in cases {
        let args = template_args(&RenderOptions {
            value_sets: &[set],
            ..Default::default()
        });
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_helm(&arg_refs);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{set}: helm template accepted invalid values"
        );
        assert!(
            stderr.contains("schema") || stderr.contains(path),
            "{set}: not a schema error:\n{stderr}"
        );
        assert!(
            stderr.contains(path),
            "{set}: error does not name {path}:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{set}: rendered output despite the error"
        );

        let lint = run_helm(&[
            "lint",
            &chart_dir().display().to_string(),
            "-f",
            &values_file(set).display().to_string(),
        ]);
        assert!(
            !lint.status.success(),
            "{set}: helm lint accepted invalid values"
        );
    }
}

#[test]
fn kubernetes_validate_rejects_a_broken_manifest() {
    // The validation step itself can fail: a wrong type, and (strict) an unknown field.
    let args = template_args(&RenderOptions::default());
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_helm(&arg_refs);
    assert!(out.status.success());
    let manifest = text(&out.stdout);
    assert!(manifest.contains("hostNetwork: true"));
    let breakages = [
        ("hostNetwork: \"yes\"", "is not of type 'boolean'"),
        (
            "hostNetwork: true\n      hostNetworking: true",
            "'hostNetworking' was unexpected",
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    for (replacement, complaint) in breakages {
        let file = dir.path().join("broken.yaml");
        std::fs::write(
            &file,
            manifest.replacen("hostNetwork: true", replacement, 1),
        )
        .expect("write");
        let out = Command::new(kubernetes_validate_binary())
            .args(["--strict", "--kubernetes-version", KUBE_VERSIONS[1]])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let report = text(&out.stdout);
        assert!(!out.status.success(), "broken manifest passed:\n{report}");
        let error = report
            .lines()
            .find(|l| l.starts_with("ERROR"))
            .unwrap_or_else(|| panic!("no ERROR line:\n{report}"));
        assert!(error.contains("daemonset/weft-collector"), "{error}");
        assert!(error.contains(complaint), "{error}");
    }
}

/// The `.rs` files under a directory, recursively.
fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read dir {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn kebab(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The flags a binary declares with clap derive anywhere in `<crate>/src` (flattened argument
/// groups included): flag name -> the accepted values when its type is a `ValueEnum`.
fn cli_flags(crate_dir: &str) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let sources: Vec<String> = rust_sources(&repo_root().join(crate_dir).join("src"))
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read source"))
        .collect();
    // #[derive(.. ValueEnum ..)] enum Name { A, B } -> {"a", "b"} (clap's kebab-case names).
    let mut enums: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for source in &sources {
        let mut value_enum = false;
        let mut lines = source.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if line.starts_with("#[derive(") {
                value_enum = line.contains("ValueEnum");
            }
            let Some(name) = line
                .strip_prefix("pub enum ")
                .and_then(|l| l.strip_suffix(" {"))
            else {
                continue;
            };
            let variants: BTreeSet<String> = lines
                .by_ref()
                .take_while(|l| *l != "}")
                .filter(|l| !l.starts_with("//") && !l.starts_with('#') && !l.is_empty())
                .map(|l| kebab(l.trim_end_matches(',')))
                .collect();
            if std::mem::take(&mut value_enum) {
                enums.entry(name.to_string()).or_default().extend(variants);
            }
        }
    }
    // A field after an #[arg(..long..)] attribute: `pub snake_name: Type,`.
    let mut flags = BTreeMap::new();
    for source in &sources {
        let mut attr = String::new();
        let mut in_attr = false;
        let mut is_long_arg = false;
        for line in source.lines().map(str::trim) {
            if line.starts_with("#[arg(") {
                attr.clear();
                in_attr = true;
            }
            if in_attr {
                attr.push_str(line);
                if line.ends_with(")]") {
                    in_attr = false;
                    is_long_arg = attr.contains("long");
                }
                continue;
            }
            if let Some(field) = line.strip_prefix("pub ").filter(|_| is_long_arg)
                && let Some((name, ty)) = field.split_once(": ")
            {
                let ty = ty.trim_end_matches(',');
                let inner = ty
                    .strip_prefix("Option<")
                    .and_then(|t| t.strip_suffix('>'))
                    .unwrap_or(ty);
                flags.insert(
                    format!("--{}", name.replace('_', "-")),
                    enums.get(inner).cloned(),
                );
                is_long_arg = false;
            }
        }
    }
    assert!(!flags.is_empty(), "no clap flags found in {crate_dir}/src");
    flags
}

/// Every flag the chart passes exists in the binary, with a value the binary accepts where the
/// flag takes one of an enum's values. Checked for every value set.
#[test]
fn rendered_flags_exist_in_the_binaries() {
    let sets: [&[&str]; 6] = [
        &[],
        &["netlink"],
        &["jaeger"],
        &["tempo"],
        &["privileged"],
        &["minimal-privileges"],
    ];
    let binaries = [("collector", "DaemonSet"), ("stitcher", "Deployment")];
    let declared: BTreeMap<&str, _> = binaries
        .iter()
        .map(|(dir, kind)| (*kind, cli_flags(dir)))
        .collect();
    // The value check must not be vacuous: these flags take enum values.
    for (kind, flag) in [
        ("DaemonSet", "--tc-backend"),
        ("DaemonSet", "--print"),
        ("Deployment", "--print"),
        ("Deployment", "--kubernetes"),
    ] {
        assert!(
            matches!(declared[kind].get(flag), Some(Some(values)) if values.len() >= 2),
            "{kind} {flag}: its ValueEnum was not found"
        );
    }
    for set in sets {
        let r = render(RenderOptions {
            value_sets: set,
            ..Default::default()
        });
        for (dir, kind) in binaries {
            for arg in args(r.one(kind)) {
                let (name, value) = match arg.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (arg.clone(), None),
                };
                let accepted = declared[kind].get(&name).unwrap_or_else(|| {
                    panic!("{set:?}: the chart passes {name}, which {dir}/src does not declare")
                });
                assert!(
                    value.is_some(),
                    "{set:?}: {arg}: the chart always uses --flag=value"
                );
                if let (Some(accepted), Some(value)) = (accepted, &value) {
                    assert!(
                        accepted.contains(value),
                        "{set:?}: {arg}: {dir} accepts only {accepted:?}"
                    );
                }
            }
        }
    }
}
