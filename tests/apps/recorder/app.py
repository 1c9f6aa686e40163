"""Recording app for the corpus test: appends one line per request it is called for to
`seen.log` beside this file, before reading anything else, so a request that reaches the
worker at all (even one whose body is later cut off) leaves a trace."""

import os

SEEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seen.log")


def application(environ, start_response):
    with open(SEEN, "a") as f:
        f.write(
            "%s %s %s\n"
            % (
                environ.get("REQUEST_METHOD", "-"),
                environ.get("RAW_URI") or environ.get("PATH_INFO", "-"),
                environ.get("HTTP_X_REQUEST_ID", "-"),
            )
        )
    body = environ["wsgi.input"].read()
    answer = b"seen %d body bytes\n" % len(body)
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))],
    )
    return [answer]
