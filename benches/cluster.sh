#!/usr/bin/env bash
# Two parasol nodes behind nginx (config/recipes/nginx-cluster.conf) sharing a 3-node Garage
# cluster, all on loopback. Not part of CI: it needs Garage (`cargo install garage`, built
# here with `--no-default-features --features bundled-libs,sqlite`), nginx-light and wrk.
#
#   benches/cluster.sh        # about 2 minutes once Garage is installed
#
# Phases, each with the same Zipf(0.9) load over 2,000 x 64 KiB objects through nginx:
#   1. cold: both nodes empty; 2. warm: the same again; 3. node B loses its disk and restarts;
#   4. node B stopped: nginx moves its URLs to node A.
# Reports origin requests per file, hit ratio and throughput of each phase.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
OBJECTS=2000
command -v garage >/dev/null || { echo "needs garage: cargo install garage --locked --no-default-features --features bundled-libs,sqlite" >&2; exit 1; }
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
for port in 18081 18100 18111 18112 18121 18122 3900 3901 3903 3910 3911 3913 3920 3921 3923; do
  if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then echo "port $port is in use" >&2; exit 1; fi
done

WORK=$(mktemp -d /tmp/parasol-cluster.XXXXXX)
chmod 755 "$WORK"
declare -A PID
OTHER=()
cleanup() {
  for pid in "${PID[@]}" "${OTHER[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"/{www/z,logs,ngx_tmp}
sed "s#@WORK@#$WORK#g" benches/peers/origin.conf > "$WORK/origin.conf"
python3 - "$WORK/www" "$OBJECTS" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
noise = os.urandom(64 * 1024 + n * 8)
for i in range(n):
    open(f"{root}/z/{i}.jpg", "wb").write(b"\xff\xd8\xff\xe0" + noise[i * 8 : i * 8 + 64 * 1024 - 4])
PY
nginx -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off;' & OTHER+=($!)

# ---- Garage: three nodes, replication factor 3 ------------------------------------------------
SECRET=$(python3 -c 'import os; print(os.urandom(32).hex())')
for n in 0 1 2; do
  mkdir -p "$WORK/g$n"
  cat > "$WORK/g$n/garage.toml" <<TOML
metadata_dir = "$WORK/g$n/meta"
data_dir = "$WORK/g$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:39${n}1"
rpc_public_addr = "127.0.0.1:39${n}1"
rpc_secret = "$SECRET"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:39${n}0"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:39${n}3"
TOML
  garage -c "$WORK/g$n/garage.toml" server >"$WORK/logs/garage$n.log" 2>&1 & PID[garage$n]=$!
done
g() { garage -c "$WORK/g0/garage.toml" "$@"; }
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.1; done
for n in 1 2; do
  id=$(garage -c "$WORK/g$n/garage.toml" node id -q 2>/dev/null)
  g node connect "$id" >/dev/null
done
node_ids() { g status 2>/dev/null | awk '$1 ~ /^[0-9a-f]+$/ && length($1) == 16 {print $1}'; }
for _ in $(seq 100); do [ "$(node_ids | wc -l)" -eq 3 ] && break; sleep 0.1; done
for id in $(node_ids); do
  g layout assign -z dc1 -c 1G "$id" >/dev/null
done
g layout apply --version 1 >/dev/null
g bucket create parasol >/dev/null
KEYS=$(g key create parasol-key)
KEY_ID=$(echo "$KEYS" | awk '/Key ID/ {print $NF}')
KEY_SECRET=$(echo "$KEYS" | awk '/Secret key/ {print $NF}')
g bucket allow --read --write --owner parasol --key parasol-key >/dev/null

# ---- parasol nodes A and B, each talking to its own Garage node --------------------------------
SIGN=bench-key-0123456789-0123456789-0123
node_config() { # name port admin s3port
  cat > "$WORK/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
public_base_url = "http://parasol.cluster.invalid/"
[signing]
keys = ["$SIGN"]
[cache]
dir = "$WORK/$1-cache"
[fetch]
allow_networks = ["127.0.0.1/32"]
max_per_origin = 64
[shared]
endpoint = "http://127.0.0.1:$4"
bucket = "parasol"
region = "garage"
access_key_id = "$KEY_ID"
secret_access_key = "$KEY_SECRET"
TOML
}
start_node() { RUST_LOG=warn target/release/parasol serve --config "$WORK/$1.toml" 2>>"$WORK/logs/$1.err" & PID[$1]=$!; }
node_config a 18111 18121 3900
node_config b 18112 18122 3910
start_node a
start_node b

sed -e "s#listen 443 ssl http2;#listen 127.0.0.1:18100;#" -e '/ssl_certificate/d' \
  -e 's#127.0.0.1:8081#127.0.0.1:18111#' -e 's#127.0.0.1:8082#127.0.0.1:18112#' \
  config/recipes/nginx-cluster.conf > "$WORK/cluster.inc"
cat > "$WORK/front.conf" <<CONF
pid $WORK/logs/front.pid;
error_log $WORK/logs/front.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/ngx_tmp/b; proxy_temp_path $WORK/ngx_tmp/p;
  fastcgi_temp_path $WORK/ngx_tmp/f; uwsgi_temp_path $WORK/ngx_tmp/u; scgi_temp_path $WORK/ngx_tmp/s;
  include $WORK/cluster.inc;
}
CONF
nginx -p "$WORK" -c "$WORK/front.conf" -g 'daemon off;' & OTHER+=($!)
for port in 18081 18100 18111 18112; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

