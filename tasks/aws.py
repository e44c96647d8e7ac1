"""ACM, IAM and Route53 through boto3: the preflight checks and the DNS record.

Credentials come from boto3's own chain (IRSA in the cluster, env or profile
elsewhere). ``region`` and ``endpoint_url`` are passed in by the caller from
:class:`mlflow_rollout.settings.AwsSettings`; ``endpoint_url`` points every API
at one endpoint (moto in tests), None means AWS itself.

Clients come from :func:`mlflow_rollout.aws_common.client`, ARNs are checked
with its grammar, and every botocore failure is mapped by the one table in
:mod:`mlflow_rollout.error_policy` (throttling, 5xx, connection errors →
TransientError; AccessDenied & co., missing credentials → AuthError;
NoSuchEntity, NoSuchHostedZone, ResourceNotFoundException → BadInputError).
What this module adds on top::

    BadInputError     an ARN of the wrong form or region, a certificate that
                      does not cover the host, no hosted zone for the host
    PermanentError    a certificate that is EXPIRED/REVOKED/FAILED or expires
                      too soon
    TransientError    a certificate still PENDING_VALIDATION, a Route53 change
                      not INSYNC in time

Messages name the service, the operation and the resource (ARN, host, zone)
and never carry secrets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from botocore.exceptions import BotoCoreError, ClientError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from mlflow_rollout import aws_common
from mlflow_rollout.aws_common import ACM_CERTIFICATE, IAM_ROLE, require_arn
from mlflow_rollout.error_policy import Rule, aws_call, aws_error
from mlflow_rollout.errors import BadInputError, PermanentError, TransientError

__all__ = [
    "HostedZone",
    "ALB_HOSTED_ZONE_IDS",
    "aws_client",
    "certificate_covers",
    "check_certificate",
    "check_role",
    "s3_actions_denied",
    "find_hosted_zone",
    "alb_hosted_zone_id",
    "upsert_record",
    "wait_insync",
    "record_points_at",
]

#: Route53 hosted zone ids of Application (and Classic) Load Balancers per
#: region, for alias records ("Elastic Load Balancing endpoints and quotas" in
#: the AWS General Reference). Network Load Balancers use other zones.
ALB_HOSTED_ZONE_IDS: dict[str, str] = {
    "af-south-1": "Z268VQBMOI5EKX",
    "ap-east-1": "Z3DQVH9N71FHZ0",
    "ap-northeast-1": "Z14GRHDCWA56QT",
    "ap-northeast-2": "ZWKZPGTI48KDX",
    "ap-northeast-3": "Z5LXEXXYW11ES",
    "ap-south-1": "ZP97RAFLXTNZK",
    "ap-south-2": "Z0173938T07WNTVAEPZN",
    "ap-southeast-1": "Z1LMS91P8CMLE5",
    "ap-southeast-2": "Z1GM3OXH4ZPM65",
    "ap-southeast-3": "Z08888821HLRG5A9ZRTER",
    "ap-southeast-4": "Z09517862IB2WZLPXG76F",
    "ap-southeast-5": "Z06010284QMVVW7WO5J",
    "ap-southeast-7": "Z0390008CMBRTHFGWBCB",
    "ca-central-1": "ZQSVJUPU6J1EY",
    "ca-west-1": "Z06473681N0SF6OS049SD",
    "cn-north-1": "Z1GDH35T77C1KE",
    "cn-northwest-1": "ZM7IZAIOVVDZF",
    "eu-central-1": "Z215JYRZR1TBD5",
    "eu-central-2": "Z06391101F2ZOEP8P5EB3",
    "eu-north-1": "Z23TAZ6LKFMNIO",
    "eu-south-1": "Z3ULH7SSC9OV64",
    "eu-south-2": "Z0956581394HF5D5LXGAP",
    "eu-west-1": "Z32O12XQLNTSW2",
    "eu-west-2": "ZHURV8PSTC4K8",
    "eu-west-3": "Z3Q77PNBQS71R4",
    "il-central-1": "Z09170902867EHPV2DABU",
    "me-central-1": "Z08230872XQRWHG2XF6I",
    "me-south-1": "ZS929ML54UICD",
    "mx-central-1": "Z023552324OKD1BB28BH5",
    "sa-east-1": "Z2P70J7HTTTPLU",
    "us-east-1": "Z35SXDOTRQ7X7K",
    "us-east-2": "Z3AADJGX6KTTL2",
    "us-gov-east-1": "Z166TLBEWOO7G0",
    "us-gov-west-1": "Z33AYJ8TM3BH4J",
    "us-west-1": "Z368ELLRRE2KJ0",
    "us-west-2": "Z1H1FL5HABSF5",
}

@dataclass(frozen=True)
class HostedZone:
    """A Route53 hosted zone: ``id`` without the ``/hostedzone/`` prefix, ``name`` without the trailing dot."""

    id: str
    name: str
    private: bool


# --------------------------------------------------------------------------
# clients


def aws_client(service: str, region: str, endpoint_url: str | None):
    """A boto3 client (kept for callers of this name; see :func:`mlflow_rollout.aws_common.client`)."""
    return aws_common.client(service, region=region, endpoint_url=endpoint_url)


def _norm(name: str) -> str:
    """A DNS name for comparison: lower case, no trailing dot, ``\\052`` as ``*``."""
    return name.strip().rstrip(".").lower().replace("\\052", "*")


# --------------------------------------------------------------------------
# ACM

def certificate_covers(pattern: str, host: str) -> bool:
    """Whether one certificate name covers ``host``.

    An exact name matches itself; ``*.example.com`` covers exactly one more
    label (``a.example.com``), neither ``a.b.example.com`` nor ``example.com``.
    """
    pattern, host = _norm(pattern), _norm(host)
    if not pattern.startswith("*."):
        return pattern == host
    label, _, rest = host.partition(".")
    return bool(label) and label != "*" and rest == pattern[2:]


def check_certificate(
    arn: str,
    host: str,
    *,
    min_days: int,
    region: str,
    endpoint_url: str | None = None,
) -> str:
    """The ACM certificate is ISSUED, covers ``host`` and is valid for more than ``min_days``.

    ``PENDING_VALIDATION`` is transient (DNS validation takes minutes); any
    other state, a host it does not cover or an expiry within ``min_days`` is
    permanent. An ALB can only use a certificate of its own region, so an ARN
    of another region is bad input. Returns a one-line summary.
    """
    parsed = require_arn(arn, ACM_CERTIFICATE)
    if parsed.region != region:
        raise BadInputError(
            f"ACM certificate {arn} is in region {parsed.region} but the load balancer is in {region}; "
            "an ALB needs a certificate of its own region"
        )
    what = f"ACM certificate {arn}"
    not_found = Rule("bad_input", f"the certificate does not exist in {region}")
    with aws_call("ACM", "DescribeCertificate", f"certificate {arn}", endpoint_url=endpoint_url,
                  hints={"ResourceNotFoundException": not_found}, permissions="acm:DescribeCertificate"):
        cert = aws_client("acm", region, endpoint_url).describe_certificate(CertificateArn=arn)["Certificate"]

    status = cert.get("Status", "UNKNOWN")
    if status == "PENDING_VALIDATION":
        raise TransientError(f"{what} is PENDING_VALIDATION: its DNS validation records are not seen yet")
    if status != "ISSUED":
        reason = cert.get("FailureReason") or cert.get("RevocationReason")
        raise PermanentError(f"{what} is {status}, not ISSUED" + (f" ({reason})" if reason else ""))

    names = list(dict.fromkeys([cert.get("DomainName", ""), *cert.get("SubjectAlternativeNames", [])]))
    names = [n for n in names if n]
    if not any(certificate_covers(n, host) for n in names):
        raise BadInputError(
            f"{what} does not cover host {host}; it covers: {', '.join(names) or '(no names)'}"
        )

    not_after = cert.get("NotAfter")
    if not isinstance(not_after, datetime):
        raise PermanentError(f"{what} is ISSUED but has no expiry date (NotAfter)")
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=timezone.utc)
    days_left = (not_after - datetime.now(timezone.utc)).total_seconds() / 86400
    if days_left <= min_days:
        raise PermanentError(
            f"{what} expires {not_after:%Y-%m-%d} ({days_left:.0f} days left); "
            f"at least {min_days} days are required (aws.certificate_min_days)"
        )
    return f"certificate {arn} ISSUED, covers {host}, expires {not_after:%Y-%m-%d} ({days_left:.0f} days left)"


# --------------------------------------------------------------------------
# IAM

def check_role(arn: str, *, region: str, endpoint_url: str | None = None) -> str:
    """The IAM role exists (IRSA role for the server's service account).

    Returns a summary; when the trust policy does not allow
    ``sts:AssumeRoleWithWebIdentity`` the summary carries a warning (IRSA would
    not work), which the flow shows without failing.
    """
    name = require_arn(arn, IAM_ROLE).resource_name
    what = f"IAM role {arn}"
    with aws_call("IAM", "GetRole", f"role {arn}", endpoint_url=endpoint_url,
                  hints={"NoSuchEntity": Rule("bad_input", "the role does not exist")},
                  permissions="iam:GetRole"):
        role = aws_client("iam", region, endpoint_url).get_role(RoleName=name)["Role"]

    if role.get("Arn") and role["Arn"] != arn:
        # Same name, other path or account: the output names another role.
        raise BadInputError(f"{what} does not exist (a role named {name!r} is {role['Arn']})")
    policy = role.get("AssumeRolePolicyDocument") or {}
    text = policy if isinstance(policy, str) else json.dumps(policy)
    if "sts:AssumeRoleWithWebIdentity" not in text:
        return (
            f"role {arn} exists; warning: its trust policy does not allow sts:AssumeRoleWithWebIdentity, "
            "so the service account cannot assume it through IRSA"
        )
    return f"role {arn} exists and trusts web identity (IRSA)"


#: What the server does with its artifact location (MLflow's S3 artifact repository), as IAM actions and the
#: resource each is granted on: the bucket itself for listing, objects under the prefix for the rest.
S3_ARTIFACT_ACTIONS = ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject")


def s3_actions_denied(
    role_arn: str, bucket: str, prefix: str, *, region: str, endpoint_url: str | None = None,
) -> list[str]:
    """The actions of :data:`S3_ARTIFACT_ACTIONS` the role's policies do not allow on ``bucket``/``prefix``.

    Reads the role's inline and attached (default version) policies and
    evaluates their statements as IAM does for one identity: an explicit Deny
    wins, otherwise an Allow must match action and resource (``*``/``?``
    wildcards). Conditions, permission boundaries, SCPs and the bucket policy
    are not evaluated: a finding here is certain, an empty list is not a proof.
    """
    name = require_arn(role_arn, IAM_ROLE).resource_name
    iam = aws_client("iam", region, endpoint_url)
    documents: list[dict] = []
    with aws_call("IAM", "ListRolePolicies", f"role {role_arn}", endpoint_url=endpoint_url,
                  permissions="iam:ListRolePolicies, iam:GetRolePolicy, iam:ListAttachedRolePolicies, "
                              "iam:GetPolicy, iam:GetPolicyVersion"):
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            documents.append(_document(iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]))
        for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
            documents.append(_document(iam.get_policy_version(
                PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]))
    key = f"{prefix.strip('/')}/probe" if prefix.strip("/") else "probe"
    resources = {"s3:ListBucket": f"arn:aws:s3:::{bucket}"}
    denied = []
    for action in S3_ARTIFACT_ACTIONS:
        resource = resources.get(action, f"arn:aws:s3:::{bucket}/{key}")
        effects = {_effect(st, action, resource) for doc in documents for st in _statements(doc)}
        if "Deny" in effects or "Allow" not in effects:
            denied.append(action)
    return denied


def _document(doc: object) -> dict:
    """A policy document: boto3 decodes it to a dict; some endpoints give URL-encoded JSON."""
    if isinstance(doc, str):
        from urllib.parse import unquote

        return json.loads(unquote(doc))
    return doc if isinstance(doc, dict) else {}


def _statements(doc: dict) -> list[dict]:
    st = doc.get("Statement") or []
    return [st] if isinstance(st, dict) else [s for s in st if isinstance(s, dict)]


def _effect(statement: dict, action: str, resource: str) -> str | None:
    """The statement's Effect when it applies to ``action`` on ``resource``, else None."""
    import fnmatch

    def listed(key: str) -> list[str]:
        value = statement.get(key)
        return [value] if isinstance(value, str) else list(value or [])

    def matches(patterns: list[str], value: str, case: bool) -> bool:
        if case:
            return any(fnmatch.fnmatchcase(value, p) for p in patterns)
        return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in patterns)

    if "Action" in statement:
        if not matches(listed("Action"), action, case=False):
            return None
    elif matches(listed("NotAction"), action, case=False):
        return None
    if "Resource" in statement:
        if not matches(listed("Resource"), resource, case=True):
            return None
    elif matches(listed("NotResource"), resource, case=True):
        return None
    return str(statement.get("Effect", ""))


