#!/usr/bin/env bash
# By hand only (minutes, downloads a Debian 13 base system; NOT part of CI): the release .debs install,
# import and remove cleanly on Debian 13 (trixie, Python 3.13), in a fresh debootstrap chroot. Run as root:
#
#   bash packaging/check-trixie-chroot.sh [DIST_DIR] [CHROOT_DIR]
#
# DIST_DIR defaults to the checkout's dist/ (packaging/build.sh); CHROOT_DIR to a new temp dir, removed
# afterwards (an existing one is reused and kept). Needs debootstrap (apt-get install debootstrap).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dist=$(realpath "${1:-$repo/dist}")
root=${2:-}
mirror=${PYSHIM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keep=1
step() { printf '== %s\n' "$*"; }
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
pyshim_deb=$(ls "$dist"/pyshim_*_amd64.deb)
criu_deb=$(ls "$dist"/pyshim-criu_*_amd64.deb)
if [[ -z $root ]]; then
    root=$(mktemp -d /var/tmp/pyshim-trixie.XXXXXX)
    keep=0
fi
cleanup() {
    umount "$root/proc" 2>/dev/null || true
    ((keep)) || rm -rf "$root"
}
trap cleanup EXIT
if [[ ! -x $root/usr/bin/apt-get ]]; then
    step "debootstrap trixie into $root"
    start=$SECONDS
    debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
        { tail -n 20 "$root.debootstrap.log" >&2; exit 1; }
    echo "debootstrap: $((SECONDS - start))s"
fi
mount -t proc proc "$root/proc"
cp "$pyshim_deb" "$criu_deb" "$root/tmp/"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
step "Debian $(cat "$root/etc/debian_version"), $(in_root python3 --version 2>/dev/null || echo 'no python3 yet')"
in_root apt-get -q update >/dev/null
start=$SECONDS
step "apt install ./$(basename "$pyshim_deb") ./$(basename "$criu_deb")"
in_root apt-get -q -y install --no-install-recommends "/tmp/$(basename "$pyshim_deb")" "/tmp/$(basename "$criu_deb")" | tail -n 3
echo "install: $((SECONDS - start))s; $(in_root python3 --version)"
step "the installed shim and its imports"
in_root containerd-shim-pyshim-v2 -v
in_root /usr/bin/python3 -IS -c '
import sys
sys.path[1:1] = ["/usr/lib/pyshim/site", "/usr/lib/pyshim/pycriu"]
import importlib, pkgutil, shim, google.protobuf, pyroute2, pycriu.rpc_pb2, pycriu.images
names = [i.name for i in pkgutil.walk_packages(shim.__path__, "shim.")]
for name in names:
    importlib.import_module(name)
print(len(names) + 1, "shim modules,", "protobuf", google.protobuf.__version__, google.protobuf.__file__, "pyroute2", pyroute2.__version__)'
in_root criu --version | head -n 1
files=$(in_root dpkg -L pyshim | wc -l)
step "apt remove pyshim"
listed=$(in_root dpkg -L pyshim)
in_root apt-get -q -y remove pyshim | tail -n 1
left=$(while IFS= read -r p; do if [[ $p != /. && ( -f $root$p || -L $root$p ) ]]; then echo "$p"; fi; done <<<"$listed")
leftdirs=$(for d in /usr/lib/pyshim /usr/share/pyshim /usr/share/doc/pyshim; do if [[ -e $root$d ]]; then echo "$d"; fi; done)
if [[ -n $left$leftdirs ]]; then
    echo "FAILED: left behind:"$'\n'"$left$leftdirs" >&2
    exit 1
fi
echo "removed: $files paths listed before, no file or pyshim directory left"
step "reinstall"
in_root apt-get -q -y install --no-install-recommends "/tmp/$(basename "$pyshim_deb")" | tail -n 1
in_root containerd-shim-pyshim-v2 -v | head -n 2
echo "trixie check: ok"
