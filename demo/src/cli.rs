//! Command-line flags of `weft-demo`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Whether to export OTLP to a local receiver (rotel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Otlp {
    /// Use rotel when it is installed; run without OTLP export otherwise.
    Auto,
    /// Require rotel: fail when it cannot be found.
    On,
    /// No OTLP export.
    Off,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "weft-demo",
    version,
    about = "A 3-node cluster in network namespaces, a 3-tier app, traced by Weft end to end"
)]
pub struct Cli {
    /// Stop after this long (e.g. `30s`, `2m`); default: run until Ctrl-C.
    #[arg(long, env = "WEFT_DEMO_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Requests per second the client pod sends to the frontend.
    #[arg(long, env = "WEFT_DEMO_RATE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub rate: u32,

    /// Concurrent client connections (1 or 2).
    #[arg(long, env = "WEFT_DEMO_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub concurrency: u32,

    /// OTLP export to a local rotel receiver: `auto`, `on` (required) or `off`.
    #[arg(long, env = "WEFT_DEMO_OTLP", value_enum, default_value_t = Otlp::Auto)]
    pub otlp: Otlp,

    /// Write a JSON summary of the run here at the end (for scripts and tests).
    #[arg(long, env = "WEFT_DEMO_JSON_OUT")]
    pub json_out: Option<PathBuf>,

    /// Copy what the OTLP receiver printed (rotel's debug log) here at the end.
    #[arg(long, env = "WEFT_DEMO_RECEIVER_LOG")]
    pub receiver_log: Option<PathBuf>,

    /// Directory holding weft-collector, weft-stitcher and weft-demo-app
    /// (default: the directory of this binary).
    #[arg(long, env = "WEFT_DEMO_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// The stitcher's `--trace-idle`: a trace is printed this long after its last span
    /// (longer than the stitcher's 1 s join window).
    #[arg(long, env = "WEFT_DEMO_TRACE_IDLE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub trace_idle: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["weft-demo", "--duration", "20s", "--otlp", "on"]).unwrap();
        assert_eq!(cli.duration, Some(Duration::from_secs(20)));
        assert_eq!(cli.otlp, Otlp::On);
        assert_eq!(cli.rate, 2);
        assert!(Cli::try_parse_from(["weft-demo", "--concurrency", "3"]).is_err());
        assert!(Cli::try_parse_from(["weft-demo", "--duration", "soon"]).is_err());
    }
}
