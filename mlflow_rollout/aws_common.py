"""What every task that talks to AWS shares: the boto3 client factory and the ARN grammar.

:func:`client` is the only place a boto3 client is made: one region, one
optional ``endpoint_url`` for every API (moto in tests, an S3-compatible
store), short timeouts and a few botocore "standard" retries. The Prefect
tasks retry :class:`~mlflow_rollout.errors.TransientError` with their own,
visible backoff; hidden SDK retries are kept few so a run never looks hung.

The ARN grammar (``arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE``) is
:func:`parse_arn`; :data:`IAM_ROLE` and :data:`ACM_CERTIFICATE` are the two
kinds the rollout checks, with :func:`arn_problem` (a reason, for collecting
several problems) and :func:`require_arn` (a :class:`BadInputError`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import boto3
from botocore.config import Config

from mlflow_rollout.errors import BadInputError

__all__ = [
    "client",
    "Arn",
    "ArnKind",
    "IAM_ROLE",
    "ACM_CERTIFICATE",
    "parse_arn",
    "arn_problem",
    "require_arn",
]

#: botocore attempts per call, the first one included (3 retries), mode ``standard``.
MAX_ATTEMPTS = 4
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 20.0

# boto3's default session is not thread-safe while it makes clients.
_client_lock = threading.Lock()


def client(
    service: str,
    *,
    region: str,
    endpoint_url: str | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
):
    """A boto3 client for ``service`` in ``region`` (``endpoint_url``: moto or an S3-compatible store).

    Credentials come from boto3's own chain: environment, shared profile, IRSA
    web identity in the cluster, instance role.
    """
    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    with _client_lock:
        return boto3.client(service, region_name=region, endpoint_url=endpoint_url or None, config=config)


# --------------------------------------------------------------------------
# ARNs

# Partitions: aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b, aws-eusc, ...
_PARTITION = re.compile(r"^aws(?:-[a-z]+)*$")
_SERVICE = re.compile(r"^[a-z0-9-]+$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")
_ACCOUNT = re.compile(r"^\d{12}$")


@dataclass(frozen=True)
class Arn:
    """``arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE``; ``region``/``account`` may be empty."""

    partition: str
    service: str
    region: str
    account: str
    resource: str

    @property
    def resource_type(self) -> str:
        """``role`` of ``role/path/name``, ``certificate`` of ``certificate/ID``."""
        return re.split(r"[/:]", self.resource, maxsplit=1)[0]

    @property
    def resource_name(self) -> str:
        """The last part of the resource: ``name`` of ``role/path/name``."""
        return re.split(r"[/:]", self.resource)[-1]

    def __str__(self) -> str:
        return f"arn:{self.partition}:{self.service}:{self.region}:{self.account}:{self.resource}"


def parse_arn(value: str) -> Arn:
    """Split an ARN into its parts; ``ValueError`` naming the first part that is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"not a string ({type(value).__name__})")
    parts = value.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        raise ValueError("not of the form arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE")
    _, partition, service, region, account, resource = parts
    if not _PARTITION.match(partition):
        raise ValueError(f"unknown partition {partition!r}")
    if not _SERVICE.match(service):
        raise ValueError(f"service {service!r} is not valid")
    if region and not _REGION.match(region):
        raise ValueError(f"region {region!r} is not valid")
    if account and account != "aws" and not _ACCOUNT.match(account):
        raise ValueError(f"account {account!r} is not 12 digits")
    if not resource:
        raise ValueError("no resource")
    return Arn(partition, service, region, account, resource)


@dataclass(frozen=True)
class ArnKind:
    """One kind of ARN the rollout accepts (an IRSA role, an ACM certificate)."""

    label: str  # "IAM role"
    service: str
    form: str  # shown in messages
    resource: re.Pattern[str]
    regional: bool

    def problem(self, value: str) -> str | None:
        """Why ``value`` is not an ARN of this kind, or None."""
        try:
            arn = parse_arn(value)
        except ValueError as exc:
            return str(exc)
        if arn.service != self.service:
            return f"service is {arn.service!r}, not {self.service!r}"
        if self.regional and not arn.region:
            return "no region"
        if not self.regional and arn.region:
            return f"{self.label} ARNs have no region (got {arn.region!r})"
        if not _ACCOUNT.match(arn.account):
            return "no 12-digit account"
        if not self.resource.match(arn.resource):
            return f"resource {arn.resource[:80]!r} is not {self.form.rsplit(':', 1)[-1]}"
        return None


IAM_ROLE = ArnKind(
    label="IAM role",
    service="iam",
    form="arn:aws:iam::<12-digit account>:role/<name>",
    # Role names may carry an IAM path: role/path/to/name.
    resource=re.compile(r"^role/(?:[\w+=,.@-]+/)*[\w+=,.@-]{1,64}$"),
    regional=False,
)

ACM_CERTIFICATE = ArnKind(
    label="ACM certificate",
    service="acm",
    form="arn:aws:acm:<region>:<12-digit account>:certificate/<id>",
    resource=re.compile(r"^certificate/[A-Za-z0-9-]+$"),
    regional=True,
)


def _show(value: object, limit: int = 120) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def arn_problem(value: str, kind: ArnKind) -> str | None:
    """A printable reason why ``value`` is not a ``kind`` ARN, or None when it is."""
    problem = kind.problem(value)
    if problem is None:
        return None
    return f"not an {kind.label} ARN ({problem}): expected {kind.form}, got {_show(value)}"


def require_arn(value: str, kind: ArnKind, *, what: str | None = None) -> Arn:
    """The parsed ARN, or :class:`BadInputError` naming ``what`` (e.g. the output) and the reason."""
    problem = arn_problem(value, kind)
    if problem:
        raise BadInputError(f"{what}: {problem}" if what else problem)
    return parse_arn(value)
