"""A `command` site for the edge tests: plain Python, no framework, serving HTTP/1.1 on the
socket the agent hands over as fd 3 (LISTEN_FDS). Endpoints:

  GET  /echo            JSON: method, path, headers (lower-case name -> list of values), pid
  POST /upload          reads the body as it streams (Content-Length or chunked);
                        JSON: bytes, sha256
  GET  /download?bytes=N  N bytes of a fixed pattern, written in 64 KiB pieces
  GET  /slow?ms=N       answers "slow done" after N ms
  GET  /ws              with Upgrade: websocket: 101, then echoes every byte until EOF
"""

import base64
import hashlib
import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self):
        return "agent"

    def log_message(self, fmt, *args):
        sys.stderr.write("edge-app: " + (fmt % args) + "\n")

    def reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def headers_dict(self):
        out = {}
        for k, v in self.headers.items():
            out.setdefault(k.lower(), []).append(v)
        return out

    def do_GET(self):
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if url.path == "/download":
            n = int(q.get("bytes", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            left = n
            while left > 0:
                piece = PATTERN[: min(left, len(PATTERN))]
                self.wfile.write(piece)
                left -= len(piece)
            return
        if url.path == "/slow":
            time.sleep(int(q.get("ms", ["1000"])[0]) / 1000.0)
            return self.reply(200, b"slow done\n", "text/plain")
        report = {
            "method": self.command,
            "path": self.path,
            "headers": self.headers_dict(),
            "pid": os.getpid(),
            "site": os.environ.get("ROOST_SITE", ""),
        }
        self.reply(200, json.dumps(report, sort_keys=True).encode())

    def read_body(self):
        """Yield the request body in pieces, never all of it at once."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left > 0:
                    piece = self.rfile.read(min(left, 65536))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece
                self.rfile.readline(16)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                piece = self.rfile.read(min(left, 65536))
                if not piece:
                    return
                left -= len(piece)
                yield piece

    def do_POST(self):
        h = hashlib.sha256()
        n = 0
        for piece in self.read_body():
            h.update(piece)
            n += len(piece)
        self.reply(200, json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode())

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        # The test client sends nothing before it has read the 101, so the buffered reader
        # holds nothing yet: read the socket itself from here on.
        conn = self.connection
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        self.close_connection = True


def main():
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("edge-app: expected one socket on fd 3 (LISTEN_FDS=1, LISTEN_PID=own pid)")
    sock = socket.socket(fileno=3)
    server = ThreadingHTTPServer(("", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
