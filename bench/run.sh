#!/usr/bin/env bash
# Traces pass-through benchmark: OTLP/gRPC in, OTLP/gRPC out to a counting sink, for Periscope
# (its Jaeger exporter) and for Rotel, one after the other in the same run. For each agent it
# reports spans per second, CPU-seconds per million spans and peak RSS; then the idle RSS of
# Periscope on its embedded default config. Prints a Markdown table and writes it, with the
# machine it ran on, to bench/results.md.
#
#   bash bench/run.sh
#
# Knobs (environment): SPANS per pass (2000000), BATCH (spans per request, 512), CONCURRENCY
# (clients, 4), AGENTS ("periscope rotel"), ROUNDS (passes per agent, taking turns; 3),
# DEADLINE (seconds to wait for the last span, 120).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/bench/.work
RESULTS=$ROOT/bench/results.md

SPANS=${SPANS:-2000000}
BATCH=${BATCH:-512}
CONCURRENCY=${CONCURRENCY:-4}
AGENTS=${AGENTS:-periscope rotel}
ROUNDS=${ROUNDS:-3}
DEADLINE=${DEADLINE:-120}
CLK_TCK=$(getconf CLK_TCK)
for knob in SPANS BATCH CONCURRENCY ROUNDS DEADLINE; do
  if ! [[ ${!knob} =~ ^[1-9][0-9]*$ ]]; then
    echo "bench: $knob must be a positive whole number, not \"${!knob}\"" >&2
    exit 2
  fi
done

mkdir -p "$WORK"
rm -rf "$WORK/run"
mkdir -p "$WORK/run"
RUN=$WORK/run

say() { echo "bench: $*" >&2; }

# --- processes ------------------------------------------------------------------------------
# Every process this script starts is recorded and stopped on exit, whatever happens.
STARTED=()
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# start LOG COMMAND...: runs COMMAND in the background; its pid is in $LAST_PID.
start() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  LAST_PID=$!
  STARTED+=("$LAST_PID")
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_until SECONDS PID WHAT COMMAND...: polls COMMAND every 100 ms; fails when PID exits or
# the time is up.
wait_until() {
  local seconds=$1 pid=$2 what=$3
  shift 3
  local tries=$((seconds * 10))
  while ! "$@"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$what: the process exited"
      return 1
    fi
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then
      say "$what: not within ${seconds}s"
      return 1
    fi
    sleep 0.1
  done
}

ready_http() {
  curl -fsS -o /dev/null --max-time 1 "$1"
}

# --- /proc readings -------------------------------------------------------------------------
# CPU time (user + system, all threads) in clock ticks. The command name in field 2 may hold
# spaces, so fields are counted after its closing parenthesis.
cpu_ticks() {
  sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

status_kib() {
  awk -v key="$2:" '$1 == key { print $2 }' "/proc/$1/status"
}

mib() {
  awk -v kib="$1" 'BEGIN { printf "%.1f", kib / 1024 }'
}

# --- build ----------------------------------------------------------------------------------
packages=(-p periscope-bench)
case " $AGENTS " in *" periscope "*) packages=(-p periscope "${packages[@]}") ;; esac
say "building ${packages[*]} (release)"
cargo build --release "${packages[@]}"
BIN=$ROOT/target/release

# --- rotel ----------------------------------------------------------------------------------
ROTEL=""
ROTEL_NOTE=""
find_rotel() {
  local dir=$WORK/rotel
  ROTEL=$(find "$dir/unpacked" -type f -name 'rotel-agent' 2>/dev/null | head -n 1 || true)
  if [ -n "$ROTEL" ]; then
    return 0
  fi
  mkdir -p "$dir"
  if ! python3 -m pip download --quiet --no-deps rotel -d "$dir" >"$dir/pip.log" 2>&1; then
    ROTEL_NOTE="rotel not measured: \`pip download rotel\` failed ($(tail -n 1 "$dir/pip.log"))"
    return 1
  fi
  local wheel
  wheel=$(find "$dir" -maxdepth 1 -name 'rotel-*.whl' | sort | tail -n 1)
  if [ -z "$wheel" ]; then
    ROTEL_NOTE="rotel not measured: no wheel for this platform"
    return 1
  fi
  rm -rf "$dir/unpacked"
  python3 -m zipfile -e "$wheel" "$dir/unpacked"
  ROTEL=$(find "$dir/unpacked" -type f -name 'rotel-agent' | head -n 1 || true)
  if [ -z "$ROTEL" ]; then
    ROTEL_NOTE="rotel not measured: $(basename "$wheel") has no rotel-agent binary"
    return 1
  fi
  chmod +x "$ROTEL"
}
case " $AGENTS " in
  *" rotel "*)
    if find_rotel && ! "$ROTEL" --version >/dev/null 2>&1; then
      ROTEL_NOTE="rotel not measured: $ROTEL does not run here"
      ROTEL=""
    fi
    if [ -n "$ROTEL_NOTE" ]; then say "$ROTEL_NOTE"; fi
    ;;
