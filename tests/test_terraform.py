"""tasks/terraform.py against real sources: files, moto's S3, the terraform binary.

No mocks: the S3 state tests use ``moto_server`` over HTTP, and the CLI test
runs the real terraform (init + apply with an S3 backend on moto), then reads
the outputs both through ``terraform output -json`` and straight from the
state object terraform wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from mlflow_rollout.settings import TerraformCliSource, TerraformFileSource, TerraformS3StateSource
from tasks.terraform import (
    TerraformOutputs,
    connection_parts,
    read_outputs,
    redacted_connection_string,
)
from tests.support.services import MotoServer, free_port

FIXTURE_CONFIG = Path(__file__).parent / "fixtures" / "terraform"
#: The secret the connection-string tests plant; it must never show in a message.
PASSWORD = "Pl4nted-Secret-Pw-9113"
CONN = f"postgresql://mlflow:{PASSWORD}@mlflow-db.cluster-abc123.us-west-2.rds.amazonaws.com:5432/mlflow"
ROLE = "arn:aws:iam::123456789012:role/mlflow-irsa"
BUCKET = "mlflow-artifacts-prod"
ACM = "arn:aws:acm:us-west-2:123456789012:certificate/0b6f7a7e-3d1c-4c43-9f3e-2a8f2d1c5e10"
FLAT: dict[str, Any] = {
    "mlflow_irsa_role_arn": ROLE,
    "rds_connection_string": CONN,
    "s3_bucket_name": BUCKET,
    "acm_certificate_arn": ACM,
}


def terraform_format(flat: dict[str, Any]) -> dict[str, Any]:
    """What ``terraform output -json`` prints for these values."""
    return {
        name: {"sensitive": name == "rds_connection_string", "type": "string", "value": value}
        for name, value in flat.items()
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def read_file(path: Path) -> TerraformOutputs:
    return read_outputs(TerraformFileSource(path=path))


def full_text(exc: BaseException) -> str:
    """Everything a log would show of an exception: message, repr, traceback."""
    return repr(exc) + str(exc) + "".join(traceback.format_exception(exc))


# --------------------------------------------------------------------------
# file source


def test_file_in_terraform_output_format(tmp_path: Path) -> None:
    data = terraform_format(FLAT)
    data["eks_cluster_name"] = {"sensitive": False, "type": "string", "value": "mlflow-eks"}
    data["subnet_ids"] = {"sensitive": False, "type": ["list", "string"], "value": ["subnet-1"]}
    path = write_json(tmp_path / "terraform-outputs.json", data)

    outputs = read_file(path)

    assert outputs.mlflow_irsa_role_arn == ROLE
    assert outputs.rds_connection_string.get_secret_value() == CONN
    assert outputs.s3_bucket_name == BUCKET
    assert outputs.acm_certificate_arn == ACM
    assert outputs.source == f"file {path}"
    assert PASSWORD not in repr(outputs) and PASSWORD not in str(outputs)


def test_file_in_flat_format(tmp_path: Path) -> None:
    outputs = read_file(write_json(tmp_path / "outputs.json", {**FLAT, "extra": [1, 2]}))
    assert outputs.mlflow_irsa_role_arn == ROLE
    assert outputs.rds_connection_string.get_secret_value() == CONN
    assert outputs.s3_bucket_name == BUCKET
    assert outputs.acm_certificate_arn == ACM


def test_relative_path_is_shown_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "environments" / "local").mkdir(parents=True)
    write_json(tmp_path / "environments" / "local" / "terraform-outputs.json", FLAT)
    monkeypatch.chdir(tmp_path)
    outputs = read_file(Path("environments/local/terraform-outputs.json"))
    assert outputs.source == "file environments/local/terraform-outputs.json"


@pytest.mark.parametrize("absent", [{"drop": True}, {"value": None}, {"value": ""}])
def test_optional_outputs_may_be_absent(tmp_path: Path, absent: dict) -> None:
    flat = dict(FLAT)
    if absent.get("drop"):
        del flat["acm_certificate_arn"]
    else:
        flat["acm_certificate_arn"] = absent["value"]
    outputs = read_file(write_json(tmp_path / "o.json", terraform_format(flat)))
    assert outputs.acm_certificate_arn is None


def test_route53_zone_id_output_is_not_read(tmp_path: Path) -> None:
    # The zone is found by the host name (aws.hosted_zone_name); an old
    # route53_zone_id output, even a malformed one, is an extra output.
    outputs = read_file(write_json(tmp_path / "o.json", {**FLAT, "route53_zone_id": "zone one"}))
    assert "route53_zone_id" not in outputs.model_dump()


@pytest.mark.parametrize("missing", ["mlflow_irsa_role_arn", "rds_connection_string", "s3_bucket_name"])
def test_each_missing_required_output_is_named(tmp_path: Path, missing: str) -> None:
    flat = {k: v for k, v in FLAT.items() if k != missing}
    path = write_json(tmp_path / "terraform-outputs.json", terraform_format(flat))

    with pytest.raises(BadInputError) as info:
        read_file(path)

    message = str(info.value)
    assert message == f"terraform outputs from file {path}: missing output {missing!r}"
    assert PASSWORD not in full_text(info.value)


def test_null_required_output_counts_as_missing(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="missing output 's3_bucket_name'"):
        read_file(write_json(tmp_path / "o.json", {**FLAT, "s3_bucket_name": None}))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (f"mysql://mlflow:{PASSWORD}@db.internal:3306/mlflow", "scheme"),
        (f"postgres://mlflow:{PASSWORD}@db.internal:5432/mlflow", "scheme"),
        (f"not a uri {PASSWORD}", "scheme"),
        (f"{PASSWORD}", "scheme"),
        (f"postgresql://mlflow:{PASSWORD}@db.internal:5432/", "no database name"),
        (f"postgresql://mlflow:{PASSWORD}@db.internal:5432", "no database name"),
        (f"postgresql://mlflow:{PASSWORD}@/mlflow", "no host"),
        (f"postgresql://:{PASSWORD}@db.internal/mlflow", "no user"),
        (f"postgresql://mlflow:{PASSWORD}@db.internal:54x2/mlflow", "port"),
        (f"postgresql://mlflow:{PASSWORD}@db.internal:99999/mlflow", "port"),
    ],
)
def test_malformed_connection_string_is_named_never_echoed(tmp_path: Path, value: str, reason: str) -> None:
    path = write_json(tmp_path / "o.json", terraform_format({**FLAT, "rds_connection_string": value}))

    with pytest.raises(BadInputError) as info:
        read_file(path)

    message = str(info.value)
    assert message.startswith(f"terraform outputs from file {path}: output 'rds_connection_string' is malformed: ")
    assert "not a PostgreSQL URI (expected postgresql://user[:password]@host[:port]/database)" in message
    assert reason in message
    assert PASSWORD not in full_text(info.value)


@pytest.mark.parametrize(
    "value",
    [
        "postgresql://mlflow:pw@db.internal:5432/mlflow",
        "postgresql+psycopg2://mlflow:pw@db.internal:5432/mlflow",
        "postgresql://mlflow@db.internal/mlflow",  # password optional, port optional
        "postgresql://mlflow:p%40ss%2Fw@10.0.0.5/mlflow?sslmode=require",
    ],
)
def test_valid_connection_strings(tmp_path: Path, value: str) -> None:
    outputs = read_file(write_json(tmp_path / "o.json", {**FLAT, "rds_connection_string": value}))
    assert outputs.rds_connection_string.get_secret_value() == value


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("mlflow_irsa_role_arn", "mlflow-irsa", "arn:aws:iam::<12-digit account>:role/<name>"),
        ("mlflow_irsa_role_arn", "arn:aws:iam::12345:role/x", "arn:aws:iam::"),
        ("mlflow_irsa_role_arn", "arn:aws:iam::123456789012:user/x", "arn:aws:iam::"),
        ("s3_bucket_name", "My_Bucket", "lowercase"),
        ("s3_bucket_name", "ab", "3 to 63 characters"),
        ("s3_bucket_name", "a" * 64, "3 to 63 characters"),
        ("s3_bucket_name", "my..bucket", "adjacent dots"),
        ("s3_bucket_name", "192.168.1.10", "IP address"),
        ("s3_bucket_name", "-bucket", "starts and ends"),
        ("acm_certificate_arn", "arn:aws:iam::123456789012:role/x", "arn:aws:acm:<region>"),
        ("mlflow_irsa_role_arn", "arn:aws:iam:us-west-2:123456789012:role/x", "IAM role ARNs have no region"),
        ("acm_certificate_arn", "arn:aws:acm:us-west-2:123456789012:certificate/", "not an ACM certificate ARN"),
        ("s3_bucket_name", ["a-list"], "expected a string, got a list"),
    ],
)
def test_malformed_plain_outputs(tmp_path: Path, name: str, value: Any, expected: str) -> None:
    with pytest.raises(BadInputError) as info:
        read_file(write_json(tmp_path / "o.json", {**FLAT, name: value}))
    message = str(info.value)
    assert f"output {name!r} is malformed: " in message
    assert expected in message


def test_several_problems_reported_together(tmp_path: Path) -> None:
    flat = {
        "rds_connection_string": f"mysql://mlflow:{PASSWORD}@db/mlflow",
        "s3_bucket_name": "Bad_Bucket",
        "acm_certificate_arn": "not-an-arn",
    }
    path = write_json(tmp_path / "terraform-outputs.json", terraform_format(flat))

    with pytest.raises(BadInputError) as info:
        read_file(path)

    message = str(info.value)
    assert message.startswith(f"terraform outputs from file {path}: ")
    problems = message.split(": ", 1)[1].split("; ")
    assert len(problems) == 4, message
    assert problems[0] == "missing output 'mlflow_irsa_role_arn'"
    assert problems[1].startswith("output 'rds_connection_string' is malformed: not a PostgreSQL URI")
    assert problems[2].startswith("output 's3_bucket_name' is malformed: ")
    assert problems[3].startswith("output 'acm_certificate_arn' is malformed: ")
    assert PASSWORD not in full_text(info.value)


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "terraform-outputs.json"
    path.write_text('{\n  "s3_bucket_name": "b",\n  "rds_connection_string": "x" "y"\n}\n')
    with pytest.raises(BadInputError) as info:
        read_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid JSON" in message and "line 3, column" in message


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="expected a JSON object of outputs, got a list"):
        read_file(write_json(tmp_path / "o.json", [FLAT]))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "terraform-outputs.json"
    with pytest.raises(BadInputError) as info:
        read_file(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


# --------------------------------------------------------------------------
# the model and the connection string helpers


def test_direct_construction_never_echoes_the_connection_string() -> None:
    with pytest.raises(ValidationError) as info:
        TerraformOutputs(
            source="test",
            mlflow_irsa_role_arn=ROLE,
            rds_connection_string=f"mysql://mlflow:{PASSWORD}@db/mlflow",
            s3_bucket_name=BUCKET,
        )
    assert "rds_connection_string" in str(info.value)
    assert PASSWORD not in full_text(info.value)


def test_redacted_connection_string_and_parts(tmp_path: Path) -> None:
    outputs = read_file(write_json(tmp_path / "o.json", FLAT))
    shown = redacted_connection_string(outputs)
    assert shown == "postgresql://mlflow:***@mlflow-db.cluster-abc123.us-west-2.rds.amazonaws.com:5432/mlflow"

    parts = connection_parts(outputs)
    assert (parts.user, parts.host, parts.port, parts.database) == (
        "mlflow", "mlflow-db.cluster-abc123.us-west-2.rds.amazonaws.com", 5432, "mlflow",
    )
    assert parts.password is not None and parts.password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(parts)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql+psycopg2://u:p%40ss@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("postgresql://u@h:6543/db?sslmode=require&password=pw", "postgresql://u@h:6543/db?sslmode=require&password=***"),
    ],
)
def test_redaction_variants(uri: str, shown: str) -> None:
    assert redacted_connection_string(SecretStr(uri)) == shown


def test_connection_parts_rejects_without_echo() -> None:
    with pytest.raises(BadInputError) as info:
        connection_parts(f"mysql://u:{PASSWORD}@h/db")
    assert PASSWORD not in full_text(info.value)


# --------------------------------------------------------------------------
# S3 state source (moto_server)


def state_document(outputs: dict[str, Any]) -> dict[str, Any]:
    """A terraform v4 state as the S3 backend stores it, with a secret in a resource too."""
    return {
        "version": 4,
        "terraform_version": "1.11.4",
        "serial": 7,
        "lineage": "5c1e2a4e-8f7e-2b1c-9d3a-5f0e6c7d8a9b",
        "outputs": {
            name: {"value": value, "type": "string", **({"sensitive": True} if name == "rds_connection_string" else {})}
            for name, value in outputs.items()
        },
        "resources": [
            {
                "mode": "managed",
                "type": "aws_db_instance",
                "name": "mlflow",
                "provider": 'provider["registry.terraform.io/hashicorp/aws"]',
                "instances": [
                    {
                        "schema_version": 2,
                        "attributes": {"identifier": "mlflow-db", "password": PASSWORD, "port": 5432},
                        "sensitive_attributes": [[{"type": "get_attr", "value": "password"}]],
                    }
                ],
            }
        ],
        "check_results": None,
    }


@pytest.fixture
def state_bucket(moto: MotoServer) -> str:
    name = f"tf-state-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    return name


def s3_source(moto: MotoServer, bucket: str, key: str = "mlflow/terraform.tfstate") -> TerraformS3StateSource:
    return TerraformS3StateSource(bucket=bucket, key=key, region="us-west-2", endpoint_url=moto.endpoint_url)


def test_s3_state_is_read(moto: MotoServer, state_bucket: str) -> None:
    key = "mlflow/terraform.tfstate"
    body = json.dumps(state_document({**FLAT, "eks_cluster_name": "mlflow-eks"}))
    moto.client("s3").put_object(Bucket=state_bucket, Key=key, Body=body.encode())

    outputs = read_outputs(s3_source(moto, state_bucket, key))

    assert outputs.source == f"s3://{state_bucket}/{key}"
    assert outputs.mlflow_irsa_role_arn == ROLE
    assert outputs.rds_connection_string.get_secret_value() == CONN
    assert outputs.s3_bucket_name == BUCKET
    assert outputs.acm_certificate_arn == ACM


@pytest.mark.parametrize("env", ["production", "staging"])
def test_cluster_environments_read_the_state_from_s3(moto: MotoServer, env: str) -> None:
    """environments/production.yaml and staging.yaml read the S3 backend's state object as they
    name it (bucket, key, region); only the endpoint is moto's."""
    from mlflow_rollout.settings import load_environment

    source = load_environment(env, Path(__file__).resolve().parents[1] / "environments").terraform
    assert isinstance(source, TerraformS3StateSource) and source.endpoint_url is None
    s3 = moto.client("s3")
    try:
        s3.create_bucket(Bucket=source.bucket, CreateBucketConfiguration={"LocationConstraint": source.region})
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.put_object(Bucket=source.bucket, Key=source.key, Body=json.dumps(state_document(FLAT)).encode())

    outputs = read_outputs(source.model_copy(update={"endpoint_url": moto.endpoint_url}))

    assert outputs.source == f"s3://{source.bucket}/{source.key}"
    assert outputs.mlflow_irsa_role_arn == ROLE and outputs.s3_bucket_name == BUCKET


