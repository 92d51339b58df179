#!/usr/bin/env bash
# pyshim's host installer, for Debian 12 (bookworm) and 13 (trixie), run as root: what a host needs to
# RUN pyshim, installed from the release artifacts (never an editable install of a checkout).
#
#   bash packaging/install.sh                  # build the artifacts from this checkout (packaging/build.sh), install them
#   bash packaging/install.sh --deb FILE       # install this pyshim_*.deb (pyshim-criu_*.deb beside it when needed)
#   bash packaging/install.sh --criu-deb FILE  # the pyshim-criu_*.deb to use when the system's CRIU is too old
#   bash packaging/install.sh --wheel FILE     # pyshim from a wheel into /usr/local/lib/pyshim instead of a .deb
#
# What it sets up (see packaging/README.md for the layout):
#   * system packages from the machine's own apt sources (runc, iptables, python3, ...);
#   * pyshim: the pyshim .deb (/usr/lib/pyshim, /usr/bin/containerd-shim-pyshim-v2), installed with apt;
#   * CRIU >= 4.2: the system's when it is new enough and passes `criu check`, else the pyshim-criu .deb
#     (Debian sid's criu with its libraries, run through sid's own loader: bookworm's 3.17 does not start
#     on kernel 6.18 and trixie's 4.1 cannot dump TCP sockets here).
# Test fixtures (containerd 1.6/1.7/2.x, redis, compilers, the test venv) are packaging/install-test.sh's.
#
# It is idempotent: a second run installs nothing (a .deb is installed only when it differs from the
# installed package's files) and asks nothing. It never installs, configures or restarts containerd;
# registering pyshim with the host's containerd is /usr/share/pyshim/containerd/ (docs/install.md).
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
# The wrapper earlier installers wrote; now a link to the packaged /usr/sbin/criu (see retire_legacy_criu_wrapper).
readonly CRIU_WRAPPER=/usr/local/sbin/criu
readonly CRIU_WRAPPER_MARKER="pyshim-criu-wrapper"
# What earlier installers linked to their venv's launcher; it would shadow the packaged shim on PATH.
readonly LEGACY_SHIM_LINK=/usr/local/bin/containerd-shim-pyshim-v2
readonly SHIM=/usr/bin/containerd-shim-pyshim-v2
readonly WHEEL_PREFIX=/usr/local/lib/pyshim
readonly CRIU_MIN_VERSION=4.2
readonly PYTHON_MIN_VERSION=3.11
readonly DEFAULT_MIRROR=http://deb.debian.org/debian
readonly ONE_DAY=86400

# What a host needs to run pyshim. The system `containerd` package is deliberately absent: the operator
# brings containerd (pyshim registers with it), and the tests run only private containerds.
# iptables: CRIU's network lock runs iptables-restore. python3: the packaged shim's interpreter.
# openssh-client: `pyshim migrate` reaches the destination host through ssh (the destination needs an sshd).
readonly SYSTEM_PACKAGES=(runc iptables ca-certificates iproute2 procps util-linux python3 openssh-client)

# Libraries sid's criu 4.2.1 was found to need (its ldd output on Debian 12 when the list was made). The script adds
# whatever sid's dependency closure of criu says on top, and verifies the result with
# LD_TRACE_LOADED_OBJECTS, so a change in sid shows up as an error rather than a silent mix.
readonly CRIU_DOCUMENTED_LIBS=(libc6 libbsd0 libmd0 libgnutls30t64 libnettle8t64 libhogweed6t64 libgmp10
    libidn2-0 libunistring5 libtasn1-6 libp11-kit0 libffi8 libnet9 libnftables1 libnftnl11 libmnl0
    libjansson4 libxtables12 libedit2 libtinfo6 libnl-3-200 libprotobuf-c1 libuuid1 libgcc-s1 libzstd1
    libcap2 libbpf1 zlib1g libelf1t64 libcompel1)

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_DIR
DEB_FILE=""
CRIU_DEB_FILE=""
WHEEL_FILE=""
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
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# an existing file's absolute path (apt installs a local .deb only when named with a slash)
artifact_arg() {
    [[ -f ${2:-} ]] || die "$1 needs an existing file (got '${2:-}')"
    realpath "$2"
}