# --------------------------------------------------------------------------
# Route53


def _zone_id(zone_id: str) -> str:
    return zone_id.rsplit("/", 1)[-1]


def _list_zones(client, endpoint_url: str | None) -> list[HostedZone]:
    zones: list[HostedZone] = []
    with aws_call("Route53", "ListHostedZones", "the account's hosted zones", endpoint_url=endpoint_url,
                  permissions="route53:ListHostedZones"):
        for page in client.get_paginator("list_hosted_zones").paginate():
            for z in page.get("HostedZones", []):
                zones.append(
                    HostedZone(
                        id=_zone_id(z["Id"]),
                        name=_norm(z["Name"]),
                        private=bool(z.get("Config", {}).get("PrivateZone", False)),
                    )
                )
    return zones


def _is_suffix(zone: str, host: str) -> bool:
    return host == zone or host.endswith("." + zone)


def _describe_zones(zones: list[HostedZone]) -> str:
    if not zones:
        return "(none)"
    return ", ".join(f"{z.name}{' (private)' if z.private else ''}" for z in sorted(zones, key=lambda z: z.name))


def find_hosted_zone(
    host: str,
    *,
    zone_name: str | None = None,
    region: str,
    endpoint_url: str | None = None,
) -> HostedZone:
    """The hosted zone for ``host``.

    Without ``zone_name``: the longest *public* zone whose name is a suffix of
    ``host``. With it: the zone of that name (public preferred over private
    when both exist), which must be a suffix of ``host``. Two public zones of
    the same name are ambiguous (bad input: name the zone id instead).
    """
    host_n = _norm(host)
    zones = _list_zones(aws_client("route53", region, endpoint_url), endpoint_url)
    if zone_name:
        wanted = _norm(zone_name)
        if not _is_suffix(wanted, host_n):
            raise BadInputError(f"hosted zone {wanted} (aws.hosted_zone_name) cannot hold host {host_n}")
        named = [z for z in zones if z.name == wanted]
        if not named:
            raise BadInputError(
                f"no hosted zone named {wanted} (aws.hosted_zone_name); zones seen: {_describe_zones(zones)}"
            )
        public = [z for z in named if not z.private]
        candidates = public or named
    else:
        matching = [z for z in zones if not z.private and _is_suffix(z.name, host_n)]
        if not matching:
            raise BadInputError(f"no public hosted zone holds host {host_n}; zones seen: {_describe_zones(zones)}")
        longest = max(len(z.name) for z in matching)
        candidates = [z for z in matching if len(z.name) == longest]
    if len(candidates) > 1:
        raise BadInputError(
            f"{len(candidates)} hosted zones named {candidates[0].name} ({', '.join(z.id for z in candidates)}); "
            "remove the duplicate"
        )
    return candidates[0]


