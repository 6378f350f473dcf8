#!/usr/bin/env bash
# Metrics benchmark: the exposition parser in process (`scrape-bench`), then scraping a
# 100,000-series target and remote-writing to a real Prometheus, for Periscope and for
# Prometheus in agent mode, one after the other in the same run. For each agent it reports
# CPU-seconds per scrape cycle and per million samples, samples per second appended at the
# receiver, peak and steady RSS, and memory per active series; it checks that the receiver got
# every series and every sample. Prints Markdown tables and writes them, with the machine it
# ran on, to bench/results.md.
#
#   bash bench/metrics.sh
#
# Knobs (environment): SERIES in the exposition (100000), INTERVAL (scrape interval, seconds;
# 5), CYCLES (scrape cycles measured per pass; 12), ROUNDS (passes per agent, taking turns; 3),
# AGENTS ("periscope prometheus"), PARSE_SECONDS (CPU-seconds per format in the parser
# benchmark; 3), PROFILE (1: take a CPU profile of Prometheus during its measured cycles, for
# the speed of its parser; 0: don't), DEADLINE (seconds to wait for the receiver to have
# everything; 120).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/bench/.work/metrics
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

SERIES=${SERIES:-100000}
INTERVAL=${INTERVAL:-5}
CYCLES=${CYCLES:-12}
ROUNDS=${ROUNDS:-3}
AGENTS=${AGENTS:-periscope prometheus}
PARSE_SECONDS=${PARSE_SECONDS:-3}
PROFILE=${PROFILE:-1}
DEADLINE=${DEADLINE:-120}
check_knobs SERIES INTERVAL CYCLES ROUNDS PARSE_SECONDS DEADLINE
for agent in $AGENTS; do
  case $agent in
    periscope | prometheus) ;;
    *)
      say "unknown agent $agent (known: periscope prometheus)"
      exit 2
      ;;
  esac
done
PROMETHEUS=$(command -v prometheus || true)
if [ -z "$PROMETHEUS" ]; then
  say "needs the prometheus binary on PATH (Debian: apt-get install prometheus)"
  exit 2
fi
for tool in curl jq; do
  command -v "$tool" >/dev/null || { say "needs $tool"; exit 2; }
done

rm -rf "$RUN"
mkdir -p "$RUN"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- build ----------------------------------------------------------------------------------
say "building periscope and the metrics tools (release)"
cargo build --release -p periscope
cargo build --release -p periscope-bench --bin scrape-bench --bin metrics-target

# --- the parser in process ------------------------------------------------------------------
say "parser: $SERIES series, $PARSE_SECONDS CPU-seconds per format"
"$BIN/scrape-bench" --series "$SERIES" --seconds "$PARSE_SECONDS" --report "$RUN/parse.report" | sed 's/^/  /' >&2

