#!/usr/bin/env python3
"""What rate limits and budgets cost (issue 22), in paired rounds. Run through `bench/run limits`, which
installs what is missing (redis-server among it) and builds the release binaries; see bench/README.md, "Limits".

Three arms, each mantlegate with metering and the usage ledger on, its project tagged with two tags:
  metered        no [limits] (the baseline);
  limits-memory  [limits] on the memory backend: a rule on the project (requests, input and output tokens per
                 minute, USD per day and per month), one on its CostCenter tag value and one on the caller's key,
                 all set so high that nothing is refused; a request counts against four subjects (the project,
                 both tag values, the key);
  limits-redis   the same rules on a redis-server this script starts on loopback, with the production
                 manifests' persistence (deploy/kubernetes/overlays/central-gateway/redis.conf).
Both limits arms set on_backend_error = "deny", so a request the backend fails to admit is a 503 and stops the
run, rather than being let through unreserved and making the arm look cheaper than it is.

Each round, in an order that rotates round by round: metered and limits-memory at saturation (wrk, JSON, then
SSE; limits-redis too with --saturate-redis), then every arm at each fixed rate (bench_client rate, open loop,
latency counted from when each request was due). The report gives medians over rounds; ratios and added
latencies are paired within a round, then the median taken.
CPU is the arm's own processes: for limits-redis, the gateway and redis-server together (and the gateway alone).

Usage: bench/limits.py [--smoke] [--rounds N] [--seconds S] [--rates R...] [--rate-seconds S] [--arms A...]
                       [--workloads json sse] [--saturate-redis] [--binary MANTLEGATE]
"""

import argparse
import dataclasses
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import compare as c

ARMS = ["metered", "limits-memory", "limits-redis"]
TAGS = 'tags = { CostCenter = "CC-BENCH", Team = "Bench" }'
# High enough that nothing is ever refused, and low enough that spend in nano-USD stays exact in Redis's Lua
# (doubles: 2^53 nano-USD is about $9M).
HUGE = 1_000_000_000_000
RULES = f"""
[[limits.rules]]
project = "Bench"
requests_per_minute = {HUGE}
input_tokens_per_minute = {HUGE}
output_tokens_per_minute = {HUGE}
usd_per_day = 100000.0
usd_per_month = 1000000.0
[[limits.rules]]
tag = {{ CostCenter = "CC-BENCH" }}
requests_per_minute = {HUGE}
output_tokens_per_minute = {HUGE}
usd_per_month = 1000000.0
[[limits.rules]]
key = "bench"
requests_per_minute = {HUGE}
input_tokens_per_minute = {HUGE}
"""
# The production manifests' persistence (append-only file fsynced every second, RDB snapshots), on loopback.
REDIS_CONF = """
bind 127.0.0.1
protected-mode yes
appendonly yes
appendfsync everysec
aof-use-rdb-preamble yes
save 3600 1 300 100 60 10000
stop-writes-on-bgsave-error yes
maxmemory-policy noeviction
"""


def limits_config(backend: str) -> str:
    return f'[limits]\nbackend = {backend}\non_backend_error = "deny"\ninstance = "bench"\n{RULES}'


