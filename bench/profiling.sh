#!/usr/bin/env bash
# Profiling overhead: the CPU Periscope spends on the traces pass-through load of bench/run.sh
# while it profiles itself (`GET /debug/pprof/profile` at FREQUENCY Hz over the whole load),
# against the same load unprofiled.
#
# 1. Native passes, unprofiled and profiled taking turns for ROUNDS rounds, each with a fresh
#    agent and sink: CPU time of the agent per span (and instructions per span when `perf stat
#    -e instructions:u` counts on this machine; SIGPROF deliveries when perf can count the
#    `signal:signal_deliver` tracepoint). A profiled pass counts only when its capture ran from
#    before the load to after it and delivered a gzipped profile with samples in it.
# 2. One profiled pass of CALLGRIND_SPANS spans with the agent under valgrind's callgrind: the
#    instructions of the agent's own work per span, and of the profiler's signal handler per
#    sample. With the samples per span of the native passes, these give the overhead in
#    instructions, free of the machine's noise.
#
# Prints a Markdown table and writes it, with the machine it ran on, to bench/results.md.
#
#   bash bench/profiling.sh
#
# Knobs (environment): SPANS per native pass (1000000), BATCH (spans per request, 512),
# CONCURRENCY (clients, 4), ROUNDS (5), FREQUENCY (Hz of the profiled passes, 99),
# CAPTURE_SECONDS (length of each capture; by default twice the warm-up pass's load time plus
# 5 s), CALLGRIND_SPANS (spans of the callgrind pass, 50000; 0 leaves it out), PERF_EVENT
# (instructions:u; empty for none), DEADLINE (seconds to wait for the last span, 120). The
# binaries are taken from $CARGO_TARGET_DIR/release when that is set, target/release otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/bench/.work/profiling
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"

SPANS=${SPANS:-1000000}
BATCH=${BATCH:-512}
CONCURRENCY=${CONCURRENCY:-4}
ROUNDS=${ROUNDS:-5}
FREQUENCY=${FREQUENCY:-99}
CAPTURE_SECONDS=${CAPTURE_SECONDS:-auto}
CALLGRIND_SPANS=${CALLGRIND_SPANS:-50000}
PERF_EVENT=${PERF_EVENT-instructions:u}
DEADLINE=${DEADLINE:-120}
check_knobs SPANS BATCH CONCURRENCY ROUNDS FREQUENCY DEADLINE
if [ "$FREQUENCY" -gt 1000 ]; then
  say "FREQUENCY must be 1 to 1000 (Hz; the agent's limit)"
  exit 2
fi
if [ "$CAPTURE_SECONDS" != auto ]; then
  check_knobs CAPTURE_SECONDS
  if [ "$CAPTURE_SECONDS" -gt 300 ]; then
    say "CAPTURE_SECONDS must be at most 300 (the agent's limit)"
    exit 2
  fi
fi
if ! [[ $CALLGRIND_SPANS =~ ^[0-9]+$ ]]; then
  say "CALLGRIND_SPANS must be a whole number (0: no callgrind pass)"
  exit 2
fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  case $CARGO_TARGET_DIR in
    /*) BIN=$CARGO_TARGET_DIR/release ;;
    *) BIN=$ROOT/$CARGO_TARGET_DIR/release ;;
  esac
fi

rm -rf "$RUN"
mkdir -p "$RUN"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# --- build ----------------------------------------------------------------------------------
say "building periscope and periscope-bench (release)"
cargo build --release -p periscope -p periscope-bench

NOTES=()

# --- perf -----------------------------------------------------------------------------------
# perf_probe EVENT [FILTER]: what `perf stat` counts for EVENT over `true` (a number when the
# event can be counted here; `<not supported>` in a machine without hardware counters).
perf_probe() {
  local args=(-x "," -e "$1")
  if [ "$#" -gt 1 ]; then args+=(--filter "$2"); fi
  perf stat "${args[@]}" true 2>&1 >/dev/null | awk -F, '!/^#/ && NF > 2 { print $1; exit }' || true
}

# INSTR: the instruction event counted per pass, if any. SIGNALS: 1 when the SIGPROF
# deliveries to the agent can be counted (the tracepoint needs root or perf_event_paranoid -1).
INSTR=""
SIGNALS=""
SIGPROF=$(kill -l SIGPROF)
if command -v perf >/dev/null; then
  if [ -n "$PERF_EVENT" ]; then
    probe=$(perf_probe "$PERF_EVENT")
    if [[ $probe =~ ^[0-9.]+$ ]]; then
      INSTR=$PERF_EVENT
    else
      NOTES+=("\`$PERF_EVENT\` not counted: \`perf stat -e $PERF_EVENT\` answers \`${probe:-nothing}\` on this machine (no hardware counters); the callgrind pass counts instructions instead")
    fi
  fi
  if [[ $(perf_probe signal:signal_deliver "sig == $SIGPROF") =~ ^[0-9]+$ ]]; then SIGNALS=1; fi
elif [ -n "$PERF_EVENT" ]; then
  NOTES+=("\`$PERF_EVENT\` not counted: no \`perf\` on this machine")
fi

# --- helpers --------------------------------------------------------------------------------
arm_name() {
  if [ "$1" -eq 0 ]; then echo unprofiled; else echo "profiled at $1 Hz"; fi
}

# The profiler runs on a thread of its own (`periscope-profiler`, 15 characters in comm) for
# as long as a capture lasts.
profiler_running() {
  grep -qs '^periscope-prof' /proc/"$1"/task/*/comm
}

gone() {
  ! kill -0 "$1" 2>/dev/null
}

now_ns() {
  date +%s%N
}

# settle PID: waits (up to 20 s) until PID has used no CPU for 300 ms, so that start-up work
# (and, when a capture starts, the profiler's own start) is over before a CPU reading.
settle() {
  local before after tries=0
  before=$(cpu_ticks "$1")
  while sleep 0.3; do
    after=$(cpu_ticks "$1")
    tries=$((tries + 1))
    if [ "$after" -eq "$before" ] || [ "$tries" -ge 66 ]; then return; fi
    before=$after
  done
}

# curl's complaints while the agent is not yet listening are no news.
ready_quietly() {
  ready_http "$1" 2>/dev/null
}

ticks_to_s() {
  awk -v t="$1" -v tck="$CLK_TCK" 'BEGIN { printf "%.2f", t / tck }'
}

# profile_samples FILE: the samples in a gzipped profile.proto (the first value of every
# sample, summed), or nothing when FILE is not one.
profile_samples() {
  python3 - "$1" <<'EOF'
import gzip, sys

def varint(b, i):
    x = s = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return x, i

def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, v

try:
    data = gzip.decompress(open(sys.argv[1], "rb").read())
    total = 0
    for number, wire, sample in fields(data):
        if number == 2 and wire == 2:  # Profile.sample
            for n, w, value in fields(sample):
                if n == 2:  # Sample.value: packed, or the first of repeated varints
                    total += varint(value, 0)[0] if w == 2 else value
                    break
    print(total)
except Exception:
    pass
EOF
}

# perf_value FILE EVENT: the count of EVENT in `perf stat -x,` output, or - when there is none.
perf_value() {
  local value
  value=$(awk -F, -v event="$2" '!/^#/ && $3 == event { print $1; exit }' "$1" 2>/dev/null)
  if [[ $value =~ ^[0-9.]+$ ]]; then echo "$value"; else echo -; fi
}

