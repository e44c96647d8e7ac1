"""S3 through boto3: the artifact bucket the server writes to.

Credentials come from boto3's own chain (IRSA in the cluster, env or profile
elsewhere); ``endpoint_url`` points at an S3-compatible store or moto.

Errors follow the one table in :mod:`mlflow_rollout.error_policy`: a missing
bucket is :class:`BadInputError` (the Terraform output names something that is
not there); a denial (403, ``AccessDenied`` & co.) is :class:`AuthError`
naming the bucket, the code and the permissions the bucket needs — never
retried: the same credentials will be denied again; throttling (``SlowDown``),
5xx and connection problems are :class:`TransientError`.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from mlflow_rollout import aws_common
from mlflow_rollout.error_policy import Rule, aws_call, aws_error, aws_error_code
from mlflow_rollout.errors import PermanentError
from tasks.checks import ArtifactProbe

__all__ = ["s3_client", "check_bucket", "s3_artifact_probe"]

#: What the server's role needs on the artifact bucket (named in denials).
BUCKET_PERMISSIONS = "s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the artifact bucket"
_BUCKET_MISSING = Rule("bad_input", "the bucket does not exist")


def s3_client(region: str, endpoint_url: str | None):
    """A boto3 S3 client (see :func:`mlflow_rollout.aws_common.client`)."""
    return aws_common.client("s3", region=region, endpoint_url=endpoint_url)


def check_bucket(bucket: str, region: str, endpoint_url: str | None) -> str:
    """The artifact bucket exists and these credentials can reach it."""
    what = f"bucket {bucket!r} (output s3_bucket_name)"
    client = s3_client(region, endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as exc:
        if aws_error_code(exc) == "403":
            exc = _with_error_code(client, bucket, exc)
        raise aws_error(
            exc, service="S3", operation="HeadBucket", resource=what, endpoint_url=endpoint_url,
            hints={"404": _BUCKET_MISSING}, permissions=BUCKET_PERMISSIONS,
        ) from None
    return f"bucket s3://{bucket} reachable"


def _with_error_code(client, bucket: str, head_error: ClientError) -> ClientError:
    """HEAD answers carry no body: ask once with a GET to learn AWS' own code (``AccessDenied`` ...)."""
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        if aws_error_code(exc) not in ("", "403"):
            return exc
    except BotoCoreError:
        pass
    return head_error


def s3_artifact_probe(bucket: str, prefix: str, region: str, endpoint_url: str | None) -> ArtifactProbe:
    """Finds ``s3://bucket/prefix/<exp>/<run>/artifacts/<path>``, checks it, deletes it."""

    def probe(exp_id: str, run_id: str, path: str, content: str) -> str:
        key = "/".join(p for p in (prefix.strip("/"), exp_id, run_id, "artifacts", path) if p)
        client = s3_client(region, endpoint_url)
        missing = Rule("permanent", "the artifact the server logged is not in the bucket")
        with aws_call("S3", "GetObject", f"artifact s3://{bucket}/{key}", endpoint_url=endpoint_url,
                      hints={"NoSuchKey": missing, "404": missing}, permissions=BUCKET_PERMISSIONS):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        if body != content:
            raise PermanentError(f"s3://{bucket}/{key} has unexpected content")
        with aws_call("S3", "DeleteObject", f"artifact s3://{bucket}/{key}", endpoint_url=endpoint_url,
                      permissions=BUCKET_PERMISSIONS):
            client.delete_object(Bucket=bucket, Key=key)
        return f"s3://{bucket}/{key}"

    return probe
