#!/usr/bin/env bash
# What metering costs in throughput: two gateways on loopback in front of one fast stub upstream, identical
# but for `[metering] enabled`, driven by wrk in interleaved rounds so that machine noise hits both alike.
#
#   bench/metering.sh            full run (10 rounds x 2 arms x 2 workloads x 4 s), writes bench/metering-results.md
#   bench/metering.sh --smoke    one short round, no file written (CI keeps the script from rotting)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=10 duration=4s out=bench/metering-results.md
if [ "${1:-}" = "--smoke" ]; then rounds=1 duration=1s out=""; fi
if ! command -v wrk >/dev/null || ! command -v bc >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk bc >/dev/null
fi

cargo build --release --locked --quiet --bin mantlegate --example bench_upstream
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Start a process and wait for the line that names its address.
start() { # name pattern cmd...
  local name=$1 pattern=$2; shift 2
  "$@" >"$work/$name.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 200); do
    if grep -q "$pattern" "$work/$name.out"; then return 0; fi
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$work/$name.out" >&2; exit 1
}

start upstream "listening on" target/release/examples/bench_upstream 127.0.0.1:0 bench-upstream-key proj_bench
upstream=$(sed -n 's/^listening on //p' "$work/upstream.out")

key=bench-caller-key
sha=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
for arm in on off; do
  enabled=$([ "$arm" = on ] && echo true || echo false)
  cat >"$work/$arm.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "http://$upstream"
api_key_env = "BENCH_UPSTREAM_KEY"
[metering]
enabled = $enabled
[[projects]]
name = "Bench"
id = "proj_bench"
[[keys]]
name = "bench"
sha256 = "$sha"
project = "Bench"
TOML
  BENCH_UPSTREAM_KEY=bench-upstream-key MANTLEGATE_LOG=info,mantlegate::access=off \
    start "$arm" '"addr"' target/release/mantlegate serve --config "$work/$arm.toml"
done
addr() { grep -o '"addr":"[^"]*"' "$work/$1.out" | head -1 | cut -d'"' -f4; }
on=$(addr on); off=$(addr off)

cat >"$work/json.lua" <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $key"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"Hello there"}]}'
LUA
sed 's/"messages"/"stream":true,"messages"/' "$work/json.lua" >"$work/sse.lua"

# Both arms answer correctly before anything is measured.
for a in "$on" "$off"; do
  curl -fsS "http://$a/v1/chat/completions" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d '{"model":"openai.gpt-oss-120b","messages":[]}' | grep -q chat.completion
done

pid_of() { [ "$1" = on ] && echo "${pids[1]}" || echo "${pids[2]}"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One cell: requests/s, and the gateway's own CPU time per request (user + system, from /proc), which a
# busy machine distorts far less than throughput.
measure() { # arm workload
  local a pid before after out
  a=$([ "$1" = on ] && echo "$on" || echo "$off"); pid=$(pid_of "$1")
  before=$(cpu_ticks "$pid")
  out=$(wrk -t2 -c32 -d"$duration" -s "$work/$2.lua" "http://$a/v1/chat/completions")
  after=$(cpu_ticks "$pid")
  local requests rps
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  echo "$rps $(echo "($after - $before) * 1000000 / $(getconf CLK_TCK) / $requests" | bc -l)"
}
declare -A sum cpu per_round
for workload in json sse; do sum[$workload.on]=0; sum[$workload.off]=0; cpu[$workload.on]=0; cpu[$workload.off]=0; done
rows=""
for round in $(seq 1 "$rounds"); do
  for workload in json sse; do
    # Alternate which arm goes first, so neither always runs on a warmer machine.
    if [ $((round % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for arm in $order; do
      read -r r c < <(measure "$arm" "$workload")
      per_round[$workload.$arm.$round]=$r
      sum[$workload.$arm]=$(echo "${sum[$workload.$arm]} + $r" | bc -l)
      cpu[$workload.$arm]=$(echo "${cpu[$workload.$arm]} + $c" | bc -l)
      rows+=$(printf '| %s | %s | %s | %s | %.1f |' "$round" "$workload" "$arm" "$r" "$c")$'\n'
    done
  done
done

# The paired cost of one round (the two arms ran back to back), and the median over rounds: one noisy
# round moves a mean, not a median.
median_cost() { # workload
  for round in $(seq 1 "$rounds"); do
    echo "(1 - ${per_round[$1.on.$round]} / ${per_round[$1.off.$round]}) * 100" | bc -l
  done | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'
}

report=$(
  echo "| round | workload | metering | requests/s | gateway CPU µs/request |"
  echo "|---|---|---|---|---|"
  printf %s "$rows"
  echo
  echo "| workload | req/s off | req/s on | throughput cost (means) | median paired cost | CPU µs/req off | CPU µs/req on | CPU cost |"
  echo "|---|---|---|---|---|---|---|---|"
  for workload in json sse; do
    off_mean=$(echo "${sum[$workload.off]} / $rounds" | bc -l)
    on_mean=$(echo "${sum[$workload.on]} / $rounds" | bc -l)
    off_cpu=$(echo "${cpu[$workload.off]} / $rounds" | bc -l)
    on_cpu=$(echo "${cpu[$workload.on]} / $rounds" | bc -l)
    printf '| %s | %.0f | %.0f | %.1f%% | %.1f%% | %.1f | %.1f | %.1f%% |\n' "$workload" "$off_mean" "$on_mean" \
      "$(echo "(1 - $on_mean / $off_mean) * 100" | bc -l)" "$(median_cost "$workload")" \
      "$off_cpu" "$on_cpu" "$(echo "($on_cpu / $off_cpu - 1) * 100" | bc -l)"
  done
)
echo "$report"
if [ -n "$out" ]; then
  {
    echo "# Metering cost: measured $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, wrk -t2 -c32, $duration per cell"
    echo
    echo "Both gateways, the stub upstream and wrk share this machine's cores, so absolute numbers are"
    echo "loopback-bound; the ratio between the interleaved arms is the figure that matters."
    echo
    echo "$report"
  } >"$out"
  echo "written to $out"
fi
