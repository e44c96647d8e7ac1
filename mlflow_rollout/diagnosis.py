"""The runbook's troubleshooting as rules: evidence in, named causes and fixes out.

The runbook ("문제 해결") lists four problems and the ``kubectl`` commands an
operator runs to tell their causes apart; a fifth (authentication) it gets
wrong for MLflow 3 — ``mlflow server create-admin-user`` does not exist, and
the admin's password lives in the auth *database*, not in the ini or the
Secret. Here each problem is one small rule over :class:`Evidence` that a
target gathers (pods and their logs, the Service and Ingress, the
ServiceAccount, IAM, a database connection attempt from the runner, the
server's answers). Rules decide only; gathering talks to the outside world
(``targets/kubernetes.py`` → ``tasks/*``). A rule whose evidence is missing
(``None``: could not be read, or does not apply to this target) says nothing.

Findings are used in three places: the rollout's diagnostics artifact and its
failure line, ``mlflow-health``'s degraded event, and ``mlflow-rollout
diagnose``. Nothing here holds a secret: evidence carries names, statuses
and redacted log lines only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "ContainerEvidence", "PodEvidence", "markdown", "DB_CREDENTIALS", "DB_UNREACHABLE", "DatabaseProbe", "Evidence", "Finding", "diagnose", "RULES", "summary_line",
]

Rule = Literal["database", "s3-access", "configuration", "load-balancer", "authentication"]


class ContainerEvidence(BaseModel):
    name: str
    ready: bool = False
    restarts: int = 0
    #: ``state.waiting`` (``CrashLoopBackOff``, ``CreateContainerConfigError``, …) and its message.
    waiting_reason: str | None = None
    waiting_message: str | None = None
    #: ``lastState.terminated``: how the previous run ended.
    last_exit_code: int | None = None


class PodEvidence(BaseModel):
    name: str
    phase: str = ""
    ready: bool = False
    containers: list[ContainerEvidence] = Field(default_factory=list)
    #: The log tail of the current run and, after a restart, of the previous one (redacted).
    log: str = ""

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.containers)

    @property
    def troubled(self) -> bool:
        """Not Ready, or restarted: what ``kubectl get pods`` shows as a problem."""
        return not self.ready or self.restarts > 0


class DatabaseProbe(BaseModel):
    """One connection attempt from the runner to the database the server uses."""

    where: str  # host:port/database, never the password
    outcome: Literal["ok", "credentials-refused", "unreachable", "error"]
    detail: str = ""


class Evidence(BaseModel):
    """What a target could read about its server; ``None`` = unknown or not applicable."""

    environment: str
    target: str
    namespace: str | None = None
    secret: str | None = None  # where the server's credentials live (e.g. "secret ns/mlflow-credentials")
    revision: int | None = None
    revision_auth: bool | None = None
    pods: list[PodEvidence] = Field(default_factory=list)
    database: DatabaseProbe | None = None
    # S3 through IRSA
    service_account: str | None = None
    service_account_role: str | None = None  # the eks.amazonaws.com/role-arn annotation ("" = none)
    expected_role: str | None = None  # the role the revision's values name (Terraform's mlflow_irsa_role_arn)
    artifacts_destination: str | None = None
    #: S3 actions the role's policies do not allow on the artifact location ([] = all allowed).
    iam_denied: list[str] | None = None
    # the load balancer path
    service: str | None = None
    service_selector: dict[str, str] | None = None
    service_ready_pods: int | None = None  # Ready pods the Service selects (its endpoints)
    ingress: str | None = None
    healthcheck_path: str | None = None
    healthcheck_codes: str | None = None
    healthcheck_status: int | None = None  # what a Ready pod answered on the health-check path
    public_status: int | None = None  # what the public URL answered on /health (502/503: the ALB)
    # authentication
    anonymous_status: int | None = None  # an anonymous tracking read: 200 = no auth
    admin_username: str | None = None
    admin_store: str | None = None
    admin_status: int | None = None  # the stored admin password's login: 200 opens, 401 refused
    pending_status: int | None = None  # an interrupted rotation's pending password's login
    notes: list[str] = Field(default_factory=list)  # evidence that could not be read, and why


class Finding(BaseModel):
    rule: Rule
    cause: str
    fix: str
    evidence: list[str] = Field(default_factory=list)

    def line(self) -> str:
        return f"{self.rule}: {self.cause} — fix: {self.fix}"


# Patterns in the server's (psycopg2 / SQLAlchemy / botocore / MLflow) own words.
DB_CREDENTIALS = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|role \"[^\"]+\" does not exist|"
    r"database \"[^\"]+\" does not exist|Access denied for user", re.I)
DB_UNREACHABLE = re.compile(
    r"Connection refused|could not connect to server|connection to server at .* failed|timeout expired|"
    r"could not translate host name|Connection timed out|No route to host|Name or service not known|"
    r"Can't connect to MySQL server", re.I)
_S3_DENIED = re.compile(
    r"AccessDenied|Unable to locate credentials|NoCredentialsError|InvalidAccessKeyId|"
    r"not authorized to perform: sts:AssumeRoleWithWebIdentity|ExpiredToken|SignatureDoesNotMatch", re.I)
_INI = re.compile(
    r"configparser\.\w+Error|basic_auth\.ini|MLFLOW_AUTH_CONFIG_PATH|KeyError: '(database_uri|admin_username|"
    r"admin_password|default_permission|authorization_function)'", re.I)
_BAD_VALUE = re.compile(r"Error: Invalid value for '?(--[\w-]+)'?|Error: (No such option: --[\w-]+)|"
                        r"invalid literal for int\(\) with base 10|ValueError: .*environment variable", re.I)


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    for line in text.splitlines():
        if pattern.search(line):
            return line.strip()[:240]
    return None


def _pod_lines(ev: Evidence, pattern: re.Pattern[str], troubled_only: bool = True) -> list[str]:
    out = []
    for pod in ev.pods:
        if troubled_only and not pod.troubled:
            continue
        line = _first(pattern, pod.log)
        if line:
            out.append(f"pod {pod.name}: {line}")
    return out


def _states(ev: Evidence) -> str:
    bad = [p for p in ev.pods if p.troubled]
    waiting = sorted({c.waiting_reason for p in bad for c in p.containers if c.waiting_reason})
    what = ", ".join(waiting) or "not Ready"
    return f"{len(bad)} of {len(ev.pods)} pod(s) {what}"


def database(ev: Evidence) -> Finding | None:
    """Runbook problem 1 (CrashLoopBackOff, RDS): unreachable vs credentials refused, from the pods' logs
    and the runner's own connection attempt with the same URI."""
    credentials = _pod_lines(ev, DB_CREDENTIALS)
    unreachable = _pod_lines(ev, DB_UNREACHABLE)
    probe = ev.database
    if not (credentials or unreachable) and not (probe and probe.outcome != "ok" and any(p.troubled for p in ev.pods)):
        return None
    where = probe.where if probe else "the database"
    key = f"{ev.secret} key backend-store-uri" if ev.secret else "the backend store URI"
    evidence = [_states(ev), *(credentials or unreachable)[:2]]
    if probe:
        evidence.append(f"from this runner: {probe.outcome} ({probe.detail})" if probe.detail else
                        f"from this runner: {probe.outcome}")
    if credentials or (probe and probe.outcome == "credentials-refused"):
        return Finding(
            rule="database", evidence=evidence,
            cause=f"the database at {where} refuses the credentials the server uses ({key})",
            fix=(f"put the right user/password in {key} and in basic_auth.ini's database_uri — they come from the "
                 "Terraform output rds_connection_string — then run the rollout again (its secrets stage rewrites "
                 "both and rolls the pods)"),
        )
    if probe and probe.outcome == "ok":
        return Finding(
            rule="database", evidence=evidence,
            cause=f"the pods cannot reach the database at {where}, but this runner can: the network between the "
                  "pods and the database drops the connection",
            fix=("allow the EKS node security group (the pods' source) inbound on 5432 in the RDS security group, "
                 "and check the pods' subnets' route to the database; then restart the pods "
                 "(kubectl rollout restart deployment)"),
        )
    return Finding(
        rule="database", evidence=evidence,
        cause=f"nothing answers at {where}, from the pods nor from this runner: the URI's host or port is wrong, "
              "or the database is down",
        fix=(f"check {key} against the Terraform outputs rds_endpoint/rds_connection_string and that the RDS "
             "instance is available; if both are right, the RDS security group must allow the EKS node "
             "security group on 5432"),
    )


