"""The diagnosis rules (mlflow_rollout/diagnosis.py) and the probes behind their evidence.

The rules are pure: evidence in, findings out — tested here on evidence shaped
as the targets gather it, including the cases where a rule must stay silent.
The probes meet real parts: the database probe a real PostgreSQL (right and
wrong password, a closed port), the IAM evaluation moto's IAM. Their proof
on running pods is tests/test_diagnosis_pods.py.
"""

from __future__ import annotations

import json
import time

import pytest
from pydantic import SecretStr

from mlflow_rollout import diagnosis as d
from tasks import aws, mlflow_db
from tests.support.services import free_port


def _pod(log: str = "", *, ready: bool = False, restarts: int = 2, waiting: str | None = "CrashLoopBackOff",
         message: str | None = None) -> d.PodEvidence:
    return d.PodEvidence(name="mlflow-abc", phase="Running", ready=ready, log=log, containers=[
        d.ContainerEvidence(name="mlflow", ready=ready, restarts=restarts, waiting_reason=waiting,
                            waiting_message=message)])


def _ev(**kw) -> d.Evidence:
    base = dict(environment="prod", target="kubernetes", namespace="ml", secret="secret ml/creds")
    return d.Evidence(**{**base, **kw})


PG_AUTH = ('WARNING SQLAlchemy engine could not be created. (psycopg2.OperationalError) connection to server at '
           '"10.0.0.5", port 5432 failed: FATAL:  password authentication failed for user "mlflow"')
PG_DOWN = ('(psycopg2.OperationalError) connection to server at "10.0.0.5", port 5432 failed: Connection refused')


def test_healthy_evidence_gives_no_finding() -> None:
    ev = _ev(pods=[_pod("INFO Application startup complete.", ready=True, restarts=0, waiting=None)],
             revision=3, revision_auth=True, anonymous_status=401, admin_status=200, service="mlflow",
             service_ready_pods=1, healthcheck_path="/health", healthcheck_status=200, public_status=200,
             service_account="mlflow", service_account_role="arn:aws:iam::1:role/r", expected_role="arn:aws:iam::1:role/r",
             iam_denied=[], database=None)
    assert d.diagnose(ev) == [] and d.summary_line([]) is None


@pytest.mark.parametrize("log, probe, cause", [
    (PG_AUTH, "credentials-refused", "refuses the credentials"),
    (PG_DOWN, "ok", "the pods cannot reach the database"),
    (PG_DOWN, "unreachable", "nothing answers at"),
    ("", "credentials-refused", "refuses the credentials"),  # no log yet: the runner's own attempt decides
])
def test_database_causes_are_told_apart(log: str, probe: str, cause: str) -> None:
    ev = _ev(pods=[_pod(log)], database=d.DatabaseProbe(where="10.0.0.5:5432/mlflow", outcome=probe))
    found = d.diagnose(ev)
    assert [f.rule for f in found] == ["database"] and cause in found[0].cause, found
    assert "10.0.0.5:5432/mlflow" in found[0].cause


def test_database_log_lines_of_a_healthy_pod_are_not_a_finding() -> None:
    """A Ready pod that once logged a retried connection is not in trouble."""
    assert d.diagnose(_ev(pods=[_pod(PG_DOWN, ready=True, restarts=0, waiting=None)])) == []


def test_missing_secret_key_is_named_by_key() -> None:
    msg = "couldn't find key flask-key in Secret ml/creds"
    found = d.diagnose(_ev(pods=[_pod(waiting="CreateContainerConfigError", message=msg, restarts=0)]))
    assert found[0].rule == "configuration" and "'flask-key'" in found[0].cause and "ml/creds" in found[0].cause


def test_bad_ini_and_bad_value_are_configuration() -> None:
    ini = d.diagnose(_ev(pods=[_pod("KeyError: 'database_uri'")]))
    assert ini[0].rule == "configuration" and "basic_auth.ini" in ini[0].cause
    bad = d.diagnose(_ev(pods=[_pod("Error: Invalid value for '--workers': 'two' is not a valid integer.")]))
    assert bad[0].rule == "configuration" and "refuses a setting" in bad[0].cause


def test_s3_rules_role_annotation_policy_and_server_error() -> None:
    role = "arn:aws:iam::1:role/mlflow"
    missing = d.diagnose(_ev(service_account="mlflow", service_account_role="", expected_role=role))
    assert missing[0].rule == "s3-access" and "has no eks.amazonaws.com/role-arn annotation" in missing[0].cause
    other = d.diagnose(_ev(service_account="mlflow", service_account_role="arn:aws:iam::1:role/x", expected_role=role))
    assert "names arn:aws:iam::1:role/x" in other[0].cause
    policy = d.diagnose(_ev(service_account_role=role, expected_role=role, iam_denied=["s3:PutObject"],
                            artifacts_destination="s3://b/p"))
    assert "does not allow s3:PutObject on s3://b/p" in policy[0].cause
    server = d.diagnose(_ev(pods=[_pod("botocore.exceptions.ClientError: An error occurred (AccessDenied)", ready=True,
                                       restarts=0, waiting=None)], service_account_role=role, expected_role=role,
                            iam_denied=[]))
    assert server[0].rule == "s3-access" and "bucket policy" in server[0].fix


