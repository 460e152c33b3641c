#!/usr/bin/env python3
"""Paired saturation rounds: the arms named, each measured with wrk in every round, in an order that rotates
round by round, so that machine noise hits all alike. Prints each round's requests per second, then per arm the
median throughput and CPU per request against the first arm named (nginx, if named), with user and system
microseconds per request. This is how bench/README.md's side-by-side comparisons were made; bench/run does
the full report.

Arms: direct, nginx, mantlegate, metered, floor (examples/bench_floor.rs), rawfloor (examples/bench_rawfloor.rs,
JSON only) and nolog (mantlegate with its access lines off); with --base BINARY (another build of mantlegate,
e.g. one made at an earlier commit and copied aside), also base and basemetered, that binary as the mantlegate
and metered arms. Build first, as bench/run does:
  cargo build --release --bin mantlegate
  cargo build --release --example bench_upstream --example bench_client --example bench_floor --example bench_rawfloor

With --idle N, each round measures resident memory per idle stream instead: every arm freshly started, one
request of each kind, then N streams held open (compare.py's memory phase).

Usage: bench/paired.py [--rounds N] [--seconds S] [--workload json|sse] [--base BINARY] [--idle N] ARM...
"""

import argparse
import dataclasses
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import compare as c

NOLOG = {"MANTLEGATE_LOG": "info,mantlegate::access=off"}


def user_system(pids) -> tuple:
    """The processes' user and system CPU seconds so far."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / c.CLK_TCK, system / c.CLK_TCK


def start(bench: c.Bench, name: str, workload: str, base=None, tag: str = "") -> c.Arm:
    if name in ("base", "basemetered"):
        if not base:
            sys.exit(f"arm {name!r} needs --base BINARY")
        proc = bench.start_gateway(name, tag, metered=name == "basemetered", binary=base)
        arm = c.Arm(name, f"http://{proc.match.group(1)}", {"Authorization": f"Bearer {c.CALLER_KEY}"}, [proc])
        c.check(arm)
        return arm
    if name == "rawfloor":
        if workload != "json":
            sys.exit("rawfloor handles the JSON workload only")
        arm = bench.start_arm("floor", tag="-raw", program="bench_rawfloor")
        arm.name = name
        # Its answers are checked by `saturate`, which stops at the first non-2xx response.
        return arm
    if name == "nolog":
        arm = bench.start_arm("mantlegate", tag="-nolog", env=NOLOG)
        arm.name = name
    elif name in c.SATURATED:
        arm = bench.start_arm(name)
    else:
        sys.exit(f"unknown arm {name!r}")
    c.check(arm)
    return arm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=4, help="wrk's time per arm and round")
    parser.add_argument("--workload", choices=["json", "sse"], default="json")
    parser.add_argument("--base", help="another mantlegate binary, for the base and basemetered arms")
    parser.add_argument("--idle", type=int, help="measure memory per idle stream with this many streams")
    parser.add_argument("arms", nargs="+")
    args = parser.parse_args()
    settings = dataclasses.replace(c.FULL, saturation_seconds=args.seconds)
    if args.idle:
        return idle(args, settings)
    with tempfile.TemporaryDirectory(prefix="mantlegate-paired-") as work:
        bench = c.Bench(Path(work), settings)
        try:
            arms = [start(bench, name, args.workload, args.base) for name in args.arms]
            rps = {arm.name: [] for arm in arms}
            cpu = {arm.name: [] for arm in arms}
            user = {arm.name: [] for arm in arms}
            system = {arm.name: [] for arm in arms}
            for round_ in range(args.rounds):
                for arm in c.rotate(arms, round_):
                    user0, system0 = user_system(arm.pids())
                    out = c.saturate(bench, arm, args.workload)
                    user1, system1 = user_system(arm.pids())
                    requests = out["rps"] * args.seconds
                    rps[arm.name].append(out["rps"])
                    cpu[arm.name].append(out["cpu_per_10k"])
                    user[arm.name].append((user1 - user0) / requests * 1e6)
                    system[arm.name].append((system1 - system0) / requests * 1e6)
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rps.items()), flush=True)
        finally:
            bench.close()
    base = "nginx" if "nginx" in rps else args.arms[0]
    for name in rps:
        ratios = [a / b for a, b in zip(rps[name], rps[base])]
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu[name], cpu[base]))
        print(f"{name}: {statistics.median(rps[name]):.0f} requests/s, {statistics.median(ratios):.3f}x {base} "
              f"(rounds {min(ratios):.2f}x to {max(ratios):.2f}x); CPU per request {cpu_ratio:.2f}x {base}'s; "
              f"user {statistics.median(user[name]):.1f} µs, system {statistics.median(system[name]):.1f} µs a request")


def idle(args, settings):
    """Memory per idle stream, each arm freshly started in every round, in rotating order."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    count = c.max_idle_streams(args.idle)
    per_stream = {name: [] for name in args.arms}
    with tempfile.TemporaryDirectory(prefix="mantlegate-paired-") as work:
        bench = c.Bench(Path(work), settings)
        try:
            for round_ in range(args.rounds):
                for name in c.rotate(args.arms, round_):
                    # Started and checked (one request of each kind), as compare.py's memory phase does.
                    arm = start(bench, name, "json", args.base, tag=f"-idle{round_}")
                    out = c.idle_memory(bench, arm, count)
                    bench.stop_arm(arm)
                    per_stream[name].append(out["per_stream_kib"])
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {v[-1]:.2f} KiB" for n, v in per_stream.items()),
                      flush=True)
        finally:
            bench.close()
    for name, values in per_stream.items():
        print(f"{name}: {statistics.median(values):.2f} KiB per idle stream ({count} streams; rounds "
              f"{min(values):.2f} to {max(values):.2f})")


if __name__ == "__main__":
    main()
