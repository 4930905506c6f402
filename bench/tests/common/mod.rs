//! What the benchmark's integration tests share.

use std::path::PathBuf;

/// The directory holding the workspace's debug `weft-collector` and `weft-demo-app`, for
/// `weft-bench --bin-dir`.
pub fn bin_dir() -> PathBuf {
    let collector = weft_harness::binaries::path("weft-collector").expect("weft-collector");
    let demo = weft_harness::binaries::path("weft-demo-app").expect("weft-demo-app");
    let dir = collector.parent().expect("bin dir").to_path_buf();
    assert_eq!(
        demo.parent(),
        Some(dir.as_path()),
        "binaries in one directory"
    );
    dir
}
