"""The terraform-outputs stage: read what the infrastructure run produced.

The rollout needs three or four values that Terraform created (the IRSA role,
the RDS connection string, the artifact bucket, optionally the certificate;
the Route53 zone is looked up by the host name, not read from an output). They can come from three places, chosen per environment:

``file``
    A JSON file, either ``terraform output -json`` saved to disk or a flat
    ``{"name": value}`` map (what people write by hand for the local target).
``cli``
    ``terraform -chdir=DIR output -json`` with the real binary, so whatever
    backend the directory is initialised with is honoured.
``s3``
    The state object of an S3 backend, read with boto3. No terraform binary
    and no provider plugins are needed on the worker.

Every source ends in :func:`_validate`, which checks *all* outputs and raises
*one* :class:`BadInputError` listing every missing or malformed one: a person
fixing their Terraform wants the whole list, not one problem per run. Nothing
here is retried except what is plainly transient (S3 connection errors, 5xx,
throttling, a terraform run that hangs past its timeout); S3 failures follow
the one table in :mod:`mlflow_rollout.error_policy`.

``rds_connection_string`` carries the database password. It is held as a
:class:`~pydantic.SecretStr`, and no message built here ever contains it:
problems with it are described, never echoed. Use
:func:`redacted_connection_string` to show it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationInfo, field_validator

from mlflow_rollout import aws_common
from mlflow_rollout.aws_common import ACM_CERTIFICATE, IAM_ROLE, arn_problem
from mlflow_rollout.error_policy import Rule, aws_call
from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from mlflow_rollout.settings import TerraformCliSource, TerraformFileSource, TerraformS3StateSource

__all__ = [
    "TerraformOutputs",
    "PostgresConnection",
    "read_outputs",
    "parse_outputs",
    "describe_source",
    "redacted_connection_string",
    "connection_parts",
]

#: Outputs the rollout cannot run without.
REQUIRED_OUTPUTS = ("mlflow_irsa_role_arn", "rds_connection_string", "s3_bucket_name")
#: Outputs used when present (TLS on the ALB).
OPTIONAL_OUTPUTS = ("acm_certificate_arn",)

#: terraform's stderr goes into error messages; keep them readable.
_STDERR_LIMIT = 2000

_PG_SCHEMES = ("postgresql", "postgresql+psycopg2")
_PG_EXPECTED = "not a PostgreSQL URI (expected postgresql://user[:password]@host[:port]/database)"
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Query parameters libpq treats as secrets; redacted for display.
_SECRET_QUERY_KEYS = {"password", "sslpassword"}


# --------------------------------------------------------------------------
# Checks: each returns None when the value is fine, else a reason that is safe
# to print. Shared by the model's own validators and by _validate().


def _show(value: str, limit: int = 120) -> str:
    """Quote a non-secret value for a message, cut to a readable length."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _check_role_arn(value: str) -> str | None:
    return arn_problem(value, IAM_ROLE)


def _check_bucket(value: str) -> str | None:
    # The S3 general purpose bucket naming rules; a wrong name fails much later
    # and less clearly (inside MLflow's artifact proxy), so catch it here.
    if not 3 <= len(value) <= 63:
        return f"an S3 bucket name has 3 to 63 characters, got {len(value)} ({_show(value)})"
    if not _BUCKET_CHARS.match(value):
        return (
            "an S3 bucket name has only lowercase letters, digits, dots and hyphens, "
            f"and starts and ends with a letter or digit, got {_show(value)}"
        )
    if ".." in value:
        return f"an S3 bucket name has no two adjacent dots, got {_show(value)}"
    if _IPV4.match(value):
        return f"an S3 bucket name is not an IP address, got {_show(value)}"
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if value.startswith(prefix):
            return f"an S3 bucket name does not start with {prefix!r}, got {_show(value)}"
    for suffix in ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"):
        if value.endswith(suffix):
            return f"an S3 bucket name does not end with {suffix!r}, got {_show(value)}"
    return None


def _check_acm_arn(value: str) -> str | None:
    return arn_problem(value, ACM_CERTIFICATE)


@dataclass(frozen=True)
class PostgresConnection:
    """The parts of ``rds_connection_string``; ``password`` stays a SecretStr."""

    scheme: str
    user: str
    password: SecretStr | None
    host: str
    port: int | None
    database: str
    #: Query parameters (``sslmode=require`` ...), in order. Not in the repr:
    #: libpq also accepts ``?password=``.
    query: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def _parse_postgres(value: str) -> PostgresConnection | str:
    """Parse a PostgreSQL URI, or return why it is not one.

    The reason never quotes any part of the value: a string that fails to
    parse may still hold the password in a place we did not expect.
    """
    try:
        parts = urlsplit(value.strip())
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        return f"{_PG_EXPECTED}: the port is not a number from 1 to 65535"
    if parts.scheme.lower() not in _PG_SCHEMES:
        return f"{_PG_EXPECTED}: the scheme is not postgresql or postgresql+psycopg2"
    if not parts.hostname:
        return f"{_PG_EXPECTED}: no host"
    if port == 0:
        return f"{_PG_EXPECTED}: the port is not a number from 1 to 65535"
    if not parts.username:
        return f"{_PG_EXPECTED}: no user"
    database = unquote(parts.path.lstrip("/"))
    if not database:
        return f"{_PG_EXPECTED}: no database name"
    if "/" in database:
        return f"{_PG_EXPECTED}: the database name contains '/'"
    if parts.fragment:
        return f"{_PG_EXPECTED}: unexpected '#' fragment"
    password = unquote(parts.password) if parts.password is not None else None
    return PostgresConnection(
        scheme=parts.scheme.lower(),
        user=unquote(parts.username),
        password=SecretStr(password) if password is not None else None,
        host=parts.hostname,
        port=port,
        database=database,
        query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
    )


