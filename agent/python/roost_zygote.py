"""Roost's zygote: a fork server for one Python interpreter (DESIGN.md, decision 4).

The agent starts one per base interpreter, as root, with:

    fd 3  control   SOCK_SEQPACKET: the agent asks for a fork, the zygote answers with the
                    child's pid and a pidfd for it (SCM_RIGHTS)
    fd 4  events    SOCK_SEQPACKET: the zygote reports each child's exit status
    fd 5  lifeline  the read end of a pipe whose write end only the agent holds

It imports the WSGI server and the modules the operator lists, then waits. It never sees a
site's code, files, environment or privilege: a fork request carries one fd, a fresh
socket whose other end the agent keeps. The child reads its site's spec (and its listening
socket and log file) from that socket itself, after the fork, so no site's data ever
passes through the zygote's memory, which every later worker inherits.

The child, in an order that leaves nothing behind: joins the site's cgroups, starts a new
session, sets its supplementary groups, gid and uid, no-new-privs and umask 027, keeps only
fd 0 (/dev/null), 1 and 2 (the site's log), 3 (the listening socket) and 4 (the lifeline),
replaces its environment with the site's, enters the site's directory as the user, puts it
and its virtualenv's site-packages on sys.path, imports the app and serves it with
gunicorn's gthread worker on the inherited socket (no arbiter). Workers outlive the zygote;
they stop when the agent goes away (EOF on the lifeline).
"""

import ctypes
import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

CONTROL_FD, EVENTS_FD, LIFELINE_FD = 3, 4, 5
# In a worker: the listening socket (SD_LISTEN_FDS_START) and the lifeline.
LISTEN_FD, WORKER_LIFELINE_FD = 3, 4
MAX_SPEC = 1 << 20
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def log(msg):
    sys.stderr.write("roost-zygote[%d]: %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


def prctl(option, arg):
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "prctl(%d): %s" % (option, os.strerror(e)))


def set_name(name):
    try:
        prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except OSError:
        pass


def status_text(status):
    """Describe a wait status the way the agent's direct spawn does (Rust's ExitStatus)."""
    if os.WIFEXITED(status):
        return "exit status: %d" % os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = " (%s)" % signal.Signals(sig).name
        except ValueError:
            name = ""
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return "signal: %d%s%s" % (sig, name, core)
    return "wait status %d" % status


# --- the server inside a worker ------------------------------------------------------------

from gunicorn.config import Config  # noqa: E402  (the WSGI server is the first preload)
from gunicorn.glogging import Logger  # noqa: E402
from gunicorn.workers import base as _gunicorn_base  # noqa: E402
from gunicorn.workers.gthread import ThreadWorker  # noqa: E402
import selectors  # noqa: E402
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


class RoostWorker(ThreadWorker):
    """gunicorn's gthread worker without its arbiter.

    Differences from the stock worker: no heartbeat file, no wake-up pipe, poll(2) instead
    of epoll (no fd of its own), and no parent check: the parent is the zygote, and a worker
    must outlive it; the lifeline ties the worker to the agent instead.
    """

    def notify(self):
        pass

    def is_parent_alive(self):
        return True

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
        self.poller = selectors.PollSelector()
        self._lock = RLock()
        self.init_signals()
        self.wsgi = wsgi
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


# --- the worker: everything after the fork ------------------------------------------------------


