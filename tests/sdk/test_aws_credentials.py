"""The gateway's AWS credentials, checked against implementations no one here wrote: every SigV4 signature it sends
equals botocore's for the same credentials, time, request and headers; every short-term key equals the one
aws-bedrock-token-generator makes from the same credentials at the same time; and EKS IRSA runs end to end, a web
identity token exchanged at STS (moto, in this process) for credentials that the gateway refreshes before they
expire, each request judged by a mock upstream that checks signatures and keys as AWS does."""

from __future__ import annotations

import datetime
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock
from urllib.parse import parse_qsl, quote

import httpx
import pytest
from moto.server import ThreadedMotoServer
from moto.sts.models import STSBackend, sts_backends

import aws
from aws import REGION, SESSION, STATIC, Creds
from harness import gateway_binary, log_record, start_gateway
from mock_upstream import MockUpstream, Seen

ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/mantlegate-gateway"


@pytest.fixture
def mock_upstream(request):
    """A mock upstream of its own for each test (its `verify` set by the test)."""
    upstream = MockUpstream().start()
    request.addfinalizer(upstream.stop)
    return upstream


def run_gateway(request, tmp_path, upstream, auth: str, env: dict[str, str]):
    return start_gateway(request, tmp_path, aws.config_text(upstream.url, auth), aws.gateway_env(tmp_path, **env))


ODD_QUERY = "q=a+b&x=%7e&r=b:c,d&flag&bad=%FF"
# ODD_QUERY as the canonical request spells it: read as a form, each name and value escaped but for A-Za-z0-9-_.~
CANONICAL_ODD_QUERY = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in parse_qsl(ODD_QUERY, keep_blank_values=True))


def send_variety(gw) -> None:
    """Requests of every shape the gateway signs: JSON and chunked bodies, queries in any order, escaped paths,
    spaced and repeated headers, the caller's own credentials and AWS headers (which never reach upstream)."""
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        chat = {"model": "openai.gpt-oss-120b", "messages": [{"role": "user", "content": "héllo ✓"}]}
        responses = [
            client.post(
                "/v1/chat/completions",
                json=chat,
                headers=[("X-Note", "spaced    out\tinside"), ("X-Twice", "a"), ("X-Twice", "b"), ("OpenAI-Project", "Other")],
            ),
            client.post(
                "/v1/chat/completions",
                content=iter([b'{"model": "openai.gpt-oss-20b", ', b'"messages": [], "stream": false}']),
                headers={"content-type": "application/json"},
            ),
            client.get("/v1/models?b=2&a=1&a=0&empty=&sp%20ace=x%2Fy"),
            client.get("/v1/responses/resp_a.b:c-d_E"),
            client.delete("/v1/responses/resp_gone"),
            client.post(
                "/anthropic/v1/messages",
                json={"model": "anthropic.claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                headers={
                    "x-api-key": "caller-key",
                    "authorization": "AWS4-HMAC-SHA256 Credential=CALLER/20260101/us-east-1/bedrock-mantle/aws4_request",
                    "x-amz-security-token": "caller-token",
                    "x-amz-date": "20200101T000000Z",
                    "anthropic-version": "2023-06-01",
                },
            ),
            # Spellings a signer and AWS could read differently: sent as they are signed.
            client.get(f"/v1/models?{ODD_QUERY}"),
        ]
    for response in responses:
        assert response.status_code == 200, (response.request.url, response.status_code, response.text)


