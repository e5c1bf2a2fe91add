#!/usr/bin/env bash
# Run the whole vccw test suite big-endian: s390x-unknown-linux-gnu binaries under qemu-user.
#
# Recipe: ../shared/reference/s390x-under-qemu.md. rustup cannot fetch an s390x std here, so
# Debian's rustc (package rustc-web) compiles one from Debian's sources (rust-web-src) with
# -Zbuild-std, which needs RUSTC_BOOTSTRAP=1. Packages are installed by `.ci/run` (stage
# "install"); this script only checks them.
#
# Usage: bash .ci/s390x-test.sh [cargo test arguments: a name filter, --test NAME, ...]
# Env:   VCCW_S390X_CARGO  force the cargo binary (default: Debian's /usr/bin/cargo if it can
#                          read Cargo.lock, else rustup's cargo; see "Which cargo" below)
#        VCCW_S390X_BACKTRACE  RUST_BACKTRACE for the tests (default 0)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=s390x-unknown-linux-gnu
# A target dir of its own: Debian's rustc and -Zbuild-std would otherwise invalidate the native
# build in ./target on every switch.
export CARGO_TARGET_DIR="$PWD/target/s390x"

note() { printf '[s390x %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
    printf '[s390x] ERROR: %s\n' "$*" >&2
    exit 1
}

# --- Toolchain checks: fail early with the fix, not deep inside a build.
for f in /usr/bin/rustc /usr/bin/rustdoc /usr/bin/cargo /usr/bin/s390x-linux-gnu-gcc \
    /usr/bin/qemu-s390x /usr/s390x-linux-gnu/lib/libc.so.6; do
    [ -e "$f" ] || die "$f missing: run 'bash .ci/run' (stage install) or apt-get install -y \
--no-install-recommends rustc-web cargo-web rust-web-src gcc-s390x-linux-gnu libc6-dev-s390x-cross qemu-user"
done
rustc_v=$(dpkg-query -W -f='${Version}' rustc-web)
src_v=$(dpkg-query -W -f='${Version}' rust-web-src)
# -Zbuild-std compiles std from rust-web-src with rustc-web: both must be the same release.
[ "$rustc_v" = "$src_v" ] || die "rustc-web $rustc_v != rust-web-src $src_v"
[ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ] || die "std sources (rust-web-src) missing"
# A foreign s390x dpkg architecture makes the cross ld.so load a mismatched libc:s390x and every
# test binary dies with "stack smashing detected"; the recipe needs none.
if dpkg --print-foreign-architectures | grep -qx s390x; then
    die "dpkg has the s390x foreign architecture: remove it (dpkg --remove-architecture s390x)"
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
# Results must not depend on the caller's environment: symbolizing a backtrace under qemu takes
# seconds, enough to push a test that panics on purpose past its own wait deadlines.
export RUST_BACKTRACE=${VCCW_S390X_BACKTRACE:-0}
export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_LINKER=s390x-linux-gnu-gcc
export CC_s390x_unknown_linux_gnu=s390x-linux-gnu-gcc
# VCCW_UNDER_QEMU=1 tells a test it runs emulated:
# - to avoid what qemu-user cannot emulate (eventfd clones made with F_DUPFD_CLOEXEC lose their
#   byte-order translation: see the recipe), and to widen wall-clock bounds (qemu is ~10x slower);
# - to spawn a binary of this build (e.g. env!("CARGO_BIN_EXE_vccw")) as
#   `qemu-s390x <binary> <args>`: there is no binfmt_misc handler on CI machines, so a direct
#   exec fails (ENOEXEC; glibc then reports exit 126/127). QEMU_LD_PREFIX, inherited by such
#   children, gives them the s390x libc as -L does for the test binary itself.
export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_RUNNER="env VCCW_UNDER_QEMU=1 \
QEMU_LD_PREFIX=/usr/s390x-linux-gnu qemu-s390x -L /usr/s390x-linux-gnu"

