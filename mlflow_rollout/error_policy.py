"""One error policy: which outside failure becomes which of our errors.

Every task that talks to AWS (boto3), resolves DNS (dnspython) or reads an
HTTP status asks this module instead of keeping its own ``try/except``
ladder, so "is this retried?" has one answer across the project::

    kind          our error        retried   typical outside failure
    ------------  ---------------  --------  ---------------------------------------------
    bad_input     BadInputError    never     the input names something absent or invalid:
                                             NoSuchBucket, NoSuchKey, NoSuchHostedZone,
                                             NoSuchEntity, ResourceNotFoundException,
                                             InvalidArnException, ParamValidationError,
                                             NoRegionError, a malformed DNS name
    auth          AuthError        never     AccessDenied, UnauthorizedOperation,
                                             ExpiredToken, InvalidAccessKeyId, HTTP 401/403;
                                             no or partial AWS credentials
    permanent     PermanentError   never     any other 4xx, NXDOMAIN, NoAnswer, no resolver
                                             configured, unknown botocore errors
    transient     TransientError   backoff   Throttling, ThrottlingException,
                                             RequestLimitExceeded, PriorRequestNotComplete,
                                             SlowDown, 5xx, 409, 429, endpoint connection
                                             errors, connect/read timeouts, DNS timeouts,
                                             NoNameservers (SERVFAIL)

The tables are :data:`AWS_ERROR_CODES` (``ClientError`` codes, any service),
:data:`BOTOCORE_EXCEPTIONS` (botocore's own exceptions, most specific first),
:data:`DNS_EXCEPTIONS` (dnspython) and :func:`kind_for_status` (HTTP status,
the fallback for codes the tables do not name).

Messages name the service, the operation and the resource, then the code
and what it means::

    S3 HeadBucket on bucket 'b' (output s3_bucket_name): AccessDenied: access
    denied for these AWS credentials; needs s3:ListBucket, ... [endpoint http://…]

AWS' own message text passes through :func:`mlflow_rollout.redact.redact`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import botocore.exceptions as bce
import dns.exception
import dns.name
import dns.resolver

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, RolloutError, TransientError
from mlflow_rollout.redact import redact

__all__ = [
    "Kind",
    "Rule",
    "ERROR_TYPES",
    "AWS_ERROR_CODES",
    "BOTOCORE_EXCEPTIONS",
    "DNS_EXCEPTIONS",
    "kind_for_status",
    "aws_error_code",
    "aws_rule",
    "aws_error",
    "aws_call",
    "dns_rule",
    "dns_error",
]

Kind = Literal["bad_input", "auth", "permanent", "transient"]

#: The error type of each kind.
ERROR_TYPES: Mapping[Kind, type[RolloutError]] = {
    "bad_input": BadInputError,
    "auth": AuthError,
    "permanent": PermanentError,
    "transient": TransientError,
}


@dataclass(frozen=True)
class Rule:
    """What a failure is (``kind``) and what it means, in words (``reason``)."""

    kind: Kind
    reason: str

    def error(self, message: str) -> RolloutError:
        return ERROR_TYPES[self.kind](message)


_DENIED = "access denied for these AWS credentials"
_MISSING = "does not exist"

#: ``ClientError`` codes of any AWS service → rule. Codes not listed fall back
#: to :func:`kind_for_status` of the HTTP status.
AWS_ERROR_CODES: Mapping[str, Rule] = {
    # -- the input names something that is not there, or is not valid
    "NoSuchBucket": Rule("bad_input", "the bucket does not exist"),
    "NoSuchKey": Rule("bad_input", "the object does not exist"),
    "404": Rule("bad_input", "not found"),  # S3 HEAD answers have no body, hence no code
    "NotFound": Rule("bad_input", "not found"),
    "NoSuchHostedZone": Rule("bad_input", "the hosted zone does not exist"),
    "NoSuchEntity": Rule("bad_input", _MISSING),
    "NoSuchEntityException": Rule("bad_input", _MISSING),
    "ResourceNotFoundException": Rule("bad_input", _MISSING),
    "InvalidArnException": Rule("bad_input", "the ARN is not valid"),
    "InvalidBucketName": Rule("bad_input", "the bucket name is not valid"),
    "InvalidChangeBatch": Rule("bad_input", "Route53 rejected the change batch"),
    "InvalidInput": Rule("bad_input", "the request is not valid"),
    "ValidationError": Rule("bad_input", "the request is not valid"),
    "ValidationException": Rule("bad_input", "the request is not valid"),
    "PermanentRedirect": Rule("bad_input", "the bucket is in another region (aws.region)"),
    "AuthorizationHeaderMalformed": Rule("bad_input", "the region does not match the bucket's (aws.region)"),
    "IllegalLocationConstraintException": Rule("bad_input", "the region does not match the bucket's (aws.region)"),
    # -- these credentials are refused
    "403": Rule("auth", _DENIED),  # S3 HEAD
    "Forbidden": Rule("auth", _DENIED),
    "AccessDenied": Rule("auth", _DENIED),
    "AccessDeniedException": Rule("auth", _DENIED),
    "UnauthorizedOperation": Rule("auth", "the operation is not allowed for these AWS credentials"),
    "UnauthorizedAccess": Rule("auth", _DENIED),
    "AllAccessDisabled": Rule("auth", "all access to the resource is disabled"),
    "AccountProblem": Rule("auth", "the AWS account has a problem that blocks the operation"),
    "AuthFailure": Rule("auth", "AWS could not validate these credentials"),
    "InvalidAccessKeyId": Rule("auth", "the AWS access key id is not valid"),
    "InvalidClientTokenId": Rule("auth", "the AWS access key id or session token is not valid"),
    "UnrecognizedClientException": Rule("auth", "the AWS access key id or session token is not valid"),
    "SignatureDoesNotMatch": Rule("auth", "the AWS secret key does not match the access key id"),
    "InvalidToken": Rule("auth", "the AWS session token is not valid"),
    "ExpiredToken": Rule("auth", "the AWS session token has expired; refresh the credentials"),
    "ExpiredTokenException": Rule("auth", "the AWS session token has expired; refresh the credentials"),
    "RequestExpired": Rule("auth", "the request signature has expired (clock skew?)"),
    "OptInRequired": Rule("auth", "the AWS account is not subscribed to this service or region"),
    # -- try again later
    "Throttling": Rule("transient", "throttled by AWS"),
    "ThrottlingException": Rule("transient", "throttled by AWS"),
    "ThrottledException": Rule("transient", "throttled by AWS"),
    "RequestThrottled": Rule("transient", "throttled by AWS"),
    "RequestThrottledException": Rule("transient", "throttled by AWS"),
    "TooManyRequestsException": Rule("transient", "throttled by AWS"),
    "RequestLimitExceeded": Rule("transient", "throttled by AWS (request limit exceeded)"),
    "BandwidthLimitExceeded": Rule("transient", "throttled by AWS (bandwidth limit exceeded)"),
    "SlowDown": Rule("transient", "throttled by S3 (SlowDown)"),
    "PriorRequestNotComplete": Rule("transient", "a change to the same record is still in flight"),
    "ConcurrentModification": Rule("transient", "a concurrent change is in flight"),
    "OperationAborted": Rule("transient", "a conflicting operation is in flight"),
    "ServiceUnavailable": Rule("transient", "the AWS service is unavailable"),
    "ServiceUnavailableException": Rule("transient", "the AWS service is unavailable"),
    "ServiceFailure": Rule("transient", "the AWS service failed"),
    "InternalFailure": Rule("transient", "the AWS service failed"),
    "InternalError": Rule("transient", "the AWS service failed"),
    "InternalServiceError": Rule("transient", "the AWS service failed"),
    "RequestTimeout": Rule("transient", "the request timed out"),
    "RequestTimeoutException": Rule("transient", "the request timed out"),
    "RequestTimeTooSkewed": Rule("transient", "the clock differs from AWS' (botocore corrects it on retry)"),
    "500": Rule("transient", "the AWS service failed"),
    "502": Rule("transient", "bad gateway"),
    "503": Rule("transient", "the AWS service is unavailable"),
    "504": Rule("transient", "gateway timeout"),
}

#: botocore's own exceptions (no HTTP answer, or none we could read), most
#: specific first: the first ``isinstance`` match wins.
BOTOCORE_EXCEPTIONS: tuple[tuple[type[Exception], Rule], ...] = (
    (bce.NoCredentialsError, Rule(
        "auth", "no AWS credentials found (environment, shared profile, IRSA web identity or instance role)")),
    (bce.PartialCredentialsError, Rule("auth", "the AWS credentials are incomplete")),
    (bce.CredentialRetrievalError, Rule("auth", "the AWS credentials could not be retrieved")),
    (bce.TokenRetrievalError, Rule("auth", "the AWS SSO token could not be retrieved")),
    (bce.SSOError, Rule("auth", "the AWS SSO login is missing or expired")),
    (bce.NoRegionError, Rule("bad_input", "no AWS region configured (aws.region)")),
    (bce.InvalidRegionError, Rule("bad_input", "the AWS region is not valid (aws.region)")),
    (bce.ParamValidationError, Rule("bad_input", "invalid request parameters")),
    (bce.EndpointConnectionError, Rule("transient", "cannot reach the AWS endpoint")),
    (bce.ConnectTimeoutError, Rule("transient", "cannot reach the AWS endpoint (connect timeout)")),
    (bce.ProxyConnectionError, Rule("transient", "cannot reach the AWS endpoint through the proxy")),
    (bce.ReadTimeoutError, Rule("transient", "the AWS endpoint did not answer in time (read timeout)")),
    (bce.ConnectionClosedError, Rule("transient", "the AWS endpoint closed the connection")),
    (bce.ResponseStreamingError, Rule("transient", "the answer from the AWS endpoint was cut off")),
    (bce.IncompleteReadError, Rule("transient", "the answer from the AWS endpoint was cut off")),
    (bce.ConnectionError, Rule("transient", "cannot reach the AWS endpoint")),
    (bce.HTTPClientError, Rule("transient", "the connection to the AWS endpoint failed")),
    (bce.BotoCoreError, Rule("permanent", "botocore failed")),
)

#: dnspython exceptions, most specific first. NXDOMAIN is an answer (the name
#: does not exist), a timeout or SERVFAIL is a resolver that may answer later.
DNS_EXCEPTIONS: tuple[tuple[type[Exception], Rule], ...] = (
    (dns.resolver.NXDOMAIN, Rule("permanent", "NXDOMAIN")),
    (dns.resolver.YXDOMAIN, Rule("permanent", "YXDOMAIN (the name is too long after DNAME substitution)")),
    (dns.resolver.NoAnswer, Rule("permanent", "no answer")),
    (dns.resolver.NoResolverConfiguration, Rule(
        "permanent", "no system DNS resolver configured (/etc/resolv.conf); set aws.dns_resolvers")),
    (dns.exception.Timeout, Rule("transient", "timeout (no resolver answered)")),
    (dns.resolver.NoNameservers, Rule("transient", "SERVFAIL (no resolver could answer)")),
    (dns.exception.SyntaxError, Rule("bad_input", "not a valid DNS name")),
    (dns.name.NameTooLong, Rule("bad_input", "not a valid DNS name (longer than 255 octets)")),
    (dns.exception.DNSException, Rule("transient", "DNS error")),
)


def kind_for_status(status: int) -> Kind | None:
    """The kind of an HTTP status: 401/403 auth, 409/429/5xx transient, other 4xx permanent; None below 400."""
    if status in (401, 403):
        return "auth"
    if status in (409, 429) or status >= 500:
        return "transient"
    if status >= 400:
        return "permanent"
    return None


# --------------------------------------------------------------------------
# AWS


def aws_error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    if isinstance(exc, bce.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "") or "")
    return ""


def _status(exc: bce.ClientError) -> int:
    try:
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    except (TypeError, ValueError):
        return 0


def aws_rule(exc: BaseException, hints: Mapping[str, Rule] | None = None) -> Rule:
    """The rule for a botocore exception; ``hints`` (code → rule) win over the table for one call."""
    if isinstance(exc, bce.ClientError):
        code = aws_error_code(exc)
        status = _status(exc)
        if hints and code in hints:
            return hints[code]
        if code in AWS_ERROR_CODES:
            return AWS_ERROR_CODES[code]
        kind = kind_for_status(status) or "permanent"
        return Rule(kind, {
            "auth": _DENIED, "transient": f"HTTP {status} from AWS", "permanent": "AWS refused the request",
        }.get(kind, "AWS refused the request"))
    for cls, rule in BOTOCORE_EXCEPTIONS:
        if isinstance(exc, cls):
            return rule
    return Rule("permanent", type(exc).__name__)


def aws_error(
    exc: BaseException,
    *,
    service: str,
    operation: str | None = None,
    resource: str,
    endpoint_url: str | None = None,
    hints: Mapping[str, Rule] | None = None,
    permissions: str | None = None,
) -> RolloutError:
    """Our error for a botocore exception raised by ``service operation`` on ``resource``.

    ``operation`` defaults to the one botocore names (``ClientError.operation_name``);
    ``permissions`` (``"s3:GetObject"``) is added to auth errors; ``endpoint_url``
    is named when set (moto, an S3-compatible store).
    """
    rule = aws_rule(exc, hints)
    operation = getattr(exc, "operation_name", None) or operation or "call"
    head = f"{service} {operation} on {resource}"
    if isinstance(exc, bce.ClientError):
        code = aws_error_code(exc) or str(_status(exc) or "error")
        message = redact(str(exc.response.get("Error", {}).get("Message", "") or "")).strip()
        detail = f"{code}: {rule.reason}"
        if message and message != code and message.lower() not in rule.reason.lower():
            detail += f" (AWS: {message})"
    else:
        detail = f"{rule.reason} ({type(exc).__name__})"
        if isinstance(exc, bce.PartialCredentialsError):
            detail += f": {redact(str(exc))}"
        elif rule.kind == "bad_input" or (rule.kind == "permanent" and isinstance(exc, bce.BotoCoreError)):
            detail += f": {redact(str(exc))}"
    if rule.kind == "auth" and permissions:
        detail += f"; needs {permissions}"
    where = f" [endpoint {endpoint_url}]" if endpoint_url else ""
    return rule.error(f"{head}: {detail}{where}")


@contextmanager
def aws_call(
    service: str,
    operation: str | None,
    resource: str,
    *,
    endpoint_url: str | None = None,
    hints: Mapping[str, Rule] | None = None,
    permissions: str | None = None,
) -> Iterator[None]:
    """Run boto3 calls and turn any botocore failure into our error (the cause is dropped)::

        with aws_call("IAM", "GetRole", f"role {arn}", endpoint_url=endpoint_url):
            role = client.get_role(RoleName=name)["Role"]
    """
    try:
        yield
    except (bce.ClientError, bce.BotoCoreError) as exc:
        raise aws_error(
            exc, service=service, operation=operation, resource=resource,
            endpoint_url=endpoint_url, hints=hints, permissions=permissions,
        ) from None


# --------------------------------------------------------------------------
# DNS


def dns_rule(exc: BaseException) -> Rule:
    """The rule for a dnspython exception."""
    for cls, rule in DNS_EXCEPTIONS:
        if isinstance(exc, cls):
            return rule
    return Rule("permanent", type(exc).__name__)


def dns_error(exc: BaseException, name: str, *, rdtype: str = "A", via: str | None = None) -> RolloutError:
    """Our error for a failed lookup of ``name`` (``via``: the resolvers asked)."""
    rule = dns_rule(exc)
    where = f" via {via}" if via else ""
    return rule.error(f"DNS {rdtype} lookup of {name}{where}: {rule.reason}")
