"""The WSGI server inside a Roost worker (DESIGN.md, decision 4).

The zygote (`roost_zygote.py`) imports this module before it forks anything, so every worker
shares its code and gunicorn's copy-on-write. After a fork, the zygote's child specialises
itself (cgroups, uid, fds, environment, the app's import) and then calls `serve`, which serves
the app on the inherited socket with no arbiter, in one of two shapes:

- `threads = 1`: `InlineWorker`, one thread that accepts, parses and answers in one epoll
  loop. gunicorn's gthread worker would accept on the main thread, answer on a pool thread
  and hand the connection back: ~4.5 context switches per request for no concurrency.
- `threads > 1`: `RoostWorker`, gunicorn's gthread worker.

Both keep the agent's connections alive, and both take:

    fd 3  the listening socket (SD_LISTEN_FDS_START)
    fd 4  the lifeline: EOF when the agent is gone

It also keeps the worker's boot timeline (`mark`), logged with its first response.
"""

import errno
import importlib.util
import os
import select
import signal
import socket
import struct
import sys
import time

# In a worker: the listening socket (SD_LISTEN_FDS_START) and the lifeline.
LISTEN_FD, WORKER_LIFELINE_FD = 3, 4

# How long a worker keeps an idle connection from the agent: longer than the agent's pool
# keeps it (`idle_timeout`, 30 s, agent/src/http.rs), so the agent, which knows when it is
# about to reuse a connection, is the side that closes it, and never picks one the worker
# is closing at that moment.
KEEPALIVE_SECS = 45

from gunicorn.config import Config  # noqa: E402  (the WSGI server is the first preload)
from gunicorn.glogging import Logger  # noqa: E402
from gunicorn.workers import base as _gunicorn_base  # noqa: E402
from gunicorn.workers.gthread import ThreadWorker  # noqa: E402
import concurrent.futures.thread  # noqa: E402,F401  (gthread's pool; imported lazily otherwise, in every worker)
import selectors  # noqa: E402
from gunicorn import http as _gunicorn_http  # noqa: E402
from gunicorn.http import wsgi as _gunicorn_wsgi  # noqa: E402
from gunicorn.http.errors import NoMoreData  # noqa: E402
from gunicorn import util as _gunicorn_util  # noqa: E402
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


def _log_first_response(log):
    """Once, with the first response: where the time from the fork to it went; then the
    zygote's `after_first_response`."""
    mark("response")
    t0 = _T.get("fork")
    if t0 is not None:
        _log_boot(log, t0)
    after_first_response()


def _log_boot(log, t0):
    phases = ("forked", "spec", "cgroup", "setup", "import", "server", "accept", "response")
    prev, parts = t0, []
    for p in phases:
        t = _T.get(p, prev)
        parts.append("%s %.2f" % (p, (t - prev) * 1000))
        prev = t
    log.info("first response %.2f ms after the fork (%s ms)", (prev - t0) * 1000, ", ".join(parts))


def _init_signals(worker):
    for s in worker.SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, worker.handle_exit)
    signal.signal(signal.SIGQUIT, worker.handle_quit)
    signal.signal(signal.SIGINT, worker.handle_quit)
    signal.signal(signal.SIGABRT, worker.handle_abort)
    # SIGTERM must not interrupt a request's system calls.
    signal.siginterrupt(signal.SIGTERM, False)


def _rehearsal_request(cfg):
    """A parsed request on a fresh socket pair, for a worker's rehearsal (see `_rehearse`)."""
    ours, theirs = socket.socketpair()
    ours.sendall(b"GET /rehearsal HTTP/1.1\r\nHost: rehearsal\r\n\r\n")
    parser = _gunicorn_http.RequestParser(cfg, theirs, "")
    return ours, theirs, parser


def _rehearsal_app(environ, start_response):
    start_response("204 No Content", [("Content-Length", "0")])
    return [b""]


