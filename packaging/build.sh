#!/usr/bin/env bash
# Builds a pyshim release into dist/ (Debian 12/13, amd64), run as root on a Debian machine:
#
#   bash packaging/build.sh [--out DIR] [--force]
#
#   dist/pyshim-<version>-py3-none-any.whl    the Python package (non-editable; generated code in shim/api)
#   dist/pyshim_<version>_amd64.deb           pyshim in /usr/lib/pyshim with protobuf, pyroute2 and pycriu,
#                                             /usr/bin/containerd-shim-pyshim-v2, /usr/bin/pyshim (the command,
#                                             with grpcio and zstandard per CPython), snippets, docs
#   dist/pyshim-criu_<criu version>_amd64.deb Debian sid's CRIU >= 4.2 with its libraries in /usr/lib/pyshim-criu
#                                             and /usr/sbin/criu (Debian 12 and 13 ship older CRIUs)
#   dist/SHA256SUMS
#
# Inputs: the checkout's tracked and untracked-but-not-ignored files, PyPI (the build backend, protobuf,
# pyroute2) and Debian sid (criu, its libraries, python3-pycriu) through the installer's private apt
# under /opt/pyshim/apt, unpacked in /opt/pyshim/{criu,pycriu}. When neither the checkout nor those
# inputs changed since the last build, it only says so (a second run takes a second); --force rebuilds.
set -euo pipefail

BUILD_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly BUILD_REPO
# The installer's functions: private apt, the CRIU prefix, pycriu, logging helpers (its main does not run).
# shellcheck source=install.sh
source "$BUILD_REPO/packaging/install.sh"

OUT=$BUILD_REPO/dist
FORCE=0
readonly PACKAGE_PREFIX=/usr/lib/pyshim
readonly CRIU_PACKAGE_PREFIX=/usr/lib/pyshim-criu
readonly BUILD_VENV=$BUILD_REPO/build/venv
readonly MAINTAINER="pyshim developers <pyshim@localhost>"
STAGE=""

build_die() {
    printf 'build.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

build_usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

build_parse_args() {
    while (($#)); do
        case $1 in
            --out) OUT=$(realpath -m "${2:?--out needs a directory}"); shift ;;
            --force) FORCE=1 ;;
            -h | --help) build_usage; exit 0 ;;
            *) build_die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
}

project_version() {
    "$BUILD_PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
        "$BUILD_REPO/pyproject.toml"
}

# The checkout's files as git sees them (tracked + untracked, minus .gitignore'd), NUL-separated.
# Outside git (an exported tarball) every file but build outputs and caches counts.
source_files() {
    if git -C "$BUILD_REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$BUILD_REPO" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [[ -f $BUILD_REPO/$f ]] && printf '%s\0' "$f"; done
    else
        (cd "$BUILD_REPO" && find . -type f ! -path './dist/*' ! -path './build/*' ! -path './.git/*' \
            ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -printf '%P\0')
    fi
}

# What a build depends on: the checkout's content and the unpacked sid packages.
source_digest() {
    {
        (cd "$BUILD_REPO" && source_files | sort -z | xargs -0 sha256sum)
        echo "criu $(zcat "$CRIU_PREFIX/usr/share/doc/criu/changelog.Debian.gz" | head -n 1)"
        echo "pycriu $PYCRIU_VERSION"
    } | sha256sum | awk '{print $1}'
}

# A small venv that only builds (pip, setuptools); in the checkout's ignored build/.
ensure_build_venv() {
    local py
    py=$(command -v python3) || build_die "no python3 on PATH"
    py=$("$py" -c 'import sys; print(sys.executable)')
    if [[ ! -x $BUILD_VENV/bin/python ]] || ! "$BUILD_VENV/bin/python" -c 'import setuptools' >/dev/null 2>&1; then
        say "build: creating $BUILD_VENV (pip, setuptools)"
        rm -rf "$BUILD_VENV"
        mkdir -p "$(dirname "$BUILD_VENV")"
        run_logged "$LOG_DIR/build-venv.log" "$py" -m venv "$BUILD_VENV"
        run_logged "$LOG_DIR/build-venv.log" "$BUILD_VENV/bin/python" -m pip install --no-input -q "setuptools>=68"
    fi
    BUILD_PYTHON=$BUILD_VENV/bin/python
}

