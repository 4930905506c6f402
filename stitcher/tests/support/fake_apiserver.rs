//! A fake Kubernetes API server that speaks the real list and watch protocol over HTTP/1.1
//! on 127.0.0.1, for testing clients (kube-rs watchers) without a cluster.
//!
//! What it does as the API server does:
//! - One resourceVersion counter for everything (etcd's revision); every create, update
//!   and delete takes the next one and stamps it into `metadata.resourceVersion`.
//! - `GET <collection>` lists: a `<Kind>List` with `metadata.resourceVersion` (and
//!   `metadata.continue` when `limit` cuts the list); items carry no apiVersion/kind, as
//!   served by the API.
//! - `GET <collection>?watch=1&resourceVersion=X`: a chunked stream of newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}` events: first every event
//!   after X still in history, then live ones. Without X (or X = "0") the current objects
//!   arrive as ADDED. BOOKMARKs only when `allowWatchBookmarks=true`.
//! - A resourceVersion older than the history kept ([`FakeApiServer::compact`]) is
//!   answered `200 OK` with one ERROR event carrying a `Status` with code 410 (reason
//!   `Expired`), exactly as the API does, and the stream ends.
//! - A watch ends after its `timeoutSeconds` (the client then resumes).
//! - Objects get `uid`, `creationTimestamp`, `generation`; a delete sets
//!   `deletionTimestamp` and the DELETED event carries the object's last state.
//!
//! Faults to inject: end open watches cleanly ([`FakeApiServer::close_watches`]), cut
//! every connection mid-stream ([`FakeApiServer::break_connections`]), send 410 on open
//! watches ([`FakeApiServer::expire_watches`]), answer 503 while "down"
//! ([`FakeApiServer::set_available`]). Every request is logged ([`FakeApiServer::requests`]).
//!
//! Not implemented (kube's watcher does not use them by default): streaming lists
//! (`sendInitialEvents`), label/field selectors, namespaced collection paths, writes
//! over HTTP (tests change state through the methods here).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Body = BoxBody<Bytes, std::io::Error>;

/// A collection the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind {
    pub path: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

pub const PODS: Kind = Kind {
    path: "/api/v1/pods",
    api_version: "v1",
    kind: "Pod",
    namespaced: true,
};
pub const SERVICES: Kind = Kind {
    path: "/api/v1/services",
    api_version: "v1",
    kind: "Service",
    namespaced: true,
};
pub const NODES: Kind = Kind {
    path: "/api/v1/nodes",
    api_version: "v1",
    kind: "Node",
    namespaced: false,
};
pub const ENDPOINTSLICES: Kind = Kind {
    path: "/apis/discovery.k8s.io/v1/endpointslices",
    api_version: "discovery.k8s.io/v1",
    kind: "EndpointSlice",
    namespaced: true,
};
pub const REPLICASETS: Kind = Kind {
    path: "/apis/apps/v1/replicasets",
    api_version: "apps/v1",
    kind: "ReplicaSet",
    namespaced: true,
};
pub const JOBS: Kind = Kind {
    path: "/apis/batch/v1/jobs",
    api_version: "batch/v1",
    kind: "Job",
    namespaced: true,
};
pub const ALL: [Kind; 6] = [PODS, SERVICES, NODES, ENDPOINTSLICES, REPLICASETS, JOBS];

enum Msg {
    Line(Bytes),
    /// Cut the connection without ending the chunked body.
    Abort,
}

struct Watcher {
    tx: mpsc::UnboundedSender<Msg>,
    bookmarks: bool,
}

#[derive(Default)]
struct Collection {
    /// (namespace, name) → object as stored.
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, event type, object) after `oldest`.
    history: Vec<(u64, &'static str, Value)>,
    watchers: Vec<Watcher>,
}

struct Inner {
    rv: u64,
    /// Watches may resume from resourceVersions ≥ this; older ones get 410.
    oldest: u64,
    collections: HashMap<&'static str, Collection>,
    available: bool,
    /// Kinds the caller may not read (RBAC): answered 403.
    forbidden: Vec<&'static str>,
    requests: Vec<String>,
    next_uid: u64,
}

