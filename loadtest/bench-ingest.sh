#!/usr/bin/env bash
# Benchmark (not a test): a release weft-stitcher on loopback, driven at full speed by
# weft-loadgen on the same machine. Prints exchanges/s ingested and deduplicated (from the
# stitcher's own counters), the stitcher's CPU time and memory (RSS now and peak).
#
#   loadtest/bench-ingest.sh                 # defaults below
#   DURATION=20s CONCURRENCY=8 loadtest/bench-ingest.sh
#   PROFILE=1 loadtest/bench-ingest.sh       # also perf-record the stitcher (cpu-clock)
#   PIPELINE=1 loadtest/bench-ingest.sh      # ingest + the whole stitch pipeline
#   PIPELINE=1 OTLP=sink loadtest/bench-ingest.sh   # ... exporting OTLP/gRPC to weft-otlp sink
#   PIPELINE=1 OTLP=rotel loadtest/bench-ingest.sh  # ... to rotel (blackhole exporter)
#   SKIP_BUILD=1 ...                         # use the release binaries already built
#   RATE=300000 ...                          # pace the load (exchanges/s over all streams; 0 = as fast as acks allow)
#   STITCHER_ARGS="--otlp-max-in-flight 1"   # extra weft-stitcher flags
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-4}
BATCH=${BATCH:-1000}
IN_FLIGHT=${IN_FLIGHT:-8}
COMPRESSION=${COMPRESSION:-none}
RESEND_EVERY=${RESEND_EVERY:-10}   # every 10th batch resent: exercises dedup
PROFILE=${PROFILE:-0}
PIPELINE=${PIPELINE:-0}            # 0: --ingest-only (ingest alone); 1: the whole pipeline
OTLP=${OTLP:-none}                 # with PIPELINE=1: none, sink (weft-otlp sink) or rotel
TRACE_IDLE=${TRACE_IDLE:-2s}

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p weft-stitcher -p weft-loadgen --bins
bin=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
work=$(mktemp -d /tmp/weft-bench.XXXXXX)

mode=(--ingest-only)
[ "$PIPELINE" = 1 ] && mode=(--print=off --trace-idle "$TRACE_IDLE")
sink_pid=
case "$OTLP" in
    none) ;;
    sink)
        oport=$(free_port)
        "$bin/weft-otlp" sink --listen "127.0.0.1:$oport" --report-every 3600s >"$work/sink.out" &
        sink_pid=$!
        mode+=(--otlp-endpoint "http://127.0.0.1:$oport") ;;
    rotel)
        oport=$(free_port)
        hport=$(free_port)
        rotel=$(command -v rotel-agent || python3 -c 'import rotel,os; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')
        "$rotel" start --exporter blackhole --otlp-grpc-endpoint "127.0.0.1:$oport" \
            --otlp-http-endpoint "127.0.0.1:$hport" --pid-file "$work/rotel.pid" \
            --log-file "$work/rotel.log" >"$work/rotel.out" 2>&1 &
        sink_pid=$!
        mode+=(--otlp-endpoint "http://127.0.0.1:$oport") ;;
    *) echo "OTLP must be none, sink or rotel" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086 # STITCHER_ARGS is a list of flags
"$bin/weft-stitcher" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" "${mode[@]}" ${STITCHER_ARGS:-} \
    2>"$work/stitcher.log" &
