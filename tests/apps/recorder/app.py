"""Recording app for the corpus test: appends `start METHOD TARGET` to `seen.log` beside
this file as soon as it is called for a request, before reading anything else, so a request
that reaches the worker at all leaves a trace; then `done METHOD TARGET BYTES` once it has
read the whole body, so a request whose body was cut off shows as started, never done."""

import os

SEEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seen.log")


def record(line):
    with open(SEEN, "a") as f:
        f.write(line + "\n")


def application(environ, start_response):
    what = "%s %s" % (
        environ.get("REQUEST_METHOD", "-"),
        environ.get("RAW_URI") or environ.get("PATH_INFO", "-"),
    )
    record("start " + what)
    body = environ["wsgi.input"].read()
    record("done %s %d" % (what, len(body)))
    answer = b"seen %d body bytes\n" % len(body)
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))],
    )
    return [answer]