class Redis:
    """A redis-server of the benchmark's own, on a free loopback port, its data in the work directory."""

    def __init__(self, work: Path):
        if not shutil.which("redis-server"):
            sys.exit("redis-server is needed: run through `bench/run limits`, or apt-get install redis-server")
        self.port = c.free_port()
        data = work / "redis"
        data.mkdir()
        conf = data / "redis.conf"
        conf.write_text(f"port {self.port}\ndir {data}\n{REDIS_CONF}")
        self.proc = c.Started(work, "redis", ["redis-server", str(conf)], r"Ready to accept connections")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def info(self) -> dict:
        """What INFO says of memory, keys, commands, CPU, and the scripts' calls and time (`evalsha`)."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), "info", "all"], capture_output=True,
                             text=True).stdout
        pick = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out, re.M)) else 0  # noqa: E731
        stats = {"used_memory": pick(r"^used_memory:(\d+)"), "keys": pick(r"^db0:keys=(\d+)"),
                 "commands": pick(r"^total_commands_processed:(\d+)"), "aof_rewrites": pick(r"^aof_rewrites:(\d+)"),
                 "cpu_s": float(re.search(r"^used_cpu_sys:([\d.]+)", out, re.M).group(1)) +
                 float(re.search(r"^used_cpu_user:([\d.]+)", out, re.M).group(1))}
        for cmd in ("evalsha", "eval"):
            match = re.search(rf"^cmdstat_{cmd}:calls=(\d+),usec=(\d+)", out, re.M)
            if match:
                stats[f"{cmd}_calls"], stats[f"{cmd}_usec"] = int(match.group(1)), int(match.group(2))
        return stats


def start(bench: c.Bench, name: str, redis, binary=None) -> c.Arm:
    if name == "limits-memory":
        extra = limits_config('"memory"')
    elif name == "limits-redis":
        extra = limits_config(f'"redis"\nredis_url = "{redis.url}"')
    else:
        extra = ""
    proc = bench.start_gateway(name, "", metered=True, binary=binary, project=TAGS, extra=extra)
    arm = c.Arm(name, f"http://{proc.match.group(1)}", {"Authorization": f"Bearer {c.CALLER_KEY}"}, [proc])
    if name == "limits-redis":
        arm.procs.append(redis.proc)
    arm.admin = re.search(r'"admin_addr":"([^"]+)"', proc.log.read_text()).group(1)
    c.check(arm)
    return arm


def counted(arm: c.Arm) -> str:
    """The arm's limits as /limits shows them: proof that its requests were counted."""
    if arm.name == "metered":
        return ""
    with urllib.request.urlopen(f"http://{arm.admin}/limits", timeout=10) as response:
        return response.read().decode()


def run(args, settings, work: Path) -> list:
    bench = c.Bench(work, settings)
    redis = Redis(work) if "limits-redis" in args.arms else None
    saturated = [name for name in args.arms if name != "limits-redis" or args.saturate_redis]
    rounds = []
    try:
        before = redis.info() if redis else None
        arms = [start(bench, name, redis, args.binary) for name in args.arms]
        for round_ in range(args.rounds):
            cells = {arm.name: {} for arm in arms}
            for arm in c.rotate([a for a in arms if a.name in saturated], round_):
                for workload in args.workloads:
                    gateway0, total0 = c.cpu_seconds(arm.procs[0].pids()), c.cpu_seconds(arm.pids())
                    out = c.saturate(bench, arm, workload)
                    share = (c.cpu_seconds(arm.procs[0].pids()) - gateway0) / (c.cpu_seconds(arm.pids()) - total0)
                    out["gateway_cpu_per_10k"] = out["cpu_per_10k"] * share
                    cells[arm.name][workload] = out
            for arm in c.rotate(arms, round_):
                for rate in settings.rates:
                    cells[arm.name][f"rate{rate}"] = c.fixed_rate(bench, arm, rate)
            rounds.append(cells)
            print(f"round {round_ + 1}/{args.rounds}: " + "; ".join(
                f"{name} " + ", ".join([f"{w} {cell[w]['rps']:.0f}/s" for w in args.workloads if w in cell] +
                                       [f"{r}/s p99 {cell[f'rate{r}']['p99']:.3f} ms" for r in settings.rates])
                for name, cell in cells.items()), flush=True)
        for arm in arms:
            shown = counted(arm)
            if shown:
                print(f"{arm.name} /limits after the run:\n{shown}")
        if redis:
            after = redis.info()
            requests = max(after.get("evalsha_calls", 0) / 2, 1)  # an admission and a settle each
            print(f"redis after the run: {after}; per request (admission and settle): "
                  f"{(after['used_memory'] - before['used_memory']) / requests:.0f} bytes of memory kept, "
                  f"{(after['keys'] - before['keys']) / requests:.2f} keys, "
                  f"{(after['commands'] - before['commands']) / requests:.0f} commands, "
                  f"{after.get('evalsha_usec', 0) / requests:.0f} µs in the scripts, "
                  f"{(after['cpu_s'] - before['cpu_s']) / requests * 1e6:.0f} µs of Redis's CPU in all")
    finally:
        bench.close()
        if redis:
            redis.proc.stop()
    return rounds


