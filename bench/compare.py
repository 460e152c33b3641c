#!/usr/bin/env python3
"""mantlegate side by side with nginx doing the same job, on loopback. Run through `bench/run`, which
installs the tools and builds the binaries; see bench/README.md for the method.

Four arms, measured in the same run and interleaved round by round so that machine noise hits all alike:
  direct     the load generator talks to the mock upstream itself (sending the upstream key and project);
  nginx      nginx maps the caller's key to the project header and swaps in the upstream key;
  mantlegate the gateway, metering off;
  metered    the gateway, metering on (Prometheus series and the usage ledger).
and, at saturation only, a reference:
  floor      examples/bench_floor.rs, the least a hyper proxy on mantlegate's threading does for nginx's job:
             how much of the distance to nginx belongs to the HTTP stack rather than to the gateway.
"""

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
CLK_TCK = os.sysconf("SC_CLK_TCK")

CALLER_KEY = "bench-caller-key"
UPSTREAM_KEY = "bench-upstream-key"
PROJECT = "proj_bench"
CHAT = "/v1/chat/completions"
JSON_BODY = '{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"Hello there"}]}'
SSE_BODY = '{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"Hello there"}]}'
ARMS = ["direct", "nginx", "mantlegate", "metered"]
GATEWAYS = ARMS[1:]
FLOOR = "floor"
SATURATED = ARMS + [FLOOR]


@dataclass
class Settings:
    rounds: int
    saturation_seconds: int
    connections: int
    rates: list
    rate_seconds: int
    sse_streams: int
    sse_events: int
    sse_gap_us: int
    idle_streams: list


FULL = Settings(rounds=5, saturation_seconds=5, connections=32, rates=[500, 2000], rate_seconds=10,
                sse_streams=200, sse_events=20, sse_gap_us=2000, idle_streams=[1000, 10000])
SMOKE = Settings(rounds=1, saturation_seconds=1, connections=8, rates=[200], rate_seconds=1,
                 sse_streams=8, sse_events=5, sse_gap_us=1000, idle_streams=[100])


# ---------------------------------------------------------------------------------------------------------
# Processes


class Started:
    """A process started by the benchmark, whose output goes to a file in the work directory."""

    def __init__(self, work: Path, name: str, cmd: list, ready: str, env=None):
        self.log = work / f"{name}.out"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=work)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log.read_text()
            match = re.search(ready, text)
            if match:
                self.match = match
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        sys.exit(f"{name} did not start:\n{self.log.read_text()}")

    def pids(self) -> list:
        """The process and its children (nginx's workers)."""
        pids = [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            children = []
        return pids + [int(c) for c in children]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)  # none in a child that has exited (redis's snapshot fork)
        total += int(rss.group(1)) if rss else 0
    return total


@dataclass
class Arm:
    name: str
    url: str  # base, no path
    headers: dict
    procs: list = field(default_factory=list)  # what is measured for CPU and memory

    def pids(self):
        return [pid for p in self.procs for pid in p.pids()]


class Bench:
    def __init__(self, work: Path, settings: Settings):
        self.work = work
        self.settings = settings
        self.upstream = Started(work, "upstream", [str(RELEASE / "examples/bench_upstream"), "127.0.0.1:0",
                                                   UPSTREAM_KEY, PROJECT], r"listening on (\S+)")
        self.upstream_addr = self.upstream.match.group(1)
        self.started = []

    def start_arm(self, name: str, tag: str = "", env=None, program: str = "bench_floor") -> Arm:
        """Starts an arm; `env` adds to a gateway's environment, `program` names the floor's example."""
        caller = {"Authorization": f"Bearer {CALLER_KEY}"}
        if name == "direct":
            return Arm(name, f"http://{self.upstream_addr}",
                       {"Authorization": f"Bearer {UPSTREAM_KEY}", "OpenAI-Project": PROJECT}, [self.upstream])
        if name == "nginx":
            proc = self.start_nginx(tag)
            return Arm(name, f"http://{proc.addr}", caller, [proc])
        if name == "floor":
            proc = self.start_floor(tag, program)
            return Arm(name, f"http://{proc.match.group(1)}", caller, [proc])
        proc = self.start_gateway(name, tag, env)
        return Arm(name, f"http://{proc.match.group(1)}", caller, [proc])

    def gateway_config(self, metered: bool, ledger: str, server: str = "", project: str = "", extra: str = "") -> str:
        """The gateway's config for the bench: the caller key mapped to the bench project, upstream the mock;
        `ledger` is the ledger file's name in the work directory (used when metered); `server` adds lines to
        `[server]`, `project` to the bench project's table, `extra` tables at the end (bench/limits.py's)."""
        sha = hashlib.sha256(CALLER_KEY.encode()).hexdigest()
        ledger_path = f'ledger_path = "{self.work}/{ledger}"' if metered else ""
        return f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server}
