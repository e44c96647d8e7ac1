"""The test services themselves: a broken fixture would make every other test lie."""

from __future__ import annotations

from contextlib import closing

import psycopg2
import pytest

from tests.support.services import MotoServer, PostgresServer, free_port


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_postgres_accepts_the_mlflow_role(postgres: PostgresServer) -> None:
    assert postgres.uri == f"postgresql://mlflow:{postgres.password}@127.0.0.1:{postgres.port}/mlflow"
    with closing(psycopg2.connect(postgres.uri, connect_timeout=10)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1, current_user, current_database(), current_setting('server_version_num')::int")
        one, user, database, version = cur.fetchone()
    assert (one, user, database) == (1, "mlflow", "mlflow")
    assert version >= 150000


def test_postgres_checks_the_password(postgres: PostgresServer) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host="127.0.0.1", port=postgres.port, user="mlflow", password="wrong-password", dbname="mlflow",
            connect_timeout=10,
        )


def test_postgres_create_database(postgres: PostgresServer) -> None:
    uri = postgres.create_database("services_selftest")
    try:
        assert uri.endswith(f":{postgres.port}/services_selftest")
        with closing(psycopg2.connect(uri, connect_timeout=10)) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int)")  # the mlflow role owns the database
            cur.execute("SELECT current_database()")
            assert cur.fetchone() == ("services_selftest",)
    finally:
        postgres.drop_database("services_selftest")


def test_moto_serves_s3(moto: MotoServer) -> None:
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="services-selftest", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    s3.put_object(Bucket="services-selftest", Key="k", Body=b"v")
    assert s3.get_object(Bucket="services-selftest", Key="k")["Body"].read() == b"v"
    s3.delete_object(Bucket="services-selftest", Key="k")
    s3.delete_bucket(Bucket="services-selftest")