def _check_postgres(value: str) -> str | None:
    parsed = _parse_postgres(value)
    return parsed if isinstance(parsed, str) else None


_CHECKS = {
    "mlflow_irsa_role_arn": _check_role_arn,
    "rds_connection_string": _check_postgres,
    "s3_bucket_name": _check_bucket,
    "acm_certificate_arn": _check_acm_arn,
}


# --------------------------------------------------------------------------
# The model


class TerraformOutputs(BaseModel):
    """The validated outputs the rest of the rollout uses.

    Built by :func:`read_outputs`. Constructing it directly also validates,
    and pydantic is told to keep input values out of its error messages (the
    connection string would otherwise be echoed).
    """

    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

    #: Where the values came from, for messages and the report.
    source: str
    mlflow_irsa_role_arn: str
    rds_connection_string: SecretStr
    s3_bucket_name: str
    acm_certificate_arn: str | None = None

    @field_validator("mlflow_irsa_role_arn", "s3_bucket_name", "acm_certificate_arn")
    @classmethod
    def _check_plain(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            problem = _CHECKS[info.field_name](value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("rds_connection_string")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        problem = _check_postgres(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value


# --------------------------------------------------------------------------
# Validation of raw outputs (whatever the source)


def _unwrap(data: dict[str, Any]) -> dict[str, Any]:
    """``terraform output -json`` → flat map; a flat map is returned as is.

    The terraform format is recognised when *every* entry is an object with a
    ``value`` key, so a flat map with one odd value is not misread.
    """
    if data and all(isinstance(v, dict) and "value" in v for v in data.values()):
        return {k: v["value"] for k, v in data.items()}
    return dict(data)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def parse_outputs(values: dict[str, Any], source: str) -> TerraformOutputs:
    """Validate a flat ``{name: value}`` map into :class:`TerraformOutputs`.

    Raises one :class:`BadInputError` that names every missing and every
    malformed output and the source. Extra outputs are ignored. An optional
    output that is null or ``""`` counts as absent (that is what a Terraform
    conditional resource usually leaves behind).
    """
    problems: list[str] = []
    clean: dict[str, str | None] = {}
    for name in REQUIRED_OUTPUTS + OPTIONAL_OUTPUTS:
        value = values.get(name)
        required = name in REQUIRED_OUTPUTS
        if value is None or (value == "" and not required):
            if required:
                problems.append(f"missing output {name!r}")
            clean[name] = None
            continue
        if not isinstance(value, str):
            problems.append(f"output {name!r} is malformed: expected a string, got {_json_type(value)}")
            continue
        problem = _CHECKS[name](value)
        if problem:
            problems.append(f"output {name!r} is malformed: {problem}")
            continue
        clean[name] = value
    if problems:
        raise BadInputError(f"terraform outputs from {source}: " + "; ".join(problems))
    return TerraformOutputs(source=source, **clean)


# --------------------------------------------------------------------------
# Sources


def describe_source(source: TerraformFileSource | TerraformCliSource | TerraformS3StateSource) -> str:
    """A short human description of a source, used in messages and ``.source``."""
    if isinstance(source, TerraformFileSource):
        return f"file {_display_path(source.path)}"
    if isinstance(source, TerraformCliSource):
        return f"{source.binary} -chdir={_display_path(source.dir)} output -json"
    return f"s3://{source.bucket}/{source.key}"


def _display_path(path: Path) -> str:
    """Relative to the working directory when under it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _load_json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        # The decoder's message names the problem and position, never the content.
        raise BadInputError(
            f"{where}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def _read_file(source: TerraformFileSource) -> TerraformOutputs:
    described = describe_source(source)
    path = Path(source.path)
    if not path.exists():
        raise BadInputError(f"terraform outputs file {path} does not exist")
    if not path.is_file():
        raise BadInputError(f"terraform outputs file {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"terraform outputs file {path} cannot be read: {exc.strerror}") from None
    data = _load_json(raw, f"terraform outputs file {path}")
    if not isinstance(data, dict):
        raise BadInputError(
            f"terraform outputs file {path}: expected a JSON object of outputs, got {_json_type(data)}"
        )
    return parse_outputs(_unwrap(data), described)


def _tail(text: str, limit: int = _STDERR_LIMIT) -> str:
    text = _ANSI.sub("", text).strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _read_cli(source: TerraformCliSource) -> TerraformOutputs:
    described = describe_source(source)
    directory = Path(source.dir)
    if not directory.is_dir():
        raise BadInputError(f"terraform directory {directory} does not exist (source: {described})")
    argv = [source.binary, f"-chdir={directory}", "output", "-json"]
    # TF_INPUT=0: never wait for a prompt on a worker with no terminal.
    env = {**os.environ, "TF_INPUT": "0"}
    try:
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=source.timeout_seconds, check=False
        )
    except FileNotFoundError:
        raise BadInputError(
            f"terraform binary {source.binary!r} not found (on PATH or as a path); "
            f"needed to read outputs in {directory}"
        ) from None
    except PermissionError:
        raise BadInputError(
            f"terraform binary {source.binary!r} is not executable; needed to read outputs in {directory}"
        ) from None
    except subprocess.TimeoutExpired:
        # Usually a slow or unreachable remote backend: worth another attempt.
        raise TransientError(
            f"{described} did not finish within {source.timeout_seconds:g} s"
        ) from None
    if proc.returncode != 0:
        raise PermanentError(
            f"{described} failed with exit code {proc.returncode}: {_tail(proc.stderr) or '(no stderr)'}"
        )
    data = _load_json(proc.stdout, f"output of {described}")
    if not isinstance(data, dict):
        raise PermanentError(f"output of {described}: expected a JSON object, got {_json_type(data)}")
    return parse_outputs(_unwrap(data), described)


#: What reading the state object means by the table's codes (the rest is the table's).
_S3_STATE_HINTS = {
    "NoSuchKey": Rule("bad_input", "the state object does not exist (has `terraform apply` run with this backend?)"),
    "404": Rule("bad_input", "the state object does not exist (has `terraform apply` run with this backend?)"),
    "NoSuchBucket": Rule("bad_input", "the state bucket does not exist (terraform.bucket)"),
}


def _read_s3(source: TerraformS3StateSource) -> TerraformOutputs:
    described = describe_source(source)
    endpoint = source.endpoint_url or f"AWS S3 in {source.region}"
    where = f"{described} (endpoint {endpoint})"
    with aws_call("S3", "GetObject", f"terraform state {described} (region {source.region})",
                  endpoint_url=source.endpoint_url, hints=_S3_STATE_HINTS, permissions="s3:GetObject"):
        client = aws_common.client("s3", region=source.region, endpoint_url=source.endpoint_url)
        body = client.get_object(Bucket=source.bucket, Key=source.key)["Body"].read()

    state = _load_json(body, f"terraform state {where}")
    if not isinstance(state, dict) or not isinstance(state.get("outputs", {}), dict):
        raise BadInputError(f"terraform state {where}: not a terraform state file")
    version = state.get("version")
    if version != 4:
        raise BadInputError(
            f"terraform state {where}: state format version {version!r} is not supported (expected 4, "
            "written by terraform 0.12 and later)"
        )
    return parse_outputs(_unwrap(state.get("outputs") or {}), described)


def read_outputs(
    source: TerraformFileSource | TerraformCliSource | TerraformS3StateSource,
) -> TerraformOutputs:
    """Read and validate the Terraform outputs from the configured source.

    Raises :class:`BadInputError` for anything the user must fix (missing or
    malformed outputs, a missing file, bucket, key or binary),
    :class:`TransientError` for what may pass on its own (S3 connection
    errors, 5xx, throttling, a terraform run past its timeout),
    :class:`AuthError` when S3 refuses these credentials or finds none, and
    :class:`PermanentError` when terraform itself fails.
    """
    if isinstance(source, TerraformFileSource):
        return _read_file(source)
    if isinstance(source, TerraformCliSource):
        return _read_cli(source)
    if isinstance(source, TerraformS3StateSource):
        return _read_s3(source)
    raise BadInputError(f"unknown terraform outputs source {type(source).__name__}")


# --------------------------------------------------------------------------
# The connection string, safely


def connection_parts(value: TerraformOutputs | SecretStr | str) -> PostgresConnection:
    """Split the RDS connection string into its parts (password kept secret).

    Raises :class:`BadInputError` (without the value) when it is not a
    PostgreSQL URI.
    """
    if isinstance(value, TerraformOutputs):
        value = value.rds_connection_string
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    parsed = _parse_postgres(raw)
    if isinstance(parsed, str):
        raise BadInputError(f"rds_connection_string is {parsed}")
    return parsed


def redacted_connection_string(value: TerraformOutputs | SecretStr | str) -> str:
    """``postgresql://user:***@host:port/db`` — the connection string for display."""
    parts = connection_parts(value)
    userinfo = quote(parts.user, safe="")
    if parts.password is not None:
        userinfo += ":***"
    host = f"[{parts.host}]" if ":" in parts.host else parts.host
    port = f":{parts.port}" if parts.port is not None else ""
    query = [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in parts.query]
    tail = f"?{urlencode(query, safe='*')}" if query else ""
    return f"{parts.scheme}://{userinfo}@{host}{port}/{quote(parts.database, safe='')}{tail}"
