"""S3 through boto3: the artifact bucket the server writes to.

Credentials come from boto3's own chain (IRSA in the cluster, env or profile
elsewhere); ``endpoint_url`` points at an S3-compatible store or moto.
"""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from tasks.checks import ArtifactProbe

__all__ = ["s3_client", "check_bucket", "s3_artifact_probe"]

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}


def s3_client(region: str, endpoint_url: str | None):
    return boto3.client(
        "s3", region_name=region, endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=20),
    )


def _classify(exc: Exception, what: str) -> Exception:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(f"{what}: {code or status}")
        return PermanentError(f"{what}: {code or status}")
    if isinstance(exc, EndpointConnectionError):
        return TransientError(f"{what}: cannot reach the S3 endpoint ({exc})")
    return TransientError(f"{what}: {type(exc).__name__}: {exc}")


def check_bucket(bucket: str, region: str, endpoint_url: str | None) -> str:
    """The artifact bucket exists and these credentials can reach it."""
    try:
        s3_client(region, endpoint_url).head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "403", "AccessDenied"):
            raise BadInputError(
                f"S3 bucket {bucket!r} (output s3_bucket_name) is not reachable: {code}"
                + (f" at {endpoint_url}" if endpoint_url else "")
            ) from None
        raise _classify(exc, f"S3 bucket {bucket!r}") from None
    except BotoCoreError as exc:
        raise _classify(exc, f"S3 bucket {bucket!r}") from None
    return f"bucket s3://{bucket} reachable"


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
            raise _classify(exc, f"s3://{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise _classify(exc, f"s3://{bucket}/{key}") from None
        if body != content:
            raise PermanentError(f"s3://{bucket}/{key} has unexpected content")
        client.delete_object(Bucket=bucket, Key=key)
        return f"s3://{bucket}/{key}"

    return probe
