//! The stitcher's Query API, from the host.
//!
//! In: the cluster (to enter its control namespace) and the stitcher's address there. Out:
//! `weft.v1.Query` answers. The stitcher listens inside the control namespace, so every call
//! runs on a thread that entered it, with its own small runtime; sockets belong to the
//! namespace of the thread that creates them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use weft_harness::Cluster;
use weft_proto::v1::query_client::QueryClient;
use weft_proto::v1::{
    ListCollectorsRequest, ListCollectorsResponse, ListTracesRequest, ListTracesResponse,
    ServiceMapRequest, ServiceMapResponse, StatsRequest, StatsResponse,
};

/// Deadline of one call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A way to reach the stitcher's Query API.
pub struct Query<'a> {
    cluster: &'a Cluster,
    addr: SocketAddr,
}

impl<'a> Query<'a> {
    pub fn new(cluster: &'a Cluster, addr: SocketAddr) -> Query<'a> {
        Query { cluster, addr }
    }

    pub fn service_map(&self, window_seconds: u64) -> Result<ServiceMapResponse> {
        self.call(
            move |mut c| async move { c.service_map(ServiceMapRequest { window_seconds }).await },
        )
    }

    pub fn list_traces(&self, limit: u32) -> Result<ListTracesResponse> {
        self.call(move |mut c| async move {
            c.list_traces(ListTracesRequest {
                limit,
                ..Default::default()
            })
            .await
        })
    }

    pub fn list_collectors(&self) -> Result<ListCollectorsResponse> {
        self.call(|mut c| async move { c.list_collectors(ListCollectorsRequest {}).await })
    }

    pub fn stats(&self) -> Result<StatsResponse> {
        self.call(|mut c| async move { c.stats(StatsRequest {}).await })
    }

    /// Connects and makes one call inside the control namespace.
    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(QueryClient<tonic::transport::Channel>) -> Fut + Send,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let url = format!("http://{}", self.addr);
        let netns = self.cluster.control_netns();
        self.cluster
            .try_run_in(netns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a runtime for the Query call")?;
                rt.block_on(async move {
                    let call = async {
                        let client = QueryClient::connect(url.clone())
                            .await
                            .with_context(|| format!("connecting to the stitcher at {url}"))?;
                        let resp = f(client).await.context("Query call")?;
                        anyhow::Ok(resp.into_inner())
                    };
                    tokio::time::timeout(CALL_TIMEOUT, call)
                        .await
                        .context("Query call timed out")?
                })
            })
            .with_context(|| format!("entering {netns}"))?
    }
}
