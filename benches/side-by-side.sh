#!/usr/bin/env bash
# Side-by-side load bench: parasol vs nginx proxy_cache vs Varnish (and camo and uncached nginx
# on the miss path), same origin, same load, one run. Each server is pinned to core 0 and the
# load generator to core 1; throughput workloads are interleaved and repeated (median of
# ROUNDS). Writes BENCHMARKS.md. Every process it starts is stopped by PID.
#
#   benches/side-by-side.sh     # about 8 minutes on 2 cores; ROUNDS=3 DURATION=3s by default
#   WORKLOADS=miss MISS_SERVERS=parasol PARASOL_BIN=/path/to/build OUT=/tmp/w6.md benches/side-by-side.sh
#
# W1 hits of 4/60/64/70 KiB, W2 200 KiB hits, W3 random 1 MiB Ranges of a 20 MiB video,
# W4 Zipf(0.9) over 20,000 x 64 KiB with 256 MiB (20%) for each cache, W5 50 and 500 viewers
# on one cold URL of a 300 ms origin, W6 the miss path (parasol vs camo vs nginx without cache),
# W7 1 and 20 viewers of a cold 20 MiB video from an origin sending 8 MB/s (first and last byte),
# W8 restart with a warm store. Peers' settings are in benches/peers/ (nginx 1.22, Varnish 7.1,
# camo 2.3 and wrk from Debian's packages, installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3s}
CONNS=${CONNS:-64}
W4_WARM=${W4_WARM:-15s}
W4_MEASURE=${W4_MEASURE:-15s}
W4_ROUNDS=${W4_ROUNDS:-3}     # measured phases per server, interleaved; each column's median is reported
WORKLOADS=${WORKLOADS:-hits miss burst stream zipf}   # a subset for quicker runs, e.g. WORKLOADS=zipf
want() { [[ " $WORKLOADS " == *" $1 "* ]]; }
BENCH_STARTED=$(date +%s)

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v varnishd >/dev/null || need+=(varnish)
command -v wrk >/dev/null || need+=(wrk)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
[ -f /usr/share/camo/server.js ] || need+=(camo)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# PARASOL_BIN: another build to measure (a before/after comparison); by default this tree's.
PARASOL_BIN=${PARASOL_BIN:-target/release/parasol}
[ "$PARASOL_BIN" = target/release/parasol ] && cargo build --release -q
PORTS=(18081 18082 18083 18084 18085 18086 18087 18088 18094 18097)
for port in "${PORTS[@]}"; do   # a leftover server would be measured instead of ours
  if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then echo "port $port is in use: stop what listens there" >&2; exit 1; fi
done
ulimit -n 65536 2>/dev/null || true

WORK=$(mktemp -d /tmp/parasol-bench.XXXXXX)
chmod 755 "$WORK"   # varnishd drops privileges and must read its VCL
# Caches and media live on a fresh ext4 file system of their own when we may mount one: an
# old file system full of recently deleted inodes (earlier runs) makes every file creation
# scan for a free inode, which was seen to take 65% of a cache's CPU on the miss path.
MOUNTED=
if [ "$(id -u)" = 0 ] && truncate -s 16G "$WORK.img" && mkfs.ext4 -q -F "$WORK.img" 2>/dev/null \
   && mount -o loop "$WORK.img" "$WORK" 2>/dev/null; then
  MOUNTED=1; chmod 755 "$WORK"
else
  rm -f "$WORK.img"; echo "note: cannot mount a fresh file system; using $WORK as it is" >&2
