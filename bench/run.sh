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
RUN=$ROOT/bench/.work/run
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

SPANS=${SPANS:-2000000}
BATCH=${BATCH:-512}
CONCURRENCY=${CONCURRENCY:-4}
AGENTS=${AGENTS:-periscope rotel}
ROUNDS=${ROUNDS:-3}
DEADLINE=${DEADLINE:-120}
check_knobs SPANS BATCH CONCURRENCY ROUNDS DEADLINE

rm -rf "$RUN"
mkdir -p "$RUN"

# --- build ----------------------------------------------------------------------------------
packages=(-p periscope-bench)
case " $AGENTS " in *" periscope "*) packages=(-p periscope "${packages[@]}") ;; esac
say "building ${packages[*]} (release)"
cargo build --release "${packages[@]}"

# --- rotel ---------------------------------------------------------------------------------
case " $AGENTS " in
  *" rotel "*)
    find_rotel || say "$ROTEL_NOTE"
    ;;
esac

# --- one pass -------------------------------------------------------------------------------
# Each successful pass is one line of $PASSES: agent, round, version, spans/s, CPU-s per 1M
# spans, peak RSS MiB, RSS before load MiB, retries (tab-separated).
PASSES=$RUN/passes.tsv
: >"$PASSES"
NOTES=()
ROUND=0

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

# Rotel as a plain pass-through (see rotel_args in bench/common.sh).
ROTEL_ARGS_SHOWN=""
run_rotel() {
  start_sink rotel
  local grpc http
  grpc=$(free_port)
  http=$(free_port)
  rotel_args "$grpc" "$http" "$SINK_PORT"
  ROTEL_ARGS_SHOWN="rotel-agent ${ROTEL_ARGS[*]//$ROOT\//}"
  start "$RUN/rotel-$ROUND.log" "$ROTEL" "${ROTEL_ARGS[@]}"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "rotel: gRPC port" port_open "$grpc"; then
    measure rotel "$(rotel_version)" "$pid" "$grpc"
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
SECTION=$RUN/section.md
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
  machine_line
  if [ -n "$ROTEL_ARGS_SHOWN" ]; then
    echo
    echo "Rotel ran as \`$ROTEL_ARGS_SHOWN\` (ports and paths vary per run)."
  fi
} >"$SECTION"
write_section passthrough "$SECTION"

echo
cat "$SECTION"
