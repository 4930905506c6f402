//! Exchanges handed back once printed or queued for shipping, so that the next ones are
//! written into their buffers instead of allocating new ones.
//!
//! In: Exchanges that the pipeline is done with: after printing, and once the shipper has
//! queued their encoding (or discarded them, local-only). Out: spare Exchanges with the
//! next requests written into them ([`Spares::with_request`]).
//!
//! Why: an Exchange owns about six heap buffers (method, path, host, interface, two
//! addresses). Allocating and freeing them was about a sixth of the collector's CPU per
//! request at a saturating load. An Exchange comes back microseconds after it was
//! written, its buffers still in cache. Every field of a spare is written again before it
//! leaves (the response's writer names every field, so a field added to the proto does
//! not compile until it is handled): nothing of an earlier Exchange can leak into a later
//! one.
//!
//! Bounded: beyond [`MAX_SPARES`] a handed-back Exchange is freed, and a spare whose
//! buffers grew large (a long path) is freed rather than kept.

use weft_proto::v1::{Endpoint, Exchange};

use super::http::RequestHead;

/// Spares kept at most: a 5 ms read at ~100k requests/s completes ~1,000 exchanges.
pub const MAX_SPARES: usize = 2048;

/// Buffers larger than this are not kept (a spare then holds at most a few KiB).
const MAX_KEPT_CAPACITY: usize = 1024;

#[derive(Default)]
pub struct Spares {
    /// Boxed, so that an Exchange (about 300 bytes) moves through the pending queue, the
    /// shipper and back as a pointer: moved by value, it cost more copying than the
    /// allocations saved.
    #[allow(clippy::vec_box)]
    free: Vec<Box<Exchange>>,
}

impl Spares {
    /// A spare Exchange with `head` written into it (see [`write_request`]); a new one
    /// when none is left.
    pub fn with_request(&mut self, head: &RequestHead<'_>) -> Box<Exchange> {
        let mut ex = self.free.pop().unwrap_or_default();
        write_request(&mut ex, head);
        ex
    }

    /// Keeps `ex` for reuse, within the bounds.
    pub fn give(&mut self, ex: Box<Exchange>) {
        if self.free.len() < MAX_SPARES && !oversized(&ex) {
            self.free.push(ex);
        }
    }

    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.free.len()
    }
}

fn oversized(ex: &Exchange) -> bool {
    [
        &ex.method,
        &ex.path,
        &ex.traceparent,
        &ex.tracestate,
        &ex.host,
        &ex.request_id,
        &ex.interface,
    ]
    .iter()
    .any(|s| s.capacity() > MAX_KEPT_CAPACITY)
}

/// Writes a pending request's fields into a spare. The spare's other fields still hold
/// its earlier Exchange until the response overwrites every one of them
/// (`Parser::exchange`, which names each field); a pending request is never emitted
/// otherwise.
fn write_request(ex: &mut Exchange, head: &RequestHead<'_>) {
    ex.method.clear();
    ex.method.push_str(head.method);
    head.path.write_to(&mut ex.path);
    let h = &head.headers;
    h.traceparent.write_to(&mut ex.traceparent);
    h.tracestate.write_to(&mut ex.tracestate);
    h.host.write_to(&mut ex.host);
    h.request_id.write_to(&mut ex.request_id);
}

/// `slot` = the endpoint, written into the buffer it already has.
pub fn write_endpoint(slot: &mut Option<Endpoint>, ip: &[u8], port: u16) {
    let e = slot.get_or_insert_with(Endpoint::default);
    e.ip.clear();
    e.ip.extend_from_slice(ip);
    e.port = u32::from(port);
}