# --- the exposition -------------------------------------------------------------------------
EXPOSITION=$RUN/exposition.txt
written=$("$BIN/scrape-bench" --series "$SERIES" --write "$EXPOSITION")
VALUE_SUM=${written##*value_sum=}
: >"$RUN/empty.txt"
PERISCOPE_VERSION=$("$BIN/periscope" --version | awk '{ print $2 }')
PROMETHEUS_VERSION=$("$PROMETHEUS" --version 2>&1 | awk 'NR == 1 { print $3 }')
# The series the agents add per target (up, scrape_duration_seconds, ...) are left out of
# every check.
BENCH='job="bench",__name__!~"up|scrape_.+"'

# --- helpers --------------------------------------------------------------------------------
# promql PORT QUERY: the first value of an instant query, or nothing.
promql() {
  curl -fsS --max-time 60 --data-urlencode "query=$2" "http://127.0.0.1:$1/api/v1/query" |
    jq -r '.data.result[0].value[1] // empty'
}

# appended PORT: samples the receiver has appended (its own counter, all types).
appended() {
  curl -fsS --max-time 10 "http://127.0.0.1:$1/metrics" |
    awk '$1 ~ /^prometheus_tsdb_head_samples_appended_total/ { s += $2 } END { printf "%.0f\n", s }'
}

# receiver_counter PORT NAME: the sum of a counter of the receiver over its labels.
receiver_counter() {
  curl -fsS --max-time 10 "http://127.0.0.1:$1/metrics" |
    awk -v name="$2" '$1 == name || index($1, name "{") == 1 { s += $2 } END { printf "%.0f\n", s }'
}

# bench_series PORT: series of the bench job the receiver holds now.
bench_series() {
  promql "$1" "count({$BENCH})"
}

# ready URL: answers 2xx (quietly: the agents take a moment to listen).
ready() {
  ready_http "$1" 2>/dev/null
}

has_all_series() {
  [ "$(bench_series "$RECV_PORT" || true)" = "$SERIES" ]
}

# bench_samples PORT NAMES...: samples of the bench job the receiver holds, staleness markers
# left out (counted one metric name at a time: without its name, a histogram's `_sum` and
# `_count` series would clash).
bench_samples() {
  local port=$1 total=0 name count
  shift
  for name in "$@"; do
    count=$(promql "$port" "sum(count_over_time(${name}{job=\"bench\"}[1h]))" || true)
    total=$((total + ${count:-0}))
  done
  echo "$total"
}

has_all_samples() {
  [ "$(bench_samples "$RECV_PORT" "${NAMES[@]}")" -ge "$EXPECTED" ]
}

target_scrapes() {
  field "$TARGET_STATS" scrapes
}

# scraped_more_than N: the target has answered more than N scrapes.
scraped_more_than() {
  [ "$(target_scrapes)" -gt "$1" ]
}

# stop_within SECONDS PID: asks the process to stop, and kills it if it has not after SECONDS.
stop_within() {
  local tries=$(($1 * 10)) pid=$2
  kill "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && [ "$tries" -gt 0 ]; do
    sleep 0.1
    tries=$((tries - 1))
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

median() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}

# start_receiver NAME: a fresh Prometheus taking remote write; sets RECV_PORT, RECV_PID.
start_receiver() {
  RECV_PORT=$(free_port)
  echo 'global: {}' >"$RUN/receiver.yml"
  start "$RUN/$1-$ROUND-receiver.log" "$PROMETHEUS" --config.file="$RUN/receiver.yml" \
    --storage.tsdb.path="$RUN/$1-$ROUND-receiver" --web.listen-address="127.0.0.1:$RECV_PORT" \
    --web.enable-remote-write-receiver
  RECV_PID=$LAST_PID
  wait_until 60 "$RECV_PID" "receiver for $1" ready "http://127.0.0.1:$RECV_PORT/-/ready"
}

# start_target NAME BODY: sets TARGET_PORT, TARGET_PID, TARGET_STATS.
start_target() {
  TARGET_PORT=$(free_port)
  TARGET_STATS=$RUN/$1-$ROUND-target.stats
  start "$RUN/$1-$ROUND-target.log" "$BIN/metrics-target" --listen "127.0.0.1:$TARGET_PORT" --body "$2" \
    --stats "$TARGET_STATS"
  TARGET_PID=$LAST_PID
  wait_until 30 "$TARGET_PID" "target for $1" test -s "$TARGET_STATS"
}

stop_target() {
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$TARGET_PORT/quit" || true
  stop_within 10 "$TARGET_PID"
}

# start_agent NAME: the agent scraping the target and writing to the receiver, with a fresh
# data folder; sets AGENT_PID, AGENT_PORT (its HTTP port), or returns 1 when it is not ready.
start_agent() {
  local name=$1 tag=$1-$ROUND-$PHASE
  AGENT_PORT=$(free_port)
  case $name in
    periscope)
      cat >"$RUN/$tag.yaml" <<EOF
node_name: bench
data_dir: $RUN/$tag-data
server: { listen: 127.0.0.1:$AGENT_PORT }
sources:
  otlp: { grpc: null, http: null }
  host_metrics: { enabled: false }
  prometheus:
    scrape_interval: ${INTERVAL}s
    scrape_timeout: ${INTERVAL}s
    static_targets:
      - { job: bench, url: http://127.0.0.1:$TARGET_PORT/metrics }
paths: { enabled: false }
exporters:
  prometheus_remote_write: { url: http://127.0.0.1:$RECV_PORT/api/v1/write }
EOF
      start "$RUN/$tag.log" "$BIN/periscope" run --config "$RUN/$tag.yaml"
      AGENT_PID=$LAST_PID
      wait_until 30 "$AGENT_PID" "$tag: /readyz" ready "http://127.0.0.1:$AGENT_PORT/readyz"
      ;;
    prometheus)
      cat >"$RUN/$tag.yml" <<EOF
global:
  scrape_interval: ${INTERVAL}s
  scrape_timeout: ${INTERVAL}s
scrape_configs:
  - job_name: bench
    static_configs:
      - targets: ['127.0.0.1:$TARGET_PORT']
remote_write:
  - url: http://127.0.0.1:$RECV_PORT/api/v1/write
EOF
      start "$RUN/$tag.log" "$PROMETHEUS" --enable-feature=agent --config.file="$RUN/$tag.yml" \
        --storage.agent.path="$RUN/$tag-data" --web.listen-address="127.0.0.1:$AGENT_PORT"
      AGENT_PID=$LAST_PID
      wait_until 30 "$AGENT_PID" "$tag: /-/ready" ready "http://127.0.0.1:$AGENT_PORT/-/ready"
      ;;
  esac
}

# profile_prometheus SECONDS FILE: a CPU profile of the Prometheus agent over SECONDS, taken
# in the background from its pprof endpoint.
profile_prometheus() {
  curl -fsS --max-time $(($1 + 30)) -o "$2" "http://127.0.0.1:$AGENT_PORT/debug/pprof/profile?seconds=$1" \
    2>>"$RUN/profiles.log" &
  PROFILER_PID=$!
}

# parser_seconds FILE: CPU-seconds a Prometheus profile spent in its exposition parser
# (package model/textparse, all it calls included), or nothing without `go`.
parser_seconds() {
  command -v go >/dev/null || return 0
  # "Showing nodes accounting for 1.23s, 9.03% of 13.6s total", with the focus on the parser.
  go tool pprof -top -focus='model/textparse' "$1" 2>/dev/null | awk '/^Showing nodes accounting for/ {
    value = $5; sub(/,$/, "", value)
    unit = value; sub(/^[0-9.]+/, "", unit); sub(/[a-z]+$/, "", value)
    scale = unit == "ms" ? 1e-3 : unit == "us" ? 1e-6 : unit == "min" ? 60 : unit == "h" ? 3600 : 1
    printf "%.4f\n", value * scale; exit
  }'
}

