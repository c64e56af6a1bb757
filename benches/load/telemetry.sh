#!/usr/bin/env bash
# Telemetry cost under load (issue #6): requests/second through
#   wrk → web's outbound route → mTLS (pooled HTTP/2) → api's inbound → nginx
# with tracing off, on (OTLP/HTTP to a local sink, and a JSON-lines trace file), and with
# an unreachable collector (OTLP/gRPC to a port nobody listens on).
#
# Each configuration restarts both sidecars (1 worker each, the default) against one
# control plane and one nginx; configurations are interleaved for ROUNDS rounds so drift
# on the machine hits them all alike; each configuration is compared with the `off` run of
# its own round, and the median of those changes is reported (keep `off` first in CONFIGS).
#
# Usage: benches/load/telemetry.sh            (needs wrk, nginx and curl: apt-get install -y wrk nginx-light curl)
#   TRELLIS_BIN=path/to/trellis  ROUNDS=3  DURATION=10s  CONNECTIONS=32  THREADS=2
set -euo pipefail

# Settings are environment variables (above); any argument is a mistake or a request for help.
if [ $# -gt 0 ]; then
  sed -n '2,13s/^# \{0,1\}//p' "$0"
  case "$1" in -h | --help) exit 0 ;; *) echo "telemetry bench: no arguments; settings are environment variables" >&2; exit 2 ;; esac
fi

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
CONFIGS=(${CONFIGS:-off otlp-http trace-file unreachable})

cd "$(dirname "$0")/../.."
for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { echo "telemetry bench: $tool is missing (apt-get install -y wrk nginx-light curl)" >&2; exit 1; }
done
if [ -z "${TRELLIS_BIN:-}" ]; then
  cargo build --release --bin trellis >&2
  TRELLIS_BIN="${CARGO_TARGET_DIR:-target}/release/trellis"
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WEB=spiffe://cluster.local/ns/bench/sa/web
API=spiffe://cluster.local/ns/bench/sa/api
BACKEND=$(free_port); SINK=$(free_port); CONTROL=$(free_port)
API_IN=$(free_port); ROUTE=$(free_port); NOBODY=$(free_port)
API_ADMIN=$(free_port); WEB_ADMIN=$(free_port)

# nginx: the backend (a tiny 200) and an OTLP/HTTP sink that accepts and discards exports
# (a collector's decoding cost belongs to the collector's machine, not the proxy's).
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$SINK;
    client_max_body_size 64m;
    location /v1/traces { default_type application/x-protobuf; return 200 ""; }
  }
}
EOF
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"

export TRELLIS_LOG=warn
"$TRELLIS_BIN" control run --data-dir "$WORK/control" --listen "127.0.0.1:$CONTROL" >"$WORK/control.out" 2>"$WORK/control.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/control.out" 2>/dev/null && break; sleep 0.1; done
export TRELLIS_CONTROL="https://127.0.0.1:$CONTROL"
export TRELLIS_CA_BUNDLE="$WORK/control/bundle.pem"
export TRELLIS_ADMIN_TOKEN_FILE="$WORK/control/admin.token"
"$TRELLIS_BIN" policy apply -f - >/dev/null <<EOF
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-from-web}
spec:
  selector: $API
  rules:
    - from: [{identity: $WEB}]
EOF

telemetry_flags() { # $1 = config, $2 = sidecar name
  case "$1" in
    off) ;;
    otlp-http) echo "--otlp-endpoint http://127.0.0.1:$SINK --otlp-protocol http" ;;
    trace-file) echo "--trace-file $WORK/$2-spans.jsonl" ;;
    unreachable) echo "--otlp-endpoint http://127.0.0.1:$NOBODY --otlp-protocol grpc" ;;
  esac
}

wait_ready() {
  for _ in $(seq 200); do curl -fs "http://$1/ready" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "sidecar at $1 never became ready" >&2; return 1
}

