//! What the stitcher knows about each collector instance, for the Query API.
//!
//! In: stream connects/disconnects and accepted batches (from the ingest streams). Out:
//! [`Collectors::list`], a cheap snapshot as `weft.v1.CollectorStatus`. Instances that
//! have been disconnected for longer than the idle TTL are forgotten, so memory is bounded
//! by the number of live collectors plus the ones that left within the TTL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use weft_proto::v1;

/// Events per second are measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Entry {
    status: v1::CollectorStatus,
    /// Open streams of this instance (normally 0 or 1; briefly 2 while a reconnecting
    /// collector's old stream has not noticed yet).
    streams: u32,
    last_activity: Instant,
    window_start: Instant,
    window_events: u64,
}

impl Entry {
    fn new(node: &str, instance: &str, now: Instant) -> Self {
        Entry {
            status: v1::CollectorStatus {
                node_name: node.to_string(),
                instance_id: instance.to_string(),
                ..Default::default()
            },
            streams: 0,
            last_activity: now,
            window_start: now,
            window_events: 0,
        }
    }

    fn roll_rate(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            self.status.events_per_second = self.window_events as f64 / elapsed.as_secs_f64();
            self.window_start = now;
            self.window_events = 0;
        }
    }
}

/// One accepted (or duplicate) batch, as far as collector state is concerned.
pub struct BatchSeen<'a> {
    pub seq: u64,
    pub exchanges: u64,
    pub connections: u64,
    pub duplicate: bool,
    pub info: Option<&'a v1::CollectorInfo>,
}

/// Shared, cheap-to-clone view of every known collector instance.
#[derive(Clone)]
pub struct Collectors {
    inner: Arc<Mutex<HashMap<Arc<str>, Entry>>>,
    idle_ttl: Duration,
}

impl Collectors {
    pub fn new(idle_ttl: Duration) -> Self {
        Collectors {
            inner: Arc::default(),
            idle_ttl,
        }
    }

    /// A stream of `instance` opened; the returned guard marks it closed when dropped.
    pub fn connect(&self, node: &str, instance: &Arc<str>) -> StreamGuard {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let idle_ttl = self.idle_ttl;
        map.retain(|_, e| e.streams > 0 || now.duration_since(e.last_activity) < idle_ttl);
        let e = map
            .entry(instance.clone())
            .or_insert_with(|| Entry::new(node, instance, now));
        e.streams += 1;
        e.status.connected = true;
        e.last_activity = now;
        StreamGuard {
            collectors: self.clone(),
            instance: instance.clone(),
        }
    }

    pub fn record(&self, instance: &Arc<str>, b: BatchSeen<'_>) {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let Some(e) = map.get_mut(instance) else {
            return;
        };
        e.last_activity = now;
        let s = &mut e.status;
        s.last_batch_unix_nanos = unix_nanos_now();
        s.last_batch_seq = s.last_batch_seq.max(b.seq);
        s.batches += 1;
        if b.duplicate {
            s.duplicate_batches += 1;
        } else {
            s.exchanges += b.exchanges;
            s.connections += b.connections;
            e.window_events += b.exchanges + b.connections;
        }
        if let Some(info) = b.info {
            s.drops = info.drops.clone();
            s.tc_backend = info.tc_backend.clone();
            s.interfaces = info.interfaces.clone();
            s.version = info.version.clone();
        }
        e.roll_rate(now);
    }

    /// Snapshot of every known instance, sorted by node then instance.
    pub fn list(&self) -> Vec<v1::CollectorStatus> {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let mut out: Vec<_> = map
            .values_mut()
            .map(|e| {
                e.roll_rate(now);
                if e.streams == 0 || now.duration_since(e.window_start) > 2 * RATE_WINDOW {
                    // No recent batch: the rate of the last full window no longer holds.
                    if now.duration_since(e.last_activity) > RATE_WINDOW {
                        e.status.events_per_second = 0.0;
                    }
                }
                e.status.clone()
            })
            .collect();
        out.sort_by(|a, b| (&a.node_name, &a.instance_id).cmp(&(&b.node_name, &b.instance_id)));
        out
    }

    fn disconnect(&self, instance: &Arc<str>) {
        let mut map = self.inner.lock();
        if let Some(e) = map.get_mut(instance) {
            e.streams = e.streams.saturating_sub(1);
            e.status.connected = e.streams > 0;
            e.last_activity = Instant::now();
        }
    }
}

/// Marks a stream of an instance closed when dropped (also when the stream task panics).
pub struct StreamGuard {
    collectors: Collectors,
    instance: Arc<str>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.collectors.disconnect(&self.instance);
    }
}

fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_connection_batches_and_reported_drops() {
        let c = Collectors::new(Duration::from_secs(60));
        let i: Arc<str> = "inst".into();
        let guard = c.connect("node-a", &i);
        let mut info = v1::CollectorInfo {
            tc_backend: "tcx".into(),
            ..Default::default()
        };
        info.drops.insert("queue_full".into(), 7);
        c.record(
            &i,
            BatchSeen {
                seq: 1,
                exchanges: 10,
                connections: 2,
                duplicate: false,
                info: Some(&info),
            },
        );
        c.record(
            &i,
            BatchSeen {
                seq: 1,
                exchanges: 10,
                connections: 2,
                duplicate: true,
                info: None,
            },
        );
        let s = &c.list()[0];
        assert!(s.connected);
        assert_eq!((s.batches, s.exchanges, s.connections), (2, 10, 2));
        assert_eq!(s.duplicate_batches, 1);
        assert_eq!(s.drops["queue_full"], 7);
        assert_eq!(s.tc_backend, "tcx");
        assert!(s.last_batch_unix_nanos > 0);
        drop(guard);
        assert!(!c.list()[0].connected);
    }
}