# --- one agent, one round -------------------------------------------------------------------
# Each measured pass is one line of $PASSES (tab-separated): agent, round, version, CPU-s per
# cycle, CPU-s per 1M samples, samples/s appended, peak RSS MiB, steady RSS MiB, idle RSS MiB,
# bytes per series, check. Each profiled Prometheus pass adds its parser's samples per CPU-s to
# $PEER_PARSE.
PASSES=$RUN/passes.tsv
PEER_PARSE=$RUN/prometheus-parse.txt
: >"$PASSES"
: >"$PEER_PARSE"
NOTES=()
ROUND=0

run_agent() {
  local name=$1 pass="$1 (round $ROUND)"
  start_receiver "$name"

  # Idle: the same agent and config, scraping a target with nothing to expose.
  PHASE=idle
  start_target "$name-idle" "$RUN/empty.txt"
  local idle_kib=""
  if start_agent "$name"; then
    wait_until $((INTERVAL * 3)) "$AGENT_PID" "$pass: a first scrape of the empty target" scraped_more_than 0 || true
    sleep $((INTERVAL + 1))
    idle_kib=$(status_kib "$AGENT_PID" VmRSS)
  else
    NOTES+=("$pass: not ready when idle (see bench/.work/metrics/$name-$ROUND-idle.log)")
  fi
  stop_within 30 "$AGENT_PID"
  stop_target

  # Load: the exposition, scraped every INTERVAL.
  PHASE=load
  start_target "$name" "$EXPOSITION"
  if ! start_agent "$name"; then
    NOTES+=("$pass: not ready (see bench/.work/metrics/$name-$ROUND-load.log)")
    stop_within 30 "$AGENT_PID"
    stop_target
    stop_within 30 "$RECV_PID"
    return
  fi
  say "$pass: waiting for the first scrape to reach the receiver"
  if ! wait_until "$DEADLINE" "$AGENT_PID" "$pass: all $SERIES series at the receiver" has_all_series; then
    NOTES+=("$pass: the receiver had $(bench_series "$RECV_PORT" || echo "?") of $SERIES series after ${DEADLINE}s")
  fi
  mapfile -t NAMES < <(curl -fsS --data-urlencode "query=count by (__name__) ({$BENCH})" \
    "http://127.0.0.1:$RECV_PORT/api/v1/query" | jq -r '.data.result[].metric.__name__')

  # The measured cycles run from one scrape's start to the start of the scrape CYCLES later.
  local first
  first=$(target_scrapes)
  wait_until $((INTERVAL * 3)) "$AGENT_PID" "$pass: the next scrape" scraped_more_than "$first" || true
  local start_scrapes start_ns cpu_before appended_before rss_file=$RUN/$name-$ROUND-rss.txt
  start_scrapes=$(target_scrapes)
  start_ns=$(date +%s%N)
  cpu_before=$(cpu_ticks "$AGENT_PID")
  appended_before=$(appended "$RECV_PORT")
  local profile=""
  if [ "$PROFILE" = 1 ] && [ "$name" = prometheus ]; then
    profile=$RUN/$name-$ROUND.pprof
    profile_prometheus $((CYCLES * INTERVAL - 1)) "$profile"
  fi
  say "$pass: measuring $CYCLES scrape cycles"
  : >"$rss_file"
  local ticks=0 limit=$(((CYCLES + 2) * INTERVAL * 10))
  while [ "$(target_scrapes)" -lt $((start_scrapes + CYCLES)) ] && kill -0 "$AGENT_PID" 2>/dev/null; do
    if [ $((ticks % 10)) = 0 ]; then status_kib "$AGENT_PID" VmRSS >>"$rss_file"; fi
    ticks=$((ticks + 1))
    if [ "$ticks" -ge "$limit" ]; then break; fi
    sleep 0.1
  done
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then
    NOTES+=("$pass: the agent exited (see bench/.work/metrics/$name-$ROUND-load.log)")
    stop_target
    stop_within 30 "$RECV_PID"
    return
  fi
  local cpu_after end_ns appended_after cycles hwm value_sum
  cpu_after=$(cpu_ticks "$AGENT_PID")
  end_ns=$(date +%s%N)
  appended_after=$(appended "$RECV_PORT")
  cycles=$(($(target_scrapes) - start_scrapes))
  hwm=$(status_kib "$AGENT_PID" VmHWM)
  value_sum=$(promql "$RECV_PORT" "sum({$BENCH})" || true)
  if [ "$cycles" -lt "$CYCLES" ]; then
    NOTES+=("$pass: only $cycles scrapes in $(((end_ns - start_ns) / 1000000000))s (the agent fell behind its interval)")
  fi
  if [ -n "$profile" ]; then wait "$PROFILER_PID" 2>/dev/null || true; fi

  # Every scrape the target answered must reach the receiver, sample for sample.
  stop_target
  local scrapes check=ok
  scrapes=$(target_scrapes)
  EXPECTED=$((scrapes * SERIES))
  if ! wait_until "$DEADLINE" "$AGENT_PID" "$pass: all $EXPECTED samples at the receiver" has_all_samples; then
    check="missing samples"
  fi
  local got out_of_order
  got=$(bench_samples "$RECV_PORT" "${NAMES[@]}")
  out_of_order=$(receiver_counter "$RECV_PORT" prometheus_tsdb_out_of_order_samples_total)
  if [ "$got" != "$EXPECTED" ]; then
    NOTES+=("$pass: the receiver holds $got samples of the bench series for $scrapes scrapes of $SERIES ($EXPECTED)")
    check="$got of $EXPECTED samples"
  fi
  if ! awk -v a="$value_sum" -v b="$VALUE_SUM" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-9 * b) }'; then
    NOTES+=("$pass: the bench series add up to ${value_sum:-nothing} at the receiver, ${VALUE_SUM} in the exposition")
    check="values differ"
  fi
  if [ "${out_of_order:-0}" != 0 ]; then
    NOTES+=("$pass: the receiver refused $out_of_order samples as out of order")
    check="out of order"
  fi
  say "$pass: $scrapes scrapes, $got samples at the receiver ($check)"
  stop_within 30 "$AGENT_PID"
  stop_within 30 "$RECV_PID"

  if [ -n "$profile" ] && [ -s "$profile" ]; then
    local seconds
    seconds=$(parser_seconds "$profile" || true)
    if [ -n "$seconds" ]; then
      # The profile spans about CYCLES scrapes.
      awk -v s="$seconds" -v n=$((CYCLES * SERIES)) 'BEGIN { if (s > 0) printf "%.0f\n", n / s }' >>"$PEER_PARSE"
    fi
  fi
  local steady_kib version
  steady_kib=$(median <"$rss_file")
  case $name in
    periscope) version=$PERISCOPE_VERSION ;;
    prometheus) version="$PROMETHEUS_VERSION (agent mode)" ;;
  esac
  local line
  line=$(awk -v name="$name" -v round="$ROUND" -v version="$version" -v ticks=$((cpu_after - cpu_before)) \
    -v tck="$CLK_TCK" -v cycles="$cycles" -v series="$SERIES" -v ns=$((end_ns - start_ns)) \
    -v appended=$((appended_after - appended_before)) -v hwm="$hwm" -v steady="$steady_kib" \
    -v idle="$idle_kib" -v check="$check" 'BEGIN {
      cpu = ticks / tck
      per_cycle = cycles > 0 ? cpu / cycles : 0
      per_million = cycles > 0 ? cpu / (cycles * series / 1e6) : 0
      rate = ns > 0 ? appended / (ns / 1e9) : 0
      per_series = idle != "" ? sprintf("%.0f", (steady - idle) * 1024 / series) : "–"
      idle_mib = idle != "" ? sprintf("%.1f", idle / 1024) : "–"
      printf "%s\t%d\t%s\t%.2f\t%.2f\t%.0f\t%.1f\t%.1f\t%s\t%s\t%s\n", name, round, version, per_cycle,
        per_million, rate, hwm / 1024, steady / 1024, idle_mib, per_series, check
    }')
  echo "$line" >>"$PASSES"
  say "$pass: $(row_of_metrics "$line")"
}