[upstream]
base_url = "http://{self.upstream_addr}"
api_key_env = "BENCH_UPSTREAM_KEY"
[metering]
enabled = {"true" if metered else "false"}
{ledger_path}
[[projects]]
name = "Bench"
id = "{PROJECT}"
{project}
[[keys]]
name = "bench"
sha256 = "{sha}"
project = "Bench"
{extra}"""

    def nginx_config(self, work: Path, listen: str, nofile: int) -> str:
        """bench/nginx.conf with its @...@ names filled in."""
        conf = (ROOT / "bench" / "nginx.conf").read_text()
        for name, value in {"WORK": work, "NOFILE": nofile, "CONNECTIONS": nofile - 100, "CALLER_KEY": CALLER_KEY,
                            "PROJECT": PROJECT, "UPSTREAM": self.upstream_addr, "UPSTREAM_KEY": UPSTREAM_KEY,
                            "LISTEN": listen}.items():
            conf = conf.replace(f"@{name}@", str(value))
        return conf

    def start_gateway(self, name: str, tag: str, env=None, metered=None, binary=None, **options) -> Started:
        """A mantlegate arm: `metered` defaults to whether the arm is named `metered`; `binary` to this tree's;
        `options` go to `gateway_config`."""
        # In a directory of its own: the gateway watches its config's directory, and every write to another file
        # there (this arm's log, in the work directory) would wake the watch.
        config = self.work / f"config-{name}{tag}" / f"{name}{tag}.toml"
        config.parent.mkdir(exist_ok=True)
        metered = name == "metered" if metered is None else metered
        config.write_text(self.gateway_config(metered, f"usage-{name}{tag}.jsonl", **options))
        binary = binary or RELEASE / "mantlegate"
        proc = Started(self.work, f"{name}{tag}", [str(binary), "serve", "--config", str(config)],
                       r'"addr":"([^"]+)"', env={"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})})
        self.started.append(proc)
        return proc

    def floor_cmd(self, threads: str = "", program: str = "bench_floor") -> list:
        """The floor's command line (or the raw floor's); `threads` defaults to one per CPU."""
        cmd = [str(RELEASE / "examples" / program), self.upstream_addr, CALLER_KEY, UPSTREAM_KEY, PROJECT]
        return cmd + ([threads] if threads else [])

    def start_floor(self, tag: str, program: str = "bench_floor") -> Started:
        proc = Started(self.work, f"floor{tag}", self.floor_cmd(program=program), r"listening on (\S+)")
        self.started.append(proc)
        return proc

    def start_nginx(self, tag: str) -> Started:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        work = self.work / f"nginx{tag}"
        work.mkdir()
        port = free_port()
        conf = self.nginx_config(work, f"127.0.0.1:{port}", nofile)
        (work / "nginx.conf").write_text(conf)
        proc = Started(self.work, f"nginx{tag}", ["nginx", "-p", str(work), "-e", str(work / "startup-error.log"),
                                                  "-c", str(work / "nginx.conf")], r"")
        proc.addr = f"127.0.0.1:{port}"
        wait_listening(proc, proc.addr)
        self.started.append(proc)
        return proc

    def stop_arm(self, arm: Arm):
        for proc in arm.procs:
            if proc is not self.upstream:
                proc.stop()

    def close(self):
        for proc in self.started + [self.upstream]:
            proc.stop()


def rotate(arms: list, n: int) -> list:
    """The arms in round n's order: who goes first moves round by round, so none always runs on a warmer
    (or busier) machine."""
    return arms[n % len(arms):] + arms[:n % len(arms)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: Started, addr: str):
    host, port = addr.rsplit(":", 1)
    for _ in range(500):
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if proc.proc.poll() is not None:
                break
            time.sleep(0.02)
    sys.exit(f"{proc.log} never listened on {addr}:\n{proc.log.read_text()}")


# ---------------------------------------------------------------------------------------------------------
# Measurements


def check(arm: Arm):
    """The arm answers both workloads correctly before anything is measured."""
    for body, want in ((JSON_BODY, b'"chat.completion"'), (SSE_BODY, b"data: [DONE]")):
        request = urllib.request.Request(arm.url + CHAT, data=body.encode(), headers=arm.headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = response.read()
        if want not in answer:
            sys.exit(f"{arm.name} answered wrongly: {answer[:300]!r}")


def wrk_script(arm: Arm, body: str, path: Path) -> Path:
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in arm.headers.items()]
    lines.append(f"wrk.body = '{body}'")
    path.write_text("\n".join(lines) + "\n")
    return path


def saturate(bench: Bench, arm: Arm, workload: str) -> dict:
    """wrk for a fixed time: requests per second, the arm's CPU per request, its resident memory at peak."""
    s = bench.settings
    script = wrk_script(arm, JSON_BODY if workload == "json" else SSE_BODY, bench.work / f"{arm.name}-{workload}.lua")
    pids = arm.pids()
    cpu_before = cpu_seconds(pids)
    wrk = subprocess.Popen(["wrk", "-t2", f"-c{s.connections}", f"-d{s.saturation_seconds}s", "-s", str(script),
                            arm.url + CHAT], stdout=subprocess.PIPE, text=True)
    peak = 0
    while wrk.poll() is None:
        peak = max(peak, rss_kib(pids))
        time.sleep(0.1)
    out = wrk.stdout.read()
    cpu = cpu_seconds(pids) - cpu_before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        sys.exit(f"{arm.name} {workload}: errors under load:\n{out}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "cpu_per_10k": cpu / requests * 10_000, "rss_peak_kib": peak}


def fixed_rate(bench: Bench, arm: Arm, rate: int) -> dict:
    """Non-streamed requests at a fixed rate, open loop, latency counted from when each request was due."""
    out = client(arm, "rate", "--rate", str(rate), "--seconds", str(bench.settings.rate_seconds))
    if out["errors"]:
        sys.exit(f"{arm.name} at {rate}/s: {out['errors']} errors")
    return {**out["latency_ms"], "rps": out["rps"]}


def client(arm: Arm, mode: str, *args) -> dict:
    cmd = [str(RELEASE / "examples/bench_client"), mode, arm.url + CHAT, *args]
    for k, v in arm.headers.items():
        cmd += ["-H", f"{k}: {v}"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def streams(bench: Bench, arm: Arm) -> dict:
    s = bench.settings
    return client(arm, "stream", "--streams", str(s.sse_streams), "--concurrency", "4",
                  "-H", f"x-bench-events: {s.sse_events}", "-H", f"x-bench-gap-us: {s.sse_gap_us}")


def idle_memory(bench: Bench, arm: Arm, count: int) -> dict:
    """Resident memory with `count` streams open and idle, against the same process just before."""
    before = rss_kib(arm.pids())
    cmd = [str(RELEASE / "examples/bench_client"), "idle", arm.url + CHAT, "--streams", str(count)]
    for k, v in arm.headers.items():
        cmd += ["-H", f"{k}: {v}"]
    client = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    opened = json.loads(client.stdout.readline())
    with_streams = rss_kib(arm.pids())
    client.stdin.close()
    client.wait()
    if opened["failed"]:
        sys.exit(f"{arm.name}: {opened['failed']} of {count} idle streams failed to open")
    return {"streams": count, "before_kib": before, "with_kib": with_streams,
            "per_stream_kib": (with_streams - before) / count}


def max_idle_streams(wanted: int) -> int:
    """Each idle stream holds two sockets in a single-process gateway (caller side and upstream side)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(wanted, (limit - 200) // 2)


# ---------------------------------------------------------------------------------------------------------
# The run


def run(settings: Settings, work: Path) -> dict:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    bench = Bench(work, settings)
    results = {"settings": settings.__dict__, "machine": machine(), "memory": {}, "rounds": []}
    try:
        # Memory first, each count on freshly started arms: idle, then with idle streams open.
        for count in settings.idle_streams:
            count = max_idle_streams(count)
            for name in GATEWAYS:
                arm = bench.start_arm(name, tag=f"-idle{count}")
                check(arm)
                entry = results["memory"].setdefault(name, {"idle_kib": rss_kib(arm.pids()), "streams": []})
                entry["streams"].append(idle_memory(bench, arm, count))
                bench.stop_arm(arm)
                print(f"memory {name} {count} streams: {entry['streams'][-1]}", flush=True)

        arms = [bench.start_arm(name) for name in ARMS]
        floor = bench.start_arm(FLOOR)
        for arm in arms + [floor]:
            check(arm)
        for round_ in range(settings.rounds):
            order = rotate(arms, round_)
            cells = {}
            for arm in rotate(arms + [floor], round_):
                cells[arm.name] = {"json": saturate(bench, arm, "json"), "sse": saturate(bench, arm, "sse")}
            for arm in order:
                for rate in settings.rates:
                    cells[arm.name][f"rate{rate}"] = fixed_rate(bench, arm, rate)
            for arm in order:
                cells[arm.name]["stream"] = streams(bench, arm)
            results["rounds"].append(cells)
            print(f"round {round_ + 1}/{settings.rounds}: " + ", ".join(
                f"{name} {cell['json']['rps']:.0f}/s" for name, cell in cells.items()), flush=True)
    finally:
        bench.close()
    return results


def machine() -> dict:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {"cores": os.cpu_count(), "cpu": model.group(1) if model else "unknown", "nginx": nginx,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------------------
# Report


def med(values):
    return statistics.median(values)


def summarise(results: dict) -> dict:
    rounds = results["rounds"]
    get = lambda arm, *path: [reduce_path(r[arm], path) for r in rounds]  # noqa: E731
    s = {"throughput": {}, "rate": {}, "stream": {}, "memory": {}}
    for arm in SATURATED:
        s["throughput"][arm] = {w: {"rps": med(get(arm, w, "rps")), "cpu_per_10k": med(get(arm, w, "cpu_per_10k")),
                                    "rss_peak_kib": max(get(arm, w, "rss_peak_kib"))} for w in ("json", "sse")}
    for arm in ARMS:
        s["rate"][arm] = {rate: {q: med(get(arm, f"rate{rate}", q)) for q in ("p50", "p99", "p99_9")}
                          for rate in results["settings"]["rates"]}
        s["stream"][arm] = {k: {q: med(get(arm, "stream", k, q)) for q in ("p50", "p99", "p99_9")}
                            for k in ("ttfb_us", "event_us")}
    # Ratios paired within a round (the arms ran minutes apart at most), then the median over rounds; the
    # lowest and highest round are kept too, so that a median is read against the noise between rounds.
    ratios = lambda a, b, *path: [reduce_path(r[a], path) / reduce_path(r[b], path) for r in rounds]  # noqa
    paired = lambda a, b, *path: med(ratios(a, b, *path))  # noqa: E731
    span = lambda values: [min(values), max(values)]  # noqa: E731
    workloads = ("json", "sse")
    s["vs_nginx"] = {w: paired("mantlegate", "nginx", w, "rps") for w in workloads}
    s["vs_nginx_rounds"] = {w: span(ratios("mantlegate", "nginx", w, "rps")) for w in workloads}
    s["metered_vs_nginx"] = {w: paired("metered", "nginx", w, "rps") for w in workloads}
    s["floor_vs_nginx"] = {w: [paired(FLOOR, "nginx", w, "rps"), *span(ratios(FLOOR, "nginx", w, "rps"))]
                           for w in workloads}
    s["vs_floor"] = {w: [paired("mantlegate", FLOOR, w, "rps"), *span(ratios("mantlegate", FLOOR, w, "rps"))]
                     for w in workloads}
    s["metering_cost"] = {w: 1 - paired("metered", "mantlegate", w, "rps") for w in workloads}
    s["metering_cost_rounds"] = {w: span([1 - x for x in ratios("metered", "mantlegate", w, "rps")]) for w in workloads}
    # The same cost as CPU per request, which the load generator sharing the cores does not enter (it still
    # scatters between rounds: bench/README.md, fifth round).
    s["metering_cpu"] = {w: paired("metered", "mantlegate", w, "cpu_per_10k") - 1 for w in workloads}
    s["memory"] = results["memory"]
    return s


def reduce_path(value, path):
    for key in path:
        value = value[key]
    return value


def report(results: dict, s: dict, plot_name: str) -> str:
    st = results["settings"]
    m = results["machine"]
    lines = [f"# mantlegate vs nginx: measured {m['date']}", "",
             f"{m['cores']} cores ({m['cpu']}), {m['nginx']}; load generator, mock upstream and the arm under test "
             "share the cores, so absolute figures are loopback-bound; ratios between arms measured in the same "
             f"run are the figures that matter. {st['rounds']} interleaved rounds; each figure is the median over "
             "rounds.", ""]

    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results, s):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
    ratio = lambda r: f"{r[0]:.2f}x (rounds {r[1]:.2f}x to {r[2]:.2f}x)"  # noqa: E731
    lines += ["", "For reference, not a target: `floor` (`examples/bench_floor.rs`, a hyper proxy on mantlegate's "
              "threading with none of the gateway's own work) runs at " + ratio(s["floor_vs_nginx"]["json"]) +
              " nginx's throughput on JSON and " + ratio(s["floor_vs_nginx"]["sse"]) + " on SSE; mantlegate runs "
              "at " + ratio(s["vs_floor"]["json"]) + " the floor's on JSON and " + ratio(s["vs_floor"]["sse"]) +
              " on SSE."]

    lines += ["", f"## Throughput at saturation (wrk -t2 -c{st['connections']}, {st['saturation_seconds']} s per cell)",
              "", "| arm | JSON req/s | SSE req/s | CPU s per 10k JSON | CPU s per 10k SSE | peak RSS under load |",
              "|---|---|---|---|---|---|"]
    for arm in SATURATED:
        t = s["throughput"][arm]
        # The mock's memory says nothing about a proxy (and holds what the idle-stream phase left it).
        rss = "–" if arm == "direct" else mib(t["json"]["rss_peak_kib"])
        lines.append(f"| {arm} | {t['json']['rps']:.0f} | {t['sse']['rps']:.0f} | {t['json']['cpu_per_10k']:.2f} | "
                     f"{t['sse']['cpu_per_10k']:.2f} | {rss} |")
    lines += ["", "CPU and memory are the arm's own processes (for `direct`, the mock upstream's CPU; for nginx, "
              "master and workers summed). `floor` is measured at saturation only. SSE responses carry "
              f"{st['sse_events']} events with no pause.", ""]

    for rate in st["rates"]:
        lines += [f"## Latency at {rate} requests/s (open loop, latency from when each request was due, {st['rate_seconds']} s per cell), ms", "",
                  "| arm | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 |", "|---|---|---|---|---|---|---|"]
        d = s["rate"]["direct"][rate]
        for arm in ARMS:
            r = s["rate"][arm][rate]
            added = "| – | – | – |" if arm == "direct" else \
                f"| {r['p50'] - d['p50']:.3f} | {r['p99'] - d['p99']:.3f} | {r['p99_9'] - d['p99_9']:.3f} |"
            lines.append(f"| {arm} | {r['p50']:.3f} | {r['p99']:.3f} | {r['p99_9']:.3f} {added}")
        lines.append("")

    lines += [f"## Streaming ({st['sse_streams']} streams x {st['sse_events']} events, {st['sse_gap_us']} µs apart, "
              "4 at a time), µs", "",
              "| arm | TTFB p50 | TTFB p99 | event transit p50 | p99 | p99.9 | added TTFB p50 | added TTFB p99 | "
              "added per event p50 | added per event p99 |", "|---|---|---|---|---|---|---|---|---|---|"]
    d = s["stream"]["direct"]
    for arm in ARMS:
        t, e = s["stream"][arm]["ttfb_us"], s["stream"][arm]["event_us"]
        added = "| – | – | – | – |" if arm == "direct" else (
            f"| {t['p50'] - d['ttfb_us']['p50']:.0f} | {t['p99'] - d['ttfb_us']['p99']:.0f} | "
            f"{e['p50'] - d['event_us']['p50']:.0f} | {e['p99'] - d['event_us']['p99']:.0f} |")
        lines.append(f"| {arm} | {t['p50']:.0f} | {t['p99']:.0f} | {e['p50']:.0f} | {e['p99']:.0f} | "
                     f"{e['p99_9']:.0f} {added}")
    lines += ["", "Transit: the upstream stamps each event with the time it wrote it; the client subtracts that from "
              "the time it read it. TTFB: request written to first event read.", ""]

    lines += ["## Memory (resident, freshly started, after one request of each kind)", "",
              "| arm | idle | " + " | ".join(f"{x['streams']} idle streams | per stream"
                                            for x in s["memory"]["mantlegate"]["streams"]) + " |",
              "|---|---|" + "---|---|" * len(s["memory"]["mantlegate"]["streams"])]
    for arm in GATEWAYS:
        mem = s["memory"][arm]
        cells = " | ".join(f"{mib(x['with_kib'])} | {x['per_stream_kib']:.1f} KiB" for x in mem["streams"])
        lines.append(f"| {arm} | {mib(mem['idle_kib'])} | {cells} |")
    lines += ["", "Per stream: resident memory with the streams open minus just before, over the count. Each stream "
              "is its own caller connection and upstream connection. nginx's figure sums its master and two "
              "workers. A count below 10,000 is the most this machine's open-file limit allows one process "
              "holding two sockets per stream.", "", f"![latency percentiles per arm]({plot_name})", ""]
    return "\n".join(lines)


def targets(results: dict, s: dict):
    st = results["settings"]
    top = max(st["rates"])
    rate = s["rate"]
    added_p99 = lambda arm: rate[arm][top]["p99"] - rate["direct"][top]["p99"]  # noqa: E731
    stream = s["stream"]
    mem = s["memory"]["mantlegate"]
    for w in ("json", "sse"):
        low, high = s["vs_nginx_rounds"][w]
        yield (f"throughput at saturation >= 1.0x nginx ({w.upper()})",
               f"{s['vs_nginx'][w]:.2f}x (rounds {low:.2f}x to {high:.2f}x)", s["vs_nginx"][w] >= 1)
    yield (f"added p99 at {top}/s <= nginx's", f"{added_p99('mantlegate'):.3f} ms vs {added_p99('nginx'):.3f} ms",
           added_p99("mantlegate") <= added_p99("nginx"))
    event = stream["mantlegate"]["event_us"]["p99"] - stream["direct"]["event_us"]["p99"]
    yield ("each SSE event forwarded within 1 ms at p99 (added transit)", f"{event:.0f} µs", event <= 1000)
    ttfb = stream["mantlegate"]["ttfb_us"]["p99"] - stream["direct"]["ttfb_us"]["p99"]
    yield ("time to first byte within 1 ms of direct (p99)", f"{ttfb:.0f} µs", ttfb <= 1000)
    yield ("under 20 MiB resident idle", mib(mem["idle_kib"]), mem["idle_kib"] < 20 * 1024)
    per = max(x["per_stream_kib"] for x in mem["streams"])
    yield ("under 32 KiB per concurrent idle stream", f"{per:.1f} KiB", per < 32)
    for w in ("json", "sse"):
        cost = s["metering_cost"][w]
        low, high = s["metering_cost_rounds"][w]
        yield (f"metering costs under 5% of throughput ({w.upper()})",
               f"{cost * 100:.1f}% (rounds {low * 100:.1f}% to {high * 100:.1f}%; CPU per request "
               f"{s['metering_cpu'][w] * 100:+.1f}%)", cost < 0.05)


def mib(kib) -> str:
    return f"{kib / 1024:.1f} MiB"


def plot(s: dict, rates: list, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{rate} req/s, JSON (ms)", [[s["rate"][arm][rate][q] for q in ("p50", "p99", "p99_9")]
                                              for arm in ARMS]) for rate in rates]
    panels.append(("SSE event transit (ms)", [[s["stream"][arm]["event_us"][q] / 1000 for q in ("p50", "p99", "p99_9")]
                                              for arm in ARMS]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    width = 0.2
    for ax, (title, values) in zip(axes[0], panels):
        for i, arm in enumerate(ARMS):
            ax.bar([x + (i - 1.5) * width for x in range(3)], values[i], width, label=arm)
        ax.set_xticks(range(3), ["p50", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds per phase; nothing written to bench/")
    parser.add_argument("--out", type=Path, help="where results.md, results.json and latency.png go")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5, or 1 with --smoke)")
    parser.add_argument("--idle-streams", type=int, nargs="+", help="idle stream counts (default: 1000 10000)")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    if args.rounds:
        settings.rounds = args.rounds
    if args.idle_streams:
        settings.idle_streams = args.idle_streams
    out = args.out or (Path(tempfile.mkdtemp(prefix="mantlegate-bench-out-")) if args.smoke else ROOT / "bench")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mantlegate-bench-") as work:
        results = run(settings, Path(work))
    s = summarise(results)
    (out / "results.json").write_text(json.dumps({"results": results, "summary": s}, indent=1, default=str) + "\n")
    plot(s, settings.rates, out / "latency.png")
    text = report(results, s, "latency.png")
    (out / "results.md").write_text(text)
    print(text)
    print(f"written to {out}")
    if args.smoke and not args.out:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