def _high(fd):
    """Move `fd` out of the way of fds 0-4 (close-on-exec, the original closed)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(fd)
    return new


def _site_packages(venv):
    return "%s/lib/python%d.%d/site-packages" % (venv.rstrip("/"), sys.version_info[0], sys.version_info[1])


def _setup_path(site_dir, venv):
    """The site's directory first, then its virtualenv's site-packages (with its .pth files),
    then the interpreter's own path. Preloaded modules that the virtualenv also provides are
    forgotten, so the site imports its own version."""
    import site

    front = [site_dir]
    if venv:
        sp = _site_packages(venv)
        before = list(sys.path)
        site.addsitedir(sp)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = before
        front += added or [sp]
        try:
            names = set(os.listdir(sp))
        except OSError:
            names = set()
        shadowed = set()
        for mod in list(sys.modules):
            top = mod.split(".", 1)[0]
            if top in names or top + ".py" in names:
                shadowed.add(top)
        for mod in list(sys.modules):
            if mod.split(".", 1)[0] in shadowed:
                del sys.modules[mod]
    sys.path[:] = front + [p for p in sys.path if p not in front]
    importlib.invalidate_caches()


def _load_app(app):
    module, _, attr = app.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError("%s is not callable" % app)
    return obj


def _watch_lifeline(worker, grace):
    """EOF on the lifeline: the agent is gone (even SIGKILLed). Stop like on SIGTERM, and
    make sure the process ends after the grace period."""
    try:
        while os.read(WORKER_LIFELINE_FD, 64):
            pass
    except OSError:
        pass
    sys.stderr.write("[%d] [roost] the agent is gone; stopping\n" % os.getpid())
    sys.stderr.flush()
    worker.alive = False
    time.sleep(grace + 1)
    os._exit(1)


def worker_main(chan_fd, zygote_socks):
    """Runs in the forked child; never returns."""
    code = 1
    try:
        code = _worker(chan_fd, zygote_socks)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _worker(chan_fd, zygote_socks):
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_DFL if s != signal.SIGPIPE else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # The zygote's sockets must never be closed through these objects (their fd numbers
    # are about to be reused).
    for s in zygote_socks:
        s.detach()
    chan = socket.socket(fileno=chan_fd)
    data, fds, _, _ = socket.recv_fds(chan, MAX_SPEC, 2)
    chan.close()
    if not data:
        return 0  # the agent withdrew the request
    spec = json.loads(data)
    if len(fds) != 2:
        raise RuntimeError("expected the listening socket and the log file, got %d fds" % len(fds))
    listen_fd, log_fd = _high(fds[0]), _high(fds[1])
    lifeline_fd = _high(os.dup(LIFELINE_FD))

    # 1. The site's cgroups, before anything else runs or allocates.
    for path in spec["cgroup_procs"]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    # 2. A session of its own: the agent signals the worker's whole tree as -pid.
    os.setsid()
    # 3. Privileges: groups, gid, uid; then no way back.
    os.setgroups(spec["groups"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.umask(0o027)
    # 4. fds: 0 /dev/null, 1-2 the site's log, 3 the socket, 4 the lifeline; nothing else.
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = _high(os.open("/dev/null", os.O_RDWR))
    for src, dst in ((devnull, 0), (log_fd, 1), (log_fd, 2), (listen_fd, LISTEN_FD), (lifeline_fd, WORKER_LIFELINE_FD)):
        os.dup2(src, dst, inheritable=dst < 3)
    os.closerange(WORKER_LIFELINE_FD + 1, 1 << 20)
    # 5. The site's environment and nothing else.
    os.environ.clear()
    for k, v in spec["env"]:
        os.environ[k] = v
    os.environ["LISTEN_PID"] = str(os.getpid())
    # 6. The site's directory, entered as the user.
    os.chdir(spec["dir"])
    host = spec["host"]
    set_name("roost:" + host)
    sys.argv = ["roost-worker", host]
    _setup_path(spec["dir"], spec.get("virtualenv"))
    gc.enable()
    # 7. The app.
    app = _load_app(spec["app"])
    # 8. Serve.
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
    threading.Thread(target=_watch_lifeline, args=(worker, int(spec["grace"])), daemon=True).start()
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
    return 0


# --- the zygote ------------------------------------------------------------------------------


def preload(modules):
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as e:  # a missing or broken module never stops the zygote
            log("preload %s: skipped (%s: %s)" % (name, type(e).__name__, e))
        else:
            log("preloaded %s" % name)


def main():
    modules = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
    set_name("roost-zygote")
    control = socket.socket(fileno=CONTROL_FD)
    events = socket.socket(fileno=EVENTS_FD)
    events.setblocking(False)
    preload(modules)
    # Everything imported so far is shared, copy-on-write, with every worker: keep the
    # collector from touching (and so copying) it.
    gc.collect()
    gc.freeze()
    gc.disable()

    def reap(_sig=None, _frame=None):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                events.send(json.dumps({"pid": pid, "status": status_text(status)}).encode())
            except OSError:
                pass  # the agent is not listening; its pidfd still tells it the worker exited

    signal.signal(signal.SIGCHLD, reap)
    poller = select.poll()
    poller.register(CONTROL_FD, select.POLLIN)
    poller.register(LIFELINE_FD, select.POLLIN)
    log("ready (python %s, pid %d)" % (sys.version.split()[0], os.getpid()))
    while True:
        for fd, _ in poller.poll():
            if fd == LIFELINE_FD:
                log("the agent is gone; exiting")
                return 0
            try:
                msg, fds, _, _ = socket.recv_fds(control, 4096, 1)
            except InterruptedError:
                continue
            if not msg:
                log("control socket closed; exiting")
                return 0
            req = json.loads(msg)
            if req.get("op") != "fork" or len(fds) != 1:
                for fd_ in fds:
                    os.close(fd_)
                control.send(json.dumps({"id": req.get("id"), "error": "bad request"}).encode())
                continue
            fork(control, events, req["id"], fds[0])


def fork(control, events, req_id, chan_fd):
    sys.stdout.flush()
    sys.stderr.flush()
    # No reaping between fork and pidfd_open: the pid can't be recycled under the pidfd.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        pid = os.fork()
        if pid == 0:
            worker_main(chan_fd, (control, events))
        os.close(chan_fd)
        fds = []
        try:
            fds.append(os.pidfd_open(pid))
        except (AttributeError, OSError):
            pass  # the agent opens one itself
        socket.send_fds(control, [json.dumps({"id": req_id, "pid": pid}).encode()], fds)
        for fd in fds:
            os.close(fd)
    except OSError as e:
        try:
            control.send(json.dumps({"id": req_id, "error": "fork: %s" % e}).encode())
        except OSError:
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])


if __name__ == "__main__":
    sys.exit(main())
