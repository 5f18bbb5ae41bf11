#!/usr/bin/env bash
# Runs `make test` (or the make targets given) inside a Debian 13 (trixie) root made with
# mmdebstrap from Debian's own packages: torch 2.6, Python 3.13, zarr-python 3, LMDB 0.9.31.
#
#   tools/debian13.sh [make targets...]        (default: test)
#   TORCH_LMDB_KEEP_BUILD=1 tools/debian13.sh pytest    (reuse the last run's build/)
#   tools/debian13.sh --root-only              (make the root, run nothing: .ci/run makes it
#                                               while the Debian 12 suite runs)
#
# The root is cached outside the clone, in $TORCH_LMDB_ROOTS (default
# /var/cache/torch_lmdb), under a name keyed by its package list: a second run reuses it,
# a changed list makes a new one. The tree is copied into the root (git's tracked and
# untracked files, not build/), and the same `make` runs there as root.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
TARGETS=("$@"); [ ${#TARGETS[@]} -gt 0 ] || TARGETS=(test)

if [ "$(id -u)" != 0 ]; then echo "tools/debian13.sh: needs root (mmdebstrap, chroot, mounts)" >&2; exit 1; fi
command -v mmdebstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap; }

# The packages of the root: what `make deps` installs, plus make, git and mount(8)
# (the full-disk and read-only tests mount a tmpfs and a read-only bind mount), and
# python3-moto with Flask, whose S3 server the staging tests run (Debian 13 only: Debian 12
# has no moto).
PACKAGES=$(make -s --no-print-directory print-deb-packages) 
PACKAGES="$PACKAGES make git ca-certificates mount python3-moto python3-flask python3-flask-cors"
KEY=$(echo "trixie $PACKAGES" | tr ' ' '\n' | sort -u | sha256sum | cut -c1-12)
ROOTS=${TORCH_LMDB_ROOTS:-/var/cache/torch_lmdb}
ROOT=$ROOTS/debian13-$KEY
mkdir -p "$ROOTS"

# The mirror is the host's (Debian's own archive, as configured for apt here).
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$MIRROR" ] || { echo "tools/debian13.sh: no Debian mirror found in /etc/apt" >&2; exit 1; }

if [ ! -e "$ROOT/.complete" ]; then
  echo "== making the Debian 13 root $ROOT (mirror $MIRROR; about 1 GB, a few minutes)"
  rm -rf "$ROOT.tmp"
  start=$(date +%s)
  mmdebstrap --variant=apt --include="$(echo $PACKAGES | tr ' ' ',')" \
    trixie "$ROOT.tmp" "deb $MIRROR trixie main" \
    "deb $MIRROR trixie-updates main"
  rm -rf "$ROOT"
  mv "$ROOT.tmp" "$ROOT"
  touch "$ROOT/.complete"
  echo "== root made in $(( $(date +%s) - start )) s"
else
  echo "== reusing the Debian 13 root $ROOT"
fi
[ "${TARGETS[*]}" != "--root-only" ] || exit 0

# Mount what the tests need; unmount on every exit.
MOUNTS=()
cleanup() {
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
for m in proc sys dev dev/shm; do
  mkdir -p "$ROOT/$m"
  if [ "$m" = proc ]; then mount -t proc proc "$ROOT/proc"; else mount --bind "/$m" "$ROOT/$m"; fi
  MOUNTS+=("$ROOT/$m")
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# Debian 13's ccache masquerade has gcc/g++ but no cc/c++, the names setup.py's
# compiler (torch's BuildExtension) and CMake use: without them nothing is cached
# and the pip-install test compiles the extension a second time (minutes).
for c in cc c++; do [ -e "$ROOT/usr/lib/ccache/$c" ] || ln -s ../../bin/ccache "$ROOT/usr/lib/ccache/$c"; done

# A fresh copy of the tree; ccache (in the root) persists across runs. TORCH_LMDB_KEEP_BUILD=1
# keeps the previous run's build/ (an incremental build, for iterating on a change).
WORK=/work/torch_lmdb
if [ "${TORCH_LMDB_KEEP_BUILD:-0}" = 1 ] && [ -d "$ROOT$WORK/build" ]; then
  find "$ROOT$WORK" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
else
  rm -rf "$ROOT$WORK"; mkdir -p "$ROOT$WORK"
fi
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp -p --parents -t "$ROOT$WORK")
echo "== make ${TARGETS[*]} inside Debian 13"
start=$(date +%s)
# /usr/lib/ccache first: setup.py's compiler (c++) goes through ccache too, whose cache
# (/root/.ccache in the root) persists across runs. The storms and damage runs (pytest
# marker `storm`) run on the host's Debian 12 only, unless PYTEST_MARK says otherwise
# (PYTEST_MARK= runs every test here too).
chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/lib/ccache:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive CCACHE_DIR=/root/.ccache PYTEST_MARK="${PYTEST_MARK-not storm}" \
  bash -c "cd $WORK && make ${TARGETS[*]}"
echo "== Debian 13: make ${TARGETS[*]} passed in $(( $(date +%s) - start )) s"
