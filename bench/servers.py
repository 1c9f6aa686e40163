#!/usr/bin/python3
"""Which WSGI server runs inside a zygote-forked worker? Measure the candidates the way the
zygote uses them: every server module is imported first (as the zygote preloads it), then
for each run a listening unix socket is made, a client connects and sends its request (it
waits in the backlog, as with the agent), and only then the process forks; the child moves
the socket to fd 3 and serves with the candidate. Reported per candidate:

  cold    fork -> first response, ms (p50 / p90 / max over --runs)
  rps     requests/s, 4 client threads, one connection per request, --seconds
  pss     PSS of the warm child (kB), from /proc/<pid>/smaps_rollup
  stop    SIGTERM during a slow request with 3 connections waiting in the backlog: is the
          slow request answered, and do the 3 stay in the backlog for the next worker?
  fds     fds of the warm child beyond 0-3 (with no connection open; fd 4 is the
          lifeline pipe this harness gives every candidate, as the agent does)

Run as: /usr/bin/python3 bench/servers.py [--runs 40] [--seconds 2]
Needs python3-gunicorn, python3-waitress and python3-cheroot (Debian) for all rows.
"""

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "agent", "python"))
sys.argv_saved = sys.argv
sys.argv = sys.argv[:1]
import roost_zygote  # noqa: E402,F401  (preloads the worker's server, as the zygote does)
import roost_worker  # noqa: E402

sys.argv = sys.argv_saved

CANDIDATES = {}


def candidate(name, module):
    def reg(fn):
        try:
            __import__(module)
        except ImportError as e:
            print("# %s: not installed (%s)" % (name, e))
            return fn
        CANDIDATES[name] = fn
        return fn

    return reg


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        time.sleep(0.6)
    body = b"Hello, world\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@candidate("roost, threads 1", "gunicorn")
def serve_roost_one():
    roost_worker.serve(app, {"threads": 1, "grace": 10, "timeout": 30, "app": "bench"})


@candidate("roost, threads 4", "gunicorn")
def serve_roost_four():
    roost_worker.serve(app, {"threads": 4, "grace": 10, "timeout": 30, "app": "bench"})


@candidate("waitress", "waitress")
def serve_waitress():
    import waitress.server

    srv = waitress.server.create_server(app, sockets=[socket.socket(fileno=3)], threads=4, _start=True)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    try:
        srv.run()
    finally:
        srv.close()


@candidate("cheroot", "cheroot")
def serve_cheroot():
    import cheroot.wsgi

    srv = cheroot.wsgi.Server("/unused", app, numthreads=4)
    srv.bind_unix_socket = lambda addr: setattr(srv, "socket", socket.socket(fileno=3))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    srv.prepare()
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    stop.wait()
    srv.stop()


def request(path, sock_path=None, sock=None, body=True):
    s = sock or socket.socket(socket.AF_UNIX)
    if sock is None:
        s.connect(sock_path)
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


# A lifeline like the agent's (the gthread worker watches fd 4): the read end goes to the
# child, this process keeps the write end.
def _high_pipe():
    import fcntl

    r, w = os.pipe()
    hr, hw = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 100), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(r)
    os.close(w)
    return hr, hw


LIFELINE_R, LIFELINE_W = _high_pipe()


def spawn(serve, listener):
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open("/dev/null", os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.dup2(listener.fileno(), 3)
            os.dup2(LIFELINE_R, 4)
            os.closerange(5, 1 << 16)
            serve()
        except BaseException:
            pass
        os._exit(0)
    return pid


def pss_kb(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def measure(name, serve, runs, seconds, tmp):
    path = os.path.join(tmp, name + ".sock")
    cold = []
    for _ in range(runs):
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(128)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        t0 = time.perf_counter()
        pid = spawn(serve, listener)
        resp = request("/", sock=client)
        cold.append((time.perf_counter() - t0) * 1000)
        assert resp.startswith(b"HTTP/1.1 200") or resp.startswith(b"HTTP/1.0 200"), resp[:80]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        listener.close()

    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(128)
    pid = spawn(serve, listener)
    request("/", path)
    # throughput
    count = [0]
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()

    def client():
        n = 0
        while time.perf_counter() < stop_at:
            request("/", path)
            n += 1
        with lock:
            count[0] += n

    ts = [threading.Thread(target=client) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rps = count[0] / seconds
    time.sleep(0.2)
    pss = pss_kb(pid)
    fds = sorted(int(f) for f in os.listdir("/proc/%d/fd" % pid))
    extra = [os.readlink("/proc/%d/fd/%d" % (pid, f)) for f in fds if f > 3]

    # graceful stop: a slow request in flight, then SIGTERM, then 3 connections in the backlog
    slow = {}
    t = threading.Thread(target=lambda: slow.setdefault("r", request("/slow", path)))
    t.start()
    time.sleep(0.15)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.05)
    waiting = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.append(s)
    t.join(10)
    _, status = os.waitpid(pid, 0)
    slow_ok = slow.get("r", b"").startswith(b"HTTP/1.")
    # a new worker must find the 3 connections still waiting
    pid2 = spawn(serve, listener)
    served = 0
    for s in waiting:
        s.settimeout(3)
        try:
            data = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                data += c
            served += data.startswith(b"HTTP/1.")
        except OSError:
            pass
        s.close()
    os.kill(pid2, signal.SIGKILL)
    os.waitpid(pid2, 0)
    listener.close()
    return {
        "cold": cold,
        "rps": rps,
        "pss": pss,
        "extra_fds": extra,
        "stop": "in-flight %s, backlog %d/3 kept" % ("answered" if slow_ok else "LOST", served),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="roost-servers-")
    print("%-26s %8s %8s %8s %9s %8s  %-36s %s" % ("server", "cold p50", "p90", "max", "req/s", "PSS kB", "SIGTERM", "extra fds"))
    for name, serve in CANDIDATES.items():
        if a.only and name not in a.only.split(","):
            continue
        r = measure(name, serve, a.runs, a.seconds, tmp)
        c = r["cold"]
        print("%-26s %8.2f %8.2f %8.2f %9.0f %8d  %-36s %s" % (
            name, pct(c, 50), pct(c, 90), max(c), r["rps"], r["pss"], r["stop"], ",".join(r["extra_fds"]) or "-"))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