# The wheel, built from a copy of the checkout's files (setuptools' build/ and egg-info never see the
# checkout, and nothing ignored or stale can slip in).
build_wheel() {
    local src=$STAGE/src
    mkdir -p "$src"
    (cd "$BUILD_REPO" && source_files | xargs -0 cp --parents -t "$src")
    rm -f "$OUT"/pyshim-*.whl
    run_logged "$LOG_DIR/build-wheel.log" "$BUILD_PYTHON" -m pip wheel --no-input --no-deps --no-build-isolation \
        -w "$OUT" "$src"
    WHEEL=$(ls "$OUT"/pyshim-"$VERSION"-*.whl)
    # Every module and data file under shim/ in the checkout must be in the wheel.
    local missing
    missing=$(comm -23 \
        <(cd "$src" && find shim -type f \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) | sort) \
        <("$BUILD_PYTHON" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL" |
            grep '^shim/' | sort))
    [[ -z $missing ]] || build_die "the wheel lacks files of the checkout's shim/:"$'\n'"$missing"
    say "build: $WHEEL ($("$BUILD_PYTHON" -c 'import sys, zipfile; print(len(zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL") files)"
}

# The shim's launcher: Debian's python3, isolated and without site processing (no .pth files, no
# dist-packages) on containerd's hot path; the import paths are the package's own, named here.
write_launcher() {
    local dest=$1 python=$2 site=$3 pycriu=$4
    cat >"$dest" <<LAUNCHER
#!$python -IS
# containerd-shim-pyshim-v2, written by pyshim packaging/build.sh: no site processing on containerd's hot path;
# pyshim, protobuf and pyroute2 come from $site only; shim.criu.bindings loads pycriu from $pycriu when a
# checkpoint or restore needs it (off sys.path, so PYSHIM_PYCRIU_PATH can point elsewhere).
import sys
sys.path[1:1] = ["$site"]
from shim.__main__ import main
sys.exit(main())
LAUNCHER
    chmod 0755 "$dest"
}

# The `pyshim` command's own dependencies (the `tool` extra: grpcio, zstandard) are compiled for one CPython
# each, not abi3: one directory per CPython the supported Debians ship (12: 3.11, 13: 3.13); the command's
# launcher takes its interpreter's. The shim itself needs none of them.
readonly TOOL_PYTHONS=(3.11 3.13)

tool_requirements() {
    "$BUILD_PYTHON" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["tool"]))' \
        "$BUILD_REPO/pyproject.toml"
}

install_tool_dependencies() {
    local dest=$1 version requirements
    mapfile -t requirements < <(tool_requirements)
    for version in "${TOOL_PYTHONS[@]}"; do
        run_logged "$LOG_DIR/build-tool.log" "$BUILD_PYTHON" -m pip install --no-input --no-compile \
            --only-binary=:all: --implementation cp --python-version "$version" \
            --platform "manylinux2014_$(uname -m)" --target "$dest/cp${version/./}" "${requirements[@]}"
    done
}

# The `pyshim` command's launcher: like the shim's, plus the tool dependencies built for its interpreter.
write_tool_launcher() {
    local dest=$1 python=$2 site=$3 tool=$4
    cat >"$dest" <<LAUNCHER
#!$python -IS
# pyshim, written by pyshim packaging/build.sh: the command for checkpoint workflows (docs/cli.md).
import sys
sys.path[1:1] = ["$site", "$tool/cp3%d" % sys.version_info.minor]
from shim.tool.__main__ import main
sys.exit(main())
LAUNCHER
    chmod 0755 "$dest"
}

installed_size_kib() {
    du -sk --exclude=DEBIAN "$1" | awk '{print $1}'
}

write_md5sums() {
    local root=$1
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
        >"$root/DEBIAN/md5sums"
}

# dpkg-deb with root-owned files whatever the staging's owner; xz keeps the criu package small.
pack_deb() {
    local root=$1 deb=$2
    find "$root" -type d -exec chmod 0755 {} +
    run_logged "$LOG_DIR/build-deb.log" dpkg-deb --root-owner-group -Zxz --build "$root" "$deb"
}

# ----------------------------------------------------------------------------------------------------
# pyshim_<version>_amd64.deb

