"""AWS for the upstream credential tests, from code no one here wrote: SigV4 as botocore computes it, short-term
Bedrock API keys as `aws-bedrock-token-generator` makes them, STS as `moto` serves it (in this process, so that the
mock upstream can look up the secret of the credentials STS handed out, as AWS does)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

from aws_bedrock_token_generator.token_generator import _generate_token
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from mock_upstream import Seen

SERVICE = "bedrock-mantle"
REGION = "us-west-2"
TOKEN_PREFIX = "bedrock-api-key-"
AMZ_DATE = "%Y%m%dT%H%M%SZ"
# How far a signature's time may be from now, as AWS allows.
SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Creds:
    access_key: str
    secret: str
    token: str | None = None
    expiration: datetime.datetime | None = None  # UTC, naive

    def botocore(self) -> Credentials:
        return Credentials(self.access_key, self.secret, self.token)


STATIC = Creds("AKIDMANTLEGATETEST01", "mantlegate/test+secret/0123456789abcdefghij")
SESSION = Creds("ASIAMANTLEGATETEST02", "mantlegate/session+secret/abcdefghij0123", "IQoJb3JpZ2luX2VjE/session+token==")


def gateway_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The gateway's environment: this one's, minus any AWS or mantlegate settings, with no shared profile and
    instance metadata off (it is not on loopback), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MANTLEGATE", "AWS_")) and k != "RUST_LOG"}
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        AWS_CONFIG_FILE=str(home / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra)
    return env


def static_env(creds: Creds) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret}
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    return env


def config_text(upstream_url: str, auth: str, region: str = REGION) -> str:
    """A sidecar-shaped config (trusted callers, one default project, a route for the Anthropic shape) whose
    upstream credential is `auth`."""
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"

[upstream]
base_url = "{upstream_url}"
auth = "{auth}"
region = "{region}"
connect_timeout = "2s"
response_timeout = "20s"

[callers]
auth = "none"

[attribution]
default_project = "Workload"

[[projects]]
name = "Workload"
id = "proj_workload"

[[projects]]
name = "Other"
id = "proj_other"
"""


# --- SigV4 ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str


AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)


def parse_authorization(value: str | None) -> Authorization | None:
    m = AUTHORIZATION.fullmatch(value or "")
    if m is None:
        return None
    key, date, region, service, signed, signature = m.groups()
    return Authorization(key, date, region, service, signed.split(";"), signature)


def botocore_authorization(seen: Seen, creds: Creds, headers: list[tuple[str, str]], region: str = REGION) -> str:
    """The `Authorization` botocore's SigV4 gives `seen` (its method, target and body) with `headers`, at the time
    its `x-amz-date` says."""
    request = AWSRequest(method=seen.method, url=f"https://{seen.header('host')}{seen.target}", data=seen.body)
    for name, value in headers:
        request.headers[name] = value  # appends: a repeated header stays repeated
    at = datetime.datetime.strptime(seen.header("x-amz-date"), AMZ_DATE)
    with mock.patch("botocore.auth.get_current_datetime", return_value=at):
        SigV4Auth(creds.botocore(), SERVICE, region).add_auth(request)
    return request.headers["Authorization"]


def check_signature(seen: Seen, lookup, region: str = REGION, now: datetime.datetime | None = None):
    """Judges `seen`'s SigV4 signature as AWS does: None if good, else (error code, why). `lookup` gives the
    credentials of an access key id (None if unknown)."""
    auth = parse_authorization(seen.header("authorization"))
    if auth is None:
        return ("IncompleteSignatureException", f"no SigV4 Authorization: {seen.header('authorization')!r}")
    creds = lookup(auth.access_key)
    if creds is None:
        return ("UnrecognizedClientException", f"unknown access key {auth.access_key}")
    if (auth.service, auth.region) != (SERVICE, region):
        return ("InvalidSignatureException", f"signed for {auth.service} in {auth.region}")
    unsigned = [n for n, _ in seen.headers if n.startswith("x-amz-") and n not in auth.signed_headers]
    if unsigned or "host" not in auth.signed_headers:
        return ("InvalidSignatureException", f"x-amz-* headers left unsigned: {unsigned}")
    at = datetime.datetime.strptime(seen.header("x-amz-date") or "", AMZ_DATE)
    now = now or datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    if abs(now - at) > SKEW:
        return ("InvalidSignatureException", f"signed at {at}, now {now}")
    if creds.expiration is not None and at >= creds.expiration:
        return ("ExpiredTokenException", f"credentials expired at {creds.expiration}, signed at {at}")
    if seen.header("x-amz-security-token") != creds.token:
        return ("UnrecognizedClientException", "the security token does not match the credentials")
    if seen.header("x-amz-content-sha256") != hashlib.sha256(seen.body).hexdigest():
        return ("InvalidSignatureException", "x-amz-content-sha256 is not the body's hash")
    signed = [(n, v) for n, v in seen.headers if n in auth.signed_headers]
    if botocore_authorization(seen, creds, signed, region) != seen.header("authorization"):
        return ("InvalidSignatureException", "the signature does not match")
    return None


# --- short-term keys ----------------------------------------------------------------------------------------------


def token_url(authorization: str | None) -> str:
    """The presigned URL inside a bearer short-term key."""
    assert authorization and authorization.startswith(f"Bearer {TOKEN_PREFIX}"), authorization
    return base64.b64decode(authorization[len(f"Bearer {TOKEN_PREFIX}") :]).decode()


def token_params(authorization: str | None) -> dict[str, str]:
    return dict(parse_qsl(urlsplit("https://" + token_url(authorization)).query, keep_blank_values=True))


def generator_token(creds: Creds, region: str, amz_date: str, expires: int) -> str:
    """The key aws-bedrock-token-generator makes from `creds` at `amz_date`, living `expires` seconds."""
    at = datetime.datetime.strptime(amz_date, AMZ_DATE)
    with mock.patch("botocore.auth.get_current_datetime", return_value=at):
        return _generate_token(creds.botocore(), region, expires)


def check_token(seen: Seen, lookup, region: str = REGION, now: datetime.datetime | None = None):
    """Judges a bearer short-term key as AWS does: None if good, else (error code, why)."""
    try:
        params = token_params(seen.header("authorization"))
    except (AssertionError, ValueError) as e:
        return ("UnrecognizedClientException", f"not a short-term key: {e}")
    access_key = params.get("X-Amz-Credential", "").split("/")[0]
    creds = lookup(access_key)
    if creds is None:
        return ("UnrecognizedClientException", f"unknown access key {access_key!r}")
    at = datetime.datetime.strptime(params["X-Amz-Date"], AMZ_DATE)
    expires = int(params["X-Amz-Expires"])
    now = now or datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    if not 0 < expires <= 43_200 or now >= at + datetime.timedelta(seconds=expires):
        return ("ExpiredTokenException", f"the key expired (made {at}, living {expires} s)")
    if creds.expiration is not None and at + datetime.timedelta(seconds=expires) > creds.expiration:
        return ("InvalidSignatureException", "the key outlives its credentials")
    expected = generator_token(creds, region, params["X-Amz-Date"], expires)
    if seen.header("authorization") != f"Bearer {expected}":
        return ("InvalidSignatureException", "the key's signature does not match")
    return None
