//! Live trace lines: follows the stitcher's trace printer output and shows it.
//!
//! In: the stitcher's stdout log file (the `--print text` trace printer, one line per span,
//! a trace's spans together). Out: the same lines on our stdout behind [`PREFIX`], a blank
//! line between traces, and the spans parsed into [`SpanLine`]s for the summary.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What starts every printed trace line on the demo's stdout.
pub const PREFIX: &str = "[trace] ";

/// One span as the text trace printer writes it (see the stitcher's `export::printer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanLine {
    /// The start as printed (`2026-11-22 10:00:00.123456789`, UTC): sorts like time.
    pub start: String,
    /// `HTTPClient` → true, `HTTP` → false.
    pub client: bool,
    pub status: u16,
    pub method: String,
    pub path: String,
    /// `ip as workload.namespace:port` (`ip as ip:port` when unnamed).
    pub from: String,
    pub to: String,
    /// `namespace/workload` of the span's owner.
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// All zeros for a root.
    pub parent_id: String,
}

impl SpanLine {
    /// Parses one printer line; `None` for anything else (log lines, partial writes).
    pub fn parse(line: &str) -> Option<SpanLine> {
        let mut fields = line.trim_start().split(' ');
        let (date, time, _durations) = (fields.next()?, fields.next()?, fields.next()?);
        let client = match fields.next()? {
            "HTTPClient" => true,
            "HTTP" => false,
            _ => return None,
        };
        let status = fields.next()?.parse().ok()?;
        let method = fields.next()?.to_string();
        let path = fields.next()?.to_string();
        let rest: Vec<&str> = fields.collect();
        let rest = rest.join(" ");
        let (peers, rest) = rest.split_once(" size:")?;
        let (from, to) = peers
            .strip_prefix('[')?
            .strip_suffix(']')?
            .split_once("]->[")?;
        let service = between(rest, "svc=[", "]")?;
        let tp = between(rest, "traceparent=[00-", "]-01]")?;
        let (trace_id, ids) = tp.split_once('-')?;
        let (span_id, parent_id) = ids.split_once('[')?;
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(parent_id, 16) {
            return None;
        }
        Some(SpanLine {
            start: format!("{date} {time}"),
            client,
            status,
            method,
            path,
            from: from.to_string(),
            to: to.to_string(),
            service: service.to_string(),
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            parent_id: parent_id.to_string(),
        })
    }

    pub fn is_root(&self) -> bool {
        self.parent_id.bytes().all(|b| b == b'0')
    }

    /// The name (`frontend.demo`, or the IP when unnamed) of the server side as printed.
    pub fn server_name(&self) -> Option<&str> {
        name_of(&self.to)
    }

    /// The name of the client side as printed.
    pub fn client_name(&self) -> Option<&str> {
        name_of(&self.from)
    }
}

/// `10.244.1.2 as frontend.demo:80` → `frontend.demo`.
fn name_of(peer: &str) -> Option<&str> {
    let (_, named) = peer.split_once(" as ")?;
    named.rsplit_once(':').map(|(name, _)| name)
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// Spans seen so far, grouped by trace id (in first-seen order of lines).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub traces: BTreeMap<String, Vec<SpanLine>>,
    pub spans: usize,
}

impl Seen {
    fn add(&mut self, span: SpanLine) {
        self.spans += 1;
        self.traces
            .entry(span.trace_id.clone())
            .or_default()
            .push(span);
    }
}

/// Follows a growing file on a thread, printing and parsing its complete lines.
pub struct Follower {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Follower {
    pub fn start(path: PathBuf) -> Follower {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::Builder::new()
                .name("weft-demo-follow".into())
                .spawn(move || follow(&path, &seen, &stop))
                .ok()
        };
        Follower { seen, stop, thread }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many traces were printed so far.
    pub fn traces(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .traces
            .len()
    }

    /// Reads what is left in the file, then stops.
    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen()
    }
}

