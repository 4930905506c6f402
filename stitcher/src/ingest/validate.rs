//! Structural checks of an incoming `EventBatch`.
//!
//! In: a decoded batch (and the identity the stream started with). Out: `Ok` or the
//! reason it is malformed, which the stream returns as `INVALID_ARGUMENT`. Nothing here
//! trusts the collector: every field the later stages index or convert is checked once.

use std::fmt;

use weft_proto::v1;

/// Longest node name or instance id accepted (Kubernetes node names are ≤ 253).
const MAX_ID_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn invalid(msg: impl Into<String>) -> Result<(), Invalid> {
    Err(Invalid(msg.into()))
}

/// Checks one batch. `stream_identity` is `(node, instance)` of the stream's first batch:
/// a stream belongs to one collector instance.
pub fn batch(b: &v1::EventBatch, stream_identity: Option<(&str, &str)>) -> Result<(), Invalid> {
    identity("node_name", &b.node_name)?;
    identity("instance_id", &b.instance_id)?;
    if b.seq == 0 {
        return invalid("seq must start at 1");
    }
    if b.low_water_seq > b.seq {
        return invalid(format!(
            "low_water_seq {} is above the batch's seq {}",
            b.low_water_seq, b.seq
        ));
    }
    if let Some((node, instance)) = stream_identity
        && (node != b.node_name || instance != b.instance_id)
    {
        return invalid(format!(
            "stream started as {node}/{instance} but carries a batch of {}/{}",
            b.node_name, b.instance_id
        ));
    }
    for (i, x) in b.exchanges.iter().enumerate() {
        exchange(x).map_err(|e| Invalid(format!("exchange {i} (id {}): {e}", x.id)))?;
    }
    for (i, c) in b.connections.iter().enumerate() {
        connection(c).map_err(|e| Invalid(format!("connection {i}: {e}")))?;
    }
    Ok(())
}

fn identity(field: &str, v: &str) -> Result<(), Invalid> {
    if v.is_empty() {
        return invalid(format!("{field} is empty"));
    }
    if v.len() > MAX_ID_LEN {
        return invalid(format!("{field} is longer than {MAX_ID_LEN} bytes"));
    }
    Ok(())
}

fn exchange(x: &v1::Exchange) -> Result<(), Invalid> {
    match v1::Side::try_from(x.side) {
        Ok(v1::Side::Client | v1::Side::Server) => {}
        _ => return invalid(format!("side {} is not CLIENT or SERVER", x.side)),
    }
    endpoint("client", x.client.as_ref())?;
    endpoint("server", x.server.as_ref())?;
    if x.start_unix_nanos == 0 {
        return invalid("start_unix_nanos is 0");
    }
    if x.end_unix_nanos < x.start_unix_nanos {
        return invalid("end_unix_nanos is before start_unix_nanos");
    }
    if x.status > 999 {
        return invalid(format!("status {} is not an HTTP status", x.status));
    }
    Ok(())
}

fn connection(c: &v1::Connection) -> Result<(), Invalid> {
    match v1::connection::Event::try_from(c.event) {
        Ok(v1::connection::Event::Unspecified) | Err(_) => {
            return invalid(format!("event {} is not a known event", c.event));
        }
        Ok(_) => {}
    }
    endpoint("local", c.local.as_ref())?;
    endpoint("remote", c.remote.as_ref())
}

fn endpoint(which: &str, e: Option<&v1::Endpoint>) -> Result<(), Invalid> {
    let Some(e) = e else {
        return invalid(format!("{which} endpoint is missing"));
    };
    if e.ip.len() != 4 && e.ip.len() != 16 {
        return invalid(format!(
            "{which} ip has {} bytes (want 4 or 16)",
            e.ip.len()
        ));
    }
    if e.port > u32::from(u16::MAX) {
        return invalid(format!("{which} port {} is above 65535", e.port));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &[u8], port: u32) -> Option<v1::Endpoint> {
        Some(v1::Endpoint {
            ip: ip.to_vec(),
            port,
        })
    }

    fn good() -> v1::EventBatch {
        v1::EventBatch {
            node_name: "node-a".into(),
            instance_id: "i-1".into(),
            seq: 1,
            exchanges: vec![v1::Exchange {
                id: 1,
                side: v1::Side::Client as i32,
                client: ep(&[10, 0, 0, 1], 40000),
                server: ep(&[10, 0, 0, 2], 80),
                start_unix_nanos: 10,
                end_unix_nanos: 20,
                status: 200,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_well_formed_batch() {
        assert_eq!(batch(&good(), None), Ok(()));
        assert_eq!(batch(&good(), Some(("node-a", "i-1"))), Ok(()));
    }

    #[test]
    fn rejects_each_inconsistency() {
        type Mutation = Box<dyn Fn(&mut v1::EventBatch)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("node_name is empty", Box::new(|b| b.node_name.clear())),
            ("instance_id is empty", Box::new(|b| b.instance_id.clear())),
            ("seq must start", Box::new(|b| b.seq = 0)),
            ("low_water_seq", Box::new(|b| b.low_water_seq = 5)),
            (
                "side 0",
                Box::new(|b| b.exchanges[0].side = v1::Side::Unspecified as i32),
            ),
            (
                "client ip has 3 bytes",
                Box::new(|b| b.exchanges[0].client = ep(&[1, 2, 3], 1)),
            ),
            (
                "server endpoint is missing",
                Box::new(|b| b.exchanges[0].server = None),
            ),
            (
                "port 70000",
                Box::new(|b| b.exchanges[0].client = ep(&[1, 2, 3, 4], 70000)),
            ),
            (
                "before start",
                Box::new(|b| b.exchanges[0].end_unix_nanos = 5),
            ),
            (
                "event 0",
                Box::new(|b| b.connections.push(v1::Connection::default())),
            ),
        ];
        for (want, mutate) in cases {
            let mut b = good();
            mutate(&mut b);
            let err = batch(&b, None).expect_err(want);
            assert!(err.0.contains(want), "{want:?} not in {err}");
        }
        let err = batch(&good(), Some(("node-b", "i-1"))).unwrap_err();
        assert!(err.0.contains("stream started as node-b/i-1"), "{err}");
    }
}
