//! The Helm chart of Weft lives in `helm/weft/`; this crate only carries its tests
//! (`helm/tests/chart.rs`), which render the chart with the real `helm` and validate the output.
//! Install the tools they run with `helm/install-tools.sh`.
