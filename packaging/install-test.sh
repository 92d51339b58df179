#!/usr/bin/env bash
# pyshim's test provisioning, for Debian 12 (bookworm) and 13 (trixie), run as root:
#
#   bash packaging/install-test.sh          # everything the tests need (what CI runs before run-tests.sh)
#   bash packaging/install-test.sh --demo   # only what packaging/demo.sh needs (demo.sh runs this itself)
#
# First it runs packaging/install.sh, which builds the release artifacts from this checkout and installs
# them: the tests drive the INSTALLED shim (/usr/bin/containerd-shim-pyshim-v2 from the pyshim .deb),
# never the checkout. Then, for the tests only:
#   * the .deb's removal and reinstallation are checked (packaging/check-deb-removal.sh);
#   * test tools from the machine's own apt sources (crun, nftables, busybox-static, gcc, libc6-dev, tmux);
#   * containerd 1.6 (bookworm), 1.7 (trixie) and 2.x (sid) side by side, unpacked with dpkg -x;
#   * the system suite's redis-server and redis-cli unpacked (not installed);
#   * /opt/pyshim/venv: pyshim's dependencies and [test,dev] extras from pyproject.toml, NOT pyshim itself
#     (unit tests import the checkout; containerd runs the installed shim), pycriu on its path;
#   * /opt/pyshim/env, the KEY=VALUE file the tests read;
#   * every packaging/fixtures/*.sh, after the env file (a fixture may add its own keys to it).
# Idempotent: a second run rebuilds nothing when the checkout did not change and downloads nothing.
set -euo pipefail

TEST_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly TEST_REPO
# The installer's helpers and paths (its main does not run when sourced).
# shellcheck source=install.sh
source "$TEST_REPO/packaging/install.sh"

# crun: the alternative OCI runtime the tests compare; nftables: `nft`, for reading CRIU's nftables lock;
# busybox-static: the test image; gcc and libc6-dev build the tests' small static helpers
# (integration/harness/*.c); tmux: the terminal tests. openssh-server (the migration tests' private sshd) is
# installed apart, by ensure_sshd_fixture, so that its own service neither starts nor stays enabled.
readonly TEST_PACKAGES=(crun nftables busybox-static tmux gcc libc6-dev)
readonly DEMO_PACKAGES=(busybox-static)
DEMO_ONLY=0

test_usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

test_parse_args() {
    while (($#)); do
        case $1 in
            --demo) DEMO_ONLY=1 ;;
            -h | --help) test_usage; exit 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
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

# all three for the tests; for the demo, 2.x and whichever others are already there (kept in the env file)
ensure_all_containerd() {
    mkdir -p "$CONTAINERD_ROOT"
    local slot suite
    for slot in 1.6 1.7 2; do
        case $slot in 1.6) suite=bookworm ;; 1.7) suite=trixie ;; 2) suite=sid ;; esac
        if ((!DEMO_ONLY)) || [[ $slot == 2 || -d $CONTAINERD_ROOT/$slot ]]; then
            ensure_containerd "$slot" "$suite"
        fi
    done
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
# the test venv: pyshim's dependencies and extras, never pyshim (so it can provide no shim)

PYTHON_VERSION=""
VENV_EXTRAS=""

# pyproject.toml's dependencies plus the extras asked for, one requirement a line
venv_requirements() {
    "$1" - "$REPO_DIR/pyproject.toml" "$2" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    wanted += project["optional-dependencies"][extra]
print("\n".join(wanted))
PY
}

