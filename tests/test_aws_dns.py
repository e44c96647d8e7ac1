"""tasks/aws.py and tasks/dns.py against a real moto_server and a real DNS server.

No mocks: ACM, IAM and Route53 calls go over HTTP to ``moto_server``; DNS
queries go over UDP (and TCP) to the dnslib server in
``tests/support/dns_server.py``, which answers from moto's Route53 records.

The moto server is shared by the session, so every test here uses its own
domain (``r<random>.example.com``) and load balancer names.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator

import dns.message as dns_message
import dns.query as dns_query
import pytest

from mlflow_rollout.errors import BadInputError, PermanentError, TransientError
from tasks import aws
from tasks import dns as tdns
from tests.support.dns_server import TestDnsServer, dns_server
from tests.support.services import MotoServer, free_port

REGION = "us-west-2"


def _token() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def kw(moto: MotoServer) -> dict:
    """The keyword arguments every aws function takes."""
    return {"region": REGION, "endpoint_url": moto.endpoint_url}


@pytest.fixture
def domain() -> str:
    return f"r{_token()}.example.com"


@pytest.fixture
def nameserver(moto: MotoServer) -> Iterator[TestDnsServer]:
    with dns_server(moto.endpoint_url, region=REGION) as server:
        yield server


def _zone(moto: MotoServer, name: str, private: bool = False) -> str:
    r53 = moto.client("route53")
    kwargs: dict = {"Name": name, "CallerReference": _token()}
    if private:
        vpc = moto.client("ec2").create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        kwargs["VPC"] = {"VPCRegion": REGION, "VPCId": vpc}
        kwargs["HostedZoneConfig"] = {"PrivateZone": True, "Comment": "test"}
    return r53.create_hosted_zone(**kwargs)["HostedZone"]["Id"].rsplit("/", 1)[-1]


def _lb(token: str | None = None) -> str:
    return f"k8s-mlplatf-mlflow-{token or _token()}-1234567890.{REGION}.elb.amazonaws.com"


# --------------------------------------------------------------------------
# ACM


@pytest.fixture(scope="module")
def issued_cert(moto: MotoServer) -> str:
    """A certificate for mlflow.example.com + *.apps.example.com, polled until ISSUED (~1 s in moto)."""
    acm = moto.client("acm")
    arn = acm.request_certificate(
        DomainName="mlflow.example.com",
        SubjectAlternativeNames=["mlflow.example.com", "*.apps.example.com"],
        ValidationMethod="DNS",
    )["CertificateArn"]
    deadline = time.monotonic() + 15
    while acm.describe_certificate(CertificateArn=arn)["Certificate"]["Status"] != "ISSUED":
        assert time.monotonic() < deadline, "moto never issued the certificate (MOTO_ACM_VALIDATION_WAIT?)"
        time.sleep(0.2)
    return arn


@pytest.mark.parametrize("host", ["mlflow.example.com", "x.apps.example.com", "MLflow.Example.COM."])
def test_certificate_ok_for_covered_hosts(issued_cert: str, host: str, kw: dict) -> None:
    summary = aws.check_certificate(issued_cert, host, min_days=30, **kw)
    assert "ISSUED" in summary and issued_cert in summary


@pytest.mark.parametrize("host", ["other.example.com", "a.b.apps.example.com", "apps.example.com", "example.com"])
def test_certificate_wrong_host_names_host_and_covered_names(issued_cert: str, host: str, kw: dict) -> None:
    with pytest.raises(BadInputError) as err:
        aws.check_certificate(issued_cert, host, min_days=0, **kw)
    msg = str(err.value)
    assert host in msg and issued_cert in msg
    assert "mlflow.example.com" in msg and "*.apps.example.com" in msg


def test_certificate_expiring_within_min_days(issued_cert: str, moto: MotoServer, kw: dict) -> None:
    not_after = moto.client("acm").describe_certificate(CertificateArn=issued_cert)["Certificate"]["NotAfter"]
    days_left = (not_after - datetime.now(timezone.utc)).days
    aws.check_certificate(issued_cert, "mlflow.example.com", min_days=days_left - 1, **kw)
    with pytest.raises(PermanentError) as err:
        aws.check_certificate(issued_cert, "mlflow.example.com", min_days=days_left + 1, **kw)
    assert not isinstance(err.value, TransientError)
    assert "days left" in str(err.value) and f"{days_left + 1} days" in str(err.value)


def test_certificate_unknown_or_malformed_arn(kw: dict) -> None:
    unknown = "arn:aws:acm:us-west-2:123456789012:certificate/00000000-0000-0000-0000-000000000000"
    with pytest.raises(BadInputError, match=unknown):
        aws.check_certificate(unknown, "mlflow.example.com", min_days=0, **kw)
    with pytest.raises(BadInputError, match="not an ACM certificate ARN"):
        aws.check_certificate("not-an-arn", "mlflow.example.com", min_days=0, **kw)
    other_region = unknown.replace("us-west-2", "eu-west-1")
    with pytest.raises(BadInputError, match="eu-west-1"):
        aws.check_certificate(other_region, "mlflow.example.com", min_days=0, **kw)


def test_certificate_pending_validation_is_transient(moto: MotoServer, kw: dict) -> None:
    acm = moto.client("acm")
    started = time.monotonic()
    arn = acm.request_certificate(DomainName="pending.example.com", ValidationMethod="DNS")["CertificateArn"]
    try:
        aws.check_certificate(arn, "pending.example.com", min_days=0, **kw)
    except TransientError as exc:
        assert "PENDING_VALIDATION" in str(exc) and arn in str(exc)
    else:
        if time.monotonic() - started < 0.9:
            pytest.fail("a certificate requested just now passed as ISSUED")
        pytest.skip("this machine was too slow to see PENDING_VALIDATION (moto issues after 1 s)")


def test_certificate_covers_rules() -> None:
    assert aws.certificate_covers("*.example.com", "a.example.com")
    assert aws.certificate_covers("*.Example.com.", "A.example.COM")
    assert not aws.certificate_covers("*.example.com", "a.b.example.com")
    assert not aws.certificate_covers("*.example.com", "example.com")
    assert not aws.certificate_covers("*.example.com", ".example.com")
    assert aws.certificate_covers("mlflow.example.com", "mlflow.example.com.")
    assert not aws.certificate_covers("mlflow.example.com", "mlflow.example.org")


# --------------------------------------------------------------------------
# IAM


def _trust(action: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.eks.example"},
                    "Action": action,
                }
            ],
        }
    )


def test_role_present_with_web_identity_trust(moto: MotoServer, kw: dict) -> None:
    name = f"mlflow-irsa-{_token()}"
    arn = moto.client("iam").create_role(
        RoleName=name, Path="/svc/", AssumeRolePolicyDocument=_trust("sts:AssumeRoleWithWebIdentity")
    )["Role"]["Arn"]
    summary = aws.check_role(arn, **kw)
    assert arn in summary and "warning" not in summary


def test_role_without_web_identity_trust_warns(moto: MotoServer, kw: dict) -> None:
    name = f"mlflow-plain-{_token()}"
    arn = moto.client("iam").create_role(RoleName=name, AssumeRolePolicyDocument=_trust("sts:AssumeRole"))["Role"][
        "Arn"
    ]
    summary = aws.check_role(arn, **kw)
    assert "warning" in summary and "sts:AssumeRoleWithWebIdentity" in summary


def test_role_missing_or_malformed(kw: dict) -> None:
    arn = f"arn:aws:iam::123456789012:role/missing-{_token()}"
    with pytest.raises(BadInputError) as err:
        aws.check_role(arn, **kw)
    assert arn in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(BadInputError, match="not an IAM role ARN"):
        aws.check_role("arn:aws:iam::123456789012:user/alice", **kw)


def test_unreachable_endpoint_is_transient() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TransientError, match="cannot reach the AWS endpoint"):
        aws.check_role("arn:aws:iam::123456789012:role/x", region=REGION, endpoint_url=endpoint)


# --------------------------------------------------------------------------
# Route53 hosted zones


def test_hosted_zone_longest_public_suffix_wins(moto: MotoServer, domain: str, kw: dict) -> None:
    outer = _zone(moto, domain)
    inner = _zone(moto, f"apps.{domain}.")
    _zone(moto, f"internal.apps.{domain}", private=True)  # longer, but private: ignored

    zone = aws.find_hosted_zone(f"mlflow.internal.apps.{domain}", zone_name=None, **kw)
    assert zone == aws.HostedZone(id=inner, name=f"apps.{domain}", private=False)
    assert aws.find_hosted_zone(f"mlflow.{domain}", zone_name=None, **kw).id == outer
    assert aws.find_hosted_zone(f"MLFLOW.{domain.upper()}.", zone_name=None, **kw).id == outer
    # Named: that zone, even when a longer one matches.
    assert aws.find_hosted_zone(f"mlflow.apps.{domain}", zone_name=f"{domain}.", **kw).id == outer


def test_hosted_zone_none_lists_zones_seen(moto: MotoServer, domain: str, kw: dict) -> None:
    _zone(moto, domain)
    with pytest.raises(BadInputError) as err:
        aws.find_hosted_zone(f"mlflow.nowhere-{_token()}.test", zone_name=None, **kw)
    assert "mlflow.nowhere-" in str(err.value) and domain in str(err.value)

    with pytest.raises(BadInputError, match=f"no hosted zone named other.{domain}"):
        aws.find_hosted_zone(f"mlflow.other.{domain}", zone_name=f"other.{domain}", **kw)
    with pytest.raises(BadInputError, match="cannot hold host"):
        aws.find_hosted_zone("mlflow.example.org", zone_name=domain, **kw)


# --------------------------------------------------------------------------
# Route53 records + DNS


def _record_sets(moto: MotoServer, zone_id: str, host: str) -> list[dict]:
    sets = moto.client("route53").list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return [s for s in sets if s["Name"].rstrip(".") == host]


def test_cname_upsert_insync_and_resolves(moto: MotoServer, nameserver: TestDnsServer, domain: str, kw: dict) -> None:
    zone = _zone(moto, domain)
    host, lb = f"mlflow.{domain}", _lb()
    nameserver.set(lb, "A", "127.0.0.1")

    change = aws.upsert_record(zone, host, lb, kind="cname", ttl=60, **kw)
    assert "INSYNC" in aws.wait_insync(change, 5, interval=0.2, **kw)
    summary = tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=5, interval=0.2)
    assert f"CNAME {lb}" in summary
    assert tdns.resolve_once(host, [nameserver.address]) == ["127.0.0.1"]
    assert (host, "CNAME") in nameserver.queries  # it really went through the DNS server

    assert aws.record_points_at(zone, host, lb, **kw)
    assert aws.record_points_at(zone, host.upper() + ".", lb.upper() + ".", **kw)
    assert not aws.record_points_at(zone, host, _lb(), **kw)


def test_upsert_is_idempotent_and_switches_kind(moto: MotoServer, domain: str, kw: dict) -> None:
    zone = _zone(moto, domain)
    host, lb = f"mlflow.{domain}", _lb()
    for _ in range(2):
        aws.upsert_record(zone, host, lb, kind="cname", ttl=60, **kw)
    [record] = _record_sets(moto, zone, host)
    assert record["Type"] == "CNAME" and record["TTL"] == 60
    assert [rr["Value"].rstrip(".") for rr in record["ResourceRecords"]] == [lb]

    # cname → alias: one A alias remains, the CNAME is gone (they cannot coexist).
    for _ in range(2):
        aws.upsert_record(zone, host, lb, kind="alias", ttl=60, **kw)
    [record] = _record_sets(moto, zone, host)
    assert record["Type"] == "A"
    assert record["AliasTarget"]["HostedZoneId"] == "Z1H1FL5HABSF5"
    assert record["AliasTarget"]["EvaluateTargetHealth"] is True
    assert record["AliasTarget"]["DNSName"].rstrip(".") == lb
    assert aws.record_points_at(zone, host, lb, **kw)

    aws.upsert_record(zone, host, lb, kind="cname", ttl=60, **kw)
    assert [r["Type"] for r in _record_sets(moto, zone, host)] == ["CNAME"]


def test_alias_record_resolves_to_the_lb_addresses(
    moto: MotoServer, nameserver: TestDnsServer, domain: str, kw: dict
) -> None:
    zone = _zone(moto, domain)
    host, lb = f"mlflow.{domain}", _lb()
    nameserver.set(lb, "A", "127.0.0.1", "127.0.0.2")
    change = aws.upsert_record(zone, host, lb, kind="alias", ttl=60, **kw)
    aws.wait_insync(change, 5, interval=0.2, **kw)
    summary = tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=5, interval=0.2)
    assert "127.0.0.1, 127.0.0.2" in summary and lb in summary


def test_alias_zone_ids_by_region() -> None:
    assert aws.alb_hosted_zone_id("k8s-a-b-1.us-east-1.elb.amazonaws.com", "us-west-2") == "Z35SXDOTRQ7X7K"
    assert aws.alb_hosted_zone_id("internal-k8s-a-b-1.eu-west-1.elb.amazonaws.com.", "x") == "Z32O12XQLNTSW2"
    assert aws.alb_hosted_zone_id("lb.example.internal", "us-west-2") == "Z1H1FL5HABSF5"
    with pytest.raises(BadInputError, match="Network Load Balancer"):
        aws.alb_hosted_zone_id("a-1.elb.us-west-2.amazonaws.com", "us-west-2")
    with pytest.raises(BadInputError, match="mars-north-1"):
        aws.alb_hosted_zone_id("lb.example.internal", "mars-north-1")


def test_dns_picks_up_a_record_created_while_waiting(
    moto: MotoServer, nameserver: TestDnsServer, domain: str, kw: dict
) -> None:
    zone = _zone(moto, domain)
    host, lb = f"late.{domain}", _lb()
    nameserver.set(lb, "A", "127.0.0.1")
    timer = threading.Timer(1.0, lambda: aws.upsert_record(zone, host, lb, kind="cname", ttl=60, **kw))
    timer.start()
    try:
        assert lb in tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=8, interval=0.3)
    finally:
        timer.cancel()


def test_name_that_never_resolves_times_out(nameserver: TestDnsServer, domain: str) -> None:
    host, lb = f"nothing.{domain}", _lb()
    nameserver.set(lb, "A", "127.0.0.1")
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=3, interval=0.5)
    elapsed = time.monotonic() - started
    assert 3 <= elapsed < 8
    msg = str(err.value)
    assert host in msg and lb in msg and "NXDOMAIN" in msg


def test_name_pointing_at_another_lb_names_that_target(
    moto: MotoServer, nameserver: TestDnsServer, domain: str, kw: dict
) -> None:
    zone = _zone(moto, domain)
    host, lb, other = f"mlflow.{domain}", _lb(), _lb()
    nameserver.set(lb, "A", "127.0.0.1")
    nameserver.set(other, "A", "127.0.0.9")
    aws.upsert_record(zone, host, other, kind="cname", ttl=60, **kw)
    with pytest.raises(TransientError) as err:
        tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=2, interval=0.5)
    msg = str(err.value)
    assert f"CNAME {other}" in msg and "127.0.0.9" in msg and lb in msg and host in msg

    # Alias to the other LB: the addresses differ and both sides are named.
    aws.upsert_record(zone, host, other, kind="alias", ttl=60, **kw)
    with pytest.raises(TransientError) as err:
        tdns.wait_resolves(host, lb, resolvers=[nameserver.address], timeout=1.5, interval=0.5)
    assert "A 127.0.0.9" in str(err.value) and "127.0.0.1" in str(err.value)


def test_dns_resolver_specs_and_failures(nameserver: TestDnsServer) -> None:
    with pytest.raises(BadInputError, match="not-an-ip"):
        tdns.wait_resolves("a.example.com", "b.example.com", resolvers=["not-an-ip:53"], timeout=1)
    assert tdns.parse_resolver("[::1]:5353").port == 5353
    assert tdns.parse_resolver("10.0.0.2").port == 53
    assert tdns.resolve_once(f"nothing.{_token()}.example.com", [nameserver.address]) == []
    # A port where nothing answers: timeout, transient.
    silent = f"127.0.0.1:{free_port()}"
    with pytest.raises(TransientError, match="timeout|SERVFAIL"):
        tdns.resolve_once("a.example.com", [silent], timeout=1)


def test_dns_server_answers_over_tcp(nameserver: TestDnsServer) -> None:
    name = f"tcp-{_token()}.example.com"
    nameserver.set(name, "A", "127.0.0.3")
    query = dns_message.make_query(name, "A")
    reply = dns_query.tcp(query, nameserver.host, port=nameserver.port, timeout=3)
    assert [rr.address for rrset in reply.answer for rr in rrset] == ["127.0.0.3"]