/// A running fake API server. Dropping it stops it.
pub struct FakeApiServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(a) = self.accept.lock().take() {
            a.abort();
        }
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }
}

fn spawn_accept(
    listener: TcpListener,
    inner: Arc<Mutex<Inner>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let inner = inner.clone();
            let conn = tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let inner = inner.clone();
                    async move { Ok::<_, Infallible>(handle(&inner, req)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            let mut conns = conns.lock();
            conns.retain(|c| !c.is_finished());
            conns.push(conn);
        }
    })
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("serialising a JSON value cannot fail");
    line.push(b'\n');
    Bytes::from(line)
}

fn key_of(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("").to_string(),
        meta["name"].as_str().unwrap_or("").to_string(),
    )
}

fn full(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serialising a JSON value cannot fail");
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Mutex::new(Inner {
            rv: 1,
            oldest: 1,
            collections: ALL
                .iter()
                .map(|k| (k.kind, Collection::default()))
                .collect(),
            available: true,
            forbidden: Vec::new(),
            requests: Vec::new(),
            next_uid: 1,
        }));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = spawn_accept(listener, inner.clone(), conns.clone());
        FakeApiServer {
            addr,
            inner,
            accept: Mutex::new(Some(accept)),
            conns,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client pointed at this server (plain HTTP, no auth).
    pub fn client(&self) -> kube::Client {
        let uri: hyper::Uri = self.url().parse().expect("valid url");
        let mut config = kube::Config::new(uri);
        config.connect_timeout = Some(Duration::from_secs(2));
        kube::Client::try_from(config).expect("kube client for the fake server")
    }

    /// Creates or replaces an object (by namespace and name), as a write to the API would.
    /// Returns the object as stored.
    pub fn apply(&self, kind: Kind, mut obj: Value) -> Value {
        let mut inner = self.inner.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = key_of(&obj);
        let existing = inner.collections[kind.kind].objects.get(&key).cloned();
        let uid = match &existing {
            Some(old) => old["metadata"]["uid"].clone(),
            None => match obj["metadata"]["uid"].as_str() {
                Some(u) => json!(u),
                None => {
                    inner.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", inner.next_uid))
                }
            },
        };
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("objects have a metadata map");
        meta.insert("uid".into(), uid);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let generation = existing
            .as_ref()
            .and_then(|o| o["metadata"]["generation"].as_u64())
            .map_or(1, |g| g + 1);
        meta.insert("generation".into(), json!(generation));
        if !meta.contains_key("creationTimestamp") {
            let created = existing
                .as_ref()
                .map(|o| o["metadata"]["creationTimestamp"].clone())
                .unwrap_or_else(|| json!(now_rfc3339()));
            meta.insert("creationTimestamp".into(), created);
        }
        obj["apiVersion"] = json!(kind.api_version);
        obj["kind"] = json!(kind.kind);
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let col = inner.collections.get_mut(kind.kind).expect("known kind");
        col.objects.insert(key, obj.clone());
        col.history.push((rv, event, obj.clone()));
        broadcast(col, event, &obj);
        obj
    }

    /// Deletes an object: sets deletionTimestamp and sends DELETED with its last state.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let mut inner = self.inner.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let col = inner.collections.get_mut(kind.kind).expect("known kind");
        let mut obj = col
            .objects
            .remove(&(namespace.to_string(), name.to_string()))?;
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("objects have a metadata map");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("deletionTimestamp")
            .or_insert_with(|| json!(now_rfc3339()));
        col.history.push((rv, "DELETED", obj.clone()));
        broadcast(col, "DELETED", &obj);
        Some(obj)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.inner.lock().collections[kind.kind]
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Sends a BOOKMARK with the current resourceVersion on every watch that allows them.
    pub fn bookmark(&self) {
        let mut inner = self.inner.lock();
        let rv = inner.rv.to_string();
        for kind in ALL {
            let col = inner.collections.get_mut(kind.kind).expect("known kind");
            let obj = json!({
                "kind": kind.kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": rv},
            });
            let line = event_line("BOOKMARK", &obj);
            col.watchers
                .retain(|w| !w.bookmarks || w.tx.send(Msg::Line(line.clone())).is_ok());
        }
    }

    /// Forgets all history: watches can no longer resume from an older resourceVersion.
    pub fn compact(&self) {
        let mut inner = self.inner.lock();
        inner.oldest = inner.rv;
        for col in inner.collections.values_mut() {
            col.history.clear();
        }
    }

    /// Sends ERROR 410 (Expired) on every open watch of `kind` and ends them.
    pub fn expire_watches(&self, kind: Kind) {
        let mut inner = self.inner.lock();
        let oldest = inner.oldest;
        let rv = inner.rv;
        let col = inner.collections.get_mut(kind.kind).expect("known kind");
        let err = status(
            410,
            "Expired",
            &format!("too old resource version: {oldest} ({rv})"),
        );
        for w in col.watchers.drain(..) {
            let _ = w.tx.send(Msg::Line(event_line("ERROR", &err)));
        }
    }

    /// Ends every open watch of `kind` cleanly (as the API does at `timeoutSeconds`).
    pub fn close_watches(&self, kind: Kind) {
        self.inner
            .lock()
            .collections
            .get_mut(kind.kind)
            .expect("known kind")
            .watchers
            .clear();
    }

    /// Cuts every open connection mid-stream (network failure, API server killed).
    pub fn break_connections(&self) {
        {
            let mut inner = self.inner.lock();
            for col in inner.collections.values_mut() {
                for w in col.watchers.drain(..) {
                    let _ = w.tx.send(Msg::Abort);
                }
            }
        }
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }

    /// Stops the server as a killed API server stops: the listening socket closes
    /// (connections are refused) and every open connection is cut.
    pub fn stop(&self) {
        if let Some(a) = self.accept.lock().take() {
            a.abort();
        }
        self.break_connections();
    }

    /// Starts listening again on the same address, with the same state (an API server
    /// restarted over the same etcd).
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the fake API server's address");
        let accept = spawn_accept(listener, self.inner.clone(), self.conns.clone());
        if let Some(old) = self.accept.lock().replace(accept) {
            old.abort();
        }
    }

    /// While unavailable, every request is answered 503 (API server starting up; kube's
    /// client retries these itself with backoff).
    /// Answers 403 Forbidden for `kind`, as the API does for a ServiceAccount without
    /// list/watch on it.
    pub fn forbid(&self, kind: Kind) {
        self.inner.lock().forbidden.push(kind.kind);
    }

    pub fn set_available(&self, available: bool) {
        self.inner.lock().available = available;
    }

    /// Every request so far, as `GET /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    /// Open watch streams on `kind`.
    pub fn open_watches(&self, kind: Kind) -> usize {
        let mut inner = self.inner.lock();
        let col = inner.collections.get_mut(kind.kind).expect("known kind");
        col.watchers.retain(|w| !w.tx.is_closed());
        col.watchers.len()
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }
}

