"""Echo app for Roost's integration tests.

Answers every request with JSON describing the process that served it, so a test can
check from the worker itself which user it runs as and what reached it.
"""

import json
import os


def application(environ, start_response):
    report = {
        "environ": {k: v for k, v in environ.items() if isinstance(v, str)},
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "os_environ": dict(os.environ),
    }
    body = json.dumps(report, sort_keys=True).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