pid=$!
perf_pid=
cleanup() {
    [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null && wait "$perf_pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ -n "$sink_pid" ]; then
        kill -INT "$sink_pid" 2>/dev/null || true
        wait "$sink_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 200); do
    curl -fs "http://127.0.0.1:$mport/healthz" >/dev/null 2>&1 && break
    sleep 0.05
done

metric() { curl -fs "http://127.0.0.1:$mport/metrics" | awk -v m="weft_stitcher_$1" '$1==m {print $2}'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/${1:-$pid}/stat"; }
hz=$(getconf CLK_TCK)

if [ "$PROFILE" = 1 ]; then
    perf record -e cpu-clock -F 999 -g -p "$pid" -o "$work/perf.data" >/dev/null 2>&1 &
    perf_pid=$!
fi
cpu0=$(cpu_ticks)
sink_cpu0=0
[ -n "$sink_pid" ] && sink_cpu0=$(cpu_ticks "$sink_pid")
"$bin/weft-loadgen" --target "http://127.0.0.1:$port" --rate "${RATE:-0}" -c "$CONCURRENCY" -z "$DURATION" \
    --batch "$BATCH" --in-flight "$IN_FLIGHT" --resend-every "$RESEND_EVERY" \
    --compression "$COMPRESSION" --json >"$work/loadgen.json"
cpu1=$(cpu_ticks)
sink_cpu1=0
[ -n "$sink_pid" ] && sink_cpu1=$(cpu_ticks "$sink_pid")
exported0=$(metric export_otlp_spans || true)
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=; fi

secs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["total_seconds"])' "$work/loadgen.json")
ingested=$(metric ingest_exchanges)
dups=$(metric ingest_duplicate_exchanges)
exported=0; export_dropped=0
if [ "$OTLP" != none ]; then
    # Traces complete after the idle window: wait until every exchange the pipeline took
    # is exported or counted as dropped (one span each), or the export has not moved for
    # 3 s (on a busy machine a starved stitcher can pause for a second), at most 60 s.
    prev=-1; still=0
    for _ in $(seq 60); do
        sleep 1
        taken=$(metric pipeline_exchanges || echo 0)
        exported=$(metric export_otlp_spans)
        export_dropped=$(( $(metric export_otlp_dropped) + $(metric export_otlp_dropped_queue_full) + $(metric export_otlp_rejected) ))
        [ $(( exported + export_dropped )) -ge "${taken:-0}" ] && break
        if [ "$exported" = "$prev" ]; then still=$((still + 1)); else still=0; fi
        [ "$still" -ge 3 ] && break
        prev=$exported
    done
fi
pipeline_in=$(metric pipeline_exchanges || echo 0)
rss=$(awk '/VmRSS/ {print $2" "$3}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2" "$3}' "/proc/$pid/status")
python3 - "$work/loadgen.json" "$ingested" "$dups" "$secs" "$cpu0" "$cpu1" "$hz" "$rss" "$hwm" \
    "$OTLP" "${exported0:-0}" "$exported" "$export_dropped" "$sink_cpu0" "$sink_cpu1" "${pipeline_in:-0}" <<'PY'
import json, sys
lg = json.load(open(sys.argv[1]))
ingested, dups, secs = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
cpu = (int(sys.argv[6]) - int(sys.argv[5])) / int(sys.argv[7])
otlp, exported0, exported, dropped = sys.argv[10], int(sys.argv[11] or 0), int(sys.argv[12]), int(sys.argv[13])
sink_cpu = (int(sys.argv[15]) - int(sys.argv[14])) / int(sys.argv[7])
pipeline_in = int(sys.argv[16] or 0)
print(f"streams            {lg['streams']} fake collectors, {lg['batches']} batches acked, {lg['duplicate_acks']} of them duplicates")
print(f"duration           {secs:.2f} s (until the last ack)")
print(f"ingested (new)     {ingested} exchanges = {ingested / secs:,.0f} exchanges/s")
print(f"deduplicated       {dups} exchanges in resent batches (acked as duplicates, not forwarded)")
print(f"ingested+dedup     {(ingested + dups) / secs:,.0f} exchanges/s")
print(f"stitcher CPU       {cpu:.2f} s over {secs:.2f} s = {cpu / secs:.2f} cores, {cpu / max(ingested + dups, 1) * 1e6:.2f} µs per exchange received")
if pipeline_in:
    print(f"stitch path        {pipeline_in} exchanges = {pipeline_in / secs:,.0f} exchanges/s taken by the pipeline")
if otlp != "none":
    print(f"OTLP export ({otlp:5}) {exported0} spans accepted during the load = {exported0 / secs:,.0f} spans/s; {exported} after the idle window; {dropped} dropped (queue full, failed, rejected)")
    print(f"OTLP receiver CPU  {sink_cpu:.2f} s during the load = {sink_cpu / secs:.2f} cores, {sink_cpu / max(exported0, 1) * 1e6:.2f} µs per span accepted")
print(f"stitcher RSS       now {sys.argv[8]}, peak {sys.argv[9]}")
l = lg["latency_ms"]
print(f"ack latency        p50 {l.get('p50', 0):.2f} ms  p90 {l.get('p90', 0):.2f} ms  p99 {l.get('p99', 0):.2f} ms")
print(f"errors             {lg['errors'] or 'none'}")
PY
if [ "$PIPELINE" = 1 ]; then
    # What the bounds pushed out (counted, never silent): traces completed early by the
    # pending budget, halves/calls evicted, traces the Query store's writer could not keep.
    echo "bounds             assemble.evicted $(metric assemble_evicted) traces, join.evicted $(metric join_evicted), link.evicted $(metric link_evicted), store.dropped $(metric store_dropped) traces"
fi
if [ "$PROFILE" = 1 ]; then
    echo
    echo "stitcher profile (self time, top 30):"
    perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | head -30
fi
