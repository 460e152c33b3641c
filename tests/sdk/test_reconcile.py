"""`mantlegate usage reconcile` and the gateway's scheduled reconciliation, against CloudWatch as `moto` serves it
(in this process, on loopback): the real AWS SDK client signs with SigV4 and moto checks each signature and the
caller's IAM policy (the one README.md gives, read from it), then answers GetMetricData from metric data put with
boto3, page by page. Ledgers are written as replicas write them.

Where moto's CloudWatch differs from AWS's in what these tests rely on, a patch here makes it answer as AWS does
(each says what and why)."""

from __future__ import annotations

import datetime
import json
import re
import socket
import subprocess
from pathlib import Path
from unittest import mock

import boto3
import httpx
import pytest
from moto.cloudwatch.models import CloudWatchBackend
from moto.cloudwatch.responses import CloudWatchResponse
from moto.core.authorization import enable_iam_authentication
from moto.core.responses import ActionResult
from moto.iam.access_control import IAMRequestBase
from moto.server import ThreadedMotoServer

import aws
from harness import ROOT, gateway_binary, log_record, start_gateway

REGION = "us-west-2"
NAMESPACE = "AWS/BedrockMantle"
# Data points per GetMetricData page: small, so that every read takes several pages and one query's values are
# split across them.
PAGE = 3
ADMIN = aws.Creds("AKIDMOTOADMIN0000001", "moto-admin-secret")


