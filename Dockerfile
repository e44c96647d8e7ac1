# The runner image of the `kubernetes` work pool (prefect.yaml): the flow-run Jobs the
# Prefect kubernetes worker creates run `prefect flow-run execute` in it, from
# WORKDIR /opt/mlflow-rollout (prefect.yaml's pull step sets the same directory).
#
#   /opt/mlflow-rollout/.venv        this project (pip install, not editable) and its pinned
#                                    dependencies; helm (pinned, scripts/helm_versions.txt) on PATH
#   /opt/mlflow-rollout/{flows,...}  the flow files prefect.yaml's entrypoints name,
#                                    charts/mlflow, environments/, prefect.yaml
#
# Both stages run scripts/build-runner.sh's layout; tests/test_runner_image.py builds the
# same layout without Docker and checks it, and lints this file with hadolint.
#
# Base image: pinned by exact tag. It is not pinned by digest because this repository is
# built and tested without a Docker engine or registry access to resolve one; a team that
# wants digest pinning replaces the tag with `python:3.11.14-slim-bookworm@sha256:<digest>`
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`) in both FROM lines.

# ---------------------------------------------------------------- builder
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The build context is filtered by .dockerignore (no .venv, .tools, tests, .git).
COPY . .
# Wheels only (build-runner.sh): the slim image has no compiler, and none is needed.
RUN bash scripts/build-runner.sh /opt/mlflow-rollout

# ---------------------------------------------------------------- runner
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="mlflow-rollout runner" \
      org.opencontainers.image.description="Prefect flows that roll out an authenticated MLflow tracking server (EKS + Helm)"

# A fixed numeric uid/gid so a pod's runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --home-dir /home/mlflow --create-home \
       --shell /usr/sbin/nologin mlflow

# Owned by root, read-only for the runner user.
COPY --from=builder /opt/mlflow-rollout /opt/mlflow-rollout

ENV VIRTUAL_ENV=/opt/mlflow-rollout/.venv \
    PATH=/opt/mlflow-rollout/.venv/bin:$PATH \
    HOME=/home/mlflow \
    MLFLOW_ROLLOUT_STATE_DIR=/home/mlflow/.mlflow-rollout \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/mlflow-rollout
USER 10001:10001

# The kubernetes worker's Job sets the container's args to `prefect flow-run execute`.
CMD ["mlflow-rollout", "--help"]
