#!/usr/bin/env bash
# Remake the Prefect UI screenshots shown in README.md ("In the Prefect UI"):
# runs the browser tests (tests/ui: a real Prefect server, a process worker, a
# local MLflow server, headless Chromium) and copies two of their screenshots
# into docs/images/. Needs what scripts/setup.sh installs (Chromium as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PWD/.venv/bin:$PATH"

shots=$(mktemp -d)
trap 'rm -rf "$shots"' EXIT
MLFLOW_ROLLOUT_UI_SCREENSHOTS="$shots" .venv/bin/python -m pytest -q -x -p no:cacheprovider -m ui tests/ui "$@"

mkdir -p docs/images
for pair in stage-table:prefect-ui-stage-table rollback-form:prefect-ui-rollback-form; do
    src="$shots/${pair%%:*}.png" dst="docs/images/${pair##*:}.png"
    if [ ! -s "$src" ]; then
        echo "screenshots: $src was not made (were the UI tests skipped?)" >&2
        exit 1
    fi
    cp "$src" "$dst"
    echo "screenshots: $dst"
done
