#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. `.ci/run` calls this.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k terraform`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
