#!/usr/bin/env bash
# pyshim's one installer: everything a Debian 12 (bookworm) or 13 (trixie) machine needs to run the
# pyshim demo (default) and its tests (--test).
#
#   bash packaging/install.sh          # runtime
#   bash packaging/install.sh --test   # runtime + the venv's test/dev extras
#
# What it sets up (see packaging/README.md for the layout):
#   * system packages from the machine's own apt sources (runc, crun, iptables, busybox-static, ...);
#   * CRIU >= 4.2: Debian sid's criu in a private prefix run through sid's own dynamic loader, because
#     bookworm's 3.17 does not start on kernel 6.18 and trixie's 4.1 cannot dump TCP sockets here;
#   * pycriu (sid's python3-pycriu, pure Python) in its own prefix;
#   * containerd 1.6 (bookworm), 1.7 (trixie) and 2.x (sid) side by side, unpacked with dpkg -x;
#   * the system suite's redis-server and redis-cli unpacked (not installed) for the tests;
#   * a virtualenv with pyshim installed editable from this checkout;
#   * /opt/pyshim/env, the KEY=VALUE file the tests read.
#
# It is idempotent: a second run downloads nothing and only re-checks what is there.
# Newer Debian packages come through a separate apt configuration under /opt/pyshim/apt, so the
# system's sources and package state stay untouched.
set -euo pipefail

readonly PREFIX=/opt/pyshim
readonly VENV=$PREFIX/venv
readonly CRIU_PREFIX=$PREFIX/criu
readonly PYCRIU_PREFIX=$PREFIX/pycriu
readonly REDIS_PREFIX=$PREFIX/redis
readonly CONTAINERD_ROOT=$PREFIX/containerd
readonly PRIVATE_APT=$PREFIX/apt
readonly LOG_DIR=$PREFIX/log
readonly ENV_FILE=$PREFIX/env
readonly CRIU_WRAPPER=/usr/local/sbin/criu
readonly CRIU_WRAPPER_MARKER="pyshim-criu-wrapper"
readonly SHIM_LINK=/usr/local/bin/containerd-shim-pyshim-v2
readonly CRIU_MIN_VERSION=4.2
readonly PYTHON_MIN_VERSION=3.11
readonly DEFAULT_MIRROR=http://deb.debian.org/debian
readonly ONE_DAY=86400

# System packages. The system `containerd` package is deliberately absent: pyshim only runs private
# containerd instances, and installing the package would start a system service.
# nftables: the `nft` command, for reading CRIU's nftables lock (CRIU itself links libnftables; pyshim uses netlink).
# gcc and libc6-dev build the tests' small static helpers (integration/harness/*.c).
readonly SYSTEM_PACKAGES=(runc crun iptables nftables busybox-static ca-certificates tmux iproute2 procps util-linux
    gcc libc6-dev)

# Libraries sid's criu 4.2.1 was found to need (shared/reference/environment.md). The script adds
# whatever sid's dependency closure of criu says on top, and verifies the result with
# LD_TRACE_LOADED_OBJECTS, so a change in sid shows up as an error rather than a silent mix.
readonly CRIU_DOCUMENTED_LIBS=(libc6 libbsd0 libmd0 libgnutls30t64 libnettle8t64 libhogweed6t64 libgmp10
    libidn2-0 libunistring5 libtasn1-6 libp11-kit0 libffi8 libnet9 libnftables1 libnftnl11 libmnl0
    libjansson4 libxtables12 libedit2 libtinfo6 libnl-3-200 libprotobuf-c1 libuuid1 libgcc-s1 libzstd1
    libcap2 libbpf1 zlib1g libelf1t64 libcompel1)

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_DIR
WITH_TEST=0
START_SECONDS=$SECONDS

export DEBIAN_FRONTEND=noninteractive
# root's tools live in sbin; keep the caller's order (python3 "first on PATH" matters) and only append.
for d in /usr/local/sbin /usr/sbin /sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) PATH=$PATH:$d ;; esac
done
export PATH

# ----------------------------------------------------------------------------------------------------
# small helpers

