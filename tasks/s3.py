"""S3 through boto3: the artifact bucket the server writes to.

Credentials come from boto3's own chain (IRSA in the cluster, env or profile
elsewhere); ``endpoint_url`` points at an S3-compatible store or moto.

Errors: a missing bucket is :class:`BadInputError` (the Terraform output names
something that is not there); a denial (403, ``AccessDenied`` & co.) is
:class:`AuthError` naming the bucket and the code — permanent, never retried:
the same credentials will be denied again; throttling, 5xx and connection
problems are :class:`TransientError`.
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from mlflow_rollout.errors import AuthError, BadInputError, PermanentError, TransientError
from mlflow_rollout.redact import redact
from tasks.checks import ArtifactProbe

__all__ = ["s3_client", "check_bucket", "s3_artifact_probe"]

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
_DENIED_CODES = {
    "403", "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken",
}


def _denied(what: str, code: str, endpoint_url: str | None = None) -> AuthError:
    where = f" at {endpoint_url}" if endpoint_url else ""
    return AuthError(
        f"{what}: access denied ({code}){where} for these AWS credentials; "
        "the artifact bucket needs s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject"
    )


def s3_client(region: str, endpoint_url: str | None):
    return boto3.client(
        "s3", region_name=region, endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=20),
    )


def _classify(exc: Exception, what: str) -> Exception:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(f"{what}: {code or status}")
        if code in _DENIED_CODES or status == 403:
            return _denied(what, code or str(status))
        message = redact(str(exc.response.get("Error", {}).get("Message", "") or ""))
        return PermanentError(f"{what}: {code or status}" + (f": {message}" if message and message != code else ""))
    if isinstance(exc, EndpointConnectionError):
        return TransientError(f"{what}: cannot reach the S3 endpoint ({exc})")
    return TransientError(f"{what}: {type(exc).__name__}: {exc}")


def check_bucket(bucket: str, region: str, endpoint_url: str | None) -> str:
    """The artifact bucket exists and these credentials can reach it."""
    what = f"S3 bucket {bucket!r} (output s3_bucket_name)"
    client = s3_client(region, endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise BadInputError(
                f"{what} does not exist ({code})" + (f" at {endpoint_url}" if endpoint_url else "")
            ) from None
        if code in _DENIED_CODES:
            # HEAD answers carry no body: ask once more with a GET to learn AWS' own error code.
            raise _denied(what, _denial_code(client, bucket, code), endpoint_url) from None
        raise _classify(exc, what) from None
    except BotoCoreError as exc:
        raise _classify(exc, what) from None
    return f"bucket s3://{bucket} reachable"


def _denial_code(client, bucket: str, fallback: str) -> str:
    """The error code of a GET on the bucket (``AccessDenied``, ``InvalidAccessKeyId`` ...), else ``fallback``."""
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code and code != "403":
            return f"403 {code}"
    except BotoCoreError:
        pass
    return "403 Forbidden" if fallback == "403" else fallback


def s3_artifact_probe(bucket: str, prefix: str, region: str, endpoint_url: str | None) -> ArtifactProbe:
    """Finds ``s3://bucket/prefix/<exp>/<run>/artifacts/<path>``, checks it, deletes it."""

    def probe(exp_id: str, run_id: str, path: str, content: str) -> str:
        key = "/".join(p for p in (prefix.strip("/"), exp_id, run_id, "artifacts", path) if p)
        client = s3_client(region, endpoint_url)
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise PermanentError(f"artifact not found in the bucket: s3://{bucket}/{key}") from None
            raise _classify(exc, f"reading s3://{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise _classify(exc, f"reading s3://{bucket}/{key}") from None
        if body != content:
            raise PermanentError(f"s3://{bucket}/{key} has unexpected content")
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _classify(exc, f"deleting s3://{bucket}/{key}") from None
        return f"s3://{bucket}/{key}"

    return probe