ensure_venv() {
    local py base want_prefix
    py=$(command -v python3) || die "no python3 on PATH"
    # Through pyenv's shim, sys.executable names the real interpreter; the venv is made from that.
    base=$("$py" -c 'import sys; print(sys.executable)')
    PYTHON_VERSION=$("$base" -c 'import platform; print(platform.python_version())')
    "$base" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$PYTHON_MIN_VERSION'.split('.'))))" ||
        die "python3 on PATH ($base) is $PYTHON_VERSION; pyshim needs >= $PYTHON_MIN_VERSION"
    want_prefix=$("$base" -c 'import sys; print(sys.prefix)')

    # Reuse the venv only when it was made from this very interpreter and holds no pyshim (earlier
    # installers put an editable pyshim and a shim launcher there).
    local have=""
    if [[ -x $VENV/bin/python ]]; then
        have=$("$VENV/bin/python" -c 'import sys, platform; print(sys.base_prefix, platform.python_version())' 2>/dev/null || true)
        # -I: not from the working directory (a checkout with pyshim.egg-info would answer)
        if "$VENV/bin/python" -I -c 'import importlib.metadata as m; m.version("pyshim")' >/dev/null 2>&1 ||
            [[ -e $VENV/bin/containerd-shim-pyshim-v2 ]]; then
            have="holds pyshim"
        fi
    fi
    if [[ $have != "$want_prefix $PYTHON_VERSION" ]]; then
        say "venv: creating $VENV from $base ($PYTHON_VERSION)${have:+ (the old one: $have)}"
        rm -rf "$VENV"
        run_logged "$LOG_DIR/venv.log" "$base" -m venv "$VENV"
    fi

    install_requirements_into_venv
    add_pycriu_to_venv

    # pycriu's generated messages must load with the venv's protobuf (from PyPI), not Debian's.
    local check
    check=$("$VENV/bin/python" -c '
import google.protobuf, pycriu, pycriu.rpc_pb2, pycriu.images
print(google.protobuf.__version__, pycriu.__file__)' 2>&1) ||
        die "pycriu does not import in $VENV:"$'\n'"$check"
    [[ ! -e $VENV/bin/containerd-shim-pyshim-v2 ]] || die "$VENV/bin/containerd-shim-pyshim-v2 exists: the test venv must not provide a shim"
    say "venv: $VENV -> Python $PYTHON_VERSION, pyshim's requirements${VENV_EXTRAS:+ and [$VENV_EXTRAS]} (no pyshim), protobuf ${check%% *}; import pycriu, pycriu.rpc_pb2, pycriu.images: ok"
}

# pip runs only when pyproject.toml or the extras changed since the last run.
install_requirements_into_venv() {
    local stamp=$VENV/.pyshim-requirements pyproject_sum have_extras="" have_sum=""
    [[ -f $REPO_DIR/pyproject.toml ]] || die "no pyproject.toml in $REPO_DIR"
    pyproject_sum=$(sha256sum "$REPO_DIR/pyproject.toml" | awk '{print $1}')
    if [[ -f $stamp ]]; then
        have_sum=$(sed -n 's/^pyproject=//p' "$stamp")
        have_extras=$(sed -n 's/^extras=//p' "$stamp")
    fi
    local extras=""
    # the tests' extras; a later --demo run keeps whatever extras are already installed.
    if ((!DEMO_ONLY)) || [[ $have_extras == test,dev ]]; then extras=test,dev; fi
    VENV_EXTRAS=$extras
    [[ $have_sum == "$pyproject_sum" && $have_extras == "$extras" ]] && return
    local requirements=$VENV/.pyshim-requirements.txt
    venv_requirements "$VENV/bin/python" "$extras" >"$requirements"
    say "venv: pip install -r $requirements (log: $LOG_DIR/pip.log)"
    run_logged "$LOG_DIR/pip.log" "$VENV/bin/python" -m pip install --no-input -r "$requirements"
    printf 'pyproject=%s\nextras=%s\n' "$pyproject_sum" "$extras" >"$stamp"
}

add_pycriu_to_venv() {
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PYCRIU_DIR" | write_if_changed "$site/pyshim-pycriu.pth" &&
        note "venv: $site/pyshim-pycriu.pth -> $PYCRIU_DIR"
    return 0
}

# ----------------------------------------------------------------------------------------------------
# /opt/pyshim/env: what the tests read. Keys this script does not own (a fixture's) are kept.

write_env_file() {
    local ours
    ours=$(
        echo "# written by pyshim packaging/install-test.sh; shell-sourceable KEY=VALUE lines"
        echo "PYSHIM_PREFIX=$PREFIX"
        echo "PYSHIM_VENV=$VENV"
        echo "PYSHIM_PYTHON=$VENV/bin/python"
        echo "PYSHIM_PYTHON_VERSION=$PYTHON_VERSION"
        echo "PYSHIM_CRIU=$CRIU_BIN"
        echo "PYSHIM_CRIU_VERSION=$CRIU_VERSION"
        echo "PYSHIM_PYCRIU_DIR=$PYCRIU_DIR"
        echo "PYSHIM_PYCRIU_VERSION=$PYCRIU_VERSION"
        local slot
        for slot in 1.6 1.7 2; do
            [[ -n ${CONTAINERD_VERSION[$slot]:-} ]] || continue
            echo "PYSHIM_CONTAINERD_${slot//./_}=$CONTAINERD_ROOT/$slot/bin"
            echo "PYSHIM_CONTAINERD_${slot//./_}_VERSION=${CONTAINERD_VERSION[$slot]}"
        done
        echo "PYSHIM_RUNC=$(command -v runc)"
        echo "PYSHIM_RUNC_VERSION=$(runc --version | awk 'NR==1{print $3}')"
        if command -v crun >/dev/null; then
            echo "PYSHIM_CRUN=$(command -v crun)"
            echo "PYSHIM_CRUN_VERSION=$(crun --version | awk 'NR==1{print $3}')"
        fi
        echo "PYSHIM_BUSYBOX=$(command -v busybox || echo /bin/busybox)"
        # The installed shim (pyshim .deb); the harness puts it first on each test containerd's PATH.
        echo "PYSHIM_SHIM=$SHIM"
        # The installed `pyshim` command (same .deb); the tool tests run it rather than the checkout.
        echo "PYSHIM_TOOL=$(dirname "$SHIM")/pyshim"
        if [[ -n $REDIS_VERSION ]]; then
            echo "PYSHIM_REDIS=$REDIS_PREFIX"
            echo "PYSHIM_REDIS_VERSION=$REDIS_VERSION"
        fi
    )
    local keys others=""
    keys=$(sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' <<<"$ours" | paste -sd '|')
    if [[ -f $ENV_FILE ]]; then
        others=$(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$ENV_FILE" | grep -vE "^($keys)=" || true)
    fi
    printf '%s\n%s' "$ours" "$others" | sed '/^$/d' | if write_if_changed "$ENV_FILE"; then
        say "env: wrote $ENV_FILE"
    else
        say "env: $ENV_FILE unchanged"
    fi
}

# ----------------------------------------------------------------------------------------------------

# openssh-server for the migration tests, whose sshd runs privately on 127.0.0.1 (integration/harness/sshd.py).
# Debian's package enables and starts ssh.service, an sshd on every address, when it is installed: a policy-rc.d
# refusing every start (exit 101) is in place for that install only (one already there is kept and honoured), and
# what the install enabled is disabled again (stopped too, if it started all the same). A host that had the package
# before keeps its sshd as it was.
ensure_sshd_fixture() {
    if package_installed openssh-server; then
        say "sshd: openssh-server present (its service left as it was)"
        return
    fi
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# pyshim install-test.sh: no service starts while openssh-server installs\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        # removed however the install ends (die exits the script)
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        install_system_packages openssh-server
        rm -f "$policy"
        trap - EXIT
    else
        install_system_packages openssh-server
    fi
    local unit
    for unit in ssh.service ssh.socket; do
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        else
            systemctl disable "$unit" >/dev/null 2>&1 || true  # no systemd running: only the unit's links
        fi
    done
    say "sshd: openssh-server installed, its service not started and disabled"
}

run_fixtures() {
    local fixture
    for fixture in "$TEST_REPO"/packaging/fixtures/*.sh; do
        [[ -f $fixture ]] || continue
        say "fixture: $fixture"
        bash "$fixture" || die "fixture $fixture failed (exit $?)"
    done
}

test_main() {
    test_parse_args "$@"
    local started=$SECONDS
    # The host installer first: builds the artifacts from this checkout, installs the .debs.
    bash "$TEST_REPO/packaging/install.sh" || die "packaging/install.sh failed"
    check_machine >/dev/null
    mkdir -p "$PREFIX" "$LOG_DIR"
    exec 9>>"$PREFIX/.install.lock"
    flock -w 600 9 || die "another installer holds $PREFIX/.install.lock"

    local pyshim_deb
    pyshim_deb=$(only_match "$TEST_REPO/dist/pyshim_*_$DEB_ARCH.deb")
    if ((!DEMO_ONLY)); then
        # The suite needs the package installed: the check ends by reinstalling it.
        bash "$TEST_REPO/packaging/check-deb-removal.sh" "$pyshim_deb" || die "the pyshim .deb did not remove and reinstall cleanly"
        install_system_packages "${TEST_PACKAGES[@]}"
        ensure_sshd_fixture
    else
        install_system_packages "${DEMO_PACKAGES[@]}"
    fi
    CRIU_BIN=$(command -v criu) || die "no criu on PATH after packaging/install.sh"
    CRIU_VERSION=$(criu_version_of "$CRIU_BIN")
    ensure_pycriu
    ensure_all_containerd
    REDIS_VERSION=""
    if ((!DEMO_ONLY)) || [[ -d $REDIS_PREFIX ]]; then ensure_redis; fi
    ensure_venv
    write_env_file
    ((DEMO_ONLY)) || run_fixtures
    say "install-test: done in $((SECONDS - started))s$( ((DEMO_ONLY)) && echo ' (demo only)')"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    test_main "$@"
fi