# write_config FILE ADMIN_PORT GRPC_PORT DATA_DIR: Periscope as in bench/run.sh.
write_config() {
  cat >"$1" <<EOF
node_name: bench
data_dir: $4
server: { listen: 127.0.0.1:$2 }
sources:
  otlp: { grpc: 127.0.0.1:$3, http: null }
  host_metrics: { enabled: false }
paths: { enabled: false }
exporters:
  jaeger: { endpoint: http://127.0.0.1:$SINK_PORT, protocol: grpc }
EOF
}

# start_capture PID ADMIN_PORT HZ SECONDS TAG: starts a capture of the agent with curl, its
# pid in $CAPTURE_PID; fails (with a note) when the profiler does not start.
start_capture() {
  local pid=$1 admin=$2 hz=$3 seconds=$4 tag=$5
  curl -sS -o "$RUN/profile-$tag.pb.gz" -w '%{http_code}' \
    "http://127.0.0.1:$admin/debug/pprof/profile?seconds=$seconds&frequency=$hz&format=pprof" \
    >"$RUN/capture-$tag.status" 2>"$RUN/capture-$tag.err" &
  CAPTURE_PID=$!
  STARTED+=("$CAPTURE_PID")
  if ! wait_until 10 "$CAPTURE_PID" "capture $tag: the profiler thread" profiler_running "$pid"; then
    NOTES+=("capture $tag did not start (HTTP $(cat "$RUN/capture-$tag.status"): $(head -c 200 "$RUN/profile-$tag.pb.gz" 2>/dev/null))")
    stop "$CAPTURE_PID"
    return 1
  fi
}

# load PID GRPC_PORT SPANS REPORT WHAT: sends SPANS spans and waits until the sink has them all.
load() {
  local pid=$1 grpc=$2 spans=$3 report=$4 what=$5
  say "$what: sending $spans spans ($BATCH per request, $CONCURRENCY clients)"
  if ! "$BIN/otlp-loadgen" --endpoint "http://127.0.0.1:$grpc" --spans "$spans" --batch "$BATCH" \
    --concurrency "$CONCURRENCY" --report "$report" | sed 's/^/  /' >&2; then
    NOTES+=("$what: the load generator reported failed requests (see the script's output)")
  fi
  if [ ! -s "$report" ]; then
    NOTES+=("$what: the load generator could not send (see the script's output); not counted")
    return 1
  fi
  if ! SPANS=$spans wait_until "$DEADLINE" "$pid" "$what: all $spans spans at the sink" sink_has_all; then
    NOTES+=("$what: only $(sink_spans) of $spans spans reached the sink within ${DEADLINE}s; not counted")
    return 1
  fi
}

# --- native passes --------------------------------------------------------------------------
# Each counted pass is one line of $PASSES (tab-separated): round, Hz (0: unprofiled), spans/s,
# CPU-s per 1M spans, INSTR per span, SIGPROF deliveries, samples in the profile, profile bytes,
# CPU-s to start the capture, CPU-s from the end of the load until the profile arrived, 1-minute
# load average at the start of the load, CPU-s over the load, peak RSS KiB. A - stands for a
# figure not taken.
PASSES=$RUN/passes.tsv
: >"$PASSES"
ROUND=0
LOAD_NS=0

# run_pass HZ [warm-up]: one agent, one load; profiled all along when HZ > 0.
run_pass() {
  local hz=$1 warmup=${2:-}
  local tag=$ROUND-$hz what
  what="$(arm_name "$hz") (round $ROUND)"
  if [ -n "$warmup" ]; then what="warm-up"; fi
  start_sink "periscope-$hz"
  local admin grpc
  admin=$(free_port)
  grpc=$(free_port)
  write_config "$RUN/periscope-$tag.yaml" "$admin" "$grpc" "$RUN/periscope-data-$tag"
  start "$RUN/periscope-$tag.log" "$BIN/periscope" run --config "$RUN/periscope-$tag.yaml"
  local pid=$LAST_PID
  if wait_until 30 "$pid" "$what: /readyz" ready_quietly "http://127.0.0.1:$admin/readyz"; then
    measure_pass "$hz" "$pid" "$admin" "$grpc" "$what" "$tag" "$warmup" || true
  else
    NOTES+=("$what: not ready (see bench/.work/profiling/periscope-$tag.log)")
  fi
  stop "$pid"
  stop "$SINK_PID"
}

measure_pass() {
  local hz=$1 pid=$2 admin=$3 grpc=$4 what=$5 tag=$6 warmup=$7
  local report=$RUN/loadgen-$tag.report profile=$RUN/profile-$tag.pb.gz perf_pid=""
  local start_cpu="-" cpu_capture
  settle "$pid"
  if [ "$hz" -gt 0 ]; then
    cpu_capture=$(cpu_ticks "$pid")
    start_capture "$pid" "$admin" "$hz" "$CAPTURE_SECONDS" "$tag" || return 1
  fi
  settle "$pid"
  if [ "$hz" -gt 0 ]; then start_cpu=$(ticks_to_s $(($(cpu_ticks "$pid") - cpu_capture))); fi
  local events=()
  if [ -n "$INSTR" ]; then events+=(-e "$INSTR"); fi
  if [ -n "$SIGNALS" ]; then events+=(-e signal:signal_deliver --filter "sig == $SIGPROF"); fi
  if [ "${#events[@]}" -gt 0 ]; then
    perf stat -x, "${events[@]}" -p "$pid" -o "$RUN/perf-$tag.txt" &
    perf_pid=$!
    STARTED+=("$perf_pid")
    sleep 0.3 # attached before the load starts; the agent is idle meanwhile
  fi
  local load1 cpu_before cpu_after start_ns
  load1=$(cut -d' ' -f1 /proc/loadavg)
  cpu_before=$(cpu_ticks "$pid")
  start_ns=$(now_ns)
  load "$pid" "$grpc" "$SPANS" "$report" "$what" || return 1
  cpu_after=$(cpu_ticks "$pid")
  LOAD_NS=$(($(now_ns) - start_ns))
  local per_span="-" signals="-"
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    if [ -n "$INSTR" ]; then
      per_span=$(awk -v n="$(perf_value "$RUN/perf-$tag.txt" "$INSTR")" -v spans="$SPANS" \
        'BEGIN { if (n == "-") print "-"; else printf "%.0f\n", n / spans }')
    fi
    if [ -n "$SIGNALS" ]; then signals=$(perf_value "$RUN/perf-$tag.txt" signal:signal_deliver); fi
  fi
  if [ -n "$warmup" ]; then return; fi

  # The profile: the capture must have outlasted the load and delivered samples.
  local samples="-" bytes="-" build="-"
  if [ "$hz" -gt 0 ]; then
    if gone "$CAPTURE_PID" || ! profiler_running "$pid"; then
      NOTES+=("$what: the capture ended before the load did (raise CAPTURE_SECONDS); not counted")
      stop "$CAPTURE_PID"
      return 1
    fi
    wait_until $((CAPTURE_SECONDS + 60)) "$pid" "$what: the profile" gone "$CAPTURE_PID" || true
    build=$(ticks_to_s $(($(cpu_ticks "$pid") - cpu_after)))
    stop "$CAPTURE_PID"
    local status magic
    status=$(cat "$RUN/capture-$tag.status" 2>/dev/null || true)
    bytes=$(stat -c %s "$profile" 2>/dev/null || echo 0)
    magic=$(head -c 2 "$profile" 2>/dev/null | od -An -tx1 | tr -d ' \n')
    samples=$(profile_samples "$profile")
    if [ "$status" != 200 ] || [ "$bytes" -eq 0 ] || [ "$magic" != 1f8b ] || ! [[ $samples =~ ^[1-9][0-9]*$ ]]; then
      NOTES+=("$what: no usable profile (HTTP ${status:-none}, $bytes bytes, samples: ${samples:-not a gzipped profile}; see bench/.work/profiling/capture-$tag.err); not counted")
      return 1
    fi
  fi
  if gone "$pid"; then
    NOTES+=("$what: the agent exited during the run (see bench/.work/profiling/periscope-$tag.log); not counted")
    return 1
  fi
  local hwm
  hwm=$(status_kib "$pid" VmHWM)
  sleep 0.5 # anything arriving late (a duplicate from a retry) shows in the count
  local received last_ns first_ns retries line
  received=$(sink_spans)
  last_ns=$(field "$SINK_STATS" last_ns)
  first_ns=$(field "$report" start_ns)
  retries=$(field "$report" retries)
  if [ "$received" -gt "$SPANS" ]; then
    NOTES+=("$what: the sink received $received spans for $SPANS sent (duplicates)")
  fi
  if [ "${retries:-0}" -gt 0 ]; then
    NOTES+=("$what: $retries requests were pushed back and sent again")
  fi
  line=$(awk -v spans="$SPANS" -v start="$first_ns" -v last="$last_ns" -v ticks=$((cpu_after - cpu_before)) \
    -v tck="$CLK_TCK" -v round="$ROUND" -v hz="$hz" -v per_span="$per_span" -v signals="$signals" \
    -v samples="$samples" -v bytes="$bytes" -v start_cpu="$start_cpu" -v build="$build" -v load1="$load1" \
    -v hwm="$hwm" 'BEGIN {
      wall = (last - start) / 1e9
      cpu = ticks / tck
      printf "%d\t%d\t%.0f\t%.3f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%d\n", round, hz,
        (wall > 0 ? spans / wall : 0), cpu / (spans / 1e6), per_span, signals, samples, bytes,
        start_cpu, build, load1, cpu, hwm
    }')
  echo "$line" >>"$PASSES"
  say "$what: $(tr '\t' ' ' <<<"$line")"
}

# An unmeasured pass first: it warms the page cache and, unless CAPTURE_SECONDS is given, sets
# the length of the captures from its load time.
run_pass 0 warm-up
if [ "$LOAD_NS" -eq 0 ]; then
  say "the warm-up pass failed: ${NOTES[*]}"
  exit 1
fi
if [ "$CAPTURE_SECONDS" = auto ]; then
  CAPTURE_SECONDS=$(awk -v ns="$LOAD_NS" 'BEGIN { s = int(2 * ns / 1e9 + 0.999) + 5; print (s > 300 ? 300 : s) }')
fi
say "warm-up load took $(awk -v ns="$LOAD_NS" 'BEGIN { printf "%.1f", ns / 1e9 }') s; captures last ${CAPTURE_SECONDS}s"

# The arms take turns, the order swapped every round, so that a drift of the machine weighs on
# both alike.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  if ((ROUND % 2)); then order=(0 "$FREQUENCY"); else order=("$FREQUENCY" 0); fi
  for hz in "${order[@]}"; do
    run_pass "$hz"
  done
done

# --- callgrind pass -------------------------------------------------------------------------
# The agent under callgrind, profiled at FREQUENCY Hz while CALLGRIND_SPANS spans pass through;
# the counters are zeroed once it is ready and dumped once the sink has every span. The
# annotated dump ($RUN/callgrind.txt) gives the instructions of the whole process, of the
# signal handler (`perf_signal_handler`, inclusive) and of starting the capture
# (`ProfilerGuardBuilder::build`, inclusive), and the samples the handler recorded
# (its calls of `Collector::add`).
CALLGRIND=""
callgrind_pass() {
  if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    NOTES+=("callgrind pass left out: no valgrind (\`apt-get install valgrind\`)")
    return
  fi
  ROUND=callgrind
  start_sink periscope
  local admin grpc pid
  admin=$(free_port)
  grpc=$(free_port)
  write_config "$RUN/periscope-callgrind.yaml" "$admin" "$grpc" "$RUN/periscope-data-callgrind"
  start "$RUN/periscope-callgrind.log" valgrind --tool=callgrind \
    --callgrind-out-file="$RUN/callgrind.out.%p" "$BIN/periscope" run --config "$RUN/periscope-callgrind.yaml"
  pid=$LAST_PID
  if ! wait_until 120 "$pid" "callgrind pass: /readyz" ready_quietly "http://127.0.0.1:$admin/readyz"; then
    NOTES+=("callgrind pass: not ready (see bench/.work/profiling/periscope-callgrind.log)")
  else
    settle "$pid"
    callgrind_control -z "$pid" >/dev/null
    if start_capture "$pid" "$admin" "$FREQUENCY" 300 callgrind && settle "$pid" &&
      load "$pid" "$grpc" "$CALLGRIND_SPANS" "$RUN/loadgen-callgrind.report" "callgrind pass"; then
      if profiler_running "$pid"; then
        callgrind_control -d "$pid" >/dev/null
        local dump
        dump=$(find "$RUN" -name "callgrind.out.$pid.*" | sort | tail -n 1)
        if [ -n "$dump" ]; then
          callgrind_annotate --inclusive=yes --tree=calling --threshold=100 "$dump" >"$RUN/callgrind.txt" 2>/dev/null
          CALLGRIND=$RUN/callgrind.txt
        else
          NOTES+=("callgrind pass: no dump written")
        fi
      else
        NOTES+=("callgrind pass: the capture ended before the load did")
      fi
    fi
    stop "$CAPTURE_PID"
  fi
  stop "$pid"
  stop "$SINK_PID"
}
if [ "$CALLGRIND_SPANS" -gt 0 ]; then callgrind_pass; fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ---------------------------------------------------------------------------------
# Per arm: medians of its passes. The profiled arm's overhead is the median, over the rounds
# where both passes counted, of (its figure ÷ the unprofiled pass's) − 1. From the callgrind
# pass: instructions per span of the agent's own work (all but the handler and the capture's
# start) and of the handler per recorded sample; the latter times the samples per span of the
# native profiled passes, over the former, is the overhead in instructions at FREQUENCY Hz.
SECTION=$RUN/section.md
{
  echo "## Profiling overhead: the agent profiling itself under the traces load"
  echo
  SPANS=$SPANS BATCH=$BATCH CONCURRENCY=$CONCURRENCY ROUNDS=$ROUNDS FREQUENCY=$FREQUENCY \
    CAPTURE_SECONDS=$CAPTURE_SECONDS INSTR=$INSTR SIGNALS=$SIGNALS CALLGRIND_SPANS=$CALLGRIND_SPANS \
    python3 - "$PASSES" "$CALLGRIND" <<'EOF'
import os, re, statistics, sys

env = os.environ
spans, low = int(env["SPANS"]), int(env["FREQUENCY"])
instr, signals = env["INSTR"], env["SIGNALS"] == "1"
med = statistics.median

def num(text, kind=float):
    return None if text == "-" else kind(text)

passes = []
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    passes.append(dict(round=int(f[0]), hz=int(f[1]), rate=float(f[2]), cpu_m=float(f[3]),
                       per_span=num(f[4]), signals=num(f[5], int), samples=num(f[6], int),
                       bytes=num(f[7], int), start=num(f[8]), build=num(f[9]), load1=f[10],
                       cpu=float(f[11]), hwm=int(f[12])))
by = {(p["hz"], p["round"]): p for p in passes}
profiled = [p for p in passes if p["hz"] == low]
unprofiled = [p for p in passes if p["hz"] == 0]

def pct(x):
    return f"{x:+.1f} %"

def overheads(key):
    return [(p[key] / by[(0, p["round"])][key] - 1) * 100 for p in profiled
            if (0, p["round"]) in by and p[key] is not None and by[(0, p["round"])][key] is not None]

def spread(values):
    return f"{pct(med(values))} ({pct(min(values))} to {pct(max(values))})" if values else "–"

def median_of(ps, key, fmt):
    values = [p[key] for p in ps if p[key] is not None]
    return fmt.format(med(values)) if values else "–"

print(f"{spans:,} spans per native pass, {env['BATCH']} spans per request, {env['CONCURRENCY']} concurrent clients, into")
print("Periscope and on to a counting sink (its Jaeger exporter over OTLP/gRPC). A profiled pass")
print(f"captures `/debug/pprof/profile?seconds={env['CAPTURE_SECONDS']}&frequency={low}&format=pprof` from before the load")
print(f"to after it. {env['ROUNDS']} rounds, the two arms taking turns; medians of the passes. Overhead: per")
print("round, the profiled pass's figure ÷ the unprofiled pass's − 1; median (lowest to highest).")
print()
head = "| arm | passes | spans/s | CPU-s per 1M spans | CPU overhead |"
rule = "|---|---:|---:|---:|---:|"
if instr:
    head += f" {instr} per span | {instr} overhead |"
    rule += "---:|---:|"
if signals:
    head += " SIGPROF per CPU-s |"
    rule += "---:|"
head += " samples per CPU-s | CPU-s to start the capture | CPU-s to build the profile | profile (KiB) | peak RSS (MiB) |"
rule += "---:|---:|---:|---:|---:|"
print(head)
print(rule)
for hz, ps in ((0, unprofiled), (low, profiled)):
    row = f"| {'unprofiled' if hz == 0 else f'profiled at {hz} Hz'} | {len(ps)} |"
    if not ps:
        print(row + " – |" * (head.count("|") - 3))
        continue
    row += f" {med(p['rate'] for p in ps):,.0f} | {med(p['cpu_m'] for p in ps):.2f} | {spread(overheads('cpu_m')) if hz else ''} |"
    if instr:
        row += f" {median_of(ps, 'per_span', '{:,.0f}')} | {spread(overheads('per_span')) if hz else ''} |"
    if signals:
        rates = [p["signals"] / p["cpu"] for p in ps if p["signals"] is not None]
        row += f" {med(rates):.0f} |" if hz and rates else " |"
    if hz:
        row += (f" {med(p['samples'] / p['cpu'] for p in ps):.0f} | {median_of(ps, 'start', '{:.2f}')} |"
                f" {median_of(ps, 'build', '{:.2f}')} | {med(p['bytes'] for p in ps) / 1024:.0f} |")
    else:
        row += " | | | |"
    row += f" {med(p['hwm'] for p in ps) / 1024:.1f} |"
    print(row)
print()

base = sorted(p["cpu_m"] for p in unprofiled)
if len(base) > 1:
    print(f"The unprofiled passes alone lie {(base[-1] / base[0] - 1) * 100:.0f} % apart "
          f"({base[0]:.2f} to {base[-1]:.2f} CPU-s per 1M spans): the noise a CPU-time comparison has to beat.")
    print()

estimate = None
if len(sys.argv) > 2 and sys.argv[2] and profiled:
    text = open(sys.argv[2]).read()

    def inclusive(name):
        m = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\*\s+\S*:" + re.escape(name) + r" \[", text, re.M)
        return int(m.group(1).replace(",", "")) if m else None

    def calls(parent, child):
        block = re.search(r"^\s*[\d,]+ \([^)]*\)\s+\*\s+\S*:" + re.escape(parent) + r" \[.*?(?=\n\s*\n)", text, re.M | re.S)
        if not block:
            return None
        m = re.search(r">\s+\S*:" + re.escape(child) + r" \(([\d,]+)x\)", block.group(0))
        return int(m.group(1).replace(",", "")) if m else None

    m = re.search(r"^\s*([\d,]+) \([^)]*\)\s+PROGRAM TOTALS", text, re.M)
    total = int(m.group(1).replace(",", "")) if m else None
    handler = inclusive("perf_signal_handler")
    setup = inclusive("pprof::profiler::ProfilerGuardBuilder::build") or 0
    recorded = calls("perf_signal_handler", "pprof::collector::Collector<T>::add")
    frames = calls("backtrace::backtrace::libunwind::trace::trace_fn", "pprof::profiler::perf_signal_handler::{{closure}}")
    cg_spans = int(env["CALLGRIND_SPANS"])
    if total and handler and recorded:
        own = total - handler - setup
        per_sample = handler / recorded
        native = med(p["samples"] for p in profiled) / spans
        estimate = per_sample * native / (own / cg_spans) * 100
        print(f"Instructions, from one profiled pass of {cg_spans:,} spans with the agent under callgrind (`Ir`, all threads,")
        print("from ready to the last span at the sink):")
        print()
        print("| figure | value |")
        print("|---|---:|")
        print(f"| the agent's own work, per span | {own / cg_spans:,.0f} |")
        print(f"| the signal handler (`perf_signal_handler`, inclusive), per recorded sample | {per_sample:,.0f} |")
        if frames:
            print(f"| frames unwound per recorded sample | {frames / recorded:.0f} |")
        print(f"| samples recorded under callgrind | {recorded:,} |")
        print(f"| starting the capture (`ProfilerGuardBuilder::build`, inclusive) | {setup:,} |")
        print(f"| samples per span, native passes at {low} Hz (median) | {native:.6f} |")
        print(f"| **sampling overhead at {low} Hz**: handler instructions per span ÷ the agent's own | **{pct(estimate)}** |")
        print()
        print(f"Under callgrind the agent runs many times slower, so it takes {recorded / cg_spans / native:.0f}× the native samples per span and the handler is")
        print(f"{handler / total * 100:.1f} % of its instructions there; the cost per sample is what carries over.")
        print()
    else:
        print("The callgrind pass gave no figures (see bench/.work/profiling/callgrind.txt).")
        print()

direct = overheads("cpu_m")
target = 3.0
if estimate is not None:
    primary, how = estimate, "in instructions, from callgrind"
elif instr and overheads("per_span"):
    primary, how = med(overheads("per_span")), f"in `{instr}`"
elif direct:
    primary, how = med(direct), "in CPU time"
else:
    primary = None
if primary is None:
    print(f"**Target under 3 % extra CPU at {low} Hz: not measured** (no profiled pass counted).")
else:
    verdict = "met" if primary < target else "not met"
    extra = f"; CPU time, direct: {pct(med(direct))}" if direct and estimate is not None else ""
    print(f"**Target under 3 % extra CPU at {low} Hz: {verdict}** ({how}: {pct(primary)}{extra}).")
print()
print("<details><summary>All passes</summary>")
print()
head = "| round | arm | spans/s | CPU-s per 1M spans | vs unprofiled, same round |"
rule = "|---:|---|---:|---:|---:|"
if instr:
    head += f" {instr} per span | vs unprofiled |"
    rule += "---:|---:|"
if signals:
    head += " SIGPROF |"
    rule += "---:|"
head += " samples | CPU-s to start the capture | CPU-s to build the profile | profile (KiB) | peak RSS (MiB) | load average (1 min) |"
rule += "---:|---:|---:|---:|---:|---:|"
print(head)
print(rule)
for p in passes:
    hz, r = p["hz"], p["round"]
    b = by.get((0, r))
    row = f"| {r} | {'unprofiled' if hz == 0 else f'{hz} Hz'} | {p['rate']:.0f} | {p['cpu_m']:.3f} |"
    row += f" {pct((p['cpu_m'] / b['cpu_m'] - 1) * 100) if hz and b else ''} |"
    if instr:
        vs = ""
        if hz and b and p["per_span"] is not None and b["per_span"] is not None:
            vs = pct((p["per_span"] / b["per_span"] - 1) * 100)
        row += f" {p['per_span'] if p['per_span'] is not None else '–'} | {vs} |"
    if signals:
        row += f" {p['signals'] if hz and p['signals'] is not None else ''} |"
    if hz:
        row += f" {p['samples']} | {p['start']:.2f} | {p['build']:.2f} | {p['bytes'] / 1024:.0f} |"
    else:
        row += " | | | |"
    row += f" {p['hwm'] / 1024:.1f} | {p['load1']} |"
    print(row)
print()
print("</details>")
EOF
  if [ "${#NOTES[@]}" -gt 0 ]; then
    echo
    echo "Notes:"
    printf -- '- %s\n' "${NOTES[@]}"
  fi
  echo
  echo "Load average (1, 5, 15 min) at the start: $LOAD_BEFORE; at the end: $LOAD_AFTER."
  machine_line
} >"$SECTION"
write_section profiling "$SECTION"

echo
cat "$SECTION"
