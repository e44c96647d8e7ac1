"""The one error policy (mlflow_rollout/error_policy.py), the ARN grammar and the password rule.

Table-driven with real botocore and dnspython exceptions, then a few
behaviour tests over HTTP: moto_server (a missing bucket, no credentials) and
a stub endpoint answering AWS' own throttling and denial documents.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.exceptions as bce
import dns.name
import dns.resolver
import pytest
from pydantic import SecretStr

from mlflow_rollout import aws_common, error_policy
from mlflow_rollout.aws_common import ACM_CERTIFICATE, IAM_ROLE, arn_problem, parse_arn, require_arn
from mlflow_rollout.error_policy import AWS_ERROR_CODES, ERROR_TYPES, Rule, aws_call, aws_error, dns_error
from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, TransientError
from mlflow_rollout.redact import register_secret
from mlflow_rollout.secrets import check_password, password_problem, validate_admin_password
from mlflow_rollout.settings import SecretRef
from tests.support.services import MotoServer

ENDPOINT = "http://127.0.0.1:9"


def client_error(code: str, status: int, operation: str = "GetRole", message: str = "") -> bce.ClientError:
    response: dict = {"ResponseMetadata": {"HTTPStatusCode": status}}
    if code:
        response["Error"] = {"Code": code, "Message": message}
    return bce.ClientError(response, operation)


# --------------------------------------------------------------------------
# AWS ClientError codes


@pytest.mark.parametrize(
    ("code", "status", "operation", "expected"),
    [
        # throttling: retried
        ("Throttling", 400, "ChangeResourceRecordSets", TransientError),
        ("ThrottlingException", 400, "DescribeCertificate", TransientError),
        ("RequestLimitExceeded", 503, "DescribeInstances", TransientError),
        ("PriorRequestNotComplete", 400, "ChangeResourceRecordSets", TransientError),
        ("SlowDown", 503, "GetObject", TransientError),
        ("TooManyRequestsException", 429, "DescribeCertificate", TransientError),
        # 5xx and unknown server-side codes: retried
        ("InternalError", 500, "GetObject", TransientError),
        ("ServiceUnavailable", 503, "GetRole", TransientError),
        ("SomethingNew", 502, "GetRole", TransientError),
        ("", 503, "HeadBucket", TransientError),
        ("SomethingNew", 429, "GetRole", TransientError),
        ("SomethingNew", 409, "GetRole", TransientError),
        # denied: never retried
        ("AccessDenied", 403, "GetObject", AuthError),
        ("AccessDeniedException", 400, "DescribeCertificate", AuthError),
        ("UnauthorizedOperation", 403, "DescribeInstances", AuthError),
        ("ExpiredToken", 400, "GetRole", AuthError),
        ("ExpiredTokenException", 400, "DescribeCertificate", AuthError),
        ("InvalidClientTokenId", 403, "GetRole", AuthError),
        ("SignatureDoesNotMatch", 403, "GetObject", AuthError),
        ("403", 403, "HeadBucket", AuthError),
        ("SomethingNew", 401, "GetRole", AuthError),
        # the input names something absent or invalid
        ("NoSuchBucket", 404, "GetObject", BadInputError),
        ("NoSuchKey", 404, "GetObject", BadInputError),
        ("404", 404, "HeadBucket", BadInputError),
        ("NoSuchHostedZone", 404, "ChangeResourceRecordSets", BadInputError),
        ("NoSuchEntity", 404, "GetRole", BadInputError),
        ("ResourceNotFoundException", 400, "DescribeCertificate", BadInputError),
        ("InvalidChangeBatch", 400, "ChangeResourceRecordSets", BadInputError),
        # any other 4xx: permanent
        ("NoSuchChange", 404, "GetChange", PermanentError),
        ("SomethingNew", 400, "GetRole", PermanentError),
    ],
)
def test_client_error_codes(code: str, status: int, operation: str, expected: type) -> None:
    err = aws_error(
        client_error(code, status, operation, message="told by AWS"),
        service="Svc", resource="thing 'x'", endpoint_url=ENDPOINT,
    )
    assert type(err) is expected, (code, status, err)
    msg = str(err)
    assert msg.startswith(f"Svc {operation} on thing 'x': "), msg
    assert (code or str(status)) in msg and ENDPOINT in msg
    assert ("told by AWS" in msg) == bool(code)  # AWS' own message when the answer had one


def test_every_code_in_the_table_maps_to_its_kind() -> None:
    for code, rule in AWS_ERROR_CODES.items():
        err = aws_error(client_error(code, 400), service="IAM", resource="role r")
        assert type(err) is ERROR_TYPES[rule.kind], code
        assert f"IAM GetRole on role r: {code}: {rule.reason}" in str(err)


def test_hints_override_the_table_for_one_call() -> None:
    hint = Rule("permanent", "the artifact is not in the bucket")
    err = aws_error(client_error("NoSuchKey", 404, "GetObject"), service="S3", resource="s3://b/k",
                    hints={"NoSuchKey": hint})
    assert type(err) is PermanentError and "the artifact is not in the bucket" in str(err)


def test_auth_errors_name_the_permissions() -> None:
    err = aws_error(client_error("AccessDenied", 403, "GetObject"), service="S3", resource="bucket 'b'",
                    permissions="s3:GetObject")
    assert isinstance(err, AuthError) and str(err).endswith("needs s3:GetObject")


def test_aws_messages_are_redacted() -> None:
    secret = "Sup3r-Secret-Value-774"
    register_secret(secret)
    err = aws_error(client_error("AccessDenied", 403, message=f"denied for token {secret}"),
                    service="IAM", resource="role r")
    assert secret not in str(err) and "***" in str(err)


# --------------------------------------------------------------------------
# botocore's own exceptions


@pytest.mark.parametrize(
    ("exc", "expected", "words"),
    [
        (bce.NoCredentialsError(), AuthError, "no AWS credentials found"),
        (bce.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), AuthError,
         "AWS_SECRET_ACCESS_KEY"),
        (bce.CredentialRetrievalError(provider="assume-role-with-web-identity", error_msg="x"), AuthError,
         "could not be retrieved"),
        (bce.EndpointConnectionError(endpoint_url=ENDPOINT), TransientError, "cannot reach the AWS endpoint"),
        (bce.ConnectTimeoutError(endpoint_url=ENDPOINT), TransientError, "connect timeout"),
        (bce.ReadTimeoutError(endpoint_url=ENDPOINT), TransientError, "read timeout"),
        (bce.ConnectionClosedError(endpoint_url=ENDPOINT), TransientError, "closed the connection"),
        (bce.ParamValidationError(report="Invalid bucket name"), BadInputError, "Invalid bucket name"),
        (bce.NoRegionError(), BadInputError, "aws.region"),
        (bce.UnknownServiceError(service_name="nope", known_service_names="s3"), PermanentError, "nope"),
    ],
)
def test_botocore_exceptions(exc: Exception, expected: type, words: str) -> None:
    err = aws_error(exc, service="Route53", operation="ListHostedZones", resource="hosted zones")
    assert type(err) is expected, err
    msg = str(err)
    assert msg.startswith("Route53 ListHostedZones on hosted zones: ") and words in msg, msg
    assert type(exc).__name__ in msg


def test_aws_call_maps_and_drops_the_cause() -> None:
    with pytest.raises(TransientError) as info:
        with aws_call("S3", "GetObject", "s3://b/k", endpoint_url=ENDPOINT):
            raise client_error("SlowDown", 503, "GetObject")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Not a botocore exception: not ours to map.
    with pytest.raises(KeyError):
        with aws_call("S3", "GetObject", "s3://b/k"):
            raise KeyError("x")


@pytest.mark.parametrize(
    ("status", "kind"),
    [(200, None), (400, "permanent"), (401, "auth"), (403, "auth"), (404, "permanent"), (409, "transient"),
     (429, "transient"), (500, "transient"), (503, "transient")],
)
def test_kind_for_status(status: int, kind: str | None) -> None:
    assert error_policy.kind_for_status(status) == kind


# --------------------------------------------------------------------------
# DNS


@pytest.mark.parametrize(
    ("exc", "expected", "words"),
    [
        (dns.resolver.NXDOMAIN(), PermanentError, "NXDOMAIN"),
        (dns.resolver.NoAnswer(), PermanentError, "no answer"),
        (dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]), TransientError, "timeout"),
        (dns.resolver.NoNameservers(), TransientError, "SERVFAIL"),
        (dns.resolver.NoResolverConfiguration(), PermanentError, "aws.dns_resolvers"),
        (dns.name.LabelTooLong(), BadInputError, "not a valid DNS name"),
    ],
)
def test_dns_exceptions(exc: Exception, expected: type, words: str) -> None:
    err = dns_error(exc, "mlflow.example.com", via="10.0.0.2")
    assert type(err) is expected
    assert str(err).startswith("DNS A lookup of mlflow.example.com via 10.0.0.2: ") and words in str(err)


# --------------------------------------------------------------------------
# ARN grammar


@pytest.mark.parametrize(
    "value",
    [
        "arn:aws:iam::123456789012:role/mlflow-irsa",
        "arn:aws:iam::123456789012:role/svc/team/mlflow-irsa",
        "arn:aws-cn:iam::123456789012:role/x",
        "arn:aws-us-gov:iam::123456789012:role/x+=,.@-_",
    ],
)
def test_role_arns_accepted(value: str) -> None:
    assert arn_problem(value, IAM_ROLE) is None
    assert require_arn(value, IAM_ROLE).resource_name == value.rsplit("/", 1)[-1]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("mlflow-irsa", "not of the form"),
        ("arn:aws:iam::12345:role/x", "not 12 digits"),
        ("arn:aws:iam::123456789012:user/alice", "is not role/<name>"),
        ("arn:aws:iam:us-west-2:123456789012:role/x", "have no region"),
        ("arn:aws:acm:us-west-2:123456789012:certificate/abc", "service is 'acm', not 'iam'"),
        ("arn:azure:iam::123456789012:role/x", "unknown partition"),
        ("arn:aws:iam::123456789012:role/" + "n" * 65, "is not role/<name>"),
    ],
)
def test_role_arns_rejected_with_a_reason(value: str, why: str) -> None:
    problem = arn_problem(value, IAM_ROLE)
    assert problem is not None and why in problem and "arn:aws:iam::<12-digit account>:role/<name>" in problem
    with pytest.raises(BadInputError, match="output 'mlflow_irsa_role_arn': not an IAM role ARN"):
        require_arn(value, IAM_ROLE, what="output 'mlflow_irsa_role_arn'")


def test_certificate_arns() -> None:
    arn = parse_arn("arn:aws:acm:eu-central-1:123456789012:certificate/0b6f7a7e-3d1c-4c43")
    assert (arn.partition, arn.service, arn.region, arn.account) == ("aws", "acm", "eu-central-1", "123456789012")
    assert arn.resource_type == "certificate" and str(arn).endswith(":certificate/0b6f7a7e-3d1c-4c43")
    assert arn_problem(str(arn), ACM_CERTIFICATE) is None
    assert "no region" in arn_problem("arn:aws:acm::123456789012:certificate/x", ACM_CERTIFICATE)
    assert "region 'Mars'" in arn_problem("arn:aws:acm:Mars:123456789012:certificate/x", ACM_CERTIFICATE)


# --------------------------------------------------------------------------
# the password rule


def test_password_rule() -> None:
    assert password_problem("x" * 12) is None
    assert "at least 12 characters (got 11)" in password_problem("x" * 11)
    assert password_problem("password1234") is None  # fine for a user ...
    assert "old default" in password_problem(SecretStr("password1234"), admin=True)  # ... never for an admin
    with pytest.raises(BadInputError, match=r"users\[0\].password: too short"):
        check_password(SecretStr("short"), "users[0].password")
    ref = SecretRef(env="ADMIN_PW")
    with pytest.raises(BadInputError) as info:
        validate_admin_password(SecretStr("tiny-secret"), ref)
    assert "secrets.admin_password (environment variable ADMIN_PW)" in str(info.value)
    assert "tiny-secret" not in str(info.value)


# --------------------------------------------------------------------------
# behaviour over HTTP


def test_missing_bucket_through_moto_names_the_bucket(moto: MotoServer) -> None:
    from tasks import s3

    with pytest.raises(BadInputError) as info:
        s3.check_bucket("no-such-artifact-bucket", "us-west-2", moto.endpoint_url)
    msg = str(info.value)
    assert msg.startswith("S3 HeadBucket on bucket 'no-such-artifact-bucket' (output s3_bucket_name): 404: ")
    assert "the bucket does not exist" in msg and moto.endpoint_url in msg


def test_no_credentials_is_an_auth_error(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from tasks import aws

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it found
    with pytest.raises(AuthError) as info:
        aws.check_role("arn:aws:iam::123456789012:role/x", region="us-west-2", endpoint_url=moto.endpoint_url)
    msg = str(info.value)
    assert msg.startswith("IAM GetRole on role arn:aws:iam::123456789012:role/x: no AWS credentials found"), msg


class _Stub(ThreadingHTTPServer):
    """Answers every request with one fixed AWS error document; counts requests."""

    status = 400
    body = b""
    requests: list[str]


@pytest.fixture
def stub() -> Iterator[_Stub]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            server: _Stub = self.server  # type: ignore[assignment]
            server.requests.append(f"{self.command} {self.path}")
            self.send_response(server.status)
            self.send_header("Content-Type", "text/xml")
            payload = b"" if self.command == "HEAD" else server.body
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    server = _Stub(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _url(stub: _Stub) -> str:
    return f"http://127.0.0.1:{stub.server_address[1]}"


def test_route53_throttling_is_transient_after_botocore_retries(stub: _Stub) -> None:
    from tasks import aws

    stub.body = (
        b'<?xml version="1.0"?>\n<ErrorResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/">'
        b"<Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
        b"<RequestId>1</RequestId></ErrorResponse>"
    )
    with pytest.raises(TransientError) as info:
        aws.find_hosted_zone("mlflow.example.com", region="us-west-2", endpoint_url=_url(stub))
    msg = str(info.value)
    assert msg.startswith("Route53 ListHostedZones on the account's hosted zones: Throttling: throttled by AWS")
    assert "Rate exceeded" in msg
    assert len(stub.requests) == aws_common.MAX_ATTEMPTS  # botocore's own tries, then ours (the task's)


def test_s3_access_denied_is_an_auth_error_naming_code_and_bucket(stub: _Stub) -> None:
    from tasks import s3

    stub.status = 403
    stub.body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
        b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>"
    )
    with pytest.raises(AuthError) as info:
        s3.check_bucket("artifacts", "us-west-2", _url(stub))
    msg = str(info.value)
    assert "bucket 'artifacts'" in msg and "AccessDenied" in msg and "s3:ListBucket" in msg, msg
    assert len(stub.requests) == 2  # the HEAD (no body, no code), then one GET to learn AWS' code
