#!/bin/bash
# vccw integration test on real subchannels: an s390x Linux guest under QEMU TCG binds the
# virtio-blk subchannel 0.0.0001 to vfio_ccw, creates an mdev, and drives it with vccw's own
# s390x binary (`vccw mdev probe`, `vccw mdev bench`, `vccw serve --mdev` + `vccw guest`).
#
# Everything heavy is cached outside the checkout, under ${VCCW_CACHE:-/var/cache/vccw}:
# the QEMU 7.2 debs (unpacked, never apt-installed: apt would remove the host's qemu-utils 10),
# busybox-static for s390x, the kernel built from Debian's linux-source-6.1 with VFIO_CCW
# (keyed by the config fragment), and the s390x cargo target dir. Delete a piece to rebuild it.
#
# Usage: ci/s390x-guest/run.sh            (root; Debian 12 x86_64; only Debian mirrors needed)
# Env:   VCCW_CACHE  cache dir            VCCW_BENCH_COUNT  I/Os per bench side (default 200)
#        VCCW_BOOT_TIMEOUT  seconds (600) VCCW_PROFILE  cargo profile for s390x (release)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VCCW_CACHE:-/var/cache/vccw}
W=$CACHE/s390x-guest
BENCH_COUNT=${VCCW_BENCH_COUNT:-200}
BOOT_TIMEOUT=${VCCW_BOOT_TIMEOUT:-600}
PROFILE=${VCCW_PROFILE:-release}
mkdir -p "$W/debs"

T0=$(date +%s)
declare -a TIMINGS=()
step_start() { STEP_NAME=$1; STEP_T=$(date +%s); echo "[$(( STEP_T - T0 ))s] >>> $1"; }
step_end() { local d=$(( $(date +%s) - STEP_T )); TIMINGS+=("$(printf '%-10s %5ss %s' "$STEP_NAME" "$d" "${1:-}")"); }
die() { echo "FAIL: $*" >&2; print_timings; exit 1; }
print_timings() {
  echo "=== timings"
  local t; for t in "${TIMINGS[@]}"; do echo "  $t"; done
  echo "  total      $(( $(date +%s) - T0 ))s"
}

# ------------------------------------------------------------------ host packages
step_start host-pkgs
HOST_PKGS="libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2
  gcc-s390x-linux-gnu libc6-dev-s390x-cross make gcc bc bison flex cpio xz-utils gzip binutils
  rustc-web cargo-web rust-web-src"
missing=""
for p in $HOST_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 $missing >/dev/null \
    || die "apt-get install$missing"
fi
rv=$(dpkg-query -W -f='${Version}' rustc-web); sv=$(dpkg-query -W -f='${Version}' rust-web-src)
[ "$rv" = "$sv" ] || die "rustc-web $rv and rust-web-src $sv differ (-Zbuild-std needs them equal)"
step_end

# ------------------------------------------------------------------ QEMU 7.2 (unpacked debs)
step_start qemu
QEMU_BIN=$W/qemu/usr/bin/qemu-system-s390x
if [ ! -x "$QEMU_BIN" ]; then
  rm -rf "$W/qemu" "$W"/debs/qemu-system-*.deb
  (cd "$W/debs" && apt-get download qemu-system-misc qemu-system-common qemu-system-data >/dev/null) \
    || die "apt-get download qemu-system-*"
  mkdir -p "$W/qemu"
  for d in "$W"/debs/qemu-system-*.deb; do dpkg-deb -x "$d" "$W/qemu"; done
fi
QEMU="$QEMU_BIN -L $W/qemu/usr/share/qemu"
$QEMU --version | head -1 || die "qemu-system-s390x does not run"
step_end

# ------------------------------------------------------------------ s390x busybox (private apt config)
step_start busybox
if [ ! -x "$W/bb/bin/busybox" ]; then
  A=$W/apt
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" && touch "$A/status"
  cat > "$A/apt.conf" <<EOF
