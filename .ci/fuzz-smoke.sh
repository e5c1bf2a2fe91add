#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in fuzz/ and runs each for
# ${FUZZ_SECONDS:-60} seconds from the committed seeds (fuzz/seeds/<target>), in a temporary
# corpus so the repository is not modified. Fails on any crash, leak, timeout or OOM and
# prints the executions and coverage per target. See docs/reliability.md, "Fuzzing".
#
# Environment: FUZZ_SECONDS (per target, default 60), FUZZ_TARGETS (space-separated subset),
# FUZZ_SANITIZER (none|address, default none: the invariants are assertions, not ASan).
set -euo pipefail

cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    # About 3.5 minutes on a shared 2-core machine.
    echo "fuzz-smoke: installing cargo-fuzz"
    start=$(date +%s)
    cargo install cargo-fuzz --locked
    echo "fuzz-smoke: cargo-fuzz installed in $(($(date +%s) - start)) s"
fi

cargo fuzz build --sanitizer "$sanitizer"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
failed=()
printf '%-18s %10s %8s %8s %s\n' target execs exec/s cov result >"$work/summary"
for t in $targets; do
    corpus="$work/corpus-$t"
    mkdir -p "$corpus" "$work/artifacts-$t"
    if [ -d "fuzz/seeds/$t" ]; then
        cp fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    echo "fuzz-smoke: $t for ${secs}s"
    rc=0
    cargo fuzz run --sanitizer "$sanitizer" "$t" "$corpus" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$work/artifacts-$t/" >"$work/log-$t" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log-$t" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/log-$t" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$work/log-$t" | tail -1 | cut -d' ' -f2)
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        res="FAILED (exit $rc)"
        echo "---- $t log (tail) ----"
        tail -60 "$work/log-$t"
        for a in "$work/artifacts-$t"/*; do
            [ -e "$a" ] || continue
            echo "crash input ($a), base64:"
            base64 -w 0 "$a"
            echo
        done
    else
        res=ok
    fi
    printf '%-18s %10s %8s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$res" \
        >>"$work/summary"
done
cat "$work/summary"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz-smoke: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz-smoke: all targets ran ${secs}s without a crash"
