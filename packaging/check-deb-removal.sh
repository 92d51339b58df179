#!/usr/bin/env bash
# Checks that the installed pyshim package removes cleanly and reinstalls, run as root:
#
#   bash packaging/check-deb-removal.sh dist/pyshim_<version>_amd64.deb
#
# `apt-get remove pyshim` must leave none of the package's files or directories behind (dpkg -L before
# the removal lists them; directories other packages share, like /usr/bin, do not count), nor the
# bytecode its postinst compiled; then `apt-get install` of the .deb must bring every file back.
# It ends with the package installed (the test suite runs against it) and fails loudly otherwise.
set -euo pipefail

deb=$(realpath "${1:?usage: check-deb-removal.sh PYSHIM_DEB}")
pkg=pyshim
started=$SECONDS
fail() {
    printf 'check-deb-removal: FAILED: %s\n' "$*" >&2
    exit 1
}
installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true) == installed ]]
}
# what dpkg says the package owns; directories only when no other installed package lists them
owned_paths() {
    local shared
    shared=$(find /var/lib/dpkg/info -name '*.list' ! -name "$pkg.list" ! -name "$pkg:*.list" -exec cat {} + | sort -u)
    dpkg -L "$pkg" | grep -vx '/\.' | sort -u | comm -23 - <(echo "$shared")
}
apt_get() {
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q -y "$@" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        fail "apt-get $*"
    fi
    rm -f "$log"
}

[[ $(dpkg-deb -f "$deb" Package) == "$pkg" ]] || fail "$deb is not the $pkg package"
installed || apt_get install --no-install-recommends "$deb"
before=$(owned_paths)
count=$(wc -l <<<"$before")
[[ -n $(find /usr/lib/pyshim -name '*.pyc' -print -quit) ]] || fail "postinst compiled no bytecode in /usr/lib/pyshim"

apt_get remove "$pkg"
installed && fail "$pkg is still installed after apt-get remove"
left=$(while IFS= read -r path; do if [[ -e $path || -L $path ]]; then echo "$path"; fi; done <<<"$before")
[[ -z $left ]] || fail "apt-get remove left $(wc -l <<<"$left") of the package's paths behind:"$'\n'"$(head -n 20 <<<"$left")"
for dir in /usr/lib/pyshim /usr/share/pyshim /usr/share/doc/pyshim; do
    [[ ! -e $dir ]] || fail "apt-get remove left $dir: $(find "$dir" | head -n 5 | paste -sd ' ')"
done
[[ ! -e /usr/bin/containerd-shim-pyshim-v2 && ! -L /usr/bin/containerd-shim-pyshim-v2 ]] ||
    fail "/usr/bin/containerd-shim-pyshim-v2 survived the removal"

apt_get install --no-install-recommends "$deb"
installed || fail "$pkg is not installed after reinstalling $deb"
after=$(owned_paths)
[[ $after == "$before" ]] || fail "the reinstalled package owns other paths than before:"$'\n'"$(diff <(echo "$before") <(echo "$after") | head -n 20)"
missing=$(while IFS= read -r path; do if [[ ! -e $path && ! -L $path ]]; then echo "$path"; fi; done <<<"$after")
[[ -z $missing ]] || fail "after reinstalling, dpkg lists paths that do not exist:"$'\n'"$missing"
/usr/bin/containerd-shim-pyshim-v2 -v >/dev/null || fail "the reinstalled shim does not answer -v"
echo "check-deb-removal: $pkg $(dpkg-query -W -f='${Version}' "$pkg"): removed ($count paths gone, none left), reinstalled, shim answers -v ($((SECONDS - started))s)"