APT::Architecture "s390x";
APT::Architectures { "s390x"; };
Dir::State::Lists "$A/lists";
Dir::State::status "$A/status";
Dir::Cache "$A/cache";
Dir::Etc::SourceList "$A/sources.list";
Dir::Etc::SourceParts "/dev/null";
APT::Sandbox::User "root";
EOF
  MAIN_URI=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/debian.sources | sed -n 1p)
  KEY=/usr/share/keyrings/debian-archive-keyring.gpg
  echo "deb [signed-by=$KEY] ${MAIN_URI:-http://deb.debian.org/debian} bookworm main" > "$A/sources.list"
  APT_CONFIG=$A/apt.conf apt-get update >/dev/null || die "apt-get update (s390x)"
  rm -f "$W"/debs/busybox-static_*.deb
  (cd "$W/debs" && APT_CONFIG=$A/apt.conf apt-get download busybox-static >/dev/null) || die "download busybox-static"
  rm -rf "$W/bb" && mkdir -p "$W/bb" && dpkg-deb -x "$W"/debs/busybox-static_*.deb "$W/bb"
fi
step_end

# ------------------------------------------------------------------ kernel with VFIO_CCW
step_start kernel
KEY=$(cat "$HERE/kconfig.fragment" | sha256sum | cut -c1-12)
KOUT=$W/kernel-$KEY
if [ ! -s "$KOUT/bzImage" ] || [ ! -s "$KOUT/modlist" ]; then
  if [ ! -d "$W/src/linux-source-6.1" ]; then
    rm -f "$W"/debs/linux-source-6.1_*.deb
    (cd "$W/debs" && apt-get download linux-source-6.1 >/dev/null) || die "download linux-source-6.1"
    mkdir -p "$W/src"
    dpkg-deb --fsys-tarfile "$W"/debs/linux-source-6.1_*.deb \
      | tar -xO ./usr/src/linux-source-6.1.tar.xz | tar -xJ -C "$W/src" || die "unpack linux-source"
  fi
  rm -rf "$W/kbuild" "$KOUT.tmp" && mkdir -p "$W/kbuild" "$KOUT.tmp"
  KMAKE="make -C $W/src/linux-source-6.1 O=$W/kbuild ARCH=s390 CROSS_COMPILE=s390x-linux-gnu-"
  $KMAKE KCONFIG_ALLCONFIG="$HERE/kconfig.fragment" allnoconfig >/dev/null || die "kernel config"
  for o in $(sed -e 's/=.*//' "$HERE/kconfig.fragment"); do
    grep -qE "^$o=" "$W/kbuild/.config" || die "kernel config: $o not set"
  done
  $KMAKE -j$(( $(nproc) + 1 )) bzImage modules > "$W/kbuild.log" 2>&1 \
    || { tail -30 "$W/kbuild.log"; die "kernel build (log: $W/kbuild.log)"; }
  $KMAKE INSTALL_MOD_PATH="$KOUT.tmp/root" INSTALL_MOD_STRIP=1 modules_install >/dev/null 2>&1 \
    || die "modules_install"
  cp "$W/kbuild/arch/s390/boot/bzImage" "$KOUT.tmp/bzImage"
  mkdir -p "$KOUT.tmp/modules"
  # Load order: vfio core, its type1 IOMMU backend, mdev, then vfio_ccw.
  for m in vfio vfio_iommu_type1 mdev vfio_ccw; do
    f=$(find "$KOUT.tmp/root" -name "$m.ko" | head -1)
    [ -n "$f" ] || die "module $m.ko not built"
    cp "$f" "$KOUT.tmp/modules/" && echo "$m.ko"
  done > "$KOUT.tmp/modlist"
  rm -rf "$KOUT.tmp/root" "$KOUT" && mv "$KOUT.tmp" "$KOUT"
  step_end "built"
else
  step_end "cached ($KOUT)"
fi

