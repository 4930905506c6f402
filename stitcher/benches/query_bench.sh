#!/usr/bin/env bash
# Benchmark (not a test): Query API calls per second against a release weft-stitcher on
# loopback while weft-loadgen ingests at RATE exchanges/s. Each loadtest/ghz/query-*.json
# configuration (call, data, concurrency, connections) runs for SECONDS with the
# query_bench client (GetTrace asks for a recently listed trace). Prints the calls/s per
# configuration and the ingest rate the stitcher's own counters show meanwhile.
#
#   stitcher/benches/query_bench.sh
#   RATE=100000 SECONDS_PER_CALL=5 stitcher/benches/query_bench.sh
#   SKIP_BUILD=1 stitcher/benches/query_bench.sh   # binaries already built
set -euo pipefail
cd "$(dirname "$0")/../.."

RATE=${RATE:-100000}
SECONDS_PER_CALL=${SECONDS_PER_CALL:-5}
STREAMS=${STREAMS:-4}

if [ "${SKIP_BUILD:-0}" != 1 ]; then   # SKIP_BUILD=1: use the binaries already built
    cargo build --release -q -p weft-stitcher -p weft-loadgen --bins
    cargo bench -q -p weft-stitcher --bench query_bench --no-run 2>/dev/null
fi
bench_bin=$(ls -t $(find target/release/deps -maxdepth 1 -type f -perm -u+x \
    -name 'query_bench-*' ! -name '*.*') | head -1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
work=$(mktemp -d /tmp/weft-query-bench.XXXXXX)

target/release/weft-stitcher --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" \
    --kubernetes off 2>"$work/stitcher.log" &
pid=$!
lg_pid=
cleanup() {
    [ -n "$lg_pid" ] && kill "$lg_pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 200); do
    curl -fs "http://127.0.0.1:$mport/healthz" >/dev/null 2>&1 && break
    sleep 0.05
done
metric() { curl -fs "http://127.0.0.1:$mport/metrics" | awk -v m="weft_stitcher_$1" '$1==m {print $2}'; }

configs=$(ls loadtest/ghz/query-*.json | wc -l)
duration=$((configs * (SECONDS_PER_CALL + 1) + 20))
target/release/weft-loadgen --target "http://127.0.0.1:$port" --rate "$RATE" -c "$STREAMS" \
    -z "${duration}s" --json >"$work/loadgen.json" 2>"$work/loadgen.log" &
lg_pid=$!
sleep 5   # traces complete after --trace-idle: let the store fill
# Baseline: ingest alone for 5 s, then with the Query load.
b0=$(metric ingest_exchanges); s0=$(date +%s.%N)
sleep 5
ex0=$(metric ingest_exchanges); t0=$(date +%s.%N)
"$bench_bin" --addr "127.0.0.1:$port" --ghz loadtest/ghz --seconds "$SECONDS_PER_CALL"
ex1=$(metric ingest_exchanges); t1=$(date +%s.%N)
python3 - "$ex0" "$ex1" "$t0" "$t1" "$RATE" "$b0" "$s0" \
    "$(metric store_traces)" "$(metric store_bytes)" "$(metric store_evicted)" <<'PY'
import sys
ex0, ex1, t0, t1 = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
b0, s0 = float(sys.argv[6]), float(sys.argv[7])
print(f"ingest alone (5 s before querying): {(ex0 - b0) / (t0 - s0):,.0f} exchanges/s")
print(f"ingest while querying: {(ex1 - ex0) / (t1 - t0):,.0f} exchanges/s (target {int(sys.argv[5]):,}), "
      f"store {sys.argv[8]} traces, {int(float(sys.argv[9])) >> 20} MiB, {sys.argv[10]} evicted")
PY
kill "$lg_pid" 2>/dev/null || true; wait "$lg_pid" 2>/dev/null || true; lg_pid=
