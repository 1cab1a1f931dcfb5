#!/usr/bin/env bash
# Side-by-side load bench: parasol vs nginx proxy_cache vs Varnish, same origin, same load,
# one run. Each server is pinned to core 0 and wrk to core 1; workloads are interleaved and
# repeated (median of ROUNDS). Writes BENCHMARKS.md. Every process it starts is stopped by PID.
#
#   benches/side-by-side.sh            # ROUNDS=3 DURATION=4s by default
#
# First cut: W1 (hits of 4/60/64/70 KiB) and W2 (200 KiB hits). Peers' settings are in
# benches/peers/ (nginx 1.22 and Varnish 7.1 from Debian's packages, installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4s}
CONNS=${CONNS:-64}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v varnishd >/dev/null || need+=(varnish)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q

WORK=$(mktemp -d /tmp/parasol-bench.XXXXXX)
chmod 755 "$WORK"   # varnishd drops privileges and must read its VCL
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  pkill -F "$WORK/varnishd.pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$WORK"/{www,logs,ngx_tmp,ngx_cache,ngx_cache_z,varnish}
for f in origin.conf nginx_cache.conf varnish.vcl; do
  sed "s#@WORK@#$WORK#g" "benches/peers/$f" > "$WORK/$f"
  chmod 644 "$WORK/$f"
done

# Media files: JPEG signature, then noise (parasol sniffs the type from the bytes).
SIZES=(4 60 64 70 200)
for kib in "${SIZES[@]}"; do
  python3 -c "import os,sys; sys.stdout.buffer.write(b'\xff\xd8\xff\xe0'+os.urandom($kib*1024-4))" > "$WORK/www/${kib}k.jpg"
done

taskset -c 0 nginx -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c 0 nginx -p "$WORK" -c "$WORK/nginx_cache.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c 0 varnishd -F -a 127.0.0.1:18083 -f "$WORK/varnish.vcl" -s malloc,256m \
  -n "$WORK/varnish" -P "$WORK/varnishd.pid" >/dev/null 2>&1 & PIDS+=($!)
KEY=bench-key-0123456789-0123456789-0123
cat > "$WORK/parasol.toml" <<TOML
[server]
listen = "127.0.0.1:18084"
admin_listen = "127.0.0.1:18094"
public_base_url = "http://parasol.bench.invalid/"
[signing]
keys = ["$KEY"]
[cache]
dir = "$WORK/parasol-cache"
[fetch]
allow_networks = ["127.0.0.1/32"]
TOML
# parasol's loop guard refuses sources on its own public host, so it is named
# parasol.bench.invalid in signed URLs, rewritten below to its loopback port.
RUST_LOG=warn taskset -c 0 target/release/parasol serve --config "$WORK/parasol.toml" 2>"$WORK/logs/parasol.err" & PIDS+=($!)
for port in 18081 18082 18083 18084; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

url_for() { # server size -> URL
  local path="/${2}k.jpg"
  case "$1" in
    nginx) echo "http://127.0.0.1:18082$path" ;;
    varnish) echo "http://127.0.0.1:18083$path" ;;
    parasol) target/release/parasol sign --config "$WORK/parasol.toml" "http://127.0.0.1:18081$path" 2>/dev/null \
               | sed 's#^http://parasol.bench.invalid#http://127.0.0.1:18084#' ;;
  esac
}

# wrk from core 1; prints "req/s p50_ms p99_ms".
load() {
  taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H 'Accept-Encoding: identity' "$1" 2>/dev/null |
    awk '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
         function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
         END { printf "%.0f %.2f %.2f\n", rps, ms(p50), ms(p99) }'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

SERVERS=(parasol nginx varnish)
declare -A URL
for kib in "${SIZES[@]}"; do
  for s in "${SERVERS[@]}"; do
    URL[$s.$kib]=$(url_for "$s" "$kib")
    curl -s -o /dev/null -H 'Accept-Encoding: identity' "${URL[$s.$kib]}"   # warm: fill once
    curl -s -o /dev/null -H 'Accept-Encoding: identity' "${URL[$s.$kib]}"
  done
done

declare -A RPS P50 P99
for round in $(seq "$ROUNDS"); do
  for kib in "${SIZES[@]}"; do
    for s in "${SERVERS[@]}"; do   # interleaved: every server sees the same machine state
      read -r rps p50 p99 < <(load "${URL[$s.$kib]}")
      RPS[$s.$kib]+="$rps "; P50[$s.$kib]+="$p50 "; P99[$s.$kib]+="$p99 "
    done
  done
done

{
  echo "# Side-by-side benchmark"
  echo
  echo "\`benches/side-by-side.sh\` on $(nproc) cores, $(date -u +%Y-%m-%d): each server pinned to core 0,"
  echo "wrk (1 thread, $CONNS connections, $DURATION) on core 1, cache hits over HTTP/1.1 on loopback,"
  echo "median of $ROUNDS interleaved rounds. Peers: $(nginx -v 2>&1 | sed 's/.*\///'), Varnish $(varnishd -V 2>&1 | sed -n 's/.*varnish-\([0-9.]*\).*/\1/p' | head -1)."
  echo
  echo "| workload | server | req/s | p50 ms | p99 ms | parasol / best peer (req/s) |"
  echo "|---|---|---|---|---|---|"
  for kib in "${SIZES[@]}"; do
    best=0
    for s in nginx varnish; do
      m=$(echo ${RPS[$s.$kib]} | tr ' ' '\n' | median); [ "$m" -gt "$best" ] && best=$m
    done
    for s in "${SERVERS[@]}"; do
      r=$(echo ${RPS[$s.$kib]} | tr ' ' '\n' | median)
      p50=$(echo ${P50[$s.$kib]} | tr ' ' '\n' | median)
      p99=$(echo ${P99[$s.$kib]} | tr ' ' '\n' | median)
      ratio=""
      [ "$s" = parasol ] && ratio=$(awk -v a="$r" -v b="$best" 'BEGIN { printf "%.2fx", a/b }')
      echo "| W$([ "$kib" = 200 ] && echo 2 || echo 1) ${kib} KiB hit | $s | $r | $p50 | $p99 | $ratio |"
    done
  done
} | tee BENCHMARKS.md