start_sidecars() { # $1 = config
  local t
  t=$("$TRELLIS_BIN" token create --spiffe-id "$API")
  # shellcheck disable=SC2046
  "$TRELLIS_BIN" proxy run --token "$t" --admin "127.0.0.1:$API_ADMIN" \
    --inbound "127.0.0.1:$API_IN=127.0.0.1:$BACKEND" $(telemetry_flags "$1" api) 2>>"$WORK/api.log" &
  API_PID=$!
  t=$("$TRELLIS_BIN" token create --spiffe-id "$WEB")
  # shellcheck disable=SC2046
  "$TRELLIS_BIN" proxy run --token "$t" --admin "127.0.0.1:$WEB_ADMIN" \
    --route "127.0.0.1:$ROUTE=127.0.0.1:$API_IN,$API" $(telemetry_flags "$1" web) 2>>"$WORK/web.log" &
  WEB_PID=$!
  PIDS+=("$API_PID" "$WEB_PID")
  wait_ready "127.0.0.1:$API_ADMIN"
  wait_ready "127.0.0.1:$WEB_ADMIN"
}

stop_sidecars() {
  kill "$API_PID" "$WEB_PID" 2>/dev/null || true
  wait "$API_PID" "$WEB_PID" 2>/dev/null || true
  rm -f "$WORK"/*-spans.jsonl
}

cpu_ticks() { # utime + stime of the given processes (all their threads), in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done
  echo "$t"
}

metric() { # $1 = admin address, $2 = metric line prefix
  curl -fs "http://$1/metrics" | awk -v m="$2" 'index($0, m) == 1 { s += $NF } END { printf "%d", s }'
}

HZ=$(getconf CLK_TCK)
declare -A RPS CPU DRPS DCPU
change_num() { awk -v b="$1" -v m="$2" 'BEGIN { printf "%.1f", (m - b) * 100 / b }'; }
for round in $(seq "$ROUNDS"); do
  for cfg in "${CONFIGS[@]}"; do
    start_sidecars "$cfg"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$ROUTE/" >/dev/null # warm-up
    before=$(cpu_ticks "$API_PID" "$WEB_PID")
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$ROUTE/")
    after=$(cpu_ticks "$API_PID" "$WEB_PID")
    rps=$(awk '/Requests\/sec/ { printf "%d", $2 }' <<<"$out")
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    bad=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
    # CPU both sidecars spent per request (exporter thread included): steadier than req/s
    # when something else runs on the machine.
    us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$reqs" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    sleep 1.5 # let the last batch go out before reading the span counters
    exported=$(metric "127.0.0.1:$API_ADMIN" trellis_spans_exported_total)
    dropped=$(metric "127.0.0.1:$API_ADMIN" trellis_spans_dropped_total)
    printf 'round %d %-12s %8s req/s %6s us CPU/req  non-2xx=%s  api spans exported=%s dropped=%s\n' \
      "$round" "$cfg" "$rps" "$us" "${bad:-0}" "$exported" "$dropped"
    RPS[$cfg]+="$rps "
    CPU[$cfg]+="$us "
    # Paired with this round's `off` (run moments earlier): load that comes and goes on
    # the machine moves both alike.
    if [ -n "${off_rps:-}" ] && [ "$cfg" != off ]; then
      DRPS[$cfg]+="$(change_num "$off_rps" "$rps") "
      DCPU[$cfg]+="$(change_num "$off_us" "$us") "
    fi
    [ "$cfg" = off ] && { off_rps=$rps; off_us=$us; }
    stop_sidecars
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo
echo "median of $ROUNDS rounds, wrk -t$THREADS -c$CONNECTIONS -d$DURATION, 1 worker per proxy"
echo "(change = median over rounds of the change against that round's off run):"
for cfg in "${CONFIGS[@]}"; do
  r=$(median <<<"${RPS[$cfg]}")
  c=$(median <<<"${CPU[$cfg]}")
  if [ "$cfg" = off ]; then dr=0; dc=0; else dr=$(median <<<"${DRPS[$cfg]:-0}"); dc=$(median <<<"${DCPU[$cfg]:-0}"); fi
  printf '  %-12s %8.0f req/s %+6.1f%%   %6.1f us sidecar CPU/req %+6.1f%%\n' "$cfg" "$r" "$dr" "$c" "$dc"
done
