//! The container images cannot be built here (no Docker engine), so these tests keep the two
//! Dockerfiles consistent with what they build from: every workspace member is copied into the
//! build (cargo refuses a workspace with a missing member), the collector's build stage installs
//! the same eBPF toolchain as `cargo xtask setup`, each image builds and runs its own binary,
//! and the ports it exposes are the chart's defaults.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("helm/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The value of a `&str` constant declared on one line of a Rust source (`decl` is what
/// precedes `: &str = `, e.g. `pub const NAME`).
fn str_const(rel: &str, decl: &str) -> String {
    let prefix = format!("{decl}: &str = ");
    read(rel)
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()).map(str::to_owned))
        .map(|v| v.trim_end_matches(';').trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("{rel} declares no {decl}"))
}

/// Dockerfile instructions, continuation lines joined, comments dropped: (KEYWORD, arguments).
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "dangling line continuation");
    out
}

fn args_of<'a>(instructions: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    instructions
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// Top-level directories of the workspace members, from the root Cargo.toml.
fn workspace_member_dirs() -> BTreeSet<String> {
    let manifest = read("Cargo.toml");
    let start = manifest.find("members = [").expect("workspace members") + "members = [".len();
    let end = start + manifest[start..].find(']').expect("end of members");
    manifest[start..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| m.split('/').next().unwrap_or(m).to_string())
        .collect()
}

