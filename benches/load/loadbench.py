#!/usr/bin/env python3
"""Trellis load benchmark (issue #9): the Trellis sidecar pair side by side with nginx and
HAProxy mTLS pairs and with no proxy at all, driven by public tools, everything on loopback.

Run it through benches/load/run.sh (which raises the open-files limit and builds the
binary); `run.sh --help` lists the options. Python 3.11 standard library only.

Targets (each proxy limited to one worker thread):
  direct   client -> backend
  trellis  client -> web sidecar (route) -> pooled HTTP/2 over mTLS -> api sidecar -> backend
  nginx    client -> nginx -> HTTP/1.1 over mTLS (keep-alive pool) -> nginx -> backend
  haproxy  client -> HAProxy -> mTLS (reused server connections) -> HAProxy -> backend
  relay    client -> HAProxy (mode tcp) -> plain TCP -> HAProxy (mode tcp) -> backend: a
           reference, not a peer (no TLS, no HTTP): the least two extra hops cost here
           (scenarios 1 and 2 only)

Scenarios (each round measures every target once, in an order that rotates per round):
  http1  HTTP/1.1 keep-alive peak rps, p50/p99            wrk -tT -c32
  rate   2,000 rps fixed, latency-corrected p50/p99/p99.9  oha -q 2000 --latency-correction -c32
  close  a new connection per request                      wrk -H 'Connection: close' -c32
  h2     HTTP/2 multiplexed (h2c, prior knowledge)         h2load -c8 -m10 -t1
  bulk   one TCP stream through an opaque port             iperf3 -P1 (direct, trellis, haproxy)
  idle   RSS holding N idle keep-alive app connections per pair, and N idle mTLS
         connections into the Trellis inbound sidecar
RSS (VmRSS of each sidecar's processes) is sampled after start, idle, after every scenario.
"""

import argparse
import collections
import datetime
import errno
import hashlib
import json
import os
import re
import resource
import selectors
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

TRUST_DOMAIN = "cluster.local"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/web"
API_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/api"
BODY = b"hello from backend\n"

TARGETS = ["direct", "trellis", "nginx", "haproxy", "relay"]
MESH = ["direct", "trellis", "nginx", "haproxy"]  # the targets of scenarios 3-5
REFERENCE = ["relay"]  # measured beside the others, never judged: see peers/relay.cfg
PAIRS = ["trellis", "nginx", "haproxy"]
ROLES = ["outbound", "inbound"]

# name -> (title, tool, targets)
SCENARIOS = {
    "http1": ("1. HTTP/1.1 keep-alive, peak rps", "wrk", TARGETS),
    "rate": ("2. Fixed rate 2,000 rps, latency-corrected", "oha", TARGETS),
    "close": ("3. A new connection per request (Connection: close)", "wrk", MESH),
    "h2": ("4. HTTP/2 multiplexed (h2c prior knowledge)", "h2load", MESH),
    "bulk": ("5. Single-stream bulk TCP through an opaque port", "iperf3", ["direct", "trellis", "haproxy"]),
    "idle": ("6. RSS holding idle connections", None, PAIRS),
}

INSTALL = {
    "wrk": "apt-get install -y wrk",
    "oha": "cargo install oha --locked",
    "h2load": "apt-get install -y nghttp2-client",
    "iperf3": "apt-get install -y iperf3",
    "nginx": "apt-get install -y nginx-light",
    "haproxy": "apt-get install -y haproxy",
    "openssl": "apt-get install -y openssl",
}