def test_load_balancer_rules() -> None:
    ready = [_pod(ready=True, restarts=0, waiting=None)]
    selector = d.diagnose(_ev(pods=ready, service="mlflow", service_selector={"app": "typo"}, service_ready_pods=0,
                              public_status=503))
    assert selector[0].rule == "load-balancer" and "selects no Ready pod" in selector[0].cause
    assert "answered 503" in selector[0].evidence[0]
    health = d.diagnose(_ev(pods=ready, service="mlflow", service_ready_pods=1, ingress="mlflow",
                            healthcheck_path="/", healthcheck_status=401, healthcheck_codes="200-399"))
    assert "answers 401, not 200-399" in health[0].cause
    ok = d.diagnose(_ev(pods=ready, service="mlflow", service_ready_pods=1, healthcheck_path="/health",
                        healthcheck_status=204, healthcheck_codes="200-299"))
    assert ok == []


def test_authentication_rules_never_suggest_recreating_the_admin() -> None:
    off = d.diagnose(_ev(revision=4, revision_auth=False))
    assert off[0].rule == "authentication" and "revision 4 runs with auth off" in off[0].evidence[0]
    assert "mlflow-rollout rollback --env prod" in off[0].fix
    anon = d.diagnose(_ev(revision=4, revision_auth=True, anonymous_status=200))
    assert "not enabled" in anon[0].cause
    refused = d.diagnose(_ev(revision_auth=True, anonymous_status=401, admin_status=401, admin_username="admin",
                             admin_store="secret ml/creds key 'admin-password'"))
    assert "does not open 'admin'" in refused[0].cause and "do not recreate the admin" in refused[0].fix
    pending = d.diagnose(_ev(revision_auth=True, anonymous_status=401, admin_status=401, pending_status=200))
    assert "rotation was interrupted" in pending[0].cause


def test_precedence_and_summary_line() -> None:
    ev = _ev(pods=[_pod("KeyError: 'database_uri'\n" + PG_AUTH)], revision_auth=False)
    found = d.diagnose(ev)
    assert [f.rule for f in found] == ["configuration", "database", "authentication"]
    line = d.summary_line(found)
    assert line.startswith("diagnosis: configuration: ") and "(+2 more finding(s))" in line
    assert "## Diagnosis" in d.markdown(found) and "**Fix:**" in d.markdown(found)


# ----------------------------------------------------------------------------- probes on real parts
def test_database_probe_on_postgresql(postgres) -> None:
    good = SecretStr(postgres.uri)
    assert mlflow_db.probe_connection(good).outcome == "ok"
    user_pw, rest = postgres.uri.split("://", 1)[1].split("@", 1)
    user = user_pw.split(":", 1)[0]
    wrong = SecretStr(f"postgresql://{user}:wrong-password-x@{rest}")
    probe = mlflow_db.probe_connection(wrong)
    assert probe.outcome == "credentials-refused" and "wrong-password-x" not in probe.model_dump_json()
    closed = SecretStr(f"postgresql://{user}:x@127.0.0.1:{free_port()}/mlflow")
    probe = mlflow_db.probe_connection(closed)
    assert probe.outcome == "unreachable" and probe.where.startswith("127.0.0.1:"), probe


def test_role_policy_evaluation_on_moto_iam(moto) -> None:
    iam = moto.client("iam")
    name = f"diag-{time.monotonic_ns()}"
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    kw = {"region": "us-west-2", "endpoint_url": moto.endpoint_url}
    assert aws.s3_actions_denied(arn, "bkt", "pre", **kw) == list(aws.S3_ARTIFACT_ACTIONS)  # no policy at all
    iam.put_role_policy(RoleName=name, PolicyName="inline", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::bkt"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:DeleteObject"], "Resource": "arn:aws:s3:::bkt/pre/*"}]}))
    assert aws.s3_actions_denied(arn, "bkt", "pre", **kw) == ["s3:PutObject"]
    assert aws.s3_actions_denied(arn, "bkt", "other", **kw) == ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    managed = iam.create_policy(PolicyName=f"{name}-put", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:Put*", "Resource": "arn:aws:s3:::bkt/*"}]}))["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=name, PolicyArn=managed)
    assert aws.s3_actions_denied(arn, "bkt", "pre", **kw) == []
    iam.put_role_policy(RoleName=name, PolicyName="deny", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "s3:*", "Resource": "arn:aws:s3:::bkt/pre/*"}]}))
    assert aws.s3_actions_denied(arn, "bkt", "pre", **kw) == ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