@pytest.mark.parametrize("creds", [STATIC, SESSION], ids=["static", "session"])
def test_sigv4_signatures_equal_botocores(request, tmp_path, mock_upstream, creds: Creds):
    mock_upstream.verify = lambda seen: aws.check_signature(seen, {creds.access_key: creds}.get)
    gw = run_gateway(request, tmp_path, mock_upstream, "sigv4", aws.static_env(creds))
    send_variety(gw)
    seen = mock_upstream.requests()
    assert len(seen) == 7
    for s in seen:
        # botocore signs every header it is given but its own exclusions (user-agent, expect, ...): given every
        # header upstream received, but those holding a tab (which the SDKs canonicalize differently, so the
        # gateway leaves them unsigned), it must sign exactly what the gateway signed, to the same signature.
        on_the_wire = [(n, v) for n, v in s.headers if n != "authorization" and "\t" not in v]
        assert aws.botocore_authorization(s, creds, on_the_wire) == s.header("authorization"), s.target
        auth = aws.parse_authorization(s.header("authorization"))
        assert all(n in auth.signed_headers for n, _ in on_the_wire if n != "user-agent")
        assert "x-note" not in auth.signed_headers
        assert "openai-project" in auth.signed_headers or "anthropic-workspace-id" in auth.signed_headers
        assert s.header("x-amz-security-token") == creds.token
        for value in ("caller-key", "caller-token", "CALLER", "20200101T000000Z"):
            assert all(value not in v for _, v in s.headers), f"the caller's {value} reached upstream"
    assert seen[0].header("openai-project") == "proj_other"
    assert seen[0].header_all("x-twice") == ["a", "b"]
    assert seen[1].header("content-length") == str(len(seen[1].body)), "a chunked upload goes with its length"
    assert seen[5].header("anthropic-workspace-id") == "proj_workload" and seen[5].header("x-api-key") is None
    assert seen[6].target == f"/v1/models?{CANONICAL_ODD_QUERY}", seen[6].target


def test_a_wrong_signature_is_refused(request, tmp_path, mock_upstream):
    """The mock refuses what AWS would: here the gateway signs with the wrong secret (502 upstream_auth_failed to
    the caller), and a good signature stops matching once anything it covers changes."""
    mock_upstream.verify = lambda seen: aws.check_signature(seen, {STATIC.access_key: STATIC}.get)
    wrong = Creds(STATIC.access_key, "not-the-secret")
    gw = run_gateway(request, tmp_path, mock_upstream, "sigv4", aws.static_env(wrong))
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        response = client.get("/v1/models")
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_auth_failed"

    lookup = {STATIC.access_key: STATIC}.get
    gw_good = run_gateway(request, tmp_path / "good", mock_upstream, "sigv4", aws.static_env(STATIC))
    mock_upstream.reset()
    with httpx.Client(base_url=gw_good.url, timeout=20) as client:
        assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
    good = mock_upstream.only_request()
    assert aws.check_signature(good, lookup) is None
    tampered = [
        Seen(good.method, good.target, good.headers, good.body + b" "),
        Seen(good.method, good.target + "?x=1", good.headers, good.body),
        Seen(good.method, good.target, [(n, "proj_x" if n == "openai-project" else v) for n, v in good.headers], good.body),
        Seen(good.method, good.target, good.headers + [("x-amz-extra", "1")], good.body),
    ]
    for seen in tampered:
        assert aws.check_signature(seen, lookup) is not None, seen


@pytest.mark.parametrize("creds", [STATIC, SESSION], ids=["static", "session"])
def test_short_term_keys_equal_the_token_generators(request, tmp_path, mock_upstream, creds: Creds):
    mock_upstream.verify = lambda seen: aws.check_token(seen, {creds.access_key: creds}.get)
    gw = run_gateway(request, tmp_path, mock_upstream, "aws_token", aws.static_env(creds))
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
        message = {"model": "m", "max_tokens": 5, "messages": []}
        assert client.post("/anthropic/v1/messages", json=message, headers={"anthropic-version": "2023-06-01"}).status_code == 200
    chat, messages = mock_upstream.requests()
    params = aws.token_params(chat.header("authorization"))
    # Credentials that do not expire give a key of the longest life, twelve hours.
    assert params["X-Amz-Expires"] == "43200"
    expected = aws.generator_token(creds, REGION, params["X-Amz-Date"], 43200)
    assert chat.header("authorization") == f"Bearer {expected}"
    assert messages.header("x-api-key") == expected and messages.header("authorization") == f"Bearer {expected}"
    assert chat.header("x-amz-date") is None, "a short-term key is a bearer key: nothing is signed per request"


# --- EKS IRSA, end to end -------------------------------------------------------------------------------------------

# Sessions this short make the gateway refresh within seconds (halfway to expiry); AWS's shortest is 15 minutes,
# which it would refresh five minutes ahead.
SESSION_SECONDS = 20


@pytest.fixture
def sts(request):
    """STS on loopback (moto's server, in this process), handing out SESSION_SECONDS sessions for web identities;
    gives its URL and a lookup of the credentials it issued."""
    return start_sts(request, SESSION_SECONDS)


