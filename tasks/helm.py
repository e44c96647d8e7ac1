"""The helm CLI, typed: install/upgrade, rollback, history, values, manifest, uninstall.

Why a wrapper and not ``subprocess.run`` at each call site:

- **Full values every time.** ``--reuse-values`` ignores new chart defaults
  (DESIGN §5). Each upgrade gets the complete values, written to a 0600 file
  that is removed right after (the values hold no secret — credentials live in
  the ``existingSecret`` — but a file beats argv all the same).
- **Helm 3.18+ and 4.x.** Both majors take the same flags used here; the
  JSON of ``history``/``status`` is read defensively (helm 4's ``status`` has
  no ``chart``/``config`` keys).
- **Stuck releases.** An interrupted client leaves the newest revision in
  ``pending-install|pending-upgrade|pending-rollback`` and every later call
  fails with "another operation is in progress". :meth:`Helm.stuck` detects it
  and :meth:`Helm.recover` rolls back to the last *deployed* revision (the
  documented recovery); with no deployed revision at all (a first install
  interrupted) it uninstalls, so the next install starts clean.
- **Errors.** A ``--wait`` timeout is permanent for the stage (the flow rolls
  back instead of waiting again); a connection refused by the API server is
  transient; everything else is permanent with helm's (redacted) stderr. A
  helm binary that is not there is bad input (exit 2) that says how to
  install one, for every call (``version`` included).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from mlflow_rollout.redact import redact

__all__ = ["Helm", "HelmRevision", "HelmTimeout", "PENDING"]

PENDING = ("pending-install", "pending-upgrade", "pending-rollback")
_TRANSIENT = re.compile(
    r"connection refused|connection reset|i/o timeout|TLS handshake timeout|EOF|"
    r"the server is currently unable|too many requests|etcdserver|internal error occurred|"
    r"an error on the server|unable to return a response|TooManyRequests",
    re.IGNORECASE,
)
_TIMEOUT = re.compile(r"timed out waiting|context deadline exceeded|timeout waiting", re.IGNORECASE)


class HelmTimeout(PermanentError):
    """``--wait`` gave up: the release is ``failed``; roll back rather than wait again."""


class HelmRevision(BaseModel):
    revision: int
    status: str
    chart: str = ""
    app_version: str = ""
    updated: str = ""
    description: str = ""


class Helm:
    """One release's helm, bound to a kubeconfig/context and namespace."""

    def __init__(
        self, *, binary: str = "helm", namespace: str, kubeconfig: Path | None = None,
        context: str | None = None, timeout_seconds: int = 600,
    ):
        self.binary = binary
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.context = context
        self.timeout_seconds = timeout_seconds

    # ------------------------------------------------------------------ plumbing
    def _base(self) -> list[str]:
        cmd = [self.binary, "--namespace", self.namespace]
        if self.kubeconfig:
            cmd += ["--kubeconfig", str(self.kubeconfig)]
        if self.context:
            cmd += ["--kube-context", self.context]
        return cmd

    def run(self, *args: str, timeout: float | None = None) -> str:
        cmd = [*self._base(), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                timeout=timeout or self.timeout_seconds + 60,
                env={**os.environ, "HELM_NO_PLUGINS": "1"},
            )
        except FileNotFoundError:
            raise BadInputError(
                f"helm binary {self.binary!r} not found (kubernetes.helm_binary): install helm 3.18+ or 4 on PATH, "
                "or run scripts/install-helm.sh and point kubernetes.helm_binary at .tools/bin/helm"
            ) from None
        except PermissionError:
            raise BadInputError(
                f"helm binary {self.binary!r} is not executable (kubernetes.helm_binary); "
                "scripts/install-helm.sh installs a working one into .tools/bin"
            ) from None
        except subprocess.TimeoutExpired:
            raise TransientError(f"helm {args[0]} did not finish in time") from None
        if proc.returncode != 0:
            err = redact(proc.stderr.strip() or proc.stdout.strip())[-2000:]
            if _TIMEOUT.search(err):
                raise HelmTimeout(f"helm {args[0]} timed out waiting for the release to become ready: {err}")
            if _TRANSIENT.search(err):
                raise TransientError(f"helm {args[0]}: {err}")
            raise PermanentError(f"helm {args[0]} failed: {err}")
        return proc.stdout

    def version(self) -> str:
        """``helm version --short`` (e.g. ``v4.1.4+g...``), through :meth:`run` like every call."""
        return self.run("version", "--short", timeout=60).strip()

    # ------------------------------------------------------------------- reading
    def history(self, release: str) -> list[HelmRevision]:
        """All revisions, oldest first; [] when the release does not exist."""
        try:
            out = self.run("history", release, "--max", "256", "-o", "json", timeout=120)
        except PermanentError as exc:
            if "not found" in str(exc):
                return []
            raise
        return [HelmRevision.model_validate(r) for r in json.loads(out or "[]")]

    def values(self, release: str, revision: int | None = None, *, all_values: bool = False) -> dict[str, Any]:
        """The user-supplied values of a revision; ``all_values``: merged with the chart's defaults (``--all``)."""
        args = ["get", "values", release, "-o", "json"]
        if revision is not None:
            args += ["--revision", str(revision)]
        if all_values:
            args.append("--all")
        return json.loads(self.run(*args, timeout=120) or "{}") or {}

    def manifest(self, release: str) -> list[dict[str, Any]]:
        """The objects of the release's newest revision as rendered (``helm get manifest``); [] when not installed.

        Names are read from here (the chart's ``fullname``, selector labels), never re-derived.
        Hook objects (the migration Job, the test pod) are not part of the manifest.
        """
        try:
            out = self.run("get", "manifest", release, timeout=120)
        except PermanentError as exc:
            if "not found" in str(exc):
                return []
            raise
        return [o for o in yaml.safe_load_all(out) if isinstance(o, dict)]

    def stuck(self, release: str) -> HelmRevision | None:
        """The newest revision when it is stuck in a ``pending-*`` state."""
        history = self.history(release)
        if history and history[-1].status in PENDING:
            return history[-1]
        return None

    # ------------------------------------------------------------------- writing
    def _values_file(self, values: dict[str, Any]) -> str:
        """The values as a 0600 temp file; the caller removes it."""
        fd, path = tempfile.mkstemp(prefix="mlflow-rollout-values-", suffix=".yaml")
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(values, fh, sort_keys=True)
        return path

    def template(self, release: str, chart: Path, values: dict[str, Any], *, values_files: list[Path] = ()) -> str:
        """Render the chart offline: ``validateValues`` and the schema speak before anything changes."""
        path = self._values_file(values)
        try:
            args = ["template", release, str(chart)]
            for f in values_files:
                args += ["-f", str(f)]
            try:
                return self.run(*args, "-f", path, timeout=120)
            except PermanentError as exc:
                raise BadInputError(f"the chart does not render with these settings: {exc}") from None
        finally:
            Path(path).unlink(missing_ok=True)

    def upgrade_install(
        self, release: str, chart: Path, values: dict[str, Any], *, values_files: list[Path] = (),
        wait: bool = True, description: str | None = None,
    ) -> HelmRevision:
        """``helm upgrade --install`` with the complete values (no ``--reuse-values``)."""
        path = self._values_file(values)
        try:
            args = ["upgrade", release, str(chart), "--install", "--reset-values"]
            for f in values_files:
                args += ["-f", str(f)]
            args += ["-f", path, "--timeout", f"{self.timeout_seconds}s"]
            if wait:
                args += ["--wait"]
            if description:
                args += ["--description", description[:200]]
            self.run(*args)
        finally:
            Path(path).unlink(missing_ok=True)
        return self.history(release)[-1]

    def rollback(self, release: str, revision: int, *, wait: bool = True) -> HelmRevision:
        args = ["rollback", release, str(revision), "--timeout", f"{self.timeout_seconds}s"]
        if wait:
            args.append("--wait")
        self.run(*args)
        return self.history(release)[-1]

    def uninstall(self, release: str, *, wait: bool = True) -> None:
        args = ["uninstall", release]
        if wait:
            args += ["--wait", "--timeout", f"{self.timeout_seconds}s"]
        self.run(*args)

    def recover(self, release: str, acceptable: Callable[[HelmRevision], bool] | None = None) -> str:
        """Unstick a release left ``pending-*`` by an interrupted client.

        Roll back to the newest ``deployed`` (or, failing that, ``superseded``)
        revision that ``acceptable`` allows (the caller refuses revisions that
        ran with auth off); with none (an interrupted first install), uninstall.
        """
        history = self.history(release)
        if not history or history[-1].status not in PENDING:
            return "release not stuck"
        stuck = history[-1]
        ok = acceptable or (lambda r: True)
        good = ([r for r in history if r.status == "deployed" and ok(r)]
                or [r for r in history if r.status == "superseded" and ok(r)])
        if not good:
            self.uninstall(release)
            return f"revision {stuck.revision} was {stuck.status} with no deployed revision to go back to: uninstalled"
        target = good[-1].revision
        self.rollback(release, target)
        return f"revision {stuck.revision} was {stuck.status}: rolled back to revision {target}"