def s3_access(ev: Evidence) -> Finding | None:
    """Runbook problem 4 (S3 AccessDenied, IRSA): the ServiceAccount's role annotation, the role's
    policy (IAM), and the server's own error."""
    errors = _pod_lines(ev, _S3_DENIED, troubled_only=False)
    sa = f"ServiceAccount {ev.namespace}/{ev.service_account}" if ev.service_account else "the ServiceAccount"
    if ev.service_account_role is not None and ev.expected_role and ev.service_account_role != ev.expected_role:
        now = f"names {ev.service_account_role}" if ev.service_account_role else "has no eks.amazonaws.com/role-arn annotation"
        return Finding(
            rule="s3-access", evidence=[f"{sa} {now}", f"expected {ev.expected_role}", *errors[:2]],
            cause=f"the IRSA role is not on the server's ServiceAccount: {sa} {now}, so the pods get no "
                  "(or the wrong) AWS credentials for S3",
            fix=(f"annotate it with eks.amazonaws.com/role-arn={ev.expected_role} — run the rollout again, the chart "
                 "sets it from serviceAccount.irsaRoleArn — then restart the pods so the identity webhook mounts "
                 "the token"),
        )
    if ev.iam_denied:
        return Finding(
            rule="s3-access", evidence=[f"denied: {', '.join(ev.iam_denied)}", *errors[:2]],
            cause=f"the IRSA role {ev.expected_role or ev.service_account_role} does not allow "
                  f"{', '.join(ev.iam_denied)} on {ev.artifacts_destination}",
            fix=("add the missing actions for the bucket (s3:ListBucket on the bucket ARN) and its prefix "
                 "(s3:GetObject, s3:PutObject, s3:DeleteObject on <bucket ARN>/<prefix>/*) to the role's policy "
                 "in Terraform and apply it; no pod restart is needed"),
        )
    if errors:
        return Finding(
            rule="s3-access", evidence=errors[:3],
            cause="the server's S3 calls are refused although the ServiceAccount and the role's policy look right",
            fix=("check the bucket policy, a KMS key policy if the bucket is encrypted with one, and the role's trust "
                 "policy (sts:AssumeRoleWithWebIdentity for this ServiceAccount)"),
        )
    return None


