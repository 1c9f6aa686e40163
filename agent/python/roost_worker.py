"""The WSGI server inside a Roost worker (DESIGN.md, decision 4).

The zygote (`roost_zygote.py`) imports this module before it forks anything, so every worker
shares its code and gunicorn's copy-on-write. After a fork, the zygote's child specialises
itself (cgroups, uid, fds, environment, the app's import) and then calls `serve`, which serves
the app on the inherited socket with no arbiter: `InlineWorker`, whose `threads` threads
share one epoll set and each answer a request on the thread that was woken for it
(leader/followers). gunicorn's gthread worker, which this replaced for `threads > 1`,
accepts and polls on its main thread and answers on a pool thread, then hands the connection
back: 6-7 context switches per request behind the agent, twice the CPU of one thread that
reads, runs and writes in a row.

It keeps the agent's connections alive, and takes:

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
from gunicorn import http as _gunicorn_http  # noqa: E402
from gunicorn.http import wsgi as _gunicorn_wsgi  # noqa: E402
from gunicorn.http.errors import NoMoreData  # noqa: E402
from gunicorn import util as _gunicorn_util  # noqa: E402
import _thread  # noqa: E402
import threading  # noqa: E402



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


class _SettledConfig:
    """The worker's gunicorn config as its requests read it. gunicorn reads settings per
    request through `Config.__getattr__` (a lookup and a call each, 16 reads per request:
    a third of a hello-world request's Python); a worker's settings are fixed before it
    serves, so each is read from the config once and then kept as a plain attribute."""

    def __init__(self, cfg):
        self._cfg = cfg

    def __getattr__(self, name):
        value = getattr(self._cfg, name)
        setattr(self, name, value)  # two threads may both miss: the same value either way
        return value

    def set(self, name, value):
        """Change a setting before the worker serves (`Config.set`), and forget its old value."""
        self._cfg.set(name, value)
        self.__dict__.pop(name, None)


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


# What this worker serves, logged with its first response: a log write before it would be
# one more step of a cold start (a third of a millisecond in a fresh fork).
_serving_line = None

# Set in a spare whose `prewarm` walked the server's request path: its worker skips the
# rehearsal, whose faults the spare has paid.
_prewarmed = False


def _log_first_response(log):
    """Once, after the first response: what the worker serves, where the time from the fork
    to the response went; then the zygote's `after_first_response`."""
    if _serving_line is not None:
        log.info(*_serving_line)
    t0 = _T.get("fork")
    if t0 is not None:
        _log_boot(log, t0)
    after_first_response()


def _log_boot(log, t0):
    phases = ("forked", "cgroup", "spec", "setup", "import", "server", "accept", "request", "response")
    prev, parts = t0, []
    for p in phases:
        t = _T.get(p, prev)
        parts.append("%s %.2f" % (p, (t - prev) * 1000))
        prev = t
    log.info("first response %.2f ms after the fork (%s ms)", (prev - t0) * 1000, ", ".join(parts))


# Set where every signal the server handles is known to be at its default already (a
# spare's `_prepare_ahead`): the server installs its own handlers and nothing else.
signals_at_default = False


def _init_signals(worker):
    if not signals_at_default:
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


# What a kept-alive connection reads of a body its app left unread; a longer one closes it.
DRAIN_MAX = 64 * 1024


def _drain_body(req):
    """Read what is left of `req`'s body, now: otherwise its last bytes, arriving after the
    response, would wake a thread that then blocks reading the next request's head from an
    idle connection (and holds up a stop). Whether the connection may stay open."""
    body, left = req.body, DRAIN_MAX
    while left > 0:
        data = body.read(min(8192, left))
        if not data:
            return True
        left -= len(data)
    return False


class _Connection:
    """One accepted connection: its socket (blocking) and its parser, which keeps the bytes
    read past the current request (a pipelined next one) between requests. `busy` while a
    thread serves it: the idle sweep leaves it alone."""

    __slots__ = ("sock", "client", "parser", "last_used", "busy")

    def __init__(self, sock, client, parser, now):
        self.sock, self.client, self.parser, self.last_used = sock, client, parser, now
        self.busy = False


class InlineWorker(_gunicorn_base.Worker):
    """The worker's keep-alive server: up to `threads` threads on one epoll set, every
    request answered on the thread that was woken for it.

    The epoll set holds the listening socket, every kept-alive connection and the lifeline.
    A polling thread waits on it for one event at a time (the kernel wakes one waiter per
    event) and serves a readable connection right there: no pool, no handoff. With more
    than one thread a connection is registered one-shot: once delivered to a thread it is
    that thread's until it re-arms it after the response, so no two threads ever read one
    connection. Connection sockets stay blocking (epoll says when a request has begun; the
    parser then reads the rest in one go), with the request timeout as a kernel
    receive/send timeout so a client that stalls mid-request cannot hold a thread.

    Only as many threads poll as the requests need. Threads share the GIL, so two pollers
    with short requests only take turns at it (measured: 2.6x the CPU per hello-world
    request of one thread). One thread polls; the others are parked, and a watcher
    promotes one only when every polling thread has been inside the same requests for
    `PROMOTE_AFTER_SECS` (an app waiting on a database, a slow upload), up to `threads`
    in all. A polling thread that finds itself one of two idle ones parks again.

    The first request is answered by the main thread alone, and what follows it (the other
    threads, the boot log line, the module report) waits for the first quiet moment or the
    next request: a cold start never waits for a thread to be created, and its response is
    not slowed on its way out by the worker's own follow-up competing with the agent and
    the proxy for the CPU.

    Stopping (SIGTERM, or EOF on the lifeline): every thread's loop ends within a second,
    nothing more is accepted, the requests in hand finish, the requests already sent on
    accepted connections are answered (with `Connection: close`), then the process exits;
    connections still in the backlog are the next worker's.
    """

    # Where the loop checks idle connections (and, in a forked sibling, its leader).
    HOUSEKEEPING_SECS = 1.0
    # After the first response, its follow-up runs once nothing has happened for this long
    # (the response is then through the agent and the proxy), before the next request, or
    # this long after it at most.
    FOLLOW_UP_QUIET_SECS = 0.005
    FOLLOW_UP_LATEST_SECS = 0.1
    # How long every polling thread must have been inside the same requests before a parked
    # one is promoted: far above a quick request's ~0.1 ms, well below a human's notice.
    PROMOTE_AFTER_SECS = 0.002

    def __init__(self, *args, siblings=False, threads=1, **kwargs):
        super().__init__(*args, **kwargs)
        # Requests read settings through this. The module's own is settled in a spare, whose
        # rehearsal reads what a request reads, so not even the first request pays for them.
        self._settled = _SETTLED if self.cfg is _CFG else _SettledConfig(self.cfg)
        # Sibling processes (`workers` > 1) on the same socket: EPOLLEXCLUSIVE wakes one of
        # them per connection, not all.
        self._siblings = siblings
        self._listen_events = select.EPOLLIN | (select.EPOLLEXCLUSIVE if siblings else 0)
        self._threads = max(1, threads)
        self._oneshot = self._threads > 1
        self._conn_events = select.EPOLLIN | (select.EPOLLONESHOT if self._oneshot else 0)
        self._conns = {}
        # Guards what threads share beyond one connection: the set of connections, the
        # listening socket's registration, and the counts below.
        self._lock = threading.Lock()
        self._answered = False
        # When the first response left, until its follow-up has run (`_follow_up`).
        self._follow_up_due = None
        self._listening = False
        self._next_housekeeping = 0.0
        # Threads: one lock per extra thread (and the watcher), held while it runs, for the
        # main thread to join them; threads polling; when each thread serving a request
        # began it (by thread id); requests begun so far; a parked thread's lock (acquired:
        # it waits on it until promoted).
        self._joins = []
        self._pollers, self._begun = 1, 0
        self._serving = {}
        self._parked = []
        self._stopping = False
        self._watcher_parked = False
        self._watcher_wake = _thread.allocate_lock()
        self._watcher_wake.acquire()

    def notify(self):
        pass

    def is_parent_alive(self):
        return True

    def init_signals(self):
        _init_signals(self)

    def handle_exit(self, sig, frame):
        """SIGTERM: stop after the requests in hand. gthread gives requests in flight the
        grace period and then exits; here requests run on the loop's threads, so SIGALRM ends
        the process if one outlasts the grace."""
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
        self._epoll.register(WORKER_LIFELINE_FD, select.EPOLLIN | (select.EPOLLONESHOT if self._oneshot else 0))
        with self._lock:
            self._listen(True)
        if not _prewarmed:
            self._rehearse()
        self.booted = True
        self._next_housekeeping = time.monotonic() + self.HOUSEKEEPING_SECS
        try:
            self._run(listener, leader=True)
            if self._follow_up_due is not None:  # stopped right after the first response
                self._follow_up_due = None
                _log_first_response(self.log)
            # No more accepts while the other threads finish their requests (a backlog
            # would keep waking them); parked ones wake to exit.
            with self._lock:
                self._listen(False)
                self._stopping = True
                parked, self._parked = self._parked, []
                wake_watcher, self._watcher_parked = self._watcher_parked, False
            for lock in parked:
                lock.release()
            if wake_watcher:
                self._watcher_wake.release()
            for done in self._joins:
                done.acquire()
            self._stop(listener)
        finally:
            self._epoll.close()

    def _listen(self, on):
        """Watch the listening socket, or stop (at the connection limit, and when stopping).
        The caller holds `_lock`."""
        if on == self._listening:
            return
        fd = self.sockets[0].fileno()
        if on:
            self._epoll.register(fd, self._listen_events)
        else:
            self._epoll.unregister(fd)
        self._listening = on

    def _requests_in(self, events, listen_fd):
        """Whether `events` bring a request: a new connection, or bytes on a kept one."""
        return any(fd == listen_fd or fd in self._conns for fd, _ in events)

    def _follow_up(self, listener):
        """Once, on the main thread, after the first response: the other threads, and the
        log line and report that go with the first response."""
        self._follow_up_due = None
        if self._threads > 1:
            self._start_threads(listener)
        _log_first_response(self.log)

    def _start_threads(self, listener):
        """The other `threads - 1` threads, parked, and the watcher that promotes them.
        `_thread`, not `threading.Thread`, whose `start` waits until the new thread runs."""
        for i in range(self._threads):
            done = _thread.allocate_lock()
            done.acquire()
            if i == 0:
                target, args = self._watch, (done,)
            else:
                parked = _thread.allocate_lock()
                parked.acquire()
                target, args = self._follow, (listener, parked, done)
            try:
                _thread.start_new_thread(target, args)
            except RuntimeError as e:  # out of threads (the site's pids limit): serve with fewer
                self.log.warning("[roost] cannot start a server thread: %s", e)
                break
            self._joins.append(done)
            if i > 0:
                with self._lock:
                    self._parked.append(parked)

    def _follow(self, listener, parked, done):
        try:
            parked.acquire()  # until promoted (or stopping)
            self._run(listener, leader=False)
        except BaseException:
            self.log.exception("[roost] a server thread failed")
        finally:
            done.release()

    def _watch(self, done):
        """Promote a parked thread when every polling thread has been inside the same
        requests for `PROMOTE_AFTER_SECS`; sleep on `_watcher_wake` while any polls idle."""
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    all_busy = len(self._serving) >= self._pollers
                    self._watcher_parked = not all_busy
                    begun = self._begun
                if not all_busy:
                    self._watcher_wake.acquire()
                    continue
                time.sleep(self.PROMOTE_AFTER_SECS)
                with self._lock:
                    stuck = self._begun == begun and len(self._serving) >= self._pollers
                    if stuck and self._parked and not self._stopping:
                        self._pollers += 1
                        self._parked.pop().release()
        except BaseException:
            self.log.exception("[roost] the server's watcher failed")
        finally:
            done.release()

    def _begin_request(self, now):
        with self._lock:
            self._serving[_thread.get_ident()] = now
            self._begun += 1
            wake = self._watcher_parked and len(self._serving) >= self._pollers
            if wake:
                self._watcher_parked = False
        if wake:
            self._watcher_wake.release()

    def _end_request(self):
        with self._lock:
            self._serving.pop(_thread.get_ident(), None)

    def _park_if_surplus(self, now):
        """Park this (non-main) thread unless it is needed: more than one thread polls
        besides those held in long requests. Back when promoted. Whether the thread goes on
        polling."""
        with self._lock:
            if self._stopping:
                return False
            held = sum(1 for since in self._serving.values() if now - since >= self.PROMOTE_AFTER_SECS)
            if self._pollers - held < 2:
                return True
            self._pollers -= 1
            parked = _thread.allocate_lock()
            parked.acquire()
            self._parked.append(parked)
        parked.acquire()
        return self.alive

    def _run(self, listener, leader):
        conns, epoll = self._conns, self._epoll
        listen_fd = listener.fileno()
        monotonic = time.monotonic
        # One event per wake-up with several threads: the rest are for the others.
        max_events = 1 if self._oneshot else -1
        deferred = False
        while self.alive:
            # A SIGTERM while waiting is seen when the wait ends (within a second, as in
            # gthread): a wake-up pipe would be two more fds in every worker.
            following_up = leader and self._follow_up_due is not None
            wait = self.FOLLOW_UP_QUIET_SECS if following_up else self.HOUSEKEEPING_SECS
            events = epoll.poll(wait, max_events)
            now = monotonic()
            # The follow-up waits for a quiet moment, but not for longer than the next
            # request: that one may need the other threads.
            if following_up and (not events or now >= self._follow_up_due or self._requests_in(events, listen_fd)):
                self._follow_up(listener)
            pending, served = False, False
            for fd, _ in events:
                conn = conns.get(fd)
                if conn is not None:
                    conn.last_used = now
                    conn.busy = True
                    if self._oneshot:
                        self._begin_request(now)
                        try:
                            self._serve(conn)
                        finally:
                            self._end_request()
                    else:
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
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            if not leader and not self._park_if_surplus(monotonic()):
                break

    def _housekeeping(self, now):
        """Once a second, on whichever thread gets here first: idle connections, and a forked
        sibling's leader."""
        with self._lock:
            if now < self._next_housekeeping:
                return  # another thread just did it
            self._next_housekeeping = now + self.HOUSEKEEPING_SECS
            idle = [c for c in self._conns.values() if not c.busy and now - c.last_used > self.cfg.keepalive]
        for conn in idle:
            if self._oneshot:
                # Another thread may be handed it at any moment: wake the one that will be,
                # which reads the end and closes it (an fd closed under a waiting thread
                # could be reused by the next accept before that thread looks it up).
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self._close(conn)
        if not self.is_parent_alive():
            self.alive = False

    def _accept(self, listener, now):
        try:
            sock, client = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling (or another thread) took it, or the client gave up
        if not self._answered:
            mark("accept")
        # The socket is blocking (accept4 without SOCK_NONBLOCK): the kernel bounds each
        # read and write by the request timeout instead of a poll before every call.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._io_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._io_timeout)
        fd = sock.fileno()
        with self._lock:
            self._conns[fd] = _Connection(sock, client, _gunicorn_http.RequestParser(self._settled, sock, client), now)
            self._epoll.register(fd, self._conn_events)
            if len(self._conns) >= self._max_conns:
                self._listen(False)

    def _serve(self, conn):
        """Answer the requests that have arrived on `conn`: the one that made it readable,
        and any pipelined after it that the parser has already read; then hand it back to
        the epoll set, or close it when it ends."""
        req = None
        try:
            parser = conn.parser
            while True:
                req = next(parser)
                if not self._answered:
                    mark("request")
                keep_alive = self._respond(req, conn) and _drain_body(req)
                if not self._answered:
                    self._answered = True
                    mark("response")
                    self._follow_up_due = time.monotonic() + self.FOLLOW_UP_LATEST_SECS
                if not keep_alive:
                    break
                # More bytes already read: a pipelined request. Otherwise epoll says when
                # the next one starts.
                if not parser.unreader.buf.seek(0, os.SEEK_END):
                    conn.busy = False
                    if self._oneshot:
                        self._epoll.modify(conn.sock.fileno(), self._conn_events)
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
            resp, environ = _gunicorn_wsgi.create(req, conn.sock, conn.client, self._server_name, self._settled)
            environ["wsgi.multithread"] = self._oneshot
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
        """Forget and close `conn` (on the thread it was delivered to, or after the others
        have stopped)."""
        fd = conn.sock.fileno()
        with self._lock:
            if self._conns.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
            conn.sock.close()
            if self.alive and len(self._conns) < self._max_conns:
                self._listen(True)

    def _lifeline_lost(self):
        """A wake-up on the lifeline: if it is EOF, the agent is gone (even SIGKILLed). Stop
        as on SIGTERM, and let SIGALRM end the process if requests in flight outlast the
        grace period."""
        if not _lifeline_closed(WORKER_LIFELINE_FD):
            if self._oneshot:
                self._epoll.modify(WORKER_LIFELINE_FD, select.EPOLLIN | select.EPOLLONESHOT)
            return
        try:
            self._epoll.unregister(WORKER_LIFELINE_FD)
        except (OSError, ValueError):
            pass
        self.log.info("[roost] the agent is gone; stopping")
        self.alive = False
        signal.alarm(int(self.cfg.graceful_timeout) + 1)

    def _stop(self, listener):
        """Accept nothing more; answer what was already sent on accepted connections, within
        the grace period; close the rest. The listen backlog stays for the next worker. Runs
        on the main thread once the others have ended."""
        with self._lock:
            self._listen(False)
        listener.close()
        # One-shot registrations delivered nothing since their thread stopped: level from now.
        for fd, conn in list(self._conns.items()):
            if not conn.busy:
                try:
                    self._epoll.modify(fd, select.EPOLLIN)
                except (OSError, ValueError):
                    pass
        self._oneshot = False
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self._conns and time.monotonic() < deadline:
            ready = [self._conns[fd] for fd, _ in self._epoll.poll(0) if fd in self._conns]
            if not ready:
                break
            for conn in ready:
                conn.busy = True
                self._serve(conn)  # answers with `Connection: close`, then closes
        for conn in list(self._conns.values()):
            self._close(conn)

    def _rehearse(self):
        """Walk the request path once, with a stand-in app, before the first client: the same
        code a request runs, on a socket pair. A forked worker pays a copy-on-write fault for
        every zygote page it writes (reference counts included), and the first request would
        otherwise pay them all; a worker started ahead of its request (a proxy's warm call)
        pays them while it waits."""
        ours = theirs = None
        app, self.wsgi = self.wsgi, _rehearsal_app
        try:
            ours, theirs, parser = _rehearsal_request(self._settled)
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
    response); it changes once a second. One tuple, swapped whole: safe across the server's
    threads."""
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
_SETTLED = _SettledConfig(_CFG)
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


class _HandOver:
    """Stands in for a listener in `_rehearse_accept`: its accept hands over one end of a
    socket pair. No socket anyone else could connect to is ever listening in a spare."""

    def __init__(self, sock):
        self._sock = sock

    def accept(self):
        sock, self._sock = self._sock, None
        return sock, ""


def _rehearse_accept(worker):
    """`prewarm`'s walk of what a worker's first request adds to the rehearsal: its
    server's epoll set, the accepted connection's setup, and its first request served as a
    kept connection is."""
    ours = theirs = None
    app, worker.wsgi = worker.wsgi, _rehearsal_app
    worker._answered = True  # no boot marks, no follow-up
    worker._io_timeout, worker._max_conns = struct.pack("ll", 30, 0), 1000
    worker._epoll = select.epoll()
    try:
        ours, theirs = socket.socketpair()
        ours.sendall(b"GET /rehearsal HTTP/1.1\r\nHost: rehearsal\r\n\r\n")
        with worker._lock:
            worker._listen(True)
        worker._epoll.poll(0)
        worker._accept(_HandOver(theirs), time.monotonic())
        for fd, _ in worker._epoll.poll(0):
            conn = worker._conns.get(fd)
            if conn is not None:
                worker._serve(conn)
        ours.recv(65536)
    finally:
        for conn in list(worker._conns.values()):
            conn.sock.close()
        worker._conns.clear()
        worker._epoll.close()
        worker._listening = False
        worker.wsgi = app
        for s in (ours, theirs):
            if s is not None:
                s.close()


# The variables every worker's environment has (`worker_env` in agent/src/launch/direct.rs,
# and LISTEN_PID), for `prewarm`.
_WORKER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "PYTHONUNBUFFERED", "ROOST_SITE", "LISTEN_FDS", "LISTEN_PID")


def prewarm():
    """Run in a spare (a zygote's child that has no site yet, no thread, and root's
    identity) while it waits: build a server and walk its request path once (parse a
    request, build its environ, run a stand-in app, write the response), and look a module
    up, so the copy-on-write faults they cost are paid before a site's first request
    instead of during it. Leaves no thread and no fd."""
    global _prewarmed
    sock = None
    try:
        sock, other = socket.socketpair()
        other.close()
        worker = InlineWorker(0, os.getppid(), [sock], None, 30, _CFG, _LOG, threads=1)
        worker.wsgi, worker._server_name = None, ""
        worker._rehearse()
        _rehearse_accept(worker)
        # The signals `serve` installs, installed as they are (at their defaults in a spare).
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGABRT):
            signal.signal(sig, signal.SIG_DFL)
        signal.siginterrupt(signal.SIGTERM, False)
        # The settings `serve` sets, set to what they are: their objects' pages copied here.
        for name in _SITE_SETTINGS:
            _SETTLED.set(name, getattr(_CFG, name))
        importlib.util.find_spec("roost_prewarm_absent")
        # A worker replaces the whole environment with its site's: as many variables (the
        # agent's `worker_env`), of like sizes, set and taken back. libc keeps every value
        # it was given in a tree, and the worker's own go into it beside these.
        saved = dict(os.environ)
        for name in _WORKER_ENV:
            os.environ[name] = "/prewarm/" + name.lower()
        for name in _WORKER_ENV:
            del os.environ[name]
        os.environ.update(saved)
        del saved
        _prewarmed = True
    except Exception:
        pass  # a walk that fails only leaves its faults to the first request
    finally:
        if sock is not None:
            sock.close()


# What `serve` sets from a site's spec.
_SITE_SETTINGS = ("threads", "graceful_timeout", "timeout", "keepalive", "workers")


def serve(app, spec):
    """Serve `app` on fd 3 as the site's `spec` says, until told to stop; the caller exits."""
    global _serving_line
    cfg = _SETTLED
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
    args = (0, os.getppid(), [listener], None, int(spec["timeout"]), _CFG, _LOG)
    worker = InlineWorker(*args, siblings=workers > 1, threads=threads)
    if others is None:
        worker.is_parent_alive = lambda: os.getppid() == leader
    _serving_line = ("Roost worker %s serving %s (threads %d, forked from the zygote)", os.getpid(), spec["app"], threads)
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
