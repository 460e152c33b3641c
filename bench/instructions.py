#!/usr/bin/env python3
"""Instructions per request under callgrind, for nginx, the floor, mantlegate and mantlegate with metering.

    bench/instructions.py            # needs valgrind, nginx and the release build bench/run makes
    bench/instructions.py --binary OTHER mantlegate metered   # another build, chosen arms; profiles kept
    bench/instructions.py tagged limits-memory limits-redis   # bench/limits.py's arms

Instruction counts do not depend on what else the machine is doing, so they compare arms repeatably where
wall-clock throughput on a shared 2-core machine does not. Each arm runs alone under
`valgrind --tool=callgrind` with instrumentation switched on only after a warm-up: nginx with one worker
and no master process, mantlegate and the floor with one traffic thread. One keep-alive connection sends
the requests one after another, against the same mock upstream `bench/run` uses. The tables in
bench/README.md (from the third round on) were made with this script.
"""

import argparse
import http.client
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as c  # noqa: E402
import limits  # noqa: E402

WARMUP = 50
# bench/limits.py's arms, the project tagged as there: tagged (its baseline), limits-memory and limits-redis
# (on a redis-server started here; its own instructions are not counted).
LIMITS_ARMS = ("tagged", "limits-memory", "limits-redis")
REDIS = None
BINARY = c.RELEASE / "mantlegate"
REQUESTS = {"json": 2000, "sse": 1000}


def start(bench: "c.Bench", arm: str, out: Path):
    """Starts the arm under callgrind, instrumentation off; returns (process, address)."""
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if arm == "nginx":
        port = c.free_port()
        work = bench.work / "nginx-cg"
        work.mkdir(exist_ok=True)
        conf = bench.nginx_config(work, f"127.0.0.1:{port}", 1024)
        conf = conf.replace("worker_processes 2;", "worker_processes 1;\nmaster_process off;")
        (work / "nginx.conf").write_text(conf)
        proc = c.Started(bench.work, f"cg-{arm}", callgrind + ["nginx", "-p", str(work), "-e", str(work / "e.log"),
                                                              "-c", str(work / "nginx.conf")], r"")
        addr = f"127.0.0.1:{port}"
        c.wait_listening(proc, addr)
        return proc, addr
    if arm == "floor":
        proc = c.Started(bench.work, f"cg-{arm}", callgrind + bench.floor_cmd(threads="1"), r"listening on (\S+)")
        return proc, proc.match.group(1)
    config = bench.work / f"config-cg-{arm}" / f"cg-{arm}.toml"
    config.parent.mkdir(exist_ok=True)
    if arm in LIMITS_ARMS:
        text = bench.gateway_config(True, f"usage-cg-{arm}.jsonl", server="workers = 1", project=limits.TAGS,
                                    extra=limits_config(bench, arm))
    else:
        text = bench.gateway_config(arm == "metered", "usage-cg.jsonl", server="workers = 1")
    config.write_text(text)
    proc = c.Started(bench.work, f"cg-{arm}", callgrind + [str(BINARY), "serve", "--config", str(config)],
                     r'"addr":"([^"]+)"', env={"BENCH_UPSTREAM_KEY": c.UPSTREAM_KEY})
    return proc, proc.match.group(1)


def limits_config(bench: "c.Bench", arm: str) -> str:
    """bench/limits.py's arms: `tagged` is its baseline (metered, the project tagged, no limits)."""
    global REDIS
    if arm == "limits-memory":
        return limits.limits_config('"memory"')
    if arm == "limits-redis":
        REDIS = REDIS or limits.Redis(bench.work)
        return limits.limits_config(f'"redis"\nredis_url = "{REDIS.url}"')
    return ""


def send(addr: str, body: bytes, count: int):
    conn = http.client.HTTPConnection(addr, timeout=60)
    for _ in range(count):
        conn.request("POST", c.CHAT, body, {"Authorization": f"Bearer {c.CALLER_KEY}",
                                             "Content-Type": "application/json"})
        res = conn.getresponse()
        res.read()
        if res.status != 200:
            sys.exit(f"{addr}: status {res.status}")
    conn.close()


def measure(bench: "c.Bench", arm: str, workload: str) -> float:
    out = bench.work / f"callgrind-{arm}-{workload}.out"
    proc, addr = start(bench, arm, out)
    body = (c.JSON_BODY if workload == "json" else c.SSE_BODY).encode()
    count = REQUESTS[workload]
    send(addr, body, WARMUP)
    subprocess.run(["callgrind_control", "-i", "on", str(proc.proc.pid)], check=True, capture_output=True)
    send(addr, body, count)
    subprocess.run(["callgrind_control", "-i", "off", str(proc.proc.pid)], check=True, capture_output=True)
    # The profile is written as the process exits, which under valgrind can take a while.
    proc.proc.terminate()
    proc.proc.wait(timeout=300)
    total = int(re.search(r"^totals:\s+(\d+)", out.read_text(), re.M).group(1))
    return total / count


def main():
    global BINARY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", help="the mantlegate binary to measure (default: this tree's release build)")
    parser.add_argument("arms", nargs="*", default=["nginx", "floor", "mantlegate", "metered"])
    args = parser.parse_args()
    BINARY = Path(args.binary) if args.binary else BINARY
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"{tool} is needed (apt-get install valgrind nginx-light)")
    work = Path(tempfile.mkdtemp(prefix="mantlegate-cg-"))
    bench = c.Bench(work, c.FULL)
    try:
        print("| instructions per request (callgrind) | JSON | SSE, 20 events |")
        print("|---|---|---|")
        for arm in args.arms:
            counts = [measure(bench, arm, workload) for workload in ("json", "sse")]
            print(f"| {arm} | {counts[0]:,.0f} | {counts[1]:,.0f} |", flush=True)
    finally:
        bench.close()
        if REDIS:
            REDIS.proc.stop()
    print(f"profiles: {work}/callgrind-*.out")


if __name__ == "__main__":
    main()