def readme_policy() -> dict:
    """The IAM policy README.md gives for reconciliation (the first JSON block of its section)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reconciliation against AWS", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "README.md's reconciliation section has no policy"
    return json.loads(block.group(1))


class CloudWatch:
    """moto's server, with an IAM user allowed what README.md says (`reconciler`) and one allowed nothing of
    CloudWatch (`bystander`); `calls` records each GetMetricData request (its queries and NextToken)."""

    def __init__(self, request) -> None:
        self.calls: list[dict] = []
        self._patch(request)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        request.addfinalizer(server.stop)
        host, port = server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        httpx.post(f"{self.url}/moto-api/reset").raise_for_status()
        iam = self.client("iam")
        self.reconciler = self._user(iam, "reconciler", readme_policy())
        other = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}]}
        self.bystander = self._user(iam, "bystander", other)

    def client(self, service: str):
        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=ADMIN.access_key,
            aws_secret_access_key=ADMIN.secret,
        )

    @staticmethod
    def _user(iam, name: str, policy: dict) -> aws.Creds:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return aws.Creds(key["AccessKeyId"], key["SecretAccessKey"])

    def put(self, at: datetime.datetime, input_tokens: int, output_tokens: int, **dimensions: str) -> None:
        """Both token metrics at `at`, for the series `dimensions` names (none: the account's)."""
        dims = [{"Name": k, "Value": v} for k, v in dimensions.items()]
        self.client("cloudwatch").put_metric_data(
            Namespace=NAMESPACE,
            MetricData=[
                {"MetricName": "TotalInputTokens", "Dimensions": dims, "Timestamp": at, "Value": input_tokens, "Unit": "Count"},
                {"MetricName": "TotalOutputTokens", "Dimensions": dims, "Timestamp": at, "Value": output_tokens, "Unit": "Count"},
            ],
        )

    def publish(self, at: datetime.datetime, project: str, model: str, input_tokens: int, output_tokens: int) -> None:
        """Usage as bedrock-mantle publishes it: the same tokens in the project's series, its series for the model,
        and the account's."""
        self.put(at, input_tokens, output_tokens, Project=project, Model=model)
        self.put(at, input_tokens, output_tokens, Project=project)
        self.put(at, input_tokens, output_tokens)

    def asked(self) -> set[tuple]:
        """Every series the GetMetricData calls asked for, as (metric, sorted dimensions)."""
        asked = set()
        for call in self.calls:
            for q in call["queries"]:
                metric = q["MetricStat"]["Metric"]
                dims = tuple(sorted((d["Name"], d["Value"]) for d in metric.get("Dimensions", [])))
                asked.add((metric["MetricName"], dims))
        return asked

    def _patch(self, request) -> None:
        original_read = CloudWatchBackend.get_metric_data

        def read(backend, queries, start_time, end_time, scan_by="TimestampAscending"):
            # moto sums every series of a metric for a query without dimensions; CloudWatch answers it with the
            # series published without dimensions (bedrock-mantle's account-wide one), as it matches every other
            # query's dimensions exactly.
            bare = [q for q in queries if "MetricStat" in q and not q["MetricStat"]["Metric"].get("Dimensions")]
            rest = [q for q in queries if q not in bare]
            results = original_read(backend, rest, start_time, end_time, scan_by) if rest else []
            if bare:
                everything = backend.get_all_metrics
                with mock.patch.object(backend, "get_all_metrics", lambda: [m for m in everything() if not m.dimensions]):
                    results += original_read(backend, bare, start_time, end_time, scan_by)
            return results

        original_response = CloudWatchResponse.get_metric_data
        calls = self.calls

        def paged(response):
            # moto answers in one page; CloudWatch pages long answers (NextToken), splitting a query's values.
            params = response._get_params()
            calls.append({"queries": params.get("MetricDataQueries", []), "token": params.get("NextToken")})
            results = original_response(response).result["MetricDataResults"]
            points = [(r, v, t) for r in results for v, t in zip(r["values"], r["timestamps"])]
            start = int(params.get("NextToken") or 0)
            page: dict[str, dict] = {}
            for r, v, t in points[start : start + PAGE]:
                out = page.setdefault(r["id"], {**r, "values": [], "timestamps": [], "status_code": "PartialData"})
                out["values"].append(v)
                out["timestamps"].append(t)
            answer = {"MetricDataResults": list(page.values())}
            if start + PAGE < len(points):
                answer["NextToken"] = str(start + PAGE)
            return ActionResult(answer)

        original_init = IAMRequestBase.__init__

        def init(iam_request, *args, **kwargs):
            original_init(iam_request, *args, **kwargs)
            # moto names the IAM action by the signing name (`monitoring`); IAM's prefix for CloudWatch is `cloudwatch`.
            if iam_request._action.startswith("monitoring:"):
                iam_request._action = "cloudwatch:" + iam_request._action.split(":", 1)[1]

        for patch in (
            mock.patch.object(CloudWatchBackend, "get_metric_data", read),
            mock.patch.object(CloudWatchResponse, "get_metric_data", paged),
            mock.patch.object(IAMRequestBase, "__init__", init),
        ):
            patch.start()
            request.addfinalizer(patch.stop)


@pytest.fixture
def cloudwatch(request) -> CloudWatch:
    return CloudWatch(request)


def config_text(extra: str = "") -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"

[upstream]
base_url = "http://127.0.0.1:9"
auth = "api_key"
api_key_env = "MANTLEGATE_RECONCILE_TEST_KEY"
region = "{REGION}"

[callers]
auth = "none"

[[projects]]
name = "Chat"
id = "proj_chat"

[[projects]]
name = "Search"
id = "proj_search"

[[projects]]
name = "Labs"
id = "proj_labs"
{extra}"""


def ledger_line(at: datetime.datetime, project: str, project_id: str, model: str, input_tokens: int, output_tokens: int, **extra) -> str:
    line = {
        "time": at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "request_id": "r",
        "key": None,
        "route": "chat.completions",
        "model": model,
        "stream": False,
        "status": 200,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": extra.pop("cached", 0),
        "reasoning_tokens": 0,
        "cost_usd": None,
        "duration_ms": 1.0,
        "ttfb_ms": 1.0,
        "complete": True,
        "project": project,
        "project_id": project_id,
        "tags": {},
        **extra,
    }
    return json.dumps(line) + "\n"


def hour_floor(t: datetime.datetime) -> datetime.datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile(tmp_path: Path, creds: aws.Creds, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    env = aws.gateway_env(tmp_path, **aws.static_env(creds), AWS_ENDPOINT_URL_CLOUDWATCH=endpoint)
    return subprocess.run(
        [str(gateway_binary()), "usage", "reconcile", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def row(text: str, project: str, model: str) -> list[str]:
    for line in text.splitlines():
        cells = line.split()
        if cells[:2] == [project, model]:
            return cells
    raise AssertionError(f"no row for {project} {model}:\n{text}")


@pytest.fixture
def scenario(tmp_path, cloudwatch):
    """Two hours of traffic with one of each verdict: Chat's tokens match (two replicas' ledgers, one of them
    rotated), someone reaches Search without the gateway, Labs's traffic never reached this account and region,
    a client without a project lands in `default`, and a project the config does not know has traffic."""
    start = hour_floor(datetime.datetime.now(datetime.UTC).replace(tzinfo=None)) - datetime.timedelta(hours=3)
    until = start + datetime.timedelta(hours=2)
    first, second = start + datetime.timedelta(minutes=10), start + datetime.timedelta(minutes=70)
    cw = cloudwatch
    cw.publish(first, "proj_chat", "openai.gpt-oss-120b", 600, 60)
    cw.publish(second, "proj_chat", "openai.gpt-oss-120b", 400, 40)
    cw.publish(first, "proj_search", "openai.gpt-oss-20b", 900, 30)
    cw.publish(second, "default", "openai.gpt-oss-120b", 70, 7)
    cw.publish(second, "proj_rogue", "openai.gpt-oss-120b", 400, 40)
    # The hour after the window: never counted.
    cw.publish(until + datetime.timedelta(minutes=5), "proj_chat", "openai.gpt-oss-120b", 5000, 500)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_rotated = tmp_path / "a" / f"usage.{first:%Y-%m-%d}.jsonl"
    a_rotated.write_text(ledger_line(first, "Chat", "proj_chat", "openai.gpt-oss-120b", 600, 60))
    (tmp_path / "a" / "usage.jsonl").write_text(
        ledger_line(second, "Labs", "proj_labs", "openai.gpt-oss-120b", 800, 80)
        + ledger_line(until + datetime.timedelta(minutes=5), "Chat", "proj_chat", "openai.gpt-oss-120b", 5000, 500)
    )
    (tmp_path / "b" / "usage.jsonl").write_text(
        ledger_line(second, "Chat", "proj_chat", "openai.gpt-oss-120b", 400, 40)
        + ledger_line(first, "Search", "proj_search", "openai.gpt-oss-20b", 300, 30)
        + ledger_line(second, "Search", "proj_search", "openai.gpt-oss-20b", 0, 0, refused_by="project:Search:requests_per_minute")
    )
    config = tmp_path / "mantlegate.toml"
    config.write_text(config_text())
    args = [
        "--config", str(config),
        "--since", stamp(start + datetime.timedelta(minutes=20)),  # rounded down to `start`
        "--until", stamp(until),
        "--ledger", str(tmp_path / "a" / "usage.jsonl"), str(tmp_path / "b" / "usage.jsonl"),
    ]
    return {"start": start, "until": until, "args": args}


def test_each_verdict_is_found_and_the_exit_status_says_so(tmp_path, cloudwatch, scenario):
    with enable_iam_authentication():
        out = reconcile(tmp_path, cloudwatch.reconciler, cloudwatch.url, *scenario["args"])
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout
    assert text.startswith(f"AWS/BedrockMantle in {REGION}, {stamp(scenario['start'])} .. {stamp(scenario['until'])}"), text
    assert "against 3 ledger files (4 lines in the window; 1 refused by a limit, not counted)" in text, text
    assert row(text, "Chat", "*") == ["Chat", "*", "1000", "1000", "0", "100", "100", "0", "ok"]
    assert row(text, "Chat", "openai.gpt-oss-120b")[-1] == "ok"
    assert row(text, "Search", "*") == ["Search", "*", "300", "900", "+600", "30", "30", "0", "bypass"]
    assert row(text, "Labs", "*") == ["Labs", "*", "800", "0", "-800", "80", "0", "-80", "missing"]
    assert row(text, "default", "*") == ["default", "*", "0", "70", "+70", "0", "7", "+7", "unattributed"]
    assert row(text, "(other", "projects)") == ["(other", "projects)", "*", "0", "400", "+400", "0", "40", "+40", "bypass"]
    assert "unattributed upstream: 70 input and 7 output tokens in the `default` project" in text
    assert "note: window: 2 whole hours" in text
    assert "note: CloudWatch's Project dimension named projects by id (2 found)" in text

    # Paged: one batch of queries, read over several pages, every page asked with the same queries.
    assert len(cloudwatch.calls) > 1 and cloudwatch.calls[0]["token"] is None
    assert all(c["queries"] == cloudwatch.calls[0]["queries"] for c in cloudwatch.calls)
    asked = cloudwatch.asked()
    for dims in [(("Project", "proj_chat"),), (("Project", "Chat"),), (("Model", "openai.gpt-oss-20b"), ("Project", "proj_search")), ()]:
        assert ("TotalInputTokens", dims) in asked and ("TotalOutputTokens", dims) in asked, dims

    with enable_iam_authentication():
        out = reconcile(tmp_path, cloudwatch.reconciler, cloudwatch.url, *scenario["args"], "--format", "json")
    assert out.returncode == 2, out.stderr
    report = json.loads(out.stdout)
    verdicts = {(r["project"], r["model"]): r["verdict"] for r in report["rows"]}
    assert verdicts == {
        ("Chat", "*"): "ok",
        ("Chat", "openai.gpt-oss-120b"): "ok",
        ("Search", "*"): "bypass",
        ("Search", "openai.gpt-oss-20b"): "bypass",
        ("Labs", "*"): "missing",
        ("Labs", "openai.gpt-oss-120b"): "missing",
        ("default", "*"): "unattributed",
        ("default", "openai.gpt-oss-120b"): "unattributed",
        ("(other projects)", "*"): "bypass",
    }
    search = next(r for r in report["rows"] if r["project"] == "Search")
    assert (search["project_id"], search["gateway"], search["aws"], search["difference"]) == (
        "proj_search", {"input": 300, "output": 30}, {"input": 900, "output": 30}, {"input": 600, "output": 0}
    )
    assert report["window"] == {"start": stamp(scenario["start"]), "end": stamp(scenario["until"]), "period_seconds": 3600, "periods": 2}
    assert (report["ok"], report["region"], report["tolerance_percent"]) == (False, REGION, 2.0)
    assert report["unattributed_upstream"] == {"input": 70, "output": 7}
    assert report["account"] == {"input": 1000 + 900 + 70 + 400, "output": 100 + 30 + 7 + 40}

    with enable_iam_authentication():
        out = reconcile(tmp_path, cloudwatch.reconciler, cloudwatch.url, *scenario["args"], "--format", "csv")
    assert out.returncode == 2, out.stderr
    assert "\nLabs,proj_labs,*,800,0,-800,80,0,-80,0,missing\n" in out.stdout, out.stdout


def test_everything_within_tolerance_exits_0(tmp_path, cloudwatch):
    """CloudWatch naming projects by name, and counting input without cached tokens: still all `ok`."""
    start = hour_floor(datetime.datetime.now(datetime.UTC).replace(tzinfo=None)) - datetime.timedelta(hours=2)
    at = start + datetime.timedelta(minutes=30)
    cloudwatch.publish(at, "Chat", "openai.gpt-oss-120b", 600 + 5, 100)
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text(ledger_line(at, "Chat", "proj_chat", "openai.gpt-oss-120b", 1000, 100, cached=400))
    config = tmp_path / "mantlegate.toml"
    config.write_text(config_text("\n[reconcile]\ntolerance = 1.0\n"))
    args = ["--config", str(config), "--since", stamp(start), "--until", stamp(start + datetime.timedelta(hours=1)), "--ledger", str(ledger)]
    with enable_iam_authentication():
        out = reconcile(tmp_path, cloudwatch.reconciler, cloudwatch.url, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert row(out.stdout, "Chat", "*") == ["Chat", "*", "600", "605", "+5", "100", "100", "0", "ok"]
    assert "within 1% of the larger" in out.stdout, "the config's tolerance"
    assert "named projects by name (1 found)" in out.stdout
    assert "compared less its cached tokens" in out.stdout
    # A tighter tolerance on the command line finds the 5 tokens.
    with enable_iam_authentication():
        out = reconcile(tmp_path, cloudwatch.reconciler, cloudwatch.url, *args, "--tolerance", "0")
    assert out.returncode == 2, out.stdout + out.stderr
    assert row(out.stdout, "Chat", "*")[-1] == "bypass"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["wrong_secret", "not_allowed", "endpoint_down", "no_credentials"])
def test_cloudwatch_that_cannot_be_read_has_its_own_exit_status(tmp_path, cloudwatch, scenario, case):
    creds = {
        "wrong_secret": aws.Creds(cloudwatch.reconciler.access_key, "not/the+secret0123456789"),
        "not_allowed": cloudwatch.bystander,
        "endpoint_down": cloudwatch.reconciler,
        "no_credentials": aws.Creds("", ""),
    }[case]
    endpoint = f"http://127.0.0.1:{closed_port()}" if case == "endpoint_down" else cloudwatch.url
    with enable_iam_authentication():
        if case == "no_credentials":
            env = aws.gateway_env(tmp_path, AWS_ENDPOINT_URL_CLOUDWATCH=endpoint)
            out = subprocess.run(
                [str(gateway_binary()), "usage", "reconcile", *scenario["args"]],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
            )
        else:
            out = reconcile(tmp_path, creds, endpoint, *scenario["args"])
    said = out.stdout + out.stderr
    assert out.returncode == 3, said
    assert out.stdout == "", "no report from half an answer"
    assert f"could not read CloudWatch (AWS/BedrockMantle in {REGION})" in out.stderr, said
    expected = {
        "wrong_secret": "SignatureDoesNotMatch",
        "not_allowed": "cloudwatch:GetMetricData",
        "endpoint_down": "Connection refused",
        "no_credentials": "no AWS credentials",
    }[case]
    assert expected in out.stderr, said
    for secret in (cloudwatch.reconciler.secret, cloudwatch.bystander.secret, creds.secret or "\0", ADMIN.secret):
        assert secret not in said


def test_serve_reconciles_on_a_schedule(request, tmp_path, cloudwatch):
    """`serve` with `[reconcile] interval`: its first run (at start) exports each row and warns of the bypass."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    end = hour_floor(now - datetime.timedelta(minutes=15))
    # Inside the lookback even if the window moves on by an hour before the gateway reads it.
    early, late = end - datetime.timedelta(minutes=90), end - datetime.timedelta(minutes=30)
    cloudwatch.publish(early, "proj_chat", "openai.gpt-oss-120b", 500, 50)
    cloudwatch.publish(late, "proj_search", "openai.gpt-oss-20b", 900, 90)
    ledger = tmp_path / "usage.jsonl"
    ledger.write_text(
        ledger_line(early, "Chat", "proj_chat", "openai.gpt-oss-120b", 500, 50)
        + ledger_line(late, "Search", "proj_search", "openai.gpt-oss-20b", 100, 10)
    )
    extra = f'\n[metering]\nledger_path = "{ledger}"\n\n[reconcile]\ninterval = "1h"\nlookback = "3h"\n'
    env = aws.gateway_env(
        tmp_path,
        **aws.static_env(cloudwatch.reconciler),
        AWS_ENDPOINT_URL_CLOUDWATCH=cloudwatch.url,
        MANTLEGATE_RECONCILE_TEST_KEY="upstream-key",
    )
    with enable_iam_authentication():
        gw = start_gateway(request, tmp_path, config_text(extra), env)
        done = gw.wait_for_log("reconciled the ledger with CloudWatch", timeout=60)
    assert done["rows"] == "3 ok, 2 bypass, 0 missing, 0 unattributed", done
    records = [r for r in map(log_record, gw.log_path.read_text().splitlines()) if r]
    bypass = [r for r in records if r.get("level") == "WARN" and r.get("project") == "Search"]
    assert bypass and "without the gateway" in bypass[0]["message"], records
    assert (bypass[0]["gateway_input"], bypass[0]["aws_input"]) == (100, 900)

    metrics = httpx.get(f"{gw.admin_url}/metrics", timeout=10).text
    assert 'mantlegate_reconcile_verdict{project="Search",model="*",verdict="bypass"} 1' in metrics, metrics
    assert 'mantlegate_reconcile_verdict{project="Chat",model="*",verdict="ok"} 1' in metrics
    assert 'mantlegate_reconcile_verdict{project="Chat",model="*",verdict="bypass"} 0' in metrics
    assert 'mantlegate_reconcile_tokens{project="Search",model="*",source="aws",kind="input"} 900' in metrics
    assert 'mantlegate_reconcile_tokens{project="Search",model="*",source="gateway",kind="input"} 100' in metrics
    assert 'mantlegate_reconcile_runs_total{result="discrepancies"} 1' in metrics
    log = gw.log_path.read_text()
    assert cloudwatch.reconciler.secret not in log