COLORS = {"direct": "#8c8c8c", "trellis": "#3b6fd8", "nginx": "#2e9e4f", "haproxy": "#d0542a", "relay": "#c8c8c8"}
LIGHT = {"trellis": "#9db7ec", "nginx": "#96cfa7", "haproxy": "#e8a994"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(argv, **kw):
    """Runs a short command and returns its stdout (stderr folded in), '' if it cannot run."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def tail(path, n=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Processes: everything started here is stopped on exit (and listed in a pid file for run.sh's
# trap, in case this driver itself is killed hard).


class Procs:
    """The servers the bench starts, in the driver's session unless `own_sessions`. With the
    kernel's autogroup scheduling (on by default) each session is a scheduling group, as each
    container is under Kubernetes and each daemonized nginx or HAProxy is (shared/peers'
    scripts daemonize them); one group for the client, backend and both sidecars places
    processes differently (see benches/README.md, *Scheduling groups*)."""

    def __init__(self, work: Path, own_sessions=False):
        self.work = work
        self.own_sessions = own_sessions
        self.procs = []  # (name, Popen)
        self.pidfile = work / "pids"

    def start(self, name, argv, env=None):
        logf = open(self.work / f"{name}.log", "wb")
        p = subprocess.Popen([str(a) for a in argv], stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=self.own_sessions)
        logf.close()
        self.procs.append((name, p))
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid} {name}\n")
        return p

    def check(self, name, p):
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail(self.work / f'{name}.log')}")

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 8
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.pidfile.unlink(missing_ok=True)


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port, procs, name, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check(name, proc)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name}: port {port} not accepting after {timeout}s")


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def wait_ready(admin_port, procs, name, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check(name, proc)
        try:
            if http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{name}: /ready not 200 after {timeout}s:\n{tail(procs.work / f'{name}.log')}")


# ---------------------------------------------------------------------------------------------
# /proc readings


def tree(pid):
    """pid and its descendants (nginx: master + worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return out


def status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_sample(pid):
    pids = tree(pid)
    fds = 0
    for p in pids:
        try:
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return {"rss_kib": sum(status_kib(p, "VmRSS") for p in pids),
            "hwm_kib": sum(status_kib(p, "VmHWM") for p in pids),
            "processes": len(pids), "fds": fds}


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK


PF_KTHREAD = 0x00200000


def user_process_cpu():
    """{pid: CPU ticks} of every user-space process on the machine (kernel threads left out:
    they do this bench's own network work too)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[6]) & PF_KTHREAD:
            continue
        out[int(d)] = int(f[11]) + int(f[12])
    return out


def busy_cpu_seconds():
    """CPU time the whole machine has spent busy, all cores (/proc/stat: everything but idle and
    iowait; softirq included, as the network work of processes is partly charged there)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f)
    return (user + nice + system + irq + softirq + steal) / CLK


def children_cpu_seconds():
    """CPU of this driver's children that have exited and been waited for (the load tool)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_cpu_seconds(before, after, ours):
    """CPU that processes other than ours used between two user_process_cpu() snapshots
    (a process that started in between counts whole; one that ended in between is missed)."""
    return sum(t - before.get(p, 0) for p, t in after.items() if p not in ours) / CLK


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


# ---------------------------------------------------------------------------------------------
# The load tools


class ToolError(Exception):
    pass


TOOL_PIDFILE = None  # set by main(): the running load tool's pid, for run.sh's trap


def run_tool(argv, timeout):
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    if TOOL_PIDFILE:
        TOOL_PIDFILE.write_text(f"{p.pid} {argv[0]}\n")
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise ToolError(f"{argv[0]} did not finish in {timeout}s")
    except BaseException:
        p.kill()
        p.wait()
        raise
    finally:
        if TOOL_PIDFILE:
            TOOL_PIDFILE.unlink(missing_ok=True)
    if p.returncode != 0:
        raise ToolError(f"{shlex.join(map(str, argv))} exited {p.returncode}: {(err or out).strip()[-600:]}")
    return out


UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out):
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise ToolError(f"no Requests/sec in wrk output: {out[-400:]}")
    lat = {p: float(v) * UNIT_MS[u] for p, v, u in
           re.findall(r"^\s+(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(m.group(1)), "p50_ms": lat.get("50"), "p90_ms": lat.get("90"),
            "p99_ms": lat.get("99"), "requests": int(total.group(1)) if total else None,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": dict(zip(["connect", "read", "write", "timeout"], map(int, sock.groups())))
            if sock else {}}


def parse_h2load(out):
    fin = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    tfr = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)"
                    r"\s+([\d.]+)(us|ms|s)", out)
    if not fin or not req:
        raise ToolError(f"cannot parse h2load output: {out[-400:]}")
    res = {"rps": float(fin.group(3)), "requests": int(req.group(1)), "succeeded": int(req.group(4)),
           "failed": int(req.group(5)), "errored": int(req.group(6)), "timeout": int(req.group(7))}
    if codes:
        res["non2xx"] = sum(int(codes.group(i)) for i in (2, 3, 4))
        res["codes"] = codes.group(0).removeprefix("status codes: ")
    if tfr:
        g = tfr.groups()
        res["mean_ms"] = float(g[4]) * UNIT_MS[g[5]]
        res["sd_ms"] = float(g[6]) * UNIT_MS[g[7]]
        res["max_ms"] = float(g[2]) * UNIT_MS[g[3]]
    return res


def oha_json_flag():
    help_text = sh(["oha", "--help"])
    return ["--output-format", "json"] if "--output-format" in help_text else ["-j"]


def parse_oha(out):
    try:
        j = json.loads(out)
    except json.JSONDecodeError:
        raise ToolError(f"oha did not print JSON: {out[-400:]}")
    s, p = j["summary"], j.get("latencyPercentiles", {})
    codes = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
    # oha aborts the requests still in flight when -z runs out: not the target's errors.
    errs = {k: v for k, v in (j.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {"rps": s.get("requestsPerSec"), "p50_ms": ms(p.get("p50")), "p90_ms": ms(p.get("p90")),
            "p99_ms": ms(p.get("p99")), "p999_ms": ms(p.get("p99.9")), "max_ms": ms(s.get("slowest")),
            "requests": sum(codes.values()), "non2xx": sum(v for k, v in codes.items() if not k.startswith("2")),
            "errors": sum(errs.values()), "error_kinds": errs, "success_rate": s.get("successRate")}


def parse_iperf(out):
    try:
        j = json.loads(out)
    except json.JSONDecodeError:
        raise ToolError(f"iperf3 did not print JSON: {out[-400:]}")
    if j.get("error"):
        raise ToolError(f"iperf3: {j['error']}")
    end = j["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "bytes": end["sum_received"]["bytes"],
            "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits")}


# ---------------------------------------------------------------------------------------------
# Idle connections (scenario 6). Plain sockets multiplexed with selectors: the client costs
# little CPU and one file descriptor per connection.


def _http_complete(buf):
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        return status if len(body) >= int(m.group(1)) else None
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        return status if body.endswith(b"0\r\n\r\n") else None
    return status


def open_idle_http(port, n, window=256, timeout=180):
    """n keep-alive connections to 127.0.0.1:port, one GET each (answer read and checked),
    then left idle. Returns (sockets, failures Counter, seconds)."""
    sel = selectors.DefaultSelector()
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    idle, failed = [], collections.Counter()
    started = inflight = 0
    t0 = time.monotonic()

    def fail(s, why):
        nonlocal inflight
        failed[why] += 1
        inflight -= 1
        sel.unregister(s)
        s.close()

    while (started < n or inflight) and time.monotonic() - t0 < timeout:
        while started < n and inflight < window:
            started += 1
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                failed[f"connect: {os.strerror(err)}"] += 1
                s.close()
                continue
            inflight += 1
            sel.register(s, selectors.EVENT_WRITE, [b"", "connecting"])
        for key, _ in sel.select(timeout=1):
            s, st = key.fileobj, key.data
            if st[1] == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, f"connect: {os.strerror(err)}")
                    continue
                try:
                    s.send(req)
                except OSError as e:
                    fail(s, f"write: {e.strerror}")
                    continue
                st[1] = "reading"
                sel.modify(s, selectors.EVENT_READ, st)
                continue
            try:
                data = s.recv(65536)
            except OSError as e:
                fail(s, f"read: {e.strerror}")
                continue
            if not data:
                fail(s, "closed before the answer")
                continue
            st[0] += data
            status = _http_complete(st[0])
            if status is None:
                continue
            if status != 200:
                fail(s, f"HTTP {status}")
                continue
            sel.unregister(s)
            inflight -= 1
            idle.append(s)
    for key in list(sel.get_map().values()):
        failed["timed out"] += 1
        key.fileobj.close()
    sel.close()
    return idle, failed, time.monotonic() - t0


def count_alive(socks):
    """Connections the server has not closed (no EOF or error waiting on them)."""
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    dead = 0
    by_fd = {s.fileno(): s for s in socks}
    for fd, ev in p.poll(0):
        if ev & (select.POLLERR | select.POLLHUP):
            dead += 1
            continue
        try:
            if by_fd[fd].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                dead += 1
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            dead += 1
    return len(socks) - dead


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


class IdleMtls:
    """n idle mTLS connections, as a peer sidecar's pooled HTTP/2 connection looks when idle:
    TLS 1.3 with a client certificate, ALPN h2, the HTTP/2 preface and SETTINGS, and then only
    answers to the server's SETTINGS and keep-alive PINGs (so none is closed as dead)."""

    def __init__(self, port, n, cert, key, bundle, window=64):
        self.port, self.n, self.window = port, n, window
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.check_hostname = False  # the server's SVID has only a URI SAN
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(bundle)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2"])
        self.sel = selectors.DefaultSelector()
        self.established, self.failed, self.closed = [], collections.Counter(), 0
        self.inflight = 0

    def _fail(self, s, why):
        self.failed[why] += 1
        self.inflight -= 1
        self.sel.unregister(s)
        s.close()

    def _handshake(self, s, st):
        try:
            s.do_handshake()
        except ssl.SSLWantReadError:
            self.sel.modify(s, selectors.EVENT_READ, st)
            return
        except ssl.SSLWantWriteError:
            self.sel.modify(s, selectors.EVENT_WRITE, st)
            return
        except (ssl.SSLError, OSError) as e:
            self._fail(s, f"handshake: {e}")
            return
        if s.selected_alpn_protocol() != "h2":
            self._fail(s, f"ALPN {s.selected_alpn_protocol()!r}")
            return
        s.send(H2_PREFACE + H2_SETTINGS)
        st["state"] = "idle"
        self.inflight -= 1
        self.established.append(s)
        self.sel.modify(s, selectors.EVENT_READ, st)
        self._read(s, st)

    def _read(self, s, st):
        while True:
            try:
                data = s.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self._closed(s, st)
                return
            st["buf"] += data
        buf = st["buf"]
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            typ, flags, payload = buf[3], buf[4], buf[9:9 + length]
            buf = buf[9 + length:]
            try:
                if typ == 4 and not flags & 1:
                    s.send(H2_SETTINGS_ACK)
                elif typ == 6 and not flags & 1:
                    s.send(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)
                elif typ == 7:  # GOAWAY
                    self._closed(s, st)
                    return
            except (ssl.SSLError, OSError):
                pass
        st["buf"] = buf

    def _closed(self, s, st):
        st["state"] = "closed"
        self.closed += 1
        self.sel.unregister(s)

    def pump(self, timeout):
        for key, _ in self.sel.select(timeout=timeout):
            s, st = key.fileobj, key.data
            if st["state"] == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(s, f"connect: {os.strerror(err)}")
                    continue
                self.sel.unregister(s)
                t = self.ctx.wrap_socket(s, do_handshake_on_connect=False)
                st["state"] = "handshake"
                self.sel.register(t, selectors.EVENT_WRITE, st)
                self._handshake(t, st)
            elif st["state"] == "handshake":
                self._handshake(s, st)
            elif st["state"] == "idle":
                self._read(s, st)

    def open_all(self, timeout=240):
        t0 = time.monotonic()
        started = 0
        while (started < self.n or self.inflight) and time.monotonic() - t0 < timeout:
            while started < self.n and self.inflight < self.window:
                started += 1
                s = socket.socket()
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", self.port))
                if err not in (0, errno.EINPROGRESS):
                    self.failed[f"connect: {os.strerror(err)}"] += 1
                    s.close()
                    continue
                self.inflight += 1
                self.sel.register(s, selectors.EVENT_WRITE, {"state": "connecting", "buf": b""})
            self.pump(1)
        for key in list(self.sel.get_map().values()):
            if key.data["state"] in ("connecting", "handshake"):
                self.failed["timed out"] += 1
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
        return time.monotonic() - t0

    def hold(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(max(0.01, min(0.5, end - time.monotonic())))

    def alive(self):
        return len(self.established) - self.closed

    def close(self):
        for s in self.established:
            try:
                s.close()
            except OSError:
                pass
        self.sel.close()


# ---------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args, work: Path):
        self.a = args
        self.work = work
        self.procs = Procs(work, own_sessions=args.own_sessions)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
        self.env["TRELLIS_LOG"] = "warn"
        self.sidecars = {}  # pair -> role -> Popen
        self.urls = {}  # target -> {"h1": url, "h2": url, "tcp": port}
        self.skipped_targets = {}  # target -> reason: not measured at all
        self.broken = {}  # (target, "h1" | "h2") -> reason: a path that failed its sanity check
        self.results = {"scenarios": {}, "rss": {}, "idle_conns": {}, "load": []}
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.load_before = {}

    # --- setup ------------------------------------------------------------------------------

    def template(self, src: Path, dst: Path, values):
        text = src.read_text()
        for k, v in values.items():
            text = text.replace(f"@{k}@", str(v))
        left = re.findall(r"@[A-Z0-9_]+@", text)
        if left:
            raise RuntimeError(f"{src}: unfilled placeholders {left}")
        dst.write_text(text)
        return dst

    def setup(self, tools):
        P = dict(zip(
            ["B_H1", "B_H2C", "IPERF", "CONTROL", "T_OUT_H1", "T_OUT_H2", "T_OUT_TCP", "T_IN_H1", "T_IN_H2",
             "T_IN_TCP", "T_ADMIN_OUT", "T_ADMIN_IN", "N_OUT_H1", "N_OUT_H2", "N_IN_H1", "H_OUT_H1", "H_OUT_H2",
             "H_OUT_TCP", "H_IN_H1", "H_IN_H2", "H_IN_TCP", "R_OUT", "R_IN"], free_ports(23)))
        self.ports = P
        (self.work / "tmp").mkdir(exist_ok=True)
        have = lambda t: t in tools  # noqa: E731

        if have("iperf3"):
            p = self.procs.start("iperf3-server", ["iperf3", "-s", "-p", P["IPERF"]])
            wait_port(P["IPERF"], self.procs, "iperf3-server", p)

        if have("nginx"):
            conf = self.template(HERE / "backend-nginx.conf", self.work / "backend-nginx.conf",
                                 {"DIR": self.work, "NOFILE": self.nofile, "H1_PORT": P["B_H1"],
                                  "H2C_PORT": P["B_H2C"]})
            p = self.procs.start("backend", ["nginx", "-e", self.work / "backend.err", "-c", conf])
            wait_port(P["B_H1"], self.procs, "backend", p)
            wait_port(P["B_H2C"], self.procs, "backend", p)
            self.urls["direct"] = {"h1": f"http://127.0.0.1:{P['B_H1']}/", "h2": f"http://127.0.0.1:{P['B_H2C']}/"}
        elif not have("iperf3"):
            self.skipped_targets["direct"] = "nginx (the backend) and iperf3 are missing"
        if have("iperf3"):
            self.urls.setdefault("direct", {})["tcp"] = P["IPERF"]

        for pair, starter in (("trellis", self.start_trellis), ("nginx", self.start_nginx),
                              ("haproxy", self.start_haproxy), ("relay", self.start_relay)):
            if pair not in self.a.targets:
                continue
            try:
                starter(P, tools)
            except Exception as e:  # a pair that cannot start is skipped, the rest go on
                self.skipped_targets[pair] = f"failed to start: {e}"
                log(f"ERROR: {pair} pair failed to start: {e}")

    def start_trellis(self, P, tools):
        b = self.a.trellis_bin
        data = self.work / "trellis-control"
        p = self.procs.start("trellis-control",
                             [b, "control", "run", "--data-dir", data, "--listen", f"127.0.0.1:{P['CONTROL']}"],
                             env=self.env)
        wait_port(P["CONTROL"], self.procs, "trellis-control", p)
        deadline = time.monotonic() + 10
        while not (data / "admin.token").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        env = dict(self.env, TRELLIS_CONTROL=f"https://127.0.0.1:{P['CONTROL']}",
                   TRELLIS_CA_BUNDLE=str(data / "bundle.pem"), TRELLIS_ADMIN_TOKEN_FILE=str(data / "admin.token"))
        self.trellis_data = data

        def cli(*argv):
            r = subprocess.run([str(b), *map(str, argv)], capture_output=True, text=True, env=env, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"trellis {' '.join(map(str, argv))}: {r.stderr.strip()}")
            return r.stdout.strip()

        cli("policy", "apply", "-f", HERE / "trellis-policy.yaml")
        opaque = f"{P['T_OUT_TCP']},{P['IPERF']}"
        inbound = self.procs.start("trellis-inbound", [
            b, "proxy", "run", "--token", cli("token", "create", "--spiffe-id", API_ID),
            "--inbound", f"127.0.0.1:{P['T_IN_H1']}=127.0.0.1:{P['B_H1']}",
            "--inbound", f"127.0.0.1:{P['T_IN_H2']}=127.0.0.1:{P['B_H2C']}",
            "--inbound", f"127.0.0.1:{P['T_IN_TCP']}=127.0.0.1:{P['IPERF']}",
            "--admin", f"127.0.0.1:{P['T_ADMIN_IN']}", "--opaque-ports", opaque], env=env)
        outbound = self.procs.start("trellis-outbound", [
            b, "proxy", "run", "--token", cli("token", "create", "--spiffe-id", WEB_ID),
            "--route", f"127.0.0.1:{P['T_OUT_H1']}=127.0.0.1:{P['T_IN_H1']},{API_ID}",
            "--route", f"127.0.0.1:{P['T_OUT_H2']}=127.0.0.1:{P['T_IN_H2']},{API_ID}",
            "--route", f"127.0.0.1:{P['T_OUT_TCP']}=127.0.0.1:{P['T_IN_TCP']},{API_ID}",
            "--admin", f"127.0.0.1:{P['T_ADMIN_OUT']}", "--opaque-ports", opaque], env=env)
        wait_ready(P["T_ADMIN_IN"], self.procs, "trellis-inbound", inbound)
        wait_ready(P["T_ADMIN_OUT"], self.procs, "trellis-outbound", outbound)
        self.sidecars["trellis"] = {"outbound": outbound, "inbound": inbound}
        self.urls["trellis"] = {"h1": f"http://127.0.0.1:{P['T_OUT_H1']}/",
                                "h2": f"http://127.0.0.1:{P['T_OUT_H2']}/", "tcp": P["T_OUT_TCP"],
                                "mtls": P["T_IN_H1"]}

    def peer_certs(self):
        certs = self.work / "peer-certs"
        if not (certs / "ca.crt").exists():
            subprocess.run(["bash", HERE / "peers" / "gen-certs.sh", certs], check=True, capture_output=True)
            for w in ("web", "api"):
                (certs / f"{w}.pem").write_text((certs / f"{w}.crt").read_text() + (certs / f"{w}.key").read_text())
        return certs

    def start_nginx(self, P, tools):
        if "nginx" not in tools:
            raise RuntimeError("nginx is missing")
        v = {"DIR": self.work, "NOFILE": self.nofile, "CERTS": self.peer_certs(), "BACKEND_H1": P["B_H1"],
             "IN_H1": P["N_IN_H1"], "OUT_H1": P["N_OUT_H1"], "OUT_H2": P["N_OUT_H2"]}
        procs = {}
        for role in ("inbound", "outbound"):
            conf = self.template(HERE / "peers" / f"nginx-{role}.conf", self.work / f"nginx-{role}.conf", v)
            procs[role] = self.procs.start(f"nginx-{role}", ["nginx", "-e", self.work / f"nginx-{role}.err",
                                                             "-c", conf])
        for role, port in (("inbound", "N_IN_H1"), ("outbound", "N_OUT_H1"), ("outbound", "N_OUT_H2")):
            wait_port(P[port], self.procs, f"nginx-{role}", procs[role])
        self.sidecars["nginx"] = procs
        self.urls["nginx"] = {"h1": f"http://127.0.0.1:{P['N_OUT_H1']}/", "h2": f"http://127.0.0.1:{P['N_OUT_H2']}/"}

    def start_haproxy(self, P, tools):
        if "haproxy" not in tools:
            raise RuntimeError("haproxy is missing")
        v = {"CERTS": self.peer_certs(), "MAXCONN": max(4000, self.a.idle_conns + 500),
             "BACKEND_H1": P["B_H1"], "BACKEND_H2C": P["B_H2C"], "IPERF": P["IPERF"],
             "IN_H1": P["H_IN_H1"], "IN_H2": P["H_IN_H2"], "IN_TCP": P["H_IN_TCP"],
             "OUT_H1": P["H_OUT_H1"], "OUT_H2": P["H_OUT_H2"], "OUT_TCP": P["H_OUT_TCP"]}
        procs = {}
        for role in ("inbound", "outbound"):
            conf = self.template(HERE / "peers" / f"haproxy-{role}.cfg", self.work / f"haproxy-{role}.cfg", v)
            procs[role] = self.procs.start(f"haproxy-{role}", ["haproxy", "-db", "-f", conf])
        for role, port in (("inbound", "H_IN_H1"), ("inbound", "H_IN_H2"), ("inbound", "H_IN_TCP"),
                           ("outbound", "H_OUT_H1"), ("outbound", "H_OUT_H2"), ("outbound", "H_OUT_TCP")):
            wait_port(P[port], self.procs, f"haproxy-{role}", procs[role])
        self.sidecars["haproxy"] = procs
        self.urls["haproxy"] = {"h1": f"http://127.0.0.1:{P['H_OUT_H1']}/",
                                "h2": f"http://127.0.0.1:{P['H_OUT_H2']}/", "tcp": P["H_OUT_TCP"]}

    def start_relay(self, P, tools):
        if "haproxy" not in tools:
            raise RuntimeError("haproxy is missing")
        procs = {}
        for role, listen, nxt in (("inbound", P["R_IN"], P["B_H1"]), ("outbound", P["R_OUT"], P["R_IN"])):
            conf = self.template(HERE / "peers" / "relay.cfg", self.work / f"relay-{role}.cfg",
                                 {"LISTEN": listen, "NEXT": nxt})
            procs[role] = self.procs.start(f"relay-{role}", ["haproxy", "-db", "-f", conf])
            wait_port(listen, self.procs, f"relay-{role}", procs[role])
        self.sidecars["relay"] = procs
        self.urls["relay"] = {"h1": f"http://127.0.0.1:{P['R_OUT']}/"}

    def sanity(self, tools):
        """Requests through every listener first, so a broken path is reported as broken rather
        than measured as fast errors. A broken path skips only the scenarios that use it. Without
        the backend (nginx) no HTTP scenario runs, and every HTTP path would only answer 502."""
        if "nginx" not in tools:
            return
        for t in list(self.urls):
            if t in self.skipped_targets or t not in self.a.targets:
                continue
            u = self.urls[t]
            if "h1" in u:
                try:
                    status, body = http_get(u["h1"])
                    if status != 200 or body != BODY:
                        raise RuntimeError(f"GET {u['h1']} answered {status} {body[:80]!r}")
                except Exception as e:
                    self.broken[(t, "h1")] = f"HTTP/1.1 sanity check failed: {e}"
                    log(f"ERROR: {t}: {self.broken[(t, 'h1')]}")
            if "h2" in u and "h2load" in tools:
                try:
                    r = parse_h2load(run_tool(["h2load", "-n", "20", "-c", "1", "-m", "4", u["h2"]], 30))
                    if r["succeeded"] != 20 or r.get("non2xx"):
                        raise RuntimeError(f"h2load -n 20 {u['h2']}: {r['succeeded']} of 20 succeeded, status "
                                           f"codes: {r.get('codes', '?')}")
                except Exception as e:
                    self.broken[(t, "h2")] = f"HTTP/2 (h2c) sanity check failed: {e}"
                    log(f"ERROR: {t}: {self.broken[(t, 'h2')]}")

    # --- measurements -----------------------------------------------------------------------

    def sample_rss(self, label):
        snap = {}
        for pair, roles in self.sidecars.items():
            snap[pair] = {role: rss_sample(roles[role].pid) for role in ROLES if roles[role].poll() is None}
        self.results["rss"][label] = snap
        return snap

    def sidecar_cpu(self, target):
        return sum(cpu_seconds(p.pid) for p in self.sidecars.get(target, {}).values())

    def measure(self, scn, target, warmup=False):
        a, u = self.a, self.urls[target]
        d = 1 if warmup else a.duration
        timeout = d + 60
        if scn in ("http1", "close"):
            argv = ["wrk", f"-t{a.wrk_threads}", f"-c{a.connections}", f"-d{d}s", "--latency"]
            if scn == "close":
                argv += ["-H", "Connection: close"]
            argv.append(u["h1"])
            parse = parse_wrk
        elif scn == "rate":
            if warmup:
                argv, parse = ["wrk", "-t1", f"-c{a.connections}", "-d1s", u["h1"]], parse_wrk
            else:
                argv = ["oha", "-z", f"{d}s", "-c", str(a.connections), "-q", str(a.rate), "--latency-correction",
                        "--no-tui", *oha_json_flag(), u["h1"]]
                parse = parse_oha
        elif scn == "h2":
            argv = ["h2load", "-c", str(a.h2_clients), "-m", str(a.h2_streams), "-t", "1", "-D", str(d), u["h2"]]
            parse = parse_h2load
        elif scn == "bulk":
            argv = ["iperf3", "-c", "127.0.0.1", "-p", str(u["tcp"]), "-t", str(d), "-P", "1", "-J"]
            parse = parse_iperf
        else:
            raise ValueError(scn)
        ours = {os.getpid()} | {q for _, p in self.procs.procs for q in tree(p.pid)}
        cpu0, all0 = self.sidecar_cpu(target), user_process_cpu()
        busy0, kids0 = busy_cpu_seconds(), children_cpu_seconds()
        ours0 = sum(all0.get(q, 0) for q in ours) / CLK
        t0 = time.monotonic()
        res = parse(run_tool(argv, timeout))
        wall = time.monotonic() - t0
        all1 = user_process_cpu()
        busy1, kids1 = busy_cpu_seconds(), children_cpu_seconds()
        res["wall_s"] = round(wall, 3)
        res["sidecar_cpu_s"] = round(self.sidecar_cpu(target) - cpu0, 3)
        # Other work on the machine during the measurement, in cores, two ways; the larger counts.
        # By process: CPU of the processes that are neither this driver nor started by it (misses
        # processes that started and ended within the measurement, such as a test suite's).
        # By machine: the machine's busy time minus ours and the load tool's (catches those; it
        # also counts kernel network work not charged to our processes, up to ~0.2 cores at
        # 100k req/s here, hence the 0.3 default threshold).
        by_process = other_cpu_seconds(all0, all1, ours) / wall
        ours1 = sum(all1.get(q, 0) for q in ours) / CLK
        by_machine = ((busy1 - busy0) - (ours1 - ours0) - (kids1 - kids0)) / wall
        res["other_cpu_by_process"], res["busy_minus_ours_cores"] = round(by_process, 2), round(by_machine, 2)
        res["other_cpu_cores"] = round(max(0.0, by_process, by_machine), 2)
        res["command"] = shlex.join(map(str, argv))
        # A proxy answering errors fast must not look fast.
        bad = res.get("non2xx", 0) + sum(res.get("socket_errors", {}).values()) + res.get("errors", 0) \
            + res.get("failed", 0) + res.get("errored", 0)
        res["error_count"] = bad
        return res

    def measure_undisturbed(self, scn, t, tentry):
        """Measures; if other work on the machine took more than --max-other-cpu cores meanwhile,
        measures again (up to --retries times) and keeps the least disturbed attempt. The others
        stay in the JSON under "discarded"."""
        attempts = []
        for attempt in range(1 + self.a.retries):
            res = self.measure(scn, t)
            attempts.append(res)
            if res["other_cpu_cores"] <= self.a.max_other_cpu:
                break
            if attempt < self.a.retries:
                log(f"  {scn} {t}: other work used {res['other_cpu_cores']:.2f} cores during the measurement; "
                    f"measuring again")
                time.sleep(2)
        best = min(attempts, key=lambda x: x["other_cpu_cores"])
        best["attempts"] = len(attempts)
        best["disturbed"] = best["other_cpu_cores"] > self.a.max_other_cpu
        tentry.setdefault("discarded", []).extend(x for x in attempts if x is not best)
        return best

    def run_scenario(self, scn, tools):
        title, tool, scn_targets = SCENARIOS[scn]
        targets = [t for t in TARGETS if t in scn_targets and t in self.a.targets and t not in self.skipped_targets
                   and (scn != "bulk" or "tcp" in self.urls.get(t, {}))]
        entry = self.results["scenarios"].setdefault(scn, {"title": title, "tool": tool, "targets": {},
                                                          "errors": [], "order": []})
        entry["loadavg_before"] = self.load_before.get(scn)
        proto = {"h2": "h2", "bulk": None}.get(scn, "h1")
        for t in targets:
            entry["targets"].setdefault(t, {"rounds": []})
        for t in [t for t in targets if (t, proto) in self.broken]:
            entry["targets"][t]["skipped"] = self.broken[(t, proto)]
            entry["errors"].append(f"{t}: not measured: {self.broken[(t, proto)]}")
            targets.remove(t)
        if scn != "bulk":  # warm-up: pools, caches, first-touch allocations
            for t in targets:
                try:
                    self.measure(scn, t, warmup=True)
                except Exception as e:
                    log(f"  warm-up {scn}/{t} failed: {e}")
        for r in range(self.a.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)] if targets else []
            entry["order"].append(order)
            for t in order:
                try:
                    res = self.measure_undisturbed(scn, t, entry["targets"][t])
                    entry["targets"][t]["rounds"].append(res)
                    log(f"  {scn} round {r + 1}/{self.a.rounds} {t:<8} {summary_line(scn, res)}"
                        + (f"  (other work: {res['other_cpu_cores']:.2f} cores)" if res["disturbed"] else ""))
                except Exception as e:
                    entry["targets"][t]["rounds"].append({"error": str(e)})
                    entry["errors"].append(f"round {r + 1} {t}: {e}")
                    log(f"  {scn} round {r + 1} {t}: ERROR {e}")
                if scn == "close":
                    time.sleep(1)  # let TIME_WAIT churn settle between targets

    def run_idle(self):
        n = self.a.idle_conns
        entry = self.results["idle_conns"]
        entry["n"] = n
        for pair in PAIRS:
            if pair not in self.sidecars or pair in self.skipped_targets or pair not in self.a.targets:
                continue
            if (pair, "h1") in self.broken:
                entry[f"{pair} app"] = {"skipped": self.broken[(pair, "h1")]}
                continue
            port = int(self.urls[pair]["h1"].rsplit(":", 1)[1].strip("/"))
            before = {role: rss_sample(self.sidecars[pair][role].pid) for role in ROLES}
            socks, failed, secs = open_idle_http(port, n)
            time.sleep(self.a.idle_settle)
            during = {role: rss_sample(self.sidecars[pair][role].pid) for role in ROLES}
            alive = count_alive(socks)
            for s in socks:
                s.close()
            entry[f"{pair} app"] = {"kind": "idle keep-alive HTTP/1.1 app connections into the outbound listener",
                                    "requested": n, "opened": len(socks), "alive_at_sample": alive,
                                    "failures": dict(failed), "open_seconds": round(secs, 2),
                                    "before": before, "during": during}
            log(f"  idle {pair}: {len(socks)}/{n} app connections open in {secs:.1f}s, {alive} alive at the sample; "
                f"outbound {during['outbound']['rss_kib'] / 1024:.1f} MiB, inbound {during['inbound']['rss_kib'] / 1024:.1f} MiB"
                + (f"; failures {dict(failed)}" if failed else ""))
            time.sleep(1)
        if "trellis" in self.sidecars and "trellis" not in self.skipped_targets and "trellis" in self.a.targets:
            certs = self.work / "mesh-client"
            subprocess.run(["bash", HERE / "mint-client-cert.sh", self.trellis_data, certs], check=True,
                           capture_output=True)
            inbound = self.sidecars["trellis"]["inbound"]
            before = rss_sample(inbound.pid)
            m = IdleMtls(self.urls["trellis"]["mtls"], n, certs / "web.crt", certs / "web.key",
                         self.trellis_data / "bundle.pem")
            try:
                secs = m.open_all()
                m.hold(self.a.idle_settle)
                during = rss_sample(inbound.pid)
                m.hold(0.5)
                alive = m.alive()
            finally:
                m.close()
            entry["trellis mtls"] = {"kind": "idle mTLS (TLS 1.3, client SVID, HTTP/2 preface) connections "
                                             "straight into the inbound sidecar",
                                     "requested": n, "opened": len(m.established), "alive_at_sample": alive,
                                     "failures": dict(m.failed), "open_seconds": round(secs, 2),
                                     "before": {"inbound": before}, "during": {"inbound": during}}
            log(f"  idle mTLS: {len(m.established)}/{n} open in {secs:.1f}s, {alive} alive; trellis inbound "
                f"{during['rss_kib'] / 1024:.1f} MiB" + (f"; failures {dict(m.failed)}" if m.failed else ""))


def summary_line(scn, r):
    if scn in ("http1", "close"):
        return f"{r['rps']:>10.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  errors {r['error_count']}"
    if scn == "rate":
        return (f"{r['rps']:>10.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                f"p99.9 {r['p999_ms']:.3f} ms  errors {r['error_count']}")
    if scn == "h2":
        return f"{r['rps']:>10.0f} req/s  mean {r.get('mean_ms', 0):.3f} ms  errors {r['error_count']}"
    if scn == "bulk":
        return f"{r['gbps']:>8.2f} Gbit/s"
    return ""


# ---------------------------------------------------------------------------------------------
# Reporting


def med(rounds, key):
    xs = [r[key] for r in rounds if "error" not in r and r.get(key) is not None]
    return statistics.median(xs) if xs else None


def f(v, nd=0, unit=""):
    if v is None:
        return "–"
    return f"{v:,.{nd}f}{unit}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fr(v):
    return "–" if v is None else f"{v:.2f}×"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def clean_rounds(e):
    """Rounds (0-based) in which every measured target of the scenario was measured without
    error and undisturbed by other work on the machine. The relay, a reference the goals do
    not use, does not decide which rounds the others are judged on."""
    measured = [d["rounds"] for t, d in e["targets"].items() if d["rounds"] and t not in REFERENCE]
    n = max((len(r) for r in measured), default=0)
    return [i for i in range(n) if measured and all(
        i < len(rs) and "error" not in rs[i] and not rs[i].get("disturbed") for rs in measured)]


def summarize(results):
    """Medians per scenario and target. Which rounds count: the scenario's *clean* rounds (every
    target undisturbed in that round) if there is one, so every ratio compares measurements
    taken side by side in quiet conditions; else each target's own undisturbed rounds; else all."""
    s = {}
    for scn, e in results["scenarios"].items():
        s[scn] = {}
        clean = clean_rounds(e)
        for t, d in e["targets"].items():
            all_ok = [r for r in d["rounds"] if "error" not in r]
            quiet = [r for r in all_ok if not r.get("disturbed")]
            if clean:
                picked = [i for i in clean if i < len(d["rounds"])]
                basis = "clean"
            elif quiet:
                picked = [i for i, r in enumerate(d["rounds"]) if "error" not in r and not r.get("disturbed")]
                basis = "quiet"
            else:
                picked = [i for i, r in enumerate(d["rounds"]) if "error" not in r]
                basis = "disturbed"
            ok = [d["rounds"][i] for i in picked]
            rs = ok + [r for r in d["rounds"] if "error" in r]
            m = {k: med(rs, k) for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "gbps",
                                         "sidecar_cpu_s", "requests", "bytes", "wall_s")}
            m["rounds_ok"], m["rounds"] = len(ok), len(rs)
            m["skipped"] = d.get("skipped")
            m["errors"] = sum(r.get("error_count", 0) for r in ok)
            m["other_cpu"] = med(rs, "other_cpu_cores")
            m["disturbed"] = sum(1 for r in ok if r.get("disturbed"))
            m["quiet_rounds"], m["all_rounds"] = len(quiet), len(d["rounds"])
            m["used_rounds"], m["basis"] = [i + 1 for i in picked], basis
            m["failed_rounds"] = len(rs) - len(ok)
            key = "gbps" if scn == "bulk" else "rps"
            vals = [r[key] for r in ok if r.get(key) is not None]
            m["min"], m["max"] = (min(vals), max(vals)) if vals else (None, None)
            p99s = [r["p99_ms"] for r in ok if r.get("p99_ms")]
            m["p99_range"] = (min(p99s), max(p99s)) if p99s else None
            reqs = [r.get("requests") or (r.get("rps", 0) * r.get("wall_s", 0)) for r in ok]
            cpus = [r.get("sidecar_cpu_s") for r in ok]
            if scn == "bulk":
                per = [c / (r["bytes"] / 2**30) for c, r in zip(cpus, ok) if r.get("bytes")]
            else:
                per = [c / q * 1e6 for c, q in zip(cpus, reqs) if q]
            m["cpu_per_unit"] = statistics.median(per) if per and t != "direct" else None
            cores = [r["sidecar_cpu_s"] / r["wall_s"] for r in ok if r.get("wall_s")]
            m["sidecar_cores"] = statistics.median(cores) if cores and t != "direct" else None
            s[scn][t] = m
        d = s[scn].get("direct")
        for t, m in s[scn].items():
            key = "gbps" if scn == "bulk" else "rps"
            m["vs_direct"] = ratio(m[key], d[key]) if d else None
            tr = s[scn].get("trellis")
            m["trellis_over"] = ratio(tr[key], m[key]) if tr and t != "trellis" else None
            if scn == "rate" and d:
                for k in ("p50_ms", "p99_ms", "p999_ms"):
                    m["added_" + k] = None if m[k] is None or d[k] is None else m[k] - d[k]
    return s


def errors_cell(m):
    if m.get("skipped"):
        return "⚠ not measured (see below)"
    if not m["rounds"]:
        return "not measured"
    bits = []
    if m["errors"]:
        bits.append(f"⚠ {m['errors']:,} bad responses/socket errors")
    if m["failed_rounds"]:
        bits.append(f"⚠ {m['failed_rounds']} round(s) failed")
    if m.get("disturbed"):
        bits.append(f"⚠ all {m['disturbed']} round(s) disturbed")
    return "; ".join(bits) or "0"


def spread(m, nd=0):
    if m["min"] is None or m["rounds_ok"] < 2:
        return ""
    return f"{m['min']:,.{nd}f}–{m['max']:,.{nd}f}"


def used(m):
    """Which rounds the medians come from."""
    if not m.get("used_rounds"):
        return ""
    word = "round" if len(m["used_rounds"]) == 1 else "rounds"
    return f"{word} {', '.join(map(str, m['used_rounds']))} of {m['all_rounds']} ({m['basis']})"


def scenario_md(scn, e, s, a):
    title = e["title"]
    lines = [f"### {title}", ""]
    ts = [t for t in TARGETS if t in s]
    if scn == "http1" or scn == "close":
        hdr = "HTTP/1.1 keep-alive" if scn == "http1" else "`Connection: close`, a new TCP connection per request"
        lines.append(f"wrk -t{a.wrk_threads} -c{a.connections} -d{a.duration}s, {hdr}; {a.rounds} round(s).")
        lines.append("")
        rows = [[t, f(m["rps"]), spread(m), f(m["p50_ms"], 3), f(m["p99_ms"], 3), fr(m["vs_direct"]),
                 fr(m["trellis_over"]) if t != "trellis" else "", f(m["cpu_per_unit"], 1), f(m["sidecar_cores"], 2),
                 used(m), f(m["other_cpu"], 2), errors_cell(m)]
                for t, m in ((t, s[t]) for t in ts)]
        lines.append(table(["target", "req/s", "range", "p50 ms", "p99 ms", "÷ direct", "trellis ÷ this",
                            "sidecar CPU µs/req", "sidecar cores", "rounds", "other work, cores", "errors"], rows))
    elif scn == "rate":
        lines.append(f"oha -q {a.rate} -c{a.connections} -z {a.duration}s --latency-correction (latency from each "
                     f"request's scheduled start); {a.rounds} round(s). *Added* = minus direct's.")
        lines.append("")
        tr = s.get("trellis", {})
        rows = []
        for t in ts:
            m = s[t]
            ad = m.get("added_p99_ms")
            rr = "" if t in ("trellis", "direct") else fr(ratio(tr.get("added_p99_ms"), ad) if ad and ad > 0 else None)
            rows.append([t, f(m["rps"]), f(m["p50_ms"], 3), f(m["p99_ms"], 3), f(m["p999_ms"], 3),
                         "" if t == "direct" else f(m.get("added_p50_ms"), 3),
                         "" if t == "direct" else f(ad, 3),
                         "" if t == "direct" else f(m.get("added_p999_ms"), 3), rr,
                         f(m["cpu_per_unit"], 1), used(m), f(m["other_cpu"], 2), errors_cell(m)])
        lines.append(table(["target", "achieved req/s", "p50 ms", "p99 ms", "p99.9 ms", "added p50", "added p99",
                            "added p99.9", "trellis added p99 ÷ this", "sidecar CPU µs/req", "rounds",
                            "other work, cores", "errors"], rows))
    elif scn == "h2":
        lines.append(f"h2load -c{a.h2_clients} -m{a.h2_streams} -t1 -D {a.duration}, h2c with prior knowledge; "
                     f"{a.rounds} round(s). (The nginx pair carries it as HTTP/1.1 from its outbound "
                     f"on: nginx proxies only HTTP/1.1 upstream.)")
        lines.append("")
        rows = [[t, f(m["rps"]), spread(m), f(m["mean_ms"], 3), fr(m["vs_direct"]),
                 fr(m["trellis_over"]) if t != "trellis" else "", f(m["cpu_per_unit"], 1), f(m["sidecar_cores"], 2),
                 used(m), f(m["other_cpu"], 2), errors_cell(m)]
                for t, m in ((t, s[t]) for t in ts)]
        lines.append(table(["target", "req/s", "range", "mean ms", "÷ direct", "trellis ÷ this",
                            "sidecar CPU µs/req", "sidecar cores", "rounds", "other work, cores", "errors"], rows))
    elif scn == "bulk":
        lines.append(f"iperf3 -P1 -t {a.duration} through an opaque port (trellis: `--opaque-ports`; HAProxy: "
                     f"`mode tcp`), received rate; {a.rounds} round(s).")
        lines.append("")
        rows = [[t, f(m["gbps"], 2), spread(m, 2), fr(m["vs_direct"]),
                 fr(m["trellis_over"]) if t != "trellis" else "", f(m["cpu_per_unit"], 2), f(m["sidecar_cores"], 2),
                 used(m), f(m["other_cpu"], 2), errors_cell(m)]
                for t, m in ((t, s[t]) for t in ts)]
        lines.append(table(["target", "Gbit/s", "range", "÷ direct", "trellis ÷ this", "sidecar CPU s/GiB",
                            "sidecar cores", "rounds", "other work, cores", "errors"], rows))
    if "relay" in ts:
        lines += ["", "*relay*: a reference, not a peer — two HAProxy processes in `mode tcp` with no TLS and no "
                      "HTTP, only copying bytes: what two extra loopback hops cost on this machine at the least. The "
                      "goals compare Trellis with the nginx and HAProxy pairs only."]
    others = [r["other_cpu_cores"] for d in e["targets"].values() for r in d["rounds"] if "other_cpu_cores" in r]
    lines += ["", "Medians (and *range*) over the *rounds* shown: the *clean* ones, in which other work on the machine "
                  f"used at most {a.max_other_cpu:g} cores during every target's measurement, so the ratios compare "
                  "measurements taken side by side; if no round was clean, each target's own *quiet* rounds; if "
                  "none, all (*disturbed*, flagged). *sidecar cores*: CPU both sidecars used ÷ wall time (2 = both "
                  "cores busy)."]
    redone = sum(len(d.get("discarded", [])) for d in e["targets"].values())
    if e.get("loadavg_before"):
        lines += ["", f"Load average before the scenario: {' '.join(e['loadavg_before'])}. CPU used by other work on "
                      f"the machine during the kept measurements: median {statistics.median(others) if others else 0:.2f}, "
                      f"max {max(others, default=0):.2f} cores (of {os.cpu_count()}); {redone} measurement(s) "
                      f"repeated because other work took more than {a.max_other_cpu:g} cores. Target order per round: "
                      + "; ".join(", ".join(o) for o in e.get("order", [])) + "."]
    if e["errors"]:
        lines += ["", "Errors:", ""] + [f"- {x}" for x in e["errors"]]
    return "\n".join(lines)


def mib(kib):
    return None if kib is None else kib / 1024


def rss_md(results, a):
    rss, idle = results["rss"], results["idle_conns"]
    n = idle.get("n", a.idle_conns)
    labels = [l for l in rss]
    cols = labels + [f"{n:,} idle app conns", f"{n:,} idle mTLS conns"]
    rows = []
    for pair in PAIRS:
        for role in ROLES:
            if not any(pair in rss[l] and role in rss[l][pair] for l in labels):
                continue
            row = [f"{pair} {role}"]
            for l in labels:
                row.append(f(mib(rss[l].get(pair, {}).get(role, {}).get("rss_kib")), 1))
            app = idle.get(f"{pair} app") or {}
            row.append(f(mib(app["during"][role]["rss_kib"]), 1) if "during" in app else "–")
            mt = idle.get(f"{pair} mtls") or {}
            row.append(f(mib(mt["during"][role]["rss_kib"]), 1) if role in mt.get("during", {}) else "")
            rows.append(row)
    out = ["### 6. Memory: RSS of each sidecar (MiB)", "",
           "VmRSS summed over the sidecar's processes (nginx: master + worker; HAProxy and Trellis: one process). "
           "*started*: ready, before any request; *idle*: after one request through each listener; *after X*: "
           "right after scenario X's last round (*after idle*: 2 s after the idle connections were closed).", "", table(["sidecar"] + cols, rows)]
    hold = []
    for key, d in idle.items():
        if not isinstance(d, dict) or "during" not in d:
            continue
        pair, kind = key.split(" ", 1)
        for role, during in d["during"].items():
            b = d["before"][role]["rss_kib"]
            per = (during["rss_kib"] - b) / d["alive_at_sample"] if d["alive_at_sample"] else None
            hold.append([f"{pair} {role}", "app (outbound listener)" if kind == "app" else "mTLS (inbound listener)",
                         f"{d['opened']:,}/{d['requested']:,}", f"{d['alive_at_sample']:,}", f(d["open_seconds"], 1),
                         f(mib(b), 1), f(mib(during["rss_kib"]), 1), f(per, 1), f"{during['fds']:,}",
                         "; ".join(f"{k}: {v}" for k, v in d["failures"].items()) or "0"])
    notes = [f"- {k}: not measured: {d['skipped']}" for k, d in idle.items() if isinstance(d, dict) and "skipped" in d]
    if notes:
        out += ["", *notes]
    if hold:
        out += ["", f"Holding idle connections (RSS sampled {a.idle_settle:g}s after the last one opened; *alive* = "
                    "not closed by the server at the sample):", "",
                table(["sidecar", "connections", "opened", "alive", "open s", "before MiB", "holding MiB",
                       "KiB/conn", "fds", "failures"], hold)]
    return "\n".join(out)


def rounds_kind(summary):
    """What the chart's medians are over: clean rounds only if every measured target's were."""
    kept = [m for scn in summary.values() if isinstance(scn, dict)
            for t, m in scn.items() if isinstance(m, dict) and t not in REFERENCE]
    return "kept (some disturbed)" if any(m.get("disturbed") for m in kept) else "clean"


def file_sha256(path):
    """The measured binary's own fingerprint: the repository's commit says what was checked
    out when the benchmark ran, not what the binary was built from."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "?"


def moved(s, scn, targets, what, spread, meaning, nd=0, unit=""):
    """A warning for a goal when a number it is computed from moved by more than `spread`×
    between the rounds kept (`what`: "p99", from each target's p99 range, or "req/s", from its
    req/s range). The other-work check sees only the guest; a busy host shows as this (direct's
    own p99 going from 0.35 to 4.3 ms between rounds, a peer's req/s by half, were seen)."""
    out = []
    for t in targets:
        m = s.get(scn, {}).get(t, {})
        lo, hi = (m.get("p99_range") or (None, None)) if what == "p99" else (m.get("min"), m.get("max"))
        if lo and hi and hi / lo > spread:
            out.append(f"{t} {f(lo, nd)}–{f(hi, nd)}{unit}")
    if not out:
        return ""
    return f" ⚠ {what} moved more than {spread:g}× between rounds ({', '.join(out)}): {meaning}"


def goals_md(results, s, a):
    def get(scn, t, k):
        return s.get(scn, {}).get(t, {}).get(k)

    rows = []

    def add(goal, measured, ok, *used):
        # A goal is judged only on what it names, measured: a missing peer cannot make "the
        # better of the pairs" easy to beat, and a judgement on disturbed rounds says so.
        missing = [f"{t} ({scn})" for scn, t in used if not s.get(scn, {}).get(t)]
        if used and missing:
            rows.append([goal, "not measured: " + ", ".join(missing), "–"])
            return
        status = "–" if ok is None else ("**met**" if ok else "**missed**")
        if ok is not None and any(get(scn, t, "disturbed") for scn, t in used):
            status += " ⚠ on disturbed rounds"
        rows.append([goal, measured, status])

    tr, ng, hp = get("http1", "trellis", "rps"), get("http1", "nginx", "rps"), get("http1", "haproxy", "rps")
    best = max([x for x in (ng, hp) if x is not None], default=None)
    r = ratio(tr, best)
    add("trellis peak rps ≥ 1.25× the better of the nginx and HAProxy pairs (scenario 1)",
        f"{f(tr)} vs {f(best)} req/s = {fr(r)}{moved(s, 'http1', ('trellis', 'nginx', 'haproxy'), 'req/s', 1.25, 'the ratio is as uncertain as that')}"
        if r else "not measured", None if r is None else r >= 1.25,
        ("http1", "trellis"), ("http1", "nginx"), ("http1", "haproxy"))
    at, an = get("rate", "trellis", "added_p99_ms"), get("rate", "nginx", "added_p99_ms")
    r = ratio(at, an) if an and an > 0 else None
    add("added p99 at 2,000 rps ≤ 0.5× the nginx pair's (scenario 2)",
        f"{f(at, 3)} ms vs {f(an, 3)} ms = {fr(r)}{moved(s, 'rate', ('direct', 'trellis', 'nginx'), 'p99', 2.0, 'mostly noise', 3, ' ms')}" if r is not None else "not measured",
        None if r is None else r <= 0.5, ("rate", "trellis"), ("rate", "nginx"), ("rate", "direct"))
    tb, hb = get("bulk", "trellis", "gbps"), get("bulk", "haproxy", "gbps")
    r = ratio(tb, hb)
    add("bulk ≥ 1.25× the HAProxy tcp pair (scenario 5)",
        f"{f(tb, 2)} vs {f(hb, 2)} Gbit/s = {fr(r)}" if r else "not measured", None if r is None else r >= 1.25,
        ("bulk", "trellis"), ("bulk", "haproxy"))
    tc, nc = get("close", "trellis", "rps"), get("close", "nginx", "rps")
    r = ratio(tc, nc)
    add("Connection-close rps ≥ the nginx pair (scenario 3)",
        f"{f(tc)} vs {f(nc)} req/s = {fr(r)}" if r else "not measured", None if r is None else r >= 1.0,
        ("close", "trellis"), ("close", "nginx"))
    idle = results["rss"].get("idle", {}).get("trellis")
    if idle:
        o, i = mib(idle["outbound"]["rss_kib"]), mib(idle["inbound"]["rss_kib"])
        add("idle RSS ≤ 10 MiB per sidecar", f"outbound {o:.1f} MiB, inbound {i:.1f} MiB", max(o, i) <= 10)
    else:
        add("idle RSS ≤ 10 MiB per sidecar", "not measured", None)
    mt = results["idle_conns"].get("trellis mtls")
    if mt and "during" in mt:
        v = mib(mt["during"]["inbound"]["rss_kib"])
        full = mt["requested"] >= 10000 and mt["alive_at_sample"] >= 10000
        add("10,000 idle mTLS connections ≤ 300 MiB (trellis inbound)",
            f"{v:.1f} MiB holding {mt['alive_at_sample']:,}" + ("" if full else " (fewer than 10,000: not the goal's "
                                                                                   "test)"),
            (v <= 300) if full else None)
    else:
        add("10,000 idle mTLS connections ≤ 300 MiB (trellis inbound)", "not measured", None)
    return "### Goals of issue #9\n\n" + table(["goal", "measured", "status"], rows)


def meta_md(meta):
    m = meta
    lines = ["## Run", "",
             f"- command: `{m['command']}`",
             f"- date: {m['date']}",
             f"- machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem']}; {m['os']}",
             f"- `uname -a`: `{m['uname']}`",
             f"- trellis: `{m['trellis_bin']}` ({m['trellis_version']}; sha256 {m.get('trellis_sha256', '?')}; "
            f"repository at commit {m['git']} when measured)",
             f"- load average (1/5/15 min): at start {' '.join(m['load_start'])}, at end {' '.join(m.get('load_end', []))}",
             f"- settings: {m['settings']}",
             "- tools: " + "; ".join(f"{k} `{v}`" for k, v in m["tools"].items())]
    if m.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {x}" for x in m["skipped"]]
    return "\n".join(lines)


def render_md(results, args):
    s = summarize(results)
    parts = [f"# Trellis load benchmark", "", meta_md(results["meta"]), "", "## Results", ""]
    for scn in SCENARIOS:
        if scn in results["scenarios"] and scn != "idle":
            parts += [scenario_md(scn, results["scenarios"][scn], s.get(scn, {}), args), ""]
    if results["rss"]:
        parts += [rss_md(results, args), ""]
    parts += [goals_md(results, s, args), ""]
    return "\n".join(parts), s


def svg_chart(results, s, args):
    """Grouped bars: throughput per scenario (relative to direct, labelled with the value),
    p99 at the fixed rate, and RSS per sidecar."""
    W, PH, PAD = 1080, 250, 40
    panels = []
    for scn, key, unit, nd in (("http1", "rps", "req/s", 0), ("close", "rps", "req/s", 0), ("h2", "rps", "req/s", 0),
                               ("bulk", "gbps", "Gbit/s", 2), ("rate", "p99_ms", "ms p99", 2)):
        if scn in s:
            bars = [(t, s[scn][t][key], COLORS[t]) for t in TARGETS if t in s[scn]]  # None: not measured
            title = {"http1": "HTTP/1.1 keep-alive", "close": "Connection: close", "h2": "HTTP/2 h2load -m10",
                     "bulk": "bulk TCP iperf3", "rate": "p99 at 2,000 rps (lower is better)"}[scn]
            panels.append((title, [("", bars)], unit, nd, False))
    rss_groups = []
    n = results["idle_conns"].get("n", args.idle_conns)
    points = [("idle", lambda p, r: results["rss"].get("idle", {}).get(p, {}).get(r, {}).get("rss_kib"))]
    after = [l for l in results["rss"] if l.startswith("after") and l != "after idle"]
    if after:
        points.append(("max after 1–5", lambda p, r: max(
            (results["rss"][l].get(p, {}).get(r, {}).get("rss_kib") or 0) for l in after) or None))
    points.append((f"{n:,} idle app conns", lambda p, r: (results["idle_conns"].get(f"{p} app") or {})
                   .get("during", {}).get(r, {}).get("rss_kib")))  # noqa: E501
    points.append((f"{n:,} idle mTLS", lambda p, r: (results["idle_conns"].get(f"{p} mtls") or {})
                   .get("during", {}).get(r, {}).get("rss_kib")))
    points.append(("after closing them", lambda p, r: results["rss"].get("after idle", {}).get(p, {}).get(r, {})
                   .get("rss_kib")))
    for label, get in points:
        bars = []
        for p in PAIRS:
            for r in ROLES:
                v = get(p, r)
                if v:
                    bars.append((f"{p} {r}", v / 1024, COLORS[p] if r == "outbound" else LIGHT[p]))
        if bars:
            rss_groups.append((label, bars))
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    H = PAD + 20 + rows_n * (PH + PAD) + (PH + PAD if rss_groups else 0)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{PAD}" y="24" font-size="15" font-weight="bold">Trellis load benchmark — '
         f'{esc(results["meta"]["date"][:10])}, {esc(results["meta"]["cpu"])} ({results["meta"]["cpus"]} CPUs), '
         f'medians of the {rounds_kind(s)} rounds of {args.rounds}</text>']

    def panel(x, y, w, h, title, groups, unit, nd, legend):
        o.append(f'<text x="{x}" y="{y - 6}" font-size="12" font-weight="bold">{esc(title)}</text>')
        o.append(f'<line x1="{x}" y1="{y + h}" x2="{x + w}" y2="{y + h}" stroke="#333"/>')
        vmax = max((v for _, bars in groups for _, v, _ in bars if v is not None), default=1) or 1
        nb = sum(len(b) for _, b in groups) + len(groups)
        bw = min(60, (w - 20) / max(1, nb))
        cx = x + 10
        for glabel, bars in groups:
            gx = cx
            for name, v, color in bars:
                if not legend:
                    o.append(f'<text x="{cx + (bw - 4) / 2:.1f}" y="{y + h + 12:.1f}" text-anchor="middle" '
                             f'font-size="9">{esc(name)}</text>')
                if v is None:
                    for k, word in enumerate(("not", "measured")):
                        o.append(f'<text x="{cx + (bw - 4) / 2:.1f}" y="{y + h - 16 + 10 * k:.1f}" '
                                 f'text-anchor="middle" font-size="9" fill="#b00">{word}</text>')
                    cx += bw
                    continue
                bh = (h - 30) * v / vmax
                o.append(f'<rect x="{cx:.1f}" y="{y + h - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}" '
                         f'fill="{color}"><title>{esc(name)}: {v:,.{nd}f} {esc(unit)}</title></rect>')
                o.append(f'<text x="{cx + (bw - 4) / 2:.1f}" y="{y + h - bh - 3:.1f}" text-anchor="middle" '
                         f'font-size="9">{v:,.{nd}f}</text>')
                cx += bw
            if glabel:
                o.append(f'<text x="{(gx + cx - 4) / 2:.1f}" y="{y + h + 14:.1f}" text-anchor="middle" '
                         f'font-weight="bold">{esc(glabel)}</text>')
            cx += bw
        o.append(f'<text x="{x + w}" y="{y - 6}" text-anchor="end" fill="#555">{esc(unit)}</text>')
        if legend:
            seen, lx = {}, x + 300
            for _, bars in groups:
                for name, _, color in bars:
                    seen.setdefault(name, color)
            for name, color in seen.items():
                o.append(f'<rect x="{lx}" y="{y - 16}" width="10" height="10" fill="{color}"/>')
                o.append(f'<text x="{lx + 13}" y="{y - 7}" font-size="10">{esc(name)}</text>')
                lx += 18 + 6.5 * len(name)

    pw = (W - PAD * (cols + 1)) / cols
    for i, (title, groups, unit, nd, legend) in enumerate(panels):
        r, c = divmod(i, cols)
        panel(PAD + c * (pw + PAD), PAD + 20 + r * (PH + PAD), pw, PH - 20, title, groups, unit, nd, legend)
    if rss_groups:
        y = PAD + 20 + rows_n * (PH + PAD)
        panel(PAD, y, W - 2 * PAD, PH - 20, "RSS per sidecar (lower is better)", rss_groups, "MiB", 1, True)
    o.append("</svg>")
    return "\n".join(o)


def esc(t):
    return str(t).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---------------------------------------------------------------------------------------------


def tool_versions(tools):
    v = {}
    probes = {"wrk": ["wrk", "-v"], "oha": ["oha", "--version"], "h2load": ["h2load", "--version"],
              "iperf3": ["iperf3", "--version"], "nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"],
              "openssl": ["openssl", "version"]}
    for t, argv in probes.items():
        if t in tools:
            v[t] = sh(argv).splitlines()[0].strip() if sh(argv) else "?"
    v["python"] = sys.version.split()[0]
    return v


