//! gRPC shipper to the stitcher: `Exchange`/`Connection` in, acknowledged `EventBatch`es out. (Owned by the ship engineer; stub until it lands.)