build_pyshim_deb() {
    local root=$STAGE/pyshim
    local site=$root$PACKAGE_PREFIX/site pycriu=$root$PACKAGE_PREFIX/pycriu doc=$root/usr/share/doc/pyshim
    mkdir -p "$site" "$pycriu" "$root$PACKAGE_PREFIX/bin" "$root/usr/bin" "$root/usr/share/pyshim" "$doc/examples" \
        "$root/DEBIAN"
    # pyshim and its dependencies from the wheel; no bytecode (postinst compiles for the python3 it finds).
    run_logged "$LOG_DIR/build-site.log" "$BUILD_PYTHON" -m pip install --no-input --no-compile --only-binary=:all: \
        --target "$site" "$WHEEL"
    # the console script (the package has its own launcher) and pip's record of the build directory
    rm -rf "$site/bin" "$site"/pyshim-*.dist-info/direct_url.json
    # Debian 12 has Python 3.11, Debian 13 3.13: every compiled module must be abi3 (protobuf's is).
    local native
    native=$(find "$site" -name '*.so' ! -name '*.abi3.so' -printf '%P\n')
    [[ -z $native ]] || build_die "compiled modules tied to one Python version would break on Debian 12 or 13:"$'\n'"$native"
    cp -a "$PYCRIU_DIR/pycriu" "$PYCRIU_DIR"/pycriu-*.dist-info "$pycriu/"
    install_tool_dependencies "$root$PACKAGE_PREFIX/tool"
    find "$root" -name __pycache__ -prune -exec rm -rf {} +

    write_launcher "$root$PACKAGE_PREFIX/bin/containerd-shim-pyshim-v2" /usr/bin/python3 \
        "$PACKAGE_PREFIX/site" "$PACKAGE_PREFIX/pycriu"
    ln -s "../lib/pyshim/bin/containerd-shim-pyshim-v2" "$root/usr/bin/containerd-shim-pyshim-v2"
    write_tool_launcher "$root$PACKAGE_PREFIX/bin/pyshim" /usr/bin/python3 "$PACKAGE_PREFIX/site" "$PACKAGE_PREFIX/tool"
    ln -s "../lib/pyshim/bin/pyshim" "$root/usr/bin/pyshim"
    printf 'version=%s\nsource=%s\n' "$VERSION" "$DIGEST" >"$root$PACKAGE_PREFIX/BUILD"

    # containerd snippets and registration, whatever packaging/containerd holds at build time.
    cp -a "$BUILD_REPO/packaging/containerd" "$root/usr/share/pyshim/containerd"
    cp "$BUILD_REPO/README.md" "$doc/README.md"
    cp "$BUILD_REPO"/docs/*.md "$doc/"
    cp "$BUILD_REPO/packaging/README.md" "$doc/packaging.md"
    # The host config is an example, not a conffile: the shim runs with its defaults when
    # /etc/pyshim/pyshim.toml is absent, and a conffile would outlive `apt remove`.
    cp "$BUILD_REPO/packaging/containerd/pyshim.toml" "$doc/examples/pyshim.toml"
    cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pyshim

Files: usr/lib/pyshim/site/shim/*
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/pyshim/site/google/* usr/lib/pyshim/site/pyroute2/* usr/lib/pyshim/tool/*
Comment: protobuf, pyroute2, grpcio, zstandard and typing-extensions from PyPI; their licenses are in the
 *.dist-info directories beside them.

Files: usr/lib/pyshim/pycriu/*
Comment: Debian's python3-pycriu $PYCRIU_VERSION; its copyright file follows.
EOF
    sed 's/^/ /; s/^ $/ ./' "$PYCRIU_PREFIX/usr/share/doc/python3-pycriu/copyright" >>"$doc/copyright"

    cat >"$root/DEBIAN/control" <<EOF
Package: pyshim
Version: $VERSION
Architecture: $DEB_ARCH
Maintainer: $MAINTAINER
Installed-Size: $(installed_size_kib "$root")
Depends: python3 (>= 3.11), runc
Recommends: criu (>= $CRIU_MIN_VERSION) | pyshim-criu, iptables, openssh-client
Suggests: containerd, crun, openssh-server
Section: admin
Priority: optional
Description: containerd shim v2 in Python, built around CRIU checkpoint/restore
 containerd runs it as the runtime io.containerd.pyshim.v2 (binary
 containerd-shim-pyshim-v2). runc creates and runs the containers; CRIU
 checkpoints and restores them. Installed in /usr/lib/pyshim with its own
 protobuf, pyroute2 and pycriu; containerd snippets and registration in
 /usr/share/pyshim/containerd. The pyshim command (/usr/bin/pyshim) exports,
 inspects and restores checkpoints across containerd hosts.
EOF
    write_maintainer_scripts "$root/DEBIAN"
    write_md5sums "$root"
    PYSHIM_DEB=$OUT/pyshim_${VERSION}_${DEB_ARCH}.deb
    rm -f "$OUT"/pyshim_*.deb
    pack_deb "$root" "$PYSHIM_DEB"
    say "build: $PYSHIM_DEB ($(du -h "$PYSHIM_DEB" | cut -f1), $(find "$root" -path "$root/DEBIAN" -prune -o -type f -print | wc -l) files)"
}

write_maintainer_scripts() {
    local dir=$1
    cat >"$dir/postinst" <<'EOF'
#!/bin/sh
# pyshim postinst: bytecode for the python3 installed now (the package ships none; prerm removes it).
set -e
if [ "$1" = configure ]; then
    /usr/bin/python3 -m compileall -q -j 0 /usr/lib/pyshim/site /usr/lib/pyshim/pycriu \
        "/usr/lib/pyshim/tool/cp3$(/usr/bin/python3 -c 'import sys; print(sys.version_info.minor)')" >/dev/null 2>&1 ||
        echo "pyshim: byte-compiling /usr/lib/pyshim failed; the shim still runs, only its start-up is slower" >&2
fi
exit 0
EOF
    cat >"$dir/prerm" <<'EOF'
#!/bin/sh
# pyshim prerm: on removal, undo the containerd registration (register.sh keeps a record of what it
# changed); on every removal or upgrade, drop the bytecode postinst or the shim wrote.
set -e
case "$1" in
    remove | deconfigure)
        register=/usr/share/pyshim/containerd/register.sh
        if [ -f "$register" ] && [ "${PYSHIM_KEEP_REGISTRATION:-0}" != 1 ]; then
            if ! bash "$register" undo; then
                echo "pyshim: '$register undo' failed, so containerd may still name pyshim; the package stays installed." >&2
                echo "pyshim: fix what it reported and remove again, or remove with PYSHIM_KEEP_REGISTRATION=1 and undo by hand." >&2
                exit 1
            fi
        fi
        ;;
esac
case "$1" in
    remove | upgrade | deconfigure | failed-upgrade)
        find /usr/lib/pyshim -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
        ;;
esac
exit 0
EOF
    cat >"$dir/postrm" <<'EOF'
#!/bin/sh
# pyshim postrm: remove what the package made besides its files: bytecode a shim still running at
# removal wrote after prerm, and on purge the fork servers' run directory when no fork server is in it.
set -e
case "$1" in
    remove | purge)
        if [ -d /usr/lib/pyshim ]; then
            find /usr/lib/pyshim -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
            find /usr/lib/pyshim -depth -type d -empty -delete 2>/dev/null || true
        fi
        ;;
esac
if [ "$1" = purge ] && [ -d /run/pyshim ]; then
    rmdir /run/pyshim 2>/dev/null || true
fi
exit 0
EOF
    chmod 0755 "$dir/postinst" "$dir/prerm" "$dir/postrm"
}

# ----------------------------------------------------------------------------------------------------
# pyshim-criu_<version>_amd64.deb: sid's criu run through sid's loader, as the installer's prefix does

build_criu_deb() {
    local root=$STAGE/criu lib=$LIB_TRIPLET
    local prefix=$root$CRIU_PACKAGE_PREFIX
    mkdir -p "$prefix/lib" "$prefix/sbin" "$prefix/loader" "$root/usr/sbin" "$root/usr/share/doc/pyshim-criu" \
        "$root/DEBIAN"
    cp -a "$CRIU_PREFIX/usr/sbin/criu" "$prefix/sbin/criu"
    # The libraries themselves (sid's glibc among them), not gconv or compel's build-time files.
    find "$CRIU_PREFIX/usr/lib/$lib" -maxdepth 1 \( -type f -o -type l \) -name '*.so*' -exec cp -a -t "$prefix/lib" {} +
    # The loader runs under the name criu, so the process is `criu` to ps, pgrep -x and /proc/<pid>/comm.
    ln -s "../lib/$LOADER_NAME" "$prefix/loader/criu"
    cat >"$root/usr/sbin/criu" <<EOF
#!/bin/sh
# pyshim-criu: Debian sid's criu needs a newer glibc than Debian 12/13 have, so it runs through sid's
# own loader from $CRIU_PACKAGE_PREFIX (criu does not re-execute itself). The loader is exec'd through
# a link named criu: the kernel names the process after it.
exec $CRIU_PACKAGE_PREFIX/loader/criu --library-path $CRIU_PACKAGE_PREFIX/lib $CRIU_PACKAGE_PREFIX/sbin/criu "\$@"
EOF
    chmod 0755 "$root/usr/sbin/criu"
    local objects
    objects=$(verify_private_libraries_in "$prefix" "$prefix/lib" "$prefix/sbin/criu")
    local version
    version=$("$prefix/loader/criu" --library-path "$prefix/lib" "$prefix/sbin/criu" --version |
        awk '/^Version:/ { print $2; exit }')
    dpkg --compare-versions "$version" ge "$CRIU_MIN_VERSION" || build_die "the staged criu is $version, older than $CRIU_MIN_VERSION"
    local debversion
    debversion=$(zcat "$CRIU_PREFIX/usr/share/doc/criu/changelog.Debian.gz" | head -n 1 | sed -n 's/^criu (\([^)]*\)).*/\1/p')
    [[ -n $debversion ]] || build_die "cannot read criu's Debian version from $CRIU_PREFIX/usr/share/doc/criu"
    # Each carried package's copyright, as Debian requires.
    local d
    for d in "$CRIU_PREFIX"/usr/share/doc/*/; do
        [[ -f $d/copyright ]] || continue
        mkdir -p "$root/usr/share/doc/pyshim-criu/$(basename "$d")"
        cp "$d/copyright" "$root/usr/share/doc/pyshim-criu/$(basename "$d")/copyright"
    done
    CRIU_DEB_VERSION=$debversion+pyshim1
    cat >"$root/DEBIAN/control" <<EOF
Package: pyshim-criu
Version: $CRIU_DEB_VERSION
Architecture: $DEB_ARCH
Maintainer: $MAINTAINER
Installed-Size: $(installed_size_kib "$root")
Provides: criu (= $debversion)
Conflicts: criu
Replaces: criu
Recommends: iptables
Section: admin
Priority: optional
Description: CRIU $version for pyshim on Debian 12/13 (Debian sid's build, private libraries)
 Debian sid's criu $debversion with the libraries it was built against, sid's
 glibc among them, in $CRIU_PACKAGE_PREFIX; /usr/sbin/criu runs it through
 sid's own dynamic loader, so the system's libraries are untouched. Debian 12
 ships CRIU 3.17 and Debian 13 CRIU 4.1; pyshim needs $CRIU_MIN_VERSION or newer.
EOF
    write_md5sums "$root"
    CRIU_DEB=$OUT/pyshim-criu_${CRIU_DEB_VERSION}_${DEB_ARCH}.deb
    rm -f "$OUT"/pyshim-criu_*.deb
    pack_deb "$root" "$CRIU_DEB"
    say "build: $CRIU_DEB ($(du -h "$CRIU_DEB" | cut -f1); criu $version, $objects objects loaded, all from the package)"
}

# Every library the loader resolves for BINARY comes from LIBDIR; prints how many it loads.
verify_private_libraries_in() {
    local prefix=$1 libdir=$2 binary=$3 trace outside
    trace=$(LD_TRACE_LOADED_OBJECTS=1 "$libdir/$LOADER_NAME" --library-path "$libdir" "$binary" 2>&1) ||
        build_die "LD_TRACE_LOADED_OBJECTS on $binary failed: $trace"
    outside=$(awk -v p="$prefix/" '
        /not found/ { print; next }
        /=>/ { path = $3; if (index(path, p) != 1) print }' <<<"$trace")
    [[ -z $outside ]] || build_die "$binary takes libraries from outside $prefix:"$'\n'"$outside"
    grep -c '=>' <<<"$trace"
}

build_main() {
    build_parse_args "$@"
    check_machine >/dev/null
    mkdir -p "$PREFIX" "$LOG_DIR" "$OUT"
    command -v dpkg-deb >/dev/null || build_die "dpkg-deb not found (package dpkg)"
    # The sid packages the release carries, unpacked by the installer's own steps.
    ensure_criu_prefix
    ensure_pycriu >/dev/null
    ensure_build_venv
    VERSION=$(project_version)
    DIGEST=$(source_digest)
    local stamp=$OUT/.source-digest
    if ((!FORCE)) && [[ -f $stamp && $(cat "$stamp") == "$DIGEST" ]] &&
        compgen -G "$OUT/pyshim_${VERSION}_*.deb" >/dev/null && compgen -G "$OUT/pyshim-criu_*.deb" >/dev/null &&
        compgen -G "$OUT/pyshim-$VERSION-*.whl" >/dev/null; then
        say "build: $OUT is up to date with the checkout (source digest ${DIGEST:0:12}); --force rebuilds"
        return
    fi
    rm -f "$stamp"
    STAGE=$(mktemp -d /tmp/pyshim-build.XXXXXX)
    trap 'rm -rf "$STAGE"' EXIT
    build_wheel
    build_pyshim_deb
    build_criu_deb
    (cd "$OUT" && sha256sum "$(basename "$WHEEL")" "$(basename "$PYSHIM_DEB")" "$(basename "$CRIU_DEB")" >SHA256SUMS)
    echo "$DIGEST" >"$stamp"
    say "build: done in $((SECONDS - START_SECONDS))s -> $OUT"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    build_main "$@"
fi
