#!/usr/bin/env bash
# Trellis load benchmark (issue #9): Trellis vs nginx and HAProxy mTLS pairs vs no proxy,
# with wrk, oha, h2load and iperf3, all on loopback. See benches/README.md.
#
#   benches/load/run.sh [--quick] [--rounds N] [--duration S] [--out DIR] [--only SCENARIO,...]
#                       [--targets direct,trellis,nginx,haproxy,relay] [--help]
#
# Measures TRELLIS_BIN if set; otherwise ${CARGO_TARGET_DIR:-target}/release/trellis, built
# first with `cargo build --release --bin trellis` (a no-op when it is up to date; set
# LOADBENCH_NO_BUILD=1 to measure the binary as it is).
set -euo pipefail
command_line="${TRELLIS_BIN:+TRELLIS_BIN=$TRELLIS_BIN }benches/load/run.sh${*:+ $*}"

# Paths the user gives are relative to where they ran this from; the script works from the
# repository's root, so make them absolute first.
caller=$PWD
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$caller" "$1" ;; esac; }
[ -n "${TRELLIS_BIN:-}" ] && TRELLIS_BIN=$(absolute "$TRELLIS_BIN")
args=()
render=""
prev=""
for a in "$@"; do
  case "$prev" in --out | --render | --trellis-bin) a=$(absolute "$a") ;; esac
  case "$a" in
    --out=*) a="--out=$(absolute "${a#--out=}")" ;;
    --render=*) a="--render=$(absolute "${a#--render=}")" ;;
    --trellis-bin=*) a="--trellis-bin=$(absolute "${a#--trellis-bin=}")" ;;
  esac
  [ "$prev" = --render ] && render=$a
  case "$a" in --render=*) render=${a#--render=} ;; esac
  # A binary named on the command line is the one measured: nothing to build.
  [ "$prev" = --trellis-bin ] && TRELLIS_BIN=$a
  case "$a" in --trellis-bin=*) TRELLIS_BIN=${a#--trellis-bin=} ;; esac
  args+=("$a")
  prev=$a
done
set -- ${args[@]+"${args[@]}"}
cd "$(dirname "$0")/../.."

command -v python3 >/dev/null || { echo "load bench: python3 is missing (apt-get install -y python3)" >&2; exit 1; }

for a in "$@"; do
  case "$a" in -h | --help) exec python3 benches/load/loadbench.py --help ;; esac
done

# Re-rendering a saved run measures nothing: no tools, no binary.
[ -n "$render" ] && exec python3 benches/load/loadbench.py "$@"

# A mistyped argument is said now, not after a release build.
python3 benches/load/loadbench.py --check-args "$@" || exit $?

# Tools: the driver names each missing one with its install command and skips only the
# scenarios that need it; this is the same list up front.
missing=()
for t in wrk oha h2load iperf3 nginx haproxy openssl; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "load bench: missing tools: ${missing[*]} — the scenarios that need them are skipped. To install:" >&2
  for t in "${missing[@]}"; do
    case "$t" in
      wrk) echo "  apt-get install -y wrk" ;;
      oha) echo "  cargo install oha --locked      # then make sure ~/.cargo/bin is on PATH" ;;
      h2load) echo "  apt-get install -y nghttp2-client" ;;
      iperf3) echo "  apt-get install -y iperf3" ;;
      nginx) echo "  apt-get install -y nginx-light" ;;
      haproxy) echo "  apt-get install -y haproxy" ;;
      openssl) echo "  apt-get install -y openssl" ;;
    esac
  done >&2
fi

if [ -z "${TRELLIS_BIN:-}" ]; then
  TRELLIS_BIN="${CARGO_TARGET_DIR:-target}/release/trellis"
  if [ ! -x "$TRELLIS_BIN" ] || [ "${LOADBENCH_NO_BUILD:-0}" != 1 ]; then
    echo "load bench: cargo build --release --bin trellis" >&2
    cargo build --release --bin trellis >&2
  fi
fi
[ -x "$TRELLIS_BIN" ] || { echo "load bench: no trellis binary at $TRELLIS_BIN" >&2; exit 1; }
"$TRELLIS_BIN" proxy run --help >/dev/null 2>&1 ||
  { echo "load bench: $TRELLIS_BIN has no 'proxy run' (a stale build?)" >&2; exit 1; }
export TRELLIS_BIN

# Scenario 6 holds 10,000 connections: raise the open-files limit to the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# Everything the driver starts is listed in OUT/work/pids and stopped by the driver on exit;
# this trap is the backstop if the driver itself dies.
out=target/load-results
prev=""
for a in "$@"; do
  [ "$prev" = --out ] && out=$a
  case "$a" in --out=*) out=${a#--out=} ;; esac
  prev=$a
done
driver=""
cleanup() {
  [ -n "$driver" ] && kill -TERM "$driver" 2>/dev/null && wait "$driver" 2>/dev/null || true
  for f in "$out/work/tool.pid" "$out/work/pids"; do
    [ -f "$f" ] || continue
    while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then
        echo "load bench: stopping leftover $name ($pid)" >&2
        kill -TERM "$pid" 2>/dev/null || true
      fi
    done <"$f"
    rm -f "$f"
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 benches/load/loadbench.py --command "$command_line" "$@" &
driver=$!
set +e
wait "$driver"
rc=$?
driver=""
exit "$rc"
