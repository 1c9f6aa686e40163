"""A demo site: says whose it is and which unix user it runs as."""
import os
import pwd


def application(environ, start_response):
    user = pwd.getpwuid(os.getuid()).pw_name
    body = (
        f"Hello from __WHO__'s site!\n"
        f"  running as {user} (uid {os.getuid()}), pid {os.getpid()}\n"
        f"  request id {environ.get('HTTP_X_REQUEST_ID', '-')}\n"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