/// The paths a Dockerfile copies from the build context (not from other stages).
fn context_copies(instructions: &[(String, String)]) -> BTreeSet<String> {
    args_of(instructions, "COPY")
        .into_iter()
        .filter(|a| !a.starts_with("--from"))
        .flat_map(|a| {
            let words: Vec<&str> = a.split_whitespace().collect();
            // Every word but the destination.
            words[..words.len().saturating_sub(1)]
                .iter()
                .map(|w| w.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn chart_default_port(path: &[&str]) -> u16 {
    let values = Value::deserialize(serde_yaml::Deserializer::from_str(&read(
        "helm/weft/values.yaml",
    )))
    .expect("values.yaml parses");
    let port = path.iter().fold(&values, |v, k| &v[*k]);
    port.as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("values.yaml {path:?} is not a port"))
}

struct Image {
    dockerfile: &'static str,
    package: &'static str,
    ports: Vec<u16>,
}

fn images() -> [Image; 2] {
    [
        Image {
            dockerfile: "collector/Dockerfile",
            package: "weft-collector",
            ports: vec![chart_default_port(&["collector", "metricsPort"])],
        },
        Image {
            dockerfile: "stitcher/Dockerfile",
            package: "weft-stitcher",
            ports: vec![
                chart_default_port(&["stitcher", "grpcPort"]),
                chart_default_port(&["stitcher", "metricsPort"]),
            ],
        },
    ]
}

#[test]
fn dockerfiles_copy_the_whole_workspace_but_not_build_output() {
    let members = workspace_member_dirs();
    assert!(members.contains("collector") && members.contains("stitcher"));
    for image in images() {
        let copies = context_copies(&instructions(&read(image.dockerfile)));
        for needed in members
            .iter()
            .map(String::as_str)
            .chain(["Cargo.toml", "Cargo.lock"])
        {
            assert!(
                copies.contains(needed),
                "{} does not copy workspace member or manifest {needed}",
                image.dockerfile
            );
        }
        for never in [".", "target", ".tools"] {
            assert!(
                !copies.contains(never),
                "{} copies {never}",
                image.dockerfile
            );
        }
    }
}

#[test]
fn each_image_is_multi_stage_bookworm_and_runs_its_own_binary() {
    for image in images() {
        let ins = instructions(&read(image.dockerfile));
        let text = read(image.dockerfile);
        let froms = args_of(&ins, "FROM");
        assert!(froms.len() >= 2, "{}: multi-stage", image.dockerfile);
        assert!(
            froms[0].ends_with(" AS build"),
            "{}: first stage is the build",
            image.dockerfile
        );
        assert!(
            text.contains("rust:1.95.0-bookworm") && text.contains("debian:bookworm-slim"),
            "{}: Debian bookworm images",
            image.dockerfile
        );
        let build = format!("cargo build --release --locked -p {}", image.package);
        assert!(
            args_of(&ins, "RUN").iter().any(|r| r.contains(&build)),
            "{}: `{build}`",
            image.dockerfile
        );
        let entrypoint = args_of(&ins, "ENTRYPOINT");
        assert_eq!(
            entrypoint,
            vec![format!("[\"/usr/local/bin/{}\"]", image.package)],
            "{}",
            image.dockerfile
        );
        let exposed: Vec<u16> = args_of(&ins, "EXPOSE")
            .iter()
            .flat_map(|a| a.split_whitespace())
            .map(|p| p.parse().expect("numeric EXPOSE"))
            .collect();
        assert_eq!(
            exposed, image.ports,
            "{}: EXPOSE must match the chart's default ports",
            image.dockerfile
        );
    }
}

#[test]
fn collector_image_installs_the_same_ebpf_toolchain_as_setup() {
    let dockerfile = read("collector/Dockerfile");
    let ins = instructions(&dockerfile);
    let linker_version = str_const("xtask/src/setup.rs", "const BPF_LINKER_VERSION");
    assert!(
        args_of(&ins, "ARG").contains(&format!("BPF_LINKER_VERSION={linker_version}").as_str()),
        "collector/Dockerfile must install bpf-linker {linker_version}, as cargo xtask setup does"
    );
    let runs = args_of(&ins, "RUN").join("\n");
    for needed in [
        "apt-get install -y --no-install-recommends llvm-22-dev",
        "--component rust-src",
        "LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker",
        "--no-default-features --features llvm-22",
        "'LLVM version: 22'",
    ] {
        assert!(
            runs.contains(needed),
            "collector/Dockerfile lacks `{needed}`"
        );
    }
    // collector/build.rs reads WEFT_EBPF_TOOLCHAIN: it must name the nightly installed above.
    let build_rs = read("collector/build.rs");
    assert!(build_rs.contains("WEFT_EBPF_TOOLCHAIN"));
    assert!(
        args_of(&ins, "ENV").contains(&"WEFT_EBPF_TOOLCHAIN=${EBPF_NIGHTLY}"),
        "the kernel crate must build with the installed nightly"
    );
    assert!(runs.contains("rustup toolchain install \"${EBPF_NIGHTLY}\""));
}

#[test]
fn collector_image_builds_with_the_profile_that_xtask_pgo_writes() {
    let dockerfile = read("collector/Dockerfile");
    let runs = args_of(&instructions(&dockerfile), "RUN").join("\n");
    let profile = str_const("xtask/src/pgo.rs", "pub const PROFILE");
    assert!(
        runs.contains(&format!("profile=/src/{profile}"))
            && runs.contains("-Cprofile-use=$profile"),
        "collector/Dockerfile must build with {profile}, which cargo xtask pgo writes"
    );
    // Copied with the collector's sources, never from target/.
    assert!(profile.starts_with("collector/"));
    // The profile is made from a checkout's sources; it never belongs in git.
    assert!(read(".gitignore").lines().any(|l| l == "/collector/pgo/"));
    // A missing profile stops the build with a message that names both ways out.
    assert!(runs.contains("run cargo xtask pgo first, or build with --build-arg PGO=off"));
    // So does a profile of other sources: the build compares the fingerprint that xtask
    // stored with that of the sources it copied, taken by the same script.
    let sources = str_const("xtask/src/pgo.rs", "pub const SOURCES");
    let script = str_const("xtask/src/pgo.rs", "pub const FINGERPRINT");
    assert!(
        runs.contains(&format!("cat /src/{sources}"))
            && runs.contains(&format!("sh /src/{script} /src"))
            && runs.contains("run cargo xtask pgo again, or build with --build-arg PGO=off"),
        "collector/Dockerfile must check {sources} against {script}"
    );
    assert!(sources.starts_with("collector/pgo/") && script.starts_with("collector/"));
}

/// The fingerprint script (`cargo xtask pgo` stores its output, the collector's image build
/// checks it) run on `root`.
fn fingerprint(root: &Path) -> String {
    let script = repo_root().join(str_const("xtask/src/pgo.rs", "pub const FINGERPRINT"));
    let out = std::process::Command::new("sh")
        .arg(&script)
        .arg(root)
        .output()
        .expect("running the fingerprint script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// Copies `rel` (a file or a directory) from the repository into `to`.
fn copy_into(rel: &str, to: &Path) {
    let status = std::process::Command::new("cp")
        .args(["-r", "--parents", rel])
        .arg(to)
        .current_dir(repo_root())
        .status()
        .expect("cp");
    assert!(status.success(), "copying {rel}");
}

#[test]
fn profile_fingerprint_follows_the_collectors_sources_and_nothing_else() {
    let copy = tempfile::tempdir().expect("tempdir");
    for rel in [
        "Cargo.toml",
        "Cargo.lock",
        "proto",
        "collector-ebpf",
        "collector/Cargo.toml",
        "collector/build.rs",
        "collector/src",
    ] {
        copy_into(rel, copy.path());
    }
    let original = fingerprint(&repo_root());
    assert_eq!(original.len(), 64, "{original}");
    // The same sources elsewhere (the image's /src): the same fingerprint.
    assert_eq!(fingerprint(copy.path()), original);
    // Other parts of the workspace do not count.
    std::fs::create_dir_all(copy.path().join("stitcher/src")).expect("mkdir");
    std::fs::write(copy.path().join("stitcher/src/lib.rs"), "// other\n").expect("write");
    std::fs::write(copy.path().join("collector/Dockerfile"), "FROM x\n").expect("write");
    assert_eq!(fingerprint(copy.path()), original);
    // One changed byte of the collector's code does.
    let main = copy.path().join("collector/src/main.rs");
    let mut text = std::fs::read_to_string(&main).expect("read");
    text.push('\n');
    std::fs::write(&main, text).expect("write");
    let changed = fingerprint(copy.path());
    assert_ne!(changed, original);
    // And a new file in the kernel crate.
    std::fs::write(copy.path().join("collector-ebpf/src/extra.rs"), "").expect("write");
    assert_ne!(fingerprint(copy.path()), changed);
}