fn broadcast(col: &mut Collection, event: &str, obj: &Value) {
    let line = event_line(event, obj);
    col.watchers
        .retain(|w| w.tx.send(Msg::Line(line.clone())).is_ok());
}

fn list_item(obj: &Value) -> Value {
    // Lists serve items without apiVersion and kind.
    let mut item = obj.clone();
    if let Some(m) = item.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    item
}

fn handle(inner: &Mutex<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = query_pairs(req.uri().query());
    let mut inner = inner.lock();
    inner.requests.push(format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    ));
    if !inner.available {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
        );
    }
    let Some(kind) = ALL.iter().find(|k| k.path == path).copied() else {
        return full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
        );
    };
    if inner.forbidden.contains(&kind.kind) {
        let (group, resource) = match kind.path.strip_prefix("/apis/") {
            Some(rest) => {
                let mut parts = rest.split('/');
                let group = parts.next().unwrap_or("");
                (group, parts.nth(1).unwrap_or(""))
            }
            None => ("", kind.path.rsplit('/').next().unwrap_or("")),
        };
        let verb = if query.contains_key("watch") {
            "watch"
        } else {
            "list"
        };
        return full(
            StatusCode::FORBIDDEN,
            &status(
                403,
                "Forbidden",
                &format!(
                    "{resource}{} is forbidden: User \"system:serviceaccount:weft:weft-stitcher\" cannot {verb} resource \"{resource}\" in API group \"{group}\" at the cluster scope",
                    if group.is_empty() {
                        String::new()
                    } else {
                        format!(".{group}")
                    }
                ),
            ),
        );
    }
    if req.method() != hyper::Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "the fake serves reads only"),
        );
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    if watch {
        watch_response(&mut inner, kind, &query)
    } else {
        list_response(&inner, kind, &query)
    }
}

