#!/usr/bin/env bash
# The main job: run packaging/demo.py against the installed shim. Run packaging/install.sh first (it installs
# pyshim from the artifacts); this script provisions the rest the demo needs for itself
# (packaging/install-test.sh --demo: a containerd 2.x, busybox-static, a Python with pyshim's requirements
# for the harness; seconds when they are there already).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v containerd-shim-pyshim-v2 >/dev/null ||
    { echo "demo: containerd-shim-pyshim-v2 is not installed: run 'bash packaging/install.sh' first" >&2; exit 1; }
log=/opt/pyshim/log/demo-provision.log
mkdir -p "$(dirname "$log")"
echo "demo: provisioning what the demo needs (packaging/install-test.sh --demo; log: $log)"
if ! bash "$here/install-test.sh" --demo >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    echo "demo: provisioning failed (full log: $log)" >&2
    exit 1
fi
env_file=/opt/pyshim/env
# shellcheck source=/dev/null
. "$env_file"
exec "$PYSHIM_PYTHON" "$here/demo.py" "$@"
