#!/usr/bin/env bash
# Runs pyshim's whole test suite the way CI does: the generated-code freshness check, ruff and mypy, the unit
# tests (tests/, unprivileged-capable, seconds) against this checkout, and the integration tests
# (integration/, real containerd 1.6/1.7/2.x, runc, crun and CRIU; root) against the INSTALLED shim
# (PYSHIM_SHIM in /opt/pyshim/env: the pyshim .deb's /usr/bin/containerd-shim-pyshim-v2).
# Run packaging/install-test.sh first.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=${PYSHIM_ENV_FILE:-/opt/pyshim/env}
[ -f "$env_file" ] || { echo "run-tests: $env_file missing: run 'bash packaging/install-test.sh' first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
cd "$repo"
export PYTHONDONTWRITEBYTECODE=1
echo "run-tests: unit tests import $repo/shim; containerd runs $PYSHIM_SHIM -> $(readlink -f "$PYSHIM_SHIM")"
"$PYSHIM_PYTHON" protos/generate.py --check
# Lint and type check (pyproject.toml configures both; the dev extra installs them): any finding fails the run.
"$PYSHIM_PYTHON" -m ruff check --no-cache
"$PYSHIM_PYTHON" -m mypy --no-incremental
echo "run-tests: ruff and mypy: no findings"
exec "$PYSHIM_PYTHON" -m pytest -p no:cacheprovider "$@" tests integration
