# shellcheck shell=bash
# Helpers shared by bench/run.sh and bench/paths.sh; sourced, not run. Expects ROOT (the
# repository) and RUN (the run's work folder) to be set, and `set -euo pipefail`.
WORK=$ROOT/bench/.work
RESULTS=$ROOT/bench/results.md
CLK_TCK=$(getconf CLK_TCK)
BIN=$ROOT/target/release

say() { echo "bench: $*" >&2; }

# check_knobs NAME...: each named variable must hold a positive whole number.
check_knobs() {
  local knob
  for knob in "$@"; do
    if ! [[ ${!knob} =~ ^[1-9][0-9]*$ ]]; then
      echo "bench: $knob must be a positive whole number, not \"${!knob}\"" >&2
      exit 2
    fi
  done
}

# --- processes ------------------------------------------------------------------------------
# Every process a script starts is recorded and stopped on exit, whatever happens.
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

# field FILE NAME: a value from a `name=value` report of the sink or the load generator.
field() {
  awk -F= -v name="$2" '$1 == name { print $2 }' "$1"
}

# --- sink -----------------------------------------------------------------------------------
# start_sink NAME: starts a sink on a free port; sets SINK_PORT, SINK_PID, SINK_STATS.
start_sink() {
  SINK_PORT=$(free_port)
  SINK_STATS=$RUN/$1-$ROUND-sink.stats
  start "$RUN/$1-$ROUND-sink.log" "$BIN/otlp-sink" --listen "127.0.0.1:$SINK_PORT" --stats "$SINK_STATS"
  SINK_PID=$LAST_PID
  wait_until 10 "$SINK_PID" "sink for $1" test -s "$SINK_STATS"
}

sink_spans() {
  field "$SINK_STATS" spans
}

sink_has_all() {
  [ "$(sink_spans)" -ge "$SPANS" ]
}

# --- one pass -------------------------------------------------------------------------------
# row_of PASS_LINE: the pass as a Markdown table row.
row_of() {
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $3, $4, $5, $6, $7, $8 }' <<<"$1"
}