def machine():
    lscpu = sh(["lscpu"])
    get = lambda k: (re.search(rf"^{k}:\s*(.+)$", lscpu, re.M) or [None, "?"])[1].strip()  # noqa: E731
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    osr = re.search(r'PRETTY_NAME="(.+)"', Path("/etc/os-release").read_text()) if Path("/etc/os-release").exists() else None
    return {"cpu": get("Model name"), "cpus": get(r"CPU\(s\)"), "mem": f"{int(mem.group(1)) / 2**20:.0f} GiB" if mem else "?",
            "os": osr.group(1) if osr else "?", "uname": sh(["uname", "-a"]), "lscpu": lscpu}


def main():
    p = argparse.ArgumentParser(prog="benches/load/run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 3 s, 2,000 idle connections (overrides --rounds/--duration)")
    p.add_argument("--out", default="target/load-results", help="where results go (default target/load-results)")
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets (default all)")
    p.add_argument("--connections", type=int, default=32, help="HTTP/1.1 client connections (default 32)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1; see benches/README.md)")
    p.add_argument("--rate", type=int, default=2000, help="fixed rate for scenario 2 (default 2000)")
    p.add_argument("--h2-clients", type=int, default=8)
    p.add_argument("--h2-streams", type=int, default=10)
    p.add_argument("--idle-conns", type=int, default=None, help="idle connections in scenario 6 (default 10000; "
                                                                  "--quick: 2000)")
    p.add_argument("--idle-settle", type=float, default=2.0, help="seconds between the last idle connection and "
                                                                   "the RSS sample (default 2)")
    p.add_argument("--max-other-cpu", type=float, default=0.3,
                   help="a measurement during which other work on the machine used more CPU than this (in cores) "
                        "is repeated (default 0.3)")
    p.add_argument("--retries", type=int, default=None,
                   help="how often a disturbed measurement is repeated; the least disturbed attempt is kept "
                        "(default 2; --quick: 0)")
    p.add_argument("--own-sessions", action="store_true",
                   help="start each server (backend, each proxy) in a session of its own, a scheduling group "
                        "of its own under autogroup, as containers are; see benches/README.md")
    p.add_argument("--trellis-bin", default=os.environ.get("TRELLIS_BIN", "target/release/trellis"))
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="measure nothing: write results.md and chart.svg again from a saved results.json "
                        "(into --out if given, else beside it)")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    # run.sh's check before it builds the binary: the arguments are read and checked, nothing else.
    p.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.render:
        src = Path(a.render)
        try:
            results = json.loads(src.read_text())
            saved = argparse.Namespace(**{**vars(p.parse_args([])), **results["settings"]})
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--render {src}: not a results.json this benchmark wrote ({type(e).__name__}: {e})")
        dst = Path(a.out) if any(x == "--out" or x.startswith("--out=") for x in sys.argv) else src.parent
        dst.mkdir(parents=True, exist_ok=True)
        md, summary = render_md(results, saved)
        (dst / "results.md").write_text(md)
        (dst / "chart.svg").write_text(svg_chart(results, summary, saved))
        print(md)
        return 0
    if a.quick:
        a.rounds, a.duration = 1, 3
    for flag, value in (("--rounds", a.rounds), ("--duration", a.duration), ("--connections", a.connections),
                        ("--rate", a.rate), ("--wrk-threads", a.wrk_threads), ("--h2-clients", a.h2_clients),
                        ("--h2-streams", a.h2_streams), ("--idle-conns", a.idle_conns)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1 (got {value})")
    if a.retries is None:
        a.retries = 0 if a.quick else 2
    if a.idle_conns is None:
        a.idle_conns = 2000 if a.quick else 10000
    only = [x for x in a.only.split(",") if x] or list(SCENARIOS)
    bad = [x for x in only if x not in SCENARIOS]
    a.targets = [x for x in a.targets.split(",") if x]
    bad += [x for x in a.targets if x not in TARGETS]
    if bad:
        p.error(f"unknown scenario/target {bad}; scenarios: {','.join(SCENARIOS)}; targets: {','.join(TARGETS)}")
    if not a.targets:
        p.error("--targets names no target")
    if not any(t in SCENARIOS[scn][2] for scn in only for t in a.targets):
        where = "; ".join(f"{t}: {','.join(s for s in SCENARIOS if t in SCENARIOS[s][2])}" for t in a.targets)
        p.error(f"no scenario in --only measures any of --targets (each is measured in: {where})")
    if a.check_args:
        return 0
    a.trellis_bin = str(Path(a.trellis_bin).resolve())
    out = Path(a.out).resolve()
    work = out / "work"
    try:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    except OSError as e:
        p.error(f"--out {out}: cannot write there ({e.strerror or e})")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.idle_conns + 1000:
        log(f"open-files hard limit is {hard}: scenario 6 opens {a.idle_conns} connections at once; "
            f"lowering to {max(100, hard - 1000)}")
        a.idle_conns = max(100, hard - 1000)

    # Tools: name every missing one, with how to install it; skip only what needs it.
    need = {"openssl": "certificates", "nginx": "the backend and the nginx pair", "haproxy": "the HAProxy pair and the relay",
            "wrk": "scenarios http1, close", "oha": "scenario rate", "h2load": "scenario h2", "iperf3": "scenario bulk"}
    tools = {t for t in need if shutil.which(t)}
    missing = [t for t in need if t not in tools]
    skipped = []
    for t in missing:
        msg = f"{t} is missing ({need[t]}): install it with `{INSTALL[t]}`"
        log("WARNING: " + msg)
        skipped.append(msg)
    if "openssl" not in tools:
        a.targets = [t for t in a.targets if t not in ("nginx", "haproxy")]
    if not Path(a.trellis_bin).exists():
        skipped.append(f"trellis binary {a.trellis_bin} not found")
        a.targets = [t for t in a.targets if t != "trellis"]
    run_scn = []
    for scn in only:
        tool = SCENARIOS[scn][1]
        if tool and tool not in tools:
            skipped.append(f"scenario {scn} skipped: {tool} is missing (`{INSTALL[tool]}`)")
            continue
        if scn != "bulk" and "nginx" not in tools:
            skipped.append(f"scenario {scn} skipped: nginx (the backend) is missing (`{INSTALL['nginx']}`)")
            continue
        run_scn.append(scn)

    mach = machine()
    git = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?"
    if sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]):
        diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True).stdout
        git += f" + uncommitted changes (diff sha256 {hashlib.sha256(diff).hexdigest()[:12]})"
    sessions = "each server in a session of its own" if a.own_sessions else "servers in the driver's session"
    meta = {"command": a.command or shlex.join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "cpu": mach["cpu"], "cpus": mach["cpus"], "mem": mach["mem"], "os": mach["os"], "uname": mach["uname"],
            "lscpu": mach["lscpu"], "tools": tool_versions(tools), "trellis_bin": a.trellis_bin,
            "trellis_version": sh([a.trellis_bin, "--version"]) or "?", "git": git,
            "trellis_sha256": file_sha256(a.trellis_bin),
            "load_start": loadavg(), "skipped": skipped,
            "settings": f"rounds {a.rounds}, duration {a.duration}s, {a.connections} connections, wrk -t{a.wrk_threads}, "
                        f"rate {a.rate}/s, h2load -c{a.h2_clients} -m{a.h2_streams}, {a.idle_conns} idle connections, "
                        f"repeat a measurement up to {a.retries}× if other work took > {a.max_other_cpu:g} cores, "
                        f"1 worker per proxy, {sessions}, scenarios {','.join(run_scn)}, targets {','.join(a.targets)}"}
    log(f"load average at start: {' '.join(meta['load_start'])}  (2 cores: >1 means other work is running)")

    global TOOL_PIDFILE
    TOOL_PIDFILE = work / "tool.pid"
    bench = Bench(a, work)
    bench.results["meta"] = meta
    bench.results["settings"] = {k: v for k, v in vars(a).items() if k != "command"}
    rc = 0
    try:
        log("starting backend, iperf3 server and the pairs")
        bench.setup(tools)
        bench.sample_rss("started")
        bench.sanity(tools)
        for t, why in bench.skipped_targets.items():
            skipped.append(f"target {t} skipped: {why}")
        time.sleep(1)
        bench.sample_rss("idle")
        for scn in run_scn:
            load = loadavg()
            bench.results["load"].append({"scenario": scn, "loadavg": load})
            bench.load_before[scn] = load
            log(f"scenario {scn}: {SCENARIOS[scn][0]}  (load average {' '.join(load)})")
            try:
                if scn == "idle":
                    bench.run_idle()
                    time.sleep(2)  # the sidecars see the closes
                else:
                    bench.run_scenario(scn, tools)
                bench.sample_rss(f"after {scn}")
            except Exception as e:
                traceback.print_exc()
                bench.results["scenarios"].setdefault(scn, {"title": SCENARIOS[scn][0], "targets": {}, "errors": []})
                bench.results["scenarios"][scn]["errors"].append(f"scenario failed: {e}")
                log(f"scenario {scn} FAILED: {e}; going on with the rest")
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    except Exception as e:
        traceback.print_exc()
        log(f"setup failed: {e}")
        rc = 1
    finally:
        bench.procs.stop_all()
    meta["load_end"] = loadavg()
    for scn in list(bench.results["scenarios"]):
        if not bench.results["scenarios"][scn].get("targets"):
            if not bench.results["scenarios"][scn]["errors"]:
                del bench.results["scenarios"][scn]
    md, summary = render_md(bench.results, a)
    bench.results["summary"] = summary
    (out / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    (out / "results.md").write_text(md)
    (out / "chart.svg").write_text(svg_chart(bench.results, summary, a))
    print(md)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'chart.svg'} (logs and configs in {work})")
    measured = any(isinstance(m, dict) and m.get("rounds_ok") for scn in summary.values() if isinstance(scn, dict)
                   for m in scn.values())
    if rc == 0 and not measured and run_scn and run_scn != ["idle"]:
        log("ERROR: nothing was measured (every round failed or was skipped); see the log above")
        rc = 1
    return rc


if __name__ == "__main__":
    def interrupted(*_):
        raise KeyboardInterrupt  # stop what runs, stop every process started, write what was measured

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupted)
    sys.exit(main())
