//! `cargo xtask <command>`: Weft's entry points for a fresh Debian machine (as root).
//!
//! - `setup`: install every prerequisite, idempotently, saying what it installs.
//! - `test`:  setup, then formatting, lints, build, every test, and the `pgo` build.
//! - `demo`:  setup, then the demo (a small cluster in network namespaces, traced).
//! - `bench`: setup, then the benchmarks (figures printed and written as JSON), with the
//!   profile-guided collector (`pgo`; `--no-pgo` measures the plain release build).
//! - `pgo`:   setup, then the collector's profile-guided build (see [`pgo`]).
//!
//! std only, so it builds before anything else is installed.

mod pgo;
mod setup;

use std::env;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r.to_vec()),
        None => ("help", Vec::new()),
    };
    let result = match cmd {
        "setup" => setup::all(),
        "test" => setup::all().and_then(|_| test(&rest)),
        "demo" => setup::all().and_then(|_| demo(&rest)),
        "bench" => setup::all().and_then(|_| bench(&rest)),
        "pgo" => setup::all().and_then(|_| pgo_only()),
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

const HELP: &str = "usage: cargo xtask <setup|test|demo|bench|pgo> [args]

  setup          install prerequisites (Debian packages, nightly rust-src, bpf-linker,
                 grpcurl, helm, kubernetes-validate, rotel); idempotent
  test           setup + cargo fmt --check + clippy -D warnings + build + all tests +
                 the collector's profile-guided build
  demo [ARGS]    setup + the demo: a 3-node cluster in network namespaces, traced
                 (ARGS go to weft-demo, e.g. --duration 30s)
  bench [ARGS]   setup + benchmarks (table on stdout, JSON report in target/bench/), with
                 the profile-guided collector (--no-pgo: the plain release build)
  pgo            setup + the collector's profile-guided build: target/pgo/bin/";

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, echoing it; an error names the command.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    cmd.current_dir(root());
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start `{}`: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", describe(cmd)))
    }
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", setup::tool_path());
    c
}

fn test(args: &[String]) -> Result<(), String> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // One build of everything (debug, all targets) that the test run reuses: nextest's build
    // is then fresh, and e2e tests take other packages' binaries from it
    // (weft_harness::binaries) instead of building them with other feature unification.
    run(cargo().args(["build", "--all-targets"]))?;
    let mut nextest = cargo();
    nextest.args(["nextest", "run", "--no-fail-fast"]);
    nextest.args(args);
    run(&mut nextest)?;
    // The profile-guided build that `bench` measures and the collector image ships: shown to
    // work here (instrumented build, training in a harness cluster, profile, final build),
    // with the debug tools just built driving the training.
    pgo::build(&root().join("target/debug")).map(|_| ())
}

fn demo(args: &[String]) -> Result<(), String> {
    let bin = release_bins()?.join("weft-demo");
    if !bin.exists() {
        return Err("weft-demo was not built (demo crate)".into());
    }
    let mut c = Command::new(&bin);
    c.args(args)
        .env("PATH", setup::tool_path())
        .current_dir(root());
    eprintln!("xtask: $ {}", describe(&c));
    // Become the demo, so that Ctrl-C reaches only it and the shell prompt returns
    // only after it has torn the cluster down.
    let err = c.exec();
    Err(format!("cannot start {}: {err}", bin.display()))
}

fn bench(args: &[String]) -> Result<(), String> {
    let release = release_bins()?;
    let bin = release.join("weft-bench");
    if !bin.exists() {
        return Err("weft-bench was not built".into());
    }
    let no_pgo = args.iter().any(|a| a == "--no-pgo");
    let mut c = Command::new(bin);
    if !no_pgo {
        // The collector that production images ship (collector/Dockerfile) is this build.
        c.arg("--bin-dir").arg(pgo::build(&release)?);
    }
    c.args(args.iter().filter(|a| *a != "--no-pgo"))
        .env("PATH", setup::tool_path());
    run(&mut c)
}

/// `cargo xtask pgo`: the release binaries, then the profile-guided collector.
fn pgo_only() -> Result<(), String> {
    pgo::build(&release_bins()?).map(|_| ())
}

/// Builds every binary in release; returns where they are.
fn release_bins() -> Result<PathBuf, String> {
    run(cargo().args(["build", "--release", "--bins"]))?;
    Ok(root().join("target/release"))
}
