"""Issue 8 items 1–2 on the kubernetes target: auth posture is one-way, and the lock heals.

On the emulated cluster of ``tests/support/k8s_world.py`` (real helm 4,
the Kubernetes API emulator, moto, PostgreSQL, DNS and a real MLflow behind
the load balancer's name), after a first rollout — revision 1 the auth-off
bootstrap, revision 2 auth on:

- no rollback goes to revision 1, neither by default nor on request, and
  the target itself refuses it (defence in depth behind the flow);
- the bootstrap revision has no Ingress: nothing outside the cluster saw it;
- whether auth has been on is read from the data (the existingSecret's
  marker, the auth database's users), so it survives a deleted release
  history, and the next rollout installs straight with auth on;
- the Lease lock: a holder killed with SIGKILL (or a Lease whose renewals
  stopped long ago) is taken over within the lease plus a few seconds; a
  live holder keeps renewing, and a waiter gives up naming it.

The rollout's auth-off bootstrap needs an auth database without users, so
this module's environment uses a fresh PostgreSQL database of its own (the
MLflow behind the load balancer keeps the shared one, where it created its
admin with the same password at its first start).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mlflow_rollout.errors import BadInputError, PermanentError
from mlflow_rollout.locks import EnvironmentBusyError
from mlflow_rollout.settings import load_environment
from mlflow_rollout.types import LockHolder
from targets.kubernetes import AUTH_MARKER_ANNOTATION, KubernetesTarget
from tests.support.kube_emulator import kube_emulator
from tests.support.rollout import ROOT
from tests.support.k8s_world import (  # noqa: F401  (world is a fixture)
    ADMIN_PW,
    FLASK_KEY,
    LB,
    NS,
    STARTUP_LOG,
    _environment,
    _helm,
    _helm_bin,
    _history,
    _sandbox,
    world,
)

pytestmark = pytest.mark.e2e

LEASE = 10  # lock_lease_seconds (the settings' minimum)
LOCK = "mlflow-rollout-lock"


def _wrapped_helm(directory: Path, unreadable_revision: int) -> Path:
    """A helm that cannot read one revision's values (as when its release record is damaged)."""
    real = _helm_bin("helm4")
    script = directory / "helm-unreadable"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in
          *" get values "*"--revision {unreadable_revision} "*)
            echo "Error: release: not found (revision {unreadable_revision} record damaged)" >&2; exit 1 ;;
        esac
        exec {real} "$@"
        """))
    script.chmod(0o755)
    return script


class Env:
    """The module's environment: emulated cluster, sandbox, a target for direct calls."""

    def __init__(self, kube, box, db_uri: str):
        self.kube, self.box, self.db_uri = kube, box, db_uri

    def target(self, **kube_updates) -> KubernetesTarget:
        settings = load_environment("prod", self.box.env_dir)
        if kube_updates:
            settings = settings.model_copy(update={"kubernetes": settings.kubernetes.model_copy(update=kube_updates)})
        return KubernetesTarget(settings)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.box.cli(*args)


@pytest.fixture(scope="module")
def posture(world, postgres, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    cloud, server, dns, _, api = world
    tmp = tmp_path_factory.mktemp("posture")
    db_uri = postgres.create_database(f"mlflow_posture_{os.getpid()}_{int(time.time())}")
    with kube_emulator(tmp / "kube") as kube:
        kube.control.set_ingress_hostname(LB)
        kube.control.set_logs(STARTUP_LOG, deployment="mlflow", namespace=NS)
        box = _sandbox(tmp, api)
        _environment(box, "prod", kube, world, helm="helm4", extra={"lock_lease_seconds": LEASE})
        outputs = box.env_dir / "prod" / "terraform-outputs.json"
        outputs.write_text(json.dumps({**cloud.outputs(), "rds_connection_string": db_uri}))
        r = box.cli("rollout", "--env", "prod")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:] + "\n--- emulator ---\n" + kube.log_tail()
        assert "completed deploy-no-auth" in out  # a fresh auth database: the first install's bootstrap ran
        history = _history(kube, "helm4")
        assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
        saved = os.environ.get("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR")
        os.environ["MLFLOW_ROLLOUT_ENVIRONMENTS_DIR"] = str(box.env_dir)
        try:
            yield Env(kube, box, db_uri)
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_ROLLOUT_ENVIRONMENTS_DIR", None)
            else:
                os.environ["MLFLOW_ROLLOUT_ENVIRONMENTS_DIR"] = saved