# measure NAME VERSION PID GRPC_PORT [SETTLED_COMMAND...]: the load pass against a ready
# agent; adds a line to $PASSES (agent, round, version, spans/s, CPU-s per 1M spans, peak RSS
# MiB, RSS before load MiB, retries; tab-separated), or a note to $NOTES when the pass failed.
# The load generator gets LOADGEN_ARGS besides its usual flags. The CPU reading ends once the
# sink has every span and, when given, SETTLED_COMMAND succeeds (the agent has finished the
# work the spans caused).
LOADGEN_ARGS=()
measure() {
  local name=$1 version=$2 pid=$3 port=$4
  shift 4
  local pass="$name (round $ROUND)" report=$RUN/$name-$ROUND-loadgen.report
  sleep 1 # let start-up work settle before the CPU reading
  local rss_ready cpu_before cpu_after hwm
  rss_ready=$(status_kib "$pid" VmRSS)
  cpu_before=$(cpu_ticks "$pid")
  say "$pass: sending $SPANS spans ($BATCH per request, $CONCURRENCY clients)"
  if ! "$BIN/otlp-loadgen" --endpoint "http://127.0.0.1:$port" --spans "$SPANS" --batch "$BATCH" \
    --concurrency "$CONCURRENCY" "${LOADGEN_ARGS[@]}" --report "$report" | sed 's/^/  /' >&2; then
    NOTES+=("$pass: the load generator reported failed requests (see the script's output)")
  fi
  if [ ! -s "$report" ]; then
    NOTES+=("$pass: the load generator could not send (see the script's output)")
    return
  fi
  if ! wait_until "$DEADLINE" "$pid" "$pass: all $SPANS spans at the sink" sink_has_all; then
    NOTES+=("$pass: only $(sink_spans) of $SPANS spans reached the sink within ${DEADLINE}s")
  fi
  if [ "$#" -gt 0 ] && ! wait_until "$DEADLINE" "$pid" "$pass: $*" "$@"; then
    NOTES+=("$pass: \`$*\` did not succeed within ${DEADLINE}s")
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

# --- rotel ----------------------------------------------------------------------------------
# find_rotel: sets ROTEL to the `rotel-agent` binary of the `rotel` Python package (fetched
# with pip into bench/.work/rotel once), or ROTEL_NOTE to why there is none.
ROTEL=""
ROTEL_NOTE=""
find_rotel() {
  local dir=$WORK/rotel
  ROTEL=$(find "$dir/unpacked" -type f -name 'rotel-agent' 2>/dev/null | head -n 1 || true)
  if [ -z "$ROTEL" ]; then
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
  fi
  if ! "$ROTEL" --version >/dev/null 2>&1; then
    # shellcheck disable=SC2034 # read by the scripts that source this file
    ROTEL_NOTE="rotel not measured: $ROTEL does not run here"
    ROTEL=""
    return 1
  fi
}

# rotel_version: the version Rotel reports, and the wheel it came from.
rotel_version() {
  local wheel
  wheel=$(find "$WORK/rotel" -maxdepth 1 -name 'rotel-*.whl' | sort | tail -n 1 | sed 's/.*rotel-\([^-]*\)-.*/\1/')
  echo "$("$ROTEL" --version | awk '{ print $2 }')${wheel:+ (wheel $wheel)}"
}

# rotel_args GRPC_PORT HTTP_PORT SINK_PORT: Rotel as a plain pass-through into ROTEL_ARGS:
# OTLP/gRPC receiver, OTLP/gRPC exporter, the same batching as Periscope's Jaeger exporter
# (8192 spans or 200 ms) and no compression on the way out (Periscope's default; Rotel's own
# default is gzip).
rotel_args() {
  # shellcheck disable=SC2034 # read by the scripts that source this file
  ROTEL_ARGS=(start
    --otlp-grpc-endpoint "127.0.0.1:$1"
    --otlp-http-endpoint "127.0.0.1:$2"
    --otlp-grpc-max-recv-msg-size-mib 16
    --otlp-receiver-metrics-disabled --otlp-receiver-logs-disabled
    --exporter otlp
    --otlp-exporter-endpoint "http://127.0.0.1:$3"
    --otlp-exporter-protocol grpc
    --otlp-exporter-compression none
    --batch-max-size 8192 --batch-timeout 200ms
    --pid-file "$RUN/rotel.pid" --log-file "$RUN/rotel-agent.log")
}

# --- report ---------------------------------------------------------------------------------
# machine_line: the machine, the toolchain and the commit the agent was built from.
machine_line() {
  local cpu_model mem_total commit
  cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  mem_total=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git -C "$ROOT" status --porcelain -- agent 2>/dev/null)" ]; then commit="$commit with local changes"; fi
  echo "Machine: $(nproc) CPUs ($cpu_model), $mem_total, Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC');"
  echo "$(rustc --version); periscope built from $commit."
}

# write_section NAME FILE: puts FILE into bench/results.md as section NAME, between
# `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, replacing the section's earlier text and
# leaving the other scripts' sections as they are.
write_section() {
  local name=$1 file=$2 begin="<!-- bench:$1 -->" end="<!-- /bench:$1 -->"
  touch "$RESULTS"
  if grep -qxF "$begin" "$RESULTS"; then
    awk -v begin="$begin" -v end="$end" -v file="$file" '
      $0 == begin { print; while ((getline line < file) > 0) print line; skipping = 1; next }
      $0 == end { skipping = 0 }
      !skipping { print }
    ' "$RESULTS" >"$RESULTS.partial"
  else
    {
      cat "$RESULTS"
      if [ -s "$RESULTS" ]; then echo; fi
      echo "$begin"
      cat "$file"
      echo "$end"
    } >"$RESULTS.partial"
  fi
  mv "$RESULTS.partial" "$RESULTS"
}
