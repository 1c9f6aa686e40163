"""The WSGI server inside a Roost worker (DESIGN.md, decision 4).

The zygote (`roost_zygote.py`) imports this module before it forks anything, so every worker
shares its code and gunicorn's copy-on-write. After a fork, the zygote's child specialises
itself (cgroups, uid, fds, environment, the app's import) and then calls `serve`, which runs
gunicorn's gthread worker on the inherited socket with no arbiter:

    fd 3  the listening socket (SD_LISTEN_FDS_START)
    fd 4  the lifeline: EOF when the agent is gone

It also keeps the worker's boot timeline (`mark`), logged with its first response.
"""

import importlib.util
import os
import signal
import socket
import time

# In a worker: the listening socket (SD_LISTEN_FDS_START) and the lifeline.
LISTEN_FD, WORKER_LIFELINE_FD = 3, 4

from gunicorn.config import Config  # noqa: E402  (the WSGI server is the first preload)
from gunicorn.glogging import Logger  # noqa: E402
from gunicorn.workers import base as _gunicorn_base  # noqa: E402
from gunicorn.workers.gthread import ThreadWorker  # noqa: E402
import concurrent.futures.thread  # noqa: E402,F401  (gthread's pool; imported lazily otherwise, in every worker)
import selectors  # noqa: E402
from gunicorn import http as _gunicorn_http  # noqa: E402
from gunicorn.http import wsgi as _gunicorn_wsgi  # noqa: E402
from threading import RLock  # noqa: E402



class _NoHeartbeat:
    """gunicorn's WorkerTmp is a temp file the arbiter watches; there is no arbiter here."""

    def __init__(self, cfg):
        pass

    def notify(self):
        pass

    def fileno(self):
        return -1

    def close(self):
        pass


# Boot timeline of this worker (perf_counter seconds), from the zygote's fork on: logged once,
# with the first response, so an operator (and the benchmark) sees where a cold start went.
_T = {}


# Called once, after the first response (the zygote sets it: the module report, issue 14).
after_first_response = lambda: None  # noqa: E731


def mark(phase):
    _T.setdefault(phase, time.perf_counter())


def start_timeline(t):
    """The fork happened at perf_counter `t` (in the zygote): a new timeline from there."""
    _T.clear()
    _T["fork"] = t


class RoostWorker(ThreadWorker):
    """gunicorn's gthread worker without its arbiter.

    Differences from the stock worker: no heartbeat file, no wake-up pipe, and no parent
    check: the parent is the zygote, and a worker must outlive it; the lifeline ties the
    worker to the agent instead.
    """

    def notify(self):
        pass

    def is_parent_alive(self):
        return True

    def _lifeline_lost(self, fd):
        """EOF on the lifeline: the agent is gone (even SIGKILLed). Stop as on SIGTERM, and
        let SIGALRM end the process if requests in flight outlast the grace period."""
        try:
            if os.read(fd, 64):
                return  # the agent never writes; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        with self._lock:
            self.poller.unregister(fd)
        self.log.info("[roost] the agent is gone; stopping")
        self.alive = False
        signal.alarm(int(self.cfg.graceful_timeout) + 1)

    def accept(self, server, listener):
        mark("accept")
        return super().accept(server, listener)

    def handle_request(self, req, conn):
        try:
            return super().handle_request(req, conn)
        finally:
            if "response" not in _T:
                mark("response")
                self._log_boot()
                after_first_response()

    def _log_boot(self):
        t0 = _T.get("fork")
        if t0 is None:
            return
        phases = ("forked", "spec", "cgroup", "setup", "import", "server", "accept", "response")
        prev, parts = t0, []
        for p in phases:
            t = _T.get(p, prev)
            parts.append("%s %.2f" % (p, (t - prev) * 1000))
            prev = t
        self.log.info("first response %.2f ms after the fork (%s ms)", (prev - t0) * 1000, ", ".join(parts))

    def _rehearse(self):
        """Walk the request path once, without the app, before the first client: parse a
        request, build its environ, write a response, and start a pool thread. A forked
        worker pays a copy-on-write fault for every zygote page it writes (reference counts
        included), and the first request would otherwise pay them all; a worker started
        ahead of its request (a proxy's warm call) pays them while it waits."""
        ours = theirs = None
        try:
            ours, theirs = socket.socketpair()
            ours.sendall(b"GET /rehearsal HTTP/1.1\r\nHost: rehearsal\r\n\r\n")
            req = next(_gunicorn_http.RequestParser(self.cfg, theirs, ""))
            resp, _environ = _gunicorn_wsgi.create(req, theirs, "", "", self.cfg)
            resp.start_response("204 No Content", [("Content-Length", "0")])
            resp.write(b"")
            resp.close()
            self.tpool.submit(int).result()
        except Exception as e:  # a rehearsal never stops a worker
            self.log.debug("[roost] rehearsal skipped: %s", e)
        finally:
            for s in (ours, theirs):
                if s is not None:
                    s.close()

    def init_signals(self):
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, self.handle_exit)
        signal.signal(signal.SIGQUIT, self.handle_quit)
        signal.signal(signal.SIGINT, self.handle_quit)
        signal.signal(signal.SIGABRT, self.handle_abort)
        # SIGTERM must not interrupt a request's system calls.
        signal.siginterrupt(signal.SIGTERM, False)

    def serve(self, wsgi):
        self.pid = os.getpid()
        self.tpool = self.get_thread_pool()
        # epoll, not poll(2): a kept-alive connection is registered by a pool thread while
        # the main thread waits, and only epoll sees it at once (poll would wait out its
        # 1 s timeout). Its fd is the one the worker opens itself.
        self.poller = selectors.EpollSelector()
        self._lock = RLock()
        self.init_signals()
        # The lifeline is watched by the same loop as the socket: no thread of its own.
        self.poller.register(WORKER_LIFELINE_FD, selectors.EVENT_READ, self._lifeline_lost)
        self.wsgi = wsgi
        self._rehearse()
        self.booted = True
        # Stopping (SIGTERM or a lost lifeline): the loop ends within a second, accepts
        # nothing more, and every connection already accepted is served before the exit;
        # connections still in the backlog stay there for the next worker.
        self.run()