def _no_secret_in(text: str, env: Env) -> None:
    db_password = env.db_uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    for secret in (ADMIN_PW, FLASK_KEY, db_password):
        assert secret not in text


# ------------------------------------------------------------------ rollback never turns auth off


def test_default_rollback_refuses_when_no_earlier_revision_had_auth(posture: Env) -> None:
    before = _history(posture.kube, "helm4")
    target = posture.target()
    assert target.rollback_candidates() == []  # revision 1 is the bootstrap: never a candidate

    r = posture.cli("rollback", "--env", "prod", "--reason", "undo")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert "no earlier good revision with auth on" in out, out[-4000:]
    assert _history(posture.kube, "helm4") == before  # refused before anything changed
    _no_secret_in(out, posture)


def test_rollback_to_the_bootstrap_revision_is_refused_naming_why(posture: Env) -> None:
    before = _history(posture.kube, "helm4")
    r = posture.cli("rollback", "--env", "prod", "--revision", "1", "--reason", "drill")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    assert "auth off" in out and "without authentication" in out, out[-4000:]
    assert _history(posture.kube, "helm4") == before

    # The target refuses on its own too (whatever a flow decided).
    target = posture.target()
    with pytest.raises(BadInputError) as refused:
        target.rollback(1, "drill")
    assert str(refused.value).startswith(
        "revision 1 is the first install's bootstrap revision with auth off; rolling back to it would serve "
        "MLflow without authentication"
    )
    with pytest.raises(BadInputError) as missing:
        target.rollback(999, "typo")
    assert str(missing.value) == "revision 999 does not exist; valid revisions: none"
    assert _history(posture.kube, "helm4") == before


def test_bootstrap_revision_has_no_ingress(posture: Env) -> None:
    values = {
        rev: json.loads(_helm(posture.kube, "helm4", "get", "values", "mlflow", "-n", NS, "--revision", str(rev), "-o", "json"))
        for rev in (1, 2)
    }
    assert values[1]["auth"]["enabled"] is False and values[1]["ingress"]["enabled"] is False
    assert values[2]["auth"]["enabled"] is True and values[2]["ingress"]["enabled"] is True
    manifests = {
        rev: [d for d in yaml.safe_load_all(_helm(posture.kube, "helm4", "get", "manifest", "mlflow", "-n", NS,
                                                  "--revision", str(rev))) if d]
        for rev in (1, 2)
    }
    assert [d for d in manifests[1] if d["kind"] == "Ingress"] == []
    assert [d["metadata"]["name"] for d in manifests[2] if d["kind"] == "Ingress"] == ["mlflow"]
    # The Service reaches only pods with the revision's auth setting (no auth-off pod behind the ALB).
    service = {rev: next(d for d in manifests[rev] if d["kind"] == "Service") for rev in (1, 2)}
    assert service[1]["spec"]["selector"]["mlflow/auth"] == "disabled"
    assert service[2]["spec"]["selector"]["mlflow/auth"] == "enabled"
    live = posture.kube.control.object("Service", "mlflow", NS)
    assert live["spec"]["selector"]["mlflow/auth"] == "enabled"


def test_unreadable_revision_is_never_a_rollback_target(posture: Env, tmp_path: Path) -> None:
    # Revision 3 (auth on, other workers) makes revision 2 a good earlier auth-on revision.
    _helm(posture.kube, "helm4", "upgrade", "mlflow", str(ROOT / "charts" / "mlflow"), "-n", NS, "--reuse-values",
          "--set", "mlflow.workers=3", "--wait", "--timeout", "120s")
    history = _history(posture.kube, "helm4")
    assert [(h["revision"], h["status"]) for h in history][-2:] == [(2, "superseded"), (3, "deployed")]
    assert [r.number for r in posture.target().rollback_candidates()] == [2]

    # The same history through a helm that cannot read revision 2's values: auth unknown, so not a target.
    blind = posture.target(helm_binary=str(_wrapped_helm(tmp_path, 2)))
    assert blind.rollback_candidates() == []
    rev2 = next(r for r in blind.history() if r.number == 2)
    assert rev2.spec.auth is False and "auth unknown" in rev2.description
    with pytest.raises(BadInputError) as refused:
        blind.rollback(2, "drill")
    assert "cannot be read" in str(refused.value) and "not a rollback target" in str(refused.value)
    assert _history(posture.kube, "helm4") == history

    # With its values readable, revision 2 is a fine target: back to it (as revision 4).
    result = posture.target().rollback(2, "drill")
    assert result.revision == 4 and "rolled back to revision 2" in result.detail
    values = json.loads(_helm(posture.kube, "helm4", "get", "values", "mlflow", "-n", NS, "-o", "json"))
    assert values["auth"]["enabled"] is True and values["ingress"]["enabled"] is True