# --- Which cargo.
# Debian's cargo (cargo-web) is preferred: the recipe is proven with it, and it runs doctests
# cross-compiled under the runner. It may however be older than the rustup cargo that wrote
# Cargo.lock (a newer lockfile `version = N` is refused by an older cargo). We never rewrite the
# project's lock file for it (--locked everywhere), so if Debian's cargo cannot read it we use
# rustup's own cargo binary instead: it reads any lockfile it wrote, and -Zbuild-std still
# compiles Debian's std because RUSTC/RUSTDOC point at Debian's rustc/rustdoc (cargo finds the
# std sources through `$RUSTC --print sysroot`, i.e. /usr/lib/rustlib/src/rust).
if [ -n "${VCCW_S390X_CARGO:-}" ]; then
    cargo=$VCCW_S390X_CARGO
    note "cargo forced by VCCW_S390X_CARGO: $cargo"
else
    probe_err=$(mktemp)
    trap 'rm -f "$probe_err"' EXIT
    if /usr/bin/cargo metadata --locked --format-version 1 --filter-platform "$target" \
        >/dev/null 2>"$probe_err"; then
        cargo=/usr/bin/cargo
    else
        note "Debian's cargo cannot use Cargo.lock (lockfile $(grep -m1 '^version' Cargo.lock)):"
        sed 's/^/    /' "$probe_err"
        cargo=$(rustup which cargo) || die "no rustup cargo to fall back on"
        note "falling back to rustup's cargo with Debian's rustc"
    fi
fi
note "using $("$cargo" --version), $("$RUSTC" --version), target dir $CARGO_TARGET_DIR"

log=$CARGO_TARGET_DIR/s390x-test.log
mkdir -p "$CARGO_TARGET_DIR"
: >"$log"
# `test` named explicitly: plain -Zbuild-std adds libtest for test targets but not for doctests,
# and the std set is part of every crate's hash, so the doctest pass would otherwise rebuild all
# dependencies a second time.
common=(-Zbuild-std=std,test --target "$target" --locked)

# Every test target: lib, bins, integration tests, examples; then the doctests (cargo cannot mix
# --doc with other target flags). Not the benches: the native stage already runs them once in
# criterion's test mode, and a bench body emulated and unoptimized costs minutes (measured:
# benches/store.rs's ns-per-page summary, 4 x 1,000,000 pins, ran >10 min under qemu) while
# proving nothing the native run does not. Dev-dependencies (criterion, proptest) are still built
# for s390x, as dependencies of the test targets. Arguments to this script replace all of that
# with a single `cargo test` of your own: a name filter, `--test subchannel`, `--lib foo`, ...
rc=0
if [ $# -eq 0 ]; then
    note "cargo test --lib --bins --tests --examples (big-endian, under qemu-s390x)"
    "$cargo" test "${common[@]}" --lib --bins --tests --examples --no-fail-fast 2>&1 |
        tee -a "$log" || rc=$?
    # Doctests run even after a failure, so one CI run reports everything; rc keeps the first.
    note "cargo test --doc (big-endian, under qemu-s390x)"
    "$cargo" test "${common[@]}" --doc 2>&1 | tee -a "$log" || { [ "$rc" -ne 0 ] || rc=$?; }
else
    note "cargo test $* (big-endian, under qemu-s390x)"
    "$cargo" test "${common[@]}" --no-fail-fast "$@" 2>&1 | tee -a "$log" || rc=$?
fi

# One line for the CI log (also on failure): totals over every test binary and the doctests.
awk -v rc="$rc" '/^test result:/ {
        bins++
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed/) p += $(i-1)
            if ($(i) ~ /^failed/) f += $(i-1)
            if ($(i) ~ /^ignored/) ig += $(i-1)
        }
    }
    END {
        printf "s390x test summary: %d passed, %d failed, %d ignored (%d test binaries/doctest runs)%s\n",
            p, f, ig, bins, (rc == 0 ? "" : ", cargo exit " rc)
    }' "$log"
exit "$rc"
