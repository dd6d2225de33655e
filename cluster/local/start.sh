#!/usr/bin/env bash
# start the local cluster (Ray head + MLflow server on 127.0.0.1). Settings: see cluster/local/cluster.py --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${MTL_PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$root/cluster/local/cluster.py" start "$@"
