#!/usr/bin/env bash
# Runs pyshim's whole test suite the way CI does: the generated-code freshness check, the unit
# tests (tests/, unprivileged-capable, seconds) and the integration tests (integration/, real
# containerd 1.6/1.7/2.x, runc, crun and CRIU; root). Run packaging/install.sh --test first.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=/opt/pyshim/env
[ -f "$env_file" ] || { echo "run-tests: $env_file missing: run 'bash packaging/install.sh --test' first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
cd "$repo"
export PYTHONDONTWRITEBYTECODE=1
"$PYSHIM_PYTHON" protos/generate.py --check
exec "$PYSHIM_PYTHON" -m pytest -p no:cacheprovider "$@" tests integration