_ALB_NAME = re.compile(r"\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d)\.elb\.amazonaws\.com(?:\.cn)?$")
_NLB_NAME = re.compile(r"\.elb\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com(?:\.cn)?$")


def alb_hosted_zone_id(lb_hostname: str, region: str) -> str:
    """The canonical hosted zone id for an alias to the ALB ``lb_hostname``.

    The region in the ALB's name (``NAME.REGION.elb.amazonaws.com``) wins over
    ``region``; a Network Load Balancer name is bad input (use ``cname``).
    """
    name = _norm(lb_hostname)
    if _NLB_NAME.search(name):
        raise BadInputError(
            f"{lb_hostname} is a Network Load Balancer name; alias records here support ALBs only "
            "(set aws.dns_record: cname)"
        )
    m = _ALB_NAME.search(name)
    lb_region = m["region"] if m else region
    try:
        return ALB_HOSTED_ZONE_IDS[lb_region]
    except KeyError:
        raise BadInputError(
            f"no known ALB hosted zone id for region {lb_region} (load balancer {lb_hostname}); "
            "set aws.dns_record: cname"
        ) from None


def _records_for(client, zone_id: str, host: str, endpoint_url: str | None) -> list[dict]:
    """The record sets of exactly ``host`` in the zone (any type)."""
    with aws_call("Route53", "ListResourceRecordSets", f"records of {host} in hosted zone {zone_id}",
                  endpoint_url=endpoint_url, permissions="route53:ListResourceRecordSets"):
        page = client.list_resource_record_sets(HostedZoneId=zone_id, StartRecordName=host, MaxItems="20")
    return [r for r in page.get("ResourceRecordSets", []) if _norm(r["Name"]) == _norm(host)]