def test_s3_state_with_problems_names_the_object(moto: MotoServer, state_bucket: str) -> None:
    key = "env/prod/terraform.tfstate"
    flat = {"mlflow_irsa_role_arn": ROLE, "rds_connection_string": f"mysql://u:{PASSWORD}@h/db"}
    moto.client("s3").put_object(Bucket=state_bucket, Key=key, Body=json.dumps(state_document(flat)).encode())

    with pytest.raises(BadInputError) as info:
        read_outputs(s3_source(moto, state_bucket, key))

    message = str(info.value)
    assert message.startswith(f"terraform outputs from s3://{state_bucket}/{key}: ")
    assert "output 'rds_connection_string' is malformed" in message
    assert "missing output 's3_bucket_name'" in message
    assert PASSWORD not in full_text(info.value)


def test_s3_missing_key(moto: MotoServer, state_bucket: str) -> None:
    with pytest.raises(BadInputError) as info:
        read_outputs(s3_source(moto, state_bucket, "no/such/terraform.tfstate"))
    message = str(info.value)
    assert f"s3://{state_bucket}/no/such/terraform.tfstate" in message
    assert moto.endpoint_url in message
    assert "NoSuchKey" in message


def test_s3_missing_bucket(moto: MotoServer) -> None:
    with pytest.raises(BadInputError) as info:
        read_outputs(s3_source(moto, "no-such-state-bucket"))
    message = str(info.value)
    assert "s3://no-such-state-bucket/mlflow/terraform.tfstate" in message
    assert "NoSuchBucket" in message and moto.endpoint_url in message


