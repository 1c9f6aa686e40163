#!/usr/bin/python3
"""Server start inside a forked worker, per server shape (issue 14's "server start" piece).

Each sample does what the zygote does with a site's first request, minus the privilege drop
and the app import: a preloaded parent (roost_worker imported, gc frozen) forks a child that
serves a hello-world app with `roost_worker.serve` on an inherited unix socket, and connects
at once, so the request waits in the backlog while the child starts. The child logs its
`first response ... after the fork (phases)` line; the parent times fork -> response read.
Samples of every configuration alternate.

    /usr/bin/python3 bench/worker-start.py [--runs 30] [--compare OLD_DIR]

OLD_DIR holds another roost_worker.py (e.g. `git show REV:agent/python/roost_worker.py`),
measured alternately with agent/python's as a baseline.
"""

import argparse
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LINE = re.compile(r"first response ([0-9.]+) ms after the fork \((.*)\)")


def hello(environ, start_response):
    body = b"Hello, world\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def one_sample(module_dir, threads):
    """Runs in a fresh interpreter: preload, fork, time; prints one JSON line."""
    sys.path.insert(0, module_dir)
    import roost_worker

    gc.collect()
    gc.freeze()
    gc.disable()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(16)
        lifeline_r, lifeline_w = os.pipe()
        log_r, log_w = os.pipe()
        t = time.perf_counter()
        roost_worker.start_timeline(t)
        pid = os.fork()
        if pid == 0:
            try:
                roost_worker.mark("forked")
                os.dup2(log_w, 2)
                os.dup2(listener.fileno(), roost_worker.LISTEN_FD)
                os.dup2(lifeline_r, roost_worker.WORKER_LIFELINE_FD)
                os.close(lifeline_w)
                gc.enable()
                spec = {"threads": threads, "workers": 1, "grace": 1, "timeout": 30, "app": "hello"}
                roost_worker.serve(hello, spec)
            finally:
                os._exit(0)
        os.close(log_w)
        os.close(lifeline_r)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        got = b""
        while not got.endswith(b"Hello, world\n"):
            chunk = client.recv(4096)
            if not chunk:
                break
            got += chunk
        answered = (time.perf_counter() - t) * 1000
        client.close()
        os.close(lifeline_w)  # the child stops as when the agent is gone
        os.waitpid(pid, 0)
        log = b""
        while True:
            chunk = os.read(log_r, 65536)
            if not chunk:
                break
            log += chunk
    if os.environ.get("SHOWLOG"): sys.stderr.write(log.decode())
    m = LINE.search(log.decode(errors="replace"))
    phases = {}
    if m:
        for part in m.group(2).replace(" ms", "").split(", "):
            name, ms = part.rsplit(" ", 1)
            phases[name] = float(ms)
    print(json.dumps({"answered": answered, "logged": float(m.group(1)) if m else None, "phases": phases}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--compare", help="a directory with another roost_worker.py, as the baseline")
    ap.add_argument("--current", default=os.path.join(HERE, "..", "agent", "python"), help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one_sample(a.one[0], int(a.one[1]))
    current = a.current
    configs = [("current", current, 1), ("current", current, 4)]
    if a.compare:
        configs += [("baseline", a.compare, 1), ("baseline", a.compare, 4)]
    samples = {c: [] for c in configs}
    for _ in range(a.runs):
        for c in configs:
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", c[1], str(c[2])],
                capture_output=True, text=True, check=True,
            )
            samples[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("fork -> first response inside a forked worker, medians of %d alternated runs (ms)" % a.runs)
    print("| server | threads | answered (client) | logged | server | accept (incl. rehearsal) | response |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        s = samples[c]

        def med(f):
            vs = [f(x) for x in s if f(x) is not None]
            return "%.2f" % statistics.median(vs) if vs else "-"

        print(
            "| %s | %d | %s | %s | %s | %s | %s |"
            % (
                c[0],
                c[2],
                med(lambda x: x["answered"]),
                med(lambda x: x["logged"]),
                med(lambda x: x["phases"].get("server")),
                med(lambda x: x["phases"].get("accept")),
                med(lambda x: x["phases"].get("response")),
            )
        )


if __name__ == "__main__":
    sys.exit(main())