row_of_metrics() {
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $3, $4, $5, $6, $7, $8, $9, $10, $11 }' <<<"$1"
}

# The agents take turns, so a disturbance of the machine spreads over both rather than
# landing on one.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for agent in $AGENTS; do
    run_agent "$agent"
  done
done

# --- report ---------------------------------------------------------------------------------
# median_pass AGENT: the agent's median pass by CPU-seconds per million samples.
median_pass() {
  awk -F'\t' -v a="$1" '$1 == a' "$PASSES" | sort -t$'\t' -k5,5g |
    awk '{ r[NR] = $0 } END { if (NR) print r[int((NR + 1) / 2)] }'
}

SUMMARY=()
for agent in $AGENTS; do
  pass=$(median_pass "$agent")
  if [ -z "$pass" ]; then
    SUMMARY+=("| $agent | – | – | – | – | – | – | – | – | not measured |")
  else
    SUMMARY+=("$(row_of_metrics "$pass")")
  fi
done

# shellcheck disable=SC1091 # name=value lines written by scrape-bench
source "$RUN/parse.report"
# parse_row PARSER FORMAT BYTES SAMPLES_PER_CPU_S [VERDICT]: VERDICT, or whether the rate
# meets the target.
parse_row() {
  awk -v parser="$1" -v format="$2" -v bytes="$3" -v rate="$4" -v verdict="${5:-}" -v series="$SERIES" 'BEGIN {
    ms = rate > 0 ? series / rate * 1e3 : 0
    if (verdict == "") verdict = rate >= 20e6 ? "met" : "not met"
    throughput = ms > 0 ? bytes / (ms / 1e3) / 1e6 : 0
    printf "| %s | %s | %.1f | %.2f | %.0f | %s |\n", parser, format, ms, rate / 1e6, throughput, verdict
  }'
}
PEER_RATE=$(median <"$PEER_PARSE")