esac

# --- one pass -------------------------------------------------------------------------------
# Each successful pass is one line of $PASSES: agent, round, version, spans/s, CPU-s per 1M
# spans, peak RSS MiB, RSS before load MiB, retries (tab-separated).
PASSES=$RUN/passes.tsv
: >"$PASSES"
NOTES=()
ROUND=0

# start_sink NAME: starts a sink on a free port; sets SINK_PORT, SINK_PID, SINK_STATS.
start_sink() {
  SINK_PORT=$(free_port)
  SINK_STATS=$RUN/$1-$ROUND-sink.stats
  start "$RUN/$1-$ROUND-sink.log" "$BIN/otlp-sink" --listen "127.0.0.1:$SINK_PORT" --stats "$SINK_STATS"
  SINK_PID=$LAST_PID
  wait_until 10 "$SINK_PID" "sink for $1" test -s "$SINK_STATS"
}

# field FILE NAME: a value from a `name=value` report of the sink or the load generator.
field() {
  awk -F= -v name="$2" '$1 == name { print $2 }' "$1"
}

sink_spans() {
  field "$SINK_STATS" spans
}

sink_has_all() {
  [ "$(sink_spans)" -ge "$SPANS" ]
}

# row_of PASS_LINE: the pass as a Markdown table row.
row_of() {
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $3, $4, $5, $6, $7, $8 }' <<<"$1"
}

# measure NAME VERSION PID GRPC_PORT: the load pass against a ready agent; adds a line to
# $PASSES, or a note when the pass failed.
measure() {
  local name=$1 version=$2 pid=$3 port=$4
  local pass="$name (round $ROUND)" report=$RUN/$name-$ROUND-loadgen.report
  sleep 1 # let start-up work settle before the CPU reading
  local rss_ready cpu_before cpu_after hwm
  rss_ready=$(status_kib "$pid" VmRSS)
  cpu_before=$(cpu_ticks "$pid")
  say "$pass: sending $SPANS spans ($BATCH per request, $CONCURRENCY clients)"
  if ! "$BIN/otlp-loadgen" --endpoint "http://127.0.0.1:$port" --spans "$SPANS" --batch "$BATCH" \
    --concurrency "$CONCURRENCY" --report "$report" | sed 's/^/  /' >&2; then
    NOTES+=("$pass: the load generator reported failed requests (see the output of bench/run.sh)")
  fi
  if [ ! -s "$report" ]; then
    NOTES+=("$pass: the load generator could not send (see the output of bench/run.sh)")
    return
  fi
  if ! wait_until "$DEADLINE" "$pid" "$pass: all $SPANS spans at the sink" sink_has_all; then
    NOTES+=("$pass: only $(sink_spans) of $SPANS spans reached the sink within ${DEADLINE}s")
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    NOTES+=("$pass: the agent exited during the run (see bench/.work/run/$name-$ROUND.log)")
    return
  fi
  cpu_after=$(cpu_ticks "$pid")
  hwm=$(status_kib "$pid" VmHWM)
  sleep 0.5 # anything arriving late (a duplicate from a retry) shows in the count
  local received start_ns last_ns retries
  received=$(sink_spans)
  last_ns=$(field "$SINK_STATS" last_ns)
  start_ns=$(field "$report" start_ns)
  retries=$(field "$report" retries)
  if [ "$received" -gt "$SPANS" ]; then
    NOTES+=("$pass: the sink received $received spans for $SPANS sent (duplicates)")
  fi
  local line
  line=$(awk -v spans="$SPANS" -v received="$received" -v start="$start_ns" -v last="$last_ns" \
    -v ticks=$((cpu_after - cpu_before)) -v tck="$CLK_TCK" -v hwm="$hwm" -v ready="$rss_ready" \
    -v name="$name" -v round="$ROUND" -v version="$version" -v retries="$retries" 'BEGIN {
      wall = (last - start) / 1e9
      counted = received < spans ? received : spans
      rate = wall > 0 ? counted / wall : 0
      cpu = ticks / tck
      per_million = counted > 0 ? cpu / (counted / 1e6) : 0
      printf "%s\t%d\t%s\t%.0f\t%.2f\t%.1f\t%.1f\t%d\n", name, round, version, rate, per_million,
        hwm / 1024, ready / 1024, retries
    }')
  echo "$line" >>"$PASSES"
  say "$pass: $(row_of "$line")"
}