def start_sts(request, session_seconds: int):
    original = STSBackend.assume_role_with_web_identity

    def short(self, **kwargs):
        kwargs["duration"] = session_seconds
        return original(self, **kwargs)

    patch = mock.patch.object(STSBackend, "assume_role_with_web_identity", short)
    patch.start()
    request.addfinalizer(patch.stop)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    request.addfinalizer(server.stop)
    host, port = server.get_host_and_port()

    def lookup(access_key: str) -> Creds | None:
        role = sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key)
        if role is None:
            return None
        return Creds(role.access_key_id, role.secret_access_key, role.session_token, role.expiration.replace(tzinfo=None))

    return f"http://{host}:{port}", lookup


def irsa_env(tmp_path, sts_url: str) -> dict[str, str]:
    """What EKS puts in a pod whose service account is annotated with a role: a projected token file and the role."""
    token = tmp_path / "eks.amazonaws.com" / "serviceaccount" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YWk6bWFudGxlZ2F0ZSJ9.c2ln")
    return {
        "AWS_ROLE_ARN": ROLE_ARN,
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL_STS": sts_url,
    }


def keys_until_refreshed(gw, upstream: MockUpstream, auth: str) -> list[str]:
    """The access keys of requests sent, each verified, until the gateway has moved to a second set of credentials:
    without a refresh the first set expires and the mock refuses (ExpiredTokenException), failing the request."""
    keys: list[str] = []
    deadline = time.monotonic() + 4 * SESSION_SECONDS
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        while len(set(keys)) < 2:
            assert time.monotonic() < deadline, f"no refresh within {4 * SESSION_SECONDS} s: keys {set(keys)}"
            response = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
            assert response.status_code == 200, response.text
            keys.append(access_key_of(upstream.requests()[-1], auth))
            time.sleep(0.25)  # pacing the traffic, not waiting for anything
    return keys


@pytest.mark.parametrize("auth", ["sigv4", "aws_token"])
def test_irsa_credentials_are_fetched_and_refreshed(request, tmp_path, mock_upstream, sts, auth):
    sts_url, lookup = sts
    check = aws.check_signature if auth == "sigv4" else aws.check_token
    mock_upstream.verify = lambda seen: check(seen, lookup)
    env = irsa_env(tmp_path, sts_url)
    gw = run_gateway(request, tmp_path, mock_upstream, auth, env)

    keys = keys_until_refreshed(gw, mock_upstream, auth)
    assert all(lookup(k) is not None for k in keys), "every key was one STS issued"
    log = gw.log_path.read_text()
    for issued in map(lookup, set(keys)):
        assert issued.secret not in log and issued.token not in log, "a secret in the gateway's log"
    refreshed = [r for r in map(log_record, gw.log_path.read_text().splitlines()) if r and r.get("message") == "AWS credentials refreshed"]
    assert refreshed and "web identity" in refreshed[0]["source"], refreshed

    # `check` names the source and never the secret.
    config = tmp_path / "mantlegate.toml"
    out = subprocess.run(
        [str(gateway_binary()), "check", "--config", str(config)],
        env=aws.gateway_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN: EKS IRSA)" in out.stdout, out.stdout
    issued = lookup(keys[-1])
    assert issued.secret not in out.stdout + out.stderr and issued.token not in out.stdout + out.stderr