def _server_templates():
    cfg = Config()
    for k, v in (("worker_class", "gthread"), ("errorlog", "-"), ("loglevel", "info")):
        cfg.set(k, v)
    return cfg, Logger(cfg)


_CFG, _LOG = _server_templates()
_gunicorn_base.WorkerTmp = _NoHeartbeat


def prewarm():
    """Run in a spare (a zygote's child that has no site yet, no thread, and root's
    identity) while it waits: walk the site-independent part of the request path once (parse a
    request, build its environ, write a response, look a module up), so the copy-on-write
    faults it costs are paid before a site's first request instead of during it."""
    ours = theirs = None
    try:
        ours, theirs = socket.socketpair()
        ours.sendall(b"GET /prewarm HTTP/1.1\r\nHost: prewarm\r\n\r\n")
        req = next(_gunicorn_http.RequestParser(_CFG, theirs, ""))
        resp, _environ = _gunicorn_wsgi.create(req, theirs, "", "", _CFG)
        resp.start_response("204 No Content", [("Content-Length", "0")])
        resp.write(b"")
        resp.close()
        importlib.util.find_spec("roost_prewarm_absent")
    except Exception:
        pass  # a walk that fails only leaves its faults to the first request
    finally:
        for s in (ours, theirs):
            if s is not None:
                s.close()


def serve(app, spec):
    """Serve `app` on fd 3 as the site's `spec` says, until told to stop; the caller exits."""
    cfg = _CFG
    cfg.set("threads", int(spec["threads"]))
    cfg.set("graceful_timeout", int(spec["grace"]))
    cfg.set("timeout", int(spec["timeout"]))
    # More processes for `workers` > 1: forks of this one, app already imported, serving the
    # same socket in the same session. The first one leads: the agent signals it, and it
    # passes the stop on; the others stop when it is gone.
    leader, others = os.getpid(), []
    for _ in range(int(spec.get("workers", 1)) - 1):
        pid = os.fork()
        if pid == 0:
            others = None
            break
        others.append(pid)
    listener = socket.socket(fileno=LISTEN_FD)
    worker = RoostWorker(0, os.getppid(), [listener], None, int(spec["timeout"]), cfg, _LOG)
    if others is None:
        worker.is_parent_alive = lambda: os.getppid() == leader
    _LOG.info("Roost worker %s serving %s (threads %d, forked from the zygote)", os.getpid(), spec["app"], int(spec["threads"]))
    mark("server")
    worker.serve(app)
    for pid in others or ():
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for pid in others or ():
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    _LOG.info("Worker exiting (pid: %s)", os.getpid())
