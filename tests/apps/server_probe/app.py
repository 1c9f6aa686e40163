"""A WSGI app that shows how the worker's server handles connections, bodies and streams
(tests/tests/worker_server.rs).

GET /anything          -> JSON {"path", "pid", "multithread", "conn": a serial number of the
                          worker-side connection, "on_conn": requests served on it so far}
GET /sleep?secs=N      -> the same JSON, after N seconds, with "together": how many requests
                          this process was running at once while this one slept (at most)
POST /upload           -> the request body, echoed; `X-Transfer-Encoding` says how it came
GET /stream?n=N&gap=S  -> N pieces "piece i\n", S seconds apart, no Content-Length
GET /file?kb=N         -> N KiB of a known pattern, through wsgi.file_wrapper
GET /hold?secs=N       -> "pid P\n" at once, then "done\n" after N seconds: the client knows
                          this process is inside the app until the response ends
"""
import json
import os
import tempfile
import threading
import time
import weakref
from urllib.parse import parse_qs

_connections = weakref.WeakKeyDictionary()  # worker-side socket -> [serial, requests]
_serial = [0]
_running = {"now": 0}
_running_lock = threading.Lock()


def _connection(environ):
    sock = environ["gunicorn.socket"]
    seen = _connections.get(sock)
    if seen is None:
        _serial[0] += 1
        seen = _connections[sock] = [_serial[0], 0]
    seen[1] += 1
    return seen


def _json(start_response, payload):
    body = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    conn = _connection(environ)
    if path == "/upload":
        body = environ["wsgi.input"].read()
        start_response(
            "200 OK",
            [
                ("Content-Length", str(len(body))),
                ("X-Transfer-Encoding", environ.get("HTTP_TRANSFER_ENCODING", "none")),
            ],
        )
        return [body]
    if path == "/stream":
        n, gap = int(query["n"][0]), float(query["gap"][0])
        start_response("200 OK", [("Content-Type", "text/plain")])

        def pieces():
            for i in range(n):
                if i:
                    time.sleep(gap)
                yield b"piece %d\n" % i

        return pieces()
    if path == "/hold":
        secs = float(query["secs"][0])
        start_response("200 OK", [("Content-Type", "text/plain")])

        def held():
            yield b"pid %d\n" % os.getpid()
            time.sleep(secs)
            yield b"done\n"

        return held()
    if path == "/file":
        f = tempfile.TemporaryFile()
        f.write(bytes(range(256)) * 4 * int(query["kb"][0]))
        f.seek(0)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f)
    payload = {
        "path": path,
        "pid": os.getpid(),
        "multithread": environ["wsgi.multithread"],
        "conn": conn[0],
        "on_conn": conn[1],
    }
    if path == "/sleep":
        payload["together"] = _sleep(float(query["secs"][0]))
    return _json(start_response, payload)


def _sleep(secs):
    """Sleep `secs` in small steps; the most requests running at once meanwhile."""
    with _running_lock:
        _running["now"] += 1
        most = _running["now"]
    try:
        end = time.monotonic() + secs
        while time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            with _running_lock:
                most = max(most, _running["now"])
    finally:
        with _running_lock:
            _running["now"] -= 1
    return most
