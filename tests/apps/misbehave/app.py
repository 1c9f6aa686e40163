"""A WSGI app that misbehaves on request, for the lifecycle tests.

GET /                 -> JSON {"pid", "ppid", "uid", "env": {ROOST_TEST_*}}
GET /sleep?secs=N     -> sleeps N seconds, then answers
GET /hog?mb=N         -> allocates and touches N MiB, then answers
GET /crash            -> kills its whole worker (its process group: gunicorn's arbiter too)
GET /probe?sock=P&pid=N&file=F
                      -> tries to connect to unix socket P, signal pid N (signal 0) and
                         read file F; answers {"sock": .., "pid": .., "file": ..} with "ok" or
                         the error's name for each (the isolation tests)
GET /daemon           -> leaves a background process behind that ignores SIGTERM, in its own
                         session (what a careless site does); answers {"daemon": pid}
"""
import json
import os
import signal
import time
from urllib.parse import parse_qs

if os.environ.get("ROOST_TEST_IMPORT_SLEEP"):
    time.sleep(float(os.environ["ROOST_TEST_IMPORT_SLEEP"]))


def _answer(start_response, payload, status="200 OK"):
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _attempt(action):
    try:
        action()
        return "ok"
    except OSError as e:
        return type(e).__name__


def _probe(query):
    import socket

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(query["sock"][0])
        finally:
            s.close()

    def read():
        with open(query["file"][0], "rb") as f:
            f.read(1)

    return {
        "sock": _attempt(connect),
        "pid": _attempt(lambda: os.kill(int(query["pid"][0]), 0)),
        "file": _attempt(read),
    }


def _leave_a_daemon():
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pid = os.fork()
        if pid:
            os.write(write_end, str(pid).encode())
            os._exit(0)
        for fd in range(3, 256):
            try:
                os.close(fd)
            except OSError:
                pass
        while True:
            time.sleep(60)
    os.close(write_end)
    pid = int(os.read(read_end, 32))
    os.close(read_end)
    os.wait()
    return pid


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/sleep":
        time.sleep(float(query.get("secs", ["1"])[0]))
    elif path == "/hog":
        block = bytearray(int(query.get("mb", ["100"])[0]) * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
    elif path == "/crash":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif path == "/probe":
        return _answer(start_response, _probe(query))
    elif path == "/daemon":
        return _answer(start_response, {"daemon": _leave_a_daemon()})
    env = {k: v for k, v in os.environ.items() if k.startswith("ROOST_TEST_")}
    return _answer(start_response, {"pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(), "env": env})