python3 benches/peers/tools.py paths zipf-parasol "$WORK/paths" "$OBJECTS" "$SIGN" http://127.0.0.1:18081
origin_lines() { wc -l < "$WORK/logs/origin_z.log" 2>/dev/null || echo 0; }
metric() { # node prefix
  curl -s "http://127.0.0.1:$1/metrics" | awk -v p="$2" 'index($0, p) == 1 {print $2; f=1} END {if (!f) print 0}' | head -1
}
# phase NAME: the load, then "requests req/s origin_requests hit_ratio"
declare -A OUT
phase() {
  local o0 o1
  o0=$(origin_lines)
  MODE=zipf PATHS="$WORK/paths" SEED=${2:-1} wrk -t1 -c64 -d"$DURATION" -s benches/peers/load.lua \
    -H 'Accept-Encoding: identity' http://127.0.0.1:18100/ > "$WORK/wrk.out" 2>&1 || true
  sleep 0.3; o1=$(origin_lines)
  local n rps
  n=$(awk '/ requests in / {print $1}' "$WORK/wrk.out"); rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
  OUT[$1]="$n $rps $((o1 - o0)) $(awk -v n="$n" -v f="$((o1 - o0))" 'BEGIN { printf "%.1f", 100 * (1 - f / n) }')"
}
phase cold 1
phase warm 2
kill -TERM "${PID[b]}"; wait "${PID[b]}" 2>/dev/null || true
rm -rf "$WORK/b-cache"
start_node b
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18112) 2>/dev/null && break; sleep 0.05; done
phase "b lost its disk" 3
B_SHARED=$(metric 18122 'parasol_cache_results_total{result="hit_shared"}')
kill -TERM "${PID[b]}"; wait "${PID[b]}" 2>/dev/null || true
unset 'PID[b]'
phase "b stopped" 4
A_SHARED=$(metric 18121 'parasol_cache_results_total{result="hit_shared"}')
# Origin requests per file over the whole run: a file fetched by two nodes would show 2+.
PER_FILE=$(awk '{print $7}' "$WORK/logs/origin_z.log" | sort | uniq -c | awk '{c[$1]++} END {for (k in c) printf "%s file(s) fetched %s time(s); ", c[k], k}')

{
  echo "## Cluster: 2 parasol nodes, 3 Garage nodes, nginx consistent hash ($(date -u +%Y-%m-%d))"
  echo
  echo "\`benches/cluster.sh\` on $(nproc) cores, all on loopback, Garage $(garage --version 2>/dev/null | awk '{print $2}'),"
  echo "Zipf(0.9) over $OBJECTS x 64 KiB, wrk 64 connections, $DURATION per phase."
  echo
  echo "| phase | requests | req/s | origin requests | hit ratio % |"
  echo "|---|---|---|---|---|"
  for p in cold warm "b lost its disk" "b stopped"; do
    read -r n rps o hr <<< "${OUT[$p]}"
    echo "| $p | $n | $rps | $o | $hr |"
  done
  echo
  echo "Origin requests per file, whole run: $PER_FILE"
  echo "Served from the bucket (hit_shared): node B after losing its disk $B_SHARED, node A after B stopped $A_SHARED."
} | tee "$WORK/CLUSTER.md"