fi
declare -A PID      # server -> PID (the master process for nginx and Varnish)
OTHER_PIDS=()
cleanup() {
  for pid in "${PID[@]}" "${OTHER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; return; fi
  if [ -n "$MOUNTED" ]; then umount "$WORK" && rm -f "$WORK.img"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"/{www/z,logs,ngx_tmp,ngx_cache,ngx_cache_z}
for f in origin.conf nginx_cache.conf varnish.vcl; do
  sed "s#@WORK@#$WORK#g" "benches/peers/$f" > "$WORK/$f"
  chmod 644 "$WORK/$f"
done
TOOLS="python3 benches/peers/tools.py"
LUA=benches/peers/load.lua

# Flushes dirty pages and waits for the disk: one workload's writes (a gigabyte of fills) would
# otherwise be written back during the next one, stalling every process that writes a log.
settle() { sync; sleep 0.5; }
echo "generating media under $WORK ..." >&2
# Hits: a JPEG signature, then noise (parasol sniffs the type from the bytes; a hit never
# looks further). Misses (W4, W6): a real photo of about 64 KiB as the Fediverse serves them,
# re-encoded on upload without metadata (ffmpeg's comment segment removed), made distinct per
# URL inside its entropy-coded data, where a changed byte moves no segment.
SIZES=(4 60 64 70 200)
ffmpeg -hide_banner -loglevel error -y -f lavfi -i "testsrc2=s=480x360,noise=alls=25:allf=t" \
  -frames:v 1 -q:v 5 "$WORK/photo.jpg"
python3 - "$WORK/www" "$WORK/photo.jpg" "${SIZES[@]}" <<'PY'
import os, struct, sys
root, photo, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
for kib in sizes:
    open(f"{root}/{kib}k.jpg", "wb").write(b"\xff\xd8\xff\xe0" + os.urandom(int(kib) * 1024 - 4))
# ISO BMFF signature ("ftyp"), then noise: 20 MiB of "video".
open(f"{root}/video.mp4", "wb").write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(20 * 1024 * 1024 - 12))
jpeg, out, at = open(photo, "rb").read(), bytearray(b"\xff\xd8"), 2
while True:  # header segments up to the scan; COM dropped
    marker, length = jpeg[at + 1], struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
    if marker != 0xFE:
        out += jpeg[at : at + 2 + length]
    at += 2 + length
    if marker == 0xDA:
        break
scan = jpeg[at:]
def distinct(tag: bytes, offset: int) -> bytes:  # `tag` in place of scan bytes free of 0xFF
    while b"\xff" in scan[offset - 1 : offset + len(tag)]:
        offset += 1
    return bytes(out) + scan[:offset] + tag + scan[offset + len(tag):]
# W6: nginx puts the request URI in place of the marker, so every URL has its own bytes.
open(f"{root}/u.jpg", "wb").write(distinct(b"PARASOL-BENCH-MARKER", 1000))
for i in range(20000):  # W4: 20,000 keys, distinct bytes each
    open(f"{root}/z/{i}.jpg", "wb").write(distinct(b"%08d" % i, 1000 + (i % 500) * 64))
PY

settle   # (defined below) the media just written must not be flushed during a measurement

# ---- processes -------------------------------------------------------------------------------
start_nginx_origin() { taskset -c 0 nginx -p "$WORK" -c "$WORK/origin.conf" -g 'daemon off;' & OTHER_PIDS+=($!); }
start_nginx() { taskset -c 0 nginx -p "$WORK" -c "$WORK/nginx_cache.conf" -g 'daemon off;' & PID[nginx]=$!; }
start_varnish() { # name port
  mkdir -p "$WORK/$1"
  taskset -c 0 varnishd -F -a "127.0.0.1:$2" -f "$WORK/varnish.vcl" -s malloc,256m -n "$WORK/$1" \
    >/dev/null 2>&1 & PID[$1]=$!
}
KEY=bench-key-0123456789-0123456789-0123
CAMO_KEY=bench-camo-key-0123456789
parasol_config() { # name port admin_port extra-cache-lines extra-fetch-lines
  cat > "$WORK/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
# parasol's loop guard refuses sources on its own public host, so it is named
# parasol.bench.invalid here; the bench requests its loopback port directly.
public_base_url = "http://parasol.bench.invalid/"
[signing]
keys = ["$KEY"]
[cache]
dir = "$WORK/$1-cache"
$4
[fetch]
allow_networks = ["127.0.0.1/32"]
${5:-}
TOML
}
start_parasol() { # name
  RUST_LOG=warn taskset -c 0 "$PARASOL_BIN" serve --config "$WORK/$1.toml" \
    2>>"$WORK/logs/$1.err" & PID[$1]=$!
}
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# max_per_origin: the peers put no cap on fills per origin; parasol's default is 8.
# memory_max_object_bytes: Varnish keeps every object in RAM; parasol's default (8 MiB) would
# serve the 20 MiB video from disk, which W3 also measures, on parasol-z ("parasol-disk").
parasol_config parasol 18084 18094 $'disk_bytes = "4 GiB"\nmemory_max_object_bytes = "32 MiB"' 'max_per_origin = 64'
# W4/W8: the same 256 MiB for each cache, so hit ratios compare at equal bytes.
parasol_config parasol-z 18087 18097 $'disk_bytes = "256 MiB"\nmemory_bytes = "32 MiB"' 'max_per_origin = 64'
start_nginx_origin
$TOOLS slow-origin 18085 "$WORK/logs/origin_slow.log" & OTHER_PIDS+=($!)
start_nginx
start_varnish varnish 18083
start_varnish varnish-z 18088
start_parasol parasol
start_parasol parasol-z
PID[parasol-disk]=${PID[parasol-z]}
CAMO_KEY=$CAMO_KEY PORT=18086 CAMO_LENGTH_LIMIT=52428800 taskset -c 0 node benches/peers/camo_run.js \
  >"$WORK/logs/camo.log" 2>&1 & PID[camo]=$!