run_periscope() {
  start_sink periscope
  local admin grpc config
  admin=$(free_port)
  grpc=$(free_port)
  config=$RUN/periscope.yaml
  cat >"$config" <<EOF
node_name: bench
data_dir: $RUN/periscope-data
server: { listen: 127.0.0.1:$admin }
sources:
  otlp: { grpc: 127.0.0.1:$grpc, http: null }
  host_metrics: { enabled: false }
paths: { enabled: false }
exporters:
  jaeger: { endpoint: http://127.0.0.1:$SINK_PORT, protocol: grpc }
EOF
  start "$RUN/periscope-$ROUND.log" "$BIN/periscope" run --config "$config"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "periscope: /readyz" ready_http "http://127.0.0.1:$admin/readyz"; then
    measure periscope "$("$BIN/periscope" --version | awk '{ print $2 }')" "$pid" "$grpc"
  else
    NOTES+=("periscope (round $ROUND): not ready (see bench/.work/run/periscope-$ROUND.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

# Rotel as a plain pass-through: OTLP/gRPC receiver, OTLP/gRPC exporter, the same batching as
# Periscope's Jaeger exporter (8192 spans or 200 ms) and no compression on the way out
# (Periscope's default; Rotel's own default is gzip).
ROTEL_ARGS_SHOWN=""
run_rotel() {
  start_sink rotel
  local grpc http
  grpc=$(free_port)
  http=$(free_port)
  local args=(start
    --otlp-grpc-endpoint "127.0.0.1:$grpc"
    --otlp-http-endpoint "127.0.0.1:$http"
    --otlp-grpc-max-recv-msg-size-mib 16
    --otlp-receiver-metrics-disabled --otlp-receiver-logs-disabled
    --exporter otlp
    --otlp-exporter-endpoint "http://127.0.0.1:$SINK_PORT"
    --otlp-exporter-protocol grpc
    --otlp-exporter-compression none
    --batch-max-size 8192 --batch-timeout 200ms
    --pid-file "$RUN/rotel.pid" --log-file "$RUN/rotel-agent.log")
  ROTEL_ARGS_SHOWN="rotel-agent ${args[*]//$ROOT\//}"
  start "$RUN/rotel-$ROUND.log" "$ROTEL" "${args[@]}"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "rotel: gRPC port" port_open "$grpc"; then
    local wheel
    wheel=$(find "$WORK/rotel" -maxdepth 1 -name 'rotel-*.whl' | sort | tail -n 1 | sed 's/.*rotel-\([^-]*\)-.*/\1/')
    measure rotel "$("$ROTEL" --version | awk '{ print $2 }')${wheel:+ (wheel $wheel)}" "$pid" "$grpc"
  else
    NOTES+=("rotel (round $ROUND): did not open its port (see bench/.work/run/rotel-$ROUND.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

for agent in $AGENTS; do
  case $agent in
    periscope | rotel) ;;
    *)
      say "unknown agent $agent (known: periscope rotel)"
      exit 2
      ;;
  esac
done
if [ -z "$ROTEL" ] && [ -n "$ROTEL_NOTE" ]; then NOTES+=("$ROTEL_NOTE"); fi

# The agents take turns, so a disturbance of the machine spreads over both rather than
# landing on one.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for agent in $AGENTS; do
    case $agent in
      periscope) run_periscope ;;
      rotel) if [ -n "$ROTEL" ]; then run_rotel; fi ;;
    esac
  done
done

# The summary row of an agent is its median pass by CPU-seconds per million spans.
SUMMARY=()
for agent in $AGENTS; do
  mapfile -t passes < <(awk -F'\t' -v a="$agent" '$1 == a' "$PASSES" | sort -t$'\t' -k5,5g)
  if [ "${#passes[@]}" -eq 0 ]; then
    SUMMARY+=("| $agent | – | – | – | – | – | – |")
  else
    SUMMARY+=("$(row_of "${passes[$(((${#passes[@]} - 1) / 2))]}")")
  fi
done

# --- idle -----------------------------------------------------------------------------------
# The embedded default config listens on 127.0.0.1:4317, 4318, 8686 and 9464; it is only
# started when none of them is taken.
IDLE_ROW=""
case " $AGENTS " in
  *" periscope "*)
    busy=()
    for port in 4317 4318 8686 9464; do
      if port_open "$port"; then busy+=("$port"); fi
    done
    if [ "${#busy[@]}" -gt 0 ]; then
      IDLE_ROW="| periscope, embedded default config | not measured: port ${busy[*]} in use | |"
    else
      mkdir -p "$RUN/idle"
      (cd "$RUN/idle" && exec env -u PERISCOPE_CONFIG "$BIN/periscope" run) >"$RUN/idle.log" 2>&1 &
      idle_pid=$!
      STARTED+=("$idle_pid")
      if wait_until 30 "$idle_pid" "periscope (default config): /readyz" ready_http http://127.0.0.1:8686/readyz; then
        sleep 2
        IDLE_ROW="| periscope, embedded default config | $(mib "$(status_kib "$idle_pid" VmRSS)") | $(mib "$(status_kib "$idle_pid" VmHWM)") |"
      else
        IDLE_ROW="| periscope, embedded default config | not ready (see bench/.work/run/idle.log) | |"
      fi
      stop "$idle_pid"
    fi
    say "idle: $IDLE_ROW"
    ;;
esac

# --- report ---------------------------------------------------------------------------------
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem_total=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
{
  echo "## Traces pass-through: OTLP/gRPC in, OTLP/gRPC out"
  echo
  echo "$SPANS spans per pass, $BATCH spans per request, $CONCURRENCY concurrent clients;"
  echo "$ROUNDS rounds, the agents taking turns. Each row is the agent's median pass by CPU-s per 1M spans."
  echo
  echo "| agent | version | spans/s | CPU-s per 1M spans | peak RSS (MiB) | RSS before load (MiB) | retries |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  printf '%s\n' "${SUMMARY[@]}"
  if [ "$ROUNDS" -gt 1 ] && [ -s "$PASSES" ]; then
    echo
    echo "<details><summary>All passes</summary>"
    echo
    echo "| agent | round | spans/s | CPU-s per 1M spans | peak RSS (MiB) | RSS before load (MiB) | retries |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $4, $5, $6, $7, $8 }' "$PASSES"
    echo
    echo "</details>"
  fi
  if [ -n "$IDLE_ROW" ]; then
    echo
    echo "## Idle"
    echo
    echo "| agent | RSS 2 s after ready (MiB) | peak RSS (MiB) |"
    echo "|---|---:|---:|"
    echo "$IDLE_ROW"
  fi
  if [ "${#NOTES[@]}" -gt 0 ]; then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
  echo
  echo "Machine: $(nproc) CPUs ($cpu_model), $mem_total, Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC');"
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain -- agent 2>/dev/null)" ]; then commit="$commit with local changes"; fi
  echo "$(rustc --version); periscope built from $commit."
  if [ -n "$ROTEL_ARGS_SHOWN" ]; then
    echo
    echo "Rotel ran as \`$ROTEL_ARGS_SHOWN\` (ports and paths vary per run)."
  fi
} >"$RESULTS"

echo
cat "$RESULTS"
