#!/usr/bin/env bash
# Build every fuzz target with stable Rust + libFuzzer and run each one for a
# bounded time, then replay the corpus and the regression inputs.
#
#   fuzz/run.sh [seconds-per-target] [target...]      (default: 60, all targets)
#   fuzz/run.sh 0          build and replay the corpus and regressions only
#
# Environment:
#   FUZZ_TARGET_DIR  cargo target dir of the fuzz build (default fuzz/target)
#   FUZZ_JOBS        targets fuzzed at the same time (default 2)
#   FUZZ_KEEP_CORPUS=1  copy inputs found during the run back into
#                    fuzz/corpus/<target>/ (off: CI never changes the tree)
#
# The checked-in seeds (fuzz/corpus/<target>/) are copied to a temporary
# directory; libFuzzer grows that copy, never the repository. Any crash,
# panic, overflow, timeout (-timeout) or memory blow-up (-rss_limit_mb)
# fails the script; the reproducer is kept under
# fuzz/artifacts/<target>/ (ignored by git). See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ_DIR=$PWD

SECS=${1:-60}
shift || true
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=()
    for f in fuzz_targets/*.rs; do
        TARGETS+=("$(basename "$f" .rs)")
    done
fi
JOBS=${FUZZ_JOBS:-2}

# Largest input per target: what the service reads at most.
max_len() {
    case "$1" in
        dhcp_request) echo 4096 ;;     # relay/src/dhcp RECV_BUF
        tftp_request) echo 2048 ;;
        http_path) echo 16384 ;;       # relay/src/http_fast.rs MAX_HEAD
        cloudstack_json) echo 32768 ;;
        config_toml) echo 16384 ;;
        image_manifest) echo 8192 ;;
        admin_object) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$FUZZ_DIR/target}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
# SanitizerCoverage as cargo-fuzz sets it up, on stable rustc. `--target` keeps
# these flags off build scripts and proc macros. No ASan: safe Rust needs none;
# the profile turns on debug assertions and overflow checks.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS

printf '\n==> fuzz: building %d targets (%s)\n' "${#TARGETS[@]}" "$CARGO_TARGET_DIR"
build_start=$(date +%s)
bin_args=()
for t in "${TARGETS[@]}"; do bin_args+=(--bin "$t"); done
cargo build --release --target "$TRIPLE" "${bin_args[@]}"
echo "fuzz: build took $(($(date +%s) - build_start)) s"
BIN_DIR=$CARGO_TARGET_DIR/$TRIPLE/release

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pxemesh-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# libFuzzer options shared by fuzzing and replay: a 10 s input is a hang; a
# process above 2 GiB is a memory blow-up. (-malloc_limit_mb needs a
# sanitizer runtime to be enforced: it counts under cargo +nightly fuzz only.)
LIMITS=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024)

fuzz_one() {
    local t=$1 w=$WORK/$1
    mkdir -p "$w/corpus" "$w/artifacts" "$w/tmp"
    if [ -d "corpus/$t" ]; then cp -r "corpus/$t/." "$w/corpus/"; fi
    if [ "$t" = cloudstack_json ] && command -v python3 >/dev/null; then
        # Recorded answers of a real management server (third-party test data
        # beside the repository, not checked in), when present.
        python3 seeds/make_seeds.py --recorded "$w/corpus" >/dev/null || true
    fi
    local rc=0
    # TMPDIR: the targets' scratch files (sled, boot dirs) go away with $WORK.
    TMPDIR=$w/tmp "$BIN_DIR/$t" "$w/corpus" -max_total_time="$SECS" "${LIMITS[@]}" \
        -max_len="$(max_len "$t")" -print_final_stats=1 \
        -artifact_prefix="$w/artifacts/" >"$w/fuzz.log" 2>&1 || rc=$?
    # A build without coverage instrumentation would "pass" without fuzzing.
    if ! grep -Eq 'Loaded [0-9]+ modules +\([1-9][0-9]* inline 8-bit counters\)' "$w/fuzz.log"; then
        echo "fuzz: $t has no coverage instrumentation" >>"$w/fuzz.log"
        rc=98
    fi
    echo "$rc" >"$w/rc"
}

failed=0
if [ "$SECS" -gt 0 ]; then
    printf '\n==> fuzz: %s s per target, %s at a time\n' "$SECS" "$JOBS"
    running=0
    for t in "${TARGETS[@]}"; do
        fuzz_one "$t" &
        running=$((running + 1))
        if [ "$running" -ge "$JOBS" ]; then
            wait -n || true
            running=$((running - 1))
        fi
    done
    wait || true

    printf '\n%-16s %8s %12s %10s %16s %8s\n' target seconds executions exec/s corpus "result"
    for t in "${TARGETS[@]}"; do
        w=$WORK/$t
        log=$w/fuzz.log
        rc=$(cat "$w/rc" 2>/dev/null || echo 99)
        fstat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
        execs=$(fstat number_of_executed_units)
        rate=$(fstat average_exec_per_sec)
        seeds=$(find "corpus/$t" -type f 2>/dev/null | wc -l)
        grown=$(find "$w/corpus" -type f | wc -l)
        result=ok
        if [ "$rc" != 0 ]; then
            result="CRASH(rc=$rc)"
            failed=1
            mkdir -p "artifacts/$t"
            cp "$w"/artifacts/* "artifacts/$t/" 2>/dev/null || true
        fi
        printf '%-16s %8s %12s %10s %16s %8s\n' "$t" "$SECS" "${execs:-?}" "${rate:-?}" "$seeds->$grown" "$result"
        if [ "$rc" != 0 ]; then
            echo "---- $t: last lines of the libFuzzer log (reproducers in fuzz/artifacts/$t/) ----"
            tail -n 60 "$log"
            echo "----"
        fi
        if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
            mkdir -p "corpus/$t"
            cp -n "$w/corpus/"* "corpus/$t/" 2>/dev/null || true
        fi
    done
fi

printf '\n==> fuzz: replaying the corpus and the regression inputs\n'
for t in "${TARGETS[@]}"; do
    dirs=()
    for d in "corpus/$t" "regressions/$t" "$WORK/$t/corpus"; do
        if [ -d "$d" ] && [ -n "$(ls -A "$d")" ]; then dirs+=("$d"); fi
    done
    [ "${#dirs[@]}" -gt 0 ] || continue
    n=$(find "${dirs[@]}" -type f | wc -l)
    mkdir -p "$WORK/$t/tmp"
    if TMPDIR=$WORK/$t/tmp "$BIN_DIR/$t" -runs=0 "${LIMITS[@]}" -max_len=1048576 \
        -artifact_prefix="$WORK/$t/replay-" "${dirs[@]}" >"$WORK/$t/replay.log" 2>&1; then
        echo "$t: $n inputs replayed, no crash"
    else
        echo "$t: REPLAY FAILED"
        tail -n 40 "$WORK/$t/replay.log"
        failed=1
    fi
done

if [ "$failed" != 0 ]; then
    echo "fuzz: FAILED (see above)" >&2
    exit 1
fi
if [ "$SECS" -gt 0 ]; then
    echo "fuzz: all targets ran ${SECS}s without a crash; corpus and regressions replay clean"
else
    echo "fuzz: corpus and regressions replay clean (no fuzzing: 0 s)"
fi
