"""What a spare imports while it waits (roost_zygote.py, `_rehearse_import`): a hello-world
app, imported the way a never-started site's app is."""
import os


def application(environ, start_response):
    body = os.environ.get("X", "").encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