def test_s3_object_that_is_not_json(moto: MotoServer, state_bucket: str) -> None:
    moto.client("s3").put_object(Bucket=state_bucket, Key="k", Body=b"{not json")
    with pytest.raises(BadInputError, match=rf"s3://{state_bucket}/k .*not valid JSON: .* line 1, column 2"):
        read_outputs(s3_source(moto, state_bucket, "k"))


def test_s3_unreachable_endpoint_is_transient() -> None:
    source = TerraformS3StateSource(bucket="b", key="k", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError, match=r"s3://b/k"):
        read_outputs(source)


# --------------------------------------------------------------------------
# CLI source (the real terraform binary)


@pytest.fixture(scope="session")
def terraform_bin() -> str:
    found = shutil.which("terraform") or (
        "/usr/local/bin/terraform" if os.access("/usr/local/bin/terraform", os.X_OK) else None
    )
    if not found:
        pytest.skip(
            "terraform binary not found on PATH or at /usr/local/bin/terraform; the terraform CLI "
            "tests need a terraform >= 1.6 binary (it is not installable from a package registry, DESIGN §7)"
        )
    return found


def run_terraform(binary: str, workdir: Path, *args: str) -> None:
    env = {**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "TF_INPUT": "0", "TF_IN_AUTOMATION": "1"}
    proc = subprocess.run(
        [binary, f"-chdir={workdir}", *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, f"terraform {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"


def test_cli_and_s3_state_after_a_real_apply(
    moto: MotoServer, terraform_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "infra"
    shutil.copytree(FIXTURE_CONFIG, workdir)
    bucket = f"tf-state-{uuid.uuid4().hex[:12]}"
    key = "mlflow/terraform.tfstate"
    moto.client("s3").create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    backend = {
        "bucket": bucket,
        "key": key,
        "region": "us-west-2",
        "endpoints": f'{{s3="{moto.endpoint_url}"}}',
        "use_path_style": "true",
        "skip_credentials_validation": "true",
        "skip_requesting_account_id": "true",
        "skip_region_validation": "true",
        "skip_metadata_api_check": "true",
    }
    run_terraform(terraform_bin, workdir, "init", "-no-color", *(f"-backend-config={k}={v}" for k, v in backend.items()))
    run_terraform(terraform_bin, workdir, "apply", "-auto-approve", "-no-color")
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", "/dev/null")

    from_cli = read_outputs(TerraformCliSource(dir=workdir, binary=terraform_bin))

    assert from_cli.source == f"{terraform_bin} -chdir={workdir} output -json"
    assert from_cli.mlflow_irsa_role_arn == "arn:aws:iam::123456789012:role/mlflow-irsa"
    assert from_cli.rds_connection_string.get_secret_value() == (
        "postgresql://mlflow:Tf-Fixture-Secret-0451@"
        "mlflow-db.cluster-abc123.us-west-2.rds.amazonaws.com:5432/mlflow"
    )
    assert from_cli.s3_bucket_name == "mlflow-artifacts-tf-fixture"
    assert from_cli.acm_certificate_arn == ACM

    # The state object terraform wrote to moto holds the same outputs.
    state = json.loads(moto.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    assert state["version"] == 4 and state["outputs"]["rds_connection_string"]["sensitive"] is True
    from_s3 = read_outputs(s3_source(moto, bucket, key))
    assert from_s3.source == f"s3://{bucket}/{key}"
    assert from_s3.model_dump(exclude={"source"}) == from_cli.model_dump(exclude={"source"})


def test_cli_failure_is_permanent_with_stderr(terraform_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An S3 backend that was never initialised: terraform refuses and says why.
    workdir = tmp_path / "uninitialised"
    shutil.copytree(FIXTURE_CONFIG, workdir)
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", "/dev/null")
    with pytest.raises(PermanentError) as info:
        read_outputs(TerraformCliSource(dir=workdir, binary=terraform_bin))
    assert not isinstance(info.value, BadInputError)
    message = str(info.value)
    assert f"-chdir={workdir} output -json failed with exit code" in message
    assert "init" in message  # terraform's own advice, from its stderr
    assert "\x1b[" not in message


def test_cli_missing_binary_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as info:
        read_outputs(TerraformCliSource(dir=tmp_path, binary="terraform-not-installed-here"))
    message = str(info.value)
    assert "'terraform-not-installed-here' not found" in message
    assert str(tmp_path) in message


def test_cli_missing_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        read_outputs(TerraformCliSource(dir=tmp_path / "missing"))