say() { printf '%s\n' "$*"; }
note() { printf '  %s\n' "$*"; }
die() {
    printf 'install.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

parse_args() {
    while (($#)); do
        case $1 in
            --test) WITH_TEST=1 ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
}

# seconds since a file was last modified; a huge number when it does not exist
file_age() {
    local f=$1
    if [[ -e $f ]]; then
        echo $(($(date +%s) - $(stat -c %Y "$f")))
    else
        echo 999999999
    fi
}

# write_if_changed DEST [MODE] < CONTENT: replace DEST (atomically) only when its content differs, so
# a rerun touches nothing. Returns 1 when DEST was already up to date.
write_if_changed() {
    local dest=$1 mode=${2:-0644} new tmp
    new=$(cat)
    if [[ -f $dest ]] && [[ $(cat "$dest") == "$new" ]]; then
        return 1
    fi
    tmp=$(mktemp "$(dirname "$dest")/.pyshim.XXXXXX")
    printf '%s\n' "$new" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

# Run a command with its output kept in a log; show the log's tail if it fails.
run_logged() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "command failed: $* (full log: $log)"
    fi
}

# ----------------------------------------------------------------------------------------------------
# the machine

OS_CODENAME=""
DEB_ARCH=""
LIB_TRIPLET=""
LOADER_NAME=""

check_machine() {
    ((EUID == 0)) || die "run as root (it installs packages and writes /opt/pyshim, /usr/local)"
    [[ -r /etc/os-release ]] || die "no /etc/os-release: not a Debian system?"
    # shellcheck disable=SC1091
    local id codename
    id=$(. /etc/os-release && echo "${ID:-}")
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ $id == debian ]] || die "this installer supports Debian 12/13 only (found ID=$id)"
    OS_CODENAME=$codename
    case $codename in
        bookworm | trixie) ;;
        *) say "warning: Debian '$codename' is not tested (bookworm and trixie are); continuing" ;;
    esac
    DEB_ARCH=$(dpkg --print-architecture)
    # The private loader's name and the multiarch directory depend on the architecture.
    case $DEB_ARCH in
        amd64) LIB_TRIPLET=x86_64-linux-gnu LOADER_NAME=ld-linux-x86-64.so.2 ;;
        arm64) LIB_TRIPLET=aarch64-linux-gnu LOADER_NAME=ld-linux-aarch64.so.1 ;;
        *) die "unsupported architecture $DEB_ARCH (amd64 and arm64 are known)" ;;
    esac
    say "system: Debian $(cat /etc/debian_version) ($OS_CODENAME, $DEB_ARCH), kernel $(uname -r), glibc $(getconf GNU_LIBC_VERSION | awk '{print $2}')"
    say "repo: $REPO_DIR"
}

# ----------------------------------------------------------------------------------------------------
# system packages (the machine's own apt sources)

SYSTEM_APT_UPDATED=0

system_apt_lists_stale() {
    local newest
    newest=$(ls -t /var/lib/apt/lists/*Release 2>/dev/null | head -n 1 || true)
    [[ -z $newest ]] || (($(file_age "$newest") > ONE_DAY))
}

system_apt_update() {
    say "apt: updating the system's package lists"
    run_logged "$LOG_DIR/apt-update.log" apt-get -q update
    SYSTEM_APT_UPDATED=1
}

package_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

install_system_packages() {
    local wanted=("${SYSTEM_PACKAGES[@]}") missing=() p
    # python3-venv only matters when there is no python3 at all, or the one first on PATH is Debian's
    # and lacks venv/ensurepip (pyenv's Python has both).
    local py
    py=$(command -v python3 || true)
    if [[ -z $py ]] || { [[ $(readlink -f "$py") == /usr/bin/* ]] &&
        ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; }; then
        wanted+=(python3-venv)
    fi
    for p in "${wanted[@]}"; do
        package_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "apt: all ${#wanted[@]} system packages present (${wanted[*]})"
    else
        say "apt: installing ${missing[*]}"
        if system_apt_lists_stale; then system_apt_update; fi
        local install=(apt-get -q -y --no-install-recommends -o Dpkg::Options::=--force-confdef
            -o Dpkg::Options::=--force-confold install "${missing[@]}")
        if ! "${install[@]}" >"$LOG_DIR/apt-install.log" 2>&1; then
            # A missing candidate or a 404 usually means old lists: refresh once and retry.
            ((SYSTEM_APT_UPDATED)) && { tail -n 25 "$LOG_DIR/apt-install.log" >&2; die "apt-get install failed"; }
            system_apt_update
            run_logged "$LOG_DIR/apt-install.log" "${install[@]}"
        fi
    fi
    # CRIU's network lock execs iptables-restore; runc/crun are what the shims run.
    command -v iptables-restore >/dev/null || die "iptables-restore not found after installing iptables"
    command -v runc >/dev/null || die "runc not found after installing it"
    note "runc: $(command -v runc) -> $(runc --version | awk 'NR==1{print $3}'); crun: $(command -v crun) -> $(crun --version | awk 'NR==1{print $3}')"
    note "iptables-restore: $(command -v iptables-restore) ($(iptables-restore --version 2>&1 | head -n 1))"
    if package_installed containerd; then
        note "warning: the system 'containerd' package is installed; pyshim never uses it"
    fi
}

# ----------------------------------------------------------------------------------------------------
# private apt: bookworm + trixie + sid from the system's mirror, state under $PRIVATE_APT

DEBIAN_MIRROR=""
DEBIAN_KEYRING=""
PRIVATE_APT_READY=0

# Print "URI KEYRING" of the system's sources entry for the system's own suite.
system_mirror_entry() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # deb822: paragraphs separated by blank lines; take the first 'deb' stanza naming our suite.
        awk -v suite="$OS_CODENAME" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; key = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    name = tolower(line); sub(/:.*/, "", name)
                    value = line; sub(/^[^:]*:[ \t]*/, "", value)
                    if (name == "types") types = value
                    else if (name == "uris") uris = value
                    else if (name == "suites") suites = value
                    else if (name == "signed-by") key = value
                    else if (name == "enabled") enabled = tolower(value)
                }
                if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, u, /[ \t]+/)
                    print u[1], (key ~ /^\// ? key : "-")
                    exit
                }
            }' "$f"
    done | head -n 1
    # one-line format: deb [options] URI SUITE COMPONENTS...
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
        awk -v suite="$OS_CODENAME" '
            $1 == "deb" {
                i = 2; key = "-"
                if ($2 ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
                        if ($i ~ /\]$/) break
                        i++
                    }
                    i++
                }
                if ($(i + 1) == suite) { print $i, key; exit }
            }'
}