parse_args() {
    while (($#)); do
        case $1 in
            --deb) DEB_FILE=$(artifact_arg "$1" "${2:-}"); shift ;;
            --criu-deb) CRIU_DEB_FILE=$(artifact_arg "$1" "${2:-}"); shift ;;
            --wheel) WHEEL_FILE=$(artifact_arg "$1" "${2:-}"); shift ;;
            --test) die "test provisioning moved to packaging/install-test.sh (it runs this installer first)" ;;
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

# install_system_packages PACKAGE...: those missing, from the machine's own apt sources.
install_system_packages() {
    local wanted=("$@") missing=() p
    # python3-venv (building the artifacts makes a small venv) only matters when the python3 first on
    # PATH is Debian's and lacks venv/ensurepip (pyenv's Python has both).
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
}

# The host's runtime tools: CRIU's network lock execs iptables-restore; runc is what the shim runs.
check_runtime_tools() {
    command -v iptables-restore >/dev/null || die "iptables-restore not found after installing iptables"
    command -v runc >/dev/null || die "runc not found after installing it"
    [[ -x /usr/bin/python3 ]] || die "/usr/bin/python3 not found after installing python3"
    note "runc: $(command -v runc) -> $(runc --version | awk 'NR==1{print $3}'); python3: /usr/bin/python3 -> $(/usr/bin/python3 -c 'import platform; print(platform.python_version())')"
    note "iptables-restore: $(command -v iptables-restore) ($(iptables-restore --version 2>&1 | head -n 1))"
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

# the wrapper earlier installers wrote into /usr/local/sbin (a regular file with the marker)
is_our_wrapper() {
    [[ -f $1 && ! -L $1 ]] && grep -q "$CRIU_WRAPPER_MARKER" "$1" 2>/dev/null
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

# /opt/pyshim/criu: sid's criu and its libraries unpacked, the input of packaging/build.sh's pyshim-criu
# package (and of the tests' checkpointctl, which runs through the same loader).
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
}

# The unpacked prefix is there and its criu runs through its loader, or it is (re)made.
ensure_criu_prefix() {
    local loader=$CRIU_PREFIX/usr/lib/$LIB_TRIPLET/$LOADER_NAME v=""
    if [[ -x $CRIU_PREFIX/usr/sbin/criu && -e $loader ]]; then
        v=$("$loader" --library-path "$CRIU_PREFIX/usr/lib/$LIB_TRIPLET" "$CRIU_PREFIX/usr/sbin/criu" --version 2>/dev/null |
            awk '/^Version:/ { print $2; exit }' || true)
    fi
    if [[ -z $v ]] || ! dpkg --compare-versions "$v" ge "$CRIU_MIN_VERSION"; then
        install_private_criu
    fi
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
# the artifacts: built from this checkout unless given

DIST_DIR=""

# packaging/build.sh into the checkout's dist/ (it returns at once when dist/ matches the checkout).
build_artifacts() {
    [[ -f $REPO_DIR/packaging/build.sh && -f $REPO_DIR/pyproject.toml ]] ||
        die "no --deb or --wheel given and $REPO_DIR is not a pyshim checkout to build one from"
    say "build: packaging/build.sh (log: $LOG_DIR/build.log)"
    if ! bash "$REPO_DIR/packaging/build.sh" >"$LOG_DIR/build.log" 2>&1; then
        tail -n 25 "$LOG_DIR/build.log" >&2
        die "building the artifacts failed (full log: $LOG_DIR/build.log)"
    fi
    sed 's/^/  /' "$LOG_DIR/build.log" | grep -E 'build: ' || true
    DIST_DIR=$REPO_DIR/dist
}

# the one file matching a glob in a directory, or nothing
only_match() {
    local matches=()
    mapfile -t matches < <(compgen -G "$1" || true)
    ((${#matches[@]} <= 1)) || die "more than one file matches $1: ${matches[*]}"
    ((${#matches[@]} == 0)) || realpath "${matches[0]}"
}

# True when the package a .deb holds is installed with exactly that version and those files.
deb_is_installed() {
    local deb=$1 pkg version
    pkg=$(dpkg-deb -f "$deb" Package)
    version=$(dpkg-deb -f "$deb" Version)
    package_installed "$pkg" && [[ $(dpkg-query -W -f='${Version}' "$pkg") == "$version" ]] &&
        cmp -s <(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./md5sums) "/var/lib/dpkg/info/$pkg.md5sums"
}

# apt-get install of local .debs (their dependencies from the system's sources); --reinstall, because a
# rebuilt package of the same version is otherwise "already the newest".
apt_install_debs() {
    local debs=("$@") install
    install=(apt-get -q -y --no-install-recommends --reinstall -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold install "${debs[@]}")
    if ! "${install[@]}" >"$LOG_DIR/apt-install-debs.log" 2>&1; then
        ((SYSTEM_APT_UPDATED)) && { tail -n 25 "$LOG_DIR/apt-install-debs.log" >&2; die "apt-get install ${debs[*]} failed"; }
        system_apt_update
        run_logged "$LOG_DIR/apt-install-debs.log" "${install[@]}"
    fi
}

# ----------------------------------------------------------------------------------------------------
# CRIU on the host: the system's when new enough, else the pyshim-criu package

CRIU_BIN=""
CRIU_VERSION=""

# Prints the pyshim-criu .deb to install, or nothing when the host's CRIU will do.
criu_deb_needed() {
    local deb=$1
    if package_installed pyshim-criu; then
        # Keep the package current with the artifacts at hand.
        [[ -n $deb ]] && ! deb_is_installed "$deb" && echo "$deb"
        return 0
    fi
    local system
    for system in /usr/sbin/criu /usr/bin/criu; do
        if [[ -x $system ]] && ! is_our_wrapper "$system" && criu_is_good "$system"; then
            note "criu: the system's $system ($(criu_version_of "$system")) passes 'criu check'; pyshim-criu not needed"
            return 0
        fi
    done
    [[ -n $deb ]] || die "this host's CRIU is missing or older than $CRIU_MIN_VERSION, and no pyshim-criu .deb is at hand:" \
        "pass --criu-deb FILE (built by packaging/build.sh) or install criu >= $CRIU_MIN_VERSION"
    echo "$deb"
}

# Earlier installers put a wrapper for /opt/pyshim/criu in /usr/local/sbin, ahead of /usr/sbin on PATH;
# it becomes a link to the installed criu, so whatever named it keeps working and runs the same CRIU.
retire_legacy_criu_wrapper() {
    is_our_wrapper "$CRIU_WRAPPER" || return 0
    [[ -x /usr/sbin/criu ]] || return 0
    ln -sfn /usr/sbin/criu "$CRIU_WRAPPER"
    note "criu: $CRIU_WRAPPER (an earlier installer's wrapper) now links to /usr/sbin/criu"
}

check_criu() {
    CRIU_BIN=$(command -v criu || true)
    [[ -n $CRIU_BIN ]] || die "no criu on PATH after installing"
    CRIU_VERSION=$(criu_version_of "$CRIU_BIN")
    local check rc=0
    check=$("$CRIU_BIN" check 2>&1) || rc=$?
    ((rc == 0)) || die "'$CRIU_BIN check' failed (exit $rc):"$'\n'"$check"
    local owner
    owner=$(dpkg -S "$(readlink -f "$CRIU_BIN")" 2>/dev/null | cut -d: -f1 || echo "no package")
    say "criu: $CRIU_BIN -> $CRIU_VERSION ($owner), criu check: ok ($(tail -n 1 <<<"$check"))"
    # Informational: which kernel features CRIU misses here (no soft-dirty: no pre-dump).
    local missing
    missing=$("$CRIU_BIN" check --all 2>&1 | sed -n 's/^\(Warn\|Error\) *(criu\/cr-check.c:[0-9]*): *//p' | paste -sd ";" || true)
    [[ -z $missing ]] || note "criu check --all: $missing"
}

# ----------------------------------------------------------------------------------------------------
# pyshim

# Earlier installers linked /usr/local/bin/containerd-shim-pyshim-v2 to their venv's launcher, which would
# come before the packaged /usr/bin one on containerd's PATH.
remove_legacy_shim_link() {
    local target
    target=$(readlink "$LEGACY_SHIM_LINK" 2>/dev/null || true)
    if [[ $target == "$VENV"/bin/* ]]; then
        rm -f "$LEGACY_SHIM_LINK"
        note "shim: removed $LEGACY_SHIM_LINK (-> $target, an earlier installer's editable venv)"
    fi
}

# pyshim from a wheel, for hosts that take no .deb: the same layout under /usr/local/lib/pyshim.
install_wheel() {
    local wheel=$1 site=$WHEEL_PREFIX/site pip_python
    # pip comes from a throwaway venv of Debian's python3, the interpreter the launcher runs.
    /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || install_system_packages python3-venv
    ensure_pycriu
    pip_python=$(mktemp -d /tmp/pyshim-pip.XXXXXX)
    run_logged "$LOG_DIR/wheel.log" /usr/bin/python3 -m venv "$pip_python"
    rm -rf "$site.new"
    run_logged "$LOG_DIR/wheel.log" "$pip_python/bin/python" -m pip install --no-input --only-binary=:all: \
        --target "$site.new" "$wheel[tool]"
    rm -rf "$pip_python" "$site.new/bin" "$site"
    mkdir -p "$WHEEL_PREFIX/bin"
    mv "$site.new" "$site"
    cat <<LAUNCHER | write_if_changed "$WHEEL_PREFIX/bin/containerd-shim-pyshim-v2" 0755 || true
#!/usr/bin/python3 -IS
# containerd-shim-pyshim-v2, written by pyshim packaging/install.sh --wheel: no site processing on the hot path.
# shim.criu.bindings finds pycriu in $PYCRIU_DIR, one of the places it knows.
import sys
sys.path[1:1] = ["$site"]
from shim.__main__ import main
sys.exit(main())
LAUNCHER
    ln -sfn "$WHEEL_PREFIX/bin/containerd-shim-pyshim-v2" "$LEGACY_SHIM_LINK"
    # The pyshim command: its tool extra (grpcio, zstandard) sits in the same site, built for this python3.
    cat <<LAUNCHER | write_if_changed "$WHEEL_PREFIX/bin/pyshim" 0755 || true
#!/usr/bin/python3 -IS
# pyshim, written by pyshim packaging/install.sh --wheel: the command for checkpoint workflows (docs/cli.md).
import sys
sys.path[1:1] = ["$site"]
from shim.tool.__main__ import main
sys.exit(main())
LAUNCHER
    ln -sfn "$WHEEL_PREFIX/bin/pyshim" /usr/local/bin/pyshim
    SHIM_INSTALLED=$LEGACY_SHIM_LINK
    say "pyshim: $(basename "$wheel") -> $site; $SHIM_INSTALLED"
}

SHIM_INSTALLED=$SHIM

# The installed shim answers -v, and its interpreter imports what it needs from the package's paths only.
check_shim() {
    local version
    version=$("$SHIM_INSTALLED" -v 2>&1) || die "$SHIM_INSTALLED -v failed: $version"
    local launcher paths check
    launcher=$(readlink -f "$SHIM_INSTALLED")
    paths=$(sed -n 's/^sys.path\[1:1\] = //p' "$launcher")
    [[ -n $paths ]] || die "$launcher does not name its import paths"
    check=$(cd / && /usr/bin/python3 -IS -c "
import sys
sys.path[1:1] = $paths
import shim, google.protobuf, pyroute2
from shim.criu import bindings
bindings.rpc_messages(), bindings.image_codec()
print(shim.__file__, google.protobuf.__version__, pyroute2.__version__)" 2>&1) ||
        die "the installed shim's modules do not import with /usr/bin/python3:"$'\n'"$check"
    say "pyshim: $SHIM_INSTALLED -> $launcher, $(awk '/Version:/ {print $2}' <<<"$version"); shim, protobuf, pyroute2, pycriu import from $(dirname "$(dirname "${check%% *}")") (protobuf $(cut -d' ' -f2 <<<"$check"))"
    # The pyshim command, beside the shim: its help needs its own imports (grpcio) only lazily, so ask its doctor
    # for nothing and just load the containerd client it would use.
    local tool
    tool=$(dirname "$SHIM_INSTALLED")/pyshim
    [[ -x $tool ]] || die "the pyshim command is missing beside $SHIM_INSTALLED"
    check=$(cd / && "$tool" --help 2>&1) || die "$tool --help failed:"$'\n'"$check"
    check=$(cd / && /usr/bin/python3 -IS -c "
import sys
sys.path[1:1] = $(sed -n 's/^sys.path\[1:1\] = //p' "$(readlink -f "$tool")")
import grpc, zstandard
print(grpc.__version__, zstandard.__version__)" 2>&1) || die "the pyshim command's grpcio/zstandard do not import:"$'\n'"$check"
    say "pyshim: $tool answers --help; grpcio $(cut -d' ' -f1 <<<"$check"), zstandard $(cut -d' ' -f2 <<<"$check")"
}

# ----------------------------------------------------------------------------------------------------

main() {
    parse_args "$@"
    check_machine
    mkdir -p "$PREFIX" "$LOG_DIR"
    # One installer at a time (CI and a developer could overlap).
    exec 9>>"$PREFIX/.install.lock"
    flock -w 600 9 || die "another install.sh holds $PREFIX/.install.lock"

    install_system_packages "${SYSTEM_PACKAGES[@]}"
    check_runtime_tools
    if [[ -z $DEB_FILE && -z $WHEEL_FILE ]]; then
        build_artifacts
        DEB_FILE=$(only_match "$DIST_DIR/pyshim_*_$DEB_ARCH.deb")
        [[ -n $DEB_FILE ]] || die "packaging/build.sh left no pyshim_*_$DEB_ARCH.deb in $DIST_DIR"
    fi
    if [[ -z $CRIU_DEB_FILE ]]; then
        local beside=${DIST_DIR:-$(dirname "${DEB_FILE:-$WHEEL_FILE}")}
        CRIU_DEB_FILE=$(only_match "$beside/pyshim-criu_*_$DEB_ARCH.deb")
    fi

    local debs=() criu_deb
    criu_deb=$(criu_deb_needed "$CRIU_DEB_FILE")
    [[ -z $criu_deb ]] || debs+=("$criu_deb")
    if [[ -n $DEB_FILE ]]; then
        [[ $(dpkg-deb -f "$DEB_FILE" Package) == pyshim ]] || die "$DEB_FILE is not a pyshim package"
        deb_is_installed "$DEB_FILE" || debs+=("$DEB_FILE")
    fi
    if ((${#debs[@]})); then
        say "apt: installing ${debs[*]##*/}"
        apt_install_debs "${debs[@]}"
    else
        say "apt: ${DEB_FILE:+$(basename "$DEB_FILE") and }the host's CRIU already installed"
    fi
    [[ -z $WHEEL_FILE ]] || install_wheel "$WHEEL_FILE"
    retire_legacy_criu_wrapper
    [[ -n $WHEEL_FILE ]] || remove_legacy_shim_link
    check_criu
    check_shim
    say "done in $((SECONDS - START_SECONDS))s"
}

# Run only when executed, so the functions can also be sourced (build.sh, install-test.sh).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