# ------------------------------------------------------------------ vccw for s390x (static)
step_start vccw
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_LINKER=s390x-linux-gnu-gcc
export CC_s390x_unknown_linux_gnu=s390x-linux-gnu-gcc
export CARGO_TARGET_DIR=$CACHE/target-s390x
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" /usr/bin/cargo build -q -Zbuild-std \
  --target s390x-unknown-linux-gnu --profile "$PROFILE" --bin vccw) || die "cargo build (s390x)"
PDIR=$PROFILE; [ "$PROFILE" = dev ] && PDIR=debug
VCCW_BIN=$CARGO_TARGET_DIR/s390x-unknown-linux-gnu/$PDIR/vccw
file "$VCCW_BIN" | grep -q "statically linked" || die "vccw is not a static binary: $(file "$VCCW_BIN")"
step_end "$(du -h "$VCCW_BIN" | cut -f1)"

# ------------------------------------------------------------------ initramfs + disk
step_start initramfs
IRD=$W/initramfs
rm -rf "$IRD" && mkdir -p "$IRD/bin" "$IRD/dev" "$IRD/lib/modules"
cp "$W/bb/bin/busybox" "$IRD/bin/"
cp "$VCCW_BIN" "$IRD/bin/vccw"
cp "$HERE/init" "$IRD/init" && chmod +x "$IRD/init"
cp "$KOUT"/modules/*.ko "$IRD/lib/modules/" && cp "$KOUT/modlist" "$IRD/modlist"
(cd "$IRD" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$W/initrd.cpio.gz"
rm -f "$W/disk.img" && truncate -s 16M "$W/disk.img"
step_end "$(du -h "$W/initrd.cpio.gz" | cut -f1)"

# ------------------------------------------------------------------ boot and test
step_start boot+test
LOG=$W/boot.log
set +e
timeout "$BOOT_TIMEOUT" $QEMU -M s390-ccw-virtio -cpu max -m 1024 -smp 1 -nographic -no-reboot \
  -kernel "$KOUT/bzImage" -initrd "$W/initrd.cpio.gz" \
  -append "console=ttysclp0 quiet vccwsch=0.0.0001 vccwbench=$BENCH_COUNT" \
  -drive if=none,id=d0,file="$W/disk.img",format=raw -device virtio-blk-ccw,drive=d0,devno=fe.0.0005 \
  -device virtio-rng-ccw,devno=fe.0.0007 > "$LOG" 2>&1
qrc=$?
set -e
step_end "qemu rc=$qrc"

echo "=== guest output (from /init)"
sed -n '/=== VCCW INIT START/,$p' "$LOG"
[ "$qrc" = 0 ] || die "qemu exited with $qrc (timeout is 124); log: $LOG"
grep -q '=== VCCW INIT END' "$LOG" || die "the guest did not finish its script; log: $LOG"

# ------------------------------------------------------------------ verdict
echo "=== RESULT lines"
grep -E '^RESULT ' "$LOG" | tr -d '\r' || true
fails=$(grep -cE '^RESULT FAIL' "$LOG" || true)
# Each required line, as an extended regex after "RESULT ok ". The disk is 16 MiB: 32768
# sectors; QEMU's virtio-ccw control unit is 3832, model 02 for virtio-blk.
REQUIRED=(
  "open "
  "sense-id cu=3832/02 "
  "read-conf capacity=32768$"
  "midaw capacity=32768 "
  "format0 cu=3832/02 capacity=32768 "
  "hsch "
  "csch "
  "schib devno=0005 "
  "passthrough cu=3832/02 capacity=32768 "
  "bench "
  "guest-virtio capacity=32768$"
  "serve-stop rc=0$"
)
for r in "${REQUIRED[@]}"; do
  tr -d '\r' < "$LOG" | grep -qE "^RESULT ok $r" || { echo "missing: RESULT ok $r"; fails=$((fails + 1)); }
done
print_timings
[ "$fails" = 0 ] || { echo "FAIL: $fails check(s) failed; log: $LOG"; exit 1; }
echo "PASS: vccw drove a real vfio-ccw mdev in an s390x guest"
