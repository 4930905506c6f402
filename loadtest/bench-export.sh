#!/usr/bin/env bash
# Benchmark (not a test): the stitcher's OTLP exporter alone (stitcher/examples/export_bench.rs:
# synthetic completed traces at a fixed span rate into the real OtlpExporter) exporting
# OTLP/gRPC over loopback to a receiver started here. Prints spans accepted/dropped, the
# exporter's CPU per span, and the receiver's CPU per span.
#
#   loadtest/bench-export.sh                      # weft-otlp sink (--decode count), 300k spans/s
#   RECEIVER=rotel loadtest/bench-export.sh       # rotel, blackhole exporter
#   RECEIVER=full loadtest/bench-export.sh        # weft-otlp sink --decode full
#   RATE=400000 SECS=10 IN_FLIGHT=1 loadtest/bench-export.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-300000}
SECS=${SECS:-10}
IN_FLIGHT=${IN_FLIGHT:-4}
RECEIVER=${RECEIVER:-sink}

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p weft-stitcher --example export_bench -p weft-loadgen --bins
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d /tmp/weft-bench-export.XXXXXX)
port=$(free_port)
case "$RECEIVER" in
    sink|full)
        decode=count; [ "$RECEIVER" = full ] && decode=full
        target/release/weft-otlp sink --listen "127.0.0.1:$port" --decode "$decode" \
            --report-every 3600s >"$work/sink.out" &
        rpid=$! ;;
    rotel)
        hport=$(free_port)
        rotel=$(command -v rotel-agent || python3 -c 'import rotel,os; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')
        "$rotel" start --exporter blackhole --otlp-grpc-endpoint "127.0.0.1:$port" \
            --otlp-http-endpoint "127.0.0.1:$hport" --pid-file "$work/rotel.pid" \
            --log-file "$work/rotel.log" >"$work/rotel.out" 2>&1 &
        rpid=$! ;;
    *) echo "RECEIVER must be sink, full or rotel" >&2; exit 2 ;;
esac
cleanup() {
    kill -INT "$rpid" 2>/dev/null || true
    wait "$rpid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.1)" 2>/dev/null && break
    sleep 0.05
done
ticks() { awk '{print $14+$15}' "/proc/$rpid/stat"; }
hz=$(getconf CLK_TCK)
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
r0=$(ticks)
target/release/examples/export_bench --target "http://127.0.0.1:$port" \
    --spans-per-second "$RATE" --seconds "$SECS" --max-in-flight "$IN_FLIGHT" | tee "$work/out"
r1=$(ticks)
sent=$(awk '/accepted/ {print $2}' "$work/out")
python3 -c "import sys; c=($r1-$r0)/$hz; s=max(int(sys.argv[1]),1); print(f'  receiver CPU   {c:.2f} s = {c/s*1e6:.2f} µs per span accepted ($RECEIVER)')" "$sent"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