def test_serve_refuses_to_start_without_credentials(tmp_path, mock_upstream):
    config = tmp_path / "mantlegate.toml"
    config.write_text(aws.config_text(mock_upstream.url, "sigv4"))
    env = aws.gateway_env(tmp_path)
    served = subprocess.run(
        [str(gateway_binary()), "serve", "--config", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert served.returncode != 0
    said = served.stdout + served.stderr
    assert "no AWS credentials" in said and "AWS_WEB_IDENTITY_TOKEN_FILE" in said, said
    assert "mantlegate listening" not in said

    # `check` says the same, as a warning: configs are checked where their secrets are not.
    checked = subprocess.run(
        [str(gateway_binary()), "check", "--config", str(config)], env=env, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    assert "warning: no AWS credentials" in checked.stdout, checked.stdout
    assert mock_upstream.requests() == []


class ContainerCredentials:
    """The container credentials endpoint as the EKS Pod Identity agent and ECS serve it, on loopback: each fetch
    hands out new credentials living SESSION_SECONDS, to callers presenting the pod's token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.issued: dict[str, Creds] = {}
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def do_GET(self):
                if self.headers.get("Authorization") != outer.token:
                    outer.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                n = len(outer.issued)
                expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0) + datetime.timedelta(
                    seconds=SESSION_SECONDS
                )
                creds = Creds(f"ASIAPODIDENTITY{n:05d}", f"pod/identity+secret/{n}", f"pod-identity-token-{n}", expiry)
                outer.issued[creds.access_key] = creds
                body = json.dumps(
                    {
                        "AccessKeyId": creds.access_key,
                        "SecretAccessKey": creds.secret,
                        "Token": creds.token,
                        "AccountId": ACCOUNT,
                        "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1/credentials"


def test_pod_identity_credentials_are_fetched_with_the_pods_token_and_refreshed(request, tmp_path, mock_upstream):
    endpoint = ContainerCredentials("pod-identity-agent-token")
    request.addfinalizer(endpoint.server.shutdown)
    mock_upstream.verify = lambda seen: aws.check_signature(seen, endpoint.issued.get)
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text(endpoint.token)
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": endpoint.url, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file)}
    gw = run_gateway(request, tmp_path, mock_upstream, "sigv4", env)

    keys_until_refreshed(gw, mock_upstream, "sigv4")
    assert endpoint.refused == 0
    refreshed = [r for r in map(log_record, gw.log_path.read_text().splitlines()) if r and r.get("message") == "AWS credentials refreshed"]
    assert refreshed and "container credentials endpoint" in refreshed[0]["source"], refreshed


def access_key_of(seen: Seen, auth: str) -> str:
    if auth == "sigv4":
        return aws.parse_authorization(seen.header("authorization")).access_key
    return aws.token_params(seen.header("authorization"))["X-Amz-Credential"].split("/")[0]


@pytest.mark.parametrize("auth", ["sigv4", "aws_token"])
def test_refused_credentials_are_replaced_at_once(request, tmp_path, mock_upstream, auth):
    """Credentials revoked before their expiry (an hour away here) are replaced as soon as upstream refuses them,
    not at their scheduled refresh."""
    sts_url, lookup = start_sts(request, 3600)
    check = aws.check_signature if auth == "sigv4" else aws.check_token
    revoked: set[str] = set()

    def verify(seen: Seen):
        if access_key_of(seen, auth) in revoked:
            return ("UnrecognizedClientException", "the security token included in the request is invalid")
        return check(seen, lookup)

    mock_upstream.verify = verify
    gw = run_gateway(request, tmp_path, mock_upstream, auth, irsa_env(tmp_path, sts_url))
    chat = {"model": "m", "messages": []}
    with httpx.Client(base_url=gw.url, timeout=20) as client:
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        first = access_key_of(mock_upstream.requests()[-1], auth)
        revoked.add(first)
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_auth_failed"
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "the refused credentials were never replaced"
            response = client.post("/v1/chat/completions", json=chat)
            if response.status_code == 200:
                break
            assert response.json()["error"]["code"] == "upstream_auth_failed", response.text
            time.sleep(0.25)  # pacing the traffic, not waiting for anything
    replacement = access_key_of(mock_upstream.requests()[-1], auth)
    assert replacement != first and lookup(replacement) is not None
    gw.wait_for_log("fetching new AWS credentials ahead of time: upstream refused the ones in hand, or they expired")


@pytest.mark.parametrize("auth", ["sigv4", "aws_token"])
def test_check_probes_upstream_with_the_aws_credential(tmp_path, mock_upstream, auth):
    check = aws.check_signature if auth == "sigv4" else aws.check_token
    mock_upstream.verify = lambda seen: check(seen, {STATIC.access_key: STATIC}.get)
    config = tmp_path / "mantlegate.toml"
    config.write_text(aws.config_text(mock_upstream.url, auth))

    def probe(creds: Creds) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(gateway_binary()), "check", "--probe-upstream", "--config", str(config)],
            env=aws.gateway_env(tmp_path, **aws.static_env(creds)),
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = probe(STATIC)
    assert good.returncode == 0 and "accepts the gateway's credential" in good.stdout, good.stdout + good.stderr
    bad = probe(Creds(STATIC.access_key, "not-the-secret"))
    assert bad.returncode == 1 and "refused the gateway's credential" in bad.stderr, bad.stdout + bad.stderr
    assert "not-the-secret" not in bad.stdout + bad.stderr
    assert [s.target for s in mock_upstream.requests()] == ["/v1/models", "/v1/models"]