class RoostWorker(ThreadWorker):
    """gunicorn's gthread worker without its arbiter (sites with `threads` > 1).

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
        if not _lifeline_closed(fd):
            return
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
                _log_first_response(self.log)

    def _rehearse(self):
        """Walk the request path once, without the app, before the first client: parse a
        request, build its environ, write a response, and start a pool thread. A forked
        worker pays a copy-on-write fault for every zygote page it writes (reference counts
        included), and the first request would otherwise pay them all; a worker started
        ahead of its request (a proxy's warm call) pays them while it waits."""
        ours = theirs = None
        try:
            ours, theirs, parser = _rehearsal_request(self.cfg)
            req = next(parser)
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
        _init_signals(self)

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


# A one-piece body up to this size is sent with its head in one write.
ONE_SEND_MAX = 64 * 1024


def _small(body):
    return type(body) is bytes and len(body) <= ONE_SEND_MAX


class _Gathered:
    """Stands in for a response's socket while a one-piece body is written: gunicorn sends
    the head, the body (and a chunked body's end) separately; gathered, the response leaves
    in one write, and the agent reads all of it in one wake-up."""

    __slots__ = ("sock", "parts")

    def __init__(self, sock):
        self.sock, self.parts = sock, []

    def sendall(self, data):
        self.parts.append(data)

    def send(self, data):
        self.parts.append(data)
        return len(data)


def _write_in_one_send(resp, body):
    sock = resp.sock
    resp.sock = gathered = _Gathered(sock)
    try:
        resp.write(body)
        resp.close()
    finally:
        resp.sock = sock
    sock.sendall(b"".join(gathered.parts))


class _Connection:
    """One accepted connection: its socket (blocking) and its parser, which keeps the bytes
    read past the current request (a pipelined next one) between requests."""

    __slots__ = ("sock", "client", "parser", "last_used")

    def __init__(self, sock, client, parser, now):
        self.sock, self.client, self.parser, self.last_used = sock, client, parser, now


class InlineWorker(_gunicorn_base.Worker):
    """A single-threaded keep-alive server for sites with `threads = 1`.

    One epoll loop watches the listening socket, every kept-alive connection and the
    lifeline. A readable connection is served right there, on the loop's
    thread: no pool, no handoff, no lock. While it serves one request, others wait (in their
    connection, or in the listen backlog), which is what `threads = 1` means; an idle
    kept-alive connection costs a registration and never delays an accept. Connection
    sockets stay blocking (epoll says when a request has begun; the parser then reads the
    rest in one go), with the request timeout as a kernel receive/send timeout so a client
    that stalls mid-request cannot hold the worker.

    Stopping (SIGTERM, or EOF on the lifeline): the loop ends within a second, accepts nothing more,
    answers the requests already sent on accepted connections (with `Connection: close`),
    then exits; connections still in the backlog are the next worker's.
    """

    # Where the loop checks idle connections (and, in a forked sibling, its leader).
    HOUSEKEEPING_SECS = 1.0

    def __init__(self, *args, siblings=False, **kwargs):
        super().__init__(*args, **kwargs)
        # Sibling processes (`workers` > 1) on the same socket: EPOLLEXCLUSIVE wakes one of
        # them per connection, not all.
        self._siblings = siblings
        self._listen_events = select.EPOLLIN | (select.EPOLLEXCLUSIVE if siblings else 0)
        self._conns = {}
        self._answered = False
        self._listening = False

    def notify(self):
        pass

    def is_parent_alive(self):
        return True

    def init_signals(self):
        _init_signals(self)

    def handle_exit(self, sig, frame):
        """SIGTERM: stop after the request in hand. gthread gives requests in flight the grace
        period and then exits; here the request runs on this thread, so SIGALRM ends the
        process if it outlasts the grace."""
        if self.alive:
            signal.alarm(int(self.cfg.graceful_timeout) + 1)
        self.alive = False

    def handle_quit(self, sig, frame):
        self.alive = False
        sys.exit(0)

    def serve(self, wsgi):
        self.pid = os.getpid()
        self.wsgi = wsgi
        listener = self.sockets[0]
        listener.setblocking(False)
        # gthread reads the listener's name once too: SERVER_NAME when a request has no Host.
        self._server_name = listener.getsockname()
        timeout = max(1, int(self.cfg.timeout))
        self._io_timeout = struct.pack("ll", timeout, 0)
        self._max_conns = int(self.cfg.worker_connections)
        self._epoll = select.epoll()
        self.init_signals()
        self._epoll.register(WORKER_LIFELINE_FD, select.EPOLLIN)
        self._listen(True)
        self._rehearse()
        self.booted = True
        try:
            self._run(listener)
        finally:
            self._epoll.close()

    def _listen(self, on):
        """Watch the listening socket, or stop (at the connection limit, and when stopping)."""
        if on == self._listening:
            return
        fd = self.sockets[0].fileno()
        if on:
            self._epoll.register(fd, self._listen_events)
        else:
            self._epoll.unregister(fd)
        self._listening = on

    def _run(self, listener):
        conns, epoll = self._conns, self._epoll
        listen_fd = listener.fileno()
        monotonic = time.monotonic
        next_housekeeping = monotonic() + self.HOUSEKEEPING_SECS
        deferred = False
        while self.alive:
            # A SIGTERM while waiting is seen when the wait ends (within a second, as in
            # gthread): a wake-up pipe would be two more fds in every worker.
            events = epoll.poll(self.HOUSEKEEPING_SECS)
            now = monotonic()
            pending, served = False, False
            for fd, _ in events:
                conn = conns.get(fd)
                if conn is not None:
                    conn.last_used = now
                    self._serve(conn)
                    served = True
                elif fd == listen_fd:
                    pending = True
                elif fd == WORKER_LIFELINE_FD:
                    self._lifeline_lost()
            # Accept last, once a stop that came with the same wake-up is known. A process
            # that has just been busy leaves a connection to an idle sibling for one round.
            if pending and self.alive:
                if served and self._siblings and not deferred:
                    deferred = True
                else:
                    deferred = False
                    self._accept(listener, now)
            if now >= next_housekeeping:
                next_housekeeping = now + self.HOUSEKEEPING_SECS
                self._close_idle(now)
                if not self.is_parent_alive():
                    break
        self._stop(listener)

    def _accept(self, listener, now):
        try:
            sock, client = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling took it, or the client gave up
        if not self._answered:
            mark("accept")
        # The socket is blocking (accept4 without SOCK_NONBLOCK): the kernel bounds each
        # read and write by the request timeout instead of a poll before every call.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._io_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._io_timeout)
        fd = sock.fileno()
        self._conns[fd] = _Connection(sock, client, _gunicorn_http.RequestParser(self.cfg, sock, client), now)
        self._epoll.register(fd, select.EPOLLIN)
        if len(self._conns) >= self._max_conns:
            self._listen(False)

    def _serve(self, conn):
        """Answer the requests that have arrived on `conn`: the one that made it readable,
        and any pipelined after it that the parser has already read. Closes the connection
        when it ends."""
        req = None
        try:
            parser = conn.parser
            while True:
                req = next(parser)
                keep_alive = self._respond(req, conn)
                if not self._answered:
                    self._answered = True
                    _log_first_response(self.log)
                if not keep_alive:
                    break
                # More bytes already read: a pipelined request. Otherwise epoll says when
                # the next one starts.
                if not parser.unreader.buf.seek(0, os.SEEK_END):
                    return
                req = None
        except StopIteration:
            pass  # the client closed the connection (or HTTP says it ends here)
        except NoMoreData:
            self.log.debug("[roost] the client closed the connection inside a request")
        except OSError as e:
            if e.errno == errno.EAGAIN:
                self.log.info("[roost] closing a connection that stalled for %ss inside a request", self.cfg.timeout)
            elif e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as e:
            self.handle_error(req, conn.sock, conn.client, e)
        self._close(conn)

    def _respond(self, req, conn):
        """Run the app for `req` and write its response; whether the connection stays open.
        gthread's `handle_request`, without the pool's bookkeeping."""
        resp = None
        try:
            resp, environ = _gunicorn_wsgi.create(req, conn.sock, conn.client, self._server_name, self.cfg)
            self.nr += 1
            if not self.alive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                    resp.close()
                elif type(respiter) in (list, tuple) and len(respiter) == 1 and _small(respiter[0]):
                    _write_in_one_send(resp, respiter[0])
                else:
                    for item in respiter:
                        resp.write(item)
                    resp.close()
            finally:
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except OSError:
            raise
        except Exception:
            if resp is not None and resp.headers_sent:
                # Too late for an error page: end the connection so the client sees it.
                self.log.exception("Error handling request")
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise StopIteration()
            raise

    def _close(self, conn):
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
        conn.sock.close()
        if self.alive and len(self._conns) < self._max_conns:
            self._listen(True)

    def _close_idle(self, now):
        expired = [c for c in self._conns.values() if now - c.last_used > self.cfg.keepalive]
        for conn in expired:
            self._close(conn)

    def _lifeline_lost(self):
        """EOF on the lifeline: the agent is gone (even SIGKILLed). Stop as on SIGTERM, and
        let SIGALRM end the process if requests in flight outlast the grace period."""
        if not _lifeline_closed(WORKER_LIFELINE_FD):
            return
        self._epoll.unregister(WORKER_LIFELINE_FD)
        self.log.info("[roost] the agent is gone; stopping")
        self.alive = False
        signal.alarm(int(self.cfg.graceful_timeout) + 1)

    def _stop(self, listener):
        """Accept nothing more; answer what was already sent on accepted connections, within
        the grace period; close the rest. The listen backlog stays for the next worker."""
        self._listen(False)
        listener.close()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self._conns and time.monotonic() < deadline:
            ready = [self._conns[fd] for fd, _ in self._epoll.poll(0) if fd in self._conns]
            if not ready:
                break
            for conn in ready:
                self._serve(conn)  # answers with `Connection: close`, then closes
        for conn in list(self._conns.values()):
            self._close(conn)

    def _rehearse(self):
        """Walk the request path once, with a stand-in app, before the first client (see
        `RoostWorker._rehearse`): the same code a request runs, on a socket pair."""
        ours = theirs = None
        app, self.wsgi = self.wsgi, _rehearsal_app
        try:
            ours, theirs, parser = _rehearsal_request(self.cfg)
            self._respond(next(parser), _Connection(theirs, "", parser, 0.0))
            self.nr = 0
        except Exception as e:  # a rehearsal never stops a worker
            self.log.debug("[roost] rehearsal skipped: %s", e)
        finally:
            self.wsgi = app
            for s in (ours, theirs):
                if s is not None:
                    s.close()


_format_http_date = _gunicorn_util.http_date
_date = (0, "")


def _http_date(timestamp=None):
    """gunicorn formats every response's Date header afresh (~5 us, a tenth of a hello-world
    response); it changes once a second. One tuple, swapped whole: safe across gthread's
    pool threads."""
    global _date
    if timestamp is not None:
        return _format_http_date(timestamp)
    now = int(time.time())
    if _date[0] != now:
        _date = (now, _format_http_date(now))
    return _date[1]

def _server_templates():
    cfg = Config()
    for k, v in (("worker_class", "gthread"), ("errorlog", "-"), ("loglevel", "info")):
        cfg.set(k, v)
    return cfg, Logger(cfg)


_CFG, _LOG = _server_templates()
_gunicorn_base.WorkerTmp = _NoHeartbeat
_gunicorn_util.http_date = _http_date


def _lifeline_closed(fd):
    """True once the agent is gone (EOF or an error on the lifeline); false for a wake-up with
    nothing to read, or for bytes, which the agent never writes."""
    try:
        return not os.read(fd, 64)
    except BlockingIOError:
        return False
    except OSError:
        return True


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
    cfg.set("keepalive", KEEPALIVE_SECS)
    threads, workers = int(spec["threads"]), int(spec.get("workers", 1))
    cfg.set("workers", workers)  # the app's wsgi.multiprocess
    # More processes for `workers` > 1: forks of this one, app already imported, serving the
    # same socket in the same session. The first one leads: the agent signals it, and it
    # passes the stop on; the others stop when it is gone.
    leader, others = os.getpid(), []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:
            others = None
            break
        others.append(pid)
    listener = socket.socket(fileno=LISTEN_FD)
    args = (0, os.getppid(), [listener], None, int(spec["timeout"]), cfg, _LOG)
    if threads == 1:
        worker = InlineWorker(*args, siblings=workers > 1)
    else:
        worker = RoostWorker(*args)
    if others is None:
        worker.is_parent_alive = lambda: os.getppid() == leader
    _LOG.info("Roost worker %s serving %s (threads %d, forked from the zygote)", os.getpid(), spec["app"], threads)
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