fn list_response(inner: &Inner, kind: Kind, query: &HashMap<String, String>) -> Response<Body> {
    let col = &inner.collections[kind.kind];
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // continue token: "<rv>/<namespace>/<name>" of the last item served.
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let rv = parts.next().unwrap_or("").to_string();
            let ns = parts.next().unwrap_or("").to_string();
            let name = parts.next().unwrap_or("").to_string();
            (rv, Some((ns, name)))
        }
        None => (inner.rv.to_string(), None),
    };
    let mut items: Vec<Value> = Vec::new();
    let mut last = None;
    let mut more = false;
    for (key, obj) in &col.objects {
        if after.as_ref().is_some_and(|a| key <= a) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(list_item(obj));
        last = Some(key.clone());
    }
    let mut metadata = json!({"resourceVersion": rv});
    if more && let Some((ns, name)) = last {
        metadata["continue"] = json!(format!("{rv}/{ns}/{name}"));
    }
    full(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version,
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn watch_response(
    inner: &mut Inner,
    kind: Kind,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    let from = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("1" | "true")
    );
    let oldest = inner.oldest;
    let rv = inner.rv;
    let col = inner.collections.get_mut(kind.kind).expect("known kind");
    let mut register = true;
    if from.is_empty() || from == "0" {
        for obj in col.objects.values() {
            let _ = tx.send(Msg::Line(event_line("ADDED", obj)));
        }
    } else {
        let Ok(from) = from.parse::<u64>() else {
            return full(
                StatusCode::BAD_REQUEST,
                &status(
                    400,
                    "BadRequest",
                    &format!("invalid resource version {from:?}"),
                ),
            );
        };
        if from < oldest {
            let err = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({rv})"),
            );
            let _ = tx.send(Msg::Line(event_line("ERROR", &err)));
            register = false;
        } else {
            for (_, event, obj) in col.history.iter().filter(|(r, _, _)| *r > from) {
                let _ = tx.send(Msg::Line(event_line(event, obj)));
            }
        }
    }
    if register {
        col.watchers.push(Watcher { tx, bookmarks });
    }
    // The API ends a watch after timeoutSeconds (kube asks for 290 s); the client resumes.
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let frames = futures::StreamExt::take_until(
        UnboundedReceiverStream::new(rx).map_while_ok(),
        Box::pin(tokio::time::sleep(Duration::from_secs(timeout))),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(StreamBody::new(frames).boxed())
        .expect("static response parts are valid")
}

/// Lines become data frames; an abort becomes a body error, which makes hyper drop the
/// connection without the final chunk.
trait MapWhileOk {
    fn map_while_ok(
        self,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static;
}

impl MapWhileOk for UnboundedReceiverStream<Msg> {
    fn map_while_ok(
        self,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
    {
        use futures::StreamExt;
        self.map(|m| match m {
            Msg::Line(b) => Ok(Frame::data(b)),
            Msg::Abort => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection cut by the test",
            )),
        })
    }
}