def upsert_record(
    zone_id: str,
    host: str,
    lb_hostname: str,
    *,
    kind: Literal["cname", "alias"] = "cname",
    ttl: int = 60,
    region: str,
    endpoint_url: str | None = None,
) -> str:
    """Point ``host`` at the load balancer; returns the Route53 change id.

    ``cname``: a CNAME ``host → lb_hostname`` with ``ttl``. ``alias``: an A
    record aliased to the ALB (its canonical hosted zone id for the region,
    ``EvaluateTargetHealth`` on). UPSERT, so running it again changes nothing;
    switching kind deletes the record of the other type in the same change
    batch (a CNAME cannot coexist with an A record).
    """
    zone_id = _zone_id(zone_id)
    host_n, target = _norm(host), _norm(lb_hostname)
    if not target:
        raise BadInputError(f"no load balancer hostname to point {host_n} at")
    if kind == "cname":
        record = {"Name": host_n, "Type": "CNAME", "TTL": int(ttl), "ResourceRecords": [{"Value": target}]}
        conflicting = {"A", "AAAA"}
    elif kind == "alias":
        record = {
            "Name": host_n,
            "Type": "A",
            "AliasTarget": {
                "HostedZoneId": alb_hosted_zone_id(target, region),
                "DNSName": target,
                "EvaluateTargetHealth": True,
            },
        }
        conflicting = {"CNAME"}
    else:
        raise BadInputError(f"unknown DNS record kind {kind!r}: expected 'cname' or 'alias'")

    client = aws_client("route53", region, endpoint_url)
    changes = [
        {"Action": "DELETE", "ResourceRecordSet": existing}
        for existing in _records_for(client, zone_id, host_n, endpoint_url)
        if existing["Type"] in conflicting and "SetIdentifier" not in existing
    ]
    changes.append({"Action": "UPSERT", "ResourceRecordSet": record})
    what = f"{'CNAME' if kind == 'cname' else 'alias A'} record {host_n} → {target} in hosted zone {zone_id}"
    with aws_call("Route53", "ChangeResourceRecordSets", what, endpoint_url=endpoint_url,
                  permissions="route53:ChangeResourceRecordSets"):
        resp = client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={"Comment": f"mlflow-rollout: {host_n}", "Changes": changes},
        )
    return _zone_id(resp["ChangeInfo"]["Id"])


