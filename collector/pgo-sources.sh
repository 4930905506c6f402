#!/bin/sh
# Prints a fingerprint (SHA-256) of the sources the collector's binary is built from, in the
# workspace at $1 (default: the current directory). `cargo xtask pgo` stores it beside the
# profile it makes (collector/pgo/weft-collector.sources); collector/Dockerfile refuses a
# profile whose fingerprint is not that of the sources it builds: a profile made from other
# sources would silently optimise less (LLVM skips every function whose code changed).
set -eu
cd "${1:-.}"
find Cargo.toml Cargo.lock proto collector-ebpf collector/Cargo.toml collector/build.rs \
    collector/src -type f -print0 \
    | LC_ALL=C sort -z \
    | xargs -0 sha256sum \
    | sha256sum \
    | cut -d' ' -f1
