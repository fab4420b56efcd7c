#!/usr/bin/env bash
# Builds the kind=qemu guest from Debian packages, at setup time:
#   $OUT/vmlinuz      the kernel of linux-image-cloud-amd64 (the package is
#                     fetched with `apt-get download` and unpacked with
#                     `dpkg-deb -x` in a scratch folder: nothing is installed,
#                     /boot is not touched)
#   $OUT/initrd.img   a gzip'ed newc cpio: busybox (from busybox-static), the
#                     virtio network modules of that kernel and their
#                     dependencies (/etc/modules, in load order) and /init
#                     (deploy/guest/init: network from ip=, mvpc.check=…,
#                     mvpc.listen=…)
#   $OUT/kernel.version  "<package> <version>" the kernel came from
#   $OUT/modules/     the modules the initramfs takes, and their load order
# OUT is $MICROVPC_GUEST_DIR, default /var/cache/microvpc/guest.
#
# Idempotent: when both outputs exist, are newer than this script, the init
# and busybox, and the kernel package's candidate version (from the local apt
# lists; no network) is the one they were built from, it prints the paths and
# does nothing else. Concurrent runs serialize on $OUT/.lock.
#   bash deploy/guest/build.sh            build if needed; print kernel=… initrd=…
#   bash deploy/guest/build.sh --force    rebuild
# Needs: apt-get (with lists: `apt-get update`), dpkg-deb, cpio, gzip,
# modinfo (kmod), flock (util-linux), busybox-static.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${MICROVPC_GUEST_DIR:-/var/cache/microvpc/guest}"
META_PKG="${MICROVPC_GUEST_KERNEL_PACKAGE:-linux-image-cloud-amd64}"
INIT="$HERE/init"
FORCE=""
[ "${1:-}" = "--force" ] && FORCE=1
# What the guest needs to reach its NIC: virtio-net over PCI (QEMU) and over
# MMIO (Firecracker). Their dependencies are added from the modules' own
# metadata, in load order.
ROOT_MODULES=(virtio_net virtio_pci virtio_mmio)

die() { echo "guest build: $*" >&2; exit 1; }
for t in apt-get apt-cache dpkg-deb cpio gzip modinfo flock find sort; do
  command -v "$t" >/dev/null || die "missing $t: install deploy/packages.txt (apt-get install cpio kmod util-linux)"
done
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || die "missing busybox: apt-get install busybox-static"
BUSYBOX="$(readlink -f "$BUSYBOX")"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: apt-get install busybox-static (the initramfs has no libc)"
fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock -w 600 9 || die "another build holds $OUT/.lock"

# The real image package the metapackage points at, and its candidate version.
resolve_kernel() {
  local dep
  dep="$(apt-cache depends "$META_PKG" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
  [ -n "$dep" ] || return 1
  local ver
  ver="$(apt-cache policy "$dep" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')"
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || return 1
  echo "$dep $ver"
}
WANT="$(resolve_kernel || true)"

kernel_ok() {
  [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/modules/order" ] && [ -s "$OUT/kernel.version" ] || return 1
  # No apt lists (WANT empty): keep what was built.
  [ -z "$WANT" ] || [ "$(cat "$OUT/kernel.version")" = "$WANT" ]
}
initrd_ok() {
  [ -s "$OUT/initrd.img" ] || return 1
  for i in "$HERE/build.sh" "$INIT" "$BUSYBOX" "$OUT/modules/order"; do
    [ "$OUT/initrd.img" -nt "$i" ] || return 1
  done
}

if [ -z "$FORCE" ] && kernel_ok && initrd_ok; then
  echo "guest build: up to date ($(cat "$OUT/kernel.version"))" >&2
  echo "kernel=$OUT/vmlinuz initrd=$OUT/initrd.img"
  exit 0
fi
WORK="$(mktemp -d "$OUT/.build.XXXXXX")"
chmod 0755 "$WORK"
trap 'rm -rf "$WORK"' EXIT

if [ -n "$FORCE" ] || ! kernel_ok; then
  [ -n "$WANT" ] || die "cannot resolve $META_PKG from the apt lists: run 'apt-get update' first"
  read -r KPKG KVER <<<"$WANT"
  echo "guest build: kernel $KPKG $KVER into $OUT" >&2
  # 1. The kernel package, unpacked in the scratch folder. apt-get download
  #    writes into the current folder, as the _apt user where it can.
  mkdir -p "$WORK/deb"
  chmod 0777 "$WORK/deb"
  (cd "$WORK/deb" && apt-get download -q=2 "$KPKG=$KVER") || die "apt-get download $KPKG=$KVER failed"
  DEB="$(find "$WORK/deb" -maxdepth 1 -name '*.deb' | head -n 1)"
  [ -n "$DEB" ] || die "apt-get download left no .deb"
  dpkg-deb -x "$DEB" "$WORK/k"
  VMLINUZ="$(find "$WORK/k/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)"
  [ -n "$VMLINUZ" ] || die "$KPKG has no /boot/vmlinuz-*"
  KMODS="$(find "$WORK/k/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
  [ -n "$KMODS" ] || die "$KPKG has no /lib/modules"

  # 2. Modules: each root and, before it, its dependencies (depth first),
  #    from the modules' own metadata (there is no modules.dep: depmod runs
  #    at install, and nothing is installed).
  declare -A KO=() SEEN=()
  while IFS= read -r f; do
    n="$(basename "$f" .ko)"
    KO["${n//-/_}"]="$f"
  done < <(find "$KMODS" -name '*.ko')
  ORDER=()
  visit() {
    local m="${1//-/_}" deps d
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    [ -n "${KO[$m]:-}" ] || die "module $m is not in $KPKG (built in? then drop it from ROOT_MODULES)"
    deps="$(modinfo -F depends "${KO[$m]}")"
    for d in ${deps//,/ }; do visit "$d"; done
    ORDER+=("$m")
  }
  for m in "${ROOT_MODULES[@]}"; do visit "$m"; done
  mkdir -p "$WORK/modules"
  for m in "${ORDER[@]}"; do cp "${KO[$m]}" "$WORK/modules/$m.ko"; done
  printf '%s\n' "${ORDER[@]}" >"$WORK/modules/order"
  cp "$VMLINUZ" "$WORK/vmlinuz"
  rm -rf "$WORK/k" "$WORK/deb"
  # Publish the kernel half: the version file last (kernel_ok reads it).
  rm -f "$OUT/kernel.version"
  rm -rf "$OUT/modules"
  mv "$WORK/modules" "$OUT/modules"
  mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
  echo "$KPKG $KVER" >"$OUT/kernel.version"
  echo "guest build: modules $(tr '\n' ' ' <"$OUT/modules/order")" >&2
fi

# 3. The initramfs tree.
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,www,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
install -m 0755 "$INIT" "$R/init"
while IFS= read -r m; do
  [ -n "$m" ] && cp "$OUT/modules/$m.ko" "$R/lib/modules/$m.ko"
done <"$OUT/modules/order"
cp "$OUT/modules/order" "$R/etc/modules"
# /dev/console also comes from the kernel's built-in initramfs; this copy
# makes the image complete on its own where mknod is allowed.
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || true
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 --reproducible) | gzip -9 -n >"$WORK/initrd.img"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
echo "kernel=$OUT/vmlinuz initrd=$OUT/initrd.img"