fn follow(path: &PathBuf, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let mut offset = 0u64;
    let mut pending = String::new();
    let mut group: Vec<(String, SpanLine)> = Vec::new();
    loop {
        // Read the stop flag before the file: the last pass sees everything written
        // before `finish` was called.
        let stopping = stop.load(Ordering::SeqCst);
        if let Ok(mut file) = File::open(path)
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut buf = Vec::new();
            if let Ok(n) = file.read_to_end(&mut buf) {
                offset += n as u64;
                pending.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        if stopping && !pending.is_empty() && !pending.ends_with('\n') {
            pending.push('\n');
        }
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let line = line.trim_end();
            match SpanLine::parse(line) {
                Some(span) => {
                    if group
                        .first()
                        .is_some_and(|(_, g)| g.trace_id != span.trace_id)
                    {
                        show_trace(std::mem::take(&mut group), seen);
                    }
                    group.push((line.to_string(), span));
                }
                None if line.is_empty() => {}
                // Not a span line (the printer writes nothing else, but never hide output).
                None => {
                    show_trace(std::mem::take(&mut group), seen);
                    println!("{PREFIX}{line}");
                }
            }
        }
        // The printer writes a trace's lines at once: what was read is whole traces.
        show_trace(std::mem::take(&mut group), seen);
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints one trace's lines as a tree: each span under its parent, indented by depth,
/// siblings by start time.
fn show_trace(group: Vec<(String, SpanLine)>, seen: &Mutex<Seen>) {
    if group.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    for (i, depth) in tree_order(&group.iter().map(|(_, s)| s).collect::<Vec<_>>()) {
        let _ = writeln!(out, "{PREFIX}{}{}", "  ".repeat(depth), group[i].0);
    }
    let _ = out.flush();
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    for (_, span) in group {
        seen.add(span);
    }
}

/// Depth-first order of a trace's spans: `(index, depth)`, roots (and spans whose parent is
/// not among them) first, children after their parent, siblings by start.
pub fn tree_order(spans: &[&SpanLine]) -> Vec<(usize, usize)> {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let by_start = |v: &mut Vec<usize>| v.sort_by(|a, b| spans[*a].start.cmp(&spans[*b].start));
    let mut roots: Vec<usize> = (0..spans.len())
        .filter(|&i| {
            !ids.contains(spans[i].parent_id.as_str()) || spans[i].parent_id == spans[i].span_id
        })
        .collect();
    by_start(&mut roots);
    let mut order = Vec::with_capacity(spans.len());
    let mut visited = vec![false; spans.len()];
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|i| (i, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        order.push((i, depth));
        let mut children: Vec<usize> = (0..spans.len())
            .filter(|&c| !visited[c] && spans[c].parent_id == spans[i].span_id)
            .collect();
        by_start(&mut children);
        stack.extend(children.into_iter().rev().map(|c| (c, depth + 1)));
    }
    // A parent cycle has no root: never drop its spans.
    order.extend((0..spans.len()).filter(|&i| !visited[i]).map(|i| (i, 0)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "2026-11-22 10:00:00.123456789 (5.04ms[4.80ms]) HTTPClient 200 GET /api/items [10.244.1.9 as frontend.demo:37450]->[10.96.0.20 as backend.demo:80] size:0B svc=[demo/frontend] traceparent=[00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331[00f067aa0ba902b7]-01]";

    #[test]
    fn parses_the_design_example() {
        let s = SpanLine::parse(LINE).unwrap();
        assert!(s.client);
        assert_eq!(s.status, 200);
        assert_eq!(s.method, "GET");
        assert_eq!(s.path, "/api/items");
        assert_eq!(s.client_name(), Some("frontend.demo"));
        assert_eq!(s.server_name(), Some("backend.demo"));
        assert_eq!(s.service, "demo/frontend");
        assert_eq!(s.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.span_id, "b7ad6b7169203331");
        assert_eq!(s.parent_id, "00f067aa0ba902b7");
        assert!(!s.is_root());
    }

    #[test]
    fn parses_roots_unjoined_and_unnamed_peers() {
        let line = "2026-11-22 10:00:00.000000001 (1.00ms[-]) HTTP 500 GET /store/17 [10.244.2.2 as 10.244.2.2:40000]->[10.244.3.2 as store.demo:8080] size:0B svc=[demo/store] traceparent=[00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331[0000000000000000]-01]";
        let s = SpanLine::parse(line).unwrap();
        assert!(!s.client);
        assert_eq!(s.status, 500);
        assert_eq!(s.client_name(), Some("10.244.2.2"));
        assert_eq!(s.server_name(), Some("store.demo"));
        assert!(s.is_root());
    }

    #[test]
    fn orders_a_trace_as_a_tree() {
        let mk = |start: &str, id: &str, parent: &str| {
            let line = LINE.replacen("10:00:00.123456789", start, 1).replace(
                "b7ad6b7169203331[00f067aa0ba902b7]",
                &format!("{id}[{parent}]"),
            );
            SpanLine::parse(&line).unwrap()
        };
        let zero = "0000000000000000";
        // Printed leaf first, as the stitcher does.
        let spans = [
            mk("10:00:00.3", "000000000000000c", "000000000000000b"),
            mk("10:00:00.2", "000000000000000b", "000000000000000a"),
            mk("10:00:00.1", "000000000000000a", zero),
            mk("10:00:00.4", "000000000000000d", "000000000000000a"),
            mk("10:00:00.0", "00000000000000ee", "00000000000000ff"),
        ];
        let refs: Vec<&SpanLine> = spans.iter().collect();
        assert_eq!(
            tree_order(&refs),
            vec![(4, 0), (2, 0), (1, 1), (0, 2), (3, 1)]
        );
        // A cycle keeps every span.
        let cycle = [
            mk("10:00:00.1", "000000000000000a", "000000000000000b"),
            mk("10:00:00.2", "000000000000000b", "000000000000000a"),
        ];
        let refs: Vec<&SpanLine> = cycle.iter().collect();
        assert_eq!(tree_order(&refs).len(), 2);
    }

    #[test]
    fn rejects_other_lines() {
        assert_eq!(SpanLine::parse(""), None);
        assert_eq!(SpanLine::parse("INFO starting weft-stitcher"), None);
        assert_eq!(SpanLine::parse(&LINE[..LINE.len() - 10]), None);
        let bad_id = LINE.replace("b7ad6b7169203331", "b7ad6b71692033zz");
        assert_eq!(SpanLine::parse(&bad_id), None);
    }
}
