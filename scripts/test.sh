#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. `.ci/run` calls this.
#
# Without arguments: two phases. First every file that tolerates a busy machine,
# two files at a time (pytest-xdist, one file per worker: module fixtures stay
# whole; many tests wait on servers, retries and helm, so two share the 2 cores
# well); then the timing-sensitive files (marker `serial`: signals, leases, a
# terminal, a browser) alone. The run fails if either phase does.
# With arguments they go to one plain pytest run, e.g. `scripts/test.sh -k terraform`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
status=0
.venv/bin/python -m pytest -n 2 --dist loadfile -m "not serial" || status=$?
.venv/bin/python -m pytest -p no:xdist -m serial || status=$((status ? status : $?))
exit "$status"