def test_unfinished_first_install_leaves_no_auth_off_server(posture: Env) -> None:
    # An environment serving with auth: nothing to discard.
    assert posture.target().discard_bootstrap() is None
    assert _history(posture.kube, "helm4")[-1]["status"] == "deployed"

    # A first install that stopped after its auth-off bootstrap (another release, a namespace of its own).
    _helm(posture.kube, "helm4", "install", "mlflow-boot", str(ROOT / "charts" / "mlflow"), "-n", "boot",
          "--create-namespace", "--set", "auth.enabled=false", "--wait", "--timeout", "120s")
    boot = posture.target(namespace="boot", release="mlflow-boot")
    assert boot.current_revision() is not None and not boot.current_revision().spec.auth
    note = boot.discard_bootstrap()
    assert note and "ran with auth off" in note
    assert json.loads(_helm(posture.kube, "helm4", "list", "-n", "boot", "-o", "json")) == []
    assert [d for d in posture.kube.control.objects("Deployment", "boot")] == []


# ------------------------------------------------------------------ the Lease lock


_HOLDER = textwrap.dedent("""\
    import sys, time
    from mlflow_rollout.settings import load_environment
    from mlflow_rollout.types import LockHolder
    from targets.kubernetes import KubernetesTarget

    target = KubernetesTarget(load_environment("prod"))
    with target.operation_lock(LockHolder.here("rollout", "holder-run"), 5):
        print("held", flush=True)
        time.sleep(600)
    """)