for port in 18081 18082 18083 18084 18085 18086 18087 18088; do wait_port $port; done

# ---- measurement -----------------------------------------------------------------------------
# CPU clock ticks used so far by a server: its process and its children (nginx and Varnish
# workers), all threads included.
cpu_ticks() {
  local total=0 p f
  for p in "$1" $(pgrep -P "$1"); do
    f=$(cut -d')' -f2 "/proc/$p/stat" 2>/dev/null) || continue
    set -- $f
    total=$((total + ${12} + ${13}))   # utime, stime (fields 14 and 15 of stat)
  done
  echo "$total"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# run SERVER URL [env...]: wrk on core 1; prints "req/s p50_ms p99_ms requests bytes cpu_us".
run() {
  local server=$1 url=$2; shift 2
  local before after
  before=$(cpu_ticks "${PID[$server]}")
  local script=(); [ $# -gt 0 ] && script=(-s "$LUA")
  env "$@" taskset -c 1 wrk -t1 -c"$CONNS" -d"${WRK_DURATION:-$DURATION}" --latency "${script[@]}" \
    -H 'Accept-Encoding: identity' "$url" 2>"$WORK/wrk.err" > "$WORK/wrk.out" || true
  grep -h warning "$WORK/wrk.err" >&2 || true
  { echo "== $server $url $*"; cat "$WORK/wrk.out" "$WORK/wrk.err"; } >> "$WORK/logs/wrk.log"
  after=$(cpu_ticks "${PID[$server]}")
  awk -v cpu=$(( (after - before) * TICK_US )) '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    function size(v) { if (v ~ /GB$/) return v * 1073741824; if (v ~ /MB$/) return v * 1048576; if (v ~ /KB$/) return v * 1024; return v + 0 }
    /Requests\/sec/ { rps = $2 } /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
    / requests in / { n = $1; b = $5; sub(/,$/, "", b); sub(/ read$/, "", b) }
    END { printf "%.0f %.2f %.2f %d %.0f %d\n", rps, ms(p50), ms(p99), n, size(b), cpu }' "$WORK/wrk.out"
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
sign_path() { $TOOLS sign "$KEY" "$1"; }   # source URL -> parasol's /m/ path
cold_target() { # server origin src -> "port path" of src on server, for the cold-URL workloads
  case $1 in
    parasol) echo "18084 $(sign_path "$2$3")" ;;
    nginx) echo "18082 $3" ;;
    varnish) echo "18083 $3" ;;
  esac
}
parasol_url() { echo "http://127.0.0.1:$1$(sign_path "http://127.0.0.1:18081$2")"; }   # port path

# ---- W1-W3: hits -----------------------------------------------------------------------------
HIT_SERVERS=(parasol nginx varnish)
HIT_WORKLOADS=(4k 60k 64k 70k 200k video)
declare -A URL R
want hits && for w in "${HIT_WORKLOADS[@]}"; do
  file="/$w.jpg"; [ "$w" = video ] && file=/video.mp4
  URL[parasol.$w]=$(parasol_url 18084 "$file")
  URL[nginx.$w]="http://127.0.0.1:18082$file"
  URL[varnish.$w]="http://127.0.0.1:18083$file"
  URL[parasol-disk.$w]=$(parasol_url 18087 "$file")
  for s in "${HIT_SERVERS[@]}" parasol-disk; do   # warm: fill once, then a hit
    curl -sf -o /dev/null -H 'Accept-Encoding: identity' "${URL[$s.$w]}"
    curl -sf -o /dev/null -H 'Accept-Encoding: identity' "${URL[$s.$w]}"
  done
done
# R: workload.server.field -> values of every round
record() { # key "rps p50 p99 n bytes cpu"
  local k=$1 rps p50 p99 n bytes cpu
  read -r rps p50 p99 n bytes cpu <<< "$2"
  R[$k.rps]+="$rps "; R[$k.p50]+="$p50 "; R[$k.p99]+="$p99 "
  R[$k.cpu_req]+="$(awk -v c="$cpu" -v n="$n" 'BEGIN { printf "%.1f", n ? c / n : 0 }') "
  R[$k.cpu_gb]+="$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { printf "%.3f", b ? c / 1e6 / (b / 1e9) : 0 }') "
}
if want hits; then
echo "W1-W3: hits, $ROUNDS rounds x $DURATION ..." >&2
for round in $(seq "$ROUNDS"); do
  for w in "${HIT_WORKLOADS[@]}"; do
    mode=seq; servers=("${HIT_SERVERS[@]}")
    [ "$w" = video ] && mode=range && servers+=(parasol-disk)
    for s in "${servers[@]}"; do   # interleaved: every server sees the same machine state
      if [ "$mode" = range ]; then
        record "$w.$s" "$(run "$s" "${URL[$s.$w]}" MODE=range SEED=$round)"
      else   # no script: wrk's fastest request loop
        record "$w.$s" "$(run "$s" "${URL[$s.$w]}")"
      fi
    done
  done
done

fi

# ---- W6: the miss path -----------------------------------------------------------------------
if want miss; then
echo "W6: miss path, $ROUNDS rounds x $DURATION ..." >&2
declare -A MISS_BASE=([parasol]=http://127.0.0.1:18084 [nginx]=http://127.0.0.1:18082 [nginx-pass]=http://127.0.0.1:18082 [camo]=http://127.0.0.1:18086)
PID[nginx-pass]=${PID[nginx]}
read -r -a MISS_SERVERS <<< "${MISS_SERVERS:-parasol nginx nginx-pass camo}"   # a subset: MISS_SERVERS=parasol
for round in $(seq "$ROUNDS"); do
  $TOOLS paths miss-parasol "$WORK/miss.parasol" 100000 "$KEY" http://127.0.0.1:18081 "r$round"
  $TOOLS paths miss-plain "$WORK/miss.nginx" 100000 "" "n$round"   # through proxy_cache: stored
  $TOOLS paths miss-plain "$WORK/miss.nginx-pass" 100000 /pass "r$round"
  $TOOLS paths miss-camo "$WORK/miss.camo" 100000 "$CAMO_KEY" http://127.0.0.1:18081 "r$round"
  for s in "${MISS_SERVERS[@]}"; do
    record "miss.$s" "$(run "$s" "${MISS_BASE[$s]}/" MODE=seq PATHS="$WORK/miss.$s")"
    settle
  done
done

fi

# ---- W5: many viewers, one cold URL of a 300 ms origin ---------------------------------------
if want burst; then
echo "W5: cold bursts ..." >&2
declare -A W5
for round in $(seq "$ROUNDS"); do
  for n in 50 500; do
    for s in "${HIT_SERVERS[@]}"; do
      src="/slowpy/w5-$s-$n-$round.jpg"
      read -r port path < <(cold_target "$s" http://127.0.0.1:18085 "$src")
      read -r ok p50 p99 max < <($TOOLS burst "$n" 127.0.0.1 "$port" "$path")
      fills=$(grep -c "^$src\$" "$WORK/logs/origin_slow.log" || true)
      W5[$s.$n.ok]+="$ok "; W5[$s.$n.p50]+="$p50 "; W5[$s.$n.p99]+="$p99 "; W5[$s.$n.fills]+="$fills "
    done
  done
done

fi

# ---- W7: a cold 20 MiB video from an origin sending 8 MB/s -----------------------------------
if want stream; then
echo "W7: cold video streams ..." >&2
declare -A W7
for round in $(seq "$ROUNDS"); do
  for n in 1 20; do
    for s in "${HIT_SERVERS[@]}"; do
      src="/w7/$s-$n-$round.mp4"
      read -r port path < <(cold_target "$s" http://127.0.0.1:18081 "$src")
      read -r ok f50 fmax l50 lmax < <($TOOLS stream "$n" 127.0.0.1 "$port" "$path")
      W7[$s.$n.ok]+="$ok "; W7[$s.$n.f50]+="$f50 "; W7[$s.$n.fmax]+="$fmax "
      W7[$s.$n.l50]+="$l50 "; W7[$s.$n.lmax]+="$lmax "
      settle
    done
  done
done

fi

# ---- W4: Zipf over 20,000 x 64 KiB at 20% ----------------------------------------------------
if want zipf; then
echo "W4: Zipf, $W4_WARM warm + $W4_ROUNDS x $W4_MEASURE measured per server ..." >&2
$TOOLS paths zipf-parasol "$WORK/zipf.parasol-z" 20000 "$KEY" http://127.0.0.1:18081
$TOOLS paths zipf-plain "$WORK/zipf.plain" 20000
cp "$WORK/zipf.plain" "$WORK/zipf.nginx"; cp "$WORK/zipf.plain" "$WORK/zipf.varnish-z"
declare -A ZBASE=([parasol-z]=http://127.0.0.1:18087 [nginx]=http://127.0.0.1:18082 [varnish-z]=http://127.0.0.1:18088)
read -r -a ZIPF_SERVERS <<< "${ZIPF_SERVERS:-parasol-z nginx varnish-z}"   # a subset: ZIPF_SERVERS=parasol-z
origin_z() { wc -l < "$WORK/logs/origin_z.log" 2>/dev/null || echo 0; }
held() { # bytes of cached objects the cache holds for W4 (files only, not directories)
  case $1 in
    # blob files by size, segment files by the blocks they hold (evicted blobs are holes)
    parasol-z) { find "$WORK/parasol-z-cache/blobs" -type f -printf '%s\n'
                 find "$WORK/parasol-z-cache/segments" -type f -printf '%b\n' | awk '{print $1 * 512}'
               } 2>/dev/null | awk '{s += $1} END {print s + 0}' ;;
    nginx) find "$WORK/ngx_cache_z" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}' ;;
    varnish-z) varnishstat -n "$WORK/varnish-z" -1 -f SMA.s0.g_bytes | awk '{print $2}' ;;
  esac
}
# The most a cache held while loaded (nginx enforces max_size late), sampled every second
# from the load generator's core until the file $2 appears.
peak_held() {
  local max=0 b
  while [ ! -e "$2" ]; do
    b=$(taskset -c 1 bash -c "$(declare -f held); WORK=$WORK held $1")
    [ "${b:-0}" -gt "$max" ] && max=$b
    sleep 1
  done
  echo "$max"
}
zipf_phase() { # server duration seed -> "hit_ratio rps cpu_us_per_req peak_bytes_held"
  local s=$1 o0 o1 out peak
  rm -f "$WORK/zipf.done"
  o0=$(origin_z)
  peak_held "$s" "$WORK/zipf.done" > "$WORK/zipf.peak" &
  out=$(WRK_DURATION=$2 run "$s" "${ZBASE[$s]}/" MODE=zipf PATHS="$WORK/zipf.$s" SEED=$3)
  touch "$WORK/zipf.done"; wait $!
  o1=$(origin_z)
  settle
  read -r rps _ _ n _ cpu <<< "$out"
  awk -v n="$n" -v f="$((o1 - o0))" -v rps="$rps" -v cpu="$cpu" -v held="$(cat "$WORK/zipf.peak")" \
    'BEGIN { printf "%.1f %d %.1f %d\n", 100 * (1 - f / n), rps, cpu / n, held }'
}
declare -A Z
for s in "${ZIPF_SERVERS[@]}"; do
  zipf_phase "$s" "$W4_WARM" 1 >/dev/null
done
for round in $(seq "$W4_ROUNDS"); do   # seeds 10, 11, ...: other draws than warm-up and W8's
  for s in "${ZIPF_SERVERS[@]}"; do
    Z[$s]+="$(zipf_phase "$s" "$W4_MEASURE" $((9 + round)))"$'\n'
  done
done
medians() { # lines of numbers -> the median of each column
  local rows cols c out=()
  rows=$(cat); cols=$(head -1 <<< "$rows" | wc -w)
  for c in $(seq "$cols"); do
    out+=("$(awk -v c="$c" '{print $c}' <<< "$rows" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')")
  done
  echo "${out[*]}"
}
for s in "${ZIPF_SERVERS[@]}"; do
  Z[$s]=$(printf '%s' "${Z[$s]}" | medians)
done

# ---- W8: restart with a warm store -----------------------------------------------------------
echo "W8: restarts ..." >&2
declare -A W8
for s in "${ZIPF_SERVERS[@]}"; do
  pid=${PID[$s]}
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  t0=$(date +%s%N)
  case $s in
    parasol-z) start_parasol parasol-z; port=18087 ;;
    nginx) start_nginx; port=18082 ;;
    varnish-z) start_varnish varnish-z 18088; port=18088 ;;
  esac
  first=$(head -1 "$WORK/zipf.$s")
  for _ in $(seq 400); do
    curl -sf -o /dev/null -H 'Accept-Encoding: identity' "http://127.0.0.1:$port$first" && break
    sleep 0.01
  done
  W8[$s.ready_ms]=$(( ($(date +%s%N) - t0) / 1000000 ))
  W8[$s]=$(zipf_phase "$s" "$W4_MEASURE" 3)
