#!/usr/bin/env bash
# The main job: run packaging/demo.py with the project's environment. Run packaging/install.sh first.
set -euo pipefail
env_file=/opt/pyshim/env
[ -f "$env_file" ] || { echo "demo: $env_file missing: run 'bash packaging/install.sh' first" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
exec "$PYSHIM_PYTHON" "$(dirname "${BASH_SOURCE[0]}")/demo.py" "$@"
