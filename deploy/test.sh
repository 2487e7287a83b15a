#!/usr/bin/env bash
# The whole pxemesh test suite, from a fresh Debian 12 machine.
#
#   sudo deploy/test.sh
#
# 1. installs the Debian packages the tests use (as root; skipped with a loud
#    warning otherwise),
# 2. checks formatting and lints (cargo fmt --check, clippy -D warnings),
# 3. runs every unit and integration test of the workspace, including the
#    tests that start real multi-process coordinator clusters on loopback,
# 4. fuzzes every parser of network and file input for a bounded time
#    (fuzz/run.sh: libFuzzer on stable Rust, 60 s per target by default,
#    FUZZ_SECONDS to change) and replays the corpus and regression inputs.
#
# Everything binds 127.0.0.1 only; every test bounds its own loops and cleans
# up its processes and temp dirs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the tests need beyond the Rust toolchain (one per line, '#' comments).
PACKAGES_FILE=deploy/test-packages.txt

log() { printf '\n==> %s\n' "$*"; }

install_packages() {
    mapfile -t pkgs < <(grep -v '^\s*#' "$PACKAGES_FILE" | awk 'NF {print $1}')
    if [ "${#pkgs[@]}" -eq 0 ]; then
        return
    fi
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "test packages already installed: ${pkgs[*]}"
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "!!! WARNING: not root; cannot install ${missing[*]}. Tests that need them will fail or skip." >&2
        return
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_packages

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test --workspace"
# Multi-process cluster tests are CPU-light but timing-sensitive; two test
# binaries at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads=2

log "fuzz: every target ${FUZZ_SECONDS:-60}s, then corpus + regression replay"
# Stable Rust + libFuzzer (fuzz/run.sh, docs/fuzzing.md); its own target dir
# (fuzz/target) and a temporary corpus copy, so nothing in the tree changes.
# FUZZ_SECONDS=0 builds and replays only.
bash fuzz/run.sh "${FUZZ_SECONDS:-60}"