def report(args, settings, rounds: list):
    med = statistics.median
    arms = args.arms
    base = arms[0]
    print(f"\n{len(rounds)} paired rounds; wrk -t2 -c{settings.connections}, {settings.saturation_seconds} s a cell; "
          f"fixed rates {settings.rate_seconds} s a cell. Medians over rounds; ratios paired within a round.\n")
    for w in args.workloads:
        print(f"| {w.upper()} at saturation | req/s | vs {base} (rounds) | CPU s per 10k | vs {base} | "
              "gateway alone, CPU s per 10k |")
        print("|---|---|---|---|---|---|")
        for name in [name for name in arms if w in rounds[0][name]]:
            rps = [r[name][w]["rps"] for r in rounds]
            ratios = [r[name][w]["rps"] / r[base][w]["rps"] for r in rounds]
            cpu = [r[name][w]["cpu_per_10k"] for r in rounds]
            cpu_ratio = [r[name][w]["cpu_per_10k"] / r[base][w]["cpu_per_10k"] for r in rounds]
            gateway = [r[name][w]["gateway_cpu_per_10k"] for r in rounds]
            print(f"| {name} | {med(rps):.0f} | {med(ratios):.3f}x ({min(ratios):.2f}x to {max(ratios):.2f}x) | "
                  f"{med(cpu):.3f} | {med(cpu_ratio):.3f}x | {med(gateway):.3f} |")
        print()
    for rate in settings.rates:
        key = f"rate{rate}"
        print(f"| {rate} requests/s, ms | achieved req/s | p50 | p99 | p99.9 | added p50 vs {base} | "
              f"added p99 vs {base} | added p99.9 |")
        print("|---|---|---|---|---|---|---|---|")
        for name in arms:
            q = {p: med(r[name][key][p] for r in rounds) for p in ("rps", "p50", "p99", "p99_9")}
            added = {p: med(r[name][key][p] - r[base][key][p] for r in rounds) for p in ("p50", "p99", "p99_9")}
            print(f"| {name} | {q['rps']:.0f} | {q['p50']:.3f} | {q['p99']:.3f} | {q['p99_9']:.3f} | "
                  f"{added['p50']:+.3f} | {added['p99']:+.3f} | {added['p99_9']:+.3f} |")
        if "limits-redis" in arms and "limits-memory" in arms:
            d = {p: [r["limits-redis"][key][p] - r["limits-memory"][key][p] for r in rounds] for p in ("p50", "p99")}
            print(f"\nRedis over memory at {rate}/s: p50 {med(d['p50']):+.3f} ms (rounds {min(d['p50']):+.3f} to "
                  f"{max(d['p50']):+.3f}), p99 {med(d['p99']):+.3f} ms (rounds {min(d['p99']):+.3f} to "
                  f"{max(d['p99']):+.3f})")
        print()
    if "limits-memory" in arms and "json" in args.workloads:
        cost = 1 - med(r["limits-memory"]["json"]["rps"] / r[base]["json"]["rps"] for r in rounds)
        verdict = "met" if cost <= 0.10 else "MISSED"
        print(f"target, limits on the memory backend within 10% of {base}'s JSON throughput: {cost * 100:.1f}% "
              f"({verdict})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short round of everything (seconds)")
    parser.add_argument("--rounds", type=int, help="paired rounds (default 8, or 1 with --smoke)")
    parser.add_argument("--seconds", type=int, help="wrk's time per arm and workload (default 4)")
    parser.add_argument("--rates", type=int, nargs="+", help="fixed rates, requests/s (default 200 500)")
    parser.add_argument("--saturate-redis", action="store_true",
                        help="limits-redis at saturation too (on a 2-core machine Redis then answers too late)")
    parser.add_argument("--rate-seconds", type=int, help="time per arm and rate (default 10)")
    parser.add_argument("--workloads", nargs="+", choices=["json", "sse"], default=["json", "sse"])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS, help="the first is the baseline")
    parser.add_argument("--binary", help="the mantlegate binary to measure (default: this tree's release build)")
    args = parser.parse_args()
    preset = c.SMOKE if args.smoke else dataclasses.replace(c.FULL, saturation_seconds=4)
    settings = dataclasses.replace(preset, saturation_seconds=args.seconds or preset.saturation_seconds,
                                   rates=args.rates or ([200] if args.smoke else [200, 500]),
                                   rate_seconds=args.rate_seconds or preset.rate_seconds)
    args.rounds = args.rounds or (1 if args.smoke else 8)
    with tempfile.TemporaryDirectory(prefix="mantlegate-limits-") as work:
        rounds = run(args, settings, Path(work))
    report(args, settings, rounds)


if __name__ == "__main__":
    main()