choose_debian_mirror() {
    [[ -n $DEBIAN_MIRROR ]] && return
    local uri key
    read -r uri key < <(system_mirror_entry | head -n 1) || true
    if [[ -n ${PYSHIM_DEBIAN_MIRROR:-} ]]; then
        uri=$PYSHIM_DEBIAN_MIRROR
    elif [[ -z ${uri:-} || ! $uri =~ ^https?:// ]]; then
        note "apt: no usable http(s) Debian mirror in the system's sources; using $DEFAULT_MIRROR"
        uri=$DEFAULT_MIRROR
    elif [[ $uri == *snapshot.debian.org/archive/* ]]; then
        # A dated snapshot freezes sid too, which would defeat asking sid for criu >= 4.2.
        note "apt: the system's sources are a dated snapshot ($uri); using $DEFAULT_MIRROR for other suites"
        uri=$DEFAULT_MIRROR
    fi
    DEBIAN_MIRROR=${uri%/}
    if [[ -n ${key:-} && $key != - && -r $key ]]; then
        DEBIAN_KEYRING=$key
    elif [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
        DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    else
        DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.pgp
    fi
}

# Besides pointing every path at $PRIVATE_APT: signatures are checked as usual, but not Valid-Until,
# because the archive reached from these machines can lag (seen: sid's Release "expired 22 days ago"
# in a clean trixie chroot, whose apt lacked the machine's own Check-Valid-Until=false); no
# translations, and compressed lists to keep $PRIVATE_APT small.
private_apt_options() {
    printf '%s\n' \
        -o "Acquire::Check-Valid-Until=false" \
        -o "Acquire::Languages=none" \
        -o "Acquire::GzipIndexes=true" \
        -o "Dir::Etc::SourceList=$PRIVATE_APT/sources.list" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::Etc::Preferences=/dev/null" \
        -o "Dir::Etc::PreferencesParts=/dev/null" \
        -o "Dir::State::Lists=$PRIVATE_APT/lists" \
        -o "Dir::Cache=$PRIVATE_APT/cache" \
        -o "APT::Sandbox::User=root"
}

private_apt_get() {
    local opts
    mapfile -t opts < <(private_apt_options)
    apt-get -q "${opts[@]}" "$@"
}

private_apt_cache() {
    local opts
    mapfile -t opts < <(private_apt_options)
    apt-cache "${opts[@]}" "$@"
}

# Called only when something has to be downloaded: a run with everything in place never gets here.
private_apt_prepare() {
    ((PRIVATE_APT_READY)) && return
    choose_debian_mirror
    mkdir -p "$PRIVATE_APT/lists/partial" "$PRIVATE_APT/cache/archives/partial" "$PRIVATE_APT/debs"
    local changed=0 s
    {
        echo "# written by pyshim packaging/install.sh; used only through apt -o Dir::Etc::SourceList=..."
        for s in bookworm trixie sid; do
            echo "deb [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR $s main"
        done
    } | write_if_changed "$PRIVATE_APT/sources.list" && changed=1
    # The stamp is written only after an update that succeeded for all three suites.
    local stamp=$PRIVATE_APT/lists-updated
    if ((changed)) || (($(file_age "$stamp") > ONE_DAY)); then
        say "apt (private): updating bookworm/trixie/sid lists from $DEBIAN_MIRROR"
        rm -f "$stamp"
        run_logged "$LOG_DIR/private-apt-update.log" private_apt_get update
        # apt-get update exits 0 on some per-suite failures; "W:"/"E:" lines mean a suite is missing.
        if grep -qE '^(E|W): ' "$LOG_DIR/private-apt-update.log"; then
            grep -E '^(E|W): ' "$LOG_DIR/private-apt-update.log" >&2
            die "private apt update was incomplete (full log: $LOG_DIR/private-apt-update.log)"
        fi
        touch "$stamp"
    else
        note "apt (private): lists are fresh ($PRIVATE_APT)"
    fi
    PRIVATE_APT_READY=1
}

# candidate version of a package in one suite, e.g. suite_version criu sid
suite_version() {
    private_apt_cache madison "$1" | awk -v s=" $2/" 'index($0, s) { print $3; exit }'
}

# download_debs DIR PKG/SUITE... : fresh .debs into DIR
download_debs() {
    local dir=$1
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && private_apt_get download "$@") >"$LOG_DIR/private-apt-download.log" 2>&1 || {
        tail -n 25 "$LOG_DIR/private-apt-download.log" >&2
        die "downloading $* failed"
    }
}

# ----------------------------------------------------------------------------------------------------
# CRIU

CRIU_BIN=""
CRIU_VERSION=""
CRIU_SOURCE=""

criu_version_of() {
    "$1" --version 2>/dev/null | awk '/^Version:/ { print $2; exit }'
}

criu_is_good() {
    local bin=$1 v
    v=$(criu_version_of "$bin" || true)
    [[ -n $v ]] && dpkg --compare-versions "$v" ge "$CRIU_MIN_VERSION" && "$bin" check >/dev/null 2>&1
}

is_our_wrapper() {
    [[ -f $1 ]] && grep -q "$CRIU_WRAPPER_MARKER" "$1" 2>/dev/null
}

# criu's libraries: the documented list plus sid's dependency closure of criu (library packages only)
criu_library_packages() {
    {
        printf '%s\n' "${CRIU_DOCUMENTED_LIBS[@]}"
        private_apt_cache -o APT::Default-Release=sid depends --recurse --no-recommends --no-suggests \
            --no-conflicts --no-breaks --no-replaces --no-enhances criu |
            grep -E '^[a-z0-9]' | grep -vx criu
    } | sort -u
}

# Every library the loader resolves for $2 must come from the prefix $1.
verify_private_libraries() {
    local prefix=$1 binary=$2 trace outside
    trace=$(LD_TRACE_LOADED_OBJECTS=1 "$prefix/usr/lib/$LIB_TRIPLET/$LOADER_NAME" \
        --library-path "$prefix/usr/lib/$LIB_TRIPLET" "$binary" 2>&1) ||
        die "LD_TRACE_LOADED_OBJECTS on $binary failed: $trace"
    outside=$(awk -v p="$prefix/" '
        /not found/ { print; next }
        /=>/ { path = $3; if (index(path, p) != 1 && path !~ /^\.\//) print }' <<<"$trace")
    if [[ -n $outside ]]; then
        die "$binary still takes libraries from outside $prefix:"$'\n'"$outside"
    fi
    grep -c '=>' <<<"$trace"
}

install_private_criu() {
    private_apt_prepare
    local version libs
    version=$(suite_version criu sid)
    [[ -n $version ]] || die "Debian sid has no criu package on $DEBIAN_MIRROR"
    dpkg --compare-versions "$version" ge "$CRIU_MIN_VERSION" ||
        die "Debian sid's criu is $version, older than $CRIU_MIN_VERSION"
    mapfile -t libs < <(criu_library_packages)
    say "criu: installing sid's criu $version + ${#libs[@]} library packages into $CRIU_PREFIX"
    local debs=$PRIVATE_APT/debs/criu
    download_debs "$debs" criu/sid "${libs[@]/%//sid}"
    # Unpack next to the old prefix and swap, so an interrupted run never leaves half a prefix.
    local staging=$CRIU_PREFIX.new deb
    rm -rf "$staging"
    mkdir -p "$staging"
    for deb in "$debs"/*.deb; do dpkg -x "$deb" "$staging"; done
    [[ -x $staging/usr/sbin/criu && -e $staging/usr/lib/$LIB_TRIPLET/$LOADER_NAME ]] ||
        die "sid's criu or loader missing after unpacking into $staging"
    verify_private_libraries "$staging" "$staging/usr/sbin/criu" >/dev/null
    rm -rf "$CRIU_PREFIX"
    mv "$staging" "$CRIU_PREFIX"
    rm -rf "$debs"
    write_criu_wrapper
}

# runc, crun and pyshim find criu through PATH; /usr/local/sbin comes before /usr/sbin there.
write_criu_wrapper() {
    write_if_changed "$CRIU_WRAPPER" 0755 <<EOF || true
#!/bin/sh
# $CRIU_WRAPPER_MARKER: written by pyshim packaging/install.sh.
# Debian sid's criu needs a newer glibc (and libraries) than the system's, so it runs through sid's
# own dynamic loader from the private prefix $CRIU_PREFIX. criu does not re-execute itself, so this works.
exec $CRIU_PREFIX/usr/lib/$LIB_TRIPLET/$LOADER_NAME --library-path $CRIU_PREFIX/usr/lib/$LIB_TRIPLET $CRIU_PREFIX/usr/sbin/criu "\$@"
EOF
}

ensure_criu() {
    local found
    found=$(command -v criu || true)
    if [[ -n $found ]] && criu_is_good "$found"; then
        CRIU_BIN=$found
    else
        if [[ -n $found ]]; then
            note "criu: $found ($(criu_version_of "$found" || echo '?')) is older than $CRIU_MIN_VERSION or fails 'criu check'"
        fi
        install_private_criu
        case ":$PATH:" in *":/usr/local/sbin:"*) ;; *) die "/usr/local/sbin is not on PATH" ;; esac
        CRIU_BIN=$(command -v criu)
        [[ $CRIU_BIN == "$CRIU_WRAPPER" ]] ||
            die "'criu' on PATH is $CRIU_BIN, not $CRIU_WRAPPER: fix PATH so /usr/local/sbin comes first"
    fi
    CRIU_VERSION=$(criu_version_of "$CRIU_BIN")
    if is_our_wrapper "$CRIU_BIN"; then
        local nlibs
        nlibs=$(verify_private_libraries "$CRIU_PREFIX" "$CRIU_PREFIX/usr/sbin/criu")
        CRIU_SOURCE="private prefix $CRIU_PREFIX, $nlibs objects loaded, all from it"
    else
        CRIU_SOURCE="system"
    fi
    local check rc=0
    check=$("$CRIU_BIN" check 2>&1) || rc=$?
    ((rc == 0)) || die "'$CRIU_BIN check' failed (exit $rc):"$'\n'"$check"
    say "criu: $CRIU_BIN -> $CRIU_VERSION ($CRIU_SOURCE), criu check: ok ($(tail -n 1 <<<"$check"))"
    # Informational: which kernel features CRIU misses here (no soft-dirty: no pre-dump).
    local missing
    missing=$("$CRIU_BIN" check --all 2>&1 | sed -n 's/^\(Warn\|Error\) *(criu\/cr-check.c:[0-9]*): *//p' | paste -sd ";" || true)
    [[ -z $missing ]] || note "criu check --all: $missing"
}

# ----------------------------------------------------------------------------------------------------
# pycriu (not on PyPI): sid's python3-pycriu, pure Python, in its own prefix

PYCRIU_DIR=$PYCRIU_PREFIX/usr/lib/python3/dist-packages
PYCRIU_VERSION=""

ensure_pycriu() {
    if [[ ! -f $PYCRIU_DIR/pycriu/__init__.py || ! -f $PYCRIU_DIR/pycriu/rpc_pb2.py ]]; then
        private_apt_prepare
        local version
        version=$(suite_version python3-pycriu sid)
        [[ -n $version ]] || die "Debian sid has no python3-pycriu"
        say "pycriu: installing sid's python3-pycriu $version into $PYCRIU_PREFIX"
        local debs=$PRIVATE_APT/debs/pycriu
        download_debs "$debs" python3-pycriu/sid
        rm -rf "$PYCRIU_PREFIX.new"
        mkdir -p "$PYCRIU_PREFIX.new"
        dpkg -x "$debs"/python3-pycriu_*.deb "$PYCRIU_PREFIX.new"
        rm -rf "$PYCRIU_PREFIX" "$debs"
        mv "$PYCRIU_PREFIX.new" "$PYCRIU_PREFIX"
    fi
    [[ -f $PYCRIU_DIR/pycriu/__init__.py ]] || die "pycriu missing in $PYCRIU_DIR"
    local info
    info=$(ls -d "$PYCRIU_DIR"/pycriu-*.dist-info 2>/dev/null | head -n 1 || true)
    PYCRIU_VERSION=${info##*/pycriu-}
    PYCRIU_VERSION=${PYCRIU_VERSION%.dist-info}
    say "pycriu: $PYCRIU_DIR -> ${PYCRIU_VERSION:-unknown}"
}

# ----------------------------------------------------------------------------------------------------
# containerd 1.6 / 1.7 / 2.x side by side

declare -A CONTAINERD_VERSION=()

# "containerd github.com/containerd/containerd 1.7.24~ds1 ..." -> 1.7.24
containerd_upstream_version() {
    "$1" --version 2>/dev/null | awk 'NR==1 { v = $3; sub(/[~+].*/, "", v); print v }'
}

# ensure_containerd SLOT SUITE: $CONTAINERD_ROOT/SLOT/{root (dpkg -x), bin (uniform symlinks)}
ensure_containerd() {
    local slot=$1 suite=$2
    local dir=$CONTAINERD_ROOT/$slot version=""
    if [[ -x $dir/bin/containerd && -x $dir/bin/ctr && -x $dir/bin/containerd-shim-runc-v2 ]]; then
        version=$(containerd_upstream_version "$dir/bin/containerd" || true)
    fi
    if [[ $version != "$slot".* ]]; then
        private_apt_prepare
        local debversion
        debversion=$(suite_version containerd "$suite")
        [[ -n $debversion ]] || die "Debian $suite has no containerd package"
        say "containerd $slot: installing $suite's containerd $debversion into $dir"
        local debs=$PRIVATE_APT/debs/containerd-$slot
        download_debs "$debs" "containerd/$suite"
        rm -rf "$dir.new"
        mkdir -p "$dir.new/bin"
        dpkg -x "$debs"/containerd_*.deb "$dir.new/root"
        echo "$debversion" >"$dir.new/DEBIAN_VERSION"
        # Relative links keep the layout uniform across versions. containerd looks for its Go shim
        # next to its own (resolved) executable, so both sit in the same extracted usr/bin.
        local b
        for b in containerd ctr containerd-shim-runc-v2; do
            [[ -x $dir.new/root/usr/bin/$b ]] || die "$suite's containerd package has no usr/bin/$b"
            ln -s "../root/usr/bin/$b" "$dir.new/bin/$b"
        done
        rm -rf "$dir" "$debs"
        mv "$dir.new" "$dir"
        local err
        if ! err=$("$dir/bin/containerd" --version 2>&1); then
            # Go binaries with cgo link glibc; one built against a newer glibc cannot use a private
            # loader either, because the Go shim re-executes /proc/self/exe (which would be the loader).
            if grep -q 'GLIBC_' <<<"$err"; then
                die "containerd $slot from $suite needs a newer glibc than this system's" \
                    "($(getconf GNU_LIBC_VERSION)): $err"
            fi
            die "containerd $slot does not run: $err"
        fi
        version=$(containerd_upstream_version "$dir/bin/containerd")
        [[ $version == "$slot".* ]] || die "$suite's containerd is $version, expected $slot.x"
    fi
    # all three must run here; print their own version lines
    "$dir/bin/ctr" --version >/dev/null 2>&1 || die "$dir/bin/ctr does not run"
    "$dir/bin/containerd-shim-runc-v2" -v >/dev/null 2>&1 || die "$dir/bin/containerd-shim-runc-v2 does not run"
    CONTAINERD_VERSION[$slot]=$version
    say "containerd $slot: $dir/bin -> $version (deb $(cat "$dir/DEBIAN_VERSION" 2>/dev/null || echo '?')); containerd, ctr, containerd-shim-runc-v2 run"
}

ensure_all_containerd() {
    mkdir -p "$CONTAINERD_ROOT"
    ensure_containerd 1.6 bookworm
    ensure_containerd 1.7 trixie
    ensure_containerd 2 sid
}

# ----------------------------------------------------------------------------------------------------
# redis for the integration tests: the system suite's redis-server and redis-cli, unpacked, not installed
# (the package would start a system service). The loopback-after-restore test copies them and the
# libraries they load into a test image.

REDIS_VERSION=""

# The .debs' library dependencies this system lacks (the others resolve from the system itself).
redis_missing_library_packages() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
        redis-server redis-tools |
        sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \(lib[^ <]*\)$/\2/p' | sort -u |
        while read -r p; do package_installed "$p" || echo "$p"; done
}

# Every library of $1 resolves, from the system or from $REDIS_PREFIX; prints how many objects it loads.
verify_redis_binary() {
    local binary=$1 trace
    # Run as ldd does (the kernel starts the binary's own loader, which only lists what it would load).
    trace=$(LD_TRACE_LOADED_OBJECTS=1 LD_LIBRARY_PATH="$REDIS_PREFIX/usr/lib/$LIB_TRIPLET" "$binary" 2>&1) || return 1
    ! grep -q 'not found' <<<"$trace" && grep -c '=>' <<<"$trace"
}

ensure_redis() {
    local server=$REDIS_PREFIX/usr/bin/redis-server cli=$REDIS_PREFIX/usr/bin/redis-cli
    if [[ ! -f $REDIS_PREFIX/DEBIAN_VERSION || ! -x $server || ! -x $cli ]] ||
        ! verify_redis_binary "$server" >/dev/null || ! verify_redis_binary "$cli" >/dev/null; then
        local libs tmp
        mapfile -t libs < <(redis_missing_library_packages)
        say "redis: unpacking $OS_CODENAME's redis-server, redis-tools${libs[*]:+ and ${libs[*]}} into $REDIS_PREFIX (not installed)"
        tmp=$(mktemp -d)
        local download=(apt-get -q -o APT::Sandbox::User=root download redis-server redis-tools "${libs[@]}")
        if ! (cd "$tmp" && "${download[@]}") >"$LOG_DIR/redis-download.log" 2>&1; then
            # Old lists can name a version the mirror no longer has: refresh once and retry.
            ((SYSTEM_APT_UPDATED)) || system_apt_update
            (cd "$tmp" && run_logged "$LOG_DIR/redis-download.log" "${download[@]}")
        fi
        local staging=$REDIS_PREFIX.new deb
        rm -rf "$staging"
        mkdir -p "$staging"
        for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$staging"; done
        dpkg-deb -f "$tmp"/redis-server_*.deb Version >"$staging/DEBIAN_VERSION"
        rm -rf "$tmp" "$REDIS_PREFIX"
        mv "$staging" "$REDIS_PREFIX"
    fi
    local nserver ncli
    nserver=$(verify_redis_binary "$server") || die "$server: a library does not resolve (system + $REDIS_PREFIX)"
    ncli=$(verify_redis_binary "$cli") || die "$cli: a library does not resolve (system + $REDIS_PREFIX)"
    REDIS_VERSION=$(cat "$REDIS_PREFIX/DEBIAN_VERSION")
    say "redis: $REDIS_PREFIX -> redis-server, redis-cli $REDIS_VERSION ($nserver and $ncli libraries resolve)"
}

# ----------------------------------------------------------------------------------------------------
# Python virtualenv with pyshim (editable) and pycriu on its path

PYTHON_VERSION=""
VENV_EXTRAS=""

ensure_venv() {
    local py base want_prefix
    py=$(command -v python3) || die "no python3 on PATH"
    # Through pyenv's shim, sys.executable names the real interpreter; the venv is made from that.
    base=$("$py" -c 'import sys; print(sys.executable)')
    PYTHON_VERSION=$("$base" -c 'import platform; print(platform.python_version())')
    "$base" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$PYTHON_MIN_VERSION'.split('.'))))" ||
        die "python3 on PATH ($base) is $PYTHON_VERSION; pyshim needs >= $PYTHON_MIN_VERSION"
    want_prefix=$("$base" -c 'import sys; print(sys.prefix)')

    # Reuse the venv only when it was made from this very interpreter.
    local have=""
    if [[ -x $VENV/bin/python ]]; then
        have=$("$VENV/bin/python" -c 'import sys, platform; print(sys.base_prefix, platform.python_version())' 2>/dev/null || true)
    fi
    if [[ $have != "$want_prefix $PYTHON_VERSION" ]]; then
        say "venv: creating $VENV from $base ($PYTHON_VERSION)"
        rm -rf "$VENV"
        run_logged "$LOG_DIR/venv.log" "$base" -m venv "$VENV"
    fi

    install_pyshim_into_venv
    add_pycriu_to_venv

    # pycriu's generated messages must load with the venv's protobuf (from PyPI), not Debian's.
    local check
    check=$("$VENV/bin/python" -c '
import google.protobuf, pycriu, pycriu.rpc_pb2, pycriu.images
print(google.protobuf.__version__, pycriu.__file__)' 2>&1) ||
        die "pycriu does not import in $VENV:"$'\n'"$check"
    local pbver=${check%% *}
    local pyshim_ver
    pyshim_ver=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("pyshim"))')
    say "venv: $VENV -> Python $PYTHON_VERSION, pyshim $pyshim_ver (editable, $REPO_DIR${VENV_EXTRAS:+, [$VENV_EXTRAS]}), protobuf $pbver; import pycriu, pycriu.rpc_pb2, pycriu.images: ok"
}

# pip runs only when the checkout, its pyproject.toml or the extras changed since the last install.
install_pyshim_into_venv() {
    local stamp=$VENV/.pyshim-install pyproject_sum have_extras="" have_repo="" have_sum=""
    [[ -f $REPO_DIR/pyproject.toml ]] || die "no pyproject.toml in $REPO_DIR"
    pyproject_sum=$(sha256sum "$REPO_DIR/pyproject.toml" | awk '{print $1}')
    if [[ -f $stamp ]]; then
        have_repo=$(sed -n 's/^repo=//p' "$stamp")
        have_sum=$(sed -n 's/^pyproject=//p' "$stamp")
        have_extras=$(sed -n 's/^extras=//p' "$stamp")
    fi
    local extras=""
    # --test adds extras; a later plain run keeps whatever extras are already installed.
    if ((WITH_TEST)) || [[ $have_extras == test,dev ]]; then extras=test,dev; fi
    VENV_EXTRAS=$extras
    if [[ $have_repo == "$REPO_DIR" && $have_sum == "$pyproject_sum" && $have_extras == "$extras" ]] &&
        "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("pyshim")' >/dev/null 2>&1; then
        return
    fi
    local target=$REPO_DIR
    [[ -z $extras ]] || target="$REPO_DIR[$extras]"
    say "venv: pip install -e '$target' (log: $LOG_DIR/pip.log)"
    run_logged "$LOG_DIR/pip.log" "$VENV/bin/python" -m pip install --no-input -e "$target"
    printf 'repo=%s\npyproject=%s\nextras=%s\n' "$REPO_DIR" "$pyproject_sum" "$extras" >"$stamp"
}

add_pycriu_to_venv() {
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PYCRIU_DIR" | write_if_changed "$site/pyshim-pycriu.pth" &&
        note "venv: $site/pyshim-pycriu.pth -> $PYCRIU_DIR"
    return 0
}

# containerd finds runtime "io.containerd.pyshim.v2" as containerd-shim-pyshim-v2 on PATH.
# pip's console script pays for site processing (.pth files, the editable-install finder, `re`)
# on every `start` and `delete`, which sit on containerd's hot path: it is replaced by a launcher
# that runs the interpreter isolated and without site (-IS) and names its import paths itself.
# docs/benchmarks.md has the measurement.
write_shim_launcher() {
    local launcher=$VENV/bin/containerd-shim-pyshim-v2 site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cat <<LAUNCHER | write_if_changed "$launcher" 0755 && note "shim: launcher $launcher (python -IS)"
#!$VENV/bin/python -IS
# containerd-shim-pyshim-v2, written by packaging/install.sh: no site processing on the hot path.
import sys
sys.path[1:1] = ["$REPO_DIR", "$site", "$PYCRIU_DIR"]
from shim.__main__ import main
sys.exit(main())
LAUNCHER
    if [[ $(readlink "$SHIM_LINK" 2>/dev/null || true) != "$launcher" ]]; then
        ln -sfn "$launcher" "$SHIM_LINK"
    fi
    local state="shim.__main__ importable"
    "$launcher" -v >/dev/null 2>&1 || state="shim.__main__ not importable yet"
    say "shim: $SHIM_LINK -> $launcher ($state)"
}

# ----------------------------------------------------------------------------------------------------
# /opt/pyshim/env: what the tests read

write_env_file() {
    {
        echo "# written by pyshim packaging/install.sh; shell-sourceable KEY=VALUE lines"
        echo "PYSHIM_PREFIX=$PREFIX"
        echo "PYSHIM_VENV=$VENV"
        echo "PYSHIM_PYTHON=$VENV/bin/python"
        echo "PYSHIM_PYTHON_VERSION=$PYTHON_VERSION"
        echo "PYSHIM_CRIU=$CRIU_BIN"
        echo "PYSHIM_CRIU_VERSION=$CRIU_VERSION"
        echo "PYSHIM_PYCRIU_DIR=$PYCRIU_DIR"
        echo "PYSHIM_PYCRIU_VERSION=$PYCRIU_VERSION"
        echo "PYSHIM_CONTAINERD_1_6=$CONTAINERD_ROOT/1.6/bin"
        echo "PYSHIM_CONTAINERD_1_6_VERSION=${CONTAINERD_VERSION[1.6]}"
        echo "PYSHIM_CONTAINERD_1_7=$CONTAINERD_ROOT/1.7/bin"
        echo "PYSHIM_CONTAINERD_1_7_VERSION=${CONTAINERD_VERSION[1.7]}"
        echo "PYSHIM_CONTAINERD_2=$CONTAINERD_ROOT/2/bin"
        echo "PYSHIM_CONTAINERD_2_VERSION=${CONTAINERD_VERSION[2]}"
        echo "PYSHIM_RUNC=$(command -v runc)"
        echo "PYSHIM_RUNC_VERSION=$(runc --version | awk 'NR==1{print $3}')"
        echo "PYSHIM_CRUN=$(command -v crun)"
        echo "PYSHIM_CRUN_VERSION=$(crun --version | awk 'NR==1{print $3}')"
        echo "PYSHIM_BUSYBOX=$(command -v busybox || echo /bin/busybox)"
        echo "PYSHIM_SHIM=$SHIM_LINK"
        echo "PYSHIM_REDIS=$REDIS_PREFIX"
        echo "PYSHIM_REDIS_VERSION=$REDIS_VERSION"
    } | if write_if_changed "$ENV_FILE"; then
        say "env: wrote $ENV_FILE"
    else
        say "env: $ENV_FILE unchanged"
    fi
}

# ----------------------------------------------------------------------------------------------------

main() {
    parse_args "$@"
    check_machine
    mkdir -p "$PREFIX" "$LOG_DIR"
    # One installer at a time (CI and a developer could overlap).
    exec 9>>"$PREFIX/.install.lock"
    flock -w 600 9 || die "another install.sh holds $PREFIX/.install.lock"

    install_system_packages
    ensure_criu
    ensure_pycriu
    ensure_all_containerd
    ensure_redis
    ensure_venv
    write_shim_launcher
    write_env_file
    say "done in $((SECONDS - START_SECONDS))s$( ((WITH_TEST)) && echo ' (with test extras)')"
}

# Run only when executed, so the functions can also be sourced for a look at one step.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