def configuration(ev: Evidence) -> Finding | None:
    """Runbook problem 1's third cause (environment/config error): a missing Secret key, a bad value, a bad ini."""
    for pod in ev.pods:
        for c in pod.containers:
            if c.waiting_reason == "CreateContainerConfigError" and c.waiting_message:
                key = re.search(r"couldn't find key (\S+) in Secret (\S+)", c.waiting_message)
                missing = re.search(r"secret \"?([^\" ]+)\"? not found", c.waiting_message, re.I)
                if key:
                    cause = f"the Secret {key.group(2)} has no key {key.group(1)!r}, which the pod's env names"
                    fix = (f"name an existing key in the chart's secretKeys values, or add {key.group(1)!r} to the "
                           "Secret; the rollout's secrets stage writes backend-store-uri, auth-database-uri, "
                           "admin-password, flask-secret-key and basic_auth.ini")
                elif missing:
                    cause = f"the Secret {missing.group(1)} the pod reads does not exist"
                    fix = "run the rollout's secrets stage, or set existingSecret to the Secret that holds the keys"
                else:
                    cause = f"the kubelet cannot build the container's config: {c.waiting_message[:200]}"
                    fix = "correct the values named in the message and run the rollout again"
                return Finding(rule="configuration", cause=cause, fix=fix,
                               evidence=[f"pod {pod.name} container {c.name}: CreateContainerConfigError: "
                                         f"{c.waiting_message[:240]}"])
    ini = _pod_lines(ev, _INI)
    if ini:
        return Finding(
            rule="configuration", evidence=[_states(ev), *ini[:2]],
            cause="the server cannot read its auth configuration (basic_auth.ini from the Secret's basic_auth.ini key)",
            fix=("let the rollout's secrets stage rewrite basic_auth.ini (it renders [mlflow] with database_uri, "
                 "admin_username, admin_password, default_permission, authorization_function); do not edit it by "
                 "hand"),
        )
    bad = _pod_lines(ev, _BAD_VALUE)
    if bad:
        return Finding(
            rule="configuration", evidence=[_states(ev), *bad[:2]],
            cause="the server refuses a setting given on its command line or in its environment",
            fix="correct the value named in the log (chart values mlflow.*, extraEnv) and run the rollout again",
        )
    return None


def _codes_accept(codes: str | None, status: int) -> bool:
    """The ALB's success-codes syntax: ``200``, ``200,204``, ``200-299``."""
    for part in (codes or "200").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit() and int(lo) <= status <= int(hi or lo):
            return True
    return False


