#!/usr/bin/env bash
# add or kill an extra Ray node of the local cluster on this machine: node.sh add | node.sh kill
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${MTL_PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$root/cluster/local/cluster.py" node "$@"