class _Holder:
    """A separate process holding the environment's lock (renewing it) until it is killed."""

    def __init__(self, env: Env):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER], cwd=ROOT, env=env.box.env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "held":
            self.kill()
            raise AssertionError(f"the holder did not take the lock: {line!r} {self.proc.stderr.read()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def _lease(env: Env) -> dict | None:
    return env.kube.control.object("Lease", LOCK, NS)


def test_killed_holder_frees_the_lock_within_the_lease(posture: Env) -> None:
    holder = _Holder(posture)
    try:
        lease = _lease(posture)
        held_by = LockHolder.model_validate_json(lease["spec"]["holderIdentity"])
        assert held_by.pid == holder.proc.pid and held_by.flow_run_id == "holder-run"
        assert lease["spec"]["leaseDurationSeconds"] == LEASE
        # it renews: renewTime moves while the holder lives
        first = lease["spec"]["renewTime"]
        posture.kube.control.wait_for(lambda: _lease(posture)["spec"]["renewTime"] != first,
                                      timeout=LEASE, what="a renewal")
    finally:
        holder.kill()
    killed = time.monotonic()

    target = posture.target()
    me = LockHolder.here("rollback", "taker-run")
    with target.operation_lock(me, wait_seconds=LEASE + 20):
        took = time.monotonic() - killed
        lease = _lease(posture)
        assert LockHolder.model_validate_json(lease["spec"]["holderIdentity"]) == me
        assert lease["spec"]["leaseTransitions"] == 1
    assert took <= LEASE + 4, f"took {took:.1f}s after the holder died"
    assert _lease(posture) is None  # released: deleted


def test_lease_whose_renewals_stopped_long_ago_is_taken_over(posture: Env) -> None:
    from kubernetes import client

    target = posture.target()
    dead = LockHolder(operation="rollout", flow_run_id="dead-run", pid=999999, host="gone-host",
                      since=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=LEASE - 3)  # expires in ~3 s
    created = target.kube.create_lease(LOCK, client.V1LeaseSpec(
        holder_identity=dead.model_dump_json(), lease_duration_seconds=LEASE, acquire_time=old, renew_time=old,
        lease_transitions=4,
    ))
    assert created is not None
    started = time.monotonic()
    try:
        with target.operation_lock(LockHolder.here("rollout"), wait_seconds=LEASE + 10):
            waited = time.monotonic() - started
            assert _lease(posture)["spec"]["leaseTransitions"] == 5
    finally:
        target.kube.delete_lease(LOCK, None)
    assert waited <= 3 + 4, f"waited {waited:.1f}s for a lease that expired 3s in"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_live_holder_makes_a_waiter_give_up_naming_it(posture: Env) -> None:
    holder = _Holder(posture)
    log = logging.getLogger("targets.kubernetes")  # outside a flow run the target logs here
    lines = _Lines()
    log.addHandler(lines)
    try:
        target = posture.target()
        started = time.monotonic()
        wait = LEASE + 3  # longer than the lease: only the holder's renewals keep the lock from the waiter
        with pytest.raises(EnvironmentBusyError) as busy:
            with target.operation_lock(LockHolder.here("rollback"), wait_seconds=wait):
                pytest.fail("took a lock that a live holder renews")
        waited = time.monotonic() - started
        assert wait <= waited <= wait + 5
        message = str(busy.value)
        assert f"pid {holder.proc.pid}" in message and "flow run holder-run" in message and "rollout" in message
        assert "waited 13s and gave up" in message
        waiting = [line for line in lines.lines if "waiting for the lock" in line]
        assert len(waiting) == 1 and f"pid {holder.proc.pid}" in waiting[0]  # one line, then every ~15 s
        assert holder.proc.poll() is None

        # The CLI: a rollback while the lock is held is refused, naming the holder.
        r = posture.cli("rollback", "--env", "prod", "--reason", "while busy")
        out = r.stdout + r.stderr
        assert r.returncode != 0 and f"pid {holder.proc.pid}" in out, out[-4000:]
        _no_secret_in(out, posture)
    finally:
        log.removeHandler(lines)
        holder.kill()
        posture.target().kube.delete_lease(LOCK, None)  # the killed holder's lease would block the next test for 10 s


# ------------------------------------------------------------------ auth posture from the data (last: destroys the history)


def test_auth_ever_enabled_survives_a_lost_release_history(posture: Env) -> None:
    target = posture.target()
    secret = target.kube.core.read_namespaced_secret("mlflow-credentials", NS)
    assert (secret.metadata.annotations or {}).get(AUTH_MARKER_ANNOTATION)  # marked after deploy-auth
    assert target.auth_ever_enabled()

    # The secrets stage rewriting the Secret keeps the marker.
    data = target.kube.read_secret("mlflow-credentials")
    assert target.kube.apply_secret("mlflow-credentials", {**data, "flask-secret-key": FLASK_KEY + "-x"})
    assert target.kube.apply_secret("mlflow-credentials", data)
    assert target.kube.secret_annotations("mlflow-credentials").get(AUTH_MARKER_ANNOTATION)

    # Lose the release history (helm's release Secrets), as with lost etcd state or a stray delete.
    for s in target.kube.core.list_namespaced_secret(NS, label_selector="owner=helm,name=mlflow").items:
        target.kube.core.delete_namespaced_secret(s.metadata.name, NS)
    assert target.helm.history("mlflow") == [] and target.current_revision() is None
    assert target.auth_ever_enabled()

    # Without the marker too: the auth database has users.
    target.kube.core.patch_namespaced_secret(
        "mlflow-credentials", NS, {"metadata": {"annotations": {AUTH_MARKER_ANNOTATION: None}}},
        _content_type="application/merge-patch+json")
    assert not target.kube.secret_annotations("mlflow-credentials").get(AUTH_MARKER_ANNOTATION)
    assert target.auth_ever_enabled()
    # ... and the target refuses an auth-off deploy on its own.
    from tasks.terraform import read_outputs

    spec = target.server_spec(read_outputs(target.settings.terraform), auth=False)
    with pytest.raises(PermanentError, match="refusing to deploy 'prod' with auth off"):
        target.deploy(spec)
    assert target.helm.history("mlflow") == []

    # The next rollout installs straight with auth on: no auth-off window over the existing data.
    r = posture.cli("rollout", "--env", "prod")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "skipped deploy-no-auth" in out
    history = _history(posture.kube, "helm4")
    for h in history:
        values = json.loads(_helm(posture.kube, "helm4", "get", "values", "mlflow", "-n", NS, "--revision",
                                  str(h["revision"]), "-o", "json"))
        assert values["auth"]["enabled"] is True, h
    assert target.kube.secret_annotations("mlflow-credentials").get(AUTH_MARKER_ANNOTATION)  # marked again
    _no_secret_in(out, posture)
