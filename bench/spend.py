#!/usr/bin/env python3
"""The spend page on a month of ledger: how long the gateway takes to read it at start, what the index costs in
memory, and how fast the page's API answers, with `mantlegate usage report` over the same ledger (a re-read of
every line, which is what the index saves a page view) beside it.

    bench/spend.py [--lines 1000000] [--rounds 30] [--keep DIR]

Two parts, each on a ledger of --lines lines as the gateway leaves them (rotated files for past days, usage.jsonl
for the last; a few lines of the day before the month, which the index must skip):

1. End to end, this month so far: starts `mantlegate serve` (target/release) on it with no upstream (the index
   needs none), waits for the index to be read, then times each API call the page makes over HTTP.
2. The index alone on last month whole (every hour of a month in it, whatever today's date):
   examples/bench_spend reads it as of that month's last second and times each query the page makes.

Prints a Markdown report; bench/README.md keeps the last run's. `bench/run spend` builds what it needs first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEAMS = ["CustomerExperience", "Discovery", "Platform", "Payments", "Risk"]
MODELS = {  # USD per 1M tokens, input / output
    "openai.gpt-oss-120b": (0.15, 0.60),
    "openai.gpt-oss-20b": (0.075, 0.30),
    "openai.gpt-5.4": (2.75, 16.50),
    "openai.gpt-5.5": (5.50, 33.00),
}
PROJECTS = [
    {
        "name": f"App{i:02d}-{env}",
        "id": f"proj_{i:02d}{env[0].lower()}",
        "tags": {"Application": f"App{i:02d}", "CostCenter": f"CC-{1000 + i % 7}", "Environment": env,
                 "Team": TEAMS[i % len(TEAMS)]},
    }
    for i in range(10)
    for env in ("Production", "Development")
]
KEYS = [(f"key-{k:02d}", PROJECTS[k % len(PROJECTS)]) for k in range(40)]


def generate(directory: Path, lines: int, now: dt.datetime) -> None:
    """`lines` ledger lines from the start of `now`'s month (less a few from the day before it) up to `now`."""
    rng = random.Random(7)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = month - dt.timedelta(minutes=30)
    span = (now - start).total_seconds()
    files: dict[str, object] = {}
    today = now.strftime("%Y-%m-%d")
    try:
        for i in range(lines):
            at = start + dt.timedelta(seconds=span * i / lines)
            day = at.strftime("%Y-%m-%d")
            name = "usage.jsonl" if day == today else f"usage.{day}.jsonl"
            if name not in files:
                files[name] = open(directory / name, "w", encoding="utf-8")
            key, project = KEYS[rng.randrange(len(KEYS))]
            model = rng.choice(list(MODELS))
            input_tokens, output_tokens = rng.randrange(50, 8000), rng.randrange(10, 2000)
            price_in, price_out = MODELS[model]
            line = {
                "time": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
                "request_id": f"{i:016x}",
                "key": key,
                "route": "chat.completions",
                "model": model,
                "stream": i % 2 == 0,
                "status": 200,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cached_input_tokens": 0,
                "reasoning_tokens": 0,
                "cost_usd": round((input_tokens * price_in + output_tokens * price_out) / 1e6, 12),
                "duration_ms": 812.5,
                "ttfb_ms": 120.25,
                "complete": True,
                "project": project["name"],
                "project_id": project["id"],
                "tags": dict(sorted(project["tags"].items())),
            }
            files[name].write(json.dumps(line, separators=(",", ":")) + "\n")
    finally:
        for f in files.values():
            f.close()


def config(directory: Path) -> str:
    text = f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "http://127.0.0.1:9"