done

fi

# ---- report ----------------------------------------------------------------------------------
m() { echo ${R[$1]} | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
label() {
  case $1 in
    4k|60k|64k|70k) echo "W1 ${1%k} KiB hit" ;; 200k) echo "W2 200 KiB hit" ;;
    video) echo "W3 1 MiB Range of 20 MiB" ;; miss) echo "W6 64 KiB miss" ;;
  esac
}
table() { # workload servers...
  local w=$1; shift
  local best=0 best_cpu=0 s r
  for s in "${@:2}"; do
    r=$(m "$w.$s.rps"); awk -v a="$r" -v b="$best" 'BEGIN { exit !(a > b) }' && best=$r
  done
  for s in "$@"; do
    r=$(m "$w.$s.rps")
    local rr="" cr=""
    if [ "$s" = parasol ]; then
      rr=$(ratio "$r" "$best")
    fi
    echo "| $(label "$w") | $s | $r | $(m "$w.$s.p50") | $(m "$w.$s.p99") | $(m "$w.$s.cpu_req") | $(m "$w.$s.cpu_gb") | $rr |"
  done
}
{
  echo "# Side-by-side benchmark"
  echo
  echo "\`benches/side-by-side.sh\` on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
  echo "$(date -u +%Y-%m-%d). Each server pinned to core 0, wrk (1 thread, $CONNS connections) on core 1,"
  echo "HTTP/1.1 on loopback. Throughput rows are the median of $ROUNDS interleaved rounds of $DURATION."
  echo "Peers from Debian's packages: nginx $(nginx -v 2>&1 | sed 's/.*\///'), Varnish"
  echo "$(varnishd -V 2>&1 | sed -n 's/.*varnish-\([0-9.]*\).*/\1/p' | head -1), camo $(dpkg-query -W -f '${Version}' camo 2>/dev/null || echo '?'). Settings: \`benches/peers/\`."
  echo "Server CPU is user + system time of the server's processes during the run."
  echo
  if want hits || want miss; then
  echo "## Hits and the miss path"
  echo
  echo "| workload | server | req/s | p50 ms | p99 ms | CPU µs/req | CPU s/GB | parasol / best peer |"
  echo "|---|---|---|---|---|---|---|---|"
  if want hits; then
    for w in "${HIT_WORKLOADS[@]}"; do table "$w" "${HIT_SERVERS[@]}"; done
    table video parasol-disk
  fi
  if want miss; then
  table miss "${MISS_SERVERS[@]}"
  fi
  echo
  if want hits; then
  echo "W3: \`parasol\` holds the video in memory (\`memory_max_object_bytes = \"32 MiB\"\`, as Varnish holds"
  echo "everything in RAM); \`parasol-disk\` is the default 8 MiB bound, reading each Range from disk."
  fi
  if want miss; then
  echo
  echo "W6 ratios: parasol / nginx (cache on) $(ratio "$(m miss.parasol.rps)" "$(m miss.nginx.rps)"), parasol / camo $(ratio "$(m miss.parasol.rps)" "$(m miss.camo.rps)"), parasol / nginx-pass $(ratio "$(m miss.parasol.rps)" "$(m miss.nginx-pass.rps)")."
  echo "W6: every request is a URL the cache has not seen, with bytes of its own (a 64 KiB photo from a local nginx"
  echo "origin); parasol also verifies, hashes and stores each one, \`nginx\` stores it in its proxy_cache, camo and"
  echo "\`nginx-pass\` store nothing. parasol runs"
  echo "with \`fetch.max_per_origin = 64\` here (default 8), as the peers cap nothing per origin."
  fi
  echo
  fi
  if want zipf; then
  echo "## W4: Zipf(0.9) over 20,000 x 64 KiB, each cache limited to 256 MiB (20%)"
  echo
  echo "$W4_WARM of warm-up, then $W4_ROUNDS interleaved rounds of $W4_MEASURE measured (other random draws), the median of each column; hit ratio = 1 - origin requests /"
  echo "requests; bytes held = cached object files (parasol's segment files by the blocks they hold; Varnish's storage), the peak of 1 s samples."
  echo
  echo "| server | hit ratio % | peak bytes held | req/s | CPU µs/req |"
  echo "|---|---|---|---|---|"
  for s in "${ZIPF_SERVERS[@]}"; do
    read -r hr rps cpu peak <<< "${Z[$s]}"
    echo "| $s | $hr | $(numfmt --to=iec-i --suffix=B "$peak") | $rps | $cpu |"
  done
  echo
  fi
  if want burst; then
  echo "## W5: one cold URL, origin answers after 300 ms"
  echo
  echo "Median of $ROUNDS rounds; every connection is open before the requests are sent at once."
  echo
  echo "| viewers | server | origin fills (each round) | complete | waiter p50 ms | waiter p99 ms |"
  echo "|---|---|---|---|---|---|"
  for n in 50 500; do
    for s in "${HIT_SERVERS[@]}"; do
      echo "| $n | $s | ${W5[$s.$n.fills]% } | $(echo ${W5[$s.$n.ok]} | median) | $(echo ${W5[$s.$n.p50]} | median) | $(echo ${W5[$s.$n.p99]} | median) |"
    done
  done
  echo
  fi
  if want stream; then
  echo "## W7: a cold 20 MiB video, origin sending 8 MB/s"
  echo
  echo "Median of $ROUNDS rounds; every connection is open before the requests are sent at once; a new"
  echo "URL each time. First byte = the first body bytes of the response, last byte = its end (ms from"
  echo "the request). The origin alone needs about 2.6 s for the file. nginx fetches it in 1 MiB"
  echo 'slices (`slice 1m`, each slice a Range request to the origin), Varnish streams (`do_stream`).'
  echo
  echo "| viewers | server | complete | first byte p50 | first byte max | last byte p50 | last byte max |"
  echo "|---|---|---|---|---|---|---|"
  for n in 1 20; do
    for s in "${HIT_SERVERS[@]}"; do
      echo "| $n | $s | $(echo ${W7[$s.$n.ok]} | median) | $(echo ${W7[$s.$n.f50]} | median) | $(echo ${W7[$s.$n.fmax]} | median) | $(echo ${W7[$s.$n.l50]} | median) | $(echo ${W7[$s.$n.lmax]} | median) |"
    done
  done
  echo
  fi
  if want zipf; then
  echo "## W8: restart with the W4 store warm"
  echo
  echo "Stopped with SIGTERM, started again; ready = until the first object is served. Then"
  echo "$W4_MEASURE of the W4 load."
  echo
  echo "| server | ready ms | hit ratio % after restart | req/s |"
  echo "|---|---|---|---|"
  for s in "${ZIPF_SERVERS[@]}"; do
    read -r hr rps _ <<< "${W8[$s]}"
    echo "| $s | ${W8[$s.ready_ms]} | $hr | $rps |"
  done
  echo
  fi
  echo "Whole run: $(( $(date +%s) - BENCH_STARTED )) s."
} | tee "${OUT:-BENCHMARKS.md}"
