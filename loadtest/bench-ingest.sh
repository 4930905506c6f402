#!/usr/bin/env bash
# Benchmark (not a test): a release weft-stitcher on loopback, driven at full speed by
# weft-loadgen on the same machine. Prints exchanges/s ingested and deduplicated (from the
# stitcher's own counters), the stitcher's CPU time and memory (RSS now and peak).
#
#   loadtest/bench-ingest.sh                 # defaults below
#   DURATION=20s CONCURRENCY=8 loadtest/bench-ingest.sh
#   PROFILE=1 loadtest/bench-ingest.sh       # also perf-record the stitcher (cpu-clock)
#   PIPELINE=1 loadtest/bench-ingest.sh      # ingest + the whole stitch pipeline
#   SKIP_BUILD=1 ...                         # use the release binaries already built
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

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p weft-stitcher -p weft-loadgen
bin=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
work=$(mktemp -d /tmp/weft-bench.XXXXXX)

mode=--ingest-only
[ "$PIPELINE" = 1 ] && mode=--print=off
"$bin/weft-stitcher" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" "$mode" \
    2>"$work/stitcher.log" &
pid=$!
perf_pid=
cleanup() {
    [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null && wait "$perf_pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 200); do
    curl -fs "http://127.0.0.1:$mport/healthz" >/dev/null 2>&1 && break
    sleep 0.05
done

metric() { curl -fs "http://127.0.0.1:$mport/metrics" | awk -v m="weft_stitcher_$1" '$1==m {print $2}'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)

if [ "$PROFILE" = 1 ]; then
    perf record -e cpu-clock -F 999 -g -p "$pid" -o "$work/perf.data" >/dev/null 2>&1 &
    perf_pid=$!
fi
cpu0=$(cpu_ticks)
"$bin/weft-loadgen" --target "http://127.0.0.1:$port" --rate 0 -c "$CONCURRENCY" -z "$DURATION" \
    --batch "$BATCH" --in-flight "$IN_FLIGHT" --resend-every "$RESEND_EVERY" \
    --compression "$COMPRESSION" --json >"$work/loadgen.json"
cpu1=$(cpu_ticks)
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=; fi

secs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["total_seconds"])' "$work/loadgen.json")
ingested=$(metric ingest_exchanges)
dups=$(metric ingest_duplicate_exchanges)
rss=$(awk '/VmRSS/ {print $2" "$3}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2" "$3}' "/proc/$pid/status")
python3 - "$work/loadgen.json" "$ingested" "$dups" "$secs" "$cpu0" "$cpu1" "$hz" "$rss" "$hwm" <<'PY'
import json, sys
lg = json.load(open(sys.argv[1]))
ingested, dups, secs = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
cpu = (int(sys.argv[6]) - int(sys.argv[5])) / int(sys.argv[7])
print(f"streams            {lg['streams']} fake collectors, {lg['batches']} batches acked, {lg['duplicate_acks']} of them duplicates")
print(f"duration           {secs:.2f} s (until the last ack)")
print(f"ingested (new)     {ingested} exchanges = {ingested / secs:,.0f} exchanges/s")
print(f"deduplicated       {dups} exchanges in resent batches (acked as duplicates, not forwarded)")
print(f"ingested+dedup     {(ingested + dups) / secs:,.0f} exchanges/s")
print(f"stitcher CPU       {cpu:.2f} s over {secs:.2f} s = {cpu / secs:.2f} cores")
print(f"stitcher RSS       now {sys.argv[8]}, peak {sys.argv[9]}")
l = lg["latency_ms"]
print(f"ack latency        p50 {l.get('p50', 0):.2f} ms  p90 {l.get('p90', 0):.2f} ms  p99 {l.get('p99', 0):.2f} ms")
print(f"errors             {lg['errors'] or 'none'}")
PY
if [ "$PROFILE" = 1 ]; then
    echo
    echo "stitcher profile (self time, top 30):"
    perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9]' | head -30
fi
rm -rf "$work"