def load_balancer(ev: Evidence) -> Finding | None:
    """Runbook problem 2 (502 from the ALB): the Service's endpoints, the health-check path's answer."""
    public = [f"https://…/health answered {ev.public_status}"] if ev.public_status in (502, 503, 504) else []
    if ev.service and ev.service_ready_pods == 0 and (ev.pods and any(p.ready for p in ev.pods)):
        selector = ",".join(f"{k}={v}" for k, v in sorted((ev.service_selector or {}).items())) or "(none)"
        return Finding(
            rule="load-balancer", evidence=[*public, f"Service {ev.service} selector {selector}: 0 Ready endpoints",
                                            f"{sum(p.ready for p in ev.pods)} Ready server pod(s) it does not select"],
            cause=f"the Service {ev.namespace}/{ev.service} selects no Ready pod (its selector {selector} matches "
                  "none of the server's pods), so the load balancer has no target",
            fix=("make the Service's selector the Deployment's pod labels — run the rollout again (helm restores the "
                 "chart's Service), or undo the manual edit"),
        )
    if (ev.healthcheck_path and ev.healthcheck_status is not None
            and not _codes_accept(ev.healthcheck_codes, ev.healthcheck_status)):
        return Finding(
            rule="load-balancer",
            evidence=[*public, f"a Ready pod answered {ev.healthcheck_status} on {ev.healthcheck_path}"],
            cause=f"the load balancer's health check fails: GET {ev.healthcheck_path} (Ingress {ev.ingress} "
                  f"annotation alb.ingress.kubernetes.io/healthcheck-path) answers {ev.healthcheck_status}, not "
                  f"{ev.healthcheck_codes or '200'}",
            fix=("set ingress.healthcheckPath to /health (MLflow's unauthenticated health endpoint; every other "
                 "path answers 401 with auth on) and run the rollout again"),
        )
    if public and ev.service_ready_pods == 0 and not any(p.ready for p in ev.pods):
        return Finding(
            rule="load-balancer", evidence=[*public, _states(ev)],
            cause="no server pod is Ready, so the load balancer has no healthy target",
            fix="see the other findings for why the pods are not Ready",
        )
    return None


def authentication(ev: Evidence) -> Finding | None:
    """Runbook problem 3 (Unauthorized), corrected: the admin lives in the auth database."""
    if ev.revision_auth is False or ev.anonymous_status == 200:
        what = (f"revision {ev.revision} runs with auth off" if ev.revision_auth is False
                else "an anonymous tracking request was answered 200")
        return Finding(
            rule="authentication", evidence=[what],
            cause="authentication is not enabled on the running server: anyone who reaches it can read and write",
            fix=(f"roll back to the last revision with auth on (mlflow-rollout rollback --env {ev.environment} "
                 "--reason …, or the mlflow-rollback deployment) or run the rollout, which deploys auth on; "
                 "never serve it without auth"),
        )
    if ev.admin_status == 401:
        user = ev.admin_username or "admin"
        if ev.pending_status == 200:
            return Finding(
                rule="authentication", evidence=["stored password: 401; pending password of a rotation: 200"],
                cause=f"an admin-password rotation was interrupted: the server took the new password of {user!r}, "
                      f"{ev.admin_store or 'the store'} still holds the old one",
                fix=("run mlflow-users with action rotate-admin-password: it finishes the interrupted rotation "
                     "(stores the password the server took)"),
            )
        return Finding(
            rule="authentication", evidence=[f"the stored password of {user!r} answered 401"],
            cause=(f"the stored admin password ({ev.admin_store or 'the secret store'}) does not open {user!r}: "
                   "MLflow keeps the admin's password in the auth database, set at its first start; changing "
                   "the Secret or basic_auth.ini later does not change it"),
            fix=(f"put the admin's current password back in {ev.admin_store or 'the store'}, then change it with "
                 "mlflow-users rotate-admin-password; do not recreate the admin or the auth database (the "
                 "runbook's create-admin-user does not exist in MLflow 3, and a new auth database drops every "
                 "user and permission)"),
        )
    return None


#: Order = precedence in a summary line: what stops the server first.
RULES: tuple[Callable[[Evidence], Finding | None], ...] = (configuration, database, s3_access, load_balancer,
                                                          authentication)


def diagnose(ev: Evidence) -> list[Finding]:
    """Every rule's finding for ``ev``, most fundamental first (empty: nothing the runbook knows is wrong)."""
    return [f for f in (rule(ev) for rule in RULES) if f is not None]


def markdown(findings: list[Finding]) -> str:
    """The findings as a markdown section (the top of a diagnostics artifact)."""
    if not findings:
        return "## Diagnosis\n\nNone of the known failures (database, S3 access, configuration, load balancer, " \
               "authentication) matches what was read; see the events and logs below.\n"
    parts = ["## Diagnosis", ""]
    for f in findings:
        parts += [f"### {f.rule}: {f.cause}", "", f"**Fix:** {f.fix}", ""]
        parts += [f"- {e}" for e in f.evidence] + [""]
    return "\n".join(parts)


def summary_line(findings: list[Finding]) -> str | None:
    """The first finding in one line (for a failure line or an event), with how many more there are."""
    if not findings:
        return None
    more = f" (+{len(findings) - 1} more finding(s))" if len(findings) > 1 else ""
    return f"diagnosis: {findings[0].line()}{more}"