class _NotInSync(Exception):
    pass


def wait_insync(
    change_id: str,
    timeout: float,
    *,
    region: str,
    endpoint_url: str | None = None,
    interval: float = 2,
) -> str:
    """Poll ``get_change`` until the change is INSYNC; TransientError after ``timeout`` seconds.

    Transient API errors while polling are retried until the deadline;
    permanent ones (unknown change id, access denied) end the wait at once.
    """
    change_id = _zone_id(change_id)
    client = aws_client("route53", region, endpoint_url)
    last = {"status": "not read yet"}

    def poll() -> str:
        try:
            status = client.get_change(Id=change_id)["ChangeInfo"]["Status"]
        except (ClientError, BotoCoreError) as exc:
            err = aws_error(exc, service="Route53", operation="GetChange", resource=f"change {change_id}",
                            endpoint_url=endpoint_url, permissions="route53:GetChange")
            if isinstance(err, TransientError):
                last["status"] = str(err)
            raise err from None
        last["status"] = status
        if status != "INSYNC":
            raise _NotInSync(status)
        return status

    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(interval),
            retry=retry_if_exception_type((_NotInSync, TransientError)),
            reraise=False,
        ):
            with attempt:
                poll()
    except RetryError:
        raise TransientError(
            f"Route53 change {change_id} not INSYNC after {timeout:g} s (last status: {last['status']})"
        ) from None
    return f"Route53 change {change_id} INSYNC"


def record_points_at(
    zone_id: str,
    host: str,
    lb_hostname: str,
    *,
    region: str,
    endpoint_url: str | None = None,
) -> bool:
    """Whether Route53 has ``host`` as a CNAME to, or an alias A of, ``lb_hostname``.

    Compares names case-insensitively without the trailing dot; an alias to
    ``dualstack.<lb_hostname>`` counts too.
    """
    client = aws_client("route53", region, endpoint_url)
    target = _norm(lb_hostname)
    for rec in _records_for(client, _zone_id(zone_id), host, endpoint_url):
        if rec["Type"] == "CNAME":
            if any(_norm(rr["Value"]) == target for rr in rec.get("ResourceRecords", [])):
                return True
        elif rec["Type"] in ("A", "AAAA") and "AliasTarget" in rec:
            alias = _norm(rec["AliasTarget"]["DNSName"]).removeprefix("dualstack.")
            if alias == target.removeprefix("dualstack."):
                return True
    return False