SECTION=$RUN/section.md
{
  echo "## Metrics: scrape and remote write"
  echo
  # shellcheck disable=SC2154 # from parse.report
  echo "Parsing the $SERIES-series exposition ($(awk -v b="$text_bytes" 'BEGIN { printf "%.1f", b / 1e6 }') MB as text):"
  echo "Periscope in process (\`scrape-bench\`, median of repeated reads): a scrape whose series are those of the"
  echo "previous scrape (the usual case, read by the target's template), the parser alone, and a first scrape;"
  echo "Prometheus' parser"
  echo "(package \`model/textparse\`) inside the agent during the passes below, from its CPU profile."
  echo
  echo "| parser | format | CPU ms per parse | M samples per CPU-s | MB per CPU-s | target: 20M samples per CPU-s |"
  echo "|---|---|---:|---:|---:|---|"
  # shellcheck disable=SC2154 # from parse.report
  parse_row "periscope, scrape of unchanged series (template)" "text 0.0.4" "$text_bytes" "$text_template_samples_per_cpu_s"
  # shellcheck disable=SC2154 # from parse.report
  parse_row "periscope, scrape of unchanged series (template)" "OpenMetrics 1.0" "$openmetrics_bytes" "$openmetrics_template_samples_per_cpu_s"
  # shellcheck disable=SC2154 # from parse.report
  parse_row "periscope, full parse" "text 0.0.4" "$text_bytes" "$text_samples_per_cpu_s" "(part of a first scrape)"
  # shellcheck disable=SC2154 # from parse.report
  parse_row "periscope, full parse" "OpenMetrics 1.0" "$openmetrics_bytes" "$openmetrics_samples_per_cpu_s" "(part of a first scrape)"
  # shellcheck disable=SC2154 # from parse.report
  parse_row "periscope, first scrape (full parse, series table, template)" "text 0.0.4" "$text_bytes" "$text_first_samples_per_cpu_s" "(once per change of series)"
  if [ -n "$PEER_RATE" ]; then
    parse_row "prometheus $PROMETHEUS_VERSION" "text 0.0.4" "$text_bytes" "$PEER_RATE" "(peer)"
  fi
  echo
  echo "Scraping the same exposition (text 0.0.4, gzip) every ${INTERVAL}s and remote-writing it to a"
  echo "Prometheus receiver; $CYCLES scrape cycles measured per pass, $ROUNDS rounds, the agents taking turns."
  echo "Each row is the agent's median pass by CPU-s per 1M samples."
  echo
  echo "| agent | version | CPU-s per scrape cycle | CPU-s per 1M samples | samples/s at receiver | peak RSS (MiB) | steady RSS (MiB) | idle RSS (MiB) | bytes per series | receiver has every sample |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${SUMMARY[@]}"
  if [ "$ROUNDS" -gt 1 ] && [ -s "$PASSES" ]; then
    echo
    echo "<details><summary>All passes</summary>"
    echo
    echo "| agent | round | CPU-s per scrape cycle | CPU-s per 1M samples | samples/s at receiver | peak RSS (MiB) | steady RSS (MiB) | idle RSS (MiB) | bytes per series | receiver has every sample |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $4, $5, $6, $7, $8, $9, $10, $11 }' "$PASSES"
    echo
    echo "</details>"
  fi
  # The memory target is judged on the median of Periscope's passes.
  per_series=$(awk -F'\t' '$1 == "periscope" && $10 ~ /^-?[0-9]+$/ { print $10 }' "$PASSES" | median)
  if [ -n "$per_series" ]; then
    echo
    if [ "$per_series" -lt 1024 ]; then
      echo "Target under 1 KiB of agent memory per active series: met (median $per_series bytes)."
    else
      echo "Target under 1 KiB of agent memory per active series: not met (median $per_series bytes)."
    fi
  fi
  if [ "${#NOTES[@]}" -gt 0 ]; then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
  echo
  echo "Load average (1, 5, 15 min) at the start: $LOAD_BEFORE; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  machine_line
} >"$SECTION"

cat "$SECTION"
write_section metrics "$SECTION"
say "written to bench/results.md; logs, configs and profiles in bench/.work/metrics/"