auth = "passthrough"
[callers]
auth = "none"
[metering]
ledger_path = "{directory / 'usage.jsonl'}"
[taxonomy]
required_tags = ["Team", "CostCenter", "Environment", "Application"]
"""
    for p in PROJECTS:
        tags = ", ".join(f'{k} = "{v}"' for k, v in p["tags"].items())
        text += f'\n[[projects]]\nname = "{p["name"]}"\nid = "{p["id"]}"\ntags = {{ {tags} }}\n'
    return text


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as res:
        return res.read()


def rss_mib(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of `pid`, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def timed(call, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        out.append((time.perf_counter() - began) * 1000)
    return out


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"{statistics.median(ms):.2f} | {ms[int(len(ms) * 0.95) - 1]:.2f} | {ms[-1]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "mantlegate")
    parser.add_argument("--example", type=Path, default=ROOT / "target" / "release" / "examples" / "bench_spend")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="write the ledger here and leave it (default: a temporary dir)")
    args = parser.parse_args()

    directory = args.keep or Path(tempfile.mkdtemp(prefix="mantlegate-spend-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    began = time.perf_counter()
    generate(directory, args.lines, now)
    size = sum(f.stat().st_size for f in directory.glob("usage*.jsonl"))
    print(f"ledger: {args.lines:,} lines, {size / 2**20:.0f} MiB in {len(list(directory.glob('usage*.jsonl')))} files, "
          f"written in {time.perf_counter() - began:.1f} s", flush=True)
    (directory / "gateway.toml").write_text(config(directory))

    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(args.binary), "serve", "--config", str(directory / "gateway.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "MANTLEGATE_LOG": "warn,mantlegate=info"},
    )
    try:
        admin = None
        for raw in proc.stdout:
            record = json.loads(raw)
            fields = {**record, **record.get("fields", {})}
            if fields.get("message") == "mantlegate listening":
                admin = f"http://{fields['admin_addr']}"
                break
        if admin is None:
            raise SystemExit("the gateway did not start")
        listening = time.perf_counter() - started
        deadline = time.monotonic() + 600
        while True:
            index = json.loads(get(f"{admin}/api/status"))["index"]
            if index["state"] == "ready":
                break
            if index["state"] != "reading" or time.monotonic() > deadline:
                raise SystemExit(f"the index did not get ready: {index}")
            time.sleep(0.05)  # polling the index's state, with a deadline
        ready = time.perf_counter() - started
        rss, peak = rss_mib(proc.pid)
        status = json.loads(get(f"{admin}/api/status"))
        month, today = status["month"], status["today"]
        calls = {
            "`/api/spend?group_by=project` (month)": f"/api/spend?group_by=project&since={month}",
            "`/api/spend?group_by=tag:Team` (month)": f"/api/spend?group_by=tag:Team&since={month}",
            "`/api/spend?group_by=model` (today)": f"/api/spend?group_by=model&since={today}",
            "`/api/spend?group_by=key` (month)": f"/api/spend?group_by=key&since={month}",
            "`/api/spend.csv?group_by=tag:CostCenter`": f"/api/spend.csv?group_by=tag:CostCenter&since={month}",
            "`/api/spend/daily`": "/api/spend/daily",
            "`/api/status`": "/api/status",
            "`/api/live`": "/api/live",
            "`/` (the page)": "/",
        }
        rows = []
        for title, path in calls.items():
            get(admin + path)
            rows.append((title, summary(timed(lambda: get(admin + path), args.rounds))))
        refresh = ["/api/status", f"/api/spend?group_by=tag:Team&since={today}",
                   f"/api/spend?group_by=tag:Team&since={month}", "/api/spend/daily"]
        rows.append(("a page refresh (the 4 calls above it makes)",
                     summary(timed(lambda: [get(admin + p) for p in refresh], args.rounds))))
    finally:
        proc.kill()
        proc.wait()

    began = time.perf_counter()
    subprocess.run([str(args.binary), "usage", "report", "--ledger", str(directory / "usage.jsonl"), "--group-by",
                    "Team", "--since", month, "--format", "json"], check=True, capture_output=True)
    report = time.perf_counter() - began

    print(f"\nstart to listening: {listening * 1000:.0f} ms; start to index ready: {ready:.2f} s "
          f"(the index's own reading: {index['took_ms']} ms, {index['lines']:,} lines, {index['skipped']} skipped)")
    print(f"memory once read: {rss:.0f} MiB resident, {peak:.0f} MiB peak")
    print(f"`mantlegate usage report --group-by Team --since {month[:10]}` over the same ledger: {report:.2f} s\n")
    print(f"| call ({args.rounds} in a row) | p50 ms | p95 ms | max ms |\n|---|---|---|---|")
    for title, line in rows:
        print(f"| {title} | {line} |")

    # 2. The index alone, on last month whole.
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_second = month_start - dt.timedelta(seconds=1)
    whole = directory / "last-month"
    whole.mkdir(exist_ok=True)
    generate(whole, args.lines, last_second)
    print(f"\nthe index alone on {last_second:%Y-%m} whole ({args.lines:,} lines), as of {last_second:%Y-%m-%dT%H:%M:%SZ}:",
          flush=True)
    out = subprocess.run([str(args.example), str(whole / "usage.jsonl"), last_second.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          str(args.rounds)], check=True, capture_output=True, text=True)
    print(out.stdout, end="")
    if not args.keep:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
